"""Bulk runs: prompts x iterations x samples into a folder, with metadata, grids, a manifest and resume.

Layout of an output folder (CompVis txt2img's, plus a manifest):
    outdir/samples/00000.png ...   every kept image, numbered after what is already there (never overwritten)
    outdir/grid-0000.png           one grid per run unless skip_grid
    outdir/manifest.jsonl          one JSON record per saved image

Every saved PNG carries an AUTOMATIC1111-style `parameters` text chunk and an `sdjax` chunk naming its run and job
(prompt index, iteration, sample). A job is written atomically (temporary file, then a hard link to a free name),
and its manifest line only after the file exists; `resume=True` reads the `sdjax` chunks already in the folder, so
a run killed at any point (even SIGKILL) ends with each job saved exactly once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path


SAMPLE_NAME = re.compile(r"^(\d{5,})\.png$")
GRID_NAME = re.compile(r"^grid-(\d{4,})\.png$")


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

    def run_id(self) -> str:
        """Same settings -> same id, so `resume` knows which saved images belong to this run."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def per_call(self) -> int:
        return self.n_candidates or self.n_samples

    @property
    def kept(self) -> int:
        return self.keep if self.n_candidates else self.n_samples


def a1111_parameters(prompt, negative, *, steps, sampler, scale, seed, width, height, model, extra=None) -> str:
    """The `parameters` text AUTOMATIC1111's web UI writes (and reads back with its PNG-info tab)."""
    fields = [f"Steps: {steps}", f"Sampler: {sampler}", f"CFG scale: {scale}", f"Seed: {seed}",
              f"Size: {width}x{height}", f"Model: {model}"]
    for k, v in (extra or {}).items():
        fields.append(f"{k}: {v}")
    return f"{prompt}\nNegative prompt: {negative}\n" + ", ".join(fields)


def save_png_exclusive(image, folder: Path, texts: dict[str, str], pattern=SAMPLE_NAME, width=5, prefix="") -> Path:
    """Write `image` as the next free `NNNNN.png` in `folder`, atomically, never replacing a file."""
    from PIL import PngImagePlugin

    folder.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for k, v in texts.items():
        info.add_text(k, v)
    tmp = folder / f".tmp-{os.getpid()}-{time.monotonic_ns()}.png"
    with open(tmp, "wb") as f:
        image.save(f, format="PNG", pnginfo=info)
        f.flush()
        os.fsync(f.fileno())
    try:
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


def append_manifest(outdir: Path, record: dict) -> None:
    with open(outdir / "manifest.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def done_jobs(outdir: Path, run_id: str) -> dict[tuple, dict]:
    """Jobs of run `run_id` already saved in outdir/samples (from the PNGs' own `sdjax` chunks), and make sure
    each has its manifest line (a kill between saving and the manifest line leaves it out)."""
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
    listed = set()
    manifest = outdir / "manifest.jsonl"
    if manifest.is_file():
        for line in manifest.read_text().splitlines():
            try:
                listed.add(json.loads(line).get("file"))
            except json.JSONDecodeError:  # a torn last line from a kill
                continue
    for rec in done.values():
        if rec["file"] not in listed:
            append_manifest(outdir, rec)
    return done


def run_bulk(pipe, spec: RunSpec, outdir: str | os.PathLike, *, reranker=None, skip_grid=False, resume=False,
             prompts_per_call: int = 1, progress: bool = True, precision: str = "") -> list[dict]:
    """Generate every (prompt, iteration, sample) of `spec` into `outdir`; returns the manifest records written.

    With `spec.n_candidates` and a `reranker`, each (prompt, iteration) generates n_candidates images and keeps
    the `keep` best by CLIP score (score and rank recorded).
    """
    from PIL import Image
    from tqdm import tqdm

    outdir = Path(outdir)
    samples = outdir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    run_id = spec.run_id()
    done = done_jobs(outdir, run_id) if resume else {}
    image = mask = None
    if spec.init_image:
        image = Image.open(spec.init_image).convert("RGB")
    if spec.mask:
        mask = Image.open(spec.mask).convert("L")

    calls = []  # (iteration, [prompt indices]) still to run
    for it in range(spec.n_iter):
        todo = [p for p in range(len(spec.prompts))
                if any((p, it, k) not in done for k in range(spec.kept))]
        for i in range(0, len(todo), prompts_per_call):
            calls.append((it, todo[i:i + prompts_per_call]))

    written, grid_images = [], []
    bar = tqdm(total=len(calls), disable=not progress, unit="batch", desc="sdjax")
    t0 = time.perf_counter()
    n_images = 0
    for it, prompt_ids in calls:
        prompts = [spec.prompts[p] for p in prompt_ids]
        seed = spec.seed + it
        out = pipe(prompts, [spec.negative_prompt] * len(prompts), height=spec.height, width=spec.width,
                   num_inference_steps=spec.steps, guidance_scale=spec.scale, sampler=spec.sampler,
                   seed=[seed] * len(prompts), num_images_per_prompt=spec.per_call, image=image, mask_image=mask,
                   strength=spec.strength, output_type="pil").images
        n_images += len(out)
        for j, p in enumerate(prompt_ids):
            candidates = out[j * spec.per_call:(j + 1) * spec.per_call]
            scores = [None] * len(candidates)
            order = list(range(len(candidates)))
            if reranker is not None:
                scores = [float(s) for s in reranker.score(candidates, spec.prompts[p])]
                order = sorted(order, key=lambda k: -scores[k])[:spec.kept]
            for rank, k in enumerate(order[:spec.kept]):
                job = (p, it, rank)
                if job in done:
                    continue
                im = candidates[k]
                record = dict(
                    run_id=run_id, job=list(job), prompt=spec.prompts[p], negative=spec.negative_prompt,
                    seed=seed, batch_position=k, sampler=spec.sampler, steps=spec.steps, scale=spec.scale,
                    size=f"{im.width}x{im.height}", model=spec.model, mode=spec.mode,
                    clip_score=scores[k], rank=rank if reranker is not None else None,
                )
                if precision:
                    record["precision"] = precision
                params = a1111_parameters(
                    spec.prompts[p], spec.negative_prompt, steps=spec.steps, sampler=spec.sampler,
                    scale=spec.scale, seed=seed, width=im.width, height=im.height, model=spec.model,
                    extra={"Batch pos": k, **({"CLIP score": f"{scores[k]:.4f}"} if scores[k] is not None else {})},
                )
                path = save_png_exclusive(im, samples, {"parameters": params, "sdjax": json.dumps(record)})
                record["file"] = str(path.relative_to(outdir))
                append_manifest(outdir, record)
                written.append(record)
                grid_images.append(im)
        bar.update(1)
        bar.set_postfix(images_per_s=f"{n_images / (time.perf_counter() - t0):.2f}")
    bar.close()
    if grid_images and not skip_grid:
        grid = make_grid(grid_images, rows=None)
        save_png_exclusive(grid, outdir, {}, pattern=GRID_NAME, width=4, prefix="grid-")
    return written
