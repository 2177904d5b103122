"""The denoising UNet of Stable Diffusion 1.x/2.x/XL and the x4 upscaler (diffusers `UNet2DConditionModel`), NHWC.

`unet(sample (B, h, w, C), timesteps, context (B, L, D)) -> (B, h, w, out_channels)`. Attribute names equal
diffusers' parameter names (`down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k`), so checkpoints load
through `sdjax.loading`'s table with no per-model renames.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sdjax.loading import PretrainedModel, config_fields
from sdjax.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    conv,
    group_norm,
    timestep_embedding,
)

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# Per-block config fields: a single value in config.json means "the same for every block".
_PER_BLOCK = ("num_attention_heads", "cross_attention_dim", "layers_per_block", "transformer_layers_per_block",
              "only_cross_attention")

_ACTIVATIONS = ("silu", "swish")  # one function, two names in diffusers

# diffusers options that change nothing for the block types above when left at these values; any other value is
# a model this port does not implement, and is refused by name rather than silently computed differently.
_FIXED = {
    "dual_cross_attention": (False, None),
    "class_embed_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# Read and accepted with any value: they do not change inference with the supported blocks.
_IGNORED = ("dropout", "addition_embed_type_num_heads")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers `UNet2DConditionModel` config; per-block fields may be given as one value and are stored expanded
    to a tuple (one entry per down block).

    `num_attention_heads` is the number of heads per block; the head size is `block_out_channels[i] // heads`.
    (diffusers' config.json calls the head count `attention_head_dim`; `from_dict`/`to_dict` translate.)
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] | int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple[int, ...] | int = 1280
    transformer_layers_per_block: tuple[int, ...] | int = 1
    num_attention_heads: tuple[int, ...] | int = 8
    only_cross_attention: tuple[bool, ...] | bool = False
    use_linear_projection: bool = False
    upcast_attention: bool = False
    num_class_embeds: int | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self):
        n = len(self.block_out_channels)
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            set_(name, tuple(getattr(self, name)))
        if isinstance(self.sample_size, list):
            set_("sample_size", tuple(self.sample_size))
        for name in _PER_BLOCK:
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if any(isinstance(v, (list, tuple)) for v in value):
                    raise ValueError(f"UNet config {name}: per-layer lists {value} are not supported")
                value = tuple(value)
                if len(value) != n:
                    raise ValueError(f"UNet config {name} has {len(value)} entries for {n} blocks: {value}")
            else:
                value = (value,) * n
            set_(name, value)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"UNet config: {len(self.down_block_types)} down_block_types and {len(self.up_block_types)} "
                f"up_block_types for {n} block_out_channels; they must be equal"
            )
        for name, allowed in (("down_block_types", _DOWN_TYPES), ("up_block_types", _UP_TYPES)):
            bad = [t for t in getattr(self, name) if t not in allowed]
            if bad:
                raise ValueError(f"UNet config {name}: {bad} not supported (only {', '.join(allowed)})")
        if self.mid_block_type not in _MID_TYPES:
            raise ValueError(f"UNet config mid_block_type {self.mid_block_type!r} not supported "
                             "(UNetMidBlock2DCrossAttn or null)")
        if self.act_fn not in _ACTIVATIONS:
            raise ValueError(f"UNet config act_fn {self.act_fn!r} not supported (only 'silu')")
        if self.norm_num_groups is None:
            raise ValueError("UNet config norm_num_groups: null (no output norm) is not supported")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNet config addition_embed_type {self.addition_embed_type!r} not supported "
                             "(null or 'text_time')")
        if self.addition_embed_type == "text_time" and not (
            self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        ):
            raise ValueError("UNet config addition_embed_type 'text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        for name in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, name) % 2 != 1:
                raise ValueError(f"UNet config {name} {getattr(self, name)} not supported (odd sizes only)")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"UNet config downsample_padding {self.downsample_padding} not supported (0 or 1)")
        for i, (c, heads) in enumerate(zip(self.block_out_channels, self.num_attention_heads)):
            if c % self.norm_num_groups:
                raise ValueError(f"UNet config block_out_channels[{i}] = {c} is not divisible by "
                                 f"norm_num_groups {self.norm_num_groups}")
            if heads < 1 or c // heads < 1:
                raise ValueError(f"UNet config num_attention_heads[{i}] = {heads} does not fit {c} channels")

    @property
    def head_dims(self) -> tuple[int, ...]:
        """Channels per attention head of each block (diffusers: `out_channels // num_attention_heads`)."""
        return tuple(c // h for c, h in zip(self.block_out_channels, self.num_attention_heads))

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """From a diffusers `unet/config.json` dict.

        diffusers' `attention_head_dim` holds the number of heads (a naming mistake it keeps for old configs:
        `num_attention_heads = num_attention_heads or attention_head_dim`); it is read here, once, as such.
        Then `sdjax.loading.config_fields`: metadata dropped, unknown keys warn, the diffusers options of `_FIXED`
        with values this port does not implement raise ValueError naming the option and the value.
        """
        d = dict(d)
        heads = d.pop("num_attention_heads", None)
        legacy = d.pop("attention_head_dim", 8)
        d["num_attention_heads"] = heads if heads is not None else legacy
        if d.get("upcast_attention") is None:  # SDXL writes null
            d["upcast_attention"] = False
        if d.get("only_cross_attention") is None:
            d["only_cross_attention"] = False
        return cls(**config_fields(cls, d, refuse=_FIXED, ignore=_IGNORED))

    def to_dict(self) -> dict[str, Any]:
        """A diffusers `config.json` dict (diffusers' `UNet2DConditionModel.from_pretrained` reads it).

        The head count goes back under diffusers' legacy name `attention_head_dim` (diffusers refuses
        `num_attention_heads`); per-block fields that are the same for every block are written as one value.
        """
        out: dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _PER_BLOCK and len(set(v)) == 1:
                v = v[0]
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out["attention_head_dim"] = out.pop("num_attention_heads")
        return out


# ----------------------------------------------------------------------------------------------------------------
# Blocks


def _transformer(channels, heads, depth, cross_dim, only_cross, config, kw):
    return Transformer2DModel(
        channels, heads, channels // heads, depth, cross_dim, groups=config.norm_num_groups,
        use_linear_projection=config.use_linear_projection, upcast_attention=config.upcast_attention,
        only_cross_attention=only_cross, **kw,
    )


class DownBlock(nnx.Module):
    """diffusers `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (attentions=None).

    Returns the block output and the skips it leaves for the up path (one per resnet, plus the downsampled map).
    """

    def __init__(self, i, cin, temb_dim, config, *, add_downsample, kw):
        cout = config.block_out_channels[i]
        groups, eps, layers = config.norm_num_groups, config.norm_eps, config.layers_per_block[i]
        self.resnets = nnx.List([
            ResnetBlock2D(cin if j == 0 else cout, cout, temb_dim, groups, eps, **kw) for j in range(layers)
        ])
        self.attentions = nnx.List([
            _transformer(cout, config.num_attention_heads[i], config.transformer_layers_per_block[i],
                         config.cross_attention_dim[i], config.only_cross_attention[i], config, kw)
            for _ in range(layers)
        ]) if config.down_block_types[i] == "CrossAttnDownBlock2D" else None
        self.downsamplers = (
            nnx.List([Downsample2D(cout, padding=config.downsample_padding, **kw)]) if add_downsample else None
        )

    def __call__(self, x, temb, context, mask=None):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, mask)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet, then (transformer, resnet) once; resnet outputs divided by `mid_block_scale_factor`."""

    def __init__(self, temb_dim, config, *, kw):
        c = config.block_out_channels[-1]
        groups, eps, scale = config.norm_num_groups, config.norm_eps, config.mid_block_scale_factor
        self.attentions = nnx.List([
            # the mid block never drops self-attention (diffusers ignores only_cross_attention here)
            _transformer(c, config.num_attention_heads[-1], config.transformer_layers_per_block[-1],
                         config.cross_attention_dim[-1], False, config, kw)
        ])
        self.resnets = nnx.List([
            ResnetBlock2D(c, c, temb_dim, groups, eps, output_scale_factor=scale, **kw) for _ in range(2)
        ])

    def __call__(self, x, temb, context, mask=None):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context, mask), temb)
        return x


class UpBlock(nnx.Module):
    """diffusers `CrossAttnUpBlock2D` (with `attentions`) or `UpBlock2D` (attentions=None), for up block `i`
    (level `n - 1 - i`): layers_per_block + 1 resnets, each taking one skip concatenated on channels."""

    def __init__(self, i, temb_dim, config, *, add_upsample, kw):
        n = len(config.block_out_channels)
        level = n - 1 - i
        chans = config.block_out_channels
        cout, prev_out = chans[level], chans[min(level + 1, n - 1)]
        skip_last = chans[max(level - 1, 0)]  # the last skip comes from the next finer level (or conv_in)
        groups, eps = config.norm_num_groups, config.norm_eps
        layers = config.layers_per_block[level] + 1
        self.resnets = nnx.List([
            ResnetBlock2D((prev_out if j == 0 else cout) + (skip_last if j == layers - 1 else cout), cout,
                          temb_dim, groups, eps, **kw)
            for j in range(layers)
        ])
        self.attentions = nnx.List([
            _transformer(cout, config.num_attention_heads[level], config.transformer_layers_per_block[level],
                         config.cross_attention_dim[level], config.only_cross_attention[level], config, kw)
            for _ in range(layers)
        ]) if config.up_block_types[i] == "CrossAttnUpBlock2D" else None
        self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if add_upsample else None

    def __call__(self, x, skips, temb, context, upsample_size=None, mask=None):
        for j, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips[-1 - j]], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context, mask)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


# ----------------------------------------------------------------------------------------------------------------
# The model


class UNet2DConditionModel(PretrainedModel, nnx.Module):
    """Conditional UNet: noisy latents + timestep + text context (+ SDXL size/pooled-text or upscaler noise level)
    -> noise (or v) prediction, NHWC."""

    config_class = UNetConfig
    weight_stems = ("diffusion_pytorch_model",)

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chans = config.block_out_channels
        n = len(chans)
        temb_dim = config.time_embed_dim

        self.conv_in = conv(config.in_channels, chans[0], config.conv_in_kernel, **kw)
        # time_proj (diffusers `Timesteps`) has no parameters: `timestep_embedding` in __call__
        self.time_embedding = TimestepEmbedding(chans[0], temb_dim, **kw)
        self.class_embedding = (
            nnx.Embed(config.num_class_embeds, temb_dim, **kw) if config.num_class_embeds is not None else None
        )
        self.add_embedding = (
            TimestepEmbedding(config.projection_class_embeddings_input_dim, temb_dim, **kw)
            if config.addition_embed_type == "text_time" else None
        )

        blocks, cin = [], chans[0]
        for i in range(n):
            blocks.append(DownBlock(i, cin, temb_dim, config, add_downsample=i < n - 1, kw=kw))
            cin = chans[i]
        self.down_blocks = nnx.List(blocks)
        self.mid_block = UNetMidBlock2DCrossAttn(temb_dim, config, kw=kw) if config.mid_block_type else None
        self.up_blocks = nnx.List([UpBlock(i, temb_dim, config, add_upsample=i < n - 1, kw=kw) for i in range(n)])

        self.conv_norm_out = group_norm(chans[0], config.norm_num_groups, config.norm_eps, **kw)
        self.conv_out = conv(chans[0], config.out_channels, config.conv_out_kernel, **kw)

    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None, class_labels=None,
                 encoder_attention_mask=None):
        """Predict the noise (or v) of `sample`.

        sample: (B, h, w, in_channels) latents (any h, w: sizes not divisible by 2^(levels-1) work as in diffusers).
        timesteps: scalar or (B,), int or float. encoder_hidden_states: (B, L, cross_attention_dim).
        added_cond_kwargs (SDXL): {"text_embeds": (B, P) pooled text, "time_ids": (B, K) sizes and crops}.
        class_labels (x4 upscaler): (B,) int noise levels.
        encoder_attention_mask: (B, L) bool, False for context tokens the cross-attention ignores (the padding
        chunks of a batch of long prompts, `sdjax.prompts`); None: all count.
        Returns (B, h, w, out_channels) in the compute dtype.
        """
        config = self.config
        dtype = self.dtype
        b = sample.shape[0]
        sample = sample.astype(dtype)
        context = encoder_hidden_states.astype(dtype)
        if config.center_input_sample:
            sample = 2 * sample - 1.0

        # time: sinusoids in float32, then the MLP in the compute dtype
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
        t_emb = timestep_embedding(t, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
        emb = self.time_embedding(t_emb.astype(dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet has class embeddings (num_class_embeds): pass class_labels (B,)")
            labels = jnp.broadcast_to(jnp.asarray(class_labels).reshape(-1), (b,))
            emb = emb + self.class_embedding(labels).astype(emb.dtype)
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(self._added_embeds(b, added_cond_kwargs).astype(dtype))

        # down, keeping every intermediate map as a skip for the up path
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, res = block(x, emb, context, encoder_attention_mask)
            skips.extend(res)

        if self.mid_block is not None:
            x = self.mid_block(x, emb, context, encoder_attention_mask)

        for block in self.up_blocks:
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            # upsample to the size of the next skip: 2x, or the exact size when the latent was odd on the way down
            size = skips[-1].shape[1:3] if block.upsamplers is not None else None
            x = block(x, res, emb, context, size, encoder_attention_mask)

        x = nnx.silu(self.conv_norm_out(x))
        return self.conv_out(x)

    def _added_embeds(self, b, added_cond_kwargs):
        """SDXL's extra conditioning: [pooled text, sinusoids of each time id] -> (B, projection input dim)."""
        config = self.config
        kwargs = added_cond_kwargs or {}
        missing = [k for k in ("text_embeds", "time_ids") if k not in kwargs]
        if missing:
            raise ValueError(f"this UNet (addition_embed_type 'text_time') needs added_cond_kwargs {missing}")
        text = jnp.asarray(kwargs["text_embeds"])
        time_ids = jnp.asarray(kwargs["time_ids"])
        time_emb = timestep_embedding(time_ids.reshape(-1), config.addition_time_embed_dim,
                                      config.flip_sin_to_cos, config.freq_shift).reshape(b, -1)
        added = jnp.concatenate([text.astype(jnp.float32), time_emb], axis=-1)
        if added.shape[-1] != config.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds {tuple(text.shape)} and time_ids {tuple(time_ids.shape)} give {added.shape[-1]} "
                f"features; this UNet wants projection_class_embeddings_input_dim = "
                f"{config.projection_class_embeddings_input_dim}"
            )
        return added
