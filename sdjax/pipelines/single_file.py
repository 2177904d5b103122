"""A single-file checkpoint (original CompVis / Stability layout) as a source of pipeline parts, like a diffusers
folder (`folder.FolderSource`): the file is read by the safe reader (`sdjax.formats`: no pickled code ever runs),
the family detected from its keys (`sdjax.original_layout.detect`) or given by `config=`, and every network filled
from a lazy view of the file (no full copy of the state dict is made)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from sdjax import formats, original_layout
from sdjax.loading import resolve_path
from sdjax.pipelines import folder as folder_lib

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


class SingleFileSource:
    """The parts of one single-file checkpoint (the interface of `folder.FolderSource`)."""

    def __init__(self, path: Path, configs: original_layout.ComponentConfigs, views: original_layout.Components,
                 detected: original_layout.Detected, config_folder: Path | None = None):
        self.path, self.configs, self.views, self.detected = path, configs, views, detected
        self.config_folder = config_folder  # config= a diffusers folder: its tokenizers too, as diffusers
        self.index = configs.model_index()
        self.name = path.stem

    def has(self, part: str) -> bool:
        return folder_lib.has_component(self.index, part)

    def require(self, parts) -> None:
        for part in parts:
            if not self.has(part) and not part.startswith("tokenizer"):
                raise ValueError(f"{self.path}: the checkpoint has no {part} (its layout: {self.detected.family})")
            if part in PARTS and getattr(self.views, part) is None:
                raise ValueError(f"{self.path}: the checkpoint has no {part} weights (its layout: "
                                 f"{self.detected.family}); the config {self.configs.pipeline_class} needs them")

    def flag(self, key: str, default):
        value = self.index.get(key)
        return default if value is None else value

    def model(self, klass, part: str, *, dtype, param_dtype):
        return klass.from_state(getattr(self.configs, part), getattr(self.views, part), dtype=dtype,
                                param_dtype=param_dtype, name=f"{klass.__name__} ({part}) from {self.path}")

    def tokenizer(self, part: str):
        """The config folder's tokenizer, else the packaged CLIP BPE files (every SD text encoder uses them);
        OpenCLIP encoders pad with "!"."""
        from sdjax.tokenizer import Tokenizer

        if self.config_folder is not None and (self.config_folder / part).is_dir():
            return Tokenizer.from_pretrained(self.config_folder / part)
        encoder = getattr(self.configs, part.replace("tokenizer", "text_encoder"))
        openclip = part == "tokenizer_2" or (encoder or {}).get("hidden_act") == "gelu"
        return Tokenizer.from_pretrained(None, pad_token="!" if openclip else None)

    def scheduler_config(self, part: str = "scheduler") -> dict:
        return dict(getattr(self.configs, part))


def configs_from_folder(path_or_id) -> original_layout.ComponentConfigs:
    """The configs of a diffusers folder (or hub id), as diffusers' `from_single_file(config=...)` uses them."""
    folder, index = folder_lib.read_index(path_or_id)

    def read(part, name="config.json"):
        if not folder_lib.has_component(index, part):
            return None
        return folder_lib.read_json_object(folder / part / name)

    return original_layout.ComponentConfigs(
        pipeline_class=str(index.get("_class_name", "StableDiffusionPipeline")),
        unet=read("unet"), vae=read("vae"), text_encoder=read("text_encoder"),
        text_encoder_2=read("text_encoder_2"), scheduler=read("scheduler", "scheduler_config.json"),
        low_res_scheduler=read("low_res_scheduler", "scheduler_config.json"),
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt"),
        requires_aesthetics_score=index.get("requires_aesthetics_score"),
        max_noise_level=index.get("max_noise_level"),
    )


def open_single_file(path, *, config=None, prediction_type=None, upcast_attention=None, image_size=None,
                     extract_ema=False) -> SingleFileSource:
    """Read, detect and configure one single-file checkpoint (see `StableDiffusionPipeline.from_single_file`)."""
    path = Path(path).expanduser()
    state = formats.read_state_dict(path)
    step = state.metadata.get("global_step", "")  # a Lightning .ckpt's (diffusers tells SD 2.x 512-base by it)
    detected = original_layout.detect(original_layout.shapes(state), global_step=int(step) if step.isdigit() else None)
    if prediction_type is not None and prediction_type not in original_layout.PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(original_layout.PREDICTION_TYPES)}, got "
                         f"{prediction_type!r}")
    config_folder = None
    if config is None:
        configs = original_layout.builtin_configs(detected.config_name,
                                                  prediction_type=prediction_type or detected.prediction_type)
        if prediction_type is None and not detected.prediction_known:
            print(f"sdjax: {path.name}: {detected.how}", file=sys.stderr)
    elif isinstance(config, str) and config in original_layout.CONFIG_NAMES:
        configs = original_layout.builtin_configs(config, prediction_type=prediction_type)
        # the file's own marker beats the built-in default
        if prediction_type is None and original_layout.V_PRED_MARKER in state:
            configs = original_layout.builtin_configs(config, prediction_type=detected.prediction_type)
    else:
        if isinstance(config, str) and "/" not in config and not Path(config).expanduser().exists():
            raise ValueError(f"config {config!r} is neither a folder nor a built-in name "
                             f"({', '.join(original_layout.CONFIG_NAMES)})")
        config_folder = resolve_path(config)
        configs = configs_from_folder(config_folder)
        if prediction_type is not None:
            configs = dataclasses.replace(configs, scheduler={**configs.scheduler, "prediction_type": prediction_type})
    configs = _override(configs, upcast_attention=upcast_attention, image_size=image_size)
    views = original_layout.components(state, detected, extract_ema=extract_ema)
    unused = original_layout.leftovers(state, views)
    if unused:
        shown = ", ".join(unused[:8]) + (f" ... (+{len(unused) - 8} more)" if len(unused) > 8 else "")
        raise ValueError(f"{path}: {len(unused)} keys belong to no part of a {detected.family} checkpoint: {shown}")
    return SingleFileSource(path, configs, views, detected, config_folder)


def _override(configs, *, upcast_attention, image_size):
    unet, vae = dict(configs.unet), dict(configs.vae)
    if upcast_attention is not None:
        unet["upcast_attention"] = bool(upcast_attention)
    if image_size is not None:
        factor = 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 or image_size % factor:
            raise ValueError(f"image_size must be a positive multiple of {factor} (the VAE factor), got {image_size!r}")
        unet["sample_size"] = image_size // factor
        vae["sample_size"] = image_size
    return dataclasses.replace(configs, unet=unet, vae=vae)


WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


def convert(path, out_dir, **options) -> Path:
    """Write a single-file checkpoint as a diffusers folder (safetensors weights, configs, the CLIP tokenizer files)
    that diffusers and sdjax load; `options` as `open_single_file`. Written to a temporary folder next to
    `out_dir` and renamed into place at the end, so an interrupted run leaves no half-written folder; an existing
    `out_dir` is never overwritten."""
    import json
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    from sdjax.pipelines.saving import write_json, write_new_folder, write_schedulers
    from sdjax.tokenizer import PACKAGED

    out = Path(out_dir).expanduser()
    if out.exists():  # before the file is read
        raise FileExistsError(f"{out}: already exists (sdjax convert never overwrites)")
    source = open_single_file(path, **options)

    def fill(tmp: Path) -> None:
        write_json(tmp / "model_index.json", source.index)
        for part in PARTS:
            view, config = getattr(source.views, part), getattr(source.configs, part)
            if view is None or config is None or not source.has(part):
                continue
            (tmp / part).mkdir()
            write_json(tmp / part / "config.json", config)
            # one component at a time in memory (views are lazy: nothing else is read)
            save_file({k: np.ascontiguousarray(view[k]) for k in view}, str(tmp / part / WEIGHT_FILES[part]),
                      metadata={"format": "pt"})
            if not part.startswith("text_encoder"):
                continue
            tokenizer = folder_lib.tokenizer_of(part)
            (tmp / tokenizer).mkdir()
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(PACKAGED / name, tmp / tokenizer / name)
            tok_config = json.loads((PACKAGED / "tokenizer_config.json").read_text())
            tok_config["pad_token"] = source.tokenizer(tokenizer).hf.pad_token
            write_json(tmp / tokenizer / "tokenizer_config.json", tok_config)
        write_schedulers(tmp, source.configs)

    return write_new_folder(out, fill)
