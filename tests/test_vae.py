"""AutoencoderKL: parity with diffusers on tiny random models, checkpoint loading rules, real configs."""
import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx
from safetensors.torch import load_file, save_file

from sdjax.loading import CheckpointMismatchError, count_params, state_dict
from sdjax.models.vae import AutoencoderKL, VAEConfig

CONFIGS = Path(__file__).resolve().parents[1] / "sdjax" / "model_configs"
TOL = 1e-4


def tiny_config(levels, layers, **extra):
    chans = (8, 16, 16, 16)[:levels]
    return dict(
        block_out_channels=chans, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=4, layers_per_block=layers,
        latent_channels=4, **{"sample_size": 32, **extra},
    )


# name -> (diffusers config, image (H, W)); H != W on purpose
TINY = {
    "f4": (tiny_config(3, 2), (20, 28)),
    "f8": (tiny_config(4, 1), (24, 40)),
    "f2_no_attn_no_quant": (
        tiny_config(2, 1, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False),
        (12, 18),
    ),
    # for tiling: sample_size 16, f 2 -> latent tiles of 8 every 6 blended over 4 pixels; pixel tiles of 16
    # every 12 blended over 2 latents; small and cheap to compile once per tile shape
    "tiling": (tiny_config(2, 1, sample_size=16), (28, 40)),
}
PARITY = ["f4", "f8", "f2_no_attn_no_quant"]

_encode = nnx.jit(lambda vae, x: vae.encode(x))
_decode = nnx.jit(lambda vae, z: vae.decode(z))


def nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (diffusers model, its folder, sdjax model loaded from that folder, image size), built once."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg, size = TINY[name]
            torch.manual_seed(0)
            ref = TorchAutoencoderKL(**cfg).eval()
            folder = tmp_path_factory.mktemp(name)
            ref.save_pretrained(folder, safe_serialization=True)
            cache[name] = ref, folder, AutoencoderKL.from_pretrained(folder), size
        return cache[name]

    return get


@pytest.fixture(scope="module", params=PARITY)
def pair(request, built):
    return built(request.param)


@pytest.fixture(scope="module")
def f4(built):
    return built("f4")


# ----------------------------------------------------------------------------------------------------------------
# Parity


def test_encode_decode_match_diffusers(pair):
    ref, _, vae, (h, w) = pair
    f = vae.config.downsample_factor
    assert f == 2 ** (len(ref.config.block_out_channels) - 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, h, w, generator=gen) * 2 - 1
    z = torch.randn(2, 4, h // f, w // f, generator=gen)
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        dec = ref.decode(z).sample

    out = _encode(vae, nhwc(x)).latent_dist
    assert out.mean.shape == (2, h // f, w // f, 4)
    assert max_diff(nchw(out.mean), post.mean) <= TOL
    assert max_diff(nchw(out.logvar), post.logvar) <= TOL
    assert max_diff(nchw(out.std), post.std) <= TOL
    y = _decode(vae, nhwc(z))
    assert y.shape == (2, h, w, 3)
    assert max_diff(nchw(y), dec) <= TOL


def test_posterior_sample_and_mode(f4):
    _, _, vae, _ = f4
    x = jax.random.uniform(jax.random.key(0), (2, 20, 28, 3), minval=-1, maxval=1)  # compiled already
    dist = _encode(vae, x).latent_dist
    key = jax.random.key(3)
    expected = dist.mean + dist.std * jax.random.normal(key, dist.mean.shape)
    np.testing.assert_allclose(dist.sample(key), expected, atol=1e-6)
    assert not np.allclose(dist.sample(key), dist.sample(jax.random.key(4)))
    np.testing.assert_array_equal(dist.mode(), dist.mean)
    assert float(dist.logvar.min()) >= -30 and float(dist.logvar.max()) <= 20


def test_tiled_decode_and_encode_match_diffusers_tiling(built):
    # edge tiles are smaller than the others (2 latents, 4 pixels), as diffusers makes them
    ref, _, vae, (h, w) = built("tiling")
    ref = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, h // 2, w // 2, generator=gen)
    x = torch.rand(1, 3, h, w, generator=gen) * 2 - 1
    with torch.no_grad():
        plain = ref.decode(z).sample
        ref.enable_tiling()
        dec = ref.decode(z).sample
        dist_ref = ref.encode(x).latent_dist
        small = ref.decode(z[:, :, :8, :6]).sample  # fits one tile: not tiled

    y = vae.decode(nhwc(z), tile=True)
    assert y.shape == (1, h, w, 3)
    assert max_diff(nchw(y), dec) <= TOL
    assert max_diff(plain, dec) > 1e-2  # the seams do change the result
    dist = vae.encode(nhwc(x), tile=True).latent_dist
    assert max_diff(nchw(dist.mean), dist_ref.mean) <= TOL
    assert max_diff(nchw(dist.logvar), dist_ref.logvar) <= TOL
    tiled_jit = nnx.jit(lambda v, z: v.decode(z, tile=True))
    assert max_diff(nchw(tiled_jit(vae, nhwc(z[:, :, :8, :6]))), small) <= TOL


def test_wrong_layout_is_a_clear_error(f4):
    _, _, vae, _ = f4
    with pytest.raises(ValueError, match="NHWC"):
        vae.decode(jnp.zeros((1, 5, 7, 3)))  # 3 channels, latents have 4
    with pytest.raises(ValueError, match="NHWC"):
        vae.encode(jnp.zeros((1, 3, 20, 28)))  # NCHW


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def write_checkpoint(folder, tensors, config_from, name="diffusion_pytorch_model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text((config_from / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
    return folder


def test_legacy_attention_names_load_the_same(f4, tmp_path):
    _, folder, vae, _ = f4
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    legacy = {}
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = 0
    for k, v in sd.items():
        for new, old in names.items():
            marker = f"mid_block.attentions.0.{new}."
            if marker in k:
                k = k.replace(marker, f"mid_block.attentions.0.{old}.")
                if k.endswith("weight") and old in ("query", "proj_attn"):
                    v = v[:, :, None, None]  # some old checkpoints store these as 1x1 convs
                renamed += 1
        legacy[k] = v
    assert renamed == 16  # 4 projections x (weight, bias) x (encoder, decoder)
    loaded = AutoencoderKL.from_pretrained(write_checkpoint(tmp_path / "legacy", legacy, folder))
    want, got = state_dict(vae), state_dict(loaded)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("edit, key, message", [
    ("drop", "decoder.up_blocks.1.resnets.0.conv2.weight", "missing keys"),
    ("add", "decoder.up_blocks.1.resnets.0.conv3.weight", "unexpected keys"),
    ("reshape", "encoder.conv_in.weight", "wrong shapes"),
])
def test_checkpoint_mismatch_names_the_key(f4, tmp_path, edit, key, message):
    _, folder, _, _ = f4
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    if edit == "drop":
        del sd[key]
    elif edit == "add":
        sd[key] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(8, 3, 5, 5)
    with pytest.raises(CheckpointMismatchError, match=message) as err:
        AutoencoderKL.from_pretrained(write_checkpoint(tmp_path / edit, sd, folder))
    assert key in str(err.value)


def test_save_pretrained_round_trips_through_diffusers(pair, tmp_path):
    ref, _, vae, _ = pair
    vae.save_pretrained(tmp_path)
    back = TorchAutoencoderKL.from_pretrained(tmp_path)
    for k in ("block_out_channels", "layers_per_block", "norm_num_groups", "scaling_factor", "sample_size",
              "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "latent_channels"):
        assert json.dumps(back.config[k]) == json.dumps(ref.config[k]), k  # tuple vs list
    want, got = ref.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_fp16_variant(f4, tmp_path):
    ref, _, _, _ = f4
    half = copy.deepcopy(ref).half()
    half.save_pretrained(tmp_path, variant="fp16", safe_serialization=True)
    vae = AutoencoderKL.from_pretrained(tmp_path, variant="fp16")
    got = state_dict(vae)
    for k, v in half.state_dict().items():
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], v.float().numpy(), err_msg=k)
    with pytest.raises(FileNotFoundError, match="variant"):
        AutoencoderKL.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("name, factor, scaling", [
    ("sd15_vae", 8, 0.18215), ("sdxl_vae", 8, 0.13025), ("x4_upscaler_vae", 4, 0.08333),
])
def test_real_configs_parse_and_match_diffusers_param_count(name, factor, scaling):
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    config = VAEConfig.from_dict(raw)
    assert config.downsample_factor == factor
    assert config.scaling_factor == scaling
    with torch.device("meta"):
        ref = TorchAutoencoderKL.from_config(raw)
    expected = sum(p.numel() for p in ref.parameters())
    if name != "x4_upscaler_vae":
        assert expected == 83_653_863
    assert count_params(AutoencoderKL.abstract(config)) == expected
    assert VAEConfig.from_dict(config.to_dict()) == config


def test_config_validation():
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_dict(tiny_config(2, 1, act_fn="gelu"))
    with pytest.raises(ValueError, match="not supported"):
        VAEConfig.from_dict({**tiny_config(2, 1), "down_block_types": ["AttnDownEncoderBlock2D"] * 2})
    with pytest.raises(ValueError, match="must be equal"):
        VAEConfig.from_dict({**tiny_config(2, 1), "up_block_types": ["UpDecoderBlock2D"]})
    with pytest.warns(UserWarning, match="unknown"):
        VAEConfig.from_dict({**tiny_config(2, 1), "some_new_option": 1})
