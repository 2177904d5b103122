"""The UNet against diffusers' `UNet2DConditionModel`, with tiny random models made here (fp32, CPU).

Each configuration mirrors one real model family at toy size: SD1 (conv proj_in, one head count), SD2 (linear
projections, upcast attention, per-block head counts), SDXL (text_time added conditioning, deeper transformers,
a block without attention), the x4 upscaler (class-embedded noise level, 7 input channels, blocks without
self-attention) and inpainting (9 input channels). The real configs are checked by parameter count only.
"""
import json
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from sdjax.loading import CheckpointMismatchError, count_params
from sdjax.models import unet as unet_lib
from sdjax.models.unet import UNet2DConditionModel, UNetConfig

from pipeline_fixtures import quick_compiles

CONFIGS = Path(unet_lib.__file__).parent.parent / "model_configs"
TOL = 1e-4

_TINY = dict(block_out_channels=(32, 64), norm_num_groups=8, sample_size=8)

TINY_CONFIGS = {
    "sd1": dict(
        _TINY, layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
    ),
    "sd2": dict(
        _TINY, block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
        attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True, mid_block_scale_factor=1.5,
    ),
    "sdxl": dict(
        _TINY, layers_per_block=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), cross_attention_dim=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
    ),
    "upscaler": dict(
        _TINY, block_out_channels=(32, 32, 64), layers_per_block=1, in_channels=7,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=(True, True, False), num_class_embeds=10, attention_head_dim=4,
        cross_attention_dim=24, use_linear_projection=True,
    ),
    # inpainting's 9 channels, plus options no real model here uses: no mid block, other sinusoid settings and
    # time-embedding size, a padding-0 downsampler, other conv sizes, centred input
    "inpaint": dict(
        _TINY, layers_per_block=1, in_channels=9, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        mid_block_type=None, flip_sin_to_cos=False, freq_shift=1, time_embedding_dim=48, downsample_padding=0,
        conv_in_kernel=1, conv_out_kernel=5, center_input_sample=True,
    ),
}


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model.eval()


_quick_compiles = pytest.fixture(scope="module", autouse=True)(quick_compiles)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (diffusers model, its saved folder, the sdjax model loaded from it); built once per module."""
    from diffusers import UNet2DConditionModel as TorchUNet

    cache = {}

    def get(name):
        if name not in cache:
            torch_model = _randomize(TorchUNet(**TINY_CONFIGS[name]), seed=len(cache))
            folder = tmp_path_factory.mktemp(f"unet_{name}")
            torch_model.save_pretrained(str(folder), safe_serialization=True)
            cache[name] = (torch_model, folder, UNet2DConditionModel.from_pretrained(folder))
        return cache[name]

    return get


def _inputs(name, batch, h, w, seq=5, seed=0):
    """Random NCHW torch inputs and the matching sdjax kwargs for config `name`."""
    cfg = TINY_CONFIGS[name]
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, cfg.get("in_channels", 4), h, w, generator=gen)
    context = torch.randn(batch, seq, cfg["cross_attention_dim"], generator=gen)
    torch_kw, jax_kw = {}, {}
    if cfg.get("addition_embed_type") == "text_time":
        text = torch.randn(batch, 16, generator=gen)
        time_ids = torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 48.0], [32.0, 96.0, 16.0, 0.0, 40.0, 100.0]])[:batch]
        torch_kw["added_cond_kwargs"] = {"text_embeds": text, "time_ids": time_ids}
        jax_kw["added_cond_kwargs"] = {"text_embeds": jnp.asarray(text.numpy()),
                                       "time_ids": jnp.asarray(time_ids.numpy())}
    if cfg.get("num_class_embeds"):
        labels = torch.arange(batch) * 3 + 1
        torch_kw["class_labels"] = labels
        jax_kw["class_labels"] = jnp.asarray(labels.numpy())
    return sample, context, torch_kw, jax_kw


def _call(model, sample, timesteps, context, added_cond_kwargs=None, class_labels=None):
    return model(sample, timesteps, context, added_cond_kwargs=added_cond_kwargs, class_labels=class_labels)


# one compiled function for every test: XLA compiles each (config, shape) once, faster than op-by-op eager
_run = nnx.jit(_call)


def _compare(name, tiny, h, w, timesteps, batch=2, run=_run):
    torch_model, _, model = tiny(name)
    sample, context, torch_kw, jax_kw = _inputs(name, batch, h, w)
    with torch.no_grad():
        t = torch.tensor(timesteps) if isinstance(timesteps, list) else timesteps
        want = torch_model(sample, t, context, **torch_kw).sample.numpy().transpose(0, 2, 3, 1)
    got = run(model, jnp.asarray(sample.numpy().transpose(0, 2, 3, 1)), jnp.asarray(timesteps),
               jnp.asarray(context.numpy()), **jax_kw)
    assert got.shape == want.shape
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    assert diff <= TOL, f"{name} {h}x{w}: max |sdjax - diffusers| = {diff:.3g}"
    return got, want, diff


# ----------------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("name,h,w,timesteps", [
    ("sd1", 8, 12, [3, 981]),  # non-square
    ("sd1", 9, 6, 500),  # 9 is odd: the up path upsamples to the skip's size; one timestep for the batch
    ("sd2", 12, 10, [0.5, 999.0]),  # 10 is not divisible by 4 (three levels); float timesteps
    ("sdxl", 8, 8, [10, 700]),
    ("upscaler", 8, 8, [20, 350]),
    ("inpaint", 8, 8, [1, 1000]),
])
def test_matches_diffusers(tiny, name, h, w, timesteps):
    _compare(name, tiny, h, w, timesteps)


@pytest.mark.parametrize("name,h,w,timesteps", [
    ("sd1", 8, 12, [3, 981]),
    ("sd2", 12, 10, [0.5, 999.0]),
    ("sdxl", 8, 8, [10, 700]),
    ("upscaler", 8, 8, [20, 350]),
    ("inpaint", 8, 8, [1, 1000]),
])
def test_matches_diffusers_with_xla_default_optimisations(tiny, name, h, w, timesteps, xla_default_optimisations):
    """Each config once more with XLA's default optimisations (the module turns most of them off for compile
    speed), same tolerance; a new jitted function, so the program is compiled anew under them. LLVM's
    optimisations vectorise and contract multiply-adds, which moves float32 rounding: measured max |diff| 4.5e-6 to
    8.5e-6 (4.7e-6 to 7.4e-6 with them off)."""
    diff = _compare(name, tiny, h, w, timesteps, run=nnx.jit(lambda *args, **kw: _call(*args, **kw)))[2]
    print(f"{name} {h}x{w}, XLA default optimisations: max |sdjax - diffusers| = {diff:.2e}")


def test_bf16_compute(tiny):
    _, folder, _ = tiny("sd1")
    model = UNet2DConditionModel.from_pretrained(folder, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert model.conv_in.kernel.get_value().dtype == jnp.float32
    sample, context, _, _ = _inputs("sd1", 2, 8, 12)
    x = jnp.asarray(sample.numpy().transpose(0, 2, 3, 1))
    out = _run(model, x, jnp.asarray([3, 981]), jnp.asarray(context.numpy()))
    assert out.dtype == jnp.bfloat16
    ref = _run(tiny("sd1")[2], x, jnp.asarray([3, 981]), jnp.asarray(context.numpy()))
    # a smoke check of the bf16 path (about 3 significant digits per op), not a parity bound
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_missing_conditioning_is_an_error(tiny):
    for name, missing in (("sdxl", "added_cond_kwargs"), ("upscaler", "class_labels")):
        model = tiny(name)[2]
        sample, context, _, jax_kw = _inputs(name, 1, 8, 8)
        jax_kw.pop(missing)
        with pytest.raises(ValueError, match=missing.split("_")[0]):
            model(jnp.asarray(sample.numpy().transpose(0, 2, 3, 1)), 5, jnp.asarray(context.numpy()), **jax_kw)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def _broken(src, tmp_path, edit):
    state = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    edit(state)
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("kind,key,edit", [
    ("missing", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
     lambda s, k: s.pop(k)),
    ("unexpected", "mid_block.attentions.0.extra.weight",
     lambda s, k: s.__setitem__(k, np.zeros((2,), np.float32))),
    ("wrong shapes", "time_embedding.linear_1.weight",
     lambda s, k: s.__setitem__(k, np.ascontiguousarray(s[k].T))),
])
def test_checkpoint_mismatch_names_the_key(tiny, tmp_path, kind, key, edit):
    folder = _broken(tiny("sd1")[1], tmp_path, lambda s: edit(s, key))
    with pytest.raises(CheckpointMismatchError, match=kind) as err:
        UNet2DConditionModel.from_pretrained(folder)
    assert key in str(err.value)


@pytest.mark.parametrize("name", ["sdxl", "upscaler"])
def test_save_pretrained_round_trips_through_diffusers(tiny, tmp_path, name):
    from diffusers import UNet2DConditionModel as TorchUNet

    torch_model, _, model = tiny(name)
    model.save_pretrained(tmp_path)
    back = TorchUNet.from_pretrained(str(tmp_path))
    want, got = torch_model.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key diffusers writes is known
        assert UNetConfig.from_dict(dict(back.config)) == UNetConfig.from_dict(dict(torch_model.config))
    assert UNetConfig.from_dict(dict(back.config)) == model.config


# ----------------------------------------------------------------------------------------------------------------
# Configs


KNOWN_COUNTS = {"sd15_unet.json": 859_520_964, "sdxl_base_unet.json": 2_567_463_684}


@pytest.mark.parametrize("filename", sorted(p.name for p in CONFIGS.glob("*_unet.json")))
def test_real_config_param_count(filename):
    from diffusers import UNet2DConditionModel as TorchUNet

    raw = json.loads((CONFIGS / filename).read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = UNetConfig.from_dict(raw)
    n = count_params(UNet2DConditionModel.abstract(config))
    with torch.device("meta"):  # shapes only, as abstract()
        torch_counts = [sum(p.numel() for p in TorchUNet.from_config(d).parameters())
                        for d in (raw, config.to_dict())]  # to_dict() builds the same model in diffusers
    assert n == torch_counts[0] == torch_counts[1]
    if filename in KNOWN_COUNTS:
        assert n == KNOWN_COUNTS[filename]


def test_real_config_values():
    def load(name):
        return UNetConfig.from_dict(json.loads((CONFIGS / name).read_text()))

    sd15, sd21, xl, refiner, x4 = (load(f"{n}_unet.json") for n in ("sd15", "sd21", "sdxl_base", "sdxl_refiner",
                                                                       "x4_upscaler"))
    # diffusers' attention_head_dim is a head count: 8 heads of 40..160 channels in SD1.5, 64-channel heads after
    assert sd15.num_attention_heads == (8,) * 4 and sd15.head_dims == (40, 80, 160, 160)
    assert sd21.head_dims == (64,) * 4 and sd21.upcast_attention and sd21.use_linear_projection
    assert xl.head_dims == (64,) * 3 and xl.transformer_layers_per_block == (1, 2, 10)
    assert xl.upcast_attention is False  # null in the file
    assert refiner.head_dims == (64,) * 4 and refiner.projection_class_embeddings_input_dim == 1280 + 5 * 256
    assert x4.only_cross_attention == (True, True, True, False) and x4.num_class_embeds == 1000
    assert load("sd2_inpainting_unet.json").in_channels == 9


def test_config_translation_round_trip():
    config = UNetConfig.from_dict(dict(TINY_CONFIGS["sdxl"], num_attention_heads=None))
    assert config.num_attention_heads == (2, 4) and config.head_dims == (16, 16)
    assert config.layers_per_block == (1, 2) and config.cross_attention_dim == (32, 32)
    d = config.to_dict()
    assert "num_attention_heads" not in d and d["attention_head_dim"] == [2, 4]
    assert d["cross_attention_dim"] == 32  # the same for every block: written once
    assert UNetConfig.from_dict(d) == config


@pytest.mark.parametrize("field,value", [
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("addition_embed_type", "text"),
    ("class_embed_type", "timestep"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("time_embedding_type", "fourier"),
    ("dual_cross_attention", True),
    ("act_fn", "gelu"),
    ("encoder_hid_dim", 32),
    ("transformer_layers_per_block", [[1, 2], [1, 2]]),
    ("attention_head_dim", [2, 4, 4]),
    ("block_out_channels", [30, 64]),
])
def test_unsupported_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0]):
        UNetConfig.from_dict(dict(TINY_CONFIGS["sd1"], **{field: value}))
