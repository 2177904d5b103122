"""Benchmarks: sdjax vs diffusers (PyTorch) on full-size SD 1.5 networks with random weights, in the same run.

    python bench/run.py --rows unet256,text,load --rounds 3 --repeats 3     # some rows
    python bench/run.py                                                      # every row (slow: 512² rows)
    python bench/run.py --rows load_single_safetensors,load_single_ckpt --rounds 3 --repeats 1 --cache /tmp/b
    python bench/run.py --device gpu --parity                                # the accelerator rows (bench/accelerator.py)

Every measurement runs in its own process (so its peak memory is its own), and the processes alternate between
sdjax and PyTorch: round 1 sdjax, round 1 PyTorch, round 2 sdjax, ... (`--rounds`). Inside a process a row makes
one warm-up call (`first`: for sdjax it includes compilation) and then `--repeats` timed calls; the table shows
medians over every timed call of every round, as wall time and as process CPU time (all threads: on a shared
machine wall time swings with the load, CPU time much less).

Results are kept per row in bench/results.json (a later run replaces only the rows it measures) and rendered into
docs/benchmarks.md between the `results` markers; the rest of that file is left as it is.

The SD 1.5 folder (real configs, random weights, diffusers layout) is written once under --cache; the single-file
rows also write its weights in fp16 once as a diffusers folder, as an original-layout (CompVis) `.safetensors` and as
a `.ckpt` (`torch.save({"state_dict": ...})`), about 2 GB each, with the tested writer of tests/single_file_fixtures.py.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "sdjax" / "model_configs"
RESULTS = ROOT / "bench" / "results.json"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"

ROWS = {
    # name: (description, kwargs)
    "unet256": ("UNet, one CFG step (batch 2), 256², fp32", dict(res=256, dtype="float32")),
    "unet512": ("UNet, one CFG step (batch 2), 512², fp32", dict(res=512, dtype="float32")),
    "unet256_bf16": ("UNet, one CFG step (batch 2), 256², bf16", dict(res=256, dtype="bfloat16")),
    "unet512_bf16": ("UNet, one CFG step (batch 2), 512², bf16", dict(res=512, dtype="bfloat16")),
    "vae512": ("VAE decode, one 512² image, fp32", dict(res=512, dtype="float32")),
    "text": ("text encoder, batch 2, fp32", dict(dtype="float32")),
    "txt2img": ("txt2img, {steps} DDIM steps, {res}², batch 1, fp32 (first = time to first image)",
                dict(res=512, steps=20, dtype="float32")),
    "load": ("from_pretrained, whole SD1.5 pipeline folder (4.1 GB fp32), file in page cache", dict(cache="warm")),
    "load_unet": ("from_pretrained, SD1.5 UNet (3.4 GB fp32), file in page cache", dict(cache="warm")),
    "load_cold": ("from_pretrained, whole SD1.5 pipeline folder, files evicted from page cache", dict(cache="cold")),
    "compile": ("compile the UNet 256² CFG step: cold vs a second process with the persistent cache", dict(res=256)),
    "load_single_safetensors": ("whole SD1.5 pipeline from one fp16 original-layout .safetensors (2.1 GB) into fp32, "
                                "file in page cache", dict(cache="warm", file="safetensors")),
    "load_single_ckpt": ("whole SD1.5 pipeline from one fp16 .ckpt (torch.save, 2.1 GB) into fp32, file in page cache",
                         dict(cache="warm", file="ckpt")),
}
# The single-file rows run three processes a round: sdjax's from_single_file, sdjax's from_pretrained of the same
# fp16 weights as a diffusers folder (the target: a file costs no more than the folder), diffusers' from_single_file.
SINGLE_FILE_ROWS = ("load_single_safetensors", "load_single_ckpt")
SINGLE_FILE_FRAMEWORKS = ("sdjax", "sdjax_folder", "torch")


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
    tok = CLIPTokenizer.from_pretrained(str(ROOT / "sdjax" / "default_model" / "pipeline" / "tokenizer"))
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def sd15_single_files(cache: Path, folder: Path) -> dict[str, Path]:
    """Write (once) the weights of the SD 1.5 `folder` cast to fp16, three ways: `folder16` a diffusers folder,
    `safetensors` one original-layout (CompVis) file, `ckpt` the same tensors saved by `torch.save({"state_dict":
    ...})`; and `config`, the folder's configs and tokenizer without weights (`config=` of from_single_file: diffusers
    cannot fall back to a folder's weights there)."""
    paths = dict(folder16=cache / "sd15-random-fp16", config=cache / "sd15-random-config",
                 safetensors=cache / "sd15-random-fp16.safetensors", ckpt=cache / "sd15-random-fp16.ckpt")
    if all(p.exists() for p in paths.values()):
        return paths
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    sys.path.insert(0, str(ROOT / "tests"))  # the writer the single-file tests trust (diffusers reads it back)
    from single_file_fixtures import WEIGHT_FILES, config_only, folder_weights, original_state

    parts = {part: {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in sd.items()}
             for part, sd in folder_weights(folder, ("unet", "vae", "text_encoder")).items()}
    config_only(folder, paths["config"])
    if not paths["folder16"].exists():
        tmp = cache / "sd15-random-fp16.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        config_only(folder, tmp)
        for part, sd in parts.items():
            save_file(sd, str(tmp / part / WEIGHT_FILES[part]), metadata={"format": "pt"})
        os.rename(tmp, paths["folder16"])
    # SD1.5 has 2 resnets per UNet level; the DDPM schedule buffers the original files carry are random here
    state = {k: np.ascontiguousarray(v) for k, v in
             original_state("sd1", parts, layers_per_block=2, rng=np.random.default_rng(0)).items()}
    del parts
    for kind, write in (("safetensors", lambda p: save_file(state, str(p))),
                        ("ckpt", lambda p: torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in
                                                                      state.items()}}, p))):
        if not paths[kind].exists():
            tmp = paths[kind].with_suffix(".tmp")
            write(tmp)
            os.rename(tmp, paths[kind])
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Page cache: the load rows warm (or evict) the weight files before each process, and say how much was resident


def _weight_files(folder: Path, row: str, kw: dict | None = None, framework: str = "") -> list[Path]:
    if row in SINGLE_FILE_ROWS:
        if framework == "sdjax_folder":
            return sorted(Path(kw["folder16"]).glob("*/*.safetensors"))
        return [Path(kw[kw["file"]])]
    files = sorted(folder.glob("*/*.safetensors"))
    return [f for f in files if f.parent.name == "unet"] if row == "load_unet" else files


def _resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore), None where that cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        resident = total = 0
        for f in files:
            size = f.stat().st_size
            with open(f, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) as mm:
                n = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
                if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                    return None
                resident += sum(v & 1 for v in vec)
                total += n
                del addr
        return resident / max(total, 1)
    except (OSError, AttributeError, ValueError, TypeError):
        return None


def _warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def _evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# One measurement, inside its own process


def _call_times(fn, repeats):
    """(first call seconds, [wall seconds], [process CPU seconds]) of `fn`: one warm-up call, then `repeats`."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return first, walls, cpus


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None


def measure(row: str, framework: str, folder: Path, repeats: int, kw: dict) -> dict:
    if framework.startswith("sdjax"):
        out = _measure_sdjax(row, kw, folder, repeats, framework)
    else:
        out = _measure_torch(row, kw, folder, repeats)
    out.update(row=row, framework=framework, peak_rss_mb=round(_peak_rss_mb()))
    return out


def _once(fn) -> dict:
    rss = _rss_mb()  # after the imports: what the load itself adds is peak - this
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return dict(walls=[time.perf_counter() - t0], cpus=[time.process_time() - c0],
                rss_before_mb=None if rss is None else round(rss))


def _measure_sdjax(row, kw, folder, repeats, framework="sdjax"):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import sdjax
    from sdjax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel

    dtype = getattr(jnp, kw.get("dtype", "float32"))
    if row in ("load", "load_cold"):
        return _once(lambda: sdjax.StableDiffusionPipeline.from_pretrained(folder))
    if row in SINGLE_FILE_ROWS:
        if framework == "sdjax_folder":
            return _once(lambda: sdjax.StableDiffusionPipeline.from_pretrained(kw["folder16"]))
        return _once(lambda: sdjax.StableDiffusionPipeline.from_single_file(kw[kw["file"]], config=kw["config"]))
    if row == "load_unet":
        return _once(lambda: jax.block_until_ready(
            nnx.state(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))))
    if row == "txt2img":
        if kw.get("compilation_cache"):
            from sdjax.pipelines.program import enable_compilation_cache

            enable_compilation_cache(kw["compilation_cache"])
        pipe = sdjax.StableDiffusionPipeline.from_pretrained(folder, dtype=dtype)
        run = lambda: pipe("a photo of an astronaut", height=kw["res"], width=kw["res"],  # noqa: E731
                           num_inference_steps=kw["steps"], sampler="ddim", output_type="np")
        first, walls, cpus = _call_times(run, repeats)
        return dict(first_seconds=first, walls=walls, cpus=cpus)

    # One network call under jax.jit over the module's state, as the pipeline runs it. (nnx.jit would walk the
    # module graph on every call: 2.2 s of CPU per call for the SD1.5 UNet with flax 0.12.8.)
    if row.startswith("unet") or row == "compile":
        model = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=dtype)
        r = kw["res"] // 8
        args = (jnp.asarray(np.random.default_rng(0).standard_normal((2, r, r, 4)), dtype),
                jnp.asarray(np.random.default_rng(1).standard_normal((2, 77, 768)), dtype))
        call = lambda m, x, c: m(x, 500.0, c)  # noqa: E731
    elif row == "vae512":
        model = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=dtype)
        args = (jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 64, 4)), dtype),)
        call = lambda m, z: m.decode(z)  # noqa: E731
    else:  # text
        model = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype)
        args = (jnp.ones((2, 77), jnp.int32),)
        call = lambda m, i: m(i).last_hidden_state  # noqa: E731
    graphdef, state = nnx.split(model)

    def program():
        return jax.jit(lambda s, *a: call(nnx.merge(graphdef, s), *a))

    f = program()
    if row == "compile":
        from sdjax.pipelines.program import enable_compilation_cache

        enable_compilation_cache(kw["compilation_cache"])
        t0 = time.perf_counter()
        lowered = f.lower(state, *args)  # tracing: Python, never cached
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        return dict(walls=[t2 - t0], cpus=[float("nan")], lower_seconds=t1 - t0, compile_seconds=t2 - t1)
    flops = model_flops(program, state, *args)
    first, walls, cpus = _call_times(lambda: jax.block_until_ready(f(state, *args)), repeats)
    return dict(first_seconds=first, walls=walls, cpus=cpus, gflop=flops / 1e9 if flops else None)


def model_flops(program, *args) -> float | None:
    """The network's FLOPs as PyTorch computes it: XLA's cost analysis of `program()` traced with sdjax's CPU
    rewrites off. (The cost analysis counts a while loop's body once, and on CPU sdjax runs large attentions as a
    loop over chunks; its 2x upsampler does fewer multiply-adds than the 3x3 convolution on the 2x image. Counted as
    sdjax runs it, SD1.5's VAE decoder at 512² is 2088 GFLOP instead of 2504.) Rates from this count are
    "effective": for the same network, not for the operations a program happens to run."""
    from sdjax.models import cpu_lowering

    with cpu_lowering.disabled():
        cost = program().lower(*args).cost_analysis()  # a fresh jit: its trace sees the setting
    return (cost[0] if isinstance(cost, (list, tuple)) else cost or {}).get("flops")


def _measure_torch(row, kw, folder, repeats):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[kw.get("dtype", "float32")]
    if row in ("load", "load_cold"):
        return _once(lambda: StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                     requires_safety_checker=False))
    if row == "load_unet":
        return _once(lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
    if row in SINGLE_FILE_ROWS:  # float32: the dtype sdjax loads into by default (the file's fp16 is upcast)
        return _once(lambda: StableDiffusionPipeline.from_single_file(
            kw[kw["file"]], config=kw["config"], torch_dtype=torch.float32, safety_checker=None,
            requires_safety_checker=False, local_files_only=True))
    torch.set_grad_enabled(False)
    if row == "txt2img":
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                       torch_dtype=dtype)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        run = lambda: pipe("a photo of an astronaut", height=kw["res"], width=kw["res"],  # noqa: E731
                           num_inference_steps=kw["steps"], output_type="np")
    elif row.startswith("unet"):
        m = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).eval()
        r = kw["res"] // 8
        x = torch.randn(2, 4, r, r, dtype=dtype)
        ctx = torch.randn(2, 77, 768, dtype=dtype)
        run = lambda: m(x, 500, ctx)  # noqa: E731
    elif row == "vae512":
        m = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).eval()
        z = torch.randn(1, 4, 64, 64, dtype=dtype)
        run = lambda: m.decode(z)  # noqa: E731
    else:
        m = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype).eval()
        ids = torch.ones(2, 77, dtype=torch.long)
        run = lambda: m(ids)  # noqa: E731
    first, walls, cpus = _call_times(run, repeats)
    return dict(first_seconds=first, walls=walls, cpus=cpus)


def matmul_peak() -> dict:
    """GFLOP/s of a 2048² float32 matmul in numpy and in jax on this machine."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    _, t_np, _ = _call_times(lambda: a @ a, 5)
    ja = jnp.asarray(a)
    f = jax.jit(lambda x: x @ x)
    _, t_jax, _ = _call_times(lambda: f(ja).block_until_ready(), 5)
    flops = 2 * n ** 3
    return dict(numpy_gflops=flops / statistics.median(t_np) / 1e9, jax_gflops=flops / statistics.median(t_jax) / 1e9)


# ----------------------------------------------------------------------------------------------------------------
# The driver


def run_process(row, framework, folder, repeats, kw, timeout) -> dict:
    cmd = [sys.executable, __file__, "--measure", row, "--framework", framework, "--folder", str(folder),
           "--repeats", str(repeats), "--kw", json.dumps(kw)]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout} s")
    if r.returncode != 0:
        return dict(error=(r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1])
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_row(row, folder, rounds, repeats, timeout, overrides, cache: Path | None = None) -> dict:
    desc, kw = ROWS[row]
    kw = dict(kw)
    if row == "txt2img":
        kw.update({k: v for k, v in overrides.items() if v is not None})
        desc = desc.format(**kw)
    frameworks = ("sdjax",) if row == "compile" else ("sdjax", "torch")
    where = machine()
    if row in SINGLE_FILE_ROWS:
        kw.update({k: str(v) for k, v in sd15_single_files(cache or folder.parent, folder).items()})
        frameworks = SINGLE_FILE_FRAMEWORKS
    runs = {fw: [] for fw in frameworks}
    notes = {}
    cache_dir = tempfile.mkdtemp(prefix="sdjax-bench-cache-") if row in ("compile", "txt2img") else None
    try:
        for i in range(rounds if row != "compile" else max(rounds, 2)):
            for fw in frameworks:
                if row.startswith("load"):
                    files = _weight_files(folder, row, kw, fw)
                    (_evict if kw["cache"] == "cold" else _warm)(files)
                    notes.setdefault("resident", []).append(_resident_fraction(files))
                pkw = dict(kw, compilation_cache=cache_dir) if cache_dir and fw == "sdjax" else kw
                r = run_process(row, fw, folder, repeats, pkw, timeout)
                print(json.dumps(dict(r, row=row, round=i, framework=fw)), flush=True)
                runs[fw].append(r)
    finally:
        if cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out = dict(description=desc, date=time.strftime("%Y-%m-%d"), machine=f"{where}, {end:.1f} at its end",
               rounds=rounds, repeats=repeats, **notes)
    if row in SINGLE_FILE_ROWS:
        out["files"] = {k: Path(kw[k]).name for k in ("folder16", "config", kw["file"])}
        out["bytes"] = os.path.getsize(kw[kw["file"]])
    for fw, rs in runs.items():
        errors = [r["error"] for r in rs if "error" in r]
        if errors:
            out[fw] = dict(error=errors[0])
            continue
        res = dict(
            seconds=statistics.median(w for r in rs for w in r["walls"]),
            cpu_seconds=_nanmedian([c for r in rs for c in r["cpus"]]),
            peak_rss_mb=max(r["peak_rss_mb"] for r in rs),
            all_seconds=[round(w, 3) for r in rs for w in r["walls"]],
        )
        if rs[0].get("first_seconds") is not None:
            res["first_seconds"] = statistics.median(r["first_seconds"] for r in rs)
            res["first_each_round"] = [round(r["first_seconds"], 2) for r in rs]
        if rs[0].get("gflop"):
            res["gflop"] = rs[0]["gflop"]
        if rs[0].get("rss_before_mb") is not None:
            res["rss_before_mb"] = max(r["rss_before_mb"] for r in rs)
        if row == "compile":  # round 1 compiles into an empty cache, later rounds read it
            for key in ("lower_seconds", "compile_seconds"):
                res["cold_" + key] = rs[0][key]
                res["cached_" + key] = statistics.median(r[key] for r in rs[1:])
        out[fw] = res
    return out


def _nanmedian(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else None


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {os.cpu_count()} CPUs, load average {load:.1f} at the start of the row"


# ----------------------------------------------------------------------------------------------------------------
# The report


def _f(x, fmt="{:.2f}"):
    return "" if x is None else fmt.format(x)


def render(results: dict) -> str:
    import jax
    import torch

    lines = [
        f"Versions: jax {jax.__version__}, torch {torch.__version__}. Each row says when and where it was measured "
        "(`bench/results.json` has every call).", "",
    ]
    if "matmul" in results:
        m = results["matmul"]
        lines += [f"Matmul peak (2048², fp32), {m['date']}: numpy {m['numpy_gflops']:.0f} GFLOP/s, "
                  f"jax {m['jax_gflops']:.0f} GFLOP/s.", ""]
    lines += [
        "| measurement | sdjax s | PyTorch s | ratio | sdjax CPU s | PyTorch CPU s | sdjax first s | "
        "PyTorch first s | sdjax peak RSS MB | PyTorch peak RSS MB | GFLOP | sdjax GFLOP/s (% of jax matmul peak) | "
        "PyTorch GFLOP/s | measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    matmul = results.get("matmul", {})
    for row in ROWS:
        if row not in results or row == "compile" or row in SINGLE_FILE_ROWS:
            continue
        r = results[row]
        a, b = r.get("sdjax", {}), r.get("torch", {})
        if "error" in a or "error" in b:
            lines.append(f"| {r['description']} | error: {a.get('error', '')} | {b.get('error', '')} |"
                         + " |" * 11)
            continue
        ratio = a["seconds"] / b["seconds"] if a.get("seconds") and b.get("seconds") else None
        peak = matmul.get("jax_gflops") if matmul.get("date") == r["date"] else None  # a share of that day's peak
        resident = r.get("resident")
        where = f"{r['date']}; {r['machine']}"
        if resident and None not in resident:
            where += f"; page cache {min(resident) * 100:.0f}-{max(resident) * 100:.0f}% resident before loads"
        lines.append(
            f"| {r['description']} | {_f(a.get('seconds'))} | {_f(b.get('seconds'))} | {_f(ratio)} | "
            f"{_f(a.get('cpu_seconds'))} | {_f(b.get('cpu_seconds'))} | {_f(a.get('first_seconds'))} | "
            f"{_f(b.get('first_seconds'))} | {a.get('peak_rss_mb', '')} | {b.get('peak_rss_mb', '')} | "
            f"{_f(a.get('gflop'), '{:.0f}')} | {_rate(a.get('gflop'), a.get('seconds'), peak)} | "
            f"{_rate(a.get('gflop'), b.get('seconds'))} | {where} |"
        )
    lines += _render_single_file(results)
    if "compile" in results:
        c = results["compile"]
        a = c.get("sdjax", {})
        if "error" in a:
            lines += ["", f"Compile: error {a['error']}"]
        elif "cold_compile_seconds" in a:
            cold, cached = a["cold_compile_seconds"], a["cached_compile_seconds"]
            lines += ["", f"Compile ({c['description']}; {c['date']}; {c['machine']}): XLA compile cold {cold:.2f} s, "
                          f"second process {cached:.2f} s ({cached / cold * 100:.0f}% of cold); tracing and lowering "
                          f"(Python, not cached) {a['cold_lower_seconds']:.2f} s and "
                          f"{a['cached_lower_seconds']:.2f} s."]
    return "\n".join(lines)


def _render_single_file(results: dict) -> list[str]:
    rows = [row for row in SINGLE_FILE_ROWS if row in results]
    if not rows:
        return []
    lines = ["", "Single-file loading: sdjax's and diffusers' `from_single_file(FILE, config=FOLDER)` (FOLDER: "
             "the diffusers folder's configs and tokenizer without weights), and sdjax's `from_pretrained` of the "
             "same fp16 weights as a diffusers folder; diffusers with `torch_dtype=torch.float32`: every side ends "
             "with fp32 parameters. RSS before = the process after its imports, before the load.", "",
             "| measurement | sdjax file s | sdjax folder s | diffusers file s | sdjax file / folder | "
             "sdjax file / diffusers | CPU s: sdjax file, folder, diffusers | peak RSS MB: sdjax file, folder, "
             "diffusers | RSS before MB: sdjax file, folder, diffusers | measured |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = results[row]
        sides = [r.get(fw, {}) for fw in SINGLE_FILE_FRAMEWORKS]
        errors = [s["error"] for s in sides if "error" in s]
        if errors:
            lines.append(f"| {r['description']} | error: {errors[0]} |" + " |" * 8)
            continue
        a, f, b = (s.get("seconds") for s in sides)
        where = f"{r['date']}; {r['machine']}"
        resident = r.get("resident")
        if resident and None not in resident:
            where += f"; page cache {min(resident) * 100:.0f}-{max(resident) * 100:.0f}% resident before loads"
        trio = lambda key, fmt="{:.2f}": ", ".join(_f(s.get(key), fmt) for s in sides)  # noqa: E731
        lines.append(
            f"| {r['description']} | {_f(a)} | {_f(f)} | {_f(b)} | {_f(a / f if a and f else None)} | "
            f"{_f(a / b if a and b else None)} | {trio('cpu_seconds')} | {trio('peak_rss_mb', '{:.0f}')} | "
            f"{trio('rss_before_mb', '{:.0f}')} | {where} |")
    return lines


def _rate(gflop: float | None, seconds: float | None, peak: float | None = None) -> str:
    """GFLOP/s of a median call: the network's FLOPs as XLA counts them for sdjax's program (PyTorch computes the same
    network), with the share of the jax matmul peak when `peak` is given."""
    if not gflop or not seconds:
        return ""
    rate = gflop / seconds
    return f"{rate:.0f} ({rate / peak * 100:.0f}%)" if peak else f"{rate:.0f}"


def write_doc(results: dict, doc: Path) -> None:
    table = render(results)
    text = doc.read_text() if doc.is_file() else "# Benchmarks: sdjax vs diffusers (PyTorch)\n\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + START + "\n" + table + "\n" + END + "\n"
    doc.write_text(text)


def main():
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    known, rest = pre.parse_known_args()
    if known.device == "gpu":  # the accelerator rows: bench/accelerator.py, with its own options
        sys.path.insert(0, str(ROOT / "bench"))
        import accelerator

        sys.exit(accelerator.main(["--device", "gpu", *rest]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                    help="gpu: sdjax vs PyTorch CUDA on the GPU (bench/accelerator.py; its options, e.g. --rows "
                         "sd15_512_b1 --parity, follow)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}, matmul")
    ap.add_argument("--rounds", type=int, default=2, help="processes per framework, alternating sdjax/PyTorch")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per process after the warm-up call")
    ap.add_argument("--txt2img-steps", type=int, help="override the txt2img row's 20 steps (a quick dry run)")
    ap.add_argument("--txt2img-res", type=int, help="override the txt2img row's 512² resolution")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "sdjax-bench"))
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--out", default=str(DOC), help="markdown file whose results section is rewritten")
    ap.add_argument("--timeout", type=int, default=7200)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--framework", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--kw", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.framework, Path(args.folder), args.repeats, json.loads(args.kw))))
        return
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS and r != "matmul"]
    if unknown:
        ap.error(f"unknown rows: {', '.join(unknown)}")
    folder = sd15_folder(Path(args.cache))
    results_file = Path(args.results)
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    overrides = dict(steps=args.txt2img_steps, res=args.txt2img_res)
    for row in rows:
        if row == "matmul":
            results["matmul"] = dict(date=time.strftime("%Y-%m-%d"), machine=machine(), **matmul_peak())
        else:
            results[row] = run_row(row, folder, args.rounds, args.repeats, args.timeout, overrides, Path(args.cache))
        results_file.write_text(json.dumps(results, indent=1) + "\n")
        write_doc(results, Path(args.out))
    write_doc(results, Path(args.out))
    print(f"wrote {results_file} and {args.out}")


if __name__ == "__main__":
    main()
