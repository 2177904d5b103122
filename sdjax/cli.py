"""The `sdjax` command: txt2img / img2img / inpaint bulk runs with CompVis' flags, and rerank.

Thin on purpose: flags are parsed and checked here, the work is `sdjax.bulk.run_bulk` and the pipeline. Bad input
ends with one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from sdjax.app import (HIGH_NOISE_FRAC, PromptLoras, UsageError, default_model, failure_line, load_embeddings,
                       load_pipeline, model_hash, one_line, os_error_line)

DEFAULT_PROMPT = "a painting of a virus monster playing the guitar"  # CompVis' default
SAMPLER_FLAGS = {"plms": "pndm", "dpm_solver": "dpmpp_2m"}
MAX_SIDE = 16384  # pixels: sdjax.pipelines.base.MAX_SIDE, here to refuse --H 100000 before JAX is imported


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UsageError(f"{message} (see {self.prog} --help)")  # prog: "sdjax" or "sdjax txt2img"


def _add_single_file_flags(p: argparse.ArgumentParser):
    p.add_argument("--model-config", dest="model_config",
                   help="single-file --ckpt: a diffusers folder whose configs to use, or a built-in name (sd15, "
                        "sd15-inpainting, sd21, sd21-base, sd2-inpainting, sdxl, sdxl-refiner, x4-upscaler); default: "
                        "detected from the file")
    p.add_argument("--prediction-type", dest="prediction_type", choices=["eps", "v"],
                   help="single-file --ckpt: the model's prediction type (SD 2.x files do not say; default: detected)")


def _add_prompt_syntax_flags(p: argparse.ArgumentParser):
    p.add_argument("--prompt-syntax", dest="prompt_syntax", choices=["a1111", "plain"],
                   help="a1111 (default): (word:1.3) / (word) / [word] weights, \\( \\) escapes, BREAK, as "
                        "AUTOMATIC1111; plain: the text as it is (prompts and negative prompt alike)")
    p.add_argument("--emphasis", choices=["original", "none"],
                   help="with --prompt-syntax a1111: original (default; weighted chunks keep their mean) or none")
    p.add_argument("--clip-skip", dest="clip_skip", type=int, metavar="N",
                   help="A1111's Clip skip: read prompts N-1 text-encoder layers before the last (default 1: the "
                        "last; 2 for many anime models); prompts and negative prompt alike")


def _add_embedding_flag(p: argparse.ArgumentParser):
    p.add_argument("--embedding", action="append",
                   help="a textual-inversion embedding, FILE or FILE:TOKEN (repeatable): A1111 .pt, .safetensors "
                        "(emb_params, or SDXL clip_l/clip_g), diffusers learned_embeds; prompts use TOKEN (default: "
                        "the name the file gives, else its file name without extension)")
    p.add_argument("--embeddings-dir", dest="embeddings_dir", action="append", metavar="DIR",
                   help="A1111's embeddings folder: every embedding file there (and below) whose name without "
                        "extension a prompt or the negative prompt uses is loaded under that name; repeatable")


def _add_generation_flags(p: argparse.ArgumentParser, mode: str):
    p.add_argument("--prompt", help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--from-file", dest="from_file", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", dest="negative_prompt", help="what the images should not show")
    _add_prompt_syntax_flags(p)
    p.add_argument("--n_samples", type=int, help="images per prompt in one batch (default 3)")
    p.add_argument("--n_iter", type=int, help="how many batches per prompt (default 2)")
    p.add_argument("--H", type=int, help="image height in pixels (default: the model's size)")
    p.add_argument("--W", type=int, help="image width in pixels (default: the model's size)")
    p.add_argument("--scale", type=float, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--ddim_steps", type=int, help="sampling steps (default 50)")
    p.add_argument("--seed", type=int, help="seed; iteration i of a prompt uses seed + i (default 42)")
    p.add_argument("--outdir", help=f"output folder (default outputs/{mode}-samples)")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid of the run's images")
    p.add_argument("--plms", action="store_true", help="sample with PLMS (same as --sampler pndm)")
    p.add_argument("--dpm_solver", action="store_true", help="sample with DPM-Solver++ 2M (--sampler dpmpp_2m)")
    p.add_argument("--sampler", help="sampler name: ddim, pndm, dpmpp_2m, dpmpp_2m_karras, euler, euler_a, lms, "
                                     "heun, ddpm, unipc (default ddim)")
    p.add_argument("--ckpt", help="a diffusers pipeline folder, hub id, or single-file checkpoint (.safetensors, "
                                  ".ckpt: read without running pickled code) (default: the shipped model)")
    _add_single_file_flags(p)
    p.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="a LoRA / LyCORIS file (kohya, diffusers/PEFT, LoHa, LoKr) and its weight (default 1); "
                        "repeat for several")
    p.add_argument("--lora-dir", dest="lora_dir", action="append", metavar="DIR",
                   help="the folder (and its subfolders) where a prompt's <lora:NAME:WEIGHT> tags find "
                        "NAME.safetensors (A1111's syntax; also <lora:NAME:TE_WEIGHT:UNET_WEIGHT>); repeat for several")
    p.add_argument("--precision", choices=["full", "autocast"],
                   help="full = float32, autocast = bfloat16 (default: autocast on accelerators, full on CPU)")
    p.add_argument("--config", help="a YAML run config; flags given here override its values")
    _add_embedding_flag(p)
    p.add_argument("--attention-chunking", dest="attention_chunking", action="store_true",
                   help="compute attention in chunks of 1024 queries: same images, less memory (large sizes)")
    p.add_argument("--vae-tiling", dest="vae_tiling", action="store_true",
                   help="decode large images tile by tile (diffusers' tiled decode): less memory")
    p.add_argument("--rerank-model", dest="rerank_model", help="a CLIP model folder for reranking")
    p.add_argument("--n-candidates", dest="n_candidates", type=int,
                   help="generate this many images per prompt and iteration, keep the best by CLIP score")
    p.add_argument("--keep", type=int, help="with --n-candidates: how many to keep (default 1)")
    p.add_argument("--resume", action="store_true", help="continue a killed run with the same flags in outdir")
    p.add_argument("--prompts-per-batch", dest="prompts_per_batch", type=int,
                   help="prompts generated together in one batch (fills more devices)")
    p.add_argument("--coordinator", help="multi-host: process 0's HOST:PORT, the same in every process ('auto': "
                                         "JAX's cluster detection; Cloud TPU VMs need no flags)")
    p.add_argument("--num-processes", dest="num_processes", type=int, help="multi-host: how many processes in all")
    p.add_argument("--process-id", dest="process_id", type=int,
                   help="multi-host: this process's index, 0 to --num-processes - 1")
    if mode in ("img2img", "inpaint"):
        p.add_argument("--init-img", dest="init_img", required=True, help="the starting image")
        p.add_argument("--strength", type=float,
                       help="how much to change it, in (0, 1] (default 0.75 img2img, 1.0 inpaint)")
    if mode == "inpaint":
        p.add_argument("--mask", required=True, help="mask image: white = repaint, black = keep")
    if mode == "txt2img":
        p.add_argument("--refiner", help="an SDXL refiner folder or single file: with an SDXL --ckpt, the base denoises the first "
                                         "--high-noise-frac of the schedule, the refiner the rest (in latent space)")
        p.add_argument("--refiner-steps", dest="refiner_steps", type=int,
                       help="the refiner's schedule length, of which it runs the part after --high-noise-frac "
                            "(default: --ddim_steps)")
        p.add_argument("--high-noise-frac", dest="high_noise_frac", type=float,
                       help="with --refiner: the fraction of the schedule the base denoises, in (0, 1) (default 0.8)")


DEFAULTS = dict(n_samples=3, n_iter=2, scale=7.5, ddim_steps=50, seed=42, sampler="ddim", keep=1,
                prompt_syntax="a1111", emphasis="original", clip_skip=1)
CONFIG_KEYS = {  # YAML key -> flag dest
    "model": "ckpt", "ckpt": "ckpt", "sampler": "sampler", "steps": "ddim_steps", "ddim_steps": "ddim_steps",
    "scale": "scale", "H": "H", "W": "W", "height": "H", "width": "W", "precision": "precision",
    "seed": "seed", "n_samples": "n_samples", "n_iter": "n_iter", "negative_prompt": "negative_prompt",
    "rerank_model": "rerank_model", "n_candidates": "n_candidates", "keep": "keep", "strength": "strength",
    "mesh": "mesh", "prompts_per_batch": "prompts_per_batch",
    "refiner": "refiner", "refiner_steps": "refiner_steps", "high_noise_frac": "high_noise_frac",
    "noise_level": "noise_level", "tile_size": "tile_size", "tile_overlap": "tile_overlap",
    "model_config": "model_config", "prediction_type": "prediction_type",
    "prompt_syntax": "prompt_syntax", "emphasis": "emphasis", "lora": "lora", "lora_dir": "lora_dir",
    "embeddings_dir": "embeddings_dir", "embedding": "embedding", "clip_skip": "clip_skip",
    "embeddings": "embedding", "attention_chunking": "attention_chunking", "vae_tiling": "vae_tiling",
}


INT_SETTINGS = {"n_samples", "n_iter", "ddim_steps", "H", "W", "seed", "n_candidates", "keep", "prompts_per_batch",
                "refiner_steps", "noise_level", "tile_size", "tile_overlap", "clip_skip"}
FLOAT_SETTINGS = {"scale", "strength", "high_noise_frac"}


def _config_value_error(key: str, value) -> str | None:
    """What is wrong with the type of a --config value (None if nothing); ranges are checked with the flags'."""
    dest = CONFIG_KEYS[key]
    if dest in INT_SETTINGS:
        if isinstance(value, bool) or not isinstance(value, int):
            return "an integer"
    elif dest in FLOAT_SETTINGS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "a finite number"
    elif dest in ("attention_chunking", "vae_tiling"):
        if not isinstance(value, bool):
            return "true or false"
    elif dest == "mesh":
        if not isinstance(value, (dict, int, str)) or isinstance(value, bool):
            return "a mapping such as {data: -1}, or a device count"
    elif not isinstance(value, str):
        return "a string"
    return None


def load_config(path: str) -> dict:
    """A YAML run config as settings {flag dest: value}: known keys only, values of the right types (null: as if
    the key were not there)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig")) or {}
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it: {os_error_line(e)}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--config {path}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of settings")
    unknown = sorted(str(k) for k in set(data) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(f"--config {path}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(CONFIG_KEYS))})")
    data = {k: v for k, v in data.items() if v is not None}
    for key, value in data.items():
        expected = _config_value_error(key, value)
        if expected:
            raise UsageError(f"--config {path}: {key} must be {expected}, got {value!r}")
    return {CONFIG_KEYS[k]: v for k, v in data.items()}


def resolve_settings(args: argparse.Namespace, mode: str) -> dict:
    """Flags over config file over defaults; then checks that need no model."""
    from sdjax.samplers import SAMPLERS

    s = dict(DEFAULTS, strength=1.0 if mode == "inpaint" else 0.75)
    if args.config:
        s.update(load_config(args.config))
    for k, v in vars(args).items():
        if v is not None and v is not False:
            s[k] = v
    chosen = [flag for flag in SAMPLER_FLAGS if s.get(flag)]
    if len(chosen) > 1:
        raise UsageError("--plms and --dpm_solver each choose a sampler: give one of them")
    if chosen:
        name = SAMPLER_FLAGS[chosen[0]]
        if getattr(args, "sampler", None) not in (None, name):
            raise UsageError(f"--{chosen[0]} chooses {name} but --sampler says {args.sampler}: give one of them")
        s["sampler"] = name
    if s.get("prompts_per_batch") is not None and int(s["prompts_per_batch"]) < 1:
        raise UsageError(f"--prompts-per-batch must be at least 1, got {s['prompts_per_batch']}")
    if s["sampler"] not in SAMPLERS:
        raise UsageError(f"unknown sampler {s['sampler']!r}; valid: {', '.join(SAMPLERS)}")
    for key in ("scale", "strength", "high_noise_frac"):  # NaN would pass every range check below
        value = s.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise UsageError(f"--{key.replace('_', '-')} must be a finite number, got {value!r}")
    if not 0 <= int(s["seed"]) < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {s['seed']}")
    for key, flag in (("n_samples", "--n_samples"), ("n_iter", "--n_iter"), ("ddim_steps", "--ddim_steps")):
        if int(s[key]) < 1:
            raise UsageError(f"{flag} must be at least 1, got {s[key]}")
    for key in ("H", "W"):
        if s.get(key) is not None and not 1 <= int(s[key]) <= MAX_SIDE:
            raise UsageError(f"--{key} must be between 1 and {MAX_SIDE} pixels, got {s[key]}")
    if s.get("n_candidates") is not None:
        if int(s["n_candidates"]) < 1:
            raise UsageError(f"--n-candidates must be at least 1, got {s['n_candidates']}")
        if int(s["keep"]) < 1 or int(s["keep"]) > int(s["n_candidates"]):
            raise UsageError(f"--keep must be between 1 and --n-candidates ({s['n_candidates']}), got {s['keep']}")
        if not s.get("rerank_model"):
            raise UsageError("--n-candidates needs --rerank-model (a CLIP model folder) to choose the best")
    if mode != "txt2img" and not (0.0 < float(s["strength"]) <= 1.0):
        raise UsageError(f"--strength must be in (0, 1], got {s['strength']}")
    if s["prompt_syntax"] not in ("a1111", "plain"):
        raise UsageError(f"prompt_syntax must be a1111 or plain, got {s['prompt_syntax']!r}")
    if s["emphasis"] not in ("original", "none"):
        raise UsageError(f"emphasis must be original or none, got {s['emphasis']!r}")
    if int(s["clip_skip"]) < 1:
        raise UsageError(f"--clip-skip must be at least 1 (1: the text encoder's last layer), got {s['clip_skip']}")
    if s.get("precision") not in (None, "full", "autocast"):
        raise UsageError(f"precision must be full or autocast, got {s['precision']!r}")
    _check_refiner_settings(s, mode)
    return s


def _check_refiner_settings(s: dict, mode: str) -> None:
    given = [f"--{k.replace('_', '-')}" for k in ("refiner", "refiner_steps", "high_noise_frac")
             if s.get(k) is not None]
    if not given:
        return
    if mode != "txt2img":
        raise UsageError(f"{', '.join(given)}: the SDXL refiner hand-off is for txt2img only")
    if not s.get("refiner"):
        raise UsageError(f"{', '.join(given)} needs --refiner (an SDXL refiner folder)")
    frac = s.get("high_noise_frac")
    frac = HIGH_NOISE_FRAC if frac is None else frac
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 < float(frac) < 1.0:
        raise UsageError(f"--high-noise-frac must be strictly between 0 and 1, got {frac}")
    s["high_noise_frac"] = float(frac)
    steps = s.get("refiner_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UsageError(f"--refiner-steps must be an integer of at least 1, got {steps}")
    refiner = Path(str(s["refiner"])).expanduser()
    if not refiner.exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(s["refiner"])):  # a hub id is fetched
        raise UsageError(f"--refiner {s['refiner']}: no such folder or file (give an SDXL refiner pipeline folder or "
                         "single-file checkpoint)")


def read_prompts(s: dict) -> list[str]:
    if s.get("from_file"):
        path = Path(s["from_file"])
        if path.is_dir():
            raise UsageError(f"--from-file {path}: a folder, not a text file")
        if not path.is_file():
            raise UsageError(f"--from-file {path}: no such file")
        try:
            # utf-8-sig: a byte order mark (Windows editors write one) is not part of the first prompt; splitlines
            # takes CRLF line ends as one
            prompts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise UsageError(f"--from-file {path}: not a UTF-8 text file") from None
        except OSError as e:
            raise UsageError(f"--from-file {path}: cannot read it: {os_error_line(e)}") from None
        if not prompts:
            raise UsageError(f"--from-file {path}: the file has no prompts (one prompt per line)")
        return prompts
    # CompVis' default prompt only when none is given: an explicit empty prompt is generated as it is (unconditional)
    return [DEFAULT_PROMPT if s.get("prompt") is None else s["prompt"]]


def _check_image(path: str, flag: str) -> tuple[int, int]:
    """The (width, height) of an image file, upright (EXIF orientation); one line if it cannot be used."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            size = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that turn the image a quarter
                size = size[::-1]
    except Image.DecompressionBombError as e:
        raise UsageError(f"{flag} {path}: {one_line(e)}") from None
    except PermissionError as e:
        raise UsageError(f"{flag} {path}: cannot read it: {os_error_line(e)}") from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise UsageError(f"{flag} {path}: not an image PIL can read (PNG, JPEG, ...)") from None
    if max(size) > MAX_SIDE:
        raise UsageError(f"{flag} {path}: {size[0]}x{size[1]} pixels, larger than sdjax takes ({MAX_SIDE} pixels a "
                         "side); make it smaller first")
    return size


def run_size(s: dict, image_size: tuple[int, int], f: int, max_pixels: int | None) -> tuple[int, int]:
    """(height, width) of an img2img/inpaint run: --H/--W where given (the image is resized to them), else the
    init image's size in multiples of `f`, scaled down where it is larger than `max_pixels`. A line on stderr
    says when the image is resized."""
    width, height = image_size
    if s.get("H") is None and s.get("W") is None:
        scale = min(1.0, math.sqrt(max_pixels / (width * height))) if max_pixels else 1.0
        h, w = max(int(height * scale) // f * f, f), max(int(width * scale) // f * f, f)
        reason = f"larger than {max_pixels / 1e6:.3g} megapixels per device; give --H and --W to choose the size"
        if scale == 1:  # rounded to the VAE factor only, as the library does: not worth a line
            return h, w
    else:
        h = int(s.get("H") or round(height * int(s["W"]) / width / f) * f or f)
        w = int(s.get("W") or round(width * int(s["H"]) / height / f) * f or f)
        reason = "--H and --W"
    if (h, w) != (height, width):
        print(f"sdjax: --init-img is {width}x{height}: resized to {w}x{h} ({reason})", file=sys.stderr)
    return h, w


def load_refiner(s: dict, base, precision: str):
    """The SDXL refiner of `--refiner`, loaded like the base (same precision and devices); the base must be SDXL."""
    from sdjax.pipelines.sdxl import StableDiffusionXLPipeline

    if not isinstance(base, StableDiffusionXLPipeline):
        raise UsageError(f"--refiner needs an SDXL base model; --ckpt {s.get('ckpt') or default_model()} is not SDXL "
                         "(no text_encoder_2)")
    refiner, _, _ = load_pipeline(dict(precision=precision, refiner=s["refiner"]), key="refiner", mesh=base.mesh)
    if not isinstance(refiner, StableDiffusionXLPipeline):
        raise UsageError(f"--refiner {s['refiner']}: cannot load an SDXL pipeline from it (it is a "
                         f"{type(refiner).__name__})")
    if (refiner.vae_scale_factor, refiner.latent_channels) != (base.vae_scale_factor, base.latent_channels):
        raise UsageError(f"--refiner {s['refiner']}: its VAE latents differ from the base's; they cannot be handed "
                         "over")
    try:  # before any image: each side must get at least one step
        base.handoff_steps(refiner, s["high_noise_frac"], sampler=s["sampler"],
                           num_inference_steps=int(s["ddim_steps"]), refiner_num_inference_steps=s.get("refiner_steps"))
    except ValueError as e:
        raise UsageError(f"--refiner: {one_line(e)} (--high-noise-frac, --ddim_steps, --refiner-steps)") from None
    return refiner


def start_processes(s: dict) -> tuple[int, int]:
    """jax.distributed from --coordinator / --num-processes / --process-id or the environment (sdjax.distributed);
    (process index, process count). Before anything uses a JAX device."""
    from sdjax.distributed import DistributedError, initialize

    try:
        return initialize(s.get("coordinator"), s.get("num_processes"), s.get("process_id"))
    except DistributedError as e:
        raise UsageError(one_line(e)) from None


def check_clip_skip(s: dict, pipe) -> None:
    """--clip-skip against the loaded model's text encoder (before any image)."""
    top = pipe.clip_skip_limit() + 1
    if int(s["clip_skip"]) > top:
        raise UsageError(f"--clip-skip {s['clip_skip']}: this model's text encoder allows 1 to {top}")


def set_memory_savers(pipe, s: dict) -> None:
    """--attention-chunking and --vae-tiling."""
    if s.get("attention_chunking"):
        pipe.enable_attention_chunking()
    if s.get("vae_tiling"):
        pipe.enable_vae_tiling()


def cmd_generate(args, mode: str) -> int:
    from sdjax.bulk import RunSpec, prepare_outdir, run_bulk
    from sdjax.pipelines.base import ImageTooLargeError

    s = resolve_settings(args, mode)
    prompts = read_prompts(s)
    image_size = None
    if mode != "txt2img":
        image_size = _check_image(s["init_img"], "--init-img")
    if mode == "inpaint":
        _check_image(s["mask"], "--mask")
    outdir = Path(s.get("outdir") or f"outputs/{mode}-samples")
    process, n_processes = start_processes(s)  # bad --num-processes/--process-id flags: refused before any write
    try:  # before the model loads: a folder that cannot take the images fails at once
        prepare_outdir(outdir)
    except OSError as e:
        raise UsageError(f"--outdir {outdir}: {os_error_line(e)}") from None
    pipe, precision, ckpt = load_pipeline(s)
    set_memory_savers(pipe, s)
    check_clip_skip(s, pipe)
    from sdjax.pipelines.upscale import StableDiffusionUpscalePipeline

    if isinstance(pipe, StableDiffusionUpscalePipeline):
        raise UsageError(f"--ckpt {ckpt} is an x4 upscaler: use sdjax upscale --init-img ...")
    lora, lora_dir = s.get("lora") or [], s.get("lora_dir") or []
    loras = PromptLoras(pipe, [lora] if isinstance(lora, str) else lora,
                        [lora_dir] if isinstance(lora_dir, str) else lora_dir)
    for prompt in prompts:  # every tag's file found and loaded: a bad one fails before any image
        loras.split(prompt)
    refiner = load_refiner(s, pipe, precision) if s.get("refiner") else None
    load_embeddings(s.get("embedding"), pipe, refiner, s.get("embeddings_dir"),
                    [*prompts, s.get("negative_prompt") or ""])
    f = pipe.vae_scale_factor
    for key in ("H", "W"):
        if s.get(key) is not None and int(s[key]) % f:
            raise UsageError(f"--{key} {s[key]} is not a multiple of {f} (this model's VAE factor); "
                             f"try {int(s[key]) // f * f or f}")
    per_call = int(s.get("n_candidates") or s["n_samples"]) * int(s.get("prompts_per_batch") or 1)
    limit = pipe.max_pixels()
    if image_size is not None:
        per_device = -(-per_call // pipe.mesh.devices.size)
        s["H"], s["W"] = run_size(s, image_size, f, limit and limit // per_device)
    try:
        pipe.check_size(int(s.get("H") or pipe.default_size), int(s.get("W") or pipe.default_size), per_call)
    except ImageTooLargeError as e:
        raise UsageError(f"--H/--W/--n_samples: {e.pixels / 1e6:.3g} megapixels per device, above the limit of "
                         f"{e.limit / 1e6:.3g}; make fewer or smaller images per batch, or add --attention-chunking "
                         "and --vae-tiling (each doubles the limit)") from None
    reranker = None
    if s.get("n_candidates"):
        import jax

        from sdjax.distributed import data_mesh
        from sdjax.rerank import CLIPReranker

        try:
            # with several processes every one scores all candidates of a prompt on its own devices
            local = data_mesh(jax.local_devices()) if n_processes > 1 else None
            reranker = CLIPReranker.from_pretrained(s["rerank_model"], mesh=local)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise UsageError(f"--rerank-model {s['rerank_model']}: cannot load: {one_line(e)}") from None
    spec = RunSpec(
        prompts=tuple(prompts), negative_prompt=s.get("negative_prompt") or "", n_samples=int(s["n_samples"]),
        n_iter=int(s["n_iter"]), height=s.get("H"), width=s.get("W"), steps=int(s["ddim_steps"]),
        scale=float(s["scale"]), sampler=s["sampler"], seed=int(s["seed"]), model=Path(ckpt).name or str(ckpt),
        model_hash=model_hash(ckpt),
        n_candidates=s.get("n_candidates"), keep=int(s["keep"]) if s.get("n_candidates") else None, mode=mode,
        strength=float(s["strength"]), init_image=s.get("init_img"), mask=s.get("mask"),
        prompt_syntax=s["prompt_syntax"], emphasis=s["emphasis"], clip_skip=int(s["clip_skip"]),
        loras=loras.activate(),
        **({} if refiner is None else dict(
            refiner=Path(str(s["refiner"])).name or str(s["refiner"]), high_noise_frac=s["high_noise_frac"],
            refiner_steps=int(s.get("refiner_steps") or s["ddim_steps"]))),
    )
    try:
        records = run_bulk(pipe, spec, outdir, reranker=reranker, skip_grid=bool(s.get("skip_grid")),
                           resume=bool(s.get("resume")), prompts_per_call=int(s.get("prompts_per_batch") or 1),
                           precision=precision, refiner=refiner, loras=loras)
    except ValueError as e:  # the pipeline's checks of the request
        raise UsageError(one_line(e)) from None
    if n_processes > 1:
        print(f"sdjax: process {process} of {n_processes}: {len(records)} images saved in {outdir / 'samples'}"
              f"{'; manifest.jsonl merged' if process == 0 else ''}")
    else:
        print(f"sdjax: {len(records)} images saved in {outdir / 'samples'}")
    return 0


def cmd_rerank(args) -> int:
    from PIL import Image

    from sdjax.rerank import CLIPReranker

    folder = Path(args.dir)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise UsageError(f"{folder}: no images (.png, .jpg, .jpeg, .webp)")
    if not args.model:
        raise UsageError("--model is required: a CLIP model folder (transformers layout)")
    try:
        reranker = CLIPReranker.from_pretrained(args.model)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"--model {args.model}: cannot load: {one_line(e)}") from None
    images = []
    for p in files:
        try:
            images.append(Image.open(p).convert("RGB"))
        except OSError:
            raise UsageError(f"{p}: not an image PIL can read") from None
    scores = reranker.score(images, args.prompt)
    order = sorted(range(len(files)), key=lambda i: -scores[i])
    result = [dict(file=files[i].name, score=float(scores[i]), rank=r) for r, i in enumerate(order)]
    for r in result:
        print(f"{r['score']:.4f}\t{r['file']}")
    out = folder / "rerank.jsonl"
    with open(out, "a") as f:
        for r in result:
            f.write(json.dumps(dict(r, prompt=args.prompt)) + "\n")
    return 0


def cmd_train(args) -> int:
    """`sdjax train vae|clip|unet`: one stage of `sdjax.train.train_stage`."""
    import numpy as np

    from sdjax.train import TrainConfig, train_stage

    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise UsageError(f"--lr must be a finite number above 0, got {args.lr}")
    for flag, value in (("--warmup", args.warmup), ("--checkpoint-every", args.checkpoint_every)):
        if value < (0 if flag == "--warmup" else 1):
            raise UsageError(f"{flag} must be at least {0 if flag == '--warmup' else 1}, got {value}")
    for flag, value in (("--data", args.data), ("--vae", args.vae), ("--clip", args.clip),
                        ("--pipeline", args.pipeline)):
        if value is not None and not Path(value).is_dir():
            raise UsageError(f"{flag} {value}: no such folder")
    if args.data is not None and not (Path(args.data) / "captions.jsonl").is_file():
        raise UsageError(f"--data {args.data}: no captions.jsonl (one {{\"file\": ..., \"caption\": ...}} per line)")
    if args.stage == "unet" and args.pipeline is None and (args.vae is None or args.clip is None):
        raise UsageError("train unet needs --vae and --clip (trained folders), or --pipeline to fine-tune")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup=min(args.warmup, max(args.steps - 1, 1)), seed=args.seed,
                      checkpoint_every=args.checkpoint_every)
    # its failures (a file as --out, data outside --data, a diverging loss, checkpoints that do not fit --resume)
    # are ValueError/OSError: one line from main
    result = train_stage(args.stage, args.out, cfg, data=args.data, vae=args.vae, clip=args.clip,
                         pipeline=args.pipeline, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                         dtype=np.float16 if args.fp16 else None)
    losses = result["losses"]
    print(f"sdjax: {args.stage} trained {args.steps} steps (last loss {float(losses[-1]):.4f}); "
          f"saved in {result['out']}")
    return 0


def cmd_eval_tiny(args) -> int:
    """`sdjax eval-tiny`: prompt-following accuracy on the held-out shapes combinations."""
    from sdjax.evaluate import evaluate_tiny, markdown_table, save_result

    if args.n_candidates < 1 or args.steps < 1:
        raise UsageError("--n-candidates and --steps must be at least 1")
    ckpt = args.ckpt or default_model()
    if not ckpt:
        raise UsageError("no --ckpt given and no default model is installed")
    try:
        result = evaluate_tiny(ckpt, args.rerank_model, n_candidates=args.n_candidates, steps=args.steps,
                               scale=args.scale, seed=args.seed, save_dir=args.save_images)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(one_line(e)) from None
    print(markdown_table(result))
    if args.json:
        save_result(result, args.json)
    return 0


UPSCALE_DEFAULTS = dict(ddim_steps=75, scale=9.0, n_samples=1, noise_level=20)  # diffusers' upscaler defaults


def _add_upscale_parser(sub) -> None:
    u = sub.add_parser("upscale", help="x4 super-resolution of an image with a Stable Diffusion x4 upscaler")
    u.add_argument("--init-img", dest="init_img", required=True, help="the low-res image")
    u.add_argument("--prompt", help="what the image shows (default: empty)")
    u.add_argument("--from-file", dest="from_file", help="a text file with one prompt per line (an upscale each)")
    u.add_argument("--negative-prompt", dest="negative_prompt", help="what the upscale should not show")
    _add_prompt_syntax_flags(u)
    u.add_argument("--ckpt", help="a diffusers x4 upscaler folder, hub id (e.g. "
                                  "stabilityai/stable-diffusion-x4-upscaler) or single-file checkpoint (required: none "
                                  "ships with sdjax)")
    _add_single_file_flags(u)
    u.add_argument("--outdir", help="output folder (default outputs/upscale-samples)")
    u.add_argument("--noise-level", dest="noise_level", type=int,
                   help="noise added to the low-res image, 0 to the model's max_noise_level (default 20)")
    u.add_argument("--ddim_steps", type=int, help="sampling steps (default 75)")
    u.add_argument("--scale", type=float, help="classifier-free guidance scale (default 9.0)")
    u.add_argument("--seed", type=int, help="seed (default 42)")
    u.add_argument("--sampler", help="sampler name, as txt2img's --sampler (default ddim)")
    u.add_argument("--n_samples", type=int, help="upscales per prompt (default 1)")
    u.add_argument("--tile-size", dest="tile_size", type=int,
                   help="tile side in low-res pixels: larger inputs are upscaled in overlapping tiles (default: "
                        "the UNet's sample_size, 128 for the x4 upscaler)")
    u.add_argument("--tile-overlap", dest="tile_overlap", type=int,
                   help="least overlap of neighbouring tiles in low-res pixels (default: tile size / 4)")
    u.add_argument("--precision", choices=["full", "autocast"],
                   help="full = float32, autocast = bfloat16 (default: autocast on accelerators, full on CPU)")
    u.add_argument("--config", help="a YAML run config (e.g. configs/x4_upscaler.yaml); flags override it")
    _add_embedding_flag(u)


def cmd_upscale(args) -> int:
    """`sdjax upscale`: `sdjax.bulk.upscale_to_folder` on --init-img, once per prompt."""
    from sdjax.bulk import prepare_outdir, upscale_to_folder
    from sdjax.pipelines.upscale import StableDiffusionUpscalePipeline

    given = load_config(args.config) if args.config else {}
    for key, value in UPSCALE_DEFAULTS.items():  # where neither a flag nor the config sets them
        if getattr(args, key) is None and key not in given:
            setattr(args, key, value)
    s = resolve_settings(args, "upscale")
    prompts = read_prompts(s) if s.get("from_file") else [s.get("prompt") or ""]
    _check_image(s["init_img"], "--init-img")
    for key, least in (("noise_level", 0), ("tile_size", 8), ("tile_overlap", 0)):
        value = s.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise UsageError(f"--{key.replace('_', '-')} must be an integer of at least {least}, got {value!r}")
    if not s.get("ckpt"):
        raise UsageError("upscale needs --ckpt: a diffusers x4 upscaler folder or hub id (e.g. "
                         "stabilityai/stable-diffusion-x4-upscaler); no upscaler ships with sdjax")
    outdir = Path(s.get("outdir") or "outputs/upscale-samples")
    try:  # before the model loads
        prepare_outdir(outdir)
    except OSError as e:
        raise UsageError(f"--outdir {outdir}: {os_error_line(e)}") from None
    pipe, precision, ckpt = load_pipeline(s)
    if not isinstance(pipe, StableDiffusionUpscalePipeline):
        raise UsageError(f"--ckpt {ckpt}: not an x4 upscaler (its model_index.json has no low_res_scheduler)")
    check_clip_skip(s, pipe)
    load_embeddings(s.get("embedding"), pipe, dirs=s.get("embeddings_dir"),
                    texts=[*prompts, s.get("negative_prompt") or ""])
    tile_size = s.get("tile_size") or pipe.unet.config.sample_size
    if s.get("tile_overlap") is not None and s["tile_overlap"] >= tile_size:
        raise UsageError(f"--tile-overlap {s['tile_overlap']} must be smaller than the tile size {tile_size}")
    try:
        records = upscale_to_folder(
            pipe, s["init_img"], prompts, outdir, negative_prompt=s.get("negative_prompt") or "",
            n_samples=int(s["n_samples"]), steps=int(s["ddim_steps"]), scale=float(s["scale"]),
            noise_level=int(s["noise_level"]), sampler=s["sampler"], seed=int(s["seed"]), tile_size=int(tile_size),
            tile_overlap=s.get("tile_overlap"), model=Path(ckpt).name or str(ckpt), precision=precision,
            model_hash=model_hash(ckpt), prompt_syntax=s["prompt_syntax"], emphasis=s["emphasis"],
            clip_skip=int(s["clip_skip"]))
    except ValueError as e:  # the pipeline's checks of the request (noise level above the model's maximum, ...)
        raise UsageError(one_line(e)) from None
    print(f"sdjax: {len(records)} images saved in {outdir / 'samples'}")
    return 0


def cmd_convert(args) -> int:
    """`sdjax convert FILE OUT_DIR`: `sdjax.pipelines.single_file.convert`."""
    from sdjax.app import PREDICTION_TYPES
    from sdjax.pipelines.single_file import convert

    if not Path(args.file).expanduser().is_file():
        raise UsageError(f"{args.file}: no such file")
    try:
        out = convert(args.file, args.out_dir, config=args.model_config, extract_ema=args.extract_ema,
                      prediction_type=PREDICTION_TYPES.get(args.prediction_type))
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as e:
        raise UsageError(f"convert {args.file}: {one_line(e)}") from None
    print(f"sdjax: wrote {out} (a diffusers folder)")
    return 0


def _add_train_parsers(sub) -> None:
    t = sub.add_parser("train", help="train a VAE, CLIP or UNet (synthetic shapes, or --data images)")
    t.add_argument("stage", choices=["vae", "clip", "unet"])
    t.add_argument("--out", required=True, help="output folder (unet: a whole diffusers pipeline)")
    t.add_argument("--data", help="folder of images + captions.jsonl (default: the synthetic shapes data set)")
    t.add_argument("--vae", help="unet: a trained VAE folder")
    t.add_argument("--clip", help="unet: a trained CLIP folder (its text tower conditions the UNet)")
    t.add_argument("--pipeline", help="unet: fine-tune this pipeline's UNet (uses its VAE and text encoder)")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="global batch (split over devices)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-dir", dest="checkpoint_dir", help="default: <out>.checkpoints next to --out")
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=200)
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    t.add_argument("--fp16", action="store_true", help="store the weights in float16")
    e = sub.add_parser("eval-tiny", help="prompt-following accuracy of a shapes model on held-out combinations")
    e.add_argument("--ckpt", help="pipeline folder (default: the shipped model)")
    e.add_argument("--rerank-model", dest="rerank_model", help="CLIP folder (default: the shipped CLIP)")
    e.add_argument("--n-candidates", dest="n_candidates", type=int, default=4)
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--scale", type=float, default=7.5)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="also write all results to this JSON file")
    e.add_argument("--save-images", dest="save_images", help="also save every generated image in this folder")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdjax", description="Stable Diffusion in JAX")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for mode in ("txt2img", "img2img", "inpaint"):
        _add_generation_flags(sub.add_parser(mode, help=f"{mode} bulk run"), mode)
    r = sub.add_parser("rerank", help="score and order the images of a folder by CLIP similarity to a prompt")
    r.add_argument("dir")
    r.add_argument("--prompt", required=True)
    r.add_argument("--model", "--rerank-model", dest="model", help="a CLIP model folder")
    d = sub.add_parser("demo", help='a Gradio web UI (needs: pip install "sdjax[demo]")')
    d.add_argument("--ckpt", help="a diffusers pipeline folder or hub id (default: the shipped model)")
    d.add_argument("--rerank-model", dest="rerank_model",
                   help="a CLIP model folder for ordering candidates (default: the shipped CLIP, if any)")
    d.add_argument("--refiner", help="a second pipeline folder (optional): an SDXL refiner continues an SDXL base's "
                                     "latents; any other runs as an img2img pass over the images")
    d.add_argument("--lora-dir", dest="lora_dir", action="append", metavar="DIR",
                   help="the folder (and its subfolders) of the LoRA files prompts name with <lora:NAME:WEIGHT>")
    d.add_argument("--embeddings-dir", dest="embeddings_dir", action="append", metavar="DIR",
                   help="A1111's embeddings folder: embeddings a prompt or negative prompt names by file name")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    d.add_argument("--port", type=int, help="port (default: 7860 or the next free one)")
    _add_train_parsers(sub)
    _add_upscale_parser(sub)
    c = sub.add_parser("convert", help="write a single-file checkpoint (.safetensors, .ckpt) as a diffusers folder")
    c.add_argument("file", help="the single-file checkpoint")
    c.add_argument("out_dir", help="the diffusers folder to write (must not exist)")
    _add_single_file_flags(c)
    c.add_argument("--extract-ema", dest="extract_ema", action="store_true",
                   help="use the EMA UNet weights of a training checkpoint")
    for name, command in sub.choices.items():
        if name not in NO_COMPILE_COMMANDS:
            command.add_argument("--no-compile-cache", dest="no_compile_cache", action="store_true",
                                 help="do not keep compiled programs on disk (default: kept in "
                                      "$SDJAX_COMPILE_CACHE or ~/.cache/sdjax/jax-compile; SDJAX_COMPILE_CACHE=off "
                                      "turns it off too)")
    return parser


INTERRUPTED = "sdjax: interrupted"
RESUMABLE = {"txt2img", "img2img", "inpaint", "train"}  # the commands with --resume
NO_COMPILE_COMMANDS = ("convert",)  # subcommands that compile nothing worth keeping


def use_compile_cache(args) -> None:
    """JAX's persistent compilation cache for this run (sdjax.compile_cache), before anything compiles; a directory
    that cannot be used is one line on stderr, and the run goes on."""
    import warnings

    from sdjax.compile_cache import CompileCacheWarning, setup

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileCacheWarning)
        setup(enabled=not getattr(args, "no_compile_cache", False))
    for w in caught:
        if issubclass(w.category, CompileCacheWarning):
            print(f"sdjax: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def main(argv=None) -> int:
    """The `sdjax` command. Expected failures (`sdjax.app.failure_line`) end with one line on stderr and exit code 2.
    From the shell (argv None), Ctrl-C ends the process at once with exit code 130 and one line, never in the
    middle of writing a file (`sdjax.interrupts`); called with argv (in-process), a KeyboardInterrupt returns 130."""
    from sdjax import interrupts

    if argv is None:  # first, before the heavy imports: from here on Ctrl-C never raises
        interrupts.install(INTERRUPTED)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command in RESUMABLE:
            interrupts.set_message(f"{INTERRUPTED} (run the same command with --resume to continue)")
        if args.command is None:
            parser.print_help()
            return 2
        if args.command not in NO_COMPILE_COMMANDS:
            use_compile_cache(args)
        if args.command == "rerank":
            return cmd_rerank(args)
        if args.command == "demo":
            from sdjax.demo import cmd_demo

            interrupts.uninstall()  # the web server stops on Ctrl-C its own way
            return cmd_demo(args)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "eval-tiny":
            return cmd_eval_tiny(args)
        if args.command == "upscale":
            return cmd_upscale(args)
        if args.command == "convert":
            return cmd_convert(args)
        return cmd_generate(args, args.command)
    except KeyboardInterrupt:
        print(f"{INTERRUPTED} (use --resume to continue)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 (expected failures become one line; anything else keeps its traceback)
        line = failure_line(e)
        if line is None:
            raise
        print(f"sdjax: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
