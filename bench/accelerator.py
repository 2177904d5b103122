"""sdjax vs diffusers (PyTorch) on an accelerator, in one run: txt2img, one denoising step, compile, peak memory.

    python bench/accelerator.py --device gpu                      # every row on the GPU, then the doc table
    python bench/accelerator.py --device gpu --rows sd15_512_b1   # some rows
    python bench/accelerator.py --device gpu --parity             # tiny model: the GPU's images vs the CPU's
    python bench/accelerator.py --device cpu --quick              # dry run of every step on the shipped tiny model

bench/device_check.sh runs the parity check and every row within a time budget on a fresh machine; `bench/run.py
--device gpu` comes here too.

Each measurement is its own process (its peak device memory is its own), sdjax first, then PyTorch, one row after
the other. The networks are the real SD 1.5 / SDXL configs (sdjax/model_configs) with random weights made on the
device by each framework (no files: weights do not change the time), both sides in bf16 (`--dtype`), DDIM, guidance
7.5, one prompt with `num_images_per_prompt=batch`. A process makes one warm-up call (`first`: sdjax compiles
there) and `--repeats` timed calls of the whole txt2img (text encoding, the steps, VAE decode), then `--repeats` calls
with 10 more steps: the difference over 10 is one guided UNet step plus the sampler update (for sdjax the same
compiled program: both step counts share a bucket). PyTorch runs diffusers' default attention (`scaled_dot_product_
attention`). Results go into bench/results.json under "accelerator" and into docs/benchmarks.md between the
`accelerator` markers.

Parity (`--parity`): the shipped tiny model, fp32, the same call on the CPU and on the accelerator in one process;
the largest difference of the [0, 1] images, with XLA's fp32 dots and convolutions at full precision
(JAX_DEFAULT_MATMUL_PRECISION=highest; must be <= 5e-4) and at the backend's default precision (TF32 on NVIDIA GPUs:
reported, not checked).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "sdjax" / "model_configs"
SHIPPED = ROOT / "sdjax" / "default_model" / "pipeline"
RESULTS = ROOT / "bench" / "results.json"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- accelerator:start -->", "<!-- accelerator:end -->"
PROMPT = "a photograph of an astronaut riding a horse"
PARITY_TOLERANCE = 5e-4

ROWS = {
    # name: (description, model, resolution, batch, steps); --quick runs each on the tiny model at 64², 2 steps
    "sd15_512_b1": ("SD 1.5, 512², batch 1, 20 DDIM steps", "sd15", 512, 1, 20),
    "sd15_512_b8": ("SD 1.5, 512², batch 8, 20 DDIM steps", "sd15", 512, 8, 20),
    "sdxl_1024_b1": ("SDXL base, 1024², batch 1, 20 DDIM steps", "sdxl", 1024, 1, 20),
}
FRAMEWORKS = ("sdjax", "torch")
EXTRA_STEPS = 10  # the step time: (txt2img with steps + 10) - (txt2img with steps), over 10


def _config(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def _scheduler(model: str) -> dict:
    name = {"sd15": "sd15_scheduler.json", "sdxl": "sdxl_scheduler.json"}[model]
    return {**_config(name), "_class_name": "DDIMScheduler"}


def _median(xs):
    return statistics.median(xs) if xs else None


def _step_times(walls: list[float], more_walls: list[float]) -> dict:
    """The txt2img medians, and one guided step from the difference of EXTRA_STEPS more steps (same compiled
    program for sdjax: the step counts share a bucket; text encoding and decoding cancel out)."""
    seconds, more = _median(walls), _median(more_walls)
    return dict(walls=walls, seconds=seconds, more_walls=more_walls, more_seconds=more,
                step_seconds=(more - seconds) / EXTRA_STEPS)


def _times(fn, repeats: int) -> list[float]:
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return walls


# ----------------------------------------------------------------------------------------------------------------
# sdjax side


def random_weights(cls, config_name: str, dtype, seed: int):
    """The network with random weights, made on the default device by small compiled programs, one per shape.

    (flax's own initialisers under one `nnx.jit` took 136 s for SD 1.5 on an H200, mostly compiling; one program
    filling every parameter compiled for 190 s for the SDXL UNet on the CPU.) Kernels and embeddings ~ N(0, 1/fan_in),
    each a different window of one random vector; norm scales 1, biases 0: finite, typical activations, and no time
    spent on statistics that do not change the speed."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, abstract = nnx.split(cls.abstract(_config(config_name), dtype=dtype))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    window = 1 << 20
    pool = jax.random.normal(jax.random.key(seed), (max(x.size for _, x in leaves) + window,), jnp.float32)
    out = []
    for i, (path, x) in enumerate(leaves):
        name = str(path[-1]).lower()
        kind = "zeros" if "bias" in name else "ones" if "scale" in name else "normal"
        out.append(_leaf(tuple(x.shape), jnp.dtype(x.dtype).name, kind)(pool, jnp.int32((i * 7919) % window)))
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, out))


@functools.lru_cache(maxsize=None)
def _leaf(shape: tuple, dtype: str, kind: str):
    import math

    import jax
    import jax.numpy as jnp

    size = math.prod(shape)
    fan_in = math.prod(shape[:-1]) if len(shape) > 1 else shape[0]

    @jax.jit
    def make(pool, start):
        if kind == "zeros":
            return jnp.zeros(shape, dtype)
        if kind == "ones":
            return jnp.ones(shape, dtype)
        return (jax.lax.dynamic_slice(pool, (start,), (size,)).reshape(shape) / math.sqrt(fan_in)).astype(dtype)

    return make


def sdjax_pipeline(model: str, dtype):
    """The real SD 1.5 or SDXL base pipeline with random weights made on the default device."""
    import jax
    from flax import nnx

    from sdjax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from sdjax.models.clip import CLIPTextModelWithProjection
    from sdjax.pipelines.sd import StableDiffusionPipeline
    from sdjax.pipelines.sdxl import StableDiffusionXLPipeline
    from sdjax.tokenizer import Tokenizer

    make = functools.partial(random_weights, dtype=dtype)
    tokenizer = Tokenizer.from_pretrained(SHIPPED, subfolder="tokenizer")
    if model == "sd15":
        pipe = StableDiffusionPipeline(
            tokenizer=tokenizer, text_encoder=make(CLIPTextModel, "clip_vit_l14_text.json", seed=1),
            vae=make(AutoencoderKL, "sd15_vae.json", seed=2), unet=make(UNet2DConditionModel, "sd15_unet.json", seed=3),
            scheduler_config=_scheduler(model), name="sd15-random")
    else:
        pipe = StableDiffusionXLPipeline(
            tokenizer=tokenizer, text_encoder=make(CLIPTextModel, "clip_vit_l14_text.json", seed=1),
            tokenizer_2=tokenizer,
            text_encoder_2=make(CLIPTextModelWithProjection, "openclip_vit_bigg14_text.json", seed=4),
            vae=make(AutoencoderKL, "sdxl_vae.json", seed=2),
            unet=make(UNet2DConditionModel, "sdxl_base_unet.json", seed=3),
            scheduler_config=_scheduler(model), name="sdxl-random")
    jax.block_until_ready(nnx.state(pipe.unet))
    return pipe


def measure_sdjax(model: str, res: int, batch: int, steps: int, dtype: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    import sdjax

    dtype = getattr(jnp, dtype)
    t0 = time.perf_counter()
    if model == "tiny":
        pipe = sdjax.StableDiffusionPipeline.from_pretrained(SHIPPED, dtype=dtype)
    else:
        pipe = sdjax_pipeline(model, dtype)
    build = time.perf_counter() - t0

    def txt2img(n=steps):
        pipe(PROMPT, height=res, width=res, num_inference_steps=n, guidance_scale=7.5, sampler="ddim",
             num_images_per_prompt=batch, output_type="np")

    first = _times(txt2img, 1)[0]
    walls = _times(txt2img, repeats)
    more_walls = _times(lambda: txt2img(steps + EXTRA_STEPS), repeats)
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return dict(build_seconds=build, first_seconds=first, **_step_times(walls, more_walls),
                peak_gib=None if peak is None else peak / 2 ** 30,
                device=str(jax.local_devices()[0].device_kind), versions=f"jax {jax.__version__}")


# ----------------------------------------------------------------------------------------------------------------
# PyTorch side


def torch_pipeline(model: str, device, dtype):
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if model == "tiny":
        pipe = StableDiffusionPipeline.from_pretrained(SHIPPED, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return pipe.to(device)
    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED / "tokenizer")
    scheduler = DDIMScheduler.from_config(_scheduler(model))
    with torch.device(device):  # random init on the device: no minutes of CPU init for SDXL
        torch.manual_seed(0)
        te = CLIPTextModel(CLIPTextConfig(**_config("clip_vit_l14_text.json")))
        if model == "sd15":
            vae = AutoencoderKL.from_config(_config("sd15_vae.json"))
            unet = UNet2DConditionModel.from_config(_config("sd15_unet.json"))
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        else:
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_config("openclip_vit_bigg14_text.json")))
            vae = AutoencoderKL.from_config(_config("sdxl_vae.json"))
            unet = UNet2DConditionModel.from_config(_config("sdxl_base_unet.json"))
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tokenizer,
                                             tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    return pipe.to(device=device, dtype=dtype)


def measure_torch(model: str, res: int, batch: int, steps: int, dtype: str, repeats: int, device: str) -> dict:
    import torch

    torch.set_grad_enabled(False)
    dev = "cuda" if device == "gpu" else "cpu"
    dtype = getattr(torch, dtype)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    pipe = torch_pipeline(model, dev, dtype)
    sync()
    build = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)

    def txt2img(n=steps):
        pipe(PROMPT, height=res, width=res, num_inference_steps=n, guidance_scale=7.5,
             num_images_per_prompt=batch, output_type="np")
        sync()

    first = _times(txt2img, 1)[0]
    walls = _times(txt2img, repeats)
    more_walls = _times(lambda: txt2img(steps + EXTRA_STEPS), repeats)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return dict(build_seconds=build, first_seconds=first, **_step_times(walls, more_walls),
                peak_gib=None if peak is None else peak / 2 ** 30,
                device=torch.cuda.get_device_name() if dev == "cuda" else platform.processor(),
                versions=f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}")


# ----------------------------------------------------------------------------------------------------------------
# Parity of the tiny model: the accelerator's images vs the CPU's


def parity_images() -> dict:
    """The shipped model's fp32 images on the CPU and on the default backend (one process, both backends)."""
    import jax
    import numpy as np

    import sdjax
    from sdjax.distributed import data_mesh

    images = {}
    for backend in dict.fromkeys(("cpu", jax.default_backend())):
        pipe = sdjax.StableDiffusionPipeline.from_pretrained(SHIPPED, mesh=data_mesh(jax.devices(backend)[:1]))
        out = pipe(["a red circle on a blue background", "a green square"], num_inference_steps=10,
                   guidance_scale=7.5, sampler="dpmpp_2m", seed=0, output_type="np")
        images[backend] = np.asarray(out.images, np.float64)
    backends = list(images)
    diff = float(np.max(np.abs(images[backends[0]] - images[backends[-1]])))
    return dict(backends=backends, max_abs_diff=diff, precision=jax.config.jax_default_matmul_precision or "default")


def run_parity(device: str, timeout: float) -> dict:
    out = {}
    for precision in ("highest", "default"):
        env = dict(os.environ)
        env.pop("JAX_DEFAULT_MATMUL_PRECISION", None)
        if precision == "highest":
            env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
        if device == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
            if precision == "default":
                break  # the CPU's default is full precision: the first run says it all
        out[precision] = _subprocess(["--parity-measure"], env, timeout)
    check = out["highest"]
    ok = "error" not in check and check["max_abs_diff"] <= PARITY_TOLERANCE
    return dict(date=time.strftime("%Y-%m-%d %H:%M"), ok=ok, tolerance=PARITY_TOLERANCE, **out)


# ----------------------------------------------------------------------------------------------------------------
# Driver


def _subprocess(args: list[str], env: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(error=f"exit {p.returncode}: {tail[:300]}")
    return json.loads(lines[-1])


def run_row(row: str, device: str, quick: bool, dtype: str, repeats: int, deadline: float) -> dict:
    description, model, res, batch, steps = ROWS[row]
    if quick:
        model, res, steps = "tiny", 64, 2
        batch = min(batch, 2)
        description = f"{row} in quick mode: tiny model, 64², batch {batch}, {steps} DDIM steps"
    out = dict(description=description, date=time.strftime("%Y-%m-%d %H:%M"), dtype=dtype)
    for framework in FRAMEWORKS:
        left = deadline - time.time()
        if left < 20:
            out[framework] = dict(error="not run: the time budget was spent")
            continue
        env = dict(os.environ)
        if device == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
            env["CUDA_VISIBLE_DEVICES"] = ""
        kw = dict(model=model, res=res, batch=batch, steps=steps, dtype=dtype, repeats=repeats, device=device)
        t0 = time.perf_counter()
        out[framework] = _subprocess(["--measure", framework, "--kw", json.dumps(kw)], env, left)
        out[framework]["process_seconds"] = time.perf_counter() - t0
        print(f"  {row} {framework}: {_summary(out[framework])}", flush=True)
    return out


def _summary(r: dict) -> str:
    if "error" in r:
        return r["error"]
    return (f"txt2img {r['seconds']:.3f} s (first {r['first_seconds']:.1f} s), UNet step {r['step_seconds'] * 1e3:.1f} "
            f"ms, peak {_f(r.get('peak_gib'))} GiB, process {r['process_seconds']:.0f} s")


def _f(x, fmt="{:.2f}"):
    return "" if x is None else fmt.format(x)


def render(acc: dict) -> str:
    lines = []
    p = acc.get("parity")
    if p:
        parts = []
        for precision in ("highest", "default"):
            r = p.get(precision)
            if r is None:
                continue
            if "error" in r:
                parts.append(f"{precision} precision: error {r['error']}")
            else:
                parts.append(f"{precision} precision: max |diff| {r['max_abs_diff']:.2e} ({' vs '.join(r['backends'])})")
        verdict = "passed" if p["ok"] else "FAILED"
        lines += [f"Parity, shipped tiny model, fp32, 2 prompts x 10 dpmpp_2m steps, images in [0, 1] "
                  f"({p['date']}): {verdict} (<= {p['tolerance']:g} at highest precision); " + "; ".join(parts) + ".",
                  ""]
    meta = acc.get("machine")
    if meta:
        lines += [f"Machine: {meta}.", ""]
    lines += ["| row | dtype | sdjax txt2img s | PyTorch txt2img s | ratio | sdjax steps/s | PyTorch steps/s | "
              "sdjax step ms | PyTorch step ms | step ratio | sdjax first s | PyTorch first s | "
              "sdjax peak GiB | PyTorch peak GiB | measured |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, r in acc.get("rows", {}).items():
        a, b = r.get("sdjax", {}), r.get("torch", {})
        if "error" in a or "error" in b:
            lines.append(f"| {r['description']} | {r['dtype']} | error: {a.get('error', '')} | "
                         f"{b.get('error', '')} |" + " |" * 10 + f" {r['date']} |")
            continue
        steps = ROWS[row][4] if "quick" not in r["description"] else 2
        ratio = a["seconds"] / b["seconds"]
        lines.append(
            f"| {r['description']} | {r['dtype']} | {a['seconds']:.3f} | {b['seconds']:.3f} | {ratio:.2f} | "
            f"{steps / a['seconds']:.2f} | {steps / b['seconds']:.2f} | {a['step_seconds'] * 1e3:.1f} | "
            f"{b['step_seconds'] * 1e3:.1f} | {a['step_seconds'] / b['step_seconds']:.2f} | {a['first_seconds']:.1f} | "
            f"{b['first_seconds']:.1f} | {_f(a.get('peak_gib'))} | {_f(b.get('peak_gib'))} | {r['date']} |")
    lines += ["", "steps/s: sampler steps over the whole txt2img call (text encoding and VAE decode included); step: "
              "one guided denoising step, from the difference of txt2img with 10 more steps; "
              "first: the first call of a process (sdjax compiles there; PyTorch warms up cuDNN/cuBLAS); "
              "peak: the device allocator's peak in that process (JAX `peak_bytes_in_use`, PyTorch "
              "`max_memory_allocated`)."]
    return "\n".join(lines)


def write_doc(acc: dict, doc: Path) -> None:
    table = render(acc)
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n## On an accelerator (`bench/device_check.sh`)\n\n" + START + "\n" + table
                + "\n" + END + "\n")
    doc.write_text(text)


def machine(device: str) -> str:
    info = [platform.node() or "", f"{os.cpu_count()} CPUs"]
    if device == "gpu":
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
            info.insert(0, smi)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ", ".join(x for x in info if x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}; empty: none")
    ap.add_argument("--parity", action="store_true", help="check the tiny model's images against the CPU's first")
    ap.add_argument("--quick", action="store_true", help="every row on the tiny model at 64², 2 steps (results in a "
                    "temporary folder unless --results/--doc are given)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=420, help="seconds for everything; rows past it are not run")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--doc", default=str(DOC))
    ap.add_argument("--measure", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    ap.add_argument("--kw", help=argparse.SUPPRESS)
    ap.add_argument("--parity-measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.parity_measure:
        print(json.dumps(parity_images()))
        return 0
    if args.measure:
        kw = json.loads(args.kw)
        device = kw.pop("device")
        if args.measure == "sdjax":
            print(json.dumps(measure_sdjax(**kw)))
        else:
            print(json.dumps(measure_torch(**kw, device=device)))
        return 0
    deadline = time.time() + args.budget
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows: {', '.join(unknown)}")
    dtype = "float32" if args.quick and args.device == "cpu" else args.dtype
    if args.quick and (args.results, args.doc) == (str(RESULTS), str(DOC)):  # a dry run never touches the tables
        scratch = Path(tempfile.gettempdir()) / "sdjax-device-check-quick"
        scratch.mkdir(exist_ok=True)
        args.results, args.doc = str(scratch / "results.json"), str(scratch / "benchmarks.md")
    results_file = Path(args.results)
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    acc = results.setdefault("accelerator", {})
    acc["machine"] = machine(args.device)

    def save():
        results_file.write_text(json.dumps(results, indent=1) + "\n")
        write_doc(acc, Path(args.doc))

    failed = False
    if args.parity:
        acc["parity"] = run_parity(args.device, deadline - time.time())
        print(f"parity: {json.dumps(acc['parity'])}", flush=True)
        failed = not acc["parity"]["ok"]
        save()
    for row in rows:
        acc.setdefault("rows", {})[row] = run_row(row, args.device, args.quick, dtype, args.repeats, deadline)
        failed |= any("error" in acc["rows"][row][fw] for fw in FRAMEWORKS)
        save()
    print(render(acc))
    print(f"wrote {results_file} and {args.doc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
