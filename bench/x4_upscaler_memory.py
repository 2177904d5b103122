"""Memory of the x4 upscaler's program, read from XLA's compiled program without any weights or any run.

    python bench/x4_upscaler_memory.py                 # every variant, table on stdout
    python bench/x4_upscaler_memory.py tile128-bf16    # one variant

The real x4 upscaler networks (configs in sdjax/model_configs/: UNet, factor-4 VAE, OpenCLIP ViT-H text encoder) are
built shape-only in a `StableDiffusionUpscalePipeline`, and the call a user would make (one prompt, guidance, so the
UNet sees batch 2) is lowered and compiled without running; `compiled.memory_analysis()` gives the bytes of the
arguments (weights, inputs), the output and the temporaries (every intermediate buffer after XLA's buffer sharing, the
sampling loop included). Peak ~ arguments + output + temporaries - aliased.

A tiled 512² -> 2048² upscale runs the `tile128` program once per tile (25 tiles of 128² for 512², overlap 32); the
host holds the 2048² output and its blend weights on top (48 MiB + 16 MiB per image, float32). The numbers are the
CPU compiler's plan for the program (its own fusion and layout choices), not a GPU's or TPU's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "sdjax" / "model_configs"
GIB = 1024 ** 3
SCHEDULER = dict(  # stabilityai/stable-diffusion-x4-upscaler's scheduler and low_res_scheduler
    _class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
    beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1,
    set_alpha_to_one=False, clip_sample=False,
)
LOW_RES_SCHEDULER = dict(_class_name="DDPMScheduler", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                         beta_schedule="scaled_linear", clip_sample=False)
VARIANTS = {  # name: (low-res side, dtype, attention query chunk, VAE tile side in pixels or None)
    "tile128-bf16": (128, "bfloat16", None, None),
    "tile128-fp32": (128, "float32", None, None),
    "whole512-bf16-vaetiled": (512, "bfloat16", 1024, 512),
}


def abstract_pipeline(dtype):
    from sdjax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from sdjax.tokenizer import Tokenizer
    from sdjax.pipelines.upscale import StableDiffusionUpscalePipeline

    def config(name):
        return json.loads((CONFIGS / name).read_text())

    kw = dict(dtype=dtype, param_dtype=dtype)
    return StableDiffusionUpscalePipeline(
        tokenizer=Tokenizer.from_pretrained(),
        text_encoder=CLIPTextModel.abstract(config("openclip_vit_h14_text.json"), **kw),
        vae=AutoencoderKL.abstract(config("x4_upscaler_vae.json"), **kw),
        unet=UNet2DConditionModel.abstract(config("x4_upscaler_unet.json"), **kw),
        scheduler_config=SCHEDULER, low_res_scheduler_config=LOW_RES_SCHEDULER, name="x4-upscaler",
    )


def measure(name: str) -> dict:
    import jax.numpy as jnp
    import numpy as np

    side, dtype, chunk, vae_tile = VARIANTS[name]
    pipe = abstract_pipeline(getattr(jnp, dtype))
    pipe.enable_attention_chunking(chunk)
    if vae_tile:
        pipe.enable_vae_tiling(True, tile_size=vae_tile)
    got = pipe.compile_call("a photo of a cat", np.full((side, side, 3), 0.5, np.float32), num_inference_steps=75,
                            guidance_scale=9.0, output_type="np")
    m = got.compiled.memory_analysis()
    out = dict(variant=name, low_res=side, output=4 * side, dtype=dtype,
               compile_s=round(got.lower_seconds + got.compile_seconds, 1),
               argument_gib=m.argument_size_in_bytes / GIB, output_gib=m.output_size_in_bytes / GIB,
               temp_gib=m.temp_size_in_bytes / GIB, alias_gib=m.alias_size_in_bytes / GIB)
    out["peak_gib"] = out["argument_gib"] + out["output_gib"] + out["temp_gib"] - out["alias_gib"]
    return out


def main(argv):
    for name in argv or list(VARIANTS):
        r = measure(name)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
