"""Bulk runs: prompts x iterations x samples into a folder, with metadata, grids, a manifest and resume.

Layout of an output folder (CompVis txt2img's, plus a manifest):
    outdir/samples/00000.png ...   every kept image, numbered after what is already there (never overwritten)
    outdir/grid-0000.png           one grid per run unless skip_grid
    outdir/manifest.jsonl          one JSON record per saved image
    outdir/manifest.<p>.jsonl      multi-process runs: the records of the images process p saved

Every saved PNG carries an AUTOMATIC1111-style `parameters` text chunk and an `sdjax` chunk naming its run and job
(prompt index, iteration, sample). A job is written atomically (temporary file, then a hard link to a free name),
and its manifest line only after the file exists; `resume=True` reads the `sdjax` chunks already in the folder, so
a run killed at any point (even SIGKILL) ends with each job saved exactly once.

Several processes (`sdjax.distributed`): every process runs the same list of batches, each batch split over every
process's devices; each process saves only the images of its own devices and lists them in manifest.<p>.jsonl;
after a barrier, process 0 appends the run's records of all processes to manifest.jsonl (each image once, in job
order) and makes the grid from the saved files. This assumes `outdir` is one folder all processes share (one
machine, or NFS / Filestore / a GCS FUSE mount on a pod). On separate disks every host still saves its own images
and manifest.<p>.jsonl, and `merge_manifests` can be run once they are copied together.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

from sdjax import interrupts


SAMPLE_NAME = re.compile(r"^(\d{5,})\.png$")
GRID_NAME = re.compile(r"^grid-(\d{4,})\.png$")
TEMP_PREFIX = ".tmp-"
HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"  # in temporary names (no '-')
TEMP_NAME = re.compile(r"^\.tmp-(?:([A-Za-z0-9]*)-)?(\d+)-[0-9a-f]{32}\.(?:png|probe)$")  # older: no host


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What to generate. `seed + iteration` seeds every prompt's batch of an iteration."""

    prompts: tuple[str, ...]
    negative_prompt: str = ""
    n_samples: int = 1
    n_iter: int = 1
    height: int | None = None
    width: int | None = None
    steps: int = 50
    scale: float = 7.5
    sampler: str = "ddim"
    seed: int = 42
    model: str = ""
    n_candidates: int | None = None  # with a reranker: generate this many, keep the best `keep`
    keep: int | None = None
    mode: str = "txt2img"
    strength: float = 0.75
    init_image: str | None = None
    mask: str | None = None
    model_hash: str | None = None  # a single-file checkpoint's A1111 hash (app.model_hash)
    refiner: str | None = None  # SDXL base -> refiner hand-off: the refiner's name, its schedule, the split
    refiner_steps: int | None = None
    high_noise_frac: float | None = None
    prompt_syntax: str = "plain"  # how the prompts are read (sdjax.prompts): "plain" or "a1111"
    emphasis: str = "original"  # A1111's emphasis mode, with prompt_syntax "a1111"
    clip_skip: int = 1  # A1111's "Clip skip" (1: the text encoder's last layer; N: N-1 layers before it)
    loras: tuple = ()  # sdjax.extra_networks.LoraUse of every --lora file (merged for every image)

    def run_id(self) -> str:
        """Same settings -> same id, so `resume` knows which saved images belong to this run."""
        fields = dataclasses.asdict(self)
        if self.refiner is None:  # runs without a refiner keep the ids they had before these fields existed
            for k in ("refiner", "refiner_steps", "high_noise_frac"):
                del fields[k]
        if self.model_hash is None:  # likewise runs of a folder model
            del fields["model_hash"]
        if not self.loras:  # and runs without adapters
            del fields["loras"]
        else:  # as [file, weight, hash] (the form of the ids before per-part weights)
            fields["loras"] = [[u.file, u.unet, u.hash] + ([] if u.te == u.unet else [u.te]) for u in self.loras]
        if self.prompt_syntax == "plain" and self.emphasis == "original":  # and runs of literal prompts
            del fields["prompt_syntax"], fields["emphasis"]
        if self.clip_skip == 1:  # and runs without clip skip
            del fields["clip_skip"]
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def per_call(self) -> int:
        return self.n_candidates or self.n_samples

    @property
    def kept(self) -> int:
        return self.keep if self.n_candidates else self.n_samples


def lora_fields(uses) -> dict:
    """The manifest's `loras` and A1111's `Lora hashes` of an image's LoraUses (none without adapters)."""
    if not uses:
        return {}
    names = (Path(u.file).stem.replace(":", "").replace(",", "") for u in uses)
    return dict(lora_hashes='"' + ", ".join(f"{n}: {u.hash}" for n, u in zip(names, uses)) + '"',
                loras=[dict(file=u.file, weight=u.unet, hash=u.hash, **({} if u.te == u.unet else {"te_weight": u.te}))
                       for u in uses])


def a1111_parameters(prompt, negative, *, steps, sampler, scale, seed, width, height, model, extra=None) -> str:
    """The `parameters` text AUTOMATIC1111's web UI writes (and reads back with its PNG-info tab)."""
    fields = [f"Steps: {steps}", f"Sampler: {sampler}", f"CFG scale: {scale}", f"Seed: {seed}",
              f"Size: {width}x{height}", f"Model: {model}"]
    for k, v in (extra or {}).items():
        fields.append(f"{k}: {v}")
    return f"{prompt}\nNegative prompt: {negative}\n" + ", ".join(fields)


# manifest record field -> AUTOMATIC1111's name for it in the `parameters` text (fields without one stay out of it)
A1111_NAMES = {
    "batch_position": "Batch pos", "refiner": "Refiner", "high_noise_frac": "Refiner switch at",
    "refiner_steps": "Refiner steps", "refiner_mode": "Refiner mode", "refiner_strength": "Refiner strength",
    "noise_level": "Noise level", "init_image": "Init image", "tile_size": "Tile size", "clip_score": "CLIP score",
    "model_hash": "Model hash", "emphasis": "Emphasis", "lora_hashes": "Lora hashes", "clip_skip": "Clip skip",
}
EMPHASIS_NAMES = {"original": "Original", "none": "No norm"}  # A1111's names of its emphasis modes


def image_metadata(*, prompt: str, negative: str, seed, sampler: str, steps: int, scale: float, width: int,
                   height: int, model: str, precision: str = "", **fields) -> tuple[str, dict]:
    """(the A1111 `parameters` text, the manifest record) of one saved image: the one place both are made, for the
    CLI's bulk runs, `sdjax upscale` and the demo. `fields` (in order) go into the record as they are and, where
    A1111 has a name for them and they are not None, into the text (a CLIP score with 4 decimals, an init image by
    its file name, an emphasis mode by A1111's name). Give `prompt_syntax` ("plain" or "a1111") and, with
    "a1111", `emphasis`: how the prompts were read."""
    extra = {}
    for key, value in fields.items():
        if key in A1111_NAMES and value is not None:
            if key == "clip_score":
                value = f"{value:.4f}"
            elif key == "init_image":
                value = Path(value).name
            elif key == "emphasis":
                value = EMPHASIS_NAMES.get(value, value)
            extra[A1111_NAMES[key]] = value
    text = a1111_parameters(prompt, negative, steps=steps, sampler=sampler, scale=scale, seed=seed, width=width,
                            height=height, model=model, extra=extra)
    record = dict(prompt=prompt, negative=negative, seed=seed, sampler=sampler, steps=steps, scale=scale,
                  size=f"{width}x{height}", model=model, **fields)
    if precision:
        record["precision"] = precision
    return text, record


def syntax_fields(prompt_syntax: str, emphasis: str, clip_skip: int = 1) -> dict:
    """The metadata fields that say how prompts were read: the syntax, its emphasis mode with "a1111", and A1111's
    clip skip when it is above 1."""
    return dict(prompt_syntax=prompt_syntax, emphasis=emphasis if prompt_syntax == "a1111" else None,
                **({"clip_skip": clip_skip} if clip_skip > 1 else {}))


def clip_skip_options(clip_skip: int) -> dict:
    """A1111's "Clip skip: N" as the pipelines' options: both prompts and negatives read N-1 layers earlier."""
    return dict(clip_skip=clip_skip - 1, negative_clip_skip=clip_skip - 1)


def temporary_name(suffix: str = ".png") -> str:
    """A temporary file name unique across processes and hosts: `.tmp-<host>-<pid>-<random><suffix>`."""
    return f"{TEMP_PREFIX}{HOST}-{os.getpid()}-{uuid.uuid4().hex}{suffix}"


def save_png_exclusive(image, folder: Path, texts: dict[str, str], pattern=SAMPLE_NAME, width=5, prefix="") -> Path:
    """Write `image` as the next free `NNNNN.png` in `folder`, atomically, never replacing a file; the temporary
    file is removed on every way out (an error such as a full disk, a Ctrl-C: `sdjax.interrupts.writing`)."""
    from PIL import PngImagePlugin

    folder.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for k, v in texts.items():
        info.add_text(k, v)
    tmp = folder / temporary_name()
    with interrupts.writing(tmp):
        try:
            with open(tmp, "wb") as f:
                image.save(f, format="PNG", pnginfo=info)
                f.flush()
                os.fsync(f.fileno())
            index = next_index(folder, pattern)
            while True:
                target = folder / f"{prefix}{index:0{width}d}.png"
                try:
                    os.link(tmp, target)  # fails if the name is taken: nothing is overwritten
                    return target
                except FileExistsError:
                    index += 1
        finally:
            tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path, max_age: float = 3600.0) -> list[Path]:
    """Remove the temporary files a killed run left in `folder` (`temporary_name`): those of this host whose process
    is gone, and any older than `max_age` seconds (another host's: a live write takes a moment). Returns them."""
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for path in folder.iterdir():
        m = TEMP_NAME.match(path.name)
        if not m:
            continue
        try:
            stale = now - path.stat().st_mtime > max_age
            if not stale and m.group(1) in (HOST, None):
                stale = not process_alive(int(m.group(2)))
            if stale:
                path.unlink()
                removed.append(path)
        except (OSError, ValueError):
            continue
    return removed


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def prepare_outdir(outdir: Path, manifest: str = "manifest.jsonl") -> None:
    """Make outdir/samples and check, before any image is generated, that files can be written there and that the
    manifest can be appended to; OSError (naming the path) otherwise: a read-only or full disk, no permission, a
    file where a folder should be, a folder named like the manifest."""
    samples = outdir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    path = outdir / manifest
    if path.exists() and not path.is_file():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    probe = samples / temporary_name(".probe")
    with interrupts.writing(probe):
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    with open(path, "ab"):
        pass


def next_index(folder: Path, pattern=SAMPLE_NAME) -> int:
    if not folder.is_dir():
        return 0
    found = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return max(found) + 1 if found else 0


def make_grid(images, rows: int | None = None):
    """Tile PIL images (all one size) into one image, `rows` rows (CompVis: one row per batch)."""
    from PIL import Image

    n = len(images)
    cols = math.ceil(n / rows) if rows else math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def read_png_texts(path: Path) -> dict[str, str]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return dict(getattr(im, "text", {}) or {})
    except Exception:  # a partial file from a killed run: not ours to count
        return {}


def append_manifest(outdir: Path, record: dict, name: str = "manifest.jsonl") -> None:
    """Append `record` as one line, in one write. A last line left without its end (a run killed in the middle of
    a write, a full disk) is ended first, with a warning, so the new record is never glued to it; readers skip it."""
    path = outdir / name
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    with interrupts.writing():
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                print(f"sdjax: warning: {path}: its last line is cut short (a run killed while writing it?); it is "
                      "skipped, and --resume lists its image again", file=sys.stderr)
                line = b"\n" + line
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def done_jobs(outdir: Path, run_id: str, repair: bool = True) -> dict[tuple, dict]:
    """Jobs of run `run_id` already saved in outdir/samples (from the PNGs' own `sdjax` chunks), and (repair) make
    sure each has its manifest line (a kill between saving and the manifest line leaves it out)."""
    samples = outdir / "samples"
    done = {}
    if samples.is_dir():
        for p in sorted(samples.glob("*.png")):
            if not SAMPLE_NAME.match(p.name):
                continue
            meta = read_png_texts(p).get("sdjax")
            if not meta:
                continue
            rec = json.loads(meta)
            if rec.get("run_id") == run_id:
                done[tuple(rec["job"])] = dict(rec, file=str(p.relative_to(outdir)))
    if repair:
        listed = {rec.get("file") for rec in read_manifest(outdir / "manifest.jsonl")}
        for rec in done.values():
            if rec["file"] not in listed:
                append_manifest(outdir, rec)
    return done


def read_manifest(path: Path) -> list[dict]:
    """The records of a manifest file ([] if there is none); a torn last line from a kill is skipped."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def job_order(record: dict) -> tuple:
    """Generation order: iteration, then prompt, then rank (how a single process writes its manifest)."""
    p, it, rank = record["job"]
    return it, p, rank


def merge_manifests(outdir: str | os.PathLike, run_id: str, num_processes: int) -> list[dict]:
    """Append the records of run `run_id` from manifest.<p>.jsonl (p < num_processes) that manifest.jsonl does not
    list yet, in job order; returns them. Each image is listed once however often this is called."""
    outdir = Path(outdir)
    listed = {rec.get("file") for rec in read_manifest(outdir / "manifest.jsonl")}
    new, missing = {}, []
    for p in range(num_processes):
        path = outdir / f"manifest.{p}.jsonl"
        if not path.is_file():
            missing.append(p)
        for rec in read_manifest(path):
            if rec.get("run_id") == run_id and rec.get("file") not in listed:
                new.setdefault(rec["file"], rec)
    if missing:
        print(f"sdjax: {outdir}: no manifest of process(es) {missing}; is the folder shared by all processes? "
              "manifest.jsonl lists only the images of the others")
    records = sorted(new.values(), key=job_order)
    for rec in records:
        append_manifest(outdir, rec)
    return records


def run_bulk(pipe, spec: RunSpec, outdir: str | os.PathLike, *, reranker=None, skip_grid=False, resume=False,
             prompts_per_call: int = 1, progress: bool = True, precision: str = "", refiner=None,
             loras=None) -> list[dict]:
    """Generate every (prompt, iteration, sample) of `spec` into `outdir`; returns the manifest records this process
    wrote.

    loras: an `sdjax.app.PromptLoras`: the prompts' `<lora:NAME:WEIGHT>` tags are taken out of their text and the
    LoRAs they name (with the run's fixed ones) merged for their images; a batch holds prompts with the same tags.
    Without it the prompts are read as they are and the model as it is (`spec.loras` only describes it).

    refiner: an SDXL refiner pipeline; the (SDXL) `pipe` denoises the first `spec.high_noise_frac` of the schedule
    and hands its latents to it (`spec.refiner_steps`: the refiner's schedule length).

    With `spec.n_candidates` and a `reranker`, each (prompt, iteration) generates n_candidates images and keeps
    the `keep` best by CLIP score (score and rank recorded). With several processes (see the module docstring),
    call it in every process with the same arguments.
    """
    import jax
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from sdjax import distributed
    from sdjax.pipelines.images import normalise, numpy_to_pil
    from sdjax.prompts import plain_text

    outdir = Path(outdir)
    samples = outdir / "samples"
    run_id = spec.run_id()
    process, n_processes = jax.process_index(), jax.process_count()
    manifest = "manifest.jsonl" if n_processes == 1 else f"manifest.{process}.jsonl"
    prepare_outdir(outdir, manifest)
    done = set()
    if resume:  # process 0 alone mends manifest.jsonl: the others must not list the same image again
        stale = remove_stale_temporaries(samples) + remove_stale_temporaries(outdir)
        if stale and process == 0:
            print(f"sdjax: removed {len(stale)} temporary files a killed run left in {outdir}", file=sys.stderr)
        done = set(done_jobs(outdir, run_id, repair=process == 0))
    if n_processes > 1:
        (outdir / manifest).touch()  # even a process that saves nothing leaves its (empty) manifest
        # the same batches in every process: a job counts as done if any process found it. Nobody saves before
        # every process has looked (this is a collective), so a fast process cannot change what a slow one sees.
        flags = np.zeros((len(spec.prompts), spec.n_iter, spec.kept), bool)
        for p, it, rank in done:
            if p < len(spec.prompts) and it < spec.n_iter and rank < spec.kept:
                flags[p, it, rank] = True
        done = {tuple(int(v) for v in job) for job in np.argwhere(distributed.any_process(flags))}
    image = mask = None  # opened once, as the pipeline opens a path (EXIF orientation, 16-bit greyscale, ...)
    if spec.init_image:
        image = normalise(spec.init_image, "init image")
    if spec.mask:
        mask = normalise(spec.mask, "mask_image")

    # each prompt's text and LoRA tags (every tag's file found and loaded before the first image)
    split = [loras.split(p) if loras is not None else (p, ()) for p in spec.prompts]
    calls = []  # (iteration, [prompt indices]) still to run
    for it in range(spec.n_iter):
        todo = [p for p in range(len(spec.prompts))
                if any((p, it, k) not in done for k in range(spec.kept))]
        for i in range(0, len(todo), prompts_per_call):  # one batch, one set of LoRA tags
            batch = todo[i:i + prompts_per_call]
            for tags in dict.fromkeys(split[p][1] for p in batch):
                calls.append((it, [p for p in batch if split[p][1] == tags]))

    written, grid_images = [], []
    bar = tqdm(total=len(calls), disable=not progress or process != 0, unit="batch", desc="sdjax")
    t0 = time.perf_counter()
    n_images = 0
    handoff = {} if refiner is None else dict(refiner=refiner, high_noise_frac=spec.high_noise_frac,
                                              refiner_num_inference_steps=spec.refiner_steps)
    try:
        for it, prompt_ids in calls:
            prompts = [split[p][0] for p in prompt_ids]
            uses = spec.loras if loras is None else loras.activate(split[prompt_ids[0]][1])
            seed = spec.seed + it
            out = pipe(prompts, [spec.negative_prompt] * len(prompts), height=spec.height, width=spec.width,
                       num_inference_steps=spec.steps, guidance_scale=spec.scale, sampler=spec.sampler,
                       seed=[seed] * len(prompts), num_images_per_prompt=spec.per_call, image=image, mask_image=mask,
                       strength=spec.strength, output_type="np", prompt_syntax=spec.prompt_syntax,
                       emphasis=spec.emphasis, **clip_skip_options(spec.clip_skip), **handoff)
            total = len(prompts) * spec.per_call
            mine = [int(i) for i in out.indices]  # batch positions this process holds (all, with one process)
            if reranker is not None and n_processes > 1:  # scoring needs every candidate of a prompt
                images = dict(enumerate(numpy_to_pil(distributed.gather_rows(out.images, mine, total))))
            else:
                images = dict(zip(mine, numpy_to_pil(out.images)))
            n_images += total
            for j, p in enumerate(prompt_ids):
                candidates = [images.get(j * spec.per_call + k) for k in range(spec.per_call)]
                scores = [None] * len(candidates)
                order = list(range(len(candidates)))
                if reranker is not None:
                    text = plain_text(split[p][0], spec.prompt_syntax)  # CLIP reads text literally
                    scores = [float(s) for s in reranker.score(candidates, text)]
                    if n_processes > 1:  # every process must keep the same candidates: process 0's scores decide
                        scores = distributed.from_process_0(np.asarray(scores, np.float32)).tolist()
                    order = sorted(order, key=lambda k: -scores[k])[:spec.kept]
                for rank, k in enumerate(order[:spec.kept]):
                    job = (p, it, rank)
                    if job in done or j * spec.per_call + k not in mine:  # done, or another process saves it
                        continue
                    im = candidates[k]
                    handoff_fields = {} if refiner is None else dict(
                        refiner=spec.refiner, high_noise_frac=spec.high_noise_frac, refiner_steps=spec.refiner_steps)
                    params, record = image_metadata(
                        prompt=spec.prompts[p], negative=spec.negative_prompt, seed=seed, sampler=spec.sampler,
                        steps=spec.steps, scale=spec.scale, width=im.width, height=im.height, model=spec.model,
                        precision=precision, **({} if spec.model_hash is None else {"model_hash": spec.model_hash}),
                        run_id=run_id, job=list(job), batch_position=k, mode=spec.mode,
                        **syntax_fields(spec.prompt_syntax, spec.emphasis, spec.clip_skip),
                        clip_score=scores[k], rank=rank if reranker is not None else None, **handoff_fields,
                        **lora_fields(uses),
                        **({"process": process} if n_processes > 1 else {}))
                    with interrupts.writing():  # a Ctrl-C leaves no saved image without its manifest line
                        path = save_png_exclusive(im, samples, {"parameters": params, "sdjax": json.dumps(record)})
                        record["file"] = str(path.relative_to(outdir))
                        append_manifest(outdir, record, manifest)
                    written.append(record)
                    grid_images.append(im)
            bar.update(1)
            bar.set_postfix(images_per_s=f"{n_images / (time.perf_counter() - t0):.2f}")
    finally:
        bar.close()  # on an error too: the bar's line ends, the error gets a line of its own
    if n_processes > 1:
        distributed.barrier(f"sdjax-bulk-saved-{run_id}")  # every process's files and manifest lines are written
        if process != 0:
            return written
        merged = merge_manifests(outdir, run_id, n_processes)
        # the grid from the saved files (a shared folder); on separate disks only process 0's own are there
        grid_images = []
        for rec in merged:
            try:
                with Image.open(outdir / rec["file"]) as im:
                    grid_images.append(im.convert("RGB"))
            except OSError:
                continue
        if len(grid_images) < len(merged) and not skip_grid:
            print(f"sdjax: {len(merged) - len(grid_images)} images of other processes are not in {outdir}; "
                  "no grid")
            grid_images = []
    if grid_images and not skip_grid:
        grid = make_grid(grid_images, rows=None)
        save_png_exclusive(grid, outdir, {}, pattern=GRID_NAME, width=4, prefix="grid-")
    return written


# ----------------------------------------------------------------------------------------------------------------
# `sdjax upscale`: upscale one image for each prompt into a folder, saved as the bulk runs save their images


def upscale_to_folder(pipe, init_image: str | os.PathLike, prompts: Sequence[str],
                      outdir: str | os.PathLike, *, negative_prompt: str = "", n_samples: int = 1, steps: int = 75,
                      scale: float = 9.0, noise_level: int = 20, sampler: str = "ddim", seed: int = 42,
                      tile_size: int | None = None, tile_overlap: int | None = None, model: str = "",
                      precision: str = "", model_hash: str | None = None, prompt_syntax: str = "plain",
                      emphasis: str = "original", clip_skip: int = 1) -> list[dict]:
    """Upscale `init_image` once per prompt (n_samples images each, seed `seed`) into outdir/samples/NNNNN.png:
    numbered after the files already there (never overwritten), with the `parameters` and `sdjax` PNG chunks and
    a manifest.jsonl line per image, as `run_bulk`. `pipe`: a StableDiffusionUpscalePipeline. Returns the manifest
    records written. prompt_syntax, emphasis, clip_skip: how the prompts are read (`sdjax.prompts`; clip_skip as
    A1111's)."""
    from sdjax.pipelines.images import normalise

    outdir = Path(outdir)
    prepare_outdir(outdir)
    samples = outdir / "samples"
    low = normalise(init_image, "init image")
    settings = dict(mode="upscale", prompts=list(prompts), negative=negative_prompt, n_samples=n_samples,
                    steps=steps, scale=scale, noise_level=noise_level, sampler=sampler, seed=seed,
                    tile_size=tile_size, tile_overlap=tile_overlap, model=model, init_image=str(init_image),
                    **({} if prompt_syntax == "plain" else syntax_fields(prompt_syntax, emphasis)),
                    **({"clip_skip": clip_skip} if clip_skip > 1 else {}))
    run_id = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    written = []
    for p, prompt in enumerate(prompts):
        out = pipe(prompt, low, negative_prompt, num_inference_steps=steps, guidance_scale=scale,
                   noise_level=noise_level, sampler=sampler, seed=[seed], num_images_per_prompt=n_samples,
                   tile_size=tile_size, tile_overlap=tile_overlap, prompt_syntax=prompt_syntax,
                   emphasis=emphasis, **clip_skip_options(clip_skip)).images
        for k, im in enumerate(out):
            params, record = image_metadata(
                prompt=prompt, negative=negative_prompt, seed=seed, sampler=sampler, steps=steps, scale=scale,
                width=im.width, height=im.height, model=model, precision=precision,
                **({} if model_hash is None else {"model_hash": model_hash}), run_id=run_id, job=[p, 0, k],
                batch_position=k, mode="upscale", noise_level=noise_level, init_image=str(init_image),
                tile_size=tile_size, tile_overlap=tile_overlap, **syntax_fields(prompt_syntax, emphasis, clip_skip))
            with interrupts.writing():
                path = save_png_exclusive(im, samples, {"parameters": params, "sdjax": json.dumps(record)})
                record["file"] = str(path.relative_to(outdir))
                append_manifest(outdir, record)
            written.append(record)
    return written
