"""The KL autoencoder of Stable Diffusion (diffusers `AutoencoderKL`), NHWC.

Images (B, H, W, 3) in [-1, 1] <-> latents (B, H/f, W/f, latent_channels) with f = `config.downsample_factor`
(8 for SD 1.x/2.x/XL, 4 for the x4 upscaler). Latents here are unscaled, as in diffusers: the pipeline multiplies
by `config.scaling_factor` after encoding and divides before decoding.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.loading import PretrainedModel, config_fields
from sdjax.models.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

_EPS = 1e-6  # every norm of the VAE
_ACTIVATIONS = ("silu", "swish")  # the same function under two names in diffusers


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers `AutoencoderKL` config; defaults are diffusers' so that old config files read the same."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels", "sample_size",
                     "latents_mean", "latents_std"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        if self.act_fn not in _ACTIVATIONS:
            raise ValueError(f"VAE act_fn {self.act_fn!r} is not supported (only 'silu')")
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("VAE block_out_channels is empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"VAE config: {len(self.down_block_types)} down blocks and {len(self.up_block_types)} up blocks "
                f"for {n} block_out_channels; they must be equal"
            )
        for name, only in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            bad = [t for t in getattr(self, name) if t != only]
            if bad:
                raise ValueError(f"VAE config {name} {bad} are not supported (only {only})")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"VAE block_out_channels {c} is not divisible by norm_num_groups "
                                 f"{self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def tile_sample_size(self) -> int:
        """Default tile side in pixels for tiled encode/decode (diffusers: `tile_sample_min_size`)."""
        s = self.sample_size
        return int(s[0] if isinstance(s, tuple) else s)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """From a diffusers `config.json` dict (`sdjax.loading.config_fields`: metadata dropped, unknown keys warn).
        Every option diffusers' `AutoencoderKL` reads is a field; values this port does not implement (another
        activation or block type) raise in `__post_init__`."""
        return cls(**config_fields(cls, d))

    def to_dict(self) -> dict[str, Any]:
        """A diffusers `config.json` dict (diffusers' `AutoencoderKL.from_pretrained` reads it)."""
        out = {"_class_name": "AutoencoderKL"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# ----------------------------------------------------------------------------------------------------------------
# Outputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """The posterior q(z|x): mean and log-variance (B, h, w, latent_channels); logvar clipped to [-30, 20]."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments):
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def sample(self, key):
        """mean + std * N(0, 1) drawn from `key` (noise in float32, result in the mean's dtype)."""
        noise = jax.random.normal(key, self.mean.shape, jnp.float32)
        return (self.mean.astype(jnp.float32) + self.std.astype(jnp.float32) * noise).astype(self.mean.dtype)

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, 1)) per image, (B,)."""
        m, lv = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        return 0.5 * jnp.sum(m**2 + jnp.exp(lv) - 1.0 - lv, axis=(1, 2, 3))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EncoderOutput:
    latent_dist: DiagonalGaussian


# ----------------------------------------------------------------------------------------------------------------
# Blocks


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, cin, cout, num_layers, groups, add_downsample, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, _EPS, **kw) for i in range(num_layers)
        ])
        # padding=0: the VAE pads bottom/right only before its stride-2 conv
        self.downsamplers = nnx.List([Downsample2D(cout, padding=0, **kw)]) if add_downsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, cin, cout, num_layers, groups, add_upsample, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, _EPS, **kw) for i in range(num_layers)
        ])
        self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if add_upsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nnx.Module):
    """resnet, (attention, resnet): the attention is single-head over all channels, GroupNorm first, residual."""

    def __init__(self, channels, groups, add_attention, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, None, groups, _EPS, **kw) for _ in range(2)])
        attn = None
        if add_attention:
            attn = Attention(channels, 1, channels, norm_groups=groups, eps=_EPS, bias=True, **kw)
        self.attentions = nnx.List([attn])

    def __call__(self, x):
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                x = attn(x)
            x = resnet(x)
        return x


class Encoder(nnx.Module):
    """(B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels) moments."""

    def __init__(self, config: VAEConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chans, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = conv(config.in_channels, chans[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(chans[max(i - 1, 0)], c, config.layers_per_block, groups, i < len(chans) - 1, **kw)
            for i, c in enumerate(chans)
        ])
        self.mid_block = UNetMidBlock2D(chans[-1], groups, config.mid_block_add_attention, **kw)
        self.conv_norm_out = group_norm(chans[-1], groups, _EPS, **kw)
        self.conv_out = conv(chans[-1], 2 * config.latent_channels, 3, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """(B, h, w, latent_channels) -> (B, h*f, w*f, out_channels)."""

    def __init__(self, config: VAEConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chans, groups = config.block_out_channels, config.norm_num_groups
        rev = chans[::-1]
        self.conv_in = conv(config.latent_channels, chans[-1], 3, **kw)
        self.mid_block = UNetMidBlock2D(chans[-1], groups, config.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(i - 1, 0)], c, config.layers_per_block + 1, groups, i < len(rev) - 1, **kw)
            for i, c in enumerate(rev)
        ])
        self.conv_norm_out = group_norm(chans[0], groups, _EPS, **kw)
        self.conv_out = conv(chans[0], config.out_channels, 3, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------------------------------------
# Tiling (diffusers `enable_tiling()`): overlapping tiles, each run alone, blended linearly over the overlap.


def _blend(a, b, extent, axis):
    """b's first `extent` rows (axis 1) or columns (axis 2) fade in from a's last ones, as diffusers blend_v/h."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    # weights in float64 first, as torch's python-float arithmetic
    w = np.arange(extent) / extent
    shape = (extent, 1, 1) if axis == 1 else (extent, 1)
    w_b = jnp.asarray(w.reshape(shape), b.dtype)
    w_a = jnp.asarray((1 - w).reshape(shape), b.dtype)
    head_a = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    head_b = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    mixed = head_a * w_a + head_b * w_b
    return jnp.concatenate([mixed, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


def _tiled(fn, x, tile_in, stride_in, blend_out, keep_out):
    """Run `fn` on overlapping (tile_in x tile_in) windows of x (B, H, W, C) taken every `stride_in`, blend
    neighbours over `blend_out` output pixels and keep the first `keep_out` of each (diffusers' loop, exactly:
    a tile is blended with its neighbours *after* they were themselves blended)."""
    _, h, w, _ = x.shape
    rows = [[fn(x[:, i:i + tile_in, j:j + tile_in]) for j in range(0, w, stride_in)] for i in range(0, h, stride_in)]
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j in range(len(row)):
            tile = row[j]
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend_out, axis=1)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend_out, axis=2)
            row[j] = tile  # diffusers blends in place: later neighbours see the blended tile
            kept.append(tile[:, :keep_out, :keep_out])
        out_rows.append(jnp.concatenate(kept, axis=2))
    return jnp.concatenate(out_rows, axis=1)


# One compiled program per tile shape, reused across calls (a tile's decoder run is the memory peak). jax.jit over
# the split state, not nnx.jit: nnx.jit walks the module graph on every call (0.19 s of CPU per tile for SD's VAE).
@functools.partial(jax.jit, static_argnums=0)
def _encode_moments(graphdef, state, x):
    return nnx.merge(graphdef, state)._moments(x)


@functools.partial(jax.jit, static_argnums=0)
def _decode_latents(graphdef, state, z):
    return nnx.merge(graphdef, state)._decode(z)


# ----------------------------------------------------------------------------------------------------------------
# The model


class AutoencoderKL(PretrainedModel, nnx.Module):
    """diffusers `AutoencoderKL`, NHWC.

    `encode(x)`: images (B, H, W, in_channels) in [-1, 1] -> `EncoderOutput` whose `latent_dist` has `mean`,
    `logvar`, `std`, `sample(key)`, `mode()`, each (B, H/f, W/f, latent_channels).
    `decode(z)`: unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels).
    """

    config_class = VAEConfig
    weight_stems = ("diffusion_pytorch_model",)

    _LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

    @classmethod
    def checkpoint_key_renames(cls, key: str) -> str:
        # Old VAE checkpoints name the mid-block attention query/key/value/proj_attn (diffusers renames on load).
        parts = key.split(".")
        if len(parts) == 6 and parts[1:3] == ["mid_block", "attentions"] and parts[4] in cls._LEGACY_ATTENTION:
            return ".".join(parts[:4] + [cls._LEGACY_ATTENTION[parts[4]], parts[5]])
        return key

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        lc = config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = conv(2 * lc, 2 * lc, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = conv(lc, lc, 1, **kw) if config.use_post_quant_conv else None

    # -- plain passes ------------------------------------------------------------------------------------------

    def _moments(self, x):
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _check(self, x, channels, what):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL.{what}: expected (B, H, W, {channels}) NHWC input, got {x.shape}")

    def _tile_sizes(self, tile_size, overlap):
        f = self.config.downsample_factor
        sample = int(tile_size or self.config.tile_sample_size)
        latent = int(sample / f)
        if not 0 <= overlap < 1 or int(latent * (1 - overlap)) < 1:
            raise ValueError(f"tile_size {sample} (pixels) with overlap {overlap}: need overlap in [0, 1) and "
                             f"tiles of at least {f} pixels that advance by at least one latent")
        return sample, latent

    def encode(self, x, *, tile: bool = False, tile_size: int | None = None, overlap: float = 0.25) -> EncoderOutput:
        """x (B, H, W, in_channels) in [-1, 1], H and W multiples of `config.downsample_factor`.

        tile=True: images larger than `tile_size` pixels (default `config.sample_size`) are encoded in
        overlapping tiles, as diffusers' `enable_tiling()`.
        """
        self._check(x, self.config.in_channels, "encode")
        if tile and max(x.shape[1:3]) > self._tile_sizes(tile_size, overlap)[0]:
            return self.tiled_encode(x, tile_size=tile_size, overlap=overlap)
        return EncoderOutput(DiagonalGaussian.from_moments(self._moments(x)))

    def decode(self, z, *, tile: bool = False, tile_size: int | None = None, overlap: float = 0.25):
        """z (B, h, w, latent_channels), unscaled -> (B, h*f, w*f, out_channels), about [-1, 1].

        tile=True: latents larger than `tile_size / f` are decoded in overlapping tiles, as diffusers'
        `enable_tiling()` (memory bounded by one tile; `tile_size` in pixels, default `config.sample_size`).
        """
        self._check(z, self.config.latent_channels, "decode")
        if tile and max(z.shape[1:3]) > self._tile_sizes(tile_size, overlap)[1]:
            return self.tiled_decode(z, tile_size=tile_size, overlap=overlap)
        return self._decode(z)

    def __call__(self, x, key=None):
        """Reconstruction: decode the posterior mode, or a sample when `key` is given."""
        dist = self.encode(x).latent_dist
        return self.decode(dist.mode() if key is None else dist.sample(key))

    # -- tiled passes ------------------------------------------------------------------------------------------

    def tiled_encode(self, x, *, tile_size: int | None = None, overlap: float = 0.25) -> EncoderOutput:
        """Encode in overlapping tiles of `tile_size` pixels (diffusers `_tiled_encode`); each tile is compiled
        once per shape. Results differ slightly from `encode` near tile seams, as in diffusers."""
        self._check(x, self.config.in_channels, "tiled_encode")
        sample, latent = self._tile_sizes(tile_size, overlap)
        blend = int(latent * overlap)
        graphdef, state = nnx.split(self)
        moments = _tiled(lambda t: _encode_moments(graphdef, state, t), x, sample, int(sample * (1 - overlap)),
                         blend, latent - blend)
        return EncoderOutput(DiagonalGaussian.from_moments(moments))

    def tiled_decode(self, z, *, tile_size: int | None = None, overlap: float = 0.25):
        """Decode in overlapping tiles of `tile_size / f` latents (diffusers `tiled_decode`), blending
        `tile_size * overlap` pixels between neighbours; each tile shape is compiled once."""
        self._check(z, self.config.latent_channels, "tiled_decode")
        sample, latent = self._tile_sizes(tile_size, overlap)
        blend = int(sample * overlap)
        graphdef, state = nnx.split(self)
        return _tiled(lambda t: _decode_latents(graphdef, state, t), z, latent, int(latent * (1 - overlap)),
                      blend, sample - blend)
