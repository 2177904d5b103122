"""sdjax.original_layout: the original (CompVis / SGM) single-file layout mapped onto diffusers names.

Tiny random diffusers pipelines are written as original-layout single files by a writer in this file (the inverse
mapping). The writer is trusted because diffusers' own `from_single_file(path, config=folder)` loads each file back
to exactly the folder's weights; then sdjax's lazy views must give exactly the same tensors (bitwise) with nothing
left over. Detection is also checked on shape-only tables of the real-size layouts (models built on the meta device
from the real configs in sdjax/model_configs).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from sdjax import original_layout as ol  # noqa: E402

from pipeline_fixtures import TOKENIZER_DIR, build_pipeline, build_sdxl  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# The test's writer: diffusers / transformers state dicts -> the original single-file layout


class ShapeOnly:
    """A tensor stand-in with a shape only (real-size layouts without memory)."""

    def __init__(self, shape):
        self.shape = tuple(int(d) for d in shape)

    @property
    def T(self):
        return ShapeOnly(self.shape[::-1])

    def reshape(self, *shape):
        return ShapeOnly(shape)


def concat(parts):
    if isinstance(parts[0], ShapeOnly):
        return ShapeOnly((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
    return np.concatenate(parts)


UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_original(sd: dict, layers_per_block: int) -> dict:
    per = layers_per_block + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "class_embedding": "label_emb"}
    out = {}
    for k, v in sd.items():
        head, _, param = k.rpartition(".")
        p = k.split(".")
        if head in fixed:
            new = f"{fixed[head]}.{param}"
        elif p[0] == "down_blocks":
            b, kind, r, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{1 + b * per + layers_per_block}.0.op.{rest.removeprefix('conv.')}"
            elif kind == "resnets":
                sub, _, prm = rest.rpartition(".")
                new = f"input_blocks.{1 + b * per + r}.0.{UNET_RESNET[sub]}.{prm}"
            else:
                new = f"input_blocks.{1 + b * per + r}.1.{rest}"
        elif p[0] == "up_blocks":
            b, kind, r, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if kind == "upsamplers":
                has_attention = any(x.startswith(f"up_blocks.{b}.attentions.") for x in sd)
                new = f"output_blocks.{b * per + layers_per_block}.{2 if has_attention else 1}.{rest}"
            elif kind == "resnets":
                sub, _, prm = rest.rpartition(".")
                new = f"output_blocks.{b * per + r}.0.{UNET_RESNET[sub]}.{prm}"
            else:
                new = f"output_blocks.{b * per + r}.1.{rest}"
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            if p[1] == "attentions":
                new = f"middle_block.1.{rest}"
            else:
                sub, _, prm = rest.rpartition(".")
                new = f"middle_block.{2 * int(p[2])}.{UNET_RESNET[sub]}.{prm}"
        else:
            raise AssertionError(f"writer: unexpected UNet key {k}")
        out["model.diffusion_model." + new] = v
    return out


def vae_to_original(sd: dict) -> dict:
    n_up = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        new = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if p[1] == "down_blocks":
            rest = ".".join(p[3:]).replace("conv_shortcut", "nin_shortcut")
            rest = rest.replace("downsamplers.0", "downsample").replace("resnets", "block")
            new = f"encoder.down.{p[2]}.{rest}"
        elif p[1] == "up_blocks":
            rest = ".".join(p[3:]).replace("conv_shortcut", "nin_shortcut")
            rest = rest.replace("upsamplers.0", "upsample").replace("resnets", "block")
            new = f"decoder.up.{n_up - 1 - int(p[2])}.{rest}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}".replace("conv_shortcut", "nin_shortcut")
        elif p[1] == "mid_block":
            sub, _, prm = ".".join(p[4:]).rpartition(".")
            new = f"{p[0]}.mid.attn_1.{attention[sub]}.{prm}"
            if sub != "group_norm" and prm == "weight":
                v = v.reshape(*v.shape, 1, 1)  # the original's 1x1 convs
        out["first_stage_model." + new] = v
    return out


def text_model_names(sd: dict) -> dict:
    """transformers >= 5 saves a bare CLIPTextModel without `text_model.`: the names every SD folder has."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}


def clip_to_original(sd: dict, prefix: str) -> dict:
    out = {prefix + k: v for k, v in text_model_names(sd).items()}
    out[prefix + "text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]  # as old files have
    return out


def openclip_to_original(sd: dict, prefix: str, *, extra_block: bool, rng=None) -> dict:
    """OpenCLIP text tower: fused in_proj, (width, proj) text_projection, logit_scale; with `extra_block` a last
    resblock (SD2 runs the penultimate layer; diffusers drops block 23) and a (width, width) projection."""
    sd = text_model_names(sd)
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    layer = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {}
    n_layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
    for k, v in sd.items():
        if k in fixed:
            out[prefix + fixed[k]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T
        elif k.startswith("text_model.encoder.layers."):
            p = k.split(".")
            n, rest = p[3], ".".join(p[4:])
            sub, _, prm = rest.rpartition(".")
            if sub in ("self_attn.k_proj", "self_attn.v_proj"):
                continue
            if sub == "self_attn.q_proj":
                parts = [sd[f"text_model.encoder.layers.{n}.self_attn.{x}_proj.{prm}"] for x in "qkv"]
                out[f"{prefix}transformer.resblocks.{n}.attn.in_proj_{prm}"] = concat(parts)
            else:
                out[f"{prefix}transformer.resblocks.{n}.{layer[sub]}.{prm}"] = v
        else:
            raise AssertionError(f"writer: unexpected text encoder key {k}")
    width = sd["text_model.final_layer_norm.weight"].shape[0]

    def fill(shape):
        return ShapeOnly(shape) if rng is None else np.asarray(rng.standard_normal(shape), np.float32)

    if extra_block:
        for k in [k for k in out if k.startswith(f"{prefix}transformer.resblocks.0.")]:
            out[k.replace(".resblocks.0.", f".resblocks.{n_layers}.")] = fill(out[k].shape)
        out[prefix + "text_projection"] = fill((width, width))
    out[prefix + "logit_scale"] = fill(())
    return out


DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2")


def original_state(family: str, parts: dict, layers_per_block: int, rng=None) -> dict:
    """The whole single file of `family` from {component: diffusers state dict}."""
    out = unet_to_original(parts["unet"], layers_per_block)
    if "vae" in parts:
        out.update(vae_to_original(parts["vae"]))
    if family.startswith("sd1"):
        out.update(clip_to_original(parts["text_encoder"], ol.CLIP_SD1))
    elif family.startswith("sd2") or family == "x4-upscaler":
        out.update(openclip_to_original(parts["text_encoder"], ol.OPENCLIP_SD2, extra_block=True, rng=rng))
    elif family == "sdxl":
        out.update(clip_to_original(parts["text_encoder"], ol.CLIP_SDXL))
        out.update(openclip_to_original(parts["text_encoder_2"], ol.OPENCLIP_SDXL, extra_block=False, rng=rng))
    elif family == "sdxl-refiner":
        out.update(openclip_to_original(parts["text_encoder_2"], ol.OPENCLIP_REFINER, extra_block=False, rng=rng))
    if not family.startswith("sdxl"):  # LDM files carry the DDPM schedule buffers; SGM files do not
        for name in DDPM_BUFFERS:
            out[name] = fill_like((1000,), rng)
    if family == "x4-upscaler":
        for name in DDPM_BUFFERS:
            out["low_scale_model." + name] = fill_like((1000,), rng)
    return out


def fill_like(shape, rng):
    return ShapeOnly(shape) if rng is None else rng.random(shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Tiny pipelines and their single files


def sd2_text_encoder(folder: Path, seed: int = 1):
    """A tiny OpenCLIP-style (gelu) text encoder with 23 layers, as SD2's ViT-H after diffusers drops block 23."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=23, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407))
    for p in te.parameters():
        p.data.normal_(0.0, 0.1)
    te.save_pretrained(folder / "text_encoder", safe_serialization=True)


def build_upscaler(folder: Path, seed: int = 0) -> Path:
    """A tiny random x4 upscaler folder (7-channel UNet with the noise-level class embedding)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=1, sample_size=16, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=(True, True, False), num_class_embeds=1000, attention_head_dim=8,
        cross_attention_dim=32, use_linear_projection=True, norm_num_groups=8)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, sample_size=32, scaling_factor=0.08333)
    for module in (unet, vae):
        for p in module.parameters():
            p.data.normal_(0.0, 0.05)
    configs = ol.builtin_configs("x4-upscaler")
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                           num_attention_heads=4)),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), unet=unet,
        low_res_scheduler=DDPMScheduler.from_config(configs.low_res_scheduler),
        scheduler=DDIMScheduler.from_config(configs.scheduler), max_noise_level=350)
    pipe.save_pretrained(folder, safe_serialization=True)
    sd2_text_encoder(folder)
    return Path(folder)


KINDS = {  # family -> (diffusers pipeline class, components)
    "sd1": ("StableDiffusionPipeline", ("unet", "vae", "text_encoder")),
    "sd1-inpainting": ("StableDiffusionInpaintPipeline", ("unet", "vae", "text_encoder")),
    "sd2": ("StableDiffusionPipeline", ("unet", "vae", "text_encoder")),
    "sdxl": ("StableDiffusionXLPipeline", ("unet", "vae", "text_encoder", "text_encoder_2")),
    "sdxl-refiner": ("StableDiffusionXLImg2ImgPipeline", ("unet", "vae", "text_encoder_2")),
    "x4-upscaler": ("StableDiffusionUpscalePipeline", ("unet", "vae", "text_encoder")),
}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


def folder_weights(folder: Path, parts) -> dict[str, dict[str, np.ndarray]]:
    return {part: load_file(str(folder / part / WEIGHT_FILES[part])) for part in parts}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (folder, single file, {component: the folder's state dict})."""
    root = tmp_path_factory.mktemp("single_file")
    made = {}
    for family, (_, parts) in KINDS.items():
        folder = root / family
        if family in ("sd1", "sd1-inpainting", "sd2"):
            build_pipeline(folder, kind=family[:3], unet_in_channels=9 if family.endswith("inpainting") else 4)
            if family == "sd2":
                sd2_text_encoder(folder)
        elif family.startswith("sdxl"):
            build_sdxl(folder, refiner=family == "sdxl-refiner")
        else:
            build_upscaler(folder)
        weights = folder_weights(folder, parts)
        state = original_state(family, weights, layers_per_block=1, rng=np.random.default_rng(0))
        path = root / f"{family}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
        made[family] = (folder, path, weights)
    return made


def assert_same(got: Mapping, want: Mapping, what: str):
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want))[:10])
    for k in want:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert a.dtype == b.dtype and a.shape == b.shape, (what, k, a.dtype, a.shape, b.dtype, b.shape)
        assert np.array_equal(a, b), (what, k)


# ----------------------------------------------------------------------------------------------------------------
# Round trips


def config_only(folder: Path, dest: Path) -> Path:
    """The folder without its weights: diffusers' `config=` then cannot fall back to them for a component it does
    not find in the single file."""
    if not dest.exists():
        shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


@pytest.mark.parametrize("family", list(KINDS))
def test_writer_is_what_diffusers_reads(tiny, family, tmp_path):
    """diffusers' own single-file loader reads the test's file back to exactly the folder's weights."""
    folder, path, weights = tiny[family]
    cls = getattr(diffusers, KINDS[family][0])
    config = config_only(folder, tmp_path / "config")
    pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True)
    for part, want in weights.items():
        got = {k: v.detach().numpy() for k, v in getattr(pipe, part).state_dict().items()}
        assert_same(got, want, f"diffusers {family} {part}")


@pytest.mark.parametrize("family", list(KINDS))
def test_components_equal_the_folder(tiny, family):
    folder, path, weights = tiny[family]
    state = load_file(str(path))
    detected = ol.detect(ol.shapes(state))
    assert detected.family == family, detected.how
    parts = ol.components(state, detected)
    views = parts.views()
    assert sorted(views) == sorted(weights)
    for part, want in weights.items():
        want = text_model_names(want) if part.startswith("text_encoder") else want
        assert_same(views[part], want, f"sdjax {family} {part}")
        for k in views[part]:
            assert views[part].shape(k) == views[part][k].shape
    assert ol.leftovers(state, parts) == []
    if family in ("sd2", "x4-upscaler"):
        assert set(parts.ignored.values()) >= {ol.PENULTIMATE, ol.NO_PROJECTION}


@pytest.mark.parametrize("family", ["sd2", "sdxl", "x4-upscaler"])
def test_sdjax_loaders_accept_the_views(tiny, family):
    """sdjax's strict loaders (every key used, every parameter filled, shapes right) take the views as they are."""
    import json

    from sdjax import loading
    from sdjax.models import AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel

    folder, path, _ = tiny[family]
    state = load_file(str(path))
    parts = ol.components(state, ol.detect(ol.shapes(state))).views()
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    for part, view in parts.items():
        cls = classes[part]
        model = cls.abstract(json.loads((folder / part / "config.json").read_text()))
        loading.load_state(model, view, renames=cls.checkpoint_key_renames, ignored=cls.ignored_checkpoint_keys,
                           name=f"{family} {part}")


def test_ema_weights(tiny, tmp_path):
    """extract_ema=True reads `model_ema.<key without dots>`, as diffusers does."""
    folder, _, weights = tiny["sd1"]
    base = original_state("sd1", weights, layers_per_block=1, rng=np.random.default_rng(0))
    state = {k: (v + 1.0 if k.startswith(ol.UNET) else v) for k, v in base.items()}  # the non-EMA weights differ
    state.update({ol.ema_key(k): v for k, v in base.items() if k.startswith(ol.UNET)})
    state.update({"model_ema.decay": np.float32(0.9999).reshape(()), "model_ema.num_updates": np.zeros((), np.int32)})
    path = tmp_path / "ema.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))

    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_only(folder, tmp_path / "config")), local_files_only=True, extract_ema=True)
    assert_same({k: v.numpy() for k, v in pipe.unet.state_dict().items()}, weights["unet"], "diffusers EMA unet")

    detected = ol.detect(ol.shapes(state))
    assert detected.has_ema and "EMA weights present" in detected.how
    ema = ol.components(state, detected, extract_ema=True)
    assert_same(ema.unet, weights["unet"], "sdjax EMA unet")
    assert ol.leftovers(state, ema) == []
    plain = ol.components(state, detected)
    assert_same(plain.unet, {k: v + 1.0 for k, v in weights["unet"].items()}, "sdjax non-EMA unet")
    assert ol.leftovers(state, plain) == []
    assert plain.ignored[ol.ema_key("model.diffusion_model.out.2.weight")] == ol.EMA_UNUSED

    no_ema = ol.detect(ol.shapes(base))
    assert not no_ema.has_ema
    with pytest.raises(ValueError, match="no complete model_ema"):
        ol.components(base, no_ema, extract_ema=True)


# ----------------------------------------------------------------------------------------------------------------
# Laziness


class CountingState(Mapping):
    """A reader-like mapping: `.shape(key)` from a header, `__getitem__` counted (it stands for reading data)."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.reads = 0

    def __getitem__(self, key):
        self.reads += 1
        return self.arrays[key]

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self):
        return len(self.arrays)

    def shape(self, key):
        return np.shape(self.arrays[key])


def test_views_are_lazy(tiny):
    _, path, _ = tiny["sdxl"]
    state = CountingState(load_file(str(path)))
    detected = ol.detect(ol.shapes(state))
    parts = ol.components(state, detected)
    for view in parts.views().values():
        for k in view:
            view.shape(k)
    assert state.reads == 0
    ol.leftovers(state, parts)
    assert state.reads == 0
    q = parts.text_encoder_2["text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert state.reads == 1
    fused = state.arrays[ol.OPENCLIP_SDXL + "transformer.resblocks.0.attn.in_proj_weight"]
    assert np.shares_memory(q, fused)  # a slice of the source, not a copy


# ----------------------------------------------------------------------------------------------------------------
# Real-size layouts, shape only


def meta_parts(configs) -> dict[str, dict[str, ShapeOnly]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def shapes_of(module):
        return {k: ShapeOnly(v.shape) for k, v in module.state_dict().items()}

    def text_config(d):
        return CLIPTextConfig.from_dict(d)

    with torch.device("meta"):
        parts = {"unet": shapes_of(UNet2DConditionModel.from_config(configs.unet)),
                 "vae": shapes_of(AutoencoderKL.from_config(configs.vae))}
        if configs.text_encoder is not None:
            parts["text_encoder"] = shapes_of(CLIPTextModel(text_config(configs.text_encoder)))
        if configs.text_encoder_2 is not None:
            parts["text_encoder_2"] = shapes_of(CLIPTextModelWithProjection(text_config(configs.text_encoder_2)))
    return parts


class ShapeState(Mapping):
    """A real-size checkpoint without data: any read fails."""

    def __init__(self, table):
        self.table = table

    def __getitem__(self, key):
        raise AssertionError(f"data of {key} read")

    def __iter__(self):
        return iter(self.table)

    def __len__(self):
        return len(self.table)

    def shape(self, key):
        return self.table[key].shape


REAL = {  # config name -> (family, prediction_type, prediction_known, detect keyword arguments)
    "sd15": ("sd1", "epsilon", True, {}),
    "sd15-inpainting": ("sd1-inpainting", "epsilon", True, {}),
    "sd21": ("sd2", "v_prediction", False, {}),
    "sd21-base": ("sd2", "epsilon", True, {"global_step": ol.SD2_BASE_GLOBAL_STEP}),
    "sd2-inpainting": ("sd2-inpainting", "epsilon", True, {}),
    "sdxl": ("sdxl", "epsilon", True, {}),
    "sdxl-refiner": ("sdxl-refiner", "epsilon", True, {}),
    "x4-upscaler": ("x4-upscaler", "v_prediction", True, {}),
}


@pytest.mark.parametrize("config_name", ol.CONFIG_NAMES)
def test_real_layouts(config_name):
    assert set(REAL) == set(ol.CONFIG_NAMES)
    family, prediction, known, kwargs = REAL[config_name]
    configs = ol.builtin_configs(config_name)
    parts = meta_parts(configs)
    table = original_state(family, parts, configs.unet["layers_per_block"])
    keys_and_shapes = {k: v.shape for k, v in table.items()}
    detected = ol.detect(keys_and_shapes, **kwargs)
    assert (detected.family, detected.config_name, detected.prediction_type, detected.prediction_known) == (
        family, config_name, prediction, known), detected.how
    assert not detected.has_ema
    # the mapping at full size: names and shapes of every component, from shapes alone
    state = ShapeState(table)
    views = ol.components(state, detected).views()
    assert sorted(views) == sorted(parts)
    for part, want in parts.items():
        want = text_model_names(want) if part.startswith("text_encoder") else want
        assert sorted(views[part]) == sorted(want), (part, sorted(set(views[part]) ^ set(want))[:10])
        for k, v in want.items():
            assert views[part].shape(k) == v.shape, (part, k)
    assert ol.leftovers(state, ol.components(state, detected)) == []

    # a UNet-only file: decided by the context width (the upscaler by its label_emb)
    unet_only = {k: v for k, v in keys_and_shapes.items() if k.startswith(ol.UNET)}
    assert ol.detect(unet_only, **kwargs).config_name == config_name


def test_real_sd2_text_encoder_drops_block_23_as_diffusers():
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE

    configs = ol.builtin_configs("sd21")
    table = openclip_to_original(meta_parts(configs)["text_encoder"], ol.OPENCLIP_SD2, extra_block=True)
    parts = ol.components(ShapeState(table), ol.Detected("sd2", "sd21", "v_prediction", False, False, ""))
    assert sorted(parts.ignored) == sorted([*SD_2_TEXT_ENCODER_KEYS_TO_IGNORE, ol.OPENCLIP_SD2 + "logit_scale"])
    assert len(parts.text_encoder) == len(meta_parts(configs)["text_encoder"])


# ----------------------------------------------------------------------------------------------------------------
# Detection details and errors


def tiny_sd_shapes(tiny, family):
    return ol.shapes(load_file(str(tiny[family][1])))


def test_prediction_markers_and_global_step(tiny):
    shapes = tiny_sd_shapes(tiny, "sd2")
    d = ol.detect(shapes)
    assert (d.config_name, d.prediction_type, d.prediction_known) == ("sd21", "v_prediction", False)
    assert "prediction_type='epsilon'" in d.how and "sd21-base" in d.how and "\n" not in d.how
    d = ol.detect(shapes, global_step=ol.SD2_BASE_GLOBAL_STEP)
    assert (d.config_name, d.prediction_type, d.prediction_known) == ("sd21-base", "epsilon", True)
    d = ol.detect({**shapes, ol.V_PRED_MARKER: (0,)})
    assert (d.prediction_type, d.prediction_known) == ("v_prediction", True) and "v_pred" in d.how
    d = ol.detect({**tiny_sd_shapes(tiny, "sd1"), ol.V_PRED_MARKER: (0,), ol.ZTSNR_MARKER: (0,)})
    assert (d.family, d.prediction_type, d.zero_terminal_snr) == ("sd1", "v_prediction", True)


def test_markers_are_ignored_not_left_over(tiny):
    state = load_file(str(tiny["sd1"][1]))
    state[ol.V_PRED_MARKER] = np.zeros((0,), np.float32)
    parts = ol.components(state, ol.detect(ol.shapes(state)))
    assert ol.leftovers(state, parts) == []


def test_unknown_keys_are_left_over(tiny):
    state = load_file(str(tiny["sd1"][1]))
    extra = {"control_model.input_hint_block.0.weight": np.zeros((1,), np.float32),
             "model.diffusion_model.unknown.weight": np.zeros((1,), np.float32),
             "first_stage_model.encoder.down.0.attn.0.q.weight": np.zeros((1,), np.float32)}
    state.update(extra)
    assert ol.leftovers(state, ol.components(state, ol.detect(ol.shapes(state)))) == sorted(extra)


def test_clip_without_text_model_prefix(tiny):
    """Files saved with old transformers have `cond_stage_model.transformer.embeddings...` (no `text_model.`)."""
    state = load_file(str(tiny["sd1"][1]))
    want = ol.components(state, ol.detect(ol.shapes(state))).text_encoder
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}
    parts = ol.components(old, ol.detect(ol.shapes(old)))
    assert_same(parts.text_encoder, want, "no text_model. prefix")
    assert ol.leftovers(old, parts) == []


def test_penultimate_drops_the_last_block_whatever_the_depth():
    rng = np.random.default_rng(0)
    te = {f"text_model.encoder.layers.{n}.{sub}.{p}": rng.standard_normal((8, 8) if p == "weight" else (8,))
          for n in range(2) for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.out_proj", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
    te.update({f"text_model.encoder.layers.{n}.layer_norm{i}.{p}": rng.standard_normal(8)
               for n in range(2) for i in (1, 2) for p in ("weight", "bias")})
    te.update({"text_model.embeddings.position_embedding.weight": rng.standard_normal((77, 8)),
               "text_model.embeddings.token_embedding.weight": rng.standard_normal((10, 8)),
               "text_model.final_layer_norm.weight": rng.standard_normal(8),
               "text_model.final_layer_norm.bias": rng.standard_normal(8)})
    table = openclip_to_original(te, ol.OPENCLIP_SD2, extra_block=True, rng=rng)
    view = ol.components(table, ol.Detected("sd2", "sd21", "v_prediction", False, False, "")).text_encoder
    assert_same(view, te, "2 layers + a dropped third")


def test_unsupported_files(tiny):
    with pytest.raises(ol.UnsupportedCheckpoint, match="no Stable Diffusion UNet"):
        ol.detect({"transformer.blocks.0.weight": (4, 4)})
    shapes = tiny_sd_shapes(tiny, "sd1")
    conv_in = ol.UNET + "input_blocks.0.0.weight"
    with pytest.raises(ol.UnsupportedCheckpoint, match="instruct-pix2pix"):
        ol.detect({**shapes, conv_in: (32, 8, 3, 3)})
    xl = tiny_sd_shapes(tiny, "sdxl")
    with pytest.raises(ol.UnsupportedCheckpoint, match="SDXL inpainting"):
        ol.detect({**xl, conv_in: (32, 9, 3, 3)})
    unet_only = {k: v for k, v in shapes.items() if k.startswith(ol.UNET)}  # tiny width 32: neither 768 nor 1024
    with pytest.raises(ol.UnsupportedCheckpoint, match="cannot tell SD1 from SD2"):
        ol.detect(unet_only)
    with pytest.raises(ValueError, match="unknown config name"):
        ol.builtin_configs("sd3")


# ----------------------------------------------------------------------------------------------------------------
# Built-in configs


@pytest.mark.parametrize("config_name", ol.CONFIG_NAMES)
def test_builtin_configs_parse(config_name):
    from sdjax import samplers
    from sdjax.models.clip import CLIPTextConfig
    from sdjax.models.unet import UNetConfig
    from sdjax.models.vae import VAEConfig

    c = ol.builtin_configs(config_name)
    UNetConfig.from_dict(c.unet)
    VAEConfig.from_dict(c.vae)
    for te in (c.text_encoder, c.text_encoder_2):
        if te is not None:
            CLIPTextConfig.from_dict(te)
    for sched in (c.scheduler, c.low_res_scheduler):
        if sched is not None:
            samplers.SchedulerConfig.from_dict(sched)
            getattr(diffusers, sched["_class_name"]).from_config(sched)
    index = c.model_index()
    assert index["_class_name"] == c.pipeline_class
    family, prediction, _, _ = REAL[config_name]
    assert c.scheduler.get("prediction_type", "epsilon") == (
        "v_prediction" if config_name in ("sd21", "x4-upscaler") else "epsilon")
    if family == "sdxl":
        assert (index["force_zeros_for_empty_prompt"], index["requires_aesthetics_score"]) == (True, False)
    if family == "sdxl-refiner":
        assert c.text_encoder is None and index["text_encoder"] == [None, None]
        assert (index["force_zeros_for_empty_prompt"], index["requires_aesthetics_score"]) == (False, True)
    if family == "x4-upscaler":
        assert index["max_noise_level"] == 350 and c.low_res_scheduler["_class_name"] == "DDPMScheduler"
    assert ol.builtin_configs(config_name).unet is not c.unet  # fresh dicts


def test_prediction_type_override():
    c = ol.builtin_configs("sd21", prediction_type="epsilon")
    assert c.scheduler["prediction_type"] == "epsilon" and c.scheduler["_class_name"] == "DDIMScheduler"
    assert ol.builtin_configs("sd15", prediction_type="v_prediction").scheduler["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        ol.builtin_configs("sd15", prediction_type="sample")
    with pytest.raises(ValueError, match="unknown family"):
        ol.Detected("sd3", "sd15", "epsilon", True, False, "")
    with pytest.raises(ValueError, match="unknown config name"):
        ol.Detected("sd1", "sd14", "epsilon", True, False, "")
