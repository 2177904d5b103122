"""The x4 upscaler (`stabilityai/stable-diffusion-x4-upscaler` layout) as a mode of the one pipeline program.

As diffusers' `StableDiffusionUpscalePipeline`: the low-res image (B, h, w, 3) in [-1, 1] is noised to `noise_level`
by the DDPM `low_res_scheduler`, and every UNet call sees [latents, noised image] (4 + 3 = 7 channels) with
class_labels = noise_level. The latents have the low-res image's size; the VAE (factor 4, scaling factor 0.08333)
decodes them to (B, 4h, 4w, 3). Everything else (text encoding, guidance, samplers, the `fori_loop`, sharding,
seeding) is `StableDiffusionPipeline`'s program: the low-res image is conditioning, brought in through the
pipeline's conditioning hooks.

Large inputs are upscaled in overlapping tiles (`tile_size`): each tile is an ordinary upscale of a crop (one
compiled program for the tile shape, memory bounded by one tile), and the tiles' outputs are blended with feathered
weights in pixel space. See `StableDiffusionUpscalePipeline.__call__`.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sdjax import samplers as samplers_lib
from sdjax.pipelines import folder as folder_lib
from sdjax.pipelines import images as images_lib
from sdjax.pipelines.base import OUTPUT_TYPES, PipelineOutput, PromptInputs, check_prompts, check_seed
from sdjax.pipelines.noise import STREAM_IMAGE_LATENTS, image_keys, image_noise, tile_keys
from sdjax.original_layout import ComponentConfigs
from sdjax.pipelines.sd import StableDiffusionPipeline

SCALING_FACTOR = 0.08333  # the x4 upscaler VAE's; diffusers forces it whatever the config says
# The low-res image's noise takes img2img's image stream (this pipeline VAE-encodes nothing).
STREAM_LOW_RES = STREAM_IMAGE_LATENTS


class StableDiffusionUpscalePipeline(StableDiffusionPipeline):
    """Text-guided x4 super-resolution with a diffusers-layout x4 upscaler folder.

    tokenizer, text_encoder, vae (factor 4), unet (in_channels = latent channels + 3, class embeddings for the noise
    level) and the scheduler as `StableDiffusionPipeline`; `low_res_scheduler_config`: the DDPM scheduler config that
    noises the low-res image; `max_noise_level`: the largest noise_level accepted (model_index.json's).
    """

    def __init__(self, *, tokenizer, text_encoder, vae, unet, scheduler_config: dict, low_res_scheduler_config: dict,
                 max_noise_level: int = 350, name: str = "", mesh: Mesh | None = None):
        lc = vae.config.latent_channels
        if unet.config.in_channels != lc + 3:
            raise ValueError(f"the UNet takes {unet.config.in_channels} input channels; an x4 upscaler UNet takes "
                             f"{lc + 3} (latents + the RGB low-res image)")
        if unet.class_embedding is None:
            raise ValueError("the UNet has no class embeddings (num_class_embeds) for the noise level: not an x4 "
                             "upscaler UNet")
        if vae.config.scaling_factor != SCALING_FACTOR:
            warnings.warn(f"the VAE's scaling_factor is {vae.config.scaling_factor}; the x4 upscaler uses "
                          f"{SCALING_FACTOR} (set as diffusers does)", stacklevel=2)
            vae.config = dataclasses.replace(vae.config, scaling_factor=SCALING_FACTOR)
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                         scheduler_config=scheduler_config, name=name, mesh=mesh)
        self.low_res_scheduler_config = dict(low_res_scheduler_config)
        config = samplers_lib.SchedulerConfig.from_dict(self.low_res_scheduler_config).for_class("DDPMScheduler")
        self.low_res_alphas_cumprod = samplers_lib.alphas_cumprod(config)
        self.max_noise_level = int(max_noise_level)

    @classmethod
    def accepts(cls, index: dict) -> bool:
        return folder_lib.has_component(index, "low_res_scheduler")

    def component_configs(self) -> ComponentConfigs:
        return dataclasses.replace(
            super().component_configs(), pipeline_class="StableDiffusionUpscalePipeline",
            low_res_scheduler={"_class_name": "DDPMScheduler", **self.low_res_scheduler_config},
            max_noise_level=self.max_noise_level)

    @classmethod
    def from_parts(cls, source, *, dtype, param_dtype, vae_dtype, mesh):
        """An x4 upscaler: tokenizer, text_encoder, vae, unet, scheduler, low_res_scheduler and `max_noise_level`
        in model_index.json. dtype / param_dtype / vae_dtype as `StableDiffusionPipeline`."""
        from sdjax.models import CLIPTextModel

        source.require(("tokenizer", "text_encoder", "vae", "unet", "scheduler", "low_res_scheduler"))
        return cls(
            tokenizer=source.tokenizer("tokenizer"),
            text_encoder=source.model(CLIPTextModel, "text_encoder", dtype=dtype, param_dtype=param_dtype),
            low_res_scheduler_config=source.scheduler_config("low_res_scheduler"),
            max_noise_level=source.flag("max_noise_level", 350),
            **folder_lib.load_vae_unet(source, dtype, param_dtype, vae_dtype),
            mesh=mesh,
        )

    # -- conditioning: the text, plus the noised low-res image and its noise level ---------------------------------

    def prompt_inputs(self, prompts, negative_prompt, *, cfg, mode, height, width, low_res, noise_level,
                      low_res_noise, keys=None, prompt_syntax="plain", emphasis="original",
                      clip_skip=None, negative_clip_skip=None) -> PromptInputs:
        text = super().prompt_inputs(prompts, negative_prompt, cfg=cfg, mode=mode, height=height, width=width,
                                     prompt_syntax=prompt_syntax, emphasis=emphasis, clip_skip=clip_skip,
                                     negative_clip_skip=negative_clip_skip)
        text.per_prompt["low_res"] = low_res  # (prompts, h, w, 3) in [-1, 1]
        text.per_prompt["noise_level"] = np.full(len(prompts), noise_level, np.int32)
        text.per_image["low_res_noise"] = low_res_noise
        text.keys = keys
        return text

    def conditioning(self, static: tuple):
        encode_text = super().conditioning(static)
        alphas_cumprod = self.low_res_alphas_cumprod

        def encode(encoders, inputs, cfg):
            cond, uncond = encode_text(encoders, inputs, cfg)
            level = inputs["noise_level"]
            # diffusers' DDPMScheduler.add_noise(image, noise, noise_level), float32
            a = jnp.asarray(alphas_cumprod)[level].reshape(-1, 1, 1, 1)
            image = jnp.sqrt(a) * inputs["low_res"].astype(jnp.float32) + jnp.sqrt(1 - a) * inputs["low_res_noise"]
            cond = dataclasses.replace(cond, class_labels=level, unet_concat=image)
            if uncond is not None:
                uncond = dataclasses.replace(uncond, class_labels=level)
            return cond, uncond

        return encode

    # -- noise -------------------------------------------------------------------------------------------------

    def default_noise(self, height: int, width: int, seed: int | Sequence[int] = 0, num_prompts: int = 1,
                      num_images_per_prompt: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The noise a call with this seed uses for a (height x width) low-res image: (latents (N, h, w, C),
        low_res_noise (N, h, w, 3)), N = num_prompts * num_images_per_prompt, standard normal. Image i's latents
        are drawn from its key (`pipeline.image_keys`), its low-res noise from that key's stream 1; a tiled run
        crops both from these full-size arrays, so overlapping tiles see the same noise."""
        prompt_index = np.repeat(np.arange(num_prompts), num_images_per_prompt)
        keys = image_keys(seed, prompt_index, np.tile(np.arange(num_images_per_prompt), num_prompts))
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            keys = jnp.asarray(keys)
            latents = image_noise(keys, (height, width, self.latent_channels))
            low_res_noise = image_noise(keys, (height, width, 3), STREAM_LOW_RES)
        return np.asarray(latents), np.asarray(low_res_noise)

    # -- call --------------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        image,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        noise_level: int = 20,
        sampler: str = "ddim",
        seed: int | Sequence[int] = 0,
        num_images_per_prompt: int = 1,
        latents=None,
        low_res_noise=None,
        output_type: str = "pil",
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        *,
        prompt_syntax: str = "plain",
        emphasis: str = "original",
        clip_skip: int | None = None,
        negative_clip_skip: int | None = None,
    ) -> PipelineOutput:
        """Upscale `image` 4x, guided by `prompt`.

        image: the low-res image(s): a PIL image, a list (one per prompt) or an NHWC float array in [0, 1]. Sizes are
        rounded down to a multiple of the VAE factor (PIL images resized, bicubic, as diffusers; a list of PIL images
        takes the first one's size). Output (B, 4h, 4w, 3).
        noise_level: how much noise the low-res image gets, 0..max_noise_level (the UNet's class label).
        seed: int (image i uses fold_in(key(seed), i)) or one int per prompt, as `StableDiffusionPipeline`.
        latents: initial noise (B, h, w, C), B = prompts * images per prompt; low_res_noise: the noise added to the
        low-res image, (B | prompts | 1, h, w, 3). Both default to `default_noise(h, w, seed, ...)`; diffusers draws
        low_res_noise once per prompt (its images share it), sdjax once per image.
        tile_size: upscale in overlapping tiles of (tile_size x tile_size) low-res pixels (None: the whole image at
        once). Each tile is a normal upscale of its crop, compiled once for the tile shape; tiles overlap by at least
        `tile_overlap` low-res pixels (default tile_size // 4) and are blended in pixel space with weights that ramp
        linearly over the overlap (output_type="latent": in latent space). The latents and low-res noise of a tile
        are crops of the full-size noise, so an image that fits in one tile upscales exactly as untiled; in a
        multi-tile run the stochastic samplers draw each tile's step noise from a key of its own.
        output_type: "pil", "np" ((B, 4h, 4w, 3) in [0, 1]) or "latent" ((B, h, w, C)).
        prompt_syntax, emphasis, clip_skip, negative_clip_skip: as `StableDiffusionPipeline.__call__`.
        """
        prompts = check_prompts(prompt)
        if image is None:
            raise ValueError("image is required: the low-res image to upscale")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if isinstance(num_images_per_prompt, bool) or int(num_images_per_prompt) < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        seed = check_seed(seed, len(prompts))
        n_per = int(num_images_per_prompt)
        n_prompts = len(prompts)
        n = n_prompts * n_per
        prompt_index = np.repeat(np.arange(n_prompts), n_per)
        level = self._check_noise_level(noise_level)
        low = images_lib.load_low_res(image, n_prompts, self.vae_scale_factor)
        h, w = low.shape[1:3]

        default = None
        if latents is None or low_res_noise is None:
            default = self.default_noise(h, w, seed, n_prompts, n_per)
        if latents is None:
            latents = default[0]
        latents = np.asarray(latents, np.float32)
        if latents.shape != (n, h, w, self.latent_channels):
            raise ValueError(f"latents must have shape {(n, h, w, self.latent_channels)} (batch, h, w, C) for a "
                             f"{h}x{w} low-res image, got {latents.shape}")
        if low_res_noise is None:
            low_res_noise = default[1]
        low_res_noise = np.asarray(low_res_noise, np.float32)
        if low_res_noise.ndim != 4 or low_res_noise.shape[1:] != (h, w, 3):
            raise ValueError(f"low_res_noise must be (batch, {h}, {w}, 3) like the low-res image, got "
                             f"{low_res_noise.shape}")
        low_res_noise = images_lib.per_image(low_res_noise, n_prompts, prompt_index, "low_res_noise")

        ys, tile_h = tile_starts(h, tile_size, tile_overlap)
        xs, tile_w = tile_starts(w, tile_size, tile_overlap)
        tiles = [(y, x) for y in ys for x in xs]
        call = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
                    seed=seed, num_images_per_prompt=n_per, image=None, mask_image=None, strength=1.0)

        def upscale(y, x, keys, output):  # the crop at (y, x), as an ordinary call of the shared program
            crop = (slice(None), slice(y, y + tile_h), slice(x, x + tile_w))
            options = dict(low_res=low[crop], noise_level=level, low_res_noise=low_res_noise[crop], keys=keys,
                           prompt_syntax=prompt_syntax, emphasis=emphasis, clip_skip=clip_skip,
                           negative_clip_skip=negative_clip_skip)
            return self.generate_images(prompts, negative_prompt, height=tile_h * self.vae_scale_factor,
                                         width=tile_w * self.vae_scale_factor, latents=latents[crop],
                                         output_type=output, text_options=options, **call)

        if len(tiles) == 1:
            return upscale(0, 0, None, output_type)
        if jax.process_count() > 1:
            raise ValueError("tiled upscaling runs in one process; give tile_size=None or run one process")
        f = 1 if output_type == "latent" else self.vae_scale_factor
        overlap = effective_overlap(tile_size, tile_overlap)
        keys = image_keys(seed, prompt_index, np.tile(np.arange(n_per), n_prompts))
        total = weights = None
        for t, (y, x) in enumerate(tiles):
            out = upscale(y, x, tile_keys(keys, t), "latent" if output_type == "latent" else "np").images
            if total is None:
                total = np.zeros((n, h * f, w * f, out.shape[-1]), np.float32)
                weights = np.zeros((h * f, w * f, 1), np.float32)
            wt = feather(tile_h, y, h, overlap, f)[:, None] * feather(tile_w, x, w, overlap, f)[None, :]
            region = (slice(y * f, (y + tile_h) * f), slice(x * f, (x + tile_w) * f))
            total[(slice(None), *region)] += out * wt[..., None]
            weights[region] += wt[..., None]
        images = total / weights
        if output_type in ("latent", "np"):
            return PipelineOutput(images=images)
        return PipelineOutput(images=images_lib.numpy_to_pil(images))

    # -- helpers -----------------------------------------------------------------------------------------------

    def _check_noise_level(self, noise_level) -> int:
        if isinstance(noise_level, bool) or not isinstance(noise_level, (int, np.integer)):
            raise ValueError(f"noise_level must be an integer, got {noise_level!r}")
        limit = min(self.max_noise_level, self.unet.config.num_class_embeds - 1,
                    len(self.low_res_alphas_cumprod) - 1)
        if not 0 <= int(noise_level) <= limit:
            raise ValueError(f"noise_level must be in [0, {limit}] (max_noise_level), got {noise_level}")
        return int(noise_level)


# ----------------------------------------------------------------------------------------------------------------
# Tiles


def effective_overlap(tile_size, tile_overlap) -> int:
    if tile_size is None:
        return 0
    return int(tile_size) // 4 if tile_overlap is None else int(tile_overlap)


def tile_starts(length: int, tile_size, tile_overlap) -> tuple[list[int], int]:
    """(start of each tile along one side, the tile extent): the fewest tiles of `tile_size` that cover `length`
    with neighbours overlapping by at least `tile_overlap`, spread evenly, the last one ending at the border."""
    if tile_size is None:
        if tile_overlap is not None:
            raise ValueError("tile_overlap needs tile_size")
        return [0], length
    for name, v in (("tile_size", tile_size), ("tile_overlap", tile_overlap)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    tile, overlap = int(tile_size), effective_overlap(tile_size, tile_overlap)
    if tile < 8 or not 0 <= overlap < tile:
        raise ValueError(f"tile_size must be at least 8 and tile_overlap in [0, tile_size) (low-res pixels), got "
                         f"tile_size {tile_size}, tile_overlap {overlap}")
    if length <= tile:
        return [0], length
    count = -(-(length - overlap) // (tile - overlap))
    # integer spacing: neighbours advance by at most tile - overlap
    return [k * (length - tile) // (count - 1) for k in range(count)], tile


def feather(extent: int, start: int, length: int, overlap: int, f: int) -> np.ndarray:
    """A tile's blend weights along one side, (extent * f,): 1 inside, a linear ramp (never 0) over the `overlap`
    pixels next to an edge shared with a neighbour; none at the image border."""
    n, ramp = extent * f, overlap * f
    w = np.ones(n, np.float32)
    if ramp:
        up = (np.arange(n, dtype=np.float32) + 0.5) / ramp
        if start > 0:
            w = np.minimum(w, up)
        if start + extent < length:
            w = np.minimum(w, up[::-1])
    return w
