"""Building blocks shared by the VAE and the UNet (NHWC; attribute names follow diffusers)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models import cpu_lowering


def group_norm(channels, groups, eps, *, rngs, dtype, param_dtype):
    # use_fast_variance=False: E[(x-mean)^2] as torch computes it, not E[x^2]-mean^2
    return nnx.GroupNorm(
        channels, num_groups=groups, epsilon=eps, use_fast_variance=False,
        rngs=rngs, dtype=dtype, param_dtype=param_dtype,
    )


def layer_norm(dim, eps, *, rngs, dtype, param_dtype):
    return nnx.LayerNorm(
        dim, epsilon=eps, use_fast_variance=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype
    )


def conv(cin, cout, kernel, *, rngs, dtype, param_dtype, stride=1, padding=None, bias=True):
    pad = kernel // 2 if padding is None else padding
    return nnx.Conv(
        cin, cout, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        use_bias=bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
        conv_general_dilated=cpu_lowering.conv_general_dilated,
    )


def linear(cin, cout, *, rngs, dtype, param_dtype, bias=True):
    return nnx.Linear(cin, cout, use_bias=bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-Conv twice, with an optional time embedding added in between (temb_channels=None: VAE)."""

    def __init__(self, cin, cout, temb_channels, groups, eps, *, rngs, dtype, param_dtype,
                 output_scale_factor=1.0):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = group_norm(cin, groups, eps, **kw)
        self.conv1 = conv(cin, cout, 3, **kw)
        self.time_emb_proj = linear(temb_channels, cout, **kw) if temb_channels else None
        self.norm2 = group_norm(cout, groups, eps, **kw)
        self.conv2 = conv(cout, cout, 3, **kw)
        self.conv_shortcut = conv(cin, cout, 1, **kw) if cin != cout else None
        self.output_scale_factor = output_scale_factor

    def __call__(self, x, temb=None):
        h = self.conv1(nnx.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
        h = self.conv2(nnx.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. padding=0 (VAE encoder) pads only bottom/right by one, as diffusers."""

    def __init__(self, channels, cout=None, padding=1, *, rngs, dtype, param_dtype):
        self.padding = padding
        self.conv = conv(channels, cout or channels, 3, stride=2, padding=padding,
                         rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def nearest_resize(x, size):
    """torch `F.interpolate(mode="nearest")` for NHWC: source index floor(i * in / out)."""
    _, h, w, _ = x.shape
    oh, ow = size
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = jnp.minimum(jnp.floor(jnp.arange(oh) * (h / oh)).astype(jnp.int32), h - 1)
    cols = jnp.minimum(jnp.floor(jnp.arange(ow) * (w / ow)).astype(jnp.int32), w - 1)
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """Nearest 2x (or to `output_size`) then a 3x3 conv."""

    def __init__(self, channels, cout=None, *, rngs, dtype, param_dtype):
        self.conv = conv(channels, cout or channels, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, output_size=None):
        _, h, w, _ = x.shape
        size = tuple(output_size or (2 * h, 2 * w))
        if cpu_lowering.upsamples_at_input_size(h, w, size):
            bias = None if self.conv.bias is None else self.conv.bias[...]
            return cpu_lowering.upsample2x_conv3x3(x, self.conv.kernel[...], bias, self.conv.dtype)
        return self.conv(nearest_resize(x, size))


def attention(q, k, v, heads, *, upcast=False, query_chunk=None, mask=None):
    """Multi-head scaled dot-product attention on (B, L, heads*D) arrays; softmax in float32.

    mask: (B, Lk) bool, False for keys no query may attend to (padding chunks of a long prompt); each row needs at
    least one True. Their scores become -inf, so their softmax weights are exactly 0; None: every key counts.

    query_chunk: process queries in chunks of this many, all heads at once (same result, less memory for long
    sequences). When None, XLA:CPU still splits a large attention into one (batch, head) and a few hundred queries
    at a time (see `cpu_lowering.query_chunk`); other backends compute it whole.
    """
    b, lq, inner = q.shape
    d = inner // heads
    lk = k.shape[1]
    # (B, heads, L, D) and keys as (B, heads, D, Lk): plain batched matmuls, which XLA:CPU runs 3-4x faster than
    # the same einsum on (B, L, heads, D) for the 77-token cross-attention
    q = q.reshape(b, lq, heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(b, lk, heads, d).transpose(0, 2, 3, 1)
    v = v.reshape(b, lk, heads, d).transpose(0, 2, 1, 3)
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)  # scaling q costs Lq*D multiplies, scaling scores Lq*Lk

    def block(qc, kc, vc, keep=None):
        scores = (qc @ kc).astype(jnp.float32)
        if keep is not None:
            scores = jnp.where(keep, scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(vc.dtype)
        return probs @ vc

    keep = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Lk) against (B, heads, Lq, Lk) scores
    if query_chunk and lq > query_chunk:
        n = -(-lq // query_chunk)
        qp = jnp.pad(q, ((0, 0), (0, 0), (0, n * query_chunk - lq), (0, 0)))
        qp = qp.reshape(b, heads, n, query_chunk, d).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda qc: block(qc, k, v, keep), qp)
        out = out.transpose(1, 2, 0, 3, 4).reshape(b, heads, n * query_chunk, d)[:, :, :lq]
    elif query_chunk is None and (chunk := cpu_lowering.query_chunk(b * heads, lq, lk)):
        # one loop over (batch x head, query chunk) pairs: each step a (chunk, D) x (D, Lk) matmul
        n = -(-lq // chunk)
        qp = jnp.pad(q, ((0, 0), (0, 0), (0, n * chunk - lq), (0, 0))).reshape(b * heads * n, chunk, d)
        kf, vf = k.reshape(b * heads, d, lk), v.reshape(b * heads, lk, d)
        step = jnp.arange(b * heads * n) // n  # the (batch x head) index of each step

        def one(a):
            return block(a[0], kf[a[1]], vf[a[1]], None if mask is None else mask[a[1] // heads][None, :])

        out = jax.lax.map(one, (qp, step))
        out = out.reshape(b, heads, n * chunk, d)[:, :, :lq]
    else:
        out = block(q, k, v, keep)
    return out.transpose(0, 2, 1, 3).reshape(b, lq, inner)


class Attention(nnx.Module):
    """diffusers `Attention`: to_q/to_k/to_v/to_out[0]; with `norm_groups`, the VAE's spatial self-attention
    (GroupNorm first, residual added, NHWC input)."""

    def __init__(self, query_dim, heads, dim_head, cross_attention_dim=None, *, rngs, dtype, param_dtype,
                 bias=False, out_bias=True, upcast_attention=False, norm_groups=None, eps=1e-5,
                 rescale_output_factor=1.0):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.upcast_attention = upcast_attention
        self.rescale_output_factor = rescale_output_factor
        self.query_chunk_size = None  # set by the pipeline to chunk long attentions
        self.group_norm = group_norm(query_dim, norm_groups, eps, **kw) if norm_groups else None
        self.to_q = linear(query_dim, inner, bias=bias, **kw)
        self.to_k = linear(kv_dim, inner, bias=bias, **kw)
        self.to_v = linear(kv_dim, inner, bias=bias, **kw)
        self.to_out = nnx.List([linear(inner, query_dim, bias=out_bias, **kw)])

    def __call__(self, x, context=None, mask=None):
        """mask: (B, Lk) bool over the context's tokens (see `attention`); only with a context."""
        residual = x
        spatial = x.ndim == 4
        if spatial:
            b, h, w, c = x.shape
            x = x.reshape(b, h * w, c)
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads,
                        upcast=self.upcast_attention, query_chunk=self.query_chunk_size,
                        mask=None if context is x else mask)
        out = self.to_out[0](out)
        if spatial:
            out = out.reshape(b, h, w, c)
        if self.group_norm is not None:  # the VAE's attention block is residual
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


class GEGLU(nnx.Module):
    def __init__(self, dim, inner, *, rngs, dtype, param_dtype):
        self.proj = linear(dim, inner * 2, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class GELU(nnx.Module):
    def __init__(self, dim, inner, approximate=False, *, rngs, dtype, param_dtype):
        self.approximate = approximate
        self.proj = linear(dim, inner, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        return jax.nn.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nnx.Module):
    """net[0] = activation with its projection, net[1] = dropout (absent at inference), net[2] = output linear."""

    def __init__(self, dim, *, rngs, dtype, param_dtype, mult=4, activation="geglu"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = dim * mult
        if activation == "geglu":
            act = GEGLU(dim, inner, **kw)
        elif activation in ("gelu", "gelu-approximate"):
            act = GELU(dim, inner, activation == "gelu-approximate", **kw)
        else:
            raise ValueError(f"unsupported feed-forward activation {activation!r} (geglu, gelu, gelu-approximate)")
        self.net = nnx.List([act, None, linear(inner, dim, **kw)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention, feed-forward, each pre-LayerNorm and residual."""

    def __init__(self, dim, heads, dim_head, cross_attention_dim, *, rngs, dtype, param_dtype,
                 upcast_attention=False, attention_bias=False, activation="geglu", only_cross_attention=False):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        # only_cross_attention (the x4 upscaler's disable_self_attentions): attn1 also attends to the context
        self.only_cross_attention = only_cross_attention
        self.norm1 = layer_norm(dim, 1e-5, **kw)
        self.attn1 = Attention(dim, heads, dim_head, cross_attention_dim if only_cross_attention else None,
                               bias=attention_bias, upcast_attention=upcast_attention, **kw)
        self.norm2 = layer_norm(dim, 1e-5, **kw)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim, bias=attention_bias,
                               upcast_attention=upcast_attention, **kw)
        self.norm3 = layer_norm(dim, 1e-5, **kw)
        self.ff = FeedForward(dim, activation=activation, **kw)

    def __call__(self, x, context, mask=None):
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None, mask) + x
        x = self.attn2(self.norm2(x), context, mask) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
    """GroupNorm, proj_in (1x1 conv or linear), transformer blocks, proj_out, residual."""

    def __init__(self, channels, heads, dim_head, depth, cross_attention_dim, *, rngs, dtype, param_dtype,
                 groups=32, use_linear_projection=False, upcast_attention=False, attention_bias=False,
                 only_cross_attention=False):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = group_norm(channels, groups, 1e-6, **kw)
        proj = (lambda a, b: linear(a, b, **kw)) if use_linear_projection else (lambda a, b: conv(a, b, 1, **kw))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, upcast_attention=upcast_attention,
                                  attention_bias=attention_bias, only_cross_attention=only_cross_attention, **kw)
            for _ in range(depth)
        ])
        self.proj_out = proj(inner, channels)

    def __call__(self, x, context, mask=None):
        b, h, w, c = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear_projection:
            x = self.proj_in(x)
        x = x.reshape(b, h * w, x.shape[-1])
        if self.use_linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, mask)
        if self.use_linear_projection:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, x.shape[-1])
        if not self.use_linear_projection:
            x = self.proj_out(x)
        return x + residual


def timestep_embedding(timesteps, dim, flip_sin_to_cos=True, freq_shift=1.0, max_period=10000):
    """diffusers `get_timestep_embedding`: (B,) timesteps -> (B, dim) float32 sinusoids."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, cin, dim, cout=None, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = linear(cin, dim, **kw)
        self.linear_2 = linear(dim, cout or dim, **kw)

    def __call__(self, x):
        return self.linear_2(nnx.silu(self.linear_1(x)))
