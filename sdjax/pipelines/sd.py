"""Stable Diffusion 1.x / 2.x (and their inpainting models): one CLIP text encoder, its last hidden state as the
UNet's context. txt2img, img2img and inpainting are modes of the one program (`sdjax.pipelines.program`)."""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from jax.sharding import Mesh

from sdjax.pipelines import folder as folder_lib
from sdjax.pipelines.base import DiffusionPipeline, PipelineOutput, PromptInputs, per_prompt
from sdjax.pipelines.program import Conditioning


class StableDiffusionPipeline(DiffusionPipeline):
    """txt2img / img2img / inpaint with a diffusers-layout model (SD 1.x, 2.x, inpainting).

    `StableDiffusionPipeline.from_pretrained` on an SDXL folder (one with `text_encoder_2`) returns a
    `StableDiffusionXLPipeline`, on an x4 upscaler folder a `StableDiffusionUpscalePipeline`
    (`sdjax.pipelines.auto` picks the class).
    """

    def __init__(self, *, tokenizer, text_encoder, vae, unet, scheduler_config: dict, name: str = "",
                 mesh: Mesh | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        super().__init__(vae=vae, unet=unet, scheduler_config=scheduler_config, name=name, mesh=mesh)

    @classmethod
    def accepts(cls, index: dict) -> bool:
        """Whether a folder with this model_index.json is loaded by this class (and not by a subclass)."""
        return not (folder_lib.has_component(index, "text_encoder_2")
                    or folder_lib.has_component(index, "low_res_scheduler"))

    @classmethod
    def from_pretrained(cls, path_or_id, dtype=jnp.float32, param_dtype=None, vae_dtype=None, variant=None,
                        mesh: Mesh | None = None):
        """Load a diffusers pipeline folder (`model_index.json`, tokenizer, text_encoder, vae, unet, scheduler).

        dtype: compute dtype of the networks (float32, bfloat16, float16); param_dtype: storage (default dtype);
        vae_dtype: the VAE's dtype (default dtype; float32 avoids fp16 VAE overflow). Called on this class, an SDXL
        or x4 upscaler folder gives that pipeline class.
        """
        folder, index = folder_lib.read_index(path_or_id)
        kw = dict(dtype=dtype, param_dtype=param_dtype, vae_dtype=vae_dtype, variant=variant, mesh=mesh)
        if not cls.accepts(index):
            klass = _subclass_for(cls, index)
            if klass is None:
                raise ValueError(f"{folder}: model_index.json names {index.get('_class_name', 'another pipeline')}, "
                                 f"which {cls.__name__} does not load; use sdjax.StableDiffusionPipeline")
            return klass.load_folder(folder, index, **kw)
        return cls.load_folder(folder, index, **kw)

    @classmethod
    def load_folder(cls, folder, index: dict, *, dtype, param_dtype, vae_dtype, variant, mesh):
        """The pipeline of a diffusers folder whose model_index.json (`index`) this class accepts."""
        from sdjax.models import CLIPTextModel
        from sdjax.tokenizer import Tokenizer

        folder_lib.require_components(folder, index, ("tokenizer", "text_encoder", "vae", "unet", "scheduler"))
        return cls(
            tokenizer=Tokenizer.from_pretrained(folder / "tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype,
                                                       param_dtype=param_dtype, variant=variant),
            **folder_lib.load_vae_unet(folder, dtype, param_dtype, vae_dtype, variant),
            mesh=mesh,
        )

    # -- conditioning: the last hidden state of the CLIP text encoder ------------------------------------------------

    def text_encoders(self) -> dict:
        return {"text_encoder": self.text_encoder}

    def prompt_inputs(self, prompts, negative_prompt, *, cfg, mode, height, width) -> PromptInputs:
        negatives = [""] * len(prompts) if negative_prompt is None else per_prompt(
            negative_prompt, len(prompts), "negative_prompt")
        inputs = {"ids": self.tokenizer(prompts)[0]}
        if cfg:
            inputs["neg_ids"] = self.tokenizer(negatives)[0]
        return PromptInputs(per_prompt=inputs)

    def conditioning(self, static: tuple):
        def encode(encoders, inputs, cfg):
            te = encoders["text_encoder"]
            cond = Conditioning(context=te(inputs["ids"]).last_hidden_state)
            uncond = Conditioning(context=te(inputs["neg_ids"]).last_hidden_state) if cfg else None
            return cond, uncond

        return encode

    # -- call ------------------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sampler: str = "ddim",
        seed: int | Sequence[int] = 0,
        num_images_per_prompt: int = 1,
        latents=None,
        image=None,
        mask_image=None,
        strength: float = 0.8,
        output_type: str = "pil",
        guidance_rescale: float = 0.0,
    ) -> PipelineOutput:
        """Generate images. Mode: txt2img without `image`, img2img with `image`, inpaint with `image` and
        `mask_image` (white = repaint).

        prompt: one string or a list; negative_prompt: None, one string, or one per prompt.
        latents: initial noise, NHWC (batch, H/f, W/f, C) with f the VAE factor, batch = prompts * images per prompt.
        image / mask_image: a PIL image, a list of them (one per prompt), or an NHWC float array in [0, 1]; for
        img2img also latents (batch or prompts, H/f, W/f, C), taken as they are (no VAE encoding).
        seed: int (image i uses fold_in(key(seed), i)) or one int per prompt.
        guidance_rescale: diffusers' rescale of the guided prediction towards the text prediction's std (0: off).
        Returns PipelineOutput(images=...) with "pil" (list of PIL images), "np" ((B, H, W, 3) float in [0, 1]) or
        "latent" ((B, H/f, W/f, C) latents, unscaled by the VAE scaling factor as diffusers returns them).
        With several processes (sdjax.distributed) the batch is split over every process's devices and each
        process gets only its own images; `indices` says which of the B they are.
        A new prompt, seed, guidance, strength or step count (within a bucket of sampler calls, see
        `samplers.calls_bucket`) reuses the compiled program.
        """
        return self.generate_images(
            prompt, negative_prompt, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, sampler=sampler, seed=seed, num_images_per_prompt=num_images_per_prompt,
            latents=latents, image=image, mask_image=mask_image, strength=strength, output_type=output_type,
            guidance_rescale=guidance_rescale,
        )


def _subclass_for(cls, index: dict):
    """The loaded subclass of `cls` that accepts this model_index.json (families register by subclassing; the
    `sdjax.pipelines.auto` module imports them all)."""
    for sub in cls.__subclasses__():
        if sub.accepts(index):
            return sub
        deeper = _subclass_for(sub, index)
        if deeper is not None:
            return deeper
    return None
