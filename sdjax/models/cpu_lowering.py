"""How sdjax's layers lower on XLA:CPU: the rewrites that measured faster there, behind one switch.

Each rewrite computes the same sums as the plain operation, rounded differently, and is compared with PyTorch in
tests/test_layers.py. On GPUs and TPUs the layers use XLA's own lowering of the plain operation (a rewrite goes
there only once it is measured better there). `bench/profile_unet.py` shows where a compiled step spends its time;
docs/benchmarks.md has the measurements behind each constant below.

`ENABLED` is the one switch: None (the default) turns the rewrites on when JAX's default backend is the CPU;
True or False forces them (tests, benches). It is read when a program is traced.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

ENABLED: bool | None = None

SMALL_CONV_PIXELS = 64  # output pixels per image up to which a convolution runs as one patches x weights matmul
SUBPIXEL_MIN_PIXELS = 256  # input pixels per image from which the 2x upsampler convolves at the input size
SCORES_WHOLE = 1 << 22  # attention scores up to which the attention is computed whole
SCORES_PER_CHUNK = 1 << 21  # scores per step of the loop over (batch x head, query chunk) otherwise

NHWC = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))


def active() -> bool:
    """Whether a program traced now uses the CPU rewrites."""
    return jax.default_backend() == "cpu" if ENABLED is None else ENABLED


@contextlib.contextmanager
def disabled():
    """Trace with the plain operations (the network's FLOPs as PyTorch computes them; another backend's program)."""
    global ENABLED
    saved, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = saved


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated`, except with the rewrites on:

    - a 1x1 convolution is a (pixels, C) x (C, O) matmul. XLA:CPU's 1x1 convolution reached 15-70% of its matmul
      peak in bench/profile_unet.py (the SD VAE decoder's 512->256 shortcut at 256x256: 32 GFLOP/s), the matmul
      165-210 (AMD EPYC Zen 4, 2 cores); the VAE decode at 512² went from 12.29 to 11.86 s.
    - a convolution with a small output (up to SMALL_CONV_PIXELS per image: SD's 8x8 and 4x4 UNet levels) is one
      (pixels, kh*kw*C) x (kh*kw*C, O) matmul over gathered patches: XLA:CPU's convolution reaches a third to a
      half of the matmul's speed there (4x4, 2560->1280: 15 vs 40 GFLOP/s on one core); from 16x16 up the
      convolution is as fast or faster once the gather's cost is counted (XLA fuses the GroupNorm and SiLU in front
      of it into the gather, so they run once per tap)."""
    b, h, w, c = lhs.shape
    kh, kw, _, o = rhs.shape
    sh, sw = window_strides
    simple = (
        active() and dimension_numbers == NHWC and feature_group_count == 1 and not isinstance(padding, str)
        and all(d == 1 for d in (*(lhs_dilation or (1,)), *(rhs_dilation or (1,))))
        and kwargs.get("out_sharding") is None
    )
    if simple:
        kwargs.pop("out_sharding", None)  # None (checked above); jnp.dot takes no such argument here
    if simple and (kh, kw, sh, sw) == (1, 1, 1, 1) and tuple(map(tuple, padding)) == ((0, 0), (0, 0)):
        return jnp.dot(lhs.reshape(b * h * w, c), rhs.reshape(c, o), precision=precision, **kwargs).reshape(b, h, w, o)
    if simple:
        (pt, pb), (pl, pr) = padding
        ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
        simple = ho * wo <= SMALL_CONV_PIXELS and (kh, kw) != (1, 1)
    if not simple:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                            feature_group_count=feature_group_count, precision=precision, **kwargs)
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    hp, wp = x.shape[1:3]
    rows = (np.arange(ho)[:, None, None, None] * sh + np.arange(kh)[None, None, :, None]) * wp
    cols = np.arange(wo)[None, :, None, None] * sw + np.arange(kw)[None, None, None, :]
    # one gather of whole pixel rows (B, ho*wo*kh*kw, C): in the kernel's (kh, kw, C) order once reshaped; nine
    # slices and a concatenate ran as fast but compiled 3 s slower for the SD UNet
    patches = jnp.take(x.reshape(b, hp * wp, c), (rows + cols).reshape(-1), axis=1, mode="clip")
    y = jnp.dot(patches.reshape(b * ho * wo, kh * kw * c), rhs.reshape(kh * kw * c, o), precision=precision,
                **kwargs)
    return y.reshape(b, ho, wo, o)


def upsamples_at_input_size(height: int, width: int, size: tuple[int, int]) -> bool:
    """Whether a nearest-2x + 3x3 convolution of a (height, width) input to `size` runs as `upsample2x_conv3x3`."""
    return active() and size == (2 * height, 2 * width) and height * width >= SUBPIXEL_MIN_PIXELS


def upsample2x_conv3x3(x, kernel, bias, dtype):
    """conv3x3(nearest2x(x)) + bias without making the 2x image: output pixel (2i+a, 2j+b) sees only the 2x2 input
    pixels around (i, j), so each of the four phases (a, b) is a 2x2 convolution of x with summed taps (phase 0
    rows: x[i-1] w0 + x[i] (w1+w2); phase 1: x[i] (w0+w1) + x[i+1] w2). 16 instead of 36 taps per input pixel:
    the SD VAE decoder's upsamplers ran 2-2.4x faster on XLA:CPU, the UNet's 16->32 one 1.7x. Same sums, rounded
    differently (the taps are added first). x: (B, H, W, C), kernel: (3, 3, C, O), bias: (O,) or None."""
    dtype = dtype or jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))  # taps summed in fp32
    taps = ((lambda k: jnp.stack([k[0], k[1] + k[2]]), (1, 0)), (lambda k: jnp.stack([k[0] + k[1], k[2]]), (0, 1)))
    phases = []
    for rows, pad_rows in taps:
        row = []
        for cols, pad_cols in taps:
            k = jnp.swapaxes(cols(jnp.swapaxes(rows(kernel), 0, 1)), 0, 1)  # (2, 2, C, O)
            row.append(conv_general_dilated(x, k.astype(dtype), (1, 1), (pad_rows, pad_cols), dimension_numbers=NHWC))
        phases.append(jnp.stack(row, axis=3))  # (B, H, W, b, O)
    y = jnp.stack(phases, axis=2)  # (B, H, a, W, b, O)
    b, h, _, w, _, o = y.shape
    y = y.reshape(b, 2 * h, 2 * w, o)
    if bias is not None:
        y = y + bias.astype(dtype)
    return y


def query_chunk(batch_heads: int, queries: int, keys: int) -> int | None:
    """With the rewrites on, for an attention with more than SCORES_WHOLE scores, the query chunk (a power of 2,
    at least 16) that keeps one (batch, head) chunk's scores near SCORES_PER_CHUNK floats (8 MB); None: compute it
    whole.

    SD1.5 at 512² (B=2 with guidance, 8 heads, 4096 tokens), measured on 2 cores: whole scores 0.76 s per
    self-attention, 16 queries of all heads at a time 0.62-0.73 s, one head and 512 queries at a time 0.34-0.36 s
    (PyTorch's fused kernel: 0.34 s). A while loop costs GPUs and TPUs parallelism, so there it stays whole."""
    if not active() or batch_heads * queries * keys <= SCORES_WHOLE:
        return None
    return min(1 << max(4, (SCORES_PER_CHUNK // max(keys, 1)).bit_length() - 1), queries)
