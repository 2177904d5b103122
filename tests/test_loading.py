"""sdjax.loading: the safetensors reader and the conversion copies, apart from any network."""
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from sdjax import loading


class Net(nnx.Module):
    def __init__(self, *, rngs):
        # big enough (> 4 MB) for the strip-wise transposed copy, odd sizes for the strip remainder
        self.conv = nnx.Conv(200, 1030, (3, 3), rngs=rngs)
        self.proj = nnx.Linear(1030, 1100, rngs=rngs)
        self.norm = nnx.LayerNorm(1100, rngs=rngs)


def _torch_layout(rng, dtype):
    return {
        "conv.weight": rng.standard_normal((1030, 200, 3, 3)).astype(dtype),
        "conv.bias": rng.standard_normal((1030,)).astype(dtype),
        "proj.weight": rng.standard_normal((1100, 1030)).astype(dtype),
        "proj.bias": rng.standard_normal((1100,)).astype(dtype),
        "norm.weight": rng.standard_normal((1100,)).astype(dtype),
        "norm.bias": rng.standard_normal((1100,)).astype(dtype),
    }


@pytest.mark.parametrize("file_dtype, param_dtype", [
    (np.float32, jnp.float32), (np.float16, jnp.float32), (np.float32, jnp.bfloat16),
    (ml_dtypes.bfloat16, jnp.float32),
])
def test_load_transposes_and_casts_exactly(tmp_path, file_dtype, param_dtype):
    tensors = _torch_layout(np.random.default_rng(0), file_dtype)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    model = nnx.eval_shape(lambda: Net(rngs=nnx.Rngs(0)))
    loading.load_state(model, loading.read_checkpoint([tmp_path / "w.safetensors"]), param_dtype=param_dtype)
    want = np.dtype(param_dtype)
    expect = {
        ("conv", "kernel"): tensors["conv.weight"].transpose(2, 3, 1, 0),
        ("conv", "bias"): tensors["conv.bias"],
        ("proj", "kernel"): tensors["proj.weight"].T,
        ("proj", "bias"): tensors["proj.bias"],
        ("norm", "scale"): tensors["norm.weight"],
        ("norm", "bias"): tensors["norm.bias"],
    }
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        got = np.asarray(value.get_value())
        assert got.dtype == want, path
        np.testing.assert_array_equal(got, expect[tuple(path)].astype(want), err_msg=str(path))


class Net1x1(nnx.Module):
    def __init__(self, *, rngs):
        self.conv = nnx.Conv(40, 37, (1, 1), rngs=rngs)
        self.proj = nnx.Linear(37, 41, rngs=rngs)


@pytest.mark.parametrize("file_dtype", [np.float32, np.float16])
def test_1x1_convs_saved_as_linear_and_back_cast_exactly(file_dtype):
    """Old VAE attention weights: a 1x1 conv stored as (out, in), a linear stored as (out, in, 1, 1); the strip-wise
    cast keeps the same mapping (remainders of the 16-row strips)."""
    rng = np.random.default_rng(1)
    tensors = {"conv.weight": rng.standard_normal((37, 40)).astype(file_dtype),
               "conv.bias": rng.standard_normal((37,)).astype(file_dtype),
               "proj.weight": rng.standard_normal((41, 37, 1, 1)).astype(file_dtype),
               "proj.bias": rng.standard_normal((41,)).astype(file_dtype)}
    model = nnx.eval_shape(lambda: Net1x1(rngs=nnx.Rngs(0)))
    loading.load_state(model, tensors, param_dtype=jnp.float32)
    expect = {("conv", "kernel"): tensors["conv.weight"].T[None, None], ("conv", "bias"): tensors["conv.bias"],
              ("proj", "kernel"): tensors["proj.weight"][:, :, 0, 0].T, ("proj", "bias"): tensors["proj.bias"]}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        got = np.asarray(value.get_value())
        assert got.dtype == np.float32 and got.flags.c_contiguous, path
        np.testing.assert_array_equal(got, expect[tuple(path)].astype(np.float32), err_msg=str(path))


def test_checkpoint_views_and_shapes_come_from_the_header(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((0, 4), np.float16),
               "c": np.array(3, np.int64)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    ckpt = loading.read_checkpoint([tmp_path / "w.safetensors"])
    assert sorted(ckpt) == ["a", "b", "c"]
    assert ckpt.shape("a") == (2, 3) and ckpt.shape("b") == (0, 4) and ckpt.shape("c") == ()
    for k, v in tensors.items():
        np.testing.assert_array_equal(ckpt[k], v)
        assert ckpt[k].dtype == v.dtype


def _corrupt(path, how):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if how == "truncated":
        return raw[:len(raw) - 10]
    if how == "short":
        return raw[:5]
    if how == "offsets":
        header["a"]["data_offsets"][1] += 4
    if how == "dtype":
        header["a"]["dtype"] = "Q7"
    if how == "overlapping":  # b read from inside a: same length, so only the tiling check sees it
        header["b"]["data_offsets"] = [header["a"]["data_offsets"][0], header["a"]["data_offsets"][0] + 12]
    if how == "fractional":  # used to be truncated to an int
        header["b"]["data_offsets"][1] += 0.5
    if how == "pickle":
        import pickle
        return pickle.dumps({"a": 1}, protocol=2)
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


@pytest.mark.parametrize("how", ["truncated", "short", "offsets", "dtype", "overlapping", "fractional", "pickle"])
def test_broken_file_is_a_clear_error(tmp_path, how):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.ones((4, 4), np.float32), "b": np.ones(3, np.float32)}, str(path))
    path.write_bytes(_corrupt(path, how))
    with pytest.raises(ValueError, match="cannot read safetensors checkpoint"):
        loading.read_checkpoint([path])
