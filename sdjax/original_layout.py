"""The original single-file checkpoint layout (CompVis latent diffusion, Stability's SGM) and how it maps onto the
diffusers component names that sdjax's loaders read.

A single-file checkpoint (`v1-5-pruned-emaonly.safetensors`, `v2-1_768-ema-pruned.ckpt`, `sd_xl_base_1.0.safetensors`,
...) is one flat `{name: tensor}` table holding every network under a prefix:

| prefix                                 | component       | family                               |
|----------------------------------------|-----------------|--------------------------------------|
| `model.diffusion_model.`               | unet            | all                                  |
| `model_ema.` + unet key without dots   | unet (EMA copy) | training checkpoints                 |
| `first_stage_model.`                   | vae             | all                                  |
| `cond_stage_model.transformer.`        | text_encoder    | SD1 (CLIP ViT-L/14)                  |
| `cond_stage_model.model.`              | text_encoder    | SD2, x4 upscaler (OpenCLIP ViT-H/14) |
| `conditioner.embedders.0.transformer.` | text_encoder    | SDXL base (CLIP ViT-L/14)            |
| `conditioner.embedders.1.model.`       | text_encoder_2  | SDXL base (OpenCLIP ViT-bigG/14)     |
| `conditioner.embedders.0.model.`       | text_encoder_2  | SDXL refiner (OpenCLIP ViT-bigG/14)  |

The functions work on any `Mapping[str, np.ndarray]` (this module reads no file):

- `detect(shapes)` names the family from key names and shapes only (`Detected`).
- `components(state, detected)` gives one lazy view per component (`Components`): a `Mapping` from the diffusers /
  transformers parameter name to the array, computed on access from the source (a slice of OpenCLIP's fused
  `in_proj_weight`, a transposed `text_projection`, the VAE attention's 1x1 conv weight seen as a linear weight).
  Nothing is copied; `view.shape(key)` needs only the source's shape. `leftovers(state, components)` names the
  source keys that no view uses and no documented rule (`IGNORED`, plus the per-file rules in `Components.ignored`)
  skips.
- `builtin_configs(config_name)` gives the diffusers-style configs of a family (`ComponentConfigs`): the original
  files carry no config, so a detected family picks one of these.

Text encoders are named as transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` with the `text_model.`
prefix, as in every SD text_encoder folder (sdjax's CLIP loaders also read the bare names transformers >= 5 save).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

UNET = "model.diffusion_model."
EMA = "model_ema."
VAE = "first_stage_model."
CLIP_SD1 = "cond_stage_model.transformer."
OPENCLIP_SD2 = "cond_stage_model.model."
CLIP_SDXL = "conditioner.embedders.0.transformer."
OPENCLIP_SDXL = "conditioner.embedders.1.model."
OPENCLIP_REFINER = "conditioner.embedders.0.model."

FAMILIES = ("sd1", "sd1-inpainting", "sd2", "sd2-inpainting", "sdxl", "sdxl-refiner", "x4-upscaler")
PREDICTION_TYPES = ("epsilon", "v_prediction")
CONFIG_NAMES = ("sd15", "sd15-inpainting", "sd21", "sd21-base", "sd2-inpainting", "sdxl", "sdxl-refiner",
                "x4-upscaler")

# Marker keys some tools add (ComfyUI writes an empty `v_pred` tensor into v-prediction checkpoints and `ztsnr`
# into zero-terminal-SNR ones).
V_PRED_MARKER = "v_pred"
ZTSNR_MARKER = "ztsnr"

# The global step the SD 2.0/2.1 512-base (epsilon) checkpoints were saved at; diffusers' only eps-vs-v rule for SD2.
SD2_BASE_GLOBAL_STEP = 875000

_DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", r"sqrt_\w+", "log_one_minus_alphas_cumprod",
                 r"posterior_\w+", "logvar", "lvlb_weights")

# Source keys that belong to no component, each with the reason it is safe to skip (regular expressions matched
# against the whole key).
IGNORED: tuple[tuple[str, str], ...] = (
    ("(" + "|".join(_DDPM_BUFFERS) + ")", "DDPM training buffer: sdjax takes the schedule from the scheduler config"),
    (r"low_scale_model\..+", "x4 upscaler noise-augmentation buffers: the low_res_scheduler config has them"),
    (r"denoiser\.(sigmas|log_sigmas)", "SGM denoiser buffer: the scheduler config has the schedule"),
    (r"model_ema\.(decay|num_updates)", "EMA bookkeeping"),
    (r"(cond_stage_model\.transformer|conditioner\.embedders\.0\.transformer)\.(text_model\.)?embeddings\.position_ids",
     "CLIP position-id buffer (0..76)"),
    (r"(cond_stage_model|conditioner\.embedders\.[01])\.model\.(logit_scale|attn_mask)",
     "OpenCLIP contrastive temperature / causal-mask buffer: unused for text encoding"),
    (f"({V_PRED_MARKER}|{ZTSNR_MARKER})", "marker key, read by detect"),
)
_IGNORED = [(re.compile(p), why) for p, why in IGNORED]

NOT_EMA = "non-EMA UNet weights: extract_ema=True uses the EMA copy"
EMA_UNUSED = "EMA UNet weights: pass extract_ema=True to use them"
PENULTIMATE = "SD2 / x4 text encoder: the conditioning is the penultimate layer, the last block never runs"
NO_PROJECTION = "SD2 / x4 text encoder: CLIPTextModel has no text_projection (the conditioning is the hidden states)"


class UnsupportedCheckpoint(ValueError):
    """The file is not one of the single-file layouts this module knows."""


# ----------------------------------------------------------------------------------------------------------------
# Detection


@dataclasses.dataclass(frozen=True)
class Detected:
    """What a single-file checkpoint is.

    family: one of FAMILIES; config_name: the `builtin_configs` name to build it with; prediction_type: "epsilon" or
    "v_prediction" (replaces the built-in scheduler config's); prediction_known: False when the file does not say
    and `prediction_type` is the documented default (SD2); has_ema: every UNet weight has a `model_ema.` copy;
    zero_terminal_snr: the file carries ComfyUI's `ztsnr` marker; how: one line naming the keys that decided and how
    to override.
    """

    family: str
    config_name: str
    prediction_type: str
    prediction_known: bool
    has_ema: bool
    how: str
    zero_terminal_snr: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.config_name not in CONFIG_NAMES:
            raise ValueError(f"unknown config name {self.config_name!r}; built-in: {', '.join(CONFIG_NAMES)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")


def shapes(state: Mapping[str, np.ndarray]) -> dict[str, tuple]:
    """{key: shape} of a state mapping, from its `.shape(key)` when it has one (no tensor is read)."""
    return {k: _source_shape(state, k) for k in state}


def ema_key(unet_key: str) -> str:
    """The EMA copy of a `model.diffusion_model.*` key: `model_ema.` + the key without `model.` and without dots
    (LitEma's naming, as diffusers reads it)."""
    return EMA + "".join(unet_key.split(".")[1:])


def _has_prefix(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect(keys_and_shapes: Mapping[str, tuple], *, global_step: int | None = None) -> Detected:
    """The family of a single-file checkpoint from its key names and shapes.

    Rules (diffusers' `infer_diffusers_model_type`, extended to files without a text encoder and to tiny models):
    UNet input channels from `model.diffusion_model.input_blocks.0.0.weight` (9: inpainting, 7 with the noise-level
    class embedding `label_emb.weight`: x4 upscaler); SDXL by its `conditioner.embedders.*` text encoders or its
    `label_emb.0.0` add-embedding, base (`conditioner.embedders.1.model.*`, context width 2048) vs refiner
    (`conditioner.embedders.0.model.*`, width 1280); SD2 vs SD1 by the text encoder layout (OpenCLIP
    `cond_stage_model.model.*` vs CLIP `cond_stage_model.transformer.*`), else by the cross-attention context width
    (`...attn2.to_k.weight` shape[1]: 1024 vs 768).

    SD2 files do not record epsilon vs v-prediction: `global_step` 875000 (pass the `.ckpt`'s top-level value when
    the reader has it) means the 512-base epsilon model (diffusers' rule); otherwise the 768 v-prediction SD2.1
    model is assumed, with `prediction_known=False`. ComfyUI's `v_pred` key means v-prediction for any family.
    """
    keys = keys_and_shapes
    conv_in = UNET + "input_blocks.0.0.weight"
    if conv_in not in keys:
        raise UnsupportedCheckpoint(
            f"no Stable Diffusion UNet in the original layout ({conv_in} is missing); "
            f"{len(keys)} keys, e.g. {', '.join(sorted(keys)[:3])}")
    in_channels = int(keys[conv_in][1])
    to_k = sorted(k for k in keys if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    width = int(keys[to_k[0]][1]) if to_k else None
    width_text = f"context width {width} ({to_k[0]})" if to_k else "no cross-attention"
    v_marker = V_PRED_MARKER in keys
    unet_keys = [k for k in keys if k.startswith(UNET)]
    has_ema = all(ema_key(k) in keys for k in unet_keys)
    channels = f"UNet in_channels {in_channels} ({conv_in})"

    def unsupported(what):
        return UnsupportedCheckpoint(f"{what}: {channels}, {width_text}; supported families: {', '.join(FAMILIES)}")

    prediction, known, why_pred = "epsilon", True, "the family's"
    if _has_prefix(keys, "conditioner.embedders.") or UNET + "label_emb.0.0.weight" in keys:
        if in_channels != 4:
            raise unsupported("an SDXL UNet with other than 4 input channels (SDXL inpainting?) has no built-in config")
        if _has_prefix(keys, OPENCLIP_SDXL):
            family, why = "sdxl", f"OpenCLIP bigG text encoder 2 at {OPENCLIP_SDXL}*"
        elif _has_prefix(keys, OPENCLIP_REFINER):
            family, why = "sdxl-refiner", f"OpenCLIP bigG alone at {OPENCLIP_REFINER}*"
        elif width == 1280:
            family, why = "sdxl-refiner", f"SDXL UNet (label_emb.0.0) only, {width_text}"
        elif width == 2048:
            family, why = "sdxl", f"SDXL UNet (label_emb.0.0) only, {width_text}"
        else:
            raise unsupported("an SDXL-style UNet (label_emb.0.0) with no text encoder and an unknown context width")
        config = family
    elif in_channels == 7 and UNET + "label_emb.weight" in keys:
        family, config = "x4-upscaler", "x4-upscaler"
        why = f"noise-level class embedding {UNET}label_emb.weight and 7 input channels"
        prediction, why_pred = "v_prediction", "the x4 upscaler's"
    else:
        if _has_prefix(keys, OPENCLIP_SD2):
            sd2, why = True, f"OpenCLIP ViT-H text encoder at {OPENCLIP_SD2}*"
        elif _has_prefix(keys, CLIP_SD1):
            sd2, why = False, f"CLIP ViT-L text encoder at {CLIP_SD1}*"
        elif width in (768, 1024):
            sd2, why = width == 1024, f"no text encoder, {width_text}"
        else:
            raise unsupported("cannot tell SD1 from SD2: no text encoder and an unknown context width")
        if in_channels not in (4, 9):
            raise unsupported(f"a UNet with {in_channels} input channels (instruct-pix2pix has 8) has no built-in "
                              "config")
        inpaint = in_channels == 9
        family = ("sd2" if sd2 else "sd1") + ("-inpainting" if inpaint else "")
        if not sd2:
            config = "sd15-inpainting" if inpaint else "sd15"
        elif inpaint:
            config = "sd2-inpainting"
        elif global_step == SD2_BASE_GLOBAL_STEP:
            config, why_pred = "sd21-base", f"global_step {global_step} is the 512-base checkpoint's"
        else:
            config, prediction, known = "sd21", "v_prediction", False
            why_pred = ("assumed: SD2 files do not record it; the 768 SD2.1 model is v_prediction, pass "
                        "prediction_type='epsilon' and config 'sd21-base' for a 512-base file")
    if v_marker:
        prediction, known, why_pred = "v_prediction", True, f"the '{V_PRED_MARKER}' marker key"
    ztsnr = ZTSNR_MARKER in keys
    how = (f"{family} ({why}); {channels}; config {config}; prediction_type {prediction} ({why_pred})"
           f"{'; zero-terminal-SNR marker ' + repr(ZTSNR_MARKER) if ztsnr else ''}"
           f"; EMA weights {'present (extract_ema=True uses them)' if has_ema else 'absent'}"
           "; override with an explicit config name / prediction_type")
    return Detected(family, config, prediction, known, has_ema, how, ztsnr)


# ----------------------------------------------------------------------------------------------------------------
# Lazy component views

COPY = "copy"
TRANSPOSE = "transpose"  # OpenCLIP text_projection (width, proj) -> Linear weight (proj, width)
SQUEEZE = "squeeze"  # VAE attention 1x1 conv (C, C, 1, 1) -> Linear weight (C, C)
THIRD = "third"  # OpenCLIP attn.in_proj (3 D, ...) -> q / k / v (D, ...)


@dataclasses.dataclass(frozen=True)
class Ref:
    """One target tensor: the source key and how it is made from it (`part`: which third, for THIRD)."""

    key: str
    op: str = COPY
    part: int = 0

    def read(self, source: Mapping[str, np.ndarray]) -> np.ndarray:
        a = source[self.key]
        if self.op == COPY:
            return a
        a = np.asarray(a)
        if self.op == TRANSPOSE:
            return a.T
        if self.op == SQUEEZE:
            return a.reshape(a.shape[:2]) if a.ndim > 2 else a
        n = a.shape[0] // 3
        return a[self.part * n:(self.part + 1) * n]

    def shape(self, source_shape: tuple) -> tuple:
        s = tuple(int(d) for d in source_shape)
        if self.op == TRANSPOSE:
            return s[::-1]
        if self.op == SQUEEZE:
            return s[:2] if len(s) > 2 else s
        if self.op == THIRD:
            return (s[0] // 3, *s[1:])
        return s


def _source_shape(source: Mapping[str, np.ndarray], key: str) -> tuple:
    shape_of = getattr(source, "shape", None)
    if callable(shape_of):
        return tuple(shape_of(key))
    return tuple(np.shape(source[key]))  # a plain dict of arrays: the lookup reads nothing


class ComponentView(Mapping[str, np.ndarray]):
    """{diffusers name: array} over a source mapping in the original layout; arrays are made on access (views of
    the source where numpy allows), `shape(key)` reads only the source's shape.

    `offset(key)` and `release(key)` pass the source's (`sdjax.formats.StateDict`: file offsets, and dropping a
    tensor's mapped pages once it is copied) so that a loader reads the file front to back and never holds the mapped
    file besides its copy; over a plain dict they give the table's order and do nothing."""

    def __init__(self, name: str, source: Mapping[str, np.ndarray], table: Mapping[str, Ref]):
        self.name = name
        self._source = source
        self._table = dict(table)
        self._order = {key: i for i, key in enumerate(self._table)}
        # a source key read by several targets (OpenCLIP's fused q/k/v) is released after the last of them
        self._uses = collections.Counter(ref.key for ref in self._table.values())
        self._pending = dict(self._uses)
        self._lock = threading.Lock()

    def __getitem__(self, key: str) -> np.ndarray:
        return self._table[key].read(self._source)

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def shape(self, key: str) -> tuple:
        ref = self._table[key]
        return ref.shape(_source_shape(self._source, ref.key))

    def offset(self, key: str) -> tuple:
        where = getattr(self._source, "offset", None)
        return tuple(where(self._table[key].key)) if callable(where) else (0, self._order[key])

    def release(self, key: str) -> None:
        release = getattr(self._source, "release", None)
        if not callable(release):
            return
        source_key = self._table[key].key
        with self._lock:  # loaders call this from several threads
            self._pending[source_key] -= 1
            last = self._pending[source_key] <= 0
            if last:
                self._pending[source_key] = self._uses[source_key]  # a later load releases again
        if last:
            release(source_key)

    def ref(self, key: str) -> Ref:
        return self._table[key]

    def source_keys(self) -> set[str]:
        return {ref.key for ref in self._table.values()}

    def __repr__(self) -> str:
        return f"<ComponentView {self.name}: {len(self)} tensors>"


@dataclasses.dataclass(frozen=True)
class Components:
    """One lazy view per component (None where the file has none or the family has none); `ignored`: the source
    keys skipped on purpose, each with its reason."""

    unet: ComponentView
    vae: ComponentView | None
    text_encoder: ComponentView | None
    text_encoder_2: ComponentView | None
    ignored: Mapping[str, str]

    def views(self) -> dict[str, ComponentView]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "ignored" and getattr(self, f.name) is not None}

    def used(self) -> set[str]:
        return set().union(*(v.source_keys() for v in self.views().values()))


def components(state: Mapping[str, np.ndarray], detected: Detected, *, extract_ema: bool = False) -> Components:
    """Lazy per-component views of `state` (original layout) named as diffusers / transformers name them.

    extract_ema=True reads the UNet from its `model_ema.` copy (raises if the file has none). Only key names are
    read here; no tensor is touched.
    """
    keys = list(state)
    ignored: dict[str, str] = {}
    if extract_ema and not detected.has_ema:
        raise ValueError("extract_ema=True but the checkpoint has no complete model_ema.* copy of the UNet")
    unet = _unet_table(keys, detected.family)
    if extract_ema:
        unet = {name: Ref(ema_key(ref.key)) for name, ref in unet.items()}
        ignored.update({k: NOT_EMA for k in keys if k.startswith(UNET)})
    else:
        ignored.update({k: EMA_UNUSED for k in keys if k.startswith(EMA)})
    vae = _vae_table(keys) if _has_prefix(keys, VAE) else None

    text_encoder = text_encoder_2 = None
    family = detected.family
    if family in ("sd1", "sd1-inpainting"):
        text_encoder = _clip_table(keys, CLIP_SD1)
    elif family in ("sd2", "sd2-inpainting", "x4-upscaler"):
        text_encoder = _openclip_table(keys, OPENCLIP_SD2, penultimate=True, projection=False, ignored=ignored)
    elif family == "sdxl":
        text_encoder = _clip_table(keys, CLIP_SDXL)
        text_encoder_2 = _openclip_table(keys, OPENCLIP_SDXL, penultimate=False, projection=True, ignored=ignored)
    elif family == "sdxl-refiner":
        text_encoder_2 = _openclip_table(keys, OPENCLIP_REFINER, penultimate=False, projection=True, ignored=ignored)
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")

    for k in keys:
        if k not in ignored:
            for pattern, why in _IGNORED:
                if pattern.fullmatch(k):
                    ignored[k] = why
                    break

    def view(name, table):
        return ComponentView(name, state, table) if table else None

    return Components(
        unet=ComponentView("unet", state, unet), vae=view("vae", vae), text_encoder=view("text_encoder", text_encoder),
        text_encoder_2=view("text_encoder_2", text_encoder_2), ignored=ignored)


def leftovers(state: Mapping[str, np.ndarray], components: Components) -> list[str]:
    """Source keys that no component uses and no rule skips (sorted): what the caller should report."""
    used = components.used()
    return sorted(k for k in state if k not in used and k not in components.ignored)


# UNet: input_blocks.0 is conv_in; then per level `layers_per_block` [resnet, attention?] entries and (except in the
# last level) one downsampler entry; output_blocks mirror it with layers_per_block + 1 entries per level, the last
# holding the upsampler; middle_block is resnet, attention, resnet.
_UNET_FIXED = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb": "class_embedding",  # x4 upscaler: nn.Embedding of the noise level
}
_SDXL_ADD_EMBEDDING = {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)")
_MIDDLE = re.compile(r"middle_block\.(\d+)\.(.+)")


def _rename(rest: str, table: Mapping[str, str]) -> str | None:
    head, _, param = rest.rpartition(".")
    new = table.get(head)
    return f"{new}.{param}" if new else None


def _unet_table(keys: list[str], family: str) -> dict[str, Ref]:
    rels = [k[len(UNET):] for k in keys if k.startswith(UNET)]
    downsamplers = sorted(int(m.group(2)) for r in rels if (m := _BLOCK.fullmatch(r))
                          and m.group(1) == "input_blocks" and m.group(4).startswith("op."))
    inputs = [int(m.group(2)) for r in rels if (m := _BLOCK.fullmatch(r)) and m.group(1) == "input_blocks"]
    per_level = downsamplers[0] if downsamplers else max(inputs, default=0) + 1  # layers_per_block + 1
    fixed = dict(_UNET_FIXED, **(_SDXL_ADD_EMBEDDING if family.startswith("sdxl") else {}))
    table = {}
    for rel in rels:
        name = _unet_name(rel, per_level, fixed)
        if name is not None:
            table[name] = Ref(UNET + rel)
    return table


UNET_RESNET_LAYERS = tuple(_UNET_RESNET)  # a resnet entry's layers in the original layout ("in_layers.2", ...)


def unet_module_name(original: str, layers_per_block: int, *, sdxl: bool) -> str | None:
    """The diffusers module path of a UNet module named in the original layout, relative to `model.diffusion_model.`
    ("input_blocks.4.1.proj_in" -> "down_blocks.1.attentions.0.proj_in", "out.2" -> "conv_out"); None where the name
    is no module of that layout. What follows an attention entry is passed through as it is (its names are already
    diffusers'). sdxl: `label_emb.0.*` is SDXL's add-embedding."""
    fixed = dict(_UNET_FIXED, **(_SDXL_ADD_EMBEDDING if sdxl else {}))
    name = _unet_name(original + ".weight", layers_per_block + 1, fixed)
    return None if name is None else name[:-len(".weight")]


def _unet_name(rel: str, per_level: int, fixed: Mapping[str, str]) -> str | None:
    head, _, param = rel.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{param}"
    if m := _MIDDLE.fullmatch(rel):
        i, rest = int(m.group(1)), m.group(2)
        if i == 1:
            return f"mid_block.attentions.0.{rest}"
        resnet = _rename(rest, _UNET_RESNET)
        return f"mid_block.resnets.{i // 2}.{resnet}" if i in (0, 2) and resnet else None
    m = _BLOCK.fullmatch(rel)
    if m is None:
        return None
    where, i, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if where == "input_blocks":
        if i == 0:
            return None
        level, pos = divmod(i - 1, per_level)
        block = f"down_blocks.{level}"
        if pos == per_level - 1:  # the downsampler entry
            return f"{block}.downsamplers.0.conv.{rest[3:]}" if j == 0 and rest.startswith("op.") else None
    else:
        level, pos = divmod(i, per_level)
        block = f"up_blocks.{level}"
        if rest.startswith("conv.") and j in (1, 2) and pos == per_level - 1:
            return f"{block}.upsamplers.0.{rest}"
    if j == 0:
        resnet = _rename(rest, _UNET_RESNET)
        return f"{block}.resnets.{pos}.{resnet}" if resnet else None
    if j == 1:
        return f"{block}.attentions.{pos}.{rest}"
    return None


# VAE: encoder.down.i / decoder.up.i (the decoder's up list is stored in reverse: up.0 runs last), mid.block_1,
# mid.attn_1, mid.block_2, norm_out; the mid attention's q/k/v/proj_out are 1x1 convs.
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": ("group_norm", COPY), "q": ("to_q", SQUEEZE), "k": ("to_k", SQUEEZE),
                  "v": ("to_v", SQUEEZE), "proj_out": ("to_out.0", SQUEEZE)}
_VAE_FIXED = {"encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv",
              "post_quant_conv"}
_VAE_BLOCK = re.compile(r"(encoder)\.down\.(\d+)\.(.+)|(decoder)\.up\.(\d+)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)")


def _vae_table(keys: list[str]) -> dict[str, Ref]:
    rels = [k[len(VAE):] for k in keys if k.startswith(VAE)]
    ups = {int(m.group(5)) for r in rels if (m := _VAE_BLOCK.fullmatch(r)) and m.group(4)}
    n_up = max(ups, default=-1) + 1
    table = {}
    for rel in rels:
        name, op = _vae_name(rel, n_up)
        if name is not None:
            table[name] = Ref(VAE + rel, op)
    return table


def _vae_name(rel: str, n_up: int) -> tuple[str | None, str]:
    head, _, param = rel.rpartition(".")
    if head in _VAE_FIXED:
        return rel, COPY
    if head in ("encoder.norm_out", "decoder.norm_out"):
        return f"{head.split('.')[0]}.conv_norm_out.{param}", COPY
    m = _VAE_MID.fullmatch(rel)
    if m:
        part, what, rest = m.groups()
        if what == "attn_1":
            sub, _, p = rest.rpartition(".")
            if sub not in _VAE_ATTENTION:
                return None, COPY
            new, op = _VAE_ATTENTION[sub]
            return f"{part}.mid_block.attentions.0.{new}.{p}", op if p == "weight" else COPY
        resnet = _rename(rest, _VAE_RESNET)
        return (f"{part}.mid_block.resnets.{int(what[-1]) - 1}.{resnet}" if resnet else None), COPY
    m = _VAE_BLOCK.fullmatch(rel)
    if m is None:
        return None, COPY
    if m.group(1):
        part, i, rest, blocks, sampler = "encoder", int(m.group(2)), m.group(3), "down_blocks", ("downsample",
                                                                                               "downsamplers")
    else:
        part, i, rest, blocks, sampler = "decoder", n_up - 1 - int(m.group(5)), m.group(6), "up_blocks", ("upsample",
                                                                                                       "upsamplers")
    prefix = f"{part}.{blocks}.{i}"
    if rest.startswith(f"{sampler[0]}.conv."):
        return f"{prefix}.{sampler[1]}.0.{rest[len(sampler[0]) + 1:]}", COPY
    bm = re.fullmatch(r"block\.(\d+)\.(.+)", rest)
    if bm:
        resnet = _rename(bm.group(2), _VAE_RESNET)
        return (f"{prefix}.resnets.{bm.group(1)}.{resnet}" if resnet else None), COPY
    return None, COPY


def _clip_table(keys: list[str], prefix: str) -> dict[str, Ref]:
    """CLIP ViT-L/14 as saved by transformers inside the original model: strip the prefix (older transformers saved
    no `text_model.`: add it)."""
    table = {}
    for k in keys:
        if not k.startswith(prefix) or k.endswith("embeddings.position_ids"):
            continue
        rel = k[len(prefix):]
        table[rel if rel.startswith("text_model.") else "text_model." + rel] = Ref(k)
    return table


_OPENCLIP_FIXED = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def _openclip_table(keys: list[str], prefix: str, *, penultimate: bool, projection: bool,
                    ignored: dict[str, str]) -> dict[str, Ref]:
    """OpenCLIP's text tower as transformers' CLIPTextModel(WithProjection): fused q/k/v split in thirds, the
    (width, proj) text_projection transposed into a Linear weight; `penultimate`: drop the last block (SD2, as
    diffusers' conversion of the 24-block ViT-H does)."""
    rels = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    blocks = [int(m.group(1)) for r in rels if (m := _RESBLOCK.fullmatch(r))]
    last = max(blocks, default=None)
    table = {}
    for rel, key in rels.items():
        if rel in _OPENCLIP_FIXED:
            table[_OPENCLIP_FIXED[rel]] = Ref(key)
        elif rel == "text_projection":
            if projection:
                table["text_projection.weight"] = Ref(key, TRANSPOSE)
            else:
                ignored[key] = NO_PROJECTION
        elif m := _RESBLOCK.fullmatch(rel):
            n, rest = int(m.group(1)), m.group(2)
            if penultimate and n == last:
                ignored[key] = PENULTIMATE
                continue
            layer = f"text_model.encoder.layers.{n}"
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                param = rest.rpartition("_")[2]
                for part, qkv in enumerate("qkv"):
                    table[f"{layer}.self_attn.{qkv}_proj.{param}"] = Ref(key, THIRD, part)
            elif (name := _rename(rest, _OPENCLIP_LAYER)) is not None:
                table[f"{layer}.{name}"] = Ref(key)
    return table


# ----------------------------------------------------------------------------------------------------------------
# Built-in configs

CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclasses.dataclass(frozen=True)
class ComponentConfigs:
    """The diffusers-style configs of one model family (config.json / scheduler_config.json dicts) and its
    model_index.json flags; None where the family has no such part."""

    pipeline_class: str
    unet: dict
    vae: dict
    text_encoder: dict | None
    text_encoder_2: dict | None
    scheduler: dict
    low_res_scheduler: dict | None = None
    force_zeros_for_empty_prompt: bool | None = None
    requires_aesthetics_score: bool | None = None
    max_noise_level: int | None = None

    def model_index(self) -> dict:
        """A diffusers model_index.json dict for these parts."""
        index = {"_class_name": self.pipeline_class}
        parts = {
            "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
            "scheduler": ("diffusers", self.scheduler["_class_name"]),
            "text_encoder": ("transformers", "CLIPTextModel") if self.text_encoder else (None, None),
            "tokenizer": ("transformers", "CLIPTokenizer") if self.text_encoder else (None, None),
        }
        if self.text_encoder_2 is not None:
            parts["text_encoder_2"] = ("transformers", "CLIPTextModelWithProjection")
            parts["tokenizer_2"] = ("transformers", "CLIPTokenizer")
        if self.low_res_scheduler is not None:
            parts["low_res_scheduler"] = ("diffusers", self.low_res_scheduler["_class_name"])
        index.update({k: list(v) for k, v in parts.items()})
        for flag in ("force_zeros_for_empty_prompt", "requires_aesthetics_score", "max_noise_level"):
            if getattr(self, flag) is not None:
                index[flag] = getattr(self, flag)
        return index


def _read(name: str, **overrides) -> dict:
    return {**json.loads((CONFIG_DIR / name).read_text()), **overrides}


def builtin_configs(config_name: str, *, prediction_type: str | None = None) -> ComponentConfigs:
    """The configs of a built-in family (`CONFIG_NAMES`), from sdjax/model_configs/*.json (the public diffusers
    repos' files): sd15 = stable-diffusion-v1-5, sd15-inpainting = stable-diffusion-inpainting, sd21 =
    stable-diffusion-2-1 (768, v), sd21-base = stable-diffusion-2-1-base (512, epsilon), sd2-inpainting,
    sdxl / sdxl-refiner = stable-diffusion-xl-base/refiner-1.0, x4-upscaler = stable-diffusion-x4-upscaler.
    `prediction_type` (e.g. `Detected.prediction_type`) replaces the scheduler config's. Fresh dicts on every
    call."""
    configs = _builtin(config_name)
    if prediction_type is None:
        return configs
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
    return dataclasses.replace(configs, scheduler={**configs.scheduler, "prediction_type": prediction_type})


def _builtin(config_name: str) -> ComponentConfigs:
    clip_l = "clip_vit_l14_text.json"
    vit_h = "openclip_vit_h14_text.json"
    if config_name == "sd15":
        return ComponentConfigs("StableDiffusionPipeline", _read("sd15_unet.json"), _read("sd15_vae.json"),
                                _read(clip_l), None, _read("sd15_scheduler.json"))
    if config_name == "sd15-inpainting":
        return ComponentConfigs("StableDiffusionInpaintPipeline", _read("sd15_unet.json", in_channels=9),
                                _read("sd15_vae.json"), _read(clip_l), None, _read("sd15_inpainting_scheduler.json"))
    if config_name == "sd21":
        return ComponentConfigs("StableDiffusionPipeline", _read("sd21_unet.json"),
                                _read("sd15_vae.json", sample_size=768), _read(vit_h), None,
                                _read("sd21_scheduler.json"))
    if config_name == "sd21-base":
        return ComponentConfigs("StableDiffusionPipeline", _read("sd21_unet.json", sample_size=64),
                                _read("sd15_vae.json"), _read(vit_h), None, _read("sd21_base_scheduler.json"))
    if config_name == "sd2-inpainting":
        return ComponentConfigs("StableDiffusionInpaintPipeline", _read("sd2_inpainting_unet.json"),
                                _read("sd15_vae.json"), _read(vit_h), None, _read("sd2_inpainting_scheduler.json"))
    if config_name == "sdxl":
        return ComponentConfigs("StableDiffusionXLPipeline", _read("sdxl_base_unet.json"), _read("sdxl_vae.json"),
                                _read(clip_l), _read("openclip_vit_bigg14_text.json"), _read("sdxl_scheduler.json"),
                                force_zeros_for_empty_prompt=True, requires_aesthetics_score=False)
    if config_name == "sdxl-refiner":
        return ComponentConfigs("StableDiffusionXLImg2ImgPipeline", _read("sdxl_refiner_unet.json"),
                                _read("sdxl_vae.json"), None, _read("openclip_vit_bigg14_text.json"),
                                _read("sdxl_scheduler.json"), force_zeros_for_empty_prompt=False,
                                requires_aesthetics_score=True)
    if config_name == "x4-upscaler":
        return ComponentConfigs("StableDiffusionUpscalePipeline", _read("x4_upscaler_unet.json"),
                                _read("x4_upscaler_vae.json"), _read(vit_h), None,
                                _read("x4_upscaler_scheduler.json"),
                                low_res_scheduler=_read("x4_upscaler_low_res_scheduler.json"), max_noise_level=350)
    raise ValueError(f"unknown config name {config_name!r}; built-in: {', '.join(CONFIG_NAMES)}")
