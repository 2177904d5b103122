"""Stable Diffusion 1.x / 2.x (and their inpainting models): one CLIP text encoder, its last hidden state as the
UNet's context. txt2img, img2img and inpainting are modes of the one program (`sdjax.pipelines.program`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sdjax import prompts as prompts_lib
from sdjax.original_layout import ComponentConfigs
from sdjax.pipelines import folder as folder_lib
from sdjax.pipelines.base import DiffusionPipeline, PipelineOutput, PromptInputs, per_prompt
from sdjax.pipelines.program import Conditioning


def scheduler_with_class(config: dict) -> dict:
    """A scheduler config with its diffusers `_class_name` (a folder's file may lack it; DDIM then, sdjax's default
    sampler)."""
    return {"_class_name": "DDIMScheduler", **config}


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
        """Load a diffusers pipeline folder (`model_index.json`, tokenizer, text_encoder, vae, unet, scheduler), or
        a single-file checkpoint (a path to a file: `from_single_file` with its defaults).

        dtype: compute dtype of the networks (float32, bfloat16, float16); param_dtype: storage (default dtype);
        vae_dtype: the VAE's dtype (default dtype; float32 avoids fp16 VAE overflow). Called on this class, an SDXL
        or x4 upscaler folder gives that pipeline class.
        """
        if Path(path_or_id).expanduser().is_file():
            return cls.from_single_file(path_or_id, dtype=dtype, param_dtype=param_dtype, vae_dtype=vae_dtype,
                                        mesh=mesh)
        folder, index = folder_lib.read_index(path_or_id)
        return cls.load(folder_lib.FolderSource(folder, index, variant), dtype=dtype, param_dtype=param_dtype,
                        vae_dtype=vae_dtype, mesh=mesh)

    @classmethod
    def from_single_file(cls, path, config=None, prediction_type=None, upcast_attention=None, image_size=None,
                         extract_ema=False, dtype=jnp.float32, param_dtype=None, vae_dtype=None,
                         mesh: Mesh | None = None):
        """Load a single-file checkpoint in the original CompVis / Stability layout (`.safetensors`, or a PyTorch
        `.ckpt`/`.pt` read without torch and without running any pickled code; see `sdjax.formats`).

        config: a diffusers folder or hub id whose configs to use (as diffusers' `config=`), or a built-in name
        (sd15, sd15-inpainting, sd21, sd21-base, sd2-inpainting, sdxl, sdxl-refiner, x4-upscaler); default: the
        family detected from the file's keys and shapes. prediction_type ("epsilon" | "v_prediction"): overrides
        the scheduler's (SD 2.x files do not say; the 768 v-prediction model is assumed, with a printed note).
        upcast_attention, image_size: override the UNet config. extract_ema: use the EMA UNet weights of a
        training checkpoint. Returns the class of the family (SD, SDXL base/refiner, x4 upscaler).
        """
        from sdjax.pipelines.single_file import open_single_file

        source = open_single_file(path, config=config, prediction_type=prediction_type,
                                  upcast_attention=upcast_attention, image_size=image_size, extract_ema=extract_ema)
        return cls.load(source, dtype=dtype, param_dtype=param_dtype, vae_dtype=vae_dtype, mesh=mesh)

    @classmethod
    def load(cls, source, *, dtype, param_dtype, vae_dtype, mesh):
        """The pipeline from a source of parts (`folder.FolderSource`, `single_file.SingleFileSource`): this class,
        or the loaded subclass whose `accepts(source.index)` is true."""
        if not cls.accepts(source.index):
            klass = _subclass_for(cls, source.index)
            if klass is None:
                raise ValueError(f"{source.name}: the model is a {source.index.get('_class_name', 'another pipeline')}"
                                 f", which {cls.__name__} does not load; use sdjax.StableDiffusionPipeline")
            return klass.load(source, dtype=dtype, param_dtype=param_dtype, vae_dtype=vae_dtype, mesh=mesh)
        return cls.from_parts(source, dtype=dtype, param_dtype=param_dtype, vae_dtype=vae_dtype, mesh=mesh)

    @classmethod
    def from_parts(cls, source, *, dtype, param_dtype, vae_dtype, mesh):
        """The pipeline from the parts of a source this class accepts."""
        from sdjax.models import CLIPTextModel

        source.require(("tokenizer", "text_encoder", "vae", "unet", "scheduler"))
        return cls(
            tokenizer=source.tokenizer("tokenizer"),
            text_encoder=source.model(CLIPTextModel, "text_encoder", dtype=dtype, param_dtype=param_dtype),
            **folder_lib.load_vae_unet(source, dtype, param_dtype, vae_dtype),
            mesh=mesh,
        )

    def component_configs(self) -> ComponentConfigs:
        """The configs and model_index.json of this pipeline's parts as they are (what `save_pretrained` writes)."""
        inpaint = self.unet.config.in_channels == 2 * self.latent_channels + 1
        return ComponentConfigs(
            pipeline_class="StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline",
            unet=self.unet.config.to_dict(), vae=self.vae.config.to_dict(),
            text_encoder=self.text_encoder.config.to_dict(), text_encoder_2=None,
            scheduler=scheduler_with_class(self.scheduler_config))

    # -- conditioning: the last hidden state of the CLIP text encoder ------------------------------------------------

    def text_encoders(self) -> dict:
        return {"text_encoder": self.text_encoder}

    def prompt_inputs(self, prompts, negative_prompt, *, cfg, mode, height, width, prompt_syntax="plain",
                      emphasis="original", clip_skip=None, negative_clip_skip=None) -> PromptInputs:
        negatives = [""] * len(prompts) if negative_prompt is None else per_prompt(
            negative_prompt, len(prompts), "negative_prompt")
        groups = {"": [(self.tokenizer, prompts)]}
        if cfg:
            groups["neg_"] = [(self.tokenizer, negatives)]
        inputs, static = prompts_lib.text_inputs(groups, prompt_syntax, emphasis)
        skips = (("clip_skip", check_clip_skip(clip_skip, self.clip_skip_limit())),
                 ("neg_clip_skip", check_clip_skip(negative_clip_skip, self.clip_skip_limit())))
        return PromptInputs(per_prompt=inputs, static=(*static, *skips))

    def clip_skip_limit(self) -> int:
        """The largest clip_skip: the prompt is read from layer L - clip_skip (1 at least) of L."""
        return min(m.config.num_hidden_layers for m in self.text_encoders().values()) - 1

    def conditioning(self, static: tuple):
        options = dict(static)
        emphasis = options["emphasis"]

        def encode(encoders, inputs, cfg):
            te = encoders["text_encoder"]

            def side(prefix):
                skip = options.get(f"{prefix}clip_skip")

                def states(ids):  # diffusers' clip_skip: an earlier layer's output, through the final layer norm
                    if not skip:
                        return te(ids).last_hidden_state, None
                    hidden = te(ids, output_hidden_states=True).hidden_states[-(skip + 1)]
                    return te.text_model.final_layer_norm(hidden), None

                context, _ = encode_chunks(states, inputs[f"{prefix}ids_0"], inputs.get(f"{prefix}weights_0"),
                                           emphasis)
                return Conditioning(context=context, context_mask=inputs.get(f"{prefix}mask"))

            return side(""), side("neg_") if cfg else None

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
        *,
        prompt_syntax: str = "plain",
        emphasis: str = "original",
        clip_skip: int | None = None,
        negative_clip_skip: int | None = None,
    ) -> PipelineOutput:
        """Generate images. Mode: txt2img without `image`, img2img with `image`, inpaint with `image` and
        `mask_image` (white = repaint).

        prompt: one string or a list; negative_prompt: None, one string, or one per prompt.
        latents: initial noise, NHWC (batch, H/f, W/f, C) with f the VAE factor, batch = prompts * images per prompt.
        image / mask_image: a PIL image, a list of them (one per prompt), or an NHWC float array in [0, 1]; for
        img2img also latents (batch or prompts, H/f, W/f, C), taken as they are (no VAE encoding).
        seed: int (image i uses fold_in(key(seed), i)) or one int per prompt.
        guidance_rescale: diffusers' rescale of the guided prediction towards the text prediction's std (0: off).
        prompt_syntax: "plain" (the text is literal) or "a1111" (`(word:1.3)`, `[word]`, BREAK, ...; also for the
        negative prompts); prompts of any length are encoded in chunks of 75 tokens (`sdjax.prompts`). emphasis:
        with "a1111", "original" (A1111's default: weighted chunks keep their mean) or "none".
        clip_skip: diffusers' — the prompt is read from the text encoder's layer `clip_skip` before the last (then
        its final layer norm); None or 0: the last layer. As in diffusers it does not change the negative prompts;
        negative_clip_skip does (A1111's "Clip skip: N" is clip_skip = negative_clip_skip = N-1).
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
            text_options=dict(prompt_syntax=prompt_syntax, emphasis=emphasis, clip_skip=clip_skip,
                              negative_clip_skip=negative_clip_skip),
        )


def check_clip_skip(clip_skip, top: int) -> int | None:
    """clip_skip as an int 1..top (None for None or 0); `top`: the pipeline's `clip_skip_limit()`."""
    if clip_skip is None or clip_skip == 0:
        return None
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or not 0 <= clip_skip <= top:
        raise ValueError(f"clip_skip must be an integer from 0 to {top} for this model's text encoder, got "
                         f"{clip_skip!r}")
    return int(clip_skip)


def emphasize(states, weights, emphasis: str):
    """A1111's emphasis on encoded chunks: states (N, k, 77, D) times the token weights (N, k, 77); "original"
    then rescales each chunk of each prompt to its mean before weighting, "none" does not. Float32 arithmetic."""
    z = states.astype(jnp.float32)
    weighted = z * weights[..., None].astype(jnp.float32)
    if emphasis == "original":
        weighted = weighted * (z.mean(axis=(2, 3), keepdims=True) / weighted.mean(axis=(2, 3), keepdims=True))
    return weighted.astype(states.dtype)


def encode_chunks(run, ids, weights=None, emphasis: str | None = None):
    """Encode prompts chunk by chunk. run: (M, 77) ids -> (states (M, 77, D), pooled (M, P) or None); ids, weights:
    (N, k, 77). Returns (states (N, 77 k, D) with emphasis applied when `emphasis` is given, pooled of each
    prompt's first chunk (N, P) or None)."""
    n, k, length = ids.shape
    states, pooled = run(ids.reshape(n * k, length))
    states = states.reshape(n, k, length, states.shape[-1])
    if emphasis is not None:
        states = emphasize(states, weights, emphasis)
    pooled = None if pooled is None else pooled.reshape(n, k, pooled.shape[-1])[:, 0]
    return states.reshape(n, k * length, states.shape[-1]), pooled


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
