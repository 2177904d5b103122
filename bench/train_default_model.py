"""Re-make the model shipped in sdjax/default_model/ (VAE, then CLIP, then UNet on the synthetic shapes data).

    python bench/train_default_model.py --work /tmp/tiny_run            # all stages, then install
    python bench/train_default_model.py --work /tmp/tiny_run --stage vae  # one stage (resumes after a kill)

Each stage is `sdjax.train.train_stage` (the same as `sdjax train <stage>`), checkpointed under --work and resumed
when run again; --install copies the fp16 weights into sdjax/default_model/{pipeline,clip}. The UNet is trained in
three runs: "unet" from scratch (batch 16); "unet_ft" continues from its EMA weights with a new seed (new
batches), a larger batch and a lower learning rate (= `sdjax train unet --pipeline work/pipeline ...`); "unet_grow"
adds cross-attention transformers to the 16x16 blocks (`grow_unet`: their output projections start at zero, so the
grown UNet starts as exactly the trained one) and trains the whole UNet again with a new seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from sdjax import train

# Sized for 2 shared CPU cores (about 40 minutes in all).
STAGES = (*train.STAGES, "unet_ft", "unet_grow")
STEPS = {"vae": 2500, "clip": 500, "unet": 2800, "unet_ft": 4000, "unet_grow": 3000}
SETTINGS = {
    "vae": dict(batch_size=16, lr=2e-3, warmup=50, kl_weight=1e-3, crop=32),
    "clip": dict(batch_size=64, lr=1e-3, warmup=50),
    "unet": dict(batch_size=16, lr=1e-3, warmup=100, cfg_dropout=0.1),
    "unet_ft": dict(batch_size=32, lr=5e-4, warmup=100, cfg_dropout=0.1, seed=1, ema_decay=0.999),
    "unet_grow": dict(batch_size=32, lr=5e-4, warmup=100, cfg_dropout=0.1, seed=2, ema_decay=0.999),
}
OUT = {"unet": "pipeline", "unet_ft": "pipeline_ft", "unet_grow": "pipeline_grown_ft"}
SHIPPED = "pipeline_grown_ft"  # the UNet run that is installed
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "sdjax" / "default_model"


def run_stage(stage: str, work: Path, steps: int) -> dict:
    settings = {"ema_decay": 0.995, **SETTINGS[stage]}
    cfg = train.TrainConfig(steps=steps, checkpoint_every=100, log_every=20, **settings)
    out = work / OUT.get(stage, stage)
    extra = {"unet": dict(vae=work / "vae", clip=work / "clip"), "unet_ft": dict(pipeline=work / "pipeline"),
             "unet_grow": dict(pipeline=work / "pipeline_grown")}
    if stage == "unet_grow" and not (work / "pipeline_grown" / "model_index.json").is_file():
        grow_unet(work / "pipeline_ft", work / "pipeline_grown")
    t0 = time.time()
    result = train.train_stage("unet" if stage.startswith("unet") else stage, out, cfg,
                               checkpoint_dir=work / f"{stage}.checkpoints", resume=True, **extra.get(stage, {}))
    losses = result["losses"]
    summary = dict(stage=stage, steps=steps, seconds=round(time.time() - t0, 1),
                   first_loss=float(losses[:20].mean()), final_loss=float(losses[-100:].mean()),
                   **{k: v for k, v in result.items() if k == "scaling_factor"}, settings=SETTINGS[stage])
    with open(work / "summary.jsonl", "a") as f:
        f.write(json.dumps(summary) + "\n")
    print(summary)
    return summary


def grow_unet(src: Path, dst: Path, seed: int = 0) -> None:
    """Copy the pipeline folder `src` to `dst` with a UNet that also has cross-attention transformers in its 16x16
    down and up blocks: every existing weight is copied, the new transformers are freshly initialised except their
    output projections (proj_out), which are zero, so the grown UNet computes exactly what the old one did."""
    from flax import nnx

    from sdjax.models import UNet2DConditionModel

    old = UNet2DConditionModel.from_pretrained(src, subfolder="unet")
    n = len(old.config.block_out_channels)
    config = dataclasses.replace(old.config, down_block_types=("CrossAttnDownBlock2D",) * n,
                                 up_block_types=("CrossAttnUpBlock2D",) * n)
    new = UNet2DConditionModel.from_config(config, seed=seed)
    have = dict(nnx.to_flat_state(nnx.state(old, nnx.Param)))
    flat = dict(nnx.to_flat_state(nnx.state(new, nnx.Param)))
    for path, var in flat.items():
        if path in have:
            var.set_value(have[path].get_value())
        elif "proj_out" in path:
            var.set_value(np.zeros(var.get_value().shape, var.get_value().dtype))
        elif "attentions" not in path:
            raise ValueError(f"grown UNet parameter {path} is neither copied nor part of a new transformer")
    nnx.update(new, nnx.from_flat_state(flat))
    tmp = dst.parent / (dst.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("unet"))
    new.save_pretrained(tmp / "unet")
    tmp.rename(dst)


def install(work: Path, dest: Path = DEFAULT_MODEL) -> None:
    """fp16 copies of the trained pipeline and CLIP model into `dest`."""
    from sdjax.models import AutoencoderKL, CLIPModel, CLIPTextModel, UNet2DConditionModel

    pipe = work / SHIPPED
    tmp = dest.parent / (dest.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    train.write_pipeline(
        tmp / "pipeline", vae=AutoencoderKL.from_pretrained(pipe, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(pipe, subfolder="text_encoder"),
        unet=UNet2DConditionModel.from_pretrained(pipe, subfolder="unet"), dtype=np.float16,
    )
    train.write_clip_folder(CLIPModel.from_pretrained(work / "clip"), tmp / "clip", dtype=np.float16)
    # one copy of the tokenizer files in the source tree: the CLIP folder links to the pipeline's (wheels store
    # the links as copies, sdjax.tokenizer.PACKAGED is the pipeline's folder)
    for f in (tmp / "pipeline" / "tokenizer").iterdir():
        link = tmp / "clip" / f.name
        if link.is_file() and link.read_bytes() == f.read_bytes():
            link.unlink()
            link.symlink_to(Path("..") / "pipeline" / "tokenizer" / f.name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"installed {dest} ({size / 2**20:.1f} MiB)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="folder for checkpoints and full-precision outputs")
    p.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    p.add_argument("--install", action="store_true", help="copy the result into sdjax/default_model")
    for stage in STAGES:
        p.add_argument(f"--{stage}-steps", type=int, default=STEPS[stage])
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    for stage in STAGES if a.stage == "all" else [a.stage]:
        run_stage(stage, a.work, getattr(a, f"{stage}_steps"))
    if a.install or a.stage == "all":
        install(a.work)


if __name__ == "__main__":
    main()
