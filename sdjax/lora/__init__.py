"""LoRA and LyCORIS adapters: `formats` reads the files, `targets` finds the layers they change, `merge` computes
the merged weights on the devices (see `sdjax.pipelines.base.DiffusionPipeline.load_lora_weights`)."""
