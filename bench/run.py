"""Benchmarks: sdjax vs diffusers (PyTorch) on full-size SD 1.5 networks with random weights, in the same run.

    python bench/run.py --rows unet256,load --repeats 3 --out docs/benchmarks.md

Each measurement runs in its own process (so peak memory is its own) and prints one JSON line. The SD 1.5 folder
(real configs, random weights, diffusers layout) is written once under --cache. Numbers are medians over repeats
after one warm-up call; ratios are sdjax / PyTorch (below 1 means sdjax is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "sdjax" / "model_configs"
ROWS = {
    # name: (description, kwargs)
    "unet256": ("UNet, one CFG step (batch 2), 256², fp32", dict(res=256, dtype="float32")),
    "unet512": ("UNet, one CFG step (batch 2), 512², fp32", dict(res=512, dtype="float32")),
    "unet256_bf16": ("UNet, one CFG step (batch 2), 256², bf16", dict(res=256, dtype="bfloat16")),
    "unet512_bf16": ("UNet, one CFG step (batch 2), 512², bf16", dict(res=512, dtype="bfloat16")),
    "vae512": ("VAE decode, one 512² image, fp32", dict(res=512, dtype="float32")),
    "text": ("text encoder, batch 2, fp32", dict(dtype="float32")),
    "txt2img": ("txt2img, 20 DDIM steps, 512², batch 1, fp32", dict(res=512, steps=20, dtype="float32")),
    "load": ("from_pretrained of the SD1.5-size folder", dict()),
}


def sd15_folder(cache: Path) -> Path:
    """Write (once) a diffusers SD 1.5 pipeline folder with the real configs and random weights."""
    folder = cache / "sd15-random"
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / "sd15_unet.json").read_text()))
    vae = AutoencoderKL.from_config(json.loads((CONFIGS / "sd15_vae.json").read_text()))
    te = CLIPTextModel(CLIPTextConfig(**json.loads((CONFIGS / "clip_vit_l14_text.json").read_text())))
    tok = CLIPTokenizer.from_pretrained(str(ROOT / "sdjax" / "tokenizer_data"))
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _timed(fn, repeats):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------------------
# One measurement, inside its own process


def measure(row: str, framework: str, folder: Path, repeats: int) -> dict:
    kw = ROWS[row][1]
    if framework == "sdjax":
        out = _measure_sdjax(row, kw, folder, repeats)
    else:
        out = _measure_torch(row, kw, folder, repeats)
    out.update(row=row, framework=framework, peak_rss_mb=round(_peak_rss_mb()))
    return out


def _measure_sdjax(row, kw, folder, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import sdjax
    from sdjax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel

    dtype = getattr(jnp, kw.get("dtype", "float32"))
    if row == "load":
        t0 = time.perf_counter()
        sdjax.StableDiffusionPipeline.from_pretrained(folder)
        return dict(seconds=time.perf_counter() - t0)
    if row == "txt2img":
        pipe = sdjax.StableDiffusionPipeline.from_pretrained(folder, dtype=dtype)
        run = lambda: pipe("a photo of an astronaut", height=kw["res"], width=kw["res"],  # noqa: E731
                           num_inference_steps=kw["steps"], output_type="np")
        first, steady = _timed(run, repeats)
        return dict(seconds=steady, first_seconds=first)
    if row.startswith("unet"):
        model = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=dtype)
        r = kw["res"] // 8
        x = jnp.asarray(np.random.default_rng(0).standard_normal((2, r, r, 4)), dtype)
        ctx = jnp.zeros((2, 77, 768), dtype)
        f = nnx.jit(lambda m, x, c: m(x, 500.0, c))
        args = (model, x, ctx)
    elif row == "vae512":
        model = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 64, 4)), dtype)
        f = nnx.jit(lambda m, z: m.decode(z))
        args = (model, x)
    else:  # text
        model = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype)
        ids = jnp.ones((2, 77), jnp.int32)
        f = nnx.jit(lambda m, i: m(i).last_hidden_state)
        args = (model, ids)
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    compile_s = time.perf_counter() - t0
    _, steady = _timed(lambda: jax.block_until_ready(f(*args)), repeats)
    return dict(seconds=steady, first_seconds=compile_s)


def _measure_torch(row, kw, folder, repeats):
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[kw.get("dtype", "float32")]
    if row == "load":
        t0 = time.perf_counter()
        StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        return dict(seconds=time.perf_counter() - t0)
    torch.set_grad_enabled(False)
    if row == "txt2img":
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                       torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        run = lambda: pipe("a photo of an astronaut", height=kw["res"], width=kw["res"],  # noqa: E731
                           num_inference_steps=kw["steps"], output_type="np")
        first, steady = _timed(run, repeats)
        return dict(seconds=steady, first_seconds=first)
    if row.startswith("unet"):
        m = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).eval()
        r = kw["res"] // 8
        x = torch.randn(2, 4, r, r, dtype=dtype)
        ctx = torch.zeros(2, 77, 768, dtype=dtype)
        run = lambda: m(x, 500, ctx)  # noqa: E731
    elif row == "vae512":
        m = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).eval()
        z = torch.randn(1, 4, 64, 64, dtype=dtype)
        run = lambda: m.decode(z)  # noqa: E731
    else:
        m = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype).eval()
        ids = torch.ones(2, 77, dtype=torch.long)
        run = lambda: m(ids)  # noqa: E731
    first, steady = _timed(run, repeats)
    return dict(seconds=steady, first_seconds=first)


def matmul_peak() -> dict:
    """GFLOP/s of a 2048² float32 matmul in numpy and in jax on this machine."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    _, t_np = _timed(lambda: a @ a, 5)
    ja = jnp.asarray(a)
    f = jax.jit(lambda x: x @ x)
    _, t_jax = _timed(lambda: f(ja).block_until_ready(), 5)
    flops = 2 * n ** 3
    return dict(numpy_gflops=flops / t_np / 1e9, jax_gflops=flops / t_jax / 1e9)


# ----------------------------------------------------------------------------------------------------------------


def run_row(row, framework, folder, repeats, timeout):
    cmd = [sys.executable, __file__, "--measure", row, "--framework", framework, "--folder", str(folder),
           "--repeats", str(repeats)]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        return dict(row=row, framework=framework, error=r.stderr.strip().splitlines()[-1:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def write_report(results, peak, out: Path):
    import jax
    import torch

    lines = [
        "# Benchmarks: sdjax vs diffusers (PyTorch)", "",
        f"Measured {time.strftime('%Y-%m-%d')} by `python bench/run.py` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}. "
        "Full-size SD 1.5 networks with random weights. Medians after a warm-up; ratio = sdjax / PyTorch "
        "(below 1: sdjax faster). `first` is the first call (sdjax: includes compilation).", "",
        f"Matmul peak (2048², fp32): numpy {peak['numpy_gflops']:.0f} GFLOP/s, jax {peak['jax_gflops']:.0f} GFLOP/s.",
        "", "| measurement | sdjax s | PyTorch s | ratio | sdjax first s | PyTorch first s | sdjax peak RSS MB | "
        "PyTorch peak RSS MB |", "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["row"], r["framework"]): r for r in results}
    for row, (desc, _) in ROWS.items():
        a, b = by.get((row, "sdjax")), by.get((row, "torch"))
        if not a or not b:
            continue
        if "error" in a or "error" in b:
            lines.append(f"| {desc} | error: {a.get('error') or ''} | {b.get('error') or ''} | | | | | |")
            continue
        lines.append(
            f"| {desc} | {a['seconds']:.2f} | {b['seconds']:.2f} | {a['seconds'] / b['seconds']:.2f} | "
            f"{a.get('first_seconds', float('nan')):.2f} | {b.get('first_seconds', float('nan')):.2f} | "
            f"{a['peak_rss_mb']} | {b['peak_rss_mb']} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "sdjax-bench"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--framework", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.framework, Path(args.folder), args.repeats)))
        return
    folder = sd15_folder(Path(args.cache))
    results = []
    for row in args.rows.split(","):
        for fw in ("sdjax", "torch"):
            r = run_row(row, fw, folder, args.repeats, args.timeout)
            print(json.dumps(r), flush=True)
            results.append(r)
    write_report(results, matmul_peak(), Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
