"""What the command line and the demo share: the one-line usage error, the shipped model's paths, and loading a
pipeline from flag values."""
from __future__ import annotations

import os
from pathlib import Path

from sdjax.loading import SHIPPED_MODEL

HIGH_NOISE_FRAC = 0.8  # SDXL base -> refiner hand-off: the base's share of the schedule (diffusers' suggested split)


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type name if it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


def default_model() -> str | None:
    """The model used when --ckpt is not given: $SDJAX_MODEL, else the one shipped with sdjax, if any."""
    env = os.environ.get("SDJAX_MODEL")
    if env:
        return env
    shipped = SHIPPED_MODEL / "pipeline"
    return str(shipped) if (shipped / "model_index.json").is_file() else None


def default_clip(with_shipped: bool = True) -> str | None:
    """The CLIP used for reranking when none is named: $SDJAX_CLIP, else (with_shipped, i.e. when the shipped
    pipeline is used) the CLIP shipped with sdjax, if installed."""
    env = os.environ.get("SDJAX_CLIP")
    if env:
        return env
    shipped = SHIPPED_MODEL / "clip"
    return str(shipped) if with_shipped and (shipped / "config.json").is_file() else None


def load_pipeline(s: dict):
    """(pipeline, precision, ckpt) from the settings `ckpt` (default: default_model()), `precision` and `mesh`."""
    import jax
    import jax.numpy as jnp

    from sdjax.distributed import data_mesh
    from sdjax.pipelines import auto

    ckpt = s.get("ckpt") or default_model()
    if not ckpt:
        raise UsageError("no --ckpt given and no default model is installed: pass a diffusers pipeline folder")
    path = Path(ckpt).expanduser()
    if path.is_file():
        raise UsageError(f"--ckpt {ckpt}: single-file checkpoints are not supported yet; give a diffusers folder")
    precision = s.get("precision") or ("full" if jax.default_backend() == "cpu" else "autocast")
    dtype = jnp.float32 if precision == "full" else jnp.bfloat16
    mesh = None
    if s.get("mesh"):
        mesh = data_mesh(mesh_devices(s["mesh"]))
    try:
        pipe = auto.from_pretrained(ckpt, dtype=dtype, mesh=mesh)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"--ckpt {ckpt}: cannot load the model: {one_line(e)}") from None
    return pipe, precision, ckpt


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
