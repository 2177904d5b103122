"""What the command line and the demo share: the one-line usage error and the one line of every expected failure,
the shipped model's paths, and loading a pipeline from flag values.

Light on purpose (no JAX import at module level): `sdjax.cli` imports it before it can take over Ctrl-C.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Sequence

HIGH_NOISE_FRAC = 0.8  # SDXL base -> refiner hand-off: the base's share of the schedule (diffusers' suggested split)


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type name if it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


FREE_SPACE = "free some space, then run the same command again (with --resume for a bulk run)"
OS_ERROR_HINTS = {
    errno.ENOSPC: f"the disk is full: {FREE_SPACE}",
    errno.EDQUOT: f"over the disk quota: {FREE_SPACE}",
    errno.EROFS: "a read-only file system: choose a folder you can write to",
    errno.EACCES: "no permission: choose a folder you can write to, or a file you can read",
    errno.EPERM: "not permitted: choose a folder you can write to, or a file you can read",
    errno.ENOTDIR: "a file stands where a folder is needed",
    errno.EISDIR: "a folder stands where a file is needed",
}


def os_error_line(e: OSError) -> str:
    """An OSError as one line: the file, what happened and, for the common ones, what to do."""
    what = e.strerror or one_line(e)
    where = f"{e.filename}: " if e.filename else ""
    hint = OS_ERROR_HINTS.get(e.errno)
    return " ".join(f"{where}{what}{f' ({hint})' if hint else ''}".split())


def failure_line(e: BaseException) -> str | None:
    """The one line the command line prints (exit code 2) for an expected failure: bad input or flags
    (`UsageError`), the library's checks of values, files and configs (ValueError), the file system (OSError),
    an image too large to decode, memory running out on the host or the device, NaN output. None for anything
    else: a bug, whose traceback is worth seeing."""
    name = type(e).__name__
    if isinstance(e, UsageError):
        return one_line(e)
    if isinstance(e, OSError):
        return os_error_line(e)
    if name == "DecompressionBombError":  # PIL: an image file claiming more pixels than PIL will decode
        return f"{one_line(e)} (an image this large cannot be used)"
    if isinstance(e, MemoryError) or (name in ("XlaRuntimeError", "JaxRuntimeError")
                                      and "RESOURCE_EXHAUSTED" in str(e)):
        where = "host" if isinstance(e, MemoryError) else "device"
        return (f"out of {where} memory ({one_line(e)[:200]}): make fewer or smaller images per batch (--n_samples, "
                "--prompts-per-batch, --H, --W), or use --attention-chunking and --vae-tiling")
    if isinstance(e, ValueError):
        return one_line(e)
    if isinstance(e, FloatingPointError):  # the pipeline's NaN check; its advice names a library argument
        return f"{one_line(e).split(';')[0]}; try --precision full"
    return None


def default_model() -> str | None:
    """The model used when --ckpt is not given: $SDJAX_MODEL, else the one shipped with sdjax, if any."""
    from sdjax.loading import SHIPPED_MODEL

    env = os.environ.get("SDJAX_MODEL")
    if env:
        return env
    shipped = SHIPPED_MODEL / "pipeline"
    return str(shipped) if (shipped / "model_index.json").is_file() else None


def default_clip(with_shipped: bool = True) -> str | None:
    """The CLIP used for reranking when none is named: $SDJAX_CLIP, else (with_shipped, i.e. when the shipped
    pipeline is used) the CLIP shipped with sdjax, if installed."""
    from sdjax.loading import SHIPPED_MODEL

    env = os.environ.get("SDJAX_CLIP")
    if env:
        return env
    shipped = SHIPPED_MODEL / "clip"
    return str(shipped) if with_shipped and (shipped / "config.json").is_file() else None


PREDICTION_TYPES = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


def load_pipeline(s: dict, key: str = "ckpt", mesh=None):
    """(pipeline, precision, path) from the settings: `s[key]` (default for "ckpt": default_model()) is a diffusers
    folder, hub id or single-file checkpoint (then `model_config` and `prediction_type` apply); `precision`;
    `mesh` (a run config's mesh, or the given one)."""
    import jax
    import jax.numpy as jnp

    from sdjax.distributed import data_mesh
    from sdjax.pipelines import auto

    flag = f"--{key}"
    ckpt = s.get(key) or (default_model() if key == "ckpt" else None)
    if not ckpt:
        raise UsageError(f"no {flag} given and no default model is installed: pass a diffusers pipeline folder or "
                         "a single-file checkpoint")
    precision = s.get("precision") or ("full" if jax.default_backend() == "cpu" else "autocast")
    dtype = jnp.float32 if precision == "full" else jnp.bfloat16
    if mesh is None and s.get("mesh"):
        mesh = data_mesh(mesh_devices(s["mesh"]))
    single = Path(str(ckpt)).expanduser().is_file()
    prediction = s.get("prediction_type")
    if prediction is not None and prediction not in PREDICTION_TYPES:
        raise UsageError(f"--prediction-type must be eps or v, got {prediction!r}")
    if not single and (s.get("model_config") or prediction):
        raise UsageError(f"--model-config and --prediction-type are for single-file checkpoints; {flag} {ckpt} is "
                         "a folder (its own configs apply)")
    try:
        if single:
            pipe = auto.from_single_file(ckpt, config=s.get("model_config"), dtype=dtype, mesh=mesh,
                                         prediction_type=PREDICTION_TYPES.get(prediction))
        else:
            pipe = auto.from_pretrained(ckpt, dtype=dtype, mesh=mesh)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"{flag} {ckpt}: cannot load the model: {one_line(e)}") from None
    return pipe, precision, ckpt


def model_hash(path) -> str | None:
    """A1111's `Model hash` of a single-file checkpoint: the first 10 hex digits of its SHA-256 (None for a
    folder)."""
    import hashlib

    path = Path(str(path)).expanduser()
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def parse_lora(spec: str) -> tuple[str, float]:
    """`FILE[:WEIGHT]` (weight 1 when not given) -> (file, weight); a file whose own name has a colon is taken whole."""
    import math

    path, weight = str(spec), 1.0
    if not Path(path).expanduser().exists() and ":" in path:
        head, _, tail = path.rpartition(":")
        try:
            weight = float(tail)
        except ValueError:
            raise UsageError(f"--lora {spec}: the weight after ':' must be a number") from None
        path = head
    if not math.isfinite(weight):
        raise UsageError(f"--lora {spec}: the weight must be a finite number")
    if not Path(path).expanduser().exists():
        raise UsageError(f"--lora {spec}: no such file")
    return path, weight


def lora_hash(path) -> str:
    """A1111's hash of a LoRA file in `Lora hashes` (kohya's / AddNet's): the first 12 hex digits of the SHA-256 of a
    safetensors file's tensor data (its header left out), of the whole file otherwise."""
    import hashlib

    path = Path(path).expanduser()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix == ".safetensors" and len(head) == 8:
            f.seek(8 + int.from_bytes(head, "little"))
        else:
            f.seek(0)
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


class PromptLoras:
    """The LoRAs of a bulk run: every `--lora FILE[:WEIGHT]` on every image, plus each prompt's A1111 tags
    `<lora:NAME:WEIGHT>` (`sdjax.extra_networks`), whose files are found in `dirs` (--lora-dir). A file is loaded
    into the pipeline once, the first time a prompt is split; `activate` merges the ones a batch asks for."""

    def __init__(self, pipe, specs: Sequence[str] = (), dirs: Sequence[str | os.PathLike] = ()):
        self.pipe = pipe
        self.dirs = [Path(d).expanduser() for d in dirs]
        self.adapters: dict[Path, str] = {}  # file -> adapter name in the pipeline
        self.hashes: dict[Path, str] = {}
        self.found: dict[str, Path] = {}  # tag name -> file
        self.fixed: list[tuple[Path, float]] = []
        self.active: tuple | None = None  # what the pipeline's adapters are set to
        for spec in specs:
            path, weight = parse_lora(spec)
            self.fixed.append((self._load(path, f"--lora {spec}"), weight))

    def _load(self, path, what: str) -> Path:
        path = Path(path).expanduser().resolve()
        if path not in self.adapters:
            name = path.stem or "lora"
            while name in self.adapters.values():
                name += "_"
            try:
                self.pipe.load_lora_weights(path, adapter_name=name)
            except (ValueError, OSError) as e:
                raise UsageError(f"{what}: {one_line(e)}") from None
            self.adapters[path] = name
            self.hashes[path] = lora_hash(path)
        return path

    def split(self, prompt: str) -> tuple[str, tuple]:
        """(the prompt's text without its tags, its LoraTags), each named file found and loaded."""
        from sdjax.extra_networks import TagError, find_lora, split_tags

        try:
            text, tags = split_tags(prompt)
            for tag in tags:
                if tag.name not in self.found:
                    self.found[tag.name] = self._load(find_lora(tag.name, self.dirs), f"<lora:{tag.name}>")
        except TagError as e:
            raise UsageError(one_line(e)) from None
        return text, tags

    def activate(self, tags: Sequence = ()) -> tuple:
        """Merge the fixed LoRAs and `tags` (a LoRA named twice: weights summed); the LoraUses for the metadata."""
        from sdjax.extra_networks import LoraUse

        weights: dict[Path, tuple[float, float]] = {}  # file -> (text encoder, UNet)
        for path, add_te, add_unet in [(p, w, w) for p, w in self.fixed] + [(self.found[t.name], t.te, t.unet)
                                                                             for t in tags]:
            te, unet = weights.get(path, (0.0, 0.0))
            weights[path] = (te + add_te, unet + add_unet)
        state = tuple(weights.items())
        if self.adapters and state != self.active:
            self.pipe.set_adapters([self.adapters[p] for p in weights],
                                   [dict(unet=u, text_encoder=t, text_encoder_2=t) for t, u in weights.values()])
            self.active = state
        return tuple(LoraUse(p.name, self.hashes[p], unet=u, te=t) for p, (t, u) in weights.items())


def mesh_devices(mesh):
    """`mesh: {data: N}` in a run config: the first N devices (-1 or "all": every device)."""
    import jax

    n = mesh.get("data", -1) if isinstance(mesh, dict) else mesh
    devices = jax.devices()
    if n in (-1, "all", None):
        return devices
    if jax.process_count() > 1 and n != len(devices):
        raise UsageError(f"mesh data size {n!r}: with several processes the mesh spans all {len(devices)} devices "
                         "(use -1)")
    if not isinstance(n, int) or not 1 <= n <= len(devices):
        raise UsageError(f"mesh data size must be 1..{len(devices)} or -1 (all devices), got {n!r}")
    return devices[:n]


def load_embeddings(specs, pipe, refiner=None, dirs=(), texts=()) -> list[tuple[str, str]]:
    """`--embedding FILE[:TOKEN]` (repeatable): each file's textual-inversion embedding into the pipeline (TOKEN:
    the prompt's word for it; default: the name the file gives, else its file name without extension). An SDXL file
    (clip_l/clip_g) also goes into the refiner, as its clip_g. `--embeddings-dir DIR` (`dirs`): as A1111's embeddings
    folder, every file there whose name (without extension) a prompt or negative prompt in `texts` uses, under that
    name. Returns [(token, file)]."""
    loaded = []
    for spec in [specs] if isinstance(specs, str) else list(specs or []):
        if not isinstance(spec, str) or not spec:
            raise UsageError(f"--embedding takes FILE or FILE:TOKEN, got {spec!r}")
        path, token = spec, None
        if not Path(spec).expanduser().exists() and ":" in spec:  # (a path with a colon in it is taken whole)
            path, token = spec.rsplit(":", 1)
            if not token:
                raise UsageError(f"--embedding {spec}: the token after ':' is empty")
        loaded.append((_load_embedding(path, token, pipe, refiner, f"--embedding {spec}"), path))
    return loaded + load_named_embeddings(texts, dirs, pipe, refiner, skip={token for token, _ in loaded})


def load_named_embeddings(texts, dirs, pipe, refiner=None, skip=frozenset()) -> list[tuple[str, str]]:
    """The embeddings of folders `dirs` that `texts` name (`sdjax.embeddings.named_in`), except the names in
    `skip` (loaded already), into the pipeline (and an SDXL file's clip_g into the refiner). [(name, file)]."""
    from sdjax.embeddings import named_in

    try:
        found = named_in(texts, [dirs] if isinstance(dirs, str) else list(dirs or []))
    except ValueError as e:
        raise UsageError(one_line(e)) from None
    return [(_load_embedding(path, name, pipe, refiner, f"embedding {name} ({path})"), str(path))
            for name, path in found.items() if name not in skip]


def _load_embedding(path, token, pipe, refiner, what: str) -> str:
    from sdjax.embeddings import read_embedding

    try:
        embedding = read_embedding(path)
        token = token or embedding.name or embedding.stem
        pipe.load_textual_inversion(embedding, token=token)
        if refiner is not None and embedding.is_sdxl:
            refiner.load_textual_inversion(embedding, token=token)
    except ValueError as e:
        raise UsageError(f"{what}: {one_line(e)}") from None
    return token
