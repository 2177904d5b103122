"""Device memory of SDXL at 1024x1024, read from XLA's compiled program without any weights or any run.

    python bench/sdxl_memory.py                       # every variant, one process each, table on stdout
    python bench/sdxl_memory.py --variants base-bf16-opt,refiner-bf16-opt --out docs/sdxl_memory.jsonl
    python bench/sdxl_memory.py --validate            # memory_analysis vs the measured RSS of a real run

A variant builds the real SDXL base (or refiner) networks shape-only (`PretrainedModel.abstract`, configs in
sdjax/model_configs/), puts them in a `StableDiffusionXLPipeline`, and makes the call the user would make (batch 1,
classifier-free guidance, so the UNet sees batch 2). The pipeline's own jitted program for that call is lowered
and compiled for this machine's backend and `compiled.memory_analysis()` is read: argument bytes (weights and
inputs), output, temporaries (every intermediate buffer of the program after XLA's buffer sharing, the while
loop included) and generated code. Peak device memory of the call ~ arguments + outputs + temporaries - aliased.

The base variant is txt2img with VAE decoding (its largest program; in a base->refiner run the base stops at
latents and the refiner decodes); the refiner variant is the refiner's half of the hand-off: img2img from the base's
latents at denoising_start=0.8, then decoding.

On CPU, XLA makes its own fusion and layout choices (not the TPU's or GPU's), so the numbers are the CPU compiler's
plan for the same program: `--validate` checks that plan against the measured resident memory of real runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "sdjax" / "model_configs"
GIB = 1024 ** 3
FITS_GIB = 15  # a 16 GB device (a TPU v5e chip: 16 GiB HBM; a T4: 15 GiB usable), with room for the runtime

SIZE = 1024
STEPS = 40
HIGH_NOISE_FRAC = 0.8
SCHEDULER = dict(  # SDXL's scheduler_config.json (EulerDiscreteScheduler)
    _class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    interpolation_type="linear", use_karras_sigmas=False,
)
VARIANTS = {
    # name: (model, dtype, attention query chunk, VAE tile side in pixels)
    "base-bf16-opt": ("base", "bfloat16", 1024, 512),
    "base-bf16-plain": ("base", "bfloat16", None, None),
    "base-fp32-opt": ("base", "float32", 1024, 512),
    "base-fp32-plain": ("base", "float32", None, None),
    "refiner-bf16-opt": ("refiner", "bfloat16", 1024, 512),
    "refiner-bf16-plain": ("refiner", "bfloat16", None, None),
    "refiner-fp32-opt": ("refiner", "float32", 1024, 512),
}


def _config(name):
    return json.loads((CONFIGS / name).read_text())


def abstract_pipeline(model: str, dtype):
    """The real SDXL base or refiner as a `StableDiffusionXLPipeline` of shape-only networks (no weights)."""
    from sdjax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from sdjax.models.clip import CLIPTextModelWithProjection
    from sdjax.pipelines.sdxl import StableDiffusionXLPipeline
    from sdjax.tokenizer import Tokenizer

    kw = dict(dtype=dtype, param_dtype=dtype)
    base = model == "base"
    tokenizer = Tokenizer.from_pretrained()
    return StableDiffusionXLPipeline(
        tokenizer=tokenizer if base else None,
        text_encoder=CLIPTextModel.abstract(_config("clip_vit_l14_text.json"), **kw) if base else None,
        tokenizer_2=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection.abstract(_config("openclip_vit_bigg14_text.json"), **kw),
        vae=AutoencoderKL.abstract(_config("sdxl_vae.json"), **kw),
        unet=UNet2DConditionModel.abstract(_config(f"sdxl_{model}_unet.json"), **kw),
        scheduler_config=SCHEDULER, force_zeros_for_empty_prompt=base, requires_aesthetics_score=not base,
        name=f"sdxl-{model}",
    )


def tree_bytes(tree) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_stats(compiled) -> dict:
    m = compiled.memory_analysis()
    out = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
               temp=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes)
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def measure_variant(name: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    model, dtype_name, chunk, tile = VARIANTS[name]
    t0 = time.perf_counter()
    pipe = abstract_pipeline(model, getattr(jnp, dtype_name))
    build_s = time.perf_counter() - t0
    pipe.enable_attention_chunking(chunk)
    pipe.enable_vae_tiling(tile is not None, tile_size=tile)
    params = {k: tree_bytes(nnx.state(m)) for k, m in
              (*pipe.text_encoders().items(), ("unet", pipe.unet), ("vae", pipe.vae))}
    call = dict(prompt="an astronaut riding a horse", negative_prompt="blurry", num_inference_steps=STEPS,
                guidance_scale=5.0, sampler="euler", output_type="np", seed=0)
    if model == "base":
        call.update(height=SIZE, width=SIZE)
    else:  # the refiner's half of the hand-off: from the base's latents
        f = pipe.vae_scale_factor
        call.update(image=np.zeros((1, SIZE // f, SIZE // f, pipe.latent_channels), np.float32),
                    denoising_start=HIGH_NOISE_FRAC)
    got = pipe.compile_call(**call)
    plan = got.plan
    live = {}
    if os.environ.get("SDXL_MEMORY_DUMP"):
        live = live_analysis(Path(os.environ["SDXL_MEMORY_DUMP"]))
    return dict(**live, variant=name, model=model, dtype=dtype_name, attention_chunk=chunk, vae_tile=tile, size=SIZE,
                steps=STEPS, mode=plan.mode, sampler_calls=[plan.start, plan.end], cfg=plan.cfg, batch=plan.batch,
                backend=jax.default_backend(), params=params, param_total=sum(params.values()),
                memory=memory_stats(got.compiled), build_s=round(build_s, 1), lower_s=round(got.lower_seconds, 1),
                compile_s=round(got.compile_seconds, 1),
                compile_peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2))


# ----------------------------------------------------------------------------------------------------------------
# What is live at the peak: XLA's own buffer live ranges (dumped with --xla_dump_to), summed over the schedule.

_ITEM = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
         "s8": 1, "u8": 1, "pred": 1}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\(", re.M)


def live_analysis(dump: Path) -> dict:
    """Peak of the sum of live buffers over XLA's schedule of the `generate` program, from its dumped live ranges:
    all buffers (this reproduces memory_analysis' arguments + temporaries + outputs, a check of the reading), and
    without the float32 copies XLA:CPU makes of bfloat16 weights (its convolutions and matmuls run in float32; an
    accelerator with bfloat16 units makes no such copies). Plus the largest non-weight buffers live at that peak."""
    import numpy as np

    hlo = next(dump.glob("*jit_generate.cpu_after_optimizations.txt")).read_text()
    ranges_text = next(dump.glob("*jit_generate.cpu_after_optimizations-live-range.txt")).read_text()
    shapes = {m.group(1): (m.group(2), m.group(3), m.group(4)) for m in _INSTRUCTION.finditer(hlo)}
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}\n")]
    weight_dims = {m.group(3) for m in _INSTRUCTION.finditer(entry)
                   if m.group(4) == "parameter" and m.group(2) == "bf16"}

    def nbytes(name):
        dtype, dims, _ = shapes[name]
        return _ITEM.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",")] if dims else [1]))

    def is_weight_upcast(name):  # a float32 copy of a bfloat16 weight (XLA:CPU's float normalization)
        dtype, dims, op = shapes[name]
        return dtype == "f32" and dims in weight_dims and op == "fusion" and "convert" in name

    body = ranges_text[ranges_text.index("BufferLiveRange:"):ranges_text.index("Live ranges at")]
    found = re.findall(r"^    ([\w.\-]+)\{([\d,]*)\}:(\d+)-(\d+)$", body, re.M)
    ranges = [(n, int(s), int(e)) for n, i, s, e in found if not i and n in shapes]
    length = max(e for _, _, e in ranges) + 1
    total, device = np.zeros(length), np.zeros(length)
    for name, start, end in ranges:
        total[start:end + 1] += nbytes(name)
        if not is_weight_upcast(name):
            device[start:end + 1] += nbytes(name)
    t = int(device.argmax())
    at_peak = sorted(((nbytes(n), n, "{}[{}]".format(*shapes[n][:2])) for n, s, e in ranges
                      if s <= t <= e and shapes[n][2] != "parameter" and not is_weight_upcast(n)), reverse=True)
    upcasts = sum(nbytes(n) for n, s, e in ranges if is_weight_upcast(n) and s <= int(total.argmax()) <= e)
    return dict(sum_live_peak=int(total.max()), weight_upcasts_at_that_peak=int(upcasts),
                peak_without_weight_upcasts=int(device.max()),
                activations_at_that_peak=int(sum(b for b, *_ in at_peak)),
                largest_at_that_peak=[f"{b / 2**20:.0f} MiB {shape}" for b, _, shape in at_peak[:6]])


# ----------------------------------------------------------------------------------------------------------------
# Validation: does the CPU compiler's plan match what a real run holds in memory?


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def validate_case(name: str) -> dict:
    """One real run: the SDXL VAE decoder (random weights, 84M parameters) at a size whose temporaries dwarf the
    process's other memory, or the SDXL UNet's first level at 1024²; predicted (memory_analysis) vs measured (the
    rise of the resident set's high-water mark while the program runs, after its arguments are in memory)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sdjax.models import AutoencoderKL

    kind, size, dtype_name, chunk = {
        "vae512-fp32": ("vae", 512, "float32", None),
        "vae768-fp32": ("vae", 768, "float32", None),
        "vae768-fp32-chunk": ("vae", 768, "float32", 1024),
        "vae768-bf16": ("vae", 768, "bfloat16", None),
    }[name]
    dtype = getattr(jnp, dtype_name)
    vae = AutoencoderKL.from_config(_config("sdxl_vae.json"), dtype=dtype, param_dtype=dtype)
    for _, m in nnx.iter_modules(vae):
        if hasattr(m, "query_chunk_size"):
            m.query_chunk_size = chunk
    graphdef, state = nnx.split(vae)
    z = jnp.asarray(np.random.default_rng(0).standard_normal((1, size // 8, size // 8, 4)), dtype)
    fn = jax.jit(lambda s, z: nnx.merge(graphdef, s)._decode(z))
    compiled = fn.lower(state, z).compile()
    predicted = memory_stats(compiled)
    jax.block_until_ready((state, z))
    before = _rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    out = jax.block_until_ready(compiled(state, z))
    measured = _rss_bytes("VmHWM") - before
    del out
    return dict(case=name, predicted_temp_plus_output=predicted["temp"] + predicted["output"], predicted=predicted,
                measured_rise=measured, ratio=round(measured / (predicted["temp"] + predicted["output"]), 3))


# ----------------------------------------------------------------------------------------------------------------


def _gib(x):
    return f"{x / GIB:.2f}"


def device_estimate(r: dict) -> int | None:
    """Peak device memory of the call on an accelerator: the sum of live buffers at the peak of XLA's schedule,
    without XLA:CPU's float32 copies of bfloat16 weights, plus the pipeline's weights the program does not read
    (jit drops unused arguments, e.g. the VAE encoder in txt2img, but they stay on the device). None without
    --analyse."""
    if r.get("peak_without_weight_upcasts") is None:
        return None
    return r["peak_without_weight_upcasts"] + max(0, r["param_total"] - r["memory"]["argument"])


def table(rows) -> str:
    """Markdown, GiB: one row per variant; "fits" asks whether the device estimate (without --analyse: the
    memory_analysis peak) is below FITS_GIB."""
    lines = ["| variant | weights | memory_analysis: arguments | temporaries | peak | device estimate | "
             "activations at its peak | fits 16 GB (< 15 GiB) | compile |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["memory"]
        estimate = device_estimate(r)
        fits = "yes" if (m["peak"] if estimate is None else estimate) < FITS_GIB * GIB else "no"
        extra = ("-", "-") if estimate is None else (_gib(estimate), _gib(r["activations_at_that_peak"]))
        lines.append(f"| {r['variant']} | {_gib(r['param_total'])} | {_gib(m['argument'])} | {_gib(m['temp'])} | "
                     f"{_gib(m['peak'])} | {extra[0]} | {extra[1]} | {fits} | {r['compile_s']:.0f} s |")
    return "\n".join(lines)


def _child(what: str, arg: str, analyse: bool = False, xla_flags: str = "") -> dict:
    """Run one measurement in a fresh process (its own peak memory, no cache of the previous one)."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    flags = [env.get("XLA_FLAGS", ""), xla_flags]
    with tempfile.TemporaryDirectory(prefix="sdxl-memory-") as dump:
        if analyse:
            env["SDXL_MEMORY_DUMP"] = dump
            flags.append(f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*jit_generate.*")
        env["XLA_FLAGS"] = " ".join(f for f in flags if f)
        r = subprocess.run([sys.executable, __file__, f"--{what}-one", arg], env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{what} {arg} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if xla_flags:
        out["xla_flags"] = xla_flags
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--validate", action="store_true", help="compare memory_analysis with real runs' RSS")
    p.add_argument("--out", help="append each result as a JSON line to this file")
    p.add_argument("--analyse", action="store_true",
                   help="also dump the program and sum XLA's buffer live ranges (peak without XLA:CPU's float32 "
                        "copies of bfloat16 weights, what is live there)")
    p.add_argument("--xla-flags", dest="xla_flags", default="",
                   help='extra XLA_FLAGS for the measured process, e.g. '
                        '"--xla_cpu_enable_concurrency_optimized_scheduler=false"')
    p.add_argument("--table", help="print the table of the results in this JSON-lines file (from --out)")
    p.add_argument("--variant-one", help=argparse.SUPPRESS)
    p.add_argument("--validate-one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        print(table([json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]))
        return 0
    if args.variant_one:
        print(json.dumps(measure_variant(args.variant_one)))
        return 0
    if args.validate_one:
        print(json.dumps(validate_case(args.validate_one)))
        return 0
    jobs = ([("validate", c) for c in ("vae512-fp32", "vae768-fp32", "vae768-fp32-chunk", "vae768-bf16")]
            if args.validate else [("variant", v) for v in args.variants.split(",")])
    rows = []
    for what, name in jobs:
        t0 = time.perf_counter()
        row = _child(what, name, analyse=args.analyse and what == "variant", xla_flags=args.xla_flags)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        rows.append(row)
    if not args.validate:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
