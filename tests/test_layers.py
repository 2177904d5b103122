"""The CPU fast paths of the shared layers (sdjax/models/cpu_lowering.py: small convolutions as one matmul, the
upsampler convolved at the input size, chunked attention) against PyTorch, at sizes where each path is taken."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from sdjax.models import cpu_lowering, layers

TOL = 1e-5


def _rand(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


@pytest.fixture(autouse=True)
def _rewrites_on(monkeypatch):
    monkeypatch.setattr(cpu_lowering, "ENABLED", True)  # the CPU paths, whatever the backend


@pytest.mark.parametrize("h, w, stride, pad", [
    (8, 8, 1, (1, 1)), (5, 7, 1, (1, 1)), (8, 8, 2, (1, 1)), (9, 9, 2, (0, 1)),
])
def test_small_conv_is_one_matmul_and_matches_torch(h, w, stride, pad):
    x, k, b = _rand(2, h, w, 24), _rand(3, 3, 24, 16, seed=1, scale=0.2), _rand(16, seed=2)
    y = cpu_lowering.conv_general_dilated(jnp.asarray(x), jnp.asarray(k), (stride, stride), (pad, pad),
                                          dimension_numbers=cpu_lowering.NHWC)
    assert y.shape[1] * y.shape[2] <= cpu_lowering.SMALL_CONV_PIXELS  # the matmul path
    xt = torch.nn.functional.pad(torch.from_numpy(x.transpose(0, 3, 1, 2)), (pad[0], pad[1], pad[0], pad[1]))
    ref = torch.nn.functional.conv2d(xt, torch.from_numpy(k.transpose(3, 2, 0, 1)), stride=stride)
    np.testing.assert_allclose(np.asarray(y) + b, _nhwc(ref) + b, atol=TOL, rtol=0)


def test_pointwise_conv_is_a_matmul_and_matches_torch():
    x, k = _rand(2, 16, 12, 24), _rand(1, 1, 24, 16, seed=1, scale=0.2)
    conv = jax.jit(lambda x, k: cpu_lowering.conv_general_dilated(x, k, (1, 1), ((0, 0), (0, 0)),
                                                                  dimension_numbers=cpu_lowering.NHWC))
    assert "convolution" not in conv.lower(x, k).as_text()
    ref = torch.nn.functional.conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                     torch.from_numpy(k.transpose(3, 2, 0, 1)))
    np.testing.assert_allclose(np.asarray(conv(x, k)), _nhwc(ref), atol=TOL, rtol=0)


@pytest.mark.parametrize("h, w", [(16, 16), (17, 19)])
def test_upsampler_at_input_size_matches_torch(h, w):
    assert h * w >= cpu_lowering.SUBPIXEL_MIN_PIXELS  # the four-phase path
    up = layers.Upsample2D(24, 16, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    up.conv.bias[...] = jnp.asarray(_rand(16, seed=3))
    x = _rand(2, h, w, 24)
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), scale_factor=2.0, mode="nearest"),
        torch.from_numpy(np.array(up.conv.kernel[...]).transpose(3, 2, 0, 1)),
        torch.from_numpy(np.array(up.conv.bias[...])), padding=1)
    np.testing.assert_allclose(np.asarray(up(jnp.asarray(x))), _nhwc(ref), atol=TOL, rtol=0)


@pytest.mark.parametrize("b, heads, lq, lk, query_chunk, cpu_chunk", [
    (1, 2, 3000, 2048, None, 1024),  # per (batch, head), 1024 queries at a time, the last chunk padded
    (2, 8, 1000, 300, None, 1000),  # per (batch, head), all 1000 queries at once
    (2, 8, 1000, 77, 384, None),  # the pipeline's chunking: all heads, 384 queries at a time
    (2, 2, 64, 77, None, None),  # small: whole
])
def test_chunked_attention_matches_torch(b, heads, lq, lk, query_chunk, cpu_chunk):
    d = 16
    assert cpu_lowering.query_chunk(b * heads, lq, lk) == cpu_chunk
    q, k, v = _rand(b, lq, heads * d), _rand(b, lk, heads * d, seed=1), _rand(b, lk, heads * d, seed=2)
    out = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), heads, query_chunk=query_chunk)
    th = [torch.from_numpy(a).reshape(b, -1, heads, d).transpose(1, 2) for a in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*th).transpose(1, 2).reshape(b, lq, heads * d)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=TOL, rtol=0)


def test_the_switch_picks_the_lowering():
    """cpu_lowering.ENABLED is the one switch: off, a small convolution is XLA's convolution; on, a matmul."""
    x, k = jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 4, 4))

    def hlo():  # a fresh function each time: a jit's trace cache does not know the switch
        return jax.jit(lambda x, k: cpu_lowering.conv_general_dilated(
            x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=cpu_lowering.NHWC)).lower(x, k).as_text()

    on = hlo()
    with cpu_lowering.disabled():
        off = hlo()
    assert "convolution" in off and "dot_general" not in off
    assert "dot_general" in on and "convolution" not in on


def test_backend_checks_live_in_one_module():
    """No layer asks which backend it runs on: the CPU rewrites are chosen in sdjax/models/cpu_lowering.py only."""
    models = Path(cpu_lowering.__file__).parent
    asking = [p.name for p in models.glob("*.py") if "default_backend" in p.read_text() and p.name != "cpu_lowering.py"]
    assert asking == []
