"""Writing diffusers folders: a pipeline as it is now (`DiffusionPipeline.save_pretrained`), and the one way sdjax
writes a new folder (`write_new_folder`: into a temporary folder next to the target, renamed into place at the end,
so an interrupted write leaves no half-written folder and an existing one is never overwritten)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from sdjax.original_layout import ComponentConfigs
from sdjax.pipelines.folder import tokenizer_of

def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_new_folder(out, fill: Callable[[Path], None]) -> Path:
    """Make the folder `out` with `fill(folder)`; FileExistsError if `out` exists (nothing is overwritten)."""
    out = Path(out).expanduser()
    if out.exists():
        raise FileExistsError(f"{out}: already exists (sdjax never overwrites a folder; choose a new name)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_schedulers(folder: Path, configs: ComponentConfigs) -> None:
    """`scheduler/` (and the x4 upscaler's `low_res_scheduler/`) scheduler_config.json."""
    for part in ("scheduler", "low_res_scheduler"):
        if getattr(configs, part) is not None:
            (folder / part).mkdir()
            write_json(folder / part / "scheduler_config.json", getattr(configs, part))


def save_pipeline(pipe, out, configs: ComponentConfigs, *, vocab_sizes: dict[str, int] | None = None,
                  variant: str | None = None, dtype=None) -> Path:
    """Write `pipe`'s networks (their current weights), tokenizers and scheduler configs, with the model_index.json
    of `configs`, as a new diffusers folder `out`. vocab_sizes: text encoder -> the token-table rows to save (its
    own vocabulary, where textual inversion grew the table); dtype: the saved weights' dtype (default: as they
    are)."""

    def fill(folder: Path) -> None:
        write_json(folder / "model_index.json", configs.model_index())
        encoders = pipe.text_encoders()
        for part, module in (("unet", pipe.unet), ("vae", pipe.vae)):
            module.save_pretrained(folder / part, variant=variant, dtype=dtype)
        for part, module in encoders.items():
            module.save_pretrained(folder / part, variant=variant, dtype=dtype,
                                   vocab_size=(vocab_sizes or {}).get(part))
        for encoder in encoders:
            part = tokenizer_of(encoder)
            getattr(pipe, part).hf.save_pretrained(folder / part)
        write_schedulers(folder, configs)

    return write_new_folder(out, fill)
