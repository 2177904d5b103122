"""Reading a diffusers pipeline folder: `model_index.json`, its components, and the networks every family shares."""
from __future__ import annotations

import json
from pathlib import Path

from sdjax.loading import resolve_path


def tokenizer_of(encoder: str) -> str:
    """The tokenizer part of a text encoder part, as diffusers pairs their names (text_encoder -> tokenizer,
    text_encoder_2 -> tokenizer_2)."""
    return encoder.replace("text_encoder", "tokenizer")


def read_index(path_or_id) -> tuple[Path, dict]:
    """(the folder, its model_index.json as a dict); a hub id is fetched first (sdjax.loading.resolve_path)."""
    folder = resolve_path(path_or_id)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder}: no model_index.json (not a diffusers pipeline folder)")
    return folder, read_json_object(index_file)


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object; ValueError naming the file otherwise."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def has_component(index: dict, part: str) -> bool:
    """model_index.json lists a component (diffusers writes [null, null] for an absent one)."""
    entry = index.get(part)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def require_components(folder: Path, index: dict, parts) -> None:
    for part in parts:
        if part not in index or not (folder / part).is_dir():
            raise FileNotFoundError(f"{folder}: the pipeline has no {part}/ component")


def read_scheduler_config(folder: Path, part: str = "scheduler") -> dict:
    """`part`/scheduler_config.json, checked now (`SchedulerConfig.from_dict`), not at the first image."""
    from sdjax.samplers import SchedulerConfig

    path = folder / part / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    config = read_json_object(path)
    try:
        SchedulerConfig.from_dict(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config


class FolderSource:
    """Where a pipeline class gets its parts from: a diffusers folder (`sdjax.pipelines.single_file` has the same
    interface for one original-layout file)."""

    def __init__(self, folder: Path, index: dict, variant: str | None = None):
        self.folder, self.index, self.variant = folder, index, variant
        self.name = folder.name

    def has(self, part: str) -> bool:
        return has_component(self.index, part)

    def require(self, parts) -> None:
        require_components(self.folder, self.index, parts)

    def flag(self, key: str, default):
        """A model_index.json setting (force_zeros_for_empty_prompt, requires_aesthetics_score, max_noise_level)."""
        return self.index.get(key, default)

    def model(self, klass, part: str, *, dtype, param_dtype):
        return klass.from_pretrained(self.folder, subfolder=part, dtype=dtype, param_dtype=param_dtype,
                                     variant=self.variant)

    def tokenizer(self, part: str):
        from sdjax.tokenizer import Tokenizer

        return Tokenizer.from_pretrained(self.folder / part)

    def scheduler_config(self, part: str = "scheduler") -> dict:
        return read_scheduler_config(self.folder, part)


def load_vae_unet(source, dtype, param_dtype, vae_dtype) -> dict:
    """vae, unet, scheduler config and name: the parts every pipeline has (keyword arguments of every pipeline
    class), from a FolderSource or a single-file source."""
    from sdjax.models import AutoencoderKL, UNet2DConditionModel

    scheduler_config = source.scheduler_config()
    vae_dtype = vae_dtype or dtype
    return dict(
        vae=source.model(AutoencoderKL, "vae", dtype=vae_dtype, param_dtype=param_dtype or vae_dtype),
        unet=source.model(UNet2DConditionModel, "unet", dtype=dtype, param_dtype=param_dtype),
        scheduler_config=scheduler_config,
        name=source.name,
    )
