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
reuses the program. Weights are replicated; how the images lie on the devices is the plan's `Layout`
(`choose_layout`): the batch over the `data` axis, and with fewer images than devices the guided pair and the
latents' height over the devices of each image.
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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdjax import compile_cache
from sdjax.models.layers import nearest_resize
from sdjax.pipelines.noise import STREAM_IMAGE_LATENTS, STREAM_MASKED_LATENTS, STREAM_STEP, image_noise

MODES = ("txt2img", "img2img", "inpaint")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Keep compiled programs on disk so that a second process skips most of the compile time (every program,
    however fast it compiled). path None: the `sdjax` command's choice (SDJAX_COMPILE_CACHE, else the per-user
    directory; see `sdjax.compile_cache`). Returns the directory in use; None if off or not writable (warned)."""
    return compile_cache.enable(path) if path is not None else compile_cache.setup()


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
class Layout:
    """How the images of one call lie on the devices: a (data, pair, space) mesh of all of them.

    The batch (`batch` rows, padding included) is split over `data`. With at least as many images as devices that is
    all: each device computes batch / devices images. With fewer, each image's devices split its work instead of
    computing padding images: `pair` (2) devices take the unconditional and the conditional half of the guided UNet
    batch, and `space` devices a band of the latents' height each (XLA exchanges the bands' borders for the
    convolutions and reduces across them for the norms and attention); the VAE splits the height over pair x space.
    Every image keeps its own random key, so the images do not depend on the layout.
    """

    batch: int
    data: int
    pair: int = 1
    space: int = 1

    @property
    def split(self) -> bool:
        """Whether an image is computed by several devices."""
        return self.pair * self.space > 1

    def mesh(self, devices) -> Mesh:
        """The (data, pair, space) mesh of `devices` (in their order: a group's devices are neighbours)."""
        return Mesh(np.asarray(devices).reshape(self.data, self.pair, self.space), ("data", "pair", "space"))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_layout(n_images: int, n_devices: int, *, cfg: bool, latent_height: int) -> Layout:
    """The layout of `n_images` images on `n_devices` devices (the one place this is decided).

    n_images >= n_devices: the batch padded to a multiple of the device count, one image per row of devices.
    Fewer: the fewest padded images that divide the devices into equal groups, then each group splits the guided
    pair (with guidance) and the latents' height (the largest split that divides it); devices left over, when the
    height does not divide, take padding images as before."""
    if n_images >= n_devices:
        return Layout(batch=-(-n_images // n_devices) * n_devices, data=n_devices)
    data = min(d for d in _divisors(n_devices) if d >= n_images)
    rest = n_devices // data
    pair = 2 if cfg and rest % 2 == 0 else 1
    space = max(s for s in _divisors(rest // pair) if latent_height % s == 0)
    data *= rest // (pair * space)
    return Layout(batch=data, data=data, pair=pair, space=space)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything that fixes the compiled program (one compile per distinct plan)."""

    mode: str
    sampler: str
    calls: int  # the sampler tables' padded length (samplers.calls_bucket)
    cfg: bool
    batch: int  # padded (layout.batch)
    latent_hw: tuple
    given_latents: bool
    image_is_latents: bool  # img2img from latents (no VAE encode)
    inpaint_unet: bool  # 9-channel inpainting UNet (else mask blending)
    decode: bool
    vae_tiling: bool
    text: tuple = ()  # static options of the family's conditioning
    vae_tile_size: int | None = None  # tile side in pixels (None: the VAE config's sample_size)
    layout: Layout | None = None  # how the images lie on the devices (None: the batch over `data` only)


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
    fn = functools.partial(generate, plan=plan, networks=networks, encode=encode, mesh=batched.mesh)
    return jax.jit(fn, in_shardings=(replicated, replicated, replicated, batched, replicated, replicated),
                   out_shardings=batched)


def _interleave(uncond, cond):
    """Image-major [uncond_0, cond_0, uncond_1, ...]: keeps each image's pair on its own device."""
    return jnp.stack([uncond, cond], axis=1).reshape(-1, *cond.shape[1:])


def generate(text_states, unet_state, vae_state, batch: Batch, sampler, schedule: Schedule, *, plan: Plan,
             networks: Networks, encode: Encode, mesh: Mesh | None = None):
    """The whole generation for one batch: encode text, build first latents, sample, decode. mesh: the layout's
    (data, pair, space) mesh, where the plan's layout splits images over devices."""
    split = plan.layout is not None and plan.layout.split

    def lay(x, *spec):  # the layout's sharding of x; nothing when every image is on one device
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec))) if split and x is not None else x

    rows = ("data", "pair")  # the UNet batch's rows: images, each as its guided pair
    vae_height = "space"  # the VAE splits the height over pair x space when both divide it
    if split and plan.latent_hw[0] % (plan.layout.pair * plan.layout.space) == 0:
        vae_height = ("pair", "space")
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
    if plan.cfg:  # the rows of the guided batch: each device keeps the half of the pair it computes
        context, labels, context_mask = lay(context, rows), lay(labels, rows), lay(context_mask, rows)
        added = None if added is None else {k: lay(v, rows) for k, v in added.items()}

    noise = batch.latents if plan.given_latents else image_noise(keys, shape)
    noise = noise.astype(jnp.float32)

    image_latents = mask = masked_latents = None
    if plan.mode != "txt2img":
        if plan.image_is_latents:
            image_latents = batch.image.astype(jnp.float32)
        else:
            dist = vae.encode(lay(batch.image.astype(vae_dtype(vae)), "data", vae_height)).latent_dist
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
            out = unet(lay(x_in.astype(unet_dtype(unet)), rows, "space"), t, context, **kw)
            return lay(out, rows, "space").astype(jnp.float32)
        pair = lay(jnp.repeat(x_in, 2, axis=0), rows, "space")
        out = lay(unet(pair.astype(unet_dtype(unet)), t, context, **kw), rows, "space").astype(jnp.float32)
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
    if not plan.vae_tiling:
        z = lay(z, "data", vae_height)
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
    process's devices (padding rows >= n dropped). A row held by devices of several processes (an image split over
    devices, `Layout`) belongs to the process of the first of them (lowest device id), so each row is returned by one
    process only."""
    if out.is_fully_addressable:
        return np.asarray(jax.device_get(out))[:n], np.arange(n)
    owner = {}  # row -> (lowest device id holding it, that device's process)
    for device, index in out.sharding.devices_indices_map(out.shape).items():
        for r in range(*index[0].indices(out.shape[0])):
            owner[r] = min(owner.get(r, (device.id, device.process_index)), (device.id, device.process_index))
    rows = {}
    for shard in out.addressable_shards:
        start = shard.index[0].start or 0
        for i, row in enumerate(np.asarray(shard.data)):
            if owner[start + i][1] == shard.device.process_index:
                rows.setdefault(start + i, row)  # a replicated row comes once
    indices = np.asarray(sorted(i for i in rows if i < n), np.int64)
    if not len(indices):
        return np.zeros((0, *out.shape[1:]), out.dtype), indices
    return np.stack([rows[i] for i in indices]), indices
