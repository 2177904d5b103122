"""How well a model trained on the shapes data set follows prompts it never saw in training.

For every held-out (shape, colour, background) combination, `n_candidates` images are generated from its caption
and read back by the procedural classifier of `sdjax.data` (pixel statistics; not the CLIP model being judged):
the shape's colour, the background colour, the shape. Accuracies are reported for a random candidate (the mean over
all candidates: the expected accuracy of an arbitrary pick) and for the top-1 candidate by CLIP score (reranked).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METRICS = ("colour", "background", "shape", "all")
TARGETS = {"colour": 0.9, "background": 0.9, "shape": 0.7}


def _correct(pred: dict, want: tuple[str, str, str]) -> dict:
    shape, colour, background = want
    c = {"colour": pred["colour"] == colour, "background": pred["background"] == background,
         "shape": pred["shape"] == shape}
    c["all"] = all(c.values())
    return c


def evaluate_tiny(pipeline=None, clip=None, *, combos=None, n_candidates: int = 4, steps: int = 25,
                  scale: float = 7.5, sampler: str = "ddim", seed: int = 0, prompts_per_call: int = 8,
                  save_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Generate and classify; returns {"random": {metric: acc}, "reranked": {...}, "per_combo": [...], ...}.

    pipeline: a `StableDiffusionPipeline` or a folder (default: the shipped model); clip: a `CLIPReranker` or a
    folder (default: the shipped CLIP; None and no shipped CLIP: no reranked numbers). combos: default the
    held-out split. save_dir: also write every image there as PNG.
    """
    from tqdm.auto import tqdm

    from sdjax import data
    from sdjax.loading import SHIPPED_MODEL as shipped
    from sdjax.pipelines.auto import StableDiffusionPipeline
    from sdjax.rerank import CLIPReranker

    if pipeline is None or isinstance(pipeline, (str, Path)):
        pipeline = StableDiffusionPipeline.from_pretrained(pipeline or shipped / "pipeline")
    if clip is None and (shipped / "clip" / "config.json").is_file():
        clip = shipped / "clip"
    if isinstance(clip, (str, Path)):
        clip = CLIPReranker.from_pretrained(clip)
    combos = list(data.HELD_OUT if combos is None else combos)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)

    rows = []
    for start in tqdm(range(0, len(combos), prompts_per_call), desc="eval", disable=not progress):
        chunk = combos[start:start + prompts_per_call]
        prompts = [data.caption(*c) for c in chunk]
        images = pipeline(prompts, num_inference_steps=steps, guidance_scale=scale, sampler=sampler,
                          seed=[seed + start + i for i in range(len(chunk))], num_images_per_prompt=n_candidates,
                          output_type="np").images  # (prompts * candidates, H, W, 3), prompt-major
        images = np.asarray(images).reshape(len(chunk), n_candidates, *np.shape(images)[1:])
        for j, (combo, prompt) in enumerate(zip(chunk, prompts)):
            preds = [data.classify(im) for im in images[j]]
            scores = clip.score(list(images[j]), prompt) if clip is not None else None
            best = int(np.argmax(scores)) if scores is not None else None
            rows.append(dict(prompt=prompt, predictions=preds, correct=[_correct(p, combo) for p in preds],
                             scores=None if scores is None else [float(s) for s in scores], best=best))
            if save_dir is not None:
                from PIL import Image

                for k, im in enumerate(images[j]):
                    name = prompt.replace(" ", "_") + f"_{k}.png"
                    Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)).save(Path(save_dir) / name)

    result = {
        "n_combos": len(rows), "n_candidates": n_candidates, "steps": steps, "scale": scale, "sampler": sampler,
        "random": {m: float(np.mean([c[m] for r in rows for c in r["correct"]])) for m in METRICS},
        "per_combo": rows,
    }
    if clip is not None:
        result["reranked"] = {m: float(np.mean([r["correct"][r["best"]][m] for r in rows])) for m in METRICS}
        # how often CLIP's pick is fully right, vs. the chance that a random pick is
        result["oracle"] = {m: float(np.mean([any(c[m] for c in r["correct"]) for r in rows])) for m in METRICS}
    return result


def markdown_table(result: dict) -> str:
    """The accuracies as a Markdown table (held-out combinations)."""
    cols = [("random", "random candidate (mean of all)")]
    if "reranked" in result:
        cols += [("reranked", f"CLIP top-1 of {result['n_candidates']}"),
                 ("oracle", f"best of {result['n_candidates']} (oracle)")]
    lines = ["| metric | target | " + " | ".join(name for _, name in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    names = {"colour": "shape colour", "background": "background colour", "shape": "shape",
             "all": "all three right"}
    for m in METRICS:
        target = f"≥ {TARGETS[m]:.0%}" if m in TARGETS else ""
        lines.append(f"| {names[m]} | {target} | " + " | ".join(f"{result[k][m]:.1%}" for k, _ in cols) + " |")
    return "\n".join(lines)


def save_result(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


__all__ = ["METRICS", "TARGETS", "evaluate_tiny", "markdown_table", "save_result"]
