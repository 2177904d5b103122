"""One Stable Diffusion pipeline for txt2img, img2img and inpainting, compiled as a single sharded program.

The three modes differ only in how the first latents are made and in what the UNet sees each step:
- txt2img: noise * init_noise_sigma (or the caller's `latents`);
- img2img: VAE-encode `image` (or take it as latents), noise it to the timestep chosen by `strength` (or start
  un-noised at `denoising_start`), denoise from there;
- inpaint: as img2img, plus a mask; a 9-channel (inpainting) UNet gets [latents, mask, masked-image latents] as input,
  an ordinary 4-channel UNet gets the known region pasted back (noised to the next timestep) after every step.

The model families differ only in the conditioning: a pipeline class turns prompts into per-prompt token arrays (and
other per-image inputs) on the host, and into a pure function (text encoders, inputs) -> {"context": (N, L, D), plus
the UNet's added_cond_kwargs} inside the program. SD 1.x/2.x: one CLIP encoder's last hidden state. SDXL
(`StableDiffusionXLPipeline`): two encoders' penultimate states concatenated, the pooled projection and the
micro-conditioning `time_ids`; the refiner uses the second encoder alone and aesthetic scores.

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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdjax import distributed, samplers as samplers_lib
from sdjax.distributed import data_mesh
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
    """images: this process's images; indices: their positions in the whole batch (all of range(batch) in a
    single-process run; with several processes each holds the images of its own devices, see sdjax.distributed)."""

    images: Any
    indices: Any = None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything that fixes the compiled program (one compile per distinct plan)."""

    mode: str
    sampler: str
    steps: int
    start: int  # first sampler call (img2img strength / denoising_start)
    end: int  # one past the last sampler call (num_calls, or fewer with denoising_end)
    cfg: bool
    rescale: bool  # guidance_rescale > 0
    batch: int  # padded to a multiple of the device count
    latent_hw: tuple
    given_latents: bool
    image_is_latents: bool  # img2img from latents (no VAE encode)
    add_noise: bool  # img2img: noise the image latents to `start` (not with denoising_start)
    inpaint_unet: bool  # 9-channel inpainting UNet (else mask blending)
    decode: bool
    vae_tiling: bool
    text: tuple = ()  # static options of the pipeline's conditioning
    vae_tile_size: int | None = None  # tile side in pixels (None: the VAE config's sample_size)


def _to_list(x):
    if x is None:
        return None
    if isinstance(x, str):
        return [x]
    return list(x)


def _per_prompt(value, n_prompts: int, name: str) -> list[str]:
    """One string, or one per prompt -> a list of n_prompts strings."""
    values = _to_list(value)
    if len(values) == 1 and n_prompts > 1:
        values = values * n_prompts
    if len(values) != n_prompts or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} has {len(values)} entries but prompt has {n_prompts}: give one string, or one per "
                         "prompt")
    return values


def _interleave(uncond, cond):
    """Image-major [uncond_0, cond_0, uncond_1, ...]: keeps each image's pair on its own device."""
    return jnp.stack([uncond, cond], axis=1).reshape(-1, *cond.shape[1:])


def _check_fraction(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (float, int, np.floating)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a float strictly between 0 and 1 (a fraction of the schedule), got {value!r}")
    return float(value)


def _timestep_cutoff(fraction: float, num_train_timesteps: int) -> int:
    # diffusers' arithmetic exactly (Python round: half to even)
    return int(round(num_train_timesteps - (fraction * num_train_timesteps)))


class StableDiffusionPipeline:
    """txt2img / img2img / inpaint with a diffusers-layout model (SD 1.x, 2.x, inpainting).

    `StableDiffusionPipeline.from_pretrained` on an SDXL folder (one with `text_encoder_2`) returns a
    `StableDiffusionXLPipeline`.
    """

    def __init__(self, *, tokenizer, text_encoder, vae, unet, scheduler_config: dict, name: str = "",
                 mesh: Mesh | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self._setup(vae=vae, unet=unet, scheduler_config=scheduler_config, name=name, mesh=mesh)

    def _setup(self, *, vae, unet, scheduler_config, name, mesh):
        self.vae = vae
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        self.name = name
        self.mesh = mesh or data_mesh()
        self.vae_tiling = False
        self.vae_tile_size = None
        self._replicated = NamedSharding(self.mesh, P())
        self._batched = NamedSharding(self.mesh, P("data"))
        self._programs: dict[_Plan, Any] = {}
        # shape-only modules (`PretrainedModel.abstract`) get the sharding only: such a pipeline can be lowered and
        # compiled, not run (bench/sdxl_memory.py reads the compiled program's memory without any weights)
        place = (lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated)
                 if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x, self._replicated))
        for module in (*self._text_encoders().values(), vae, unet):
            nnx.update(module, jax.tree.map(place, nnx.state(module)))

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id, dtype=jnp.float32, param_dtype=None, vae_dtype=None, variant=None,
                        mesh: Mesh | None = None):
        """Load a diffusers pipeline folder (`model_index.json`, tokenizer, text_encoder, vae, unet, scheduler).

        dtype: compute dtype of the networks (float32, bfloat16, float16); param_dtype: storage (default dtype);
        vae_dtype: the VAE's dtype (default dtype; float32 avoids fp16 VAE overflow).
        """
        folder, index = _read_index(path_or_id)
        if cls is StableDiffusionPipeline and _has(index, "text_encoder_2"):
            return StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype, param_dtype=param_dtype,
                                                             vae_dtype=vae_dtype, variant=variant, mesh=mesh)
        if cls is StableDiffusionPipeline and _has(index, "low_res_scheduler"):
            from sdjax.upscale import StableDiffusionUpscalePipeline

            return StableDiffusionUpscalePipeline.from_pretrained(folder, dtype=dtype, param_dtype=param_dtype,
                                                                  vae_dtype=vae_dtype, variant=variant, mesh=mesh)
        from sdjax.models import CLIPTextModel
        from sdjax.tokenizer import Tokenizer

        _require(folder, index, ("tokenizer", "text_encoder", "vae", "unet", "scheduler"))
        kw = dict(dtype=dtype, param_dtype=param_dtype, variant=variant)
        return cls(
            tokenizer=Tokenizer.from_pretrained(folder / "tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw),
            **_load_common(folder, dtype, param_dtype, vae_dtype, variant),
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

    def enable_vae_tiling(self, on: bool = True, tile_size: int | None = None) -> None:
        """Decode images larger than one tile tile by tile (diffusers' tiled decode). tile_size: the tile side in
        pixels (default: the VAE config's sample_size, as diffusers; SDXL's is 1024, so a 1024² image is decoded in
        one piece unless a smaller tile, e.g. 512, is given)."""
        self.vae_tiling = on
        self.vae_tile_size = None if tile_size is None else int(tile_size)
        self._programs.clear()

    # ------------------------------------------------------------------------------------------------------------
    # Conditioning: what differs between model families. A subclass overrides these three.

    def _text_encoders(self) -> dict:
        """name -> text encoder module (the weights the program's conditioning uses)."""
        return {"text_encoder": self.text_encoder}

    def _text_inputs(self, prompts, negative_prompt, *, cfg, mode, height, width):
        """Host side: (dict of per-prompt numpy arrays (n_prompts, ...), static options tuple). An entry
        "per_image" may hold a dict of arrays that already have one row per image; they join the program's inputs
        as they are, replacing a generic input of the same name (the upscaler's tiles bring their own "keys")."""
        negatives = [""] * len(prompts) if negative_prompt is None else _per_prompt(
            negative_prompt, len(prompts), "negative_prompt")
        inputs = {"ids": self.tokenizer(prompts)[0]}
        if cfg:
            inputs["neg_ids"] = self.tokenizer(negatives)[0]
        return inputs, ()

    def _conditioning(self, static: tuple) -> Callable:
        """Program side: (encoders dict, inputs, cfg) -> (cond, uncond or None), each {"context": (N, L, D), ...}
        where "class_labels" (N,) goes to the UNet's class_labels, cond's "unet_concat" (N, h, w, c) is joined to
        the latents as extra UNet input channels (the same for both halves of a guided pair), and every other key
        goes to the UNet's added_cond_kwargs."""

        def encode(encoders, inputs, cfg):
            te = encoders["text_encoder"]
            cond = {"context": te(inputs["ids"]).last_hidden_state}
            uncond = {"context": te(inputs["neg_ids"]).last_hidden_state} if cfg else None
            return cond, uncond

        return encode

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
        """
        return self._generate_images(
            prompt, negative_prompt, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, sampler=sampler, seed=seed, num_images_per_prompt=num_images_per_prompt,
            latents=latents, image=image, mask_image=mask_image, strength=strength, output_type=output_type,
            guidance_rescale=guidance_rescale,
        )

    def _generate_images(self, prompt, negative_prompt, *, height, width, num_inference_steps, guidance_scale,
                         sampler, seed, num_images_per_prompt, latents, image, mask_image, strength, output_type,
                         guidance_rescale=0.0, denoising_start=None, denoising_end=None, text_options=None):
        """The shared body of every pipeline's __call__: check, prepare host inputs, run the compiled program."""
        prompts = _to_list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if int(num_images_per_prompt) < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image: inpainting repaints the masked part of an image")
        if not float(guidance_rescale) >= 0.0:
            raise ValueError(f"guidance_rescale must be >= 0, got {guidance_rescale}")
        denoising_start = _check_fraction(denoising_start, "denoising_start")
        denoising_end = _check_fraction(denoising_end, "denoising_end")
        if denoising_start is not None and image is None:
            raise ValueError("denoising_start needs image (the partly denoised latents to continue from)")
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise ValueError(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})")
        mode = "txt2img" if image is None else ("img2img" if mask_image is None else "inpaint")
        if mode != "txt2img" and denoising_start is None and not (0.0 < float(strength) <= 1.0):
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if not isinstance(seed, (int, np.integer)):
            seed = list(seed)
            if len(seed) != len(prompts):
                raise ValueError(f"seed has {len(seed)} entries but there are {len(prompts)} prompts: give one int, "
                                 "or one per prompt")

        n_per = int(num_images_per_prompt)
        n = len(prompts) * n_per
        f = self.vae_scale_factor
        prompt_index = np.repeat(np.arange(len(prompts)), n_per)
        images = masks = None
        image_is_latents = _is_latents(image, self.latent_channels)
        if image_is_latents:
            if mode != "img2img":
                raise ValueError("image given as latents works for img2img only (not with mask_image)")
            images = _per_image(np.asarray(image, np.float32), len(prompts), prompt_index, "image")
            if height is not None or width is not None:
                if (height, width) != (images.shape[1] * f, images.shape[2] * f):
                    raise ValueError(f"height x width {height}x{width} does not match the image latents "
                                     f"{images.shape[1]}x{images.shape[2]} (VAE factor {f})")
            height, width = images.shape[1] * f, images.shape[2] * f
        elif image is not None:
            images = _load_images(image, len(prompts), height, width, f, "image")[prompt_index]
            height, width = images.shape[1:3]
        height = int(height or self.default_size)
        width = int(width or self.default_size)
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f} (the VAE factor), "
                             f"got {height}x{width}")
        if mask_image is not None:
            masks = _load_masks(mask_image, len(prompts), height, width)[prompt_index]

        sampler_obj = samplers_lib.make_sampler(sampler, self.scheduler_config, int(num_inference_steps))
        start, end = self._schedule_range(sampler_obj, mode, strength, denoising_start, denoising_end,
                                          num_inference_steps)
        latent_shape = (height // f, width // f, self.latent_channels)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (n, *latent_shape):
                raise ValueError(f"latents must have shape {(n, *latent_shape)} (batch, H/{f}, W/{f}, C), "
                                 f"got {latents.shape}")

        cfg = float(guidance_scale) > 1.0
        n_dev = self.mesh.devices.size
        batch = -(-n // n_dev) * n_dev
        text_inputs, text_static = self._text_inputs(prompts, negative_prompt, cfg=cfg, mode=mode, height=height,
                                                      width=width, **(text_options or {}))
        keys = image_keys(seed, prompt_index, np.tile(np.arange(n_per), len(prompts)))

        def pad(x):  # repeat the last image to fill every device; cut back after
            if x is None:
                return None
            x = np.asarray(x)
            return np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)]) if batch > n else x

        per_image = text_inputs.pop("per_image", {})
        inputs = {k: pad(v[prompt_index]) for k, v in text_inputs.items()}
        inputs.update(keys=pad(keys), latents=pad(latents), image=pad(images), mask=pad(masks))
        inputs.update({k: pad(v) for k, v in per_image.items()})
        plan = _Plan(
            mode=mode, sampler=sampler, steps=int(num_inference_steps), start=start, end=end, cfg=cfg,
            rescale=cfg and float(guidance_rescale) > 0.0, batch=batch, latent_hw=latent_shape[:2],
            given_latents=latents is not None, image_is_latents=image_is_latents,
            add_noise=denoising_start is None,
            inpaint_unet=self.unet.config.in_channels == self.latent_channels * 2 + 1,
            decode=output_type != "latent", vae_tiling=self.vae_tiling, text=text_static,
            vae_tile_size=self.vae_tile_size if self.vae_tiling else None,
        )
        if mode == "inpaint" and not plan.inpaint_unet and self.unet.config.in_channels != self.latent_channels:
            raise ValueError(f"the UNet takes {self.unet.config.in_channels} input channels: not an SD UNet")
        program = self._program(plan, sampler_obj)
        out = program(
            {k: nnx.state(m) for k, m in self._text_encoders().items()}, nnx.state(self.unet), nnx.state(self.vae),
            {k: None if v is None else _put_batch(v, self._batched) for k, v in inputs.items()},
            {"guidance": jnp.float32(guidance_scale), "rescale": jnp.float32(guidance_rescale)},
        )
        out, indices = _fetch_batch(out, n)
        if not np.isfinite(out).all():
            raise FloatingPointError(
                "the pipeline produced NaN/inf values; the usual cause is a float16 VAE overflowing: load with "
                "vae_dtype=jnp.float32 (or dtype=jnp.bfloat16)"
            )
        if output_type in ("latent", "np"):
            return PipelineOutput(images=out, indices=indices)
        return PipelineOutput(images=numpy_to_pil(out), indices=indices)

    def _schedule_range(self, sampler, mode, strength, denoising_start, denoising_end, num_inference_steps):
        """(start, end) call indices, as diffusers' (SDXL) pipelines cut the schedule: strength or denoising_start
        pick the first call, denoising_end the last."""
        timesteps = np.asarray(sampler.timesteps)
        num_train = int(self.scheduler_config.get("num_train_timesteps", 1000))
        start = 0
        if denoising_start is not None:
            # diffusers' get_timesteps: keep the timesteps below the cut-off; a 2nd-order sampler must not start
            # between the two calls of one step
            count = int((timesteps < _timestep_cutoff(denoising_start, num_train)).sum())
            if sampler.order == 2 and count % 2 == 0:
                count += 1
            start = sampler.num_calls - min(count, sampler.num_calls)
        elif mode != "txt2img":
            start = sampler.index_for_strength(float(strength))
        end = sampler.num_calls
        if denoising_end is not None:
            cutoff = _timestep_cutoff(denoising_end, num_train)
            end = start + int((timesteps[start:] >= cutoff).sum())
        if start >= end:
            what = ("denoising_start" if denoising_start is not None else "strength") if end == sampler.num_calls \
                else "denoising_end"
            raise ValueError(f"{what} with {num_inference_steps} steps leaves no step to run; change it or raise "
                             "num_inference_steps")
        return start, end

    # ------------------------------------------------------------------------------------------------------------
    def _program(self, plan: _Plan, sampler):
        if plan not in self._programs:
            encoders = self._text_encoders()
            fn = functools.partial(
                _generate, plan=plan, sampler=sampler, conditioning=self._conditioning(plan.text),
                text_defs={k: nnx.graphdef(m) for k, m in encoders.items()}, unet_def=nnx.graphdef(self.unet),
                vae_def=nnx.graphdef(self.vae), scaling_factor=float(self.vae.config.scaling_factor),
                latent_channels=self.latent_channels,
            )
            self._programs[plan] = jax.jit(
                fn,
                in_shardings=(self._replicated, self._replicated, self._replicated, self._batched,
                              self._replicated),
                out_shardings=self._batched,
            )
        return self._programs[plan]


def _put_batch(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host batch (the same on every process) onto the batch sharding; with several processes each one builds only
    the shards of its own devices."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _fetch_batch(out: jax.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(the rows of the first n this process holds, their indices): all n with one process, else the rows of this
    process's devices (padding rows >= n dropped)."""
    if out.is_fully_addressable:
        return np.asarray(jax.device_get(out))[:n], np.arange(n)
    rows = {}
    for shard in out.addressable_shards:
        start = shard.index[0].start or 0
        for i, row in enumerate(np.asarray(shard.data)):
            rows.setdefault(start + i, row)  # a replicated row comes once
    indices = np.asarray(sorted(i for i in rows if i < n), np.int64)
    if not len(indices):
        return np.zeros((0, *out.shape[1:]), out.dtype), indices
    return np.stack([rows[i] for i in indices]), indices


def _generate(text_states, unet_state, vae_state, inputs, scalars, *, plan: _Plan, sampler, conditioning, text_defs,
              unet_def, vae_def, scaling_factor, latent_channels):
    """The whole generation for one batch: encode text, build first latents, sample, decode."""
    encoders = {k: nnx.merge(text_defs[k], text_states[k]) for k in text_defs}
    unet = nnx.merge(unet_def, unet_state)
    vae = nnx.merge(vae_def, vae_state)
    keys = inputs["keys"]
    h, w = plan.latent_hw
    shape = (h, w, latent_channels)
    scale, rescale = scalars["guidance"], scalars["rescale"]

    cond, uncond = conditioning(encoders, inputs, plan.cfg)
    concat = cond.pop("unet_concat", None)  # per image, so joined before the guided pair is made
    if plan.cfg:
        cond = jax.tree.map(_interleave, uncond, cond)
    context = cond.pop("context")
    labels = cond.pop("class_labels", None)
    added = cond or None

    noise = inputs["latents"] if plan.given_latents else image_noise(keys, shape)
    noise = noise.astype(jnp.float32)

    image_latents = mask = masked_latents = None
    if plan.mode != "txt2img":
        if plan.image_is_latents:
            image_latents = inputs["image"].astype(jnp.float32)
        else:
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
    elif not plan.add_noise:  # denoising_start: the image latents are already noised to `start`
        x = image_latents
    else:
        x = sampler.add_noise(image_latents, noise, plan.start)

    def model(x, i):
        x_in = sampler.scale_model_input(x, i)
        if plan.mode == "inpaint" and plan.inpaint_unet:
            x_in = jnp.concatenate([x_in, mask, masked_latents], axis=-1)
        if concat is not None:
            x_in = jnp.concatenate([x_in, concat.astype(x_in.dtype)], axis=-1)
        t = sampler.timesteps[i]
        kw = dict(added_cond_kwargs=added, class_labels=labels)
        if not plan.cfg:
            return unet(x_in.astype(unet_dtype(unet)), t, context, **kw).astype(jnp.float32)
        pair = jnp.repeat(x_in, 2, axis=0)
        out = unet(pair.astype(unet_dtype(unet)), t, context, **kw).astype(jnp.float32)
        out = out.reshape(-1, 2, *out.shape[1:])
        uncond_out, cond_out = out[:, 0], out[:, 1]
        guided = uncond_out + scale * (cond_out - uncond_out)
        if plan.rescale:  # diffusers' rescale_noise_cfg (arXiv 2305.08891, section 3.4), per image
            axes = tuple(range(1, guided.ndim))
            std_text = jnp.std(cond_out, axis=axes, keepdims=True, ddof=1)
            std_cfg = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
            guided = rescale * (guided * (std_text / std_cfg)) + (1 - rescale) * guided
        return guided

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

    x, _ = jax.lax.fori_loop(plan.start, plan.end, body, (x, sampler.init_state(x, plan.start)))
    if not plan.decode:
        return x
    z = (x / scaling_factor).astype(vae_dtype(vae))
    decoded = vae.decode(z, tile=plan.vae_tiling, tile_size=plan.vae_tile_size)  # tiles only if larger than one
    return jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# SDXL


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL base (two text encoders) or refiner (`text_encoder_2` only, aesthetic-score conditioning), with the same
    modes, samplers, seeding and single sharded program as `StableDiffusionPipeline`.

    Conditioning as diffusers' StableDiffusionXL(Img2Img)Pipeline: context = concat(penultimate hidden states of
    text_encoder, text_encoder_2) (refiner: text_encoder_2's alone), pooled = text_encoder_2's `text_embeds`,
    time_ids = original size + crop top-left + target size (refiner: + aesthetic score instead of target size).
    """

    def __init__(self, *, tokenizer, text_encoder, tokenizer_2, text_encoder_2, vae, unet, scheduler_config: dict,
                 force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False, name: str = "",
                 mesh: Mesh | None = None):
        if text_encoder_2 is None or tokenizer_2 is None:
            raise ValueError("SDXL needs tokenizer_2 and text_encoder_2 (the pooled text embedding comes from it)")
        if (tokenizer is None) != (text_encoder is None):
            raise ValueError("give tokenizer and text_encoder together (base), or neither (refiner)")
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)
        self._setup(vae=vae, unet=unet, scheduler_config=scheduler_config, name=name, mesh=mesh)
        n_ids = 5 if self.requires_aesthetics_score else 6
        config = unet.config
        got = (config.addition_time_embed_dim or 0) * n_ids + text_encoder_2.config.projection_dim
        if config.addition_embed_type != "text_time" or got != config.projection_class_embeddings_input_dim:
            raise ValueError(
                f"the UNet does not take SDXL conditioning: addition_embed_type {config.addition_embed_type!r}, "
                f"projection_class_embeddings_input_dim {config.projection_class_embeddings_input_dim} but {n_ids} "
                f"time ids x {config.addition_time_embed_dim} + pooled {text_encoder_2.config.projection_dim} = "
                f"{got} (requires_aesthetics_score={self.requires_aesthetics_score})"
            )

    @classmethod
    def from_pretrained(cls, path_or_id, dtype=jnp.float32, param_dtype=None, vae_dtype=None, variant=None,
                        mesh: Mesh | None = None):
        """Load an SDXL base or refiner folder (diffusers layout: tokenizer(_2), text_encoder(_2), vae, unet,
        scheduler; `force_zeros_for_empty_prompt` and `requires_aesthetics_score` from model_index.json)."""
        from sdjax.models import CLIPTextModel
        from sdjax.models.clip import CLIPTextModelWithProjection
        from sdjax.tokenizer import Tokenizer

        folder, index = _read_index(path_or_id)
        _require(folder, index, ("tokenizer_2", "text_encoder_2", "vae", "unet", "scheduler"))
        kw = dict(dtype=dtype, param_dtype=param_dtype, variant=variant)
        base = _has(index, "text_encoder")
        if base:
            _require(folder, index, ("tokenizer",))
        return cls(
            tokenizer=Tokenizer.from_pretrained(folder / "tokenizer") if base else None,
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw) if base else None,
            tokenizer_2=Tokenizer.from_pretrained(folder / "tokenizer_2"),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **kw),
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
            requires_aesthetics_score=index.get("requires_aesthetics_score", False),
            **_load_common(folder, dtype, param_dtype, vae_dtype, variant),
            mesh=mesh,
        )

    # -- conditioning ------------------------------------------------------------------------------------------

    def _encoder_names(self):
        return ("text_encoder", "text_encoder_2") if self.text_encoder is not None else ("text_encoder_2",)

    def _text_encoders(self) -> dict:
        return {name: getattr(self, name) for name in self._encoder_names()}

    def _text_inputs(self, prompts, negative_prompt, *, cfg, mode, height, width, prompt_2=None,
                     negative_prompt_2=None, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                     negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                     aesthetic_score=6.0, negative_aesthetic_score=2.5):
        n = len(prompts)
        prompts_2 = prompts if prompt_2 is None else _per_prompt(prompt_2, n, "prompt_2")
        # diffusers zeroes the negative embeddings when no negative_prompt is given (negative_prompt_2 alone
        # does not count) and the model asks for it
        zero = negative_prompt is None and self.force_zeros_for_empty_prompt
        negatives = _per_prompt("" if negative_prompt is None else negative_prompt, n, "negative_prompt")
        negatives_2 = negatives if negative_prompt_2 is None else _per_prompt(negative_prompt_2, n,
                                                                               "negative_prompt_2")
        tokenizers = {"text_encoder": self.tokenizer, "text_encoder_2": self.tokenizer_2}
        # as diffusers: the refiner's single encoder reads `prompt` (and `negative_prompt`), not the *_2 ones
        texts = list(zip(self._encoder_names(), (prompts, prompts_2), (negatives, negatives_2)))
        inputs = {}
        for j, (name, pos, neg) in enumerate(texts):
            inputs[f"ids_{j}"] = tokenizers[name](pos)[0]
            if cfg and not zero:
                inputs[f"neg_ids_{j}"] = tokenizers[name](neg)[0]

        def size(value, name):
            value = (height, width) if value is None else tuple(int(v) for v in value)
            if len(value) != 2:
                raise ValueError(f"{name} must be (height, width) or (top, left), got {value}")
            return value

        orig = size(original_size, "original_size")
        crop = size(crops_coords_top_left, "crops_coords_top_left")
        target = size(target_size, "target_size")
        neg_crop = size(negative_crops_coords_top_left, "negative_crops_coords_top_left")
        if self.requires_aesthetics_score:
            neg_orig = orig if negative_original_size is None else size(negative_original_size, "")
            time_ids = (*orig, *crop, float(aesthetic_score))
            neg_time_ids = (*neg_orig, *neg_crop, float(negative_aesthetic_score))
        elif mode == "txt2img":  # StableDiffusionXLPipeline: the negative sizes count only when both are given
            time_ids = (*orig, *crop, *target)
            neg_time_ids = time_ids
            if negative_original_size is not None and negative_target_size is not None:
                neg_time_ids = (*size(negative_original_size, "negative_original_size"), *neg_crop,
                                *size(negative_target_size, "negative_target_size"))
        else:  # StableDiffusionXLImg2ImgPipeline (it pairs the negative sizes with the positive crop)
            neg_orig = orig if negative_original_size is None else size(negative_original_size, "")
            neg_target = target if negative_target_size is None else size(negative_target_size, "")
            time_ids = (*orig, *crop, *target)
            neg_time_ids = (*neg_orig, *crop, *neg_target)
        inputs["time_ids"] = np.tile(np.asarray(time_ids, np.float32), (n, 1))
        if cfg:
            inputs["neg_time_ids"] = np.tile(np.asarray(neg_time_ids, np.float32), (n, 1))
        return inputs, (("zero_negatives", bool(cfg and zero)), ("encoders", len(texts)))

    def _conditioning(self, static: tuple) -> Callable:
        options = dict(static)
        names = self._encoder_names()

        def embed(encoders, inputs, prefix):
            states, pooled = [], None
            for j, name in enumerate(names):
                out = encoders[name](inputs[f"{prefix}ids_{j}"], output_hidden_states=True)
                states.append(out.hidden_states[-2])
                if out.text_embeds is not None:
                    pooled = out.text_embeds
            return jnp.concatenate(states, axis=-1), pooled

        def encode(encoders, inputs, cfg):
            context, pooled = embed(encoders, inputs, "")
            cond = {"context": context, "text_embeds": pooled, "time_ids": inputs["time_ids"]}
            if not cfg:
                return cond, None
            if options["zero_negatives"]:
                neg_context, neg_pooled = jnp.zeros_like(context), jnp.zeros_like(pooled)
            else:
                neg_context, neg_pooled = embed(encoders, inputs, "neg_")
            return cond, {"context": neg_context, "text_embeds": neg_pooled, "time_ids": inputs["neg_time_ids"]}

        return encode

    # -- call --------------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        sampler: str = "euler",
        seed: int | Sequence[int] = 0,
        num_images_per_prompt: int = 1,
        latents=None,
        image=None,
        mask_image=None,
        strength: float = 0.3,
        output_type: str = "pil",
        guidance_rescale: float = 0.0,
        *,
        prompt_2: str | Sequence[str] | None = None,
        negative_prompt_2: str | Sequence[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        refiner: "StableDiffusionXLPipeline | None" = None,
        high_noise_frac: float | None = None,
        refiner_num_inference_steps: int | None = None,
    ) -> PipelineOutput:
        """Generate images; the arguments of `StableDiffusionPipeline.__call__` plus SDXL's.

        prompt_2 / negative_prompt_2: the texts for text_encoder_2 (default: prompt / negative_prompt); a refiner
        (one encoder) reads prompt and negative_prompt only, as diffusers. With `force_zeros_for_empty_prompt` (SDXL
        base) and no negative_prompt, the negative embeddings are zeros.
        original_size, crops_coords_top_left, target_size (and negative_*): micro-conditioning as (height, width) /
        (top, left); sizes default to the output size. aesthetic_score / negative_aesthetic_score: the refiner's
        (requires_aesthetics_score) conditioning instead of target_size.
        denoising_end: stop after this fraction of the schedule (with output_type="latent", hand the latents to
        a refiner); denoising_start: continue from `image` (latents, or an image to encode) at this fraction,
        without adding noise (strength is then ignored). The cut-offs follow diffusers' timestep arithmetic.
        refiner, high_noise_frac: ensemble of expert denoisers in one call: this pipeline runs the first
        high_noise_frac of the schedule (denoising_end), `refiner` the rest (denoising_start) from its latents,
        with the same prompts, negatives, sampler, steps, guidance, seed and micro-conditioning.
        refiner_num_inference_steps: the length of the refiner's own schedule (default num_inference_steps), of
        which it runs the part after high_noise_frac, as diffusers' refiner called with that num_inference_steps
        and denoising_start=high_noise_frac (40 steps at 0.8: about the last 8).
        """
        options = dict(
            prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, original_size=original_size,
            crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
        )
        common = dict(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed,
            num_images_per_prompt=num_images_per_prompt, guidance_rescale=guidance_rescale,
        )
        if refiner is None:
            if high_noise_frac is not None or refiner_num_inference_steps is not None:
                what = "high_noise_frac" if high_noise_frac is not None else "refiner_num_inference_steps"
                raise ValueError(f"{what} needs refiner= (the pipeline that denoises the rest)")
            return self._generate_images(
                prompt, negative_prompt, height=height, width=width, latents=latents, image=image,
                mask_image=mask_image, strength=strength, output_type=output_type, denoising_start=denoising_start,
                denoising_end=denoising_end, text_options=options, **common)
        if not isinstance(refiner, StableDiffusionXLPipeline):
            raise ValueError(f"refiner must be a StableDiffusionXLPipeline, got {type(refiner).__name__}")
        if denoising_end is not None:
            raise ValueError("give high_noise_frac with refiner=, not denoising_end")
        frac = _check_fraction(high_noise_frac, "high_noise_frac")
        if frac is None:
            raise ValueError("refiner= needs high_noise_frac (the fraction of the schedule the base denoises)")
        if refiner.vae_scale_factor != self.vae_scale_factor or refiner.latent_channels != self.latent_channels:
            raise ValueError("the refiner's VAE latents differ from this pipeline's; they cannot be handed over")
        refiner_common = dict(common)
        if refiner_num_inference_steps is not None:
            refiner_common["num_inference_steps"] = refiner_num_inference_steps
        # before the base runs: the refiner's part of its schedule must hold at least one step
        self._refiner_calls(refiner, frac, sampler, num_inference_steps, refiner_num_inference_steps)
        handed = self._generate_images(
            prompt, negative_prompt, height=height, width=width, latents=latents, image=image, mask_image=mask_image,
            strength=strength, output_type="latent", denoising_start=denoising_start, denoising_end=frac,
            text_options=options, **common)
        # with several processes each holds its own rows; the refiner's batch needs them all
        handed = distributed.gather_rows(handed.images, handed.indices,
                                         len(_to_list(prompt)) * int(num_images_per_prompt))
        return refiner._generate_images(
            prompt, negative_prompt, height=None, width=None, latents=None, image=handed, mask_image=None,
            strength=strength, output_type=output_type, denoising_start=frac, text_options=options,
            **refiner_common)

    def handoff_steps(self, refiner: "StableDiffusionXLPipeline", high_noise_frac: float, *, sampler: str = "euler",
                      num_inference_steps: int = 50, refiner_num_inference_steps: int | None = None):
        """The sampler calls each side runs in a txt2img `self(..., refiner=refiner, high_noise_frac=...)`:
        (range of the base's calls out of num_inference_steps' schedule, range of the refiner's calls out of its own
        schedule). Raises ValueError (one line) if either side would have no step."""
        frac = _check_fraction(high_noise_frac, "high_noise_frac")
        if frac is None:
            raise ValueError("high_noise_frac is required")
        made = samplers_lib.make_sampler(sampler, self.scheduler_config, num_inference_steps)
        try:
            _, end = self._schedule_range(made, "txt2img", 1.0, None, frac, num_inference_steps)
        except ValueError:
            raise ValueError(f"high_noise_frac {frac} leaves the base no step of its {num_inference_steps}: raise "
                             "high_noise_frac or num_inference_steps") from None
        return range(0, end), self._refiner_calls(refiner, frac, sampler, num_inference_steps,
                                                  refiner_num_inference_steps)

    @staticmethod
    def _refiner_calls(refiner, frac, sampler, num_inference_steps, refiner_num_inference_steps) -> range:
        steps = num_inference_steps if refiner_num_inference_steps is None else refiner_num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            name = "num_inference_steps" if refiner_num_inference_steps is None else "refiner_num_inference_steps"
            raise ValueError(f"{name} must be an int of at least 1, got {steps!r}")
        try:
            made = samplers_lib.make_sampler(sampler, refiner.scheduler_config, int(steps))
        except ValueError as e:
            raise ValueError(f"the refiner's steps: {e}") from None
        try:
            start, end = refiner._schedule_range(made, "img2img", 1.0, frac, None, int(steps))
        except ValueError:
            raise ValueError(f"the refiner's {steps}-step schedule has no step after high_noise_frac {frac}: lower "
                             "high_noise_frac or raise refiner_num_inference_steps") from None
        return range(start, end)


# ----------------------------------------------------------------------------------------------------------------
# Loading helpers


def _read_index(path_or_id):
    folder = resolve_path(path_or_id)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder}: no model_index.json (not a diffusers pipeline folder)")
    return folder, json.loads(index_file.read_text())


def _has(index: dict, part: str) -> bool:
    """model_index.json lists a component (diffusers writes [null, null] for an absent one)."""
    entry = index.get(part)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def _require(folder: Path, index: dict, parts):
    for part in parts:
        if part not in index or not (folder / part).is_dir():
            raise FileNotFoundError(f"{folder}: the pipeline has no {part}/ component")


def _load_common(folder: Path, dtype, param_dtype, vae_dtype, variant) -> dict:
    """vae, unet, scheduler config and name: the parts every pipeline folder has."""
    from sdjax.models import AutoencoderKL, UNet2DConditionModel

    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise FileNotFoundError(f"{scheduler_file}: missing")
    vae_dtype = vae_dtype or dtype
    return dict(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=vae_dtype,
                                          param_dtype=param_dtype or vae_dtype, variant=variant),
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=dtype, param_dtype=param_dtype,
                                                  variant=variant),
        scheduler_config=json.loads(scheduler_file.read_text()),
        name=folder.name,
    )


def _is_latents(image, latent_channels: int) -> bool:
    """An img2img `image` given as latents: an (B, h, w, C) array with C the VAE's latent channels."""
    return (isinstance(image, (np.ndarray, jax.Array)) and np.ndim(image) == 4 and latent_channels != 3
            and image.shape[-1] == latent_channels)


def _per_image(x: np.ndarray, n_prompts: int, prompt_index: np.ndarray, what: str) -> np.ndarray:
    """(1 | prompts | images, ...) -> (images, ...)."""
    n = len(prompt_index)
    if len(x) == n:
        return x
    if len(x) == 1:
        return np.repeat(x, n, axis=0)
    if len(x) == n_prompts:
        return x[prompt_index]
    raise ValueError(f"{what}: got {len(x)} entries for {n_prompts} prompts and {n} images; give one, one per "
                     "prompt or one per image")


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
