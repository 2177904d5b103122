"""One image on several devices: each device's share of the work, from XLA's cost analysis of the compiled program.

    python bench/small_batch.py                      # SD 1.5 at 512², batch 1 with guidance, on 1, 2, 4, 8 devices
    python bench/small_batch.py --devices 1,8 --size 256

With fewer images than devices the pipeline splits each image's guided pair (unconditional, conditional) and its
latents' height over the devices (`sdjax.pipelines.program.choose_layout`) instead of computing padding images.
For each device count this script starts a process with that many fake CPU devices
(`--xla_force_host_platform_device_count`), builds the real SD 1.5 networks shape-only (configs in
sdjax/model_configs/, no weights), and lowers and compiles the pipeline's own program for the call, without running
it. `compiled.cost_analysis()` of the SPMD-partitioned program is one device's part: its FLOPs are printed for the
program without decoding (text encoder + one sampling step: XLA counts a loop body once) and with decoding (+ the
VAE decoder). sdjax's CPU-only rewrites (attention as a loop over query chunks, the sub-pixel upsampler, small
convolutions as gathers + matmul) are turned off, so the count is the network's as an accelerator runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "sdjax" / "model_configs"


def _config(name):
    return json.loads((CONFIGS / name).read_text())


def abstract_sd15():
    from sdjax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from sdjax.pipelines.sd import StableDiffusionPipeline
    from sdjax.tokenizer import Tokenizer

    return StableDiffusionPipeline(
        tokenizer=Tokenizer.from_pretrained(), text_encoder=CLIPTextModel.abstract(_config("clip_vit_l14_text.json")),
        vae=AutoencoderKL.abstract(_config("sd15_vae.json")), unet=UNet2DConditionModel.abstract(_config("sd15_unet.json")),
        scheduler_config=_config("sd15_scheduler.json"), name="sd15-shapes")


def measure(size: int, images: int) -> dict:
    import jax

    from sdjax.models import cpu_lowering

    cpu_lowering.ENABLED = False  # the network's FLOPs as PyTorch computes them
    pipe = abstract_sd15()
    out = dict(devices=len(jax.devices()), size=size, images=images)
    for output_type, key in (("latent", "step"), ("np", "decode")):
        got = pipe.compile_call(prompt=["an astronaut riding a horse"] * images, negative_prompt="blurry",
                           height=size, width=size, num_inference_steps=20, guidance_scale=7.5, output_type=output_type)
        cost = got.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        layout = got.plan.layout
        out["layout"] = dict(batch=layout.batch, data=layout.data, pair=layout.pair, space=layout.space)
        out[f"{key}_gflop"] = cost["flops"] / 1e9
        out[f"{key}_compile_s"] = round(got.lower_seconds + got.compile_seconds, 1)
    out["vae_gflop"] = out["decode_gflop"] - out["step_gflop"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.size, args.images)))
        return
    rows = []
    for n in [int(d) for d in args.devices.split(",")]:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        result = subprocess.run([sys.executable, __file__, "--measure", "--size", str(args.size), "--images",
                                 str(args.images)], env=env, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"{n} devices: {result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    one = rows[0]
    print(f"SD 1.5, {args.size}², {args.images} image(s) with guidance: GFLOP per device (share of the first row)\n")
    print("| devices | layout (batch, data, pair, space) | text encoder + one sampling step | VAE decode |")
    print("|---|---|---|---|")
    for r in rows:
        lay = r["layout"]
        print(f"| {r['devices']} | {lay['batch']}, {lay['data']}, {lay['pair']}, {lay['space']} | "
              f"{r['step_gflop']:.0f} ({r['step_gflop'] / one['step_gflop']:.3f}) | "
              f"{r['vae_gflop']:.0f} ({r['vae_gflop'] / one['vae_gflop']:.3f}) |")


if __name__ == "__main__":
    main()
