"""Adapter files (LoRA, LyCORIS LoCon / LoHa / LoKr) as typed patches: which module of which network each one
changes, its factors, and its scale. numpy only: nothing here knows the networks (`sdjax.lora.targets` finds the
modules) or computes a merged weight (`sdjax.lora.merge`).

The format is detected from the keys:

| format           | module keys                                                   | tensors of one module                |
|------------------|---------------------------------------------------------------|--------------------------------------|
| kohya / LyCORIS  | `lora_unet_<name>`, `lora_te_`/`lora_te1_` (text_encoder),     | `lora_down.weight`, `lora_up.weight`, |
|                  | `lora_te2_` (text_encoder_2); the module path joined by `_`   | `lora_mid.weight`, `alpha`; LoHa      |
|                  | (diffusers names, or the original `input_blocks` layout)      | `hada_w{1,2}_{a,b}`, `hada_t{1,2}`;    |
|                  |                                                               | LoKr `lokr_w{1,2}[_a,_b]`, `lokr_t2`  |
| diffusers / PEFT | `unet.<path>`, `text_encoder.<path>`, `text_encoder_2.<path>` | `lora_A.weight`, `lora_B.weight`;     |
|                  | (no prefix at all: the UNet)                                  | older `lora.down/up.weight`,          |
|                  |                                                               | `lora_linear_layer.down/up.weight`,   |
|                  |                                                               | `to_q_lora.down.weight`, ...; `alpha` |

Every delta is in PyTorch layout, (out, in) or (out, in, kh, kw), and scaled by `Patch.scale`: alpha / rank (1
without alpha; PEFT files take alpha from their `lora_adapter_metadata`, `use_rslora`: alpha / sqrt(rank)). DoRA
(`dora_scale`, `lora_magnitude_vector`) and other kinds are refused with one line naming them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from sdjax.formats import CheckpointFormatError, read_state_dict

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# longest first: lora_te1_ before lora_te_
KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                  ("lora_te_", "text_encoder"))
KOHYA = "kohya"  # module names with "_" for "."
DOTTED = "dotted"  # diffusers / transformers module paths
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (PEFT LoraConfig per component)
LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")


class AdapterFormatError(ValueError):
    """An adapter file sdjax cannot read or does not implement."""


# -- factors -------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA:
    """delta = up @ down (LoCon: a k x k conv `down`, a 1x1 `up`); with `mid` (LyCORIS Tucker LoCon:
    down and up are 1x1, mid (rank, rank, kh, kw)) delta[o, i] = sum up[o, m] mid[m, n] down[n, i]."""

    down: np.ndarray  # (rank, in, *k) (or (rank, in, 1, 1) with mid)
    up: np.ndarray  # (out, rank, *1)
    mid: np.ndarray | None = None  # (rank, rank, kh, kw)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def shape(self) -> tuple:
        kernel = self.mid.shape[2:] if self.mid is not None else self.down.shape[2:]
        return (int(self.up.shape[0]), int(self.down.shape[1]), *map(int, kernel))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoHa:
    """LyCORIS LoHa: delta = (w1a @ w1b) * (w2a @ w2b) (element-wise product of two low-rank matrices; w*b flattened
    over in x kh x kw); with Tucker cores t1, t2 each factor is einsum('ij..., jr, ip -> pr...', t, wb, wa)."""

    w1a: np.ndarray  # (out, rank); Tucker: (rank, out)
    w1b: np.ndarray  # (rank, in * k); Tucker: (rank, in)
    w2a: np.ndarray
    w2b: np.ndarray
    t1: np.ndarray | None = None  # (rank, rank, kh, kw)
    t2: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    def shape(self) -> tuple:
        if self.t1 is not None:
            return (int(self.w1a.shape[1]), int(self.w1b.shape[1]), *map(int, self.t1.shape[2:]))
        return (int(self.w1a.shape[0]), int(np.prod(self.w1b.shape[1:])))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoKr:
    """LyCORIS LoKr: delta = kron(w1, w2), w1 (a, c) given or w1a @ w1b, w2 (b, d, *k) given, or w2a @ w2b, or with
    a Tucker core t2 einsum('ij..., ip, jr -> pr...', t2, w2a, w2b)."""

    w1: np.ndarray | None = None
    w1a: np.ndarray | None = None
    w1b: np.ndarray | None = None
    w2: np.ndarray | None = None
    w2a: np.ndarray | None = None
    w2b: np.ndarray | None = None
    t2: np.ndarray | None = None

    @property
    def rank(self) -> int | None:
        """The rank alpha divides by (LyCORIS, ComfyUI): w1b's, else w2b's; None when both factors are full."""
        if self.w1b is not None:
            return int(self.w1b.shape[0])
        if self.w2b is not None:
            return int(self.w2b.shape[0])
        return None

    def shape(self) -> tuple:
        a, c = self.w1.shape if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1])
        if self.w2 is not None:
            b, d, *k = self.w2.shape
        elif self.t2 is not None:
            b, d, k = self.w2a.shape[1], self.w2b.shape[1], list(self.t2.shape[2:])
        else:
            b, d, *k = self.w2a.shape[0], *self.w2b.shape[1:]
        return (int(a) * int(b), int(c) * int(d), *map(int, k))


Factors = LoRA | LoHa | LoKr


@dataclasses.dataclass(frozen=True)
class Patch:
    """One module's change: `component` (one of COMPONENTS), `name` as the file spells the module (without the
    component prefix; `layout` KOHYA: "_" for ".", or DOTTED), the factors, and the scale alpha / rank."""

    component: str
    name: str
    layout: str
    factors: Factors
    scale: float
    label: str = ""  # the module as the file names it, for messages

    def describe(self) -> str:
        return self.label or f"{self.component}.{self.name}"


@dataclasses.dataclass(frozen=True)
class AdapterFile:
    """What an adapter file holds: its format ("kohya" or "peft") and one patch per module."""

    format: str
    patches: tuple[Patch, ...]
    source: str = "adapter"

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.patches:
            k = type(p.factors).__name__
            out[k] = out.get(k, 0) + 1
        return out


# -- reading -------------------------------------------------------------------------------------------------------


def read_adapter(path: str | os.PathLike, weight_name: str | None = None) -> AdapterFile:
    """An adapter from a `.safetensors` / `.pt` / `.ckpt` / `.bin` file (the safe reader: no pickled code runs), or
    from a folder: `weight_name` in it, else diffusers' `pytorch_lora_weights.safetensors`, else its only
    `.safetensors` file."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = _file_in_folder(path, weight_name)
    elif not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file or folder")
    try:
        state = read_state_dict(path)
    except CheckpointFormatError as e:
        raise AdapterFormatError(f"cannot read LoRA file: {e}") from None
    return parse(state, state.metadata, source=str(path))


def _file_in_folder(folder: Path, weight_name: str | None) -> Path:
    if weight_name is not None:
        if not (folder / weight_name).is_file():
            raise FileNotFoundError(f"{folder}: no {weight_name} in it")
        return folder / weight_name
    for name in LORA_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    listed = ", ".join(p.name for p in found) or "none"
    raise FileNotFoundError(f"{folder}: give weight_name= (safetensors files in it: {listed})")


def parse(state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None, *,
          source: str = "adapter") -> AdapterFile:
    """The patches of an adapter `{key: array}` (torch layout) with its safetensors metadata."""
    keys = list(state)
    if not keys:
        raise AdapterFormatError(f"{source}: no tensors in it")
    if any(k.startswith(tuple(p for p, _ in KOHYA_PREFIXES)) for k in keys):
        return AdapterFile("kohya", tuple(_kohya(state, source)), source)
    if any(_is_dotted_lora(k) for k in keys):
        return AdapterFile("peft", tuple(_dotted(state, dict(metadata or {}), source)), source)
    raise AdapterFormatError(f"{source}: not a LoRA/LyCORIS file (keys like {_first(keys)}; expected lora_unet_*, "
                             "lora_te*_*, or unet./text_encoder. keys with lora_A/lora_B)")


def _first(names, n=3) -> str:
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _scalar(a, what: str) -> float:
    a = np.asarray(a, dtype=np.float64)
    if a.size != 1 or not math.isfinite(float(a.reshape(-1)[0])):
        raise AdapterFormatError(f"{what} must be one finite number, got shape {a.shape}")
    return float(a.reshape(-1)[0])


# -- kohya / LyCORIS -------------------------------------------------------------------------------------------------

_LORA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid"}
_LOHA_PARTS = {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1",
               "hada_t2": "t2"}
_LOKR_PARTS = {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a",
               "lokr_w2_b": "w2b", "lokr_t2": "t2"}
# LyCORIS kinds sdjax does not implement, by a key part that marks them
_OTHER_KINDS = {"dora_scale": "DoRA (dora_scale)", "oft_blocks": "OFT", "oft_diag": "OFT", "diff": "full diff",
                "diff_b": "full diff", "b_norm": "norm", "w_norm": "norm", "lora_down.bias": "LoRA with biases",
                "lora_up.bias": "LoRA with biases", "oft_R": "BOFT", "glora": "GLoRA", "a1.weight": "GLoRA"}


def _kohya(state: Mapping[str, np.ndarray], source: str) -> list[Patch]:
    groups: dict[str, dict[str, str]] = {}
    for key in state:
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = key
    unknown = [k for k in state if not k.startswith(tuple(p for p, _ in KOHYA_PREFIXES))]
    if unknown:
        raise AdapterFormatError(f"{source}: keys that belong to no network: {_first(unknown)}")
    refused = {_OTHER_KINDS[p] for parts in groups.values() for p in parts if p in _OTHER_KINDS}
    if refused:
        names = [n for n, parts in groups.items() if set(parts) & set(_OTHER_KINDS)]
        raise AdapterFormatError(f"{source}: {', '.join(sorted(refused))} adapters are not supported (modules "
                                 f"{_first(names)})")
    patches = []
    for name, parts in groups.items():
        prefix, component = next((p, c) for p, c in KOHYA_PREFIXES if name.startswith(p))
        alpha = _scalar(state[parts["alpha"]], f"{source}: {name}.alpha") if "alpha" in parts else None
        kinds = [table for table in (_LORA_PARTS, _LOHA_PARTS, _LOKR_PARTS) if set(parts) & set(table)]
        extra = set(parts) - {"alpha"} - set().union(*kinds) if kinds else set(parts) - {"alpha"}
        if len(kinds) != 1 or extra:
            what = ", ".join(sorted(extra)) or "no factors" if len(kinds) < 2 else "parts of several kinds"
            raise AdapterFormatError(f"{source}: module {name} has unknown adapter tensors ({what})")
        values = {kinds[0][p]: _f32(state[k]) for p, k in parts.items() if p != "alpha"}
        factors = _factors(kinds[0], values, f"{source}: module {name}")
        patches.append(Patch(component, name[len(prefix):], KOHYA, factors, _scale(alpha, factors.rank), name))
    return patches


def _factors(kind: dict, v: dict, what: str) -> Factors:
    def need(*names):
        missing = [n for n in names if n not in v]
        if missing:
            inverse = {b: a for a, b in kind.items()}
            raise AdapterFormatError(f"{what}: missing {', '.join(inverse[n] for n in missing)}")

    try:
        if kind is _LORA_PARTS:
            need("down", "up")
            f = LoRA(**v)
            if f.up.shape[1] != f.rank or (f.mid is not None and f.mid.shape[:2] != (f.rank, f.rank)):
                raise ValueError("ranks differ")
        elif kind is _LOHA_PARTS:
            need("w1a", "w1b", "w2a", "w2b")
            if ("t1" in v) != ("t2" in v):
                raise ValueError("hada_t1 and hada_t2 come together")
            f = LoHa(**v)
        else:
            if "w1" not in v:
                need("w1a", "w1b")
            if "w2" not in v:
                need("w2a", "w2b")
            f = LoKr(**v)
        shape = f.shape()
    except AdapterFormatError:
        raise
    except Exception as e:  # inconsistent factor shapes
        shapes = ", ".join(f"{k} {tuple(a.shape)}" for k, a in sorted(v.items()))
        raise AdapterFormatError(f"{what}: factor shapes do not fit together ({shapes}; {e})") from None
    if min(shape) <= 0:
        raise AdapterFormatError(f"{what}: empty factors")
    return f


def _scale(alpha: float | None, rank: int | None) -> float:
    return 1.0 if alpha is None or not rank else alpha / rank


# -- diffusers / PEFT ----------------------------------------------------------------------------------------------

_AB = re.compile(r"(?P<module>.+)\.lora_(?P<part>A|B)\.weight")
_DOWN_UP = re.compile(r"(?P<module>.+)\.(?:lora|lora_linear_layer|lora_layer)\.(?P<part>down|up)\.weight")
_OLD_ATTENTION = re.compile(r"(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)"
                            r"\.weight")
_ALPHA = re.compile(r"(?P<module>.+)\.alpha")
_DORA = re.compile(r".+\.(lora_magnitude_vector|dora_scale)(\.weight)?")
_OLD_PROJ = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
             "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}


def _is_dotted_lora(key: str) -> bool:
    return bool(_AB.fullmatch(key) or _DOWN_UP.fullmatch(key) or _OLD_ATTENTION.fullmatch(key)
                or _DORA.fullmatch(key))


def _split_component(key: str, prefixed: bool) -> tuple[str | None, str]:
    if not prefixed:
        return "unet", key
    head, _, rest = key.partition(".")
    return (head, rest) if head in COMPONENTS else (None, key)


def _dotted(state: Mapping[str, np.ndarray], metadata: dict, source: str) -> list[Patch]:
    keys = list(state)
    dora = [k for k in keys if _DORA.fullmatch(k)]
    if dora:
        raise AdapterFormatError(f"{source}: DoRA (lora_magnitude_vector) adapters are not supported ({_first(dora)})")
    biases = [k for k in keys if re.fullmatch(r".+\.lora_B\.bias", k)]
    if biases:
        raise AdapterFormatError(f"{source}: LoRA with lora_B biases (PEFT lora_bias) is not supported "
                                 f"({_first(biases)})")
    prefixed = any(k.split(".", 1)[0] in COMPONENTS for k in keys)
    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown = []
    for key in keys:
        component, rest = _split_component(key, prefixed)
        if component is None:
            unknown.append(key)
            continue
        if m := _AB.fullmatch(rest):
            module, part = m["module"], {"A": "down", "B": "up"}[m["part"]]
        elif m := _OLD_ATTENTION.fullmatch(rest):
            proj = _OLD_PROJ["unet" if component == "unet" else "text"][m["proj"]]
            module, part = f"{m['module']}.{proj}", m["part"]
        elif m := _DOWN_UP.fullmatch(rest):
            module, part = m["module"], m["part"]
        elif m := _ALPHA.fullmatch(rest):
            module, part = m["module"], "alpha"
        else:
            unknown.append(key)
            continue
        group = groups.setdefault((component, module), {})
        if part in group:
            raise AdapterFormatError(f"{source}: module {component}.{module} has two {part} tensors")
        group[part] = state[key]
    if unknown:
        raise AdapterFormatError(f"{source}: keys that are no LoRA tensor of unet/text_encoder/text_encoder_2: "
                                 f"{_first(unknown)}")
    config = _peft_config(metadata, source)
    patches = []
    for (component, module), parts in groups.items():
        what = f"{source}: module {component}.{module}"
        if set(parts) - {"alpha"} != {"down", "up"}:
            raise AdapterFormatError(f"{what}: needs both lora_A (down) and lora_B (up) weights")
        alpha = _scalar(parts["alpha"], f"{what}.alpha") if "alpha" in parts else None
        factors = _factors(_LORA_PARTS, {"down": _f32(parts["down"]), "up": _f32(parts["up"])}, what)
        scale = _scale(alpha, factors.rank)
        if alpha is None and component in config:
            scale = config[component].scale(module, factors.rank)
        patches.append(Patch(component, module, DOTTED, factors, scale, f"{component}.{module}"))
    return patches


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """The parts of a PEFT LoraConfig that set each module's scale."""

    lora_alpha: float | None
    alpha_pattern: dict
    use_rslora: bool

    def scale(self, module: str, rank: int) -> float:
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():  # PEFT's rule: the key matches the module path's end
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        if alpha is None:
            return 1.0
        return float(alpha) / (math.sqrt(rank) if self.use_rslora else rank)


def _peft_config(metadata: dict, source: str) -> dict[str, PeftConfig]:
    raw = metadata.get(LORA_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
        if not isinstance(flat, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise AdapterFormatError(f"{source}: metadata {LORA_METADATA_KEY} is not a JSON object ({e})") from None
    out = {}
    for component in COMPONENTS:
        cfg = {k[len(component) + 1:]: v for k, v in flat.items() if k.startswith(component + ".")}
        if not cfg:
            continue
        if cfg.get("use_dora"):
            raise AdapterFormatError(f"{source}: DoRA adapters (use_dora in {component}'s config) are not supported")
        alpha = cfg.get("lora_alpha")
        out[component] = PeftConfig(None if alpha is None else float(alpha), dict(cfg.get("alpha_pattern") or {}),
                                    bool(cfg.get("use_rslora", False)))
    return out
