"""sdjax.original_layout: the original (CompVis / SGM) single-file layout mapped onto diffusers names.

Tiny random diffusers pipelines are written as original-layout single files by a writer in this file (the inverse
mapping). The writer is trusted because diffusers' own `from_single_file(path, config=folder)` loads each file back
to exactly the folder's weights; then sdjax's lazy views must give exactly the same tensors (bitwise) with nothing
left over. Detection is also checked on shape-only tables of the real-size layouts (models built on the meta device
from the real configs in sdjax/model_configs).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from sdjax import original_layout as ol  # noqa: E402

from single_file_fixtures import (  # noqa: E402
    KINDS, ShapeOnly, config_only, openclip_to_original, original_state, text_model_names, write_single_files,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (folder, single file, {component: the folder's state dict})."""
    return write_single_files(tmp_path_factory.mktemp("single_file"))


def assert_same(got: Mapping, want: Mapping, what: str):
    assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want))[:10])
    for k in want:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert a.dtype == b.dtype and a.shape == b.shape, (what, k, a.dtype, a.shape, b.dtype, b.shape)
        assert np.array_equal(a, b), (what, k)


# ----------------------------------------------------------------------------------------------------------------
# Round trips


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


class ReleaseSpy(Mapping):
    """A `formats.StateDict` that records which keys its loader releases."""

    def __init__(self, state):
        self.state, self.released = state, []

    def __getitem__(self, key):
        return self.state[key]

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)

    def shape(self, key):
        return self.state.shape(key)

    def offset(self, key):
        return self.state.offset(key)

    def release(self, key):
        self.released.append(key)
        self.state.release(key)


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_views_load_in_file_order_and_release_each_tensor(tiny, kind, tmp_path):
    """Loading from a single file reads it front to back and drops each tensor's mapped pages after its copy (once per
    source tensor, also for OpenCLIP's fused q/k/v that three parameters read): the process never holds the mapped
    file besides the parameters, as with a folder. Released tensors read the same again."""
    import json

    from sdjax import formats, loading
    from sdjax.models import AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel

    folder, path, weights = tiny["sdxl"]
    if kind == "ckpt":
        arrays = load_file(str(path))
        path = tmp_path / "sdxl.ckpt"
        torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in arrays.items()}}, path)
    spy = ReleaseSpy(formats.read_state_dict(path))
    parts = ol.components(spy, ol.detect(ol.shapes(spy))).views()
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    for part, view in parts.items():
        order = sorted(view, key=view.offset)
        starts = [spy.state.ref(view.ref(k).key).storage.offset() for k in order]
        assert starts == sorted(starts) and len(set(starts)) == len(view.source_keys())
        spy.released.clear()
        cls = classes[part]
        model = cls.abstract(json.loads((folder / part / "config.json").read_text()))
        loading.load_state(model, view, renames=cls.checkpoint_key_renames, ignored=cls.ignored_checkpoint_keys,
                           name=f"{kind} {part}")
        assert sorted(spy.released) == sorted(view.source_keys()), part
        want = text_model_names(weights[part]) if part.startswith("text_encoder") else weights[part]
        assert_same(view, want, f"{kind} {part} after release")
    assert any(ref.op == ol.THIRD for ref in (parts["text_encoder_2"].ref(k) for k in parts["text_encoder_2"]))


def test_views_over_a_plain_dict_keep_table_order():
    view = ol.ComponentView("x", {"b": np.zeros(2), "a": np.ones(3)}, {"n1": ol.Ref("b"), "n0": ol.Ref("a")})
    assert sorted(view, key=view.offset) == ["n1", "n0"]
    view.release("n1")  # the source has no pages to drop: nothing happens


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
