"""A1111's extra-network tags in prompts: `<lora:NAME:WEIGHT>` (and LyCORIS' `<lyco:...>`), read as the web UI reads
them, and the LoRA files they name.

A tag is `<KIND:ARG:ARG...>`; for a LoRA the arguments are the file's name (without extension), then optionally
the text-encoder weight, the UNet weight (default: the text-encoder weight) and a `dyn` rank, positional or named
(`te=0.5`, `unet=0.8`). The tags are taken out of the prompt's text, which the text encoder never sees; the same
LoRA named twice gets the sum of its weights. Only the positive prompt is read for tags (as the web UI does).

Pure text and file names: no JAX, nothing loaded here (`sdjax.app.PromptLoras` loads the files into a pipeline).
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Sequence

TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")  # the web UI's LyCORIS extension used <lyco:...>; both are LoRA files here
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


class TagError(ValueError):
    """A tag sdjax cannot use: bad arguments, an unknown kind, a LoRA file that cannot be found."""


@dataclasses.dataclass(frozen=True)
class LoraTag:
    """One LoRA a prompt asks for: its name (a file name without extension) and its weights."""

    name: str
    te: float = 1.0
    unet: float = 1.0


@dataclasses.dataclass(frozen=True)
class LoraUse:
    """A LoRA file merged into the model for an image, as the image's metadata records it."""

    file: str  # the file's name
    hash: str  # A1111's `Lora hashes` hash of it
    unet: float
    te: float


def _number(text: str, what: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TagError(f"{tag}: the {what} weight must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise TagError(f"{tag}: the {what} weight must be a finite number, got {text!r}")
    return value


def parse_lora_tag(args: str, tag: str) -> LoraTag:
    """The arguments of `<lora:ARGS>` (`NAME[:TE[:UNET[:DYN]]]`, or `te=` / `unet=` / `dyn=` named) as a LoraTag."""
    positional, named = [], {}
    for item in args.split(":"):
        key, eq, value = item.partition("=")
        if eq:
            named[key.strip()] = value.strip()
        else:
            positional.append(item.strip())
    unknown = sorted(set(named) - {"te", "unet", "dyn"})
    if unknown:
        raise TagError(f"{tag}: unknown argument {unknown[0]}= (a LoRA tag takes NAME, then te=, unet=, dyn=)")
    if not positional or not positional[0]:
        raise TagError(f"{tag}: no LoRA name (write <lora:NAME:WEIGHT>)")
    if len(positional) > 4:
        raise TagError(f"{tag}: too many arguments (<lora:NAME:TE_WEIGHT:UNET_WEIGHT:DYN> at most)")
    if len(positional) > 3 or "dyn" in named:
        raise TagError(f"{tag}: dyn (a rank cut of DyLoRA files) is not supported; leave it out")
    te = _number(named.get("te", positional[1] if len(positional) > 1 else "1"), "text-encoder", tag)
    unet = _number(named.get("unet", positional[2] if len(positional) > 2 else repr(te)), "UNet", tag)
    return LoraTag(positional[0], te, unet)


def split_tags(prompt: str) -> tuple[str, tuple[LoraTag, ...]]:
    """(the prompt without its tags, the LoRAs its tags name: one per name, weights summed, in order of first
    mention). Raises TagError for a tag sdjax does not read."""
    found: dict[str, LoraTag] = {}

    def take(m: re.Match) -> str:
        kind, tag = m.group(1), m.group(0)
        if kind not in LORA_KINDS:
            what = "hypernetworks are not supported" if kind == "hypernet" else f"unknown extra network {kind!r}"
            raise TagError(f"{tag}: {what} (sdjax reads <lora:NAME:WEIGHT> and <lyco:NAME:WEIGHT> tags)")
        t = parse_lora_tag(m.group(2), tag)
        old = found.get(t.name)
        found[t.name] = t if old is None else LoraTag(t.name, old.te + t.te, old.unet + t.unet)
        return ""

    return TAG.sub(take, prompt), tuple(found.values())


def find_lora(name: str, dirs: Sequence[Path]) -> Path:
    """The file of `<lora:NAME>`: NAME plus a LoRA file extension, in one of `dirs` or a folder below it (the web UI
    looks through its Lora folder and its subfolders)."""
    if not dirs:
        raise TagError(f"<lora:{name}>: the prompt names a LoRA; give --lora-dir DIR, the folder of your LoRA files")
    matches = []
    for d in dirs:
        if not Path(d).is_dir():
            raise TagError(f"--lora-dir {d}: no such folder")
        matches += sorted(p for p in Path(d).rglob(f"{glob_escape(name)}.*")
                          if p.suffix.lower() in LORA_SUFFIXES and p.stem == name and p.is_file())
    if not matches:
        raise TagError(f"<lora:{name}>: no {name}{'/'.join(LORA_SUFFIXES)} in "
                       f"{', '.join(str(d) for d in dirs)} or its subfolders")
    if len(matches) > 1:
        raise TagError(f"<lora:{name}>: {len(matches)} files have that name ({', '.join(map(str, matches[:3]))}"
                       f"{', ...' if len(matches) > 3 else ''}); rename one")
    return matches[0]


def available(dirs: Sequence[Path]) -> list[str]:
    """The names `<lora:NAME>` can take in `dirs` (the LoRA files' names without extension), sorted."""
    return sorted({p.stem for d in dirs if Path(d).is_dir() for p in Path(d).rglob("*")
                   if p.suffix.lower() in LORA_SUFFIXES and p.is_file()})


def glob_escape(name: str) -> str:
    """`name` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)
