"""The one compiled program every pipeline runs: first latents, the sampling loop, VAE decode, in one `jax.jit`.

The modes differ only in how the first latents are made and in what the UNet sees each step:
- txt2img: noise * init_noise_sigma (or the caller's `latents`);
- img2img: VAE-encode `image` (or take it as latents), noise it to the sampler call chosen by `strength` (or start
  un-noised at `denoising_start`), denoise from there;
- inpaint: as img2img, plus a mask; a 9-channel (inpainting) UNet gets [latents, mask, masked-image latents] as input,
  an ordinary 4-channel UNet gets the known region pasted back (noised to the next timestep) after every step.

The model families differ only in the conditioning: a family's `encode` function turns its own text inputs into a
`Conditioning` inside the program (see `sdjax.pipelines.sd`, `sdxl`, `upscale`).

What fixes the compiled program is a `Plan` (mode, shapes, options); everything that only changes values is an
argument: the sampler's tables (padded to a bucket of calls, `samplers.calls_bucket`), the first and last call, the
guidance scale and rescale. So a new seed, prompt, strength, denoising_start/end or step count within a bucket
reuses the program. The batch inputs are sharded over the `data` axis of the pipeline's mesh, weights replicated.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from sdjax.models.layers import nearest_resize
from sdjax.pipelines.noise import STREAM_IMAGE_LATENTS, STREAM_MASKED_LATENTS, STREAM_STEP, image_noise

MODES = ("txt2img", "img2img", "inpaint")


def enable_compilation_cache(path: str | os.PathLike) -> None:
    """Keep compiled programs on disk so that a second process skips most of the compile time."""
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Conditioning:
    """What a model family hands the UNet, one row per image (before the guided pair is made).

    context: (N, L, D) cross-attention states; added: the UNet's added_cond_kwargs (SDXL `text_embeds`, `time_ids`);
    class_labels: (N,) (the x4 upscaler's noise level); unet_concat: (N, h, w, c) extra UNet input channels (the
    upscaler's noised low-res image), the same for both halves of a guided pair; context_mask: (N, L) bool, False at
    the context tokens of padding chunks (a batch of prompts of different lengths, `sdjax.prompts`), which the
    UNet's cross-attention ignores; None: every token counts.
    """

    context: jax.Array
    added: dict | None = None
    class_labels: jax.Array | None = None
    unet_concat: jax.Array | None = None
    context_mask: jax.Array | None = None


# A family's program-side encoder: (text encoders by name, its own batch inputs, cfg) -> (cond, uncond or None).
Encode = Callable[[dict, dict, bool], "tuple[Conditioning, Conditioning | None]"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """The per-image inputs of one call (rows = images, padded to a multiple of the device count)."""

    keys: jax.Array  # (N, 2) key data of each image (sdjax.pipelines.noise)
    text: dict  # the family's own arrays, read only by its Encode
    latents: jax.Array | None = None  # (N, h, w, C) initial noise given by the caller
    image: jax.Array | None = None  # (N, H, W, 3) in [-1, 1], or (N, h, w, C) image latents
    mask: jax.Array | None = None  # (N, H, W, 1) of 0/1, 1 = repaint


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Values of one call that do not change the program."""

    start: jax.Array  # first sampler call (img2img strength / denoising_start)
    end: jax.Array  # one past the last call (num_calls, or fewer with denoising_end)
    add_noise: jax.Array  # img2img: noise the image latents to `start` (False with denoising_start)
    guidance: jax.Array
    rescale: jax.Array  # guidance_rescale (0: off)

    @classmethod
    def make(cls, start: int, end: int, add_noise: bool, guidance: float, rescale: float) -> "Schedule":
        return cls(np.int32(start), np.int32(end), np.bool_(add_noise), np.float32(guidance), np.float32(rescale))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything that fixes the compiled program (one compile per distinct plan)."""

    mode: str
    sampler: str
    calls: int  # the sampler tables' padded length (samplers.calls_bucket)
    cfg: bool
    batch: int  # padded to a multiple of the device count
    latent_hw: tuple
    given_latents: bool
    image_is_latents: bool  # img2img from latents (no VAE encode)
    inpaint_unet: bool  # 9-channel inpainting UNet (else mask blending)
    decode: bool
    vae_tiling: bool
    text: tuple = ()  # static options of the family's conditioning
    vae_tile_size: int | None = None  # tile side in pixels (None: the VAE config's sample_size)


@dataclasses.dataclass(frozen=True)
class Networks:
    """The graph definitions the program merges with the weights it is given, and the VAE numbers it needs."""

    text: dict  # name -> nnx.GraphDef of each text encoder
    unet: Any
    vae: Any
    scaling_factor: float
    latent_channels: int


def unet_dtype(unet):
    return unet.conv_in.dtype or jnp.float32


def vae_dtype(vae):
    return vae.post_quant_conv.dtype or jnp.float32


def compile_program(plan: Plan, networks: Networks, encode: Encode, replicated: NamedSharding,
                    batched: NamedSharding):
    """The jitted program of `plan`: (text states, unet state, vae state, Batch, sampler, Schedule) -> images
    (N, H, W, 3) in [0, 1], or latents (N, h, w, C) without decoding."""
    fn = functools.partial(generate, plan=plan, networks=networks, encode=encode)
    return jax.jit(fn, in_shardings=(replicated, replicated, replicated, batched, replicated, replicated),
                   out_shardings=batched)


def _interleave(uncond, cond):
    """Image-major [uncond_0, cond_0, uncond_1, ...]: keeps each image's pair on its own device."""
    return jnp.stack([uncond, cond], axis=1).reshape(-1, *cond.shape[1:])


def generate(text_states, unet_state, vae_state, batch: Batch, sampler, schedule: Schedule, *, plan: Plan,
             networks: Networks, encode: Encode):
    """The whole generation for one batch: encode text, build first latents, sample, decode."""
    encoders = {k: nnx.merge(networks.text[k], text_states[k]) for k in networks.text}
    unet = nnx.merge(networks.unet, unet_state)
    vae = nnx.merge(networks.vae, vae_state)
    keys = batch.keys
    h, w = plan.latent_hw
    shape = (h, w, networks.latent_channels)
    scaling_factor = networks.scaling_factor

    cond, uncond = encode(encoders, batch.text, plan.cfg)
    concat = cond.unet_concat  # per image, so joined before the guided pair is made
    if plan.cfg:
        strip = lambda c: dataclasses.replace(c, unet_concat=None)
        cond = jax.tree.map(_interleave, strip(uncond), strip(cond))
    context, added, labels, context_mask = cond.context, cond.added, cond.class_labels, cond.context_mask

    noise = batch.latents if plan.given_latents else image_noise(keys, shape)
    noise = noise.astype(jnp.float32)

    image_latents = mask = masked_latents = None
    if plan.mode != "txt2img":
        if plan.image_is_latents:
            image_latents = batch.image.astype(jnp.float32)
        else:
            dist = vae.encode(batch.image.astype(vae_dtype(vae))).latent_dist
            eps = image_noise(keys, shape, STREAM_IMAGE_LATENTS)
            image_latents = (dist.mean + dist.std * eps).astype(jnp.float32) * scaling_factor
    if plan.mode == "inpaint":
        mask_full = batch.mask.astype(jnp.float32)  # (N, H, W, 1), binarised
        mask = nearest_resize(mask_full, (h, w))
        if plan.inpaint_unet:
            masked = batch.image * (mask_full < 0.5)
            dist = vae.encode(masked.astype(vae_dtype(vae))).latent_dist
            eps = image_noise(keys, shape, STREAM_MASKED_LATENTS)
            masked_latents = (dist.mean + dist.std * eps).astype(jnp.float32) * scaling_factor

    # First latents
    start, end = schedule.start, schedule.end
    if plan.mode == "txt2img":
        x = noise * sampler.init_noise_sigma
    else:
        noised = jnp.where(schedule.add_noise, sampler.add_noise(image_latents, noise, start), image_latents)
        if plan.mode == "inpaint":  # diffusers' inpainting starts from pure noise at strength 1 (start 0)
            noised = jnp.where(start == 0, noise * sampler.init_noise_sigma, noised)
        x = noised

    def model(x, i):
        x_in = sampler.scale_model_input(x, i)
        if plan.mode == "inpaint" and plan.inpaint_unet:
            x_in = jnp.concatenate([x_in, mask, masked_latents], axis=-1)
        if concat is not None:
            x_in = jnp.concatenate([x_in, concat.astype(x_in.dtype)], axis=-1)
        t = sampler.timesteps[i]
        kw = dict(added_cond_kwargs=added, class_labels=labels, encoder_attention_mask=context_mask)
        if not plan.cfg:
            return unet(x_in.astype(unet_dtype(unet)), t, context, **kw).astype(jnp.float32)
        pair = jnp.repeat(x_in, 2, axis=0)
        out = unet(pair.astype(unet_dtype(unet)), t, context, **kw).astype(jnp.float32)
        out = out.reshape(-1, 2, *out.shape[1:])
        uncond_out, cond_out = out[:, 0], out[:, 1]
        guided = uncond_out + schedule.guidance * (cond_out - uncond_out)
        # diffusers' rescale_noise_cfg (arXiv 2305.08891, section 3.4), per image; exactly `guided` when off
        axes = tuple(range(1, guided.ndim))
        std_text = jnp.std(cond_out, axis=axes, keepdims=True, ddof=1)
        std_cfg = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
        r = schedule.rescale
        rescaled = r * (guided * (std_text / std_cfg)) + (1 - r) * guided
        return jnp.where(r > 0, rescaled, guided)

    def body(i, carry):
        x, state = carry
        step_noise = image_noise(keys, shape, STREAM_STEP + i) if sampler.needs_noise else None
        x, state = sampler.step(state, model(x, i), i, x, step_noise)
        if plan.mode == "inpaint" and not plan.inpaint_unet:
            nxt = jnp.minimum(i + 1, sampler.num_calls - 1)
            known = sampler.add_noise(image_latents, noise, nxt)
            known = jnp.where(i + 1 < sampler.num_calls, known, image_latents)
            x = (1 - mask) * known + mask * x
        return x, state

    x, _ = jax.lax.fori_loop(start, end, body, (x, sampler.init_state(x, start)))
    if not plan.decode:
        return x
    z = (x / scaling_factor).astype(vae_dtype(vae))
    decoded = vae.decode(z, tile=plan.vae_tiling, tile_size=plan.vae_tile_size)  # tiles only if larger than one
    return jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def compile_only(sharding: NamedSharding) -> bool:
    """Whether the sharding's devices are attached to no process of this run: devices to compile for, not to run on
    (a TPU topology's devices from `jax.experimental.topologies.get_topology_desc`, on a machine without TPUs)."""
    devices = sharding.device_set
    try:
        attached = jax.devices(next(iter(devices)).platform)
    except RuntimeError:  # no backend of that platform here (TPU devices on a CPU machine)
        return True
    return not devices & set(attached)


def put_batch(x: np.ndarray, sharding: NamedSharding) -> jax.Array | jax.ShapeDtypeStruct:
    """A host batch (the same on every process) onto the batch sharding; with several processes each one builds only
    the shards of its own devices. On compile-only devices, its shape with the sharding: the program can then be
    lowered and compiled for them (`jax.jit(...).lower`), not run."""
    if compile_only(sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def fetch_batch(out: jax.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
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
