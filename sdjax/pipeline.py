"""One Stable Diffusion pipeline for txt2img, img2img and inpainting, compiled as a single sharded program.

The three modes differ only in how the first latents are made and in what the UNet sees each step:
- txt2img: noise * init_noise_sigma (or the caller's `latents`);
- img2img: VAE-encode `image`, noise it to the timestep chosen by `strength`, denoise from there;
- inpaint: as img2img, plus a mask; a 9-channel (inpainting) UNet gets [latents, mask, masked-image latents] as input,
  an ordinary 4-channel UNet gets the known region pasted back (noised to the next timestep) after every step.

Text encoding, the whole sampling loop (`lax.fori_loop`) and VAE decoding run in one `jax.jit` whose batch inputs are
sharded over a `Mesh` of all devices (axis `data`) and whose weights are replicated. Image i of a call draws all its
randomness from `fold_in(key(seed), i)`, so the pictures do not depend on how many devices share the batch.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdjax import samplers as samplers_lib
from sdjax.loading import resolve_path
from sdjax.models.layers import Attention, nearest_resize

MODES = ("txt2img", "img2img", "inpaint")
OUTPUT_TYPES = ("pil", "np", "latent")

# Random streams of one image, folded into that image's key (its initial noise uses the image key itself).
_STREAM_IMAGE_LATENTS = 1
_STREAM_MASKED_LATENTS = 2
_STREAM_STEP = 3  # + call index


def enable_compilation_cache(path: str | os.PathLike) -> None:
    """Keep compiled programs on disk so that a second process skips most of the compile time."""
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices (of every process), axis name `data`."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def image_keys(seed, prompt_index: np.ndarray, index_in_prompt: np.ndarray) -> jax.Array:
    """Key data (N, 2) of each image: an int seed keys image i by fold_in(key(seed), i); a list of seeds (one per
    prompt) keys image j of prompt p by fold_in(key(seed[p]), j), so a prompt reproduces alone or in a batch."""
    if isinstance(seed, (int, np.integer)):
        index = np.arange(len(prompt_index))
        seeds = np.full(len(prompt_index), int(seed))
    else:
        seeds = np.asarray([int(s) for s in seed])[prompt_index]
        index = index_in_prompt
    make = jax.vmap(lambda s, i: jax.random.key_data(jax.random.fold_in(jax.random.key(s), i)))
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return np.asarray(make(jnp.asarray(seeds, jnp.uint32), jnp.asarray(index, jnp.uint32)))


def _normal(key_data, stream, shape):
    key = jax.random.wrap_key_data(key_data)
    if stream is not None:
        key = jax.random.fold_in(key, stream)
    return jax.random.normal(key, shape, jnp.float32)


def image_noise(key_data: jax.Array, shape, stream=None) -> jax.Array:
    """Per-image standard normal noise, (N, *shape): the same numbers whatever the batch or device count."""
    return jax.vmap(lambda k: _normal(k, stream, shape))(key_data)


@dataclasses.dataclass
class PipelineOutput:
    images: Any


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything that fixes the compiled program (one compile per distinct plan)."""

    mode: str
    sampler: str
    steps: int
    start: int
    cfg: bool
    batch: int  # padded to a multiple of the device count
    latent_hw: tuple
    given_latents: bool
    inpaint_unet: bool  # 9-channel inpainting UNet (else mask blending)
    decode: bool
    vae_tiling: bool


def _to_list(x):
    if x is None:
        return None
    if isinstance(x, str):
        return [x]
    return list(x)


class StableDiffusionPipeline:
    """txt2img / img2img / inpaint with a diffusers-layout model (SD 1.x, 2.x, inpainting)."""

    def __init__(self, *, tokenizer, text_encoder, vae, unet, scheduler_config: dict, name: str = "",
                 mesh: Mesh | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        self.name = name
        self.mesh = mesh or data_mesh()
        self.vae_tiling = False
        self._replicated = NamedSharding(self.mesh, P())
        self._batched = NamedSharding(self.mesh, P("data"))
        self._programs: dict[_Plan, Any] = {}
        for module in (text_encoder, vae, unet):
            state = nnx.state(module)
            nnx.update(module, jax.device_put(state, self._replicated))

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id, dtype=jnp.float32, param_dtype=None, vae_dtype=None, variant=None,
                        mesh: Mesh | None = None):
        """Load a diffusers pipeline folder (`model_index.json`, tokenizer, text_encoder, vae, unet, scheduler).

        dtype: compute dtype of the networks (float32, bfloat16, float16); param_dtype: storage (default dtype);
        vae_dtype: the VAE's dtype (default dtype; float32 avoids fp16 VAE overflow).
        """
        from sdjax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
        from sdjax.tokenizer import Tokenizer

        folder = resolve_path(path_or_id)
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{folder}: no model_index.json (not a diffusers pipeline folder)")
        index = json.loads(index_file.read_text())
        for part in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"):
            if part not in index or not (folder / part).is_dir():
                raise FileNotFoundError(f"{folder}: the pipeline has no {part}/ component")
        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        if not scheduler_file.is_file():
            raise FileNotFoundError(f"{scheduler_file}: missing")
        kw = dict(dtype=dtype, param_dtype=param_dtype, variant=variant)
        vae_dtype = vae_dtype or dtype
        return cls(
            tokenizer=Tokenizer.from_pretrained(folder / "tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=vae_dtype,
                                              param_dtype=param_dtype or vae_dtype, variant=variant),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw),
            scheduler_config=json.loads(scheduler_file.read_text()),
            name=folder.name,
            mesh=mesh,
        )

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def enable_attention_chunking(self, query_chunk: int | None = 1024) -> None:
        """Compute attention in chunks of `query_chunk` queries (same numbers, less memory); None turns it off."""
        for module in (self.unet, self.vae):
            for _, m in nnx.iter_modules(module):
                if isinstance(m, Attention):
                    m.query_chunk_size = query_chunk
        self._programs.clear()

    def enable_vae_tiling(self, on: bool = True) -> None:
        """Decode large images tile by tile (diffusers' tiled decode)."""
        self.vae_tiling = on
        self._programs.clear()

    # ------------------------------------------------------------------------------------------------------------
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
    ) -> PipelineOutput:
        """Generate images. Mode: txt2img without `image`, img2img with `image`, inpaint with `image` and
        `mask_image` (white = repaint).

        prompt: one string or a list; negative_prompt: None, one string, or one per prompt.
        latents: initial noise, NHWC (batch, H/f, W/f, C) with f the VAE factor, batch = prompts * images per prompt.
        image / mask_image: a PIL image, a list of them (one per prompt), or an NHWC float array in [0, 1].
        seed: int (image i uses fold_in(key(seed), i)) or one int per prompt.
        Returns PipelineOutput(images=...) with "pil" (list of PIL images), "np" ((B, H, W, 3) float in [0, 1]) or
        "latent" ((B, H/f, W/f, C) latents, unscaled by the VAE scaling factor as diffusers returns them).
        """
        prompts = _to_list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        negatives = _to_list(negative_prompt)
        if negatives is None:
            negatives = [""] * len(prompts)
        elif len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}: give one, or one per prompt"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if int(num_images_per_prompt) < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image: inpainting repaints the masked part of an image")
        mode = "txt2img" if image is None else ("img2img" if mask_image is None else "inpaint")
        if mode != "txt2img" and not (0.0 < float(strength) <= 1.0):
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if not isinstance(seed, (int, np.integer)):
            seed = list(seed)
            if len(seed) != len(prompts):
                raise ValueError(f"seed has {len(seed)} entries but there are {len(prompts)} prompts: give one int, "
                                 "or one per prompt")

        n_per = int(num_images_per_prompt)
        n = len(prompts) * n_per
        f = self.vae_scale_factor
        images = masks = None
        if image is not None:
            images = _load_images(image, len(prompts), height, width, f, "image")
            height, width = images.shape[1:3]
        height = int(height or self.default_size)
        width = int(width or self.default_size)
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f} (the VAE factor), "
                             f"got {height}x{width}")
        if mask_image is not None:
            masks = _load_masks(mask_image, len(prompts), height, width)

        sampler_obj = samplers_lib.make_sampler(sampler, self.scheduler_config, int(num_inference_steps))
        start = 0
        if mode != "txt2img":
            start = sampler_obj.index_for_strength(float(strength))
            if start >= sampler_obj.num_calls:
                raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no step to run; "
                                 "raise strength or num_inference_steps")
        latent_shape = (height // f, width // f, self.latent_channels)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (n, *latent_shape):
                raise ValueError(f"latents must have shape {(n, *latent_shape)} (batch, H/{f}, W/{f}, C), "
                                 f"got {latents.shape}")

        cfg = float(guidance_scale) > 1.0
        n_dev = self.mesh.devices.size
        batch = -(-n // n_dev) * n_dev
        prompt_index = np.repeat(np.arange(len(prompts)), n_per)
        ids = self.tokenizer(prompts)[0][prompt_index]
        neg_ids = self.tokenizer(negatives)[0][prompt_index] if cfg else None
        keys = image_keys(seed, prompt_index, np.tile(np.arange(n_per), len(prompts)))

        def pad(x):  # repeat the last image to fill every device; cut back after
            if x is None:
                return None
            x = np.asarray(x)
            return np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)]) if batch > n else x

        inputs = dict(
            ids=pad(ids), neg_ids=pad(neg_ids), keys=pad(keys), latents=pad(latents),
            image=pad(images[prompt_index]) if images is not None else None,
            mask=pad(masks[prompt_index]) if masks is not None else None,
        )
        plan = _Plan(
            mode=mode, sampler=sampler, steps=int(num_inference_steps), start=start, cfg=cfg, batch=batch,
            latent_hw=latent_shape[:2], given_latents=latents is not None,
            inpaint_unet=self.unet.config.in_channels == self.latent_channels * 2 + 1,
            decode=output_type != "latent", vae_tiling=self.vae_tiling,
        )
        if mode == "inpaint" and not plan.inpaint_unet and self.unet.config.in_channels != self.latent_channels:
            raise ValueError(f"the UNet takes {self.unet.config.in_channels} input channels: not an SD UNet")
        program = self._program(plan, sampler_obj)
        out = program(
            nnx.state(self.text_encoder), nnx.state(self.unet), nnx.state(self.vae),
            {k: None if v is None else jax.device_put(v, self._batched) for k, v in inputs.items()},
            jnp.float32(guidance_scale),
        )
        out = np.asarray(jax.device_get(out))[:n]
        if not np.isfinite(out).all():
            raise FloatingPointError(
                "the pipeline produced NaN/inf values; the usual cause is a float16 VAE overflowing: load with "
                "vae_dtype=jnp.float32 (or dtype=jnp.bfloat16)"
            )
        if output_type == "latent":
            return PipelineOutput(images=out)
        if output_type == "np":
            return PipelineOutput(images=out)
        return PipelineOutput(images=numpy_to_pil(out))

    # ------------------------------------------------------------------------------------------------------------
    def _program(self, plan: _Plan, sampler):
        if plan not in self._programs:
            te_def, unet_def, vae_def = (nnx.graphdef(m) for m in (self.text_encoder, self.unet, self.vae))
            fn = functools.partial(_generate, plan=plan, sampler=sampler, te_def=te_def, unet_def=unet_def,
                                   vae_def=vae_def, scaling_factor=float(self.vae.config.scaling_factor),
                                   latent_channels=self.latent_channels)
            self._programs[plan] = jax.jit(
                fn,
                in_shardings=(self._replicated, self._replicated, self._replicated, self._batched,
                              self._replicated),
                out_shardings=self._batched,
            )
        return self._programs[plan]


def _generate(te_state, unet_state, vae_state, inputs, scale, *, plan: _Plan, sampler, te_def, unet_def, vae_def,
              scaling_factor, latent_channels):
    """The whole generation for one batch: encode text, build first latents, sample, decode."""
    te = nnx.merge(te_def, te_state)
    unet = nnx.merge(unet_def, unet_state)
    vae = nnx.merge(vae_def, vae_state)
    keys = inputs["keys"]
    h, w = plan.latent_hw
    shape = (h, w, latent_channels)

    context = te(inputs["ids"]).last_hidden_state
    if plan.cfg:
        uncond = te(inputs["neg_ids"]).last_hidden_state
        # image-major interleave [uncond_0, cond_0, uncond_1, ...] keeps each image's pair on its own device
        context = jnp.stack([uncond, context], axis=1).reshape(-1, *context.shape[1:])

    noise = inputs["latents"] if plan.given_latents else image_noise(keys, shape)
    noise = noise.astype(jnp.float32)

    image_latents = mask = masked_latents = None
    if plan.mode != "txt2img":
        dist = vae.encode(inputs["image"].astype(vae_dtype(vae))).latent_dist
        eps = image_noise(keys, shape, _STREAM_IMAGE_LATENTS)
        image_latents = (dist.mean + dist.std * eps).astype(jnp.float32) * scaling_factor
    if plan.mode == "inpaint":
        mask_full = inputs["mask"].astype(jnp.float32)  # (N, H, W, 1), binarised
        mask = nearest_resize(mask_full, (h, w))
        if plan.inpaint_unet:
            masked = inputs["image"] * (mask_full < 0.5)
            dist = vae.encode(masked.astype(vae_dtype(vae))).latent_dist
            eps = image_noise(keys, shape, _STREAM_MASKED_LATENTS)
            masked_latents = (dist.mean + dist.std * eps).astype(jnp.float32) * scaling_factor

    # First latents
    # diffusers' inpainting starts from pure noise at strength 1 (start 0); img2img always noises the image
    if plan.mode == "txt2img" or (plan.mode == "inpaint" and plan.start == 0):
        x = noise * sampler.init_noise_sigma
    else:
        x = sampler.add_noise(image_latents, noise, plan.start)

    def model(x, i):
        x_in = sampler.scale_model_input(x, i)
        if plan.mode == "inpaint" and plan.inpaint_unet:
            x_in = jnp.concatenate([x_in, mask, masked_latents], axis=-1)
        t = sampler.timesteps[i]
        if plan.cfg:
            pair = jnp.repeat(x_in, 2, axis=0)
            out = unet(pair.astype(unet_dtype(unet)), t, context).astype(jnp.float32)
            out = out.reshape(-1, 2, *out.shape[1:])
            uncond, cond = out[:, 0], out[:, 1]
            return uncond + scale * (cond - uncond)
        return unet(x_in.astype(unet_dtype(unet)), t, context).astype(jnp.float32)

    def body(i, carry):
        x, state = carry
        step_noise = image_noise(keys, shape, _STREAM_STEP + i) if sampler.needs_noise else None
        x, state = sampler.step(state, model(x, i), i, x, step_noise)
        if plan.mode == "inpaint" and not plan.inpaint_unet:
            nxt = jnp.minimum(i + 1, sampler.num_calls - 1)
            known = sampler.add_noise(image_latents, noise, nxt)
            known = jnp.where(i + 1 < sampler.num_calls, known, image_latents)
            x = (1 - mask) * known + mask * x
        return x, state

    x, _ = jax.lax.fori_loop(plan.start, sampler.num_calls, body, (x, sampler.init_state(x, plan.start)))
    if not plan.decode:
        return x
    z = (x / scaling_factor).astype(vae_dtype(vae))
    decoded = vae.tiled_decode(z) if plan.vae_tiling else vae.decode(z)
    return jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def unet_dtype(unet):
    return unet.conv_in.dtype or jnp.float32


def vae_dtype(vae):
    return vae.post_quant_conv.dtype or jnp.float32


# ----------------------------------------------------------------------------------------------------------------
# Images in and out


def numpy_to_pil(images: np.ndarray):
    from PIL import Image

    return [Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)) for im in images]


def _as_arrays(x, n_prompts, what):
    """PIL image(s) or float array(s) in [0, 1] -> list of (H, W, C) float32 arrays, one per prompt."""
    from PIL import Image

    if isinstance(x, Image.Image):
        x = [x]
    elif isinstance(x, (np.ndarray, jax.Array)):
        x = np.asarray(x)
        batched = x.ndim == 4 or (what == "mask_image" and x.ndim == 3 and x.shape[-1] != 1)
        x = list(x) if batched else [x]
    else:
        x = list(x)
    if len(x) == 1 and n_prompts > 1:
        x = x * n_prompts
    if len(x) != n_prompts:
        raise ValueError(f"{what}: got {len(x)} images for {n_prompts} prompts; give one, or one per prompt")
    return x


def _load_images(image, n_prompts, height, width, f, what):
    """-> (n_prompts, H, W, 3) float32 in [-1, 1]; H, W default to the image size rounded down to a multiple of f."""
    from PIL import Image

    out = []
    for im in _as_arrays(image, n_prompts, what):
        if isinstance(im, Image.Image):
            im = im.convert("RGB")
            h = height or im.height // f * f
            w = width or im.width // f * f
            if (im.height, im.width) != (h, w):
                im = im.resize((w, h), resample=Image.LANCZOS)
            arr = np.asarray(im, np.float32) / 255.0
        else:
            arr = np.asarray(im, np.float32)
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise ValueError(f"{what}: arrays must be (H, W, 3) or (B, H, W, 3) floats in [0, 1], got {arr.shape}")
            h = height or arr.shape[0] // f * f
            w = width or arr.shape[1] // f * f
            if arr.shape[:2] != (h, w):
                arr = np.asarray(Image.fromarray((arr * 255).round().clip(0, 255).astype(np.uint8))
                                 .resize((w, h), resample=Image.LANCZOS), np.float32) / 255.0
        out.append(arr * 2.0 - 1.0)
    if len({a.shape for a in out}) != 1:
        raise ValueError(f"{what}: all images must have the same size")
    return np.stack(out)


def _load_masks(mask, n_prompts, height, width):
    """-> (n_prompts, H, W, 1) float32 of 0/1 (1 = repaint), binarised at 0.5 as diffusers."""
    from PIL import Image

    out = []
    for m in _as_arrays(mask, n_prompts, "mask_image"):
        if isinstance(m, Image.Image):
            m = m.convert("L")
            if (m.height, m.width) != (height, width):
                m = m.resize((width, height), resample=Image.LANCZOS)
            arr = np.asarray(m, np.float32) / 255.0
        else:
            arr = np.asarray(m, np.float32)
            arr = arr[..., 0] if arr.ndim == 3 else arr
            if arr.shape != (height, width):
                raise ValueError(f"mask_image must be {height}x{width} like the image, got {arr.shape}")
        out.append((arr >= 0.5).astype(np.float32)[..., None])
    return np.stack(out)
