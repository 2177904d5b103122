"""Textual-inversion embeddings: the files people download, read into `Embedding` values (numpy, no torch).

| what the file holds                                    | made by                          | token it names   |
|--------------------------------------------------------|----------------------------------|------------------|
| `string_to_param: {"*": (N, D)}`, `name`, ... (`.pt`)  | A1111, the textual_inversion repo | `name`           |
| `emb_params: (N, D)` (`.safetensors`)                  | kohya-ss sd-scripts              | none             |
| `{token: (N, D) or (D,)}` (`learned_embeds.bin/.safetensors`) | diffusers' training script | the key          |
| `clip_l: (N, 768)`, `clip_g: (N, 1280)`                | SDXL trainers (A1111, kohya)     | none             |

Files are read by `sdjax.formats` (safetensors, or a PyTorch zip through the allowlist-only unpickler: no pickled code
runs). A folder is read as diffusers reads one: `learned_embeds.safetensors`, else `learned_embeds.bin` (or the
`weight_name` given). In memory, a dict of that shape or one array (N, D) is accepted too. Anything else, and
embeddings that are empty, not 1-D/2-D, not floating point or not finite, is a `ValueError` of one line naming the
source.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from sdjax import formats

DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")


@dataclasses.dataclass(frozen=True)
class Embedding:
    """One embedding. vectors: (N, D) float32 for one text encoder; an SDXL embedding has clip_l (N, D_l) for
    `text_encoder` and clip_g (N, D_g) for `text_encoder_2` instead. name: the token the source names (None: it names
    none); stem: the file name without its extension (None for an in-memory value); source: for messages."""

    source: str
    name: str | None = None
    stem: str | None = None
    vectors: np.ndarray | None = None
    clip_l: np.ndarray | None = None
    clip_g: np.ndarray | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.clip_g is not None

    @property
    def num_vectors(self) -> int:
        return len(self.clip_g if self.is_sdxl else self.vectors)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _is_array(x) -> bool:
    return isinstance(x, (formats.TensorRef, np.ndarray)) or (
        hasattr(x, "__array__") and hasattr(x, "shape") and hasattr(x, "dtype"))


def _vectors(x, what: str) -> np.ndarray:
    """An embedding tensor as (N, D) float32 (a 1-D tensor is one vector)."""
    try:
        if hasattr(x, "detach"):  # a torch tensor given in memory (sdjax never imports torch)
            x = x.detach().cpu().float()
        a = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - any array-like that will not convert
        raise ValueError(f"{what}: cannot read it as an array ({type(e).__name__}: {_one_line(e)})") from None
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{what}: an embedding is (vectors, width), got shape {tuple(np.shape(x))}")
    if a.dtype.kind != "f" and not str(a.dtype).startswith(("bfloat16", "float8")):
        raise ValueError(f"{what}: an embedding holds floats, got {a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: the embedding has NaN or infinite values")
    return a


def from_tree(tree: Any, source: str, stem: str | None = None) -> Embedding:
    """The embedding in an unpickled file, a safetensors file's tensors, or a dict/array given in memory."""
    if _is_array(tree):
        return Embedding(source, stem=stem, vectors=_vectors(tree, source))
    if not isinstance(tree, dict):
        raise ValueError(f"{source}: no textual-inversion embedding in it (a {type(tree).__name__}, not a dict)")
    keys = [k for k in tree if isinstance(k, str)]
    if "string_to_param" in tree:  # A1111 / textual_inversion .pt
        params = tree["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"{source}: string_to_param must hold one embedding, it holds {count}")
        name = tree.get("name")
        return Embedding(source, name=name if isinstance(name, str) and name else None, stem=stem,
                         vectors=_vectors(next(iter(params.values())), f"{source}: string_to_param"))
    if "clip_g" in tree or "clip_l" in tree:  # SDXL
        missing = [k for k in ("clip_l", "clip_g") if k not in tree]
        if missing:
            raise ValueError(f"{source}: an SDXL embedding has clip_l and clip_g, {missing[0]} is missing")
        clip_l, clip_g = (_vectors(tree[k], f"{source}: {k}") for k in ("clip_l", "clip_g"))
        if len(clip_l) != len(clip_g):
            raise ValueError(f"{source}: clip_l has {len(clip_l)} vectors but clip_g {len(clip_g)}")
        return Embedding(source, stem=stem, clip_l=clip_l, clip_g=clip_g)
    if "emb_params" in tree:  # kohya-ss
        return Embedding(source, stem=stem, vectors=_vectors(tree["emb_params"], f"{source}: emb_params"))
    tensors = [k for k in keys if _is_array(tree[k])]
    if len(tree) == 1 and tensors:  # diffusers: {token: tensor}
        return Embedding(source, name=tensors[0], stem=stem, vectors=_vectors(tree[tensors[0]], source))
    shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
    raise ValueError(f"{source}: no textual-inversion embedding in it (keys {shown or 'none'}; expected "
                     "string_to_param, emb_params, clip_l/clip_g, or one {token: tensor})")


def read_embedding(path: str | os.PathLike, weight_name: str | None = None) -> Embedding:
    """The embedding of a file, or of a diffusers folder (`learned_embeds.safetensors`/`.bin`, or `weight_name`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        names = (weight_name,) if weight_name else DIFFUSERS_NAMES
        found = [path / n for n in names if (path / n).is_file()]
        if not found:
            raise ValueError(f"{path}: no {' or '.join(names)} in this folder")
        path = found[0]
    elif not path.is_file():
        raise ValueError(f"{path}: no such embedding file or folder")
    try:
        tree = formats.read_pickle_tree(path)
    except formats.CheckpointFormatError as e:
        raise ValueError(_one_line(e)) from None
    return from_tree(tree, str(path), stem=path.stem)


EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")


def named_in(texts, dirs) -> dict[str, Path]:
    """The embeddings of `dirs` (and their subfolders) that `texts` name, as A1111's embeddings folder works: a
    file's name without extension is the word a prompt uses (whole words, as written). {name: file}. A folder that
    is not there, or two files of one name that a text uses, is a ValueError of one line."""
    import re

    files: dict[str, list[Path]] = {}
    for d in dirs:
        d = Path(d).expanduser()
        if not d.is_dir():
            raise ValueError(f"--embeddings-dir {d}: no such folder")
        for f in sorted(d.rglob("*")):
            if f.suffix.lower() in EMBEDDING_SUFFIXES and f.is_file():
                files.setdefault(f.stem, []).append(f)
    text = "\n".join(texts)
    used = {name: found for name, found in files.items()
            if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)}
    for name, found in used.items():
        if len(found) > 1:
            raise ValueError(f"embedding {name!r}: {len(found)} files have that name in --embeddings-dir "
                             f"({', '.join(map(str, found[:3]))}); rename one")
    return {name: found[0] for name, found in used.items()}


__all__ = ["DIFFUSERS_NAMES", "EMBEDDING_SUFFIXES", "Embedding", "from_tree", "named_in", "read_embedding"]
