"""The pipelines' programs compiled for real TPU slices on this CPU, with no TPU: the TPU compiler's own memory plan
and work per chip.

    pip install -e . "jax[tpu]"                    # libtpu: the TPU compiler (no TPU needed to compile)
    nice -n 19 python bench/tpu_aot.py             # every (topology, program) not yet in docs/tpu.json
    python bench/tpu_aot.py --jobs v5e-2x2:sdxl-base-latents,v5e-2x2:sdxl-refiner
    python bench/tpu_aot.py --doc                  # only rewrite docs/tpu.md from docs/tpu.json

`jax.experimental.topologies.get_topology_desc("v5e:2x2", "tpu")` gives the devices of a TPU slice to compile for.
Each program's pipeline is built shape-only (`PretrainedModel.abstract`, the real configs of
`sdjax.original_layout.builtin_configs`, bf16) on a `data` mesh of those devices, and the call is made as a user
makes it (prompt, negative prompt, guidance, the options below); the program the call would run, the pipeline's own
jitted program with its shardings, is lowered and compiled instead of run (on compile-only devices the pipeline
hands the program shapes, `sdjax.pipelines.program.put_batch`). Read from the compiled program, per chip:
`memory_analysis()` (arguments: weights and inputs; output; temporaries: every intermediate buffer after XLA's
buffer sharing, the sampling loop included; generated code) and `cost_analysis()` FLOPs. XLA counts the body of a
loop once, whatever its trip count (a fori_loop of 10 matmuls compiled for v5e counts 1), so the FLOPs are those of
text encoding, one sampler call and decoding, not of a whole generation. Each job runs in a fresh process; results
are merged into docs/tpu.json (one record per topology and program) and docs/tpu.md is written from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JSON_OUT = ROOT / "docs" / "tpu.json"
MD_OUT = ROOT / "docs" / "tpu.md"
GIB = 1024 ** 3
RUNTIME_RESERVE_GIB = 1.0  # HBM the TPU runtime keeps for itself (a planning margin, not a measurement)


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # libtpu's topology name
    options: tuple = ()  # get_topology_desc keyword arguments
    hbm_gib: int = 16  # HBM per chip
    what: str = ""


TOPOLOGIES = {
    "v5e-2x2": Topology("v5e:2x2", hbm_gib=16, what="TPU v5e, 4 chips (v5litepod-4)"),
    "v5e-2x4": Topology("v5e:2x4", hbm_gib=16, what="TPU v5e, 8 chips (v5litepod-8)"),
    # one JAX device per v4 chip (its two TensorCores as one megacore), as JAX runs on a v4 VM
    "v4-2x2x1": Topology("v4:2x2x1", (("chip_config_name", "megacore"),), hbm_gib=32,
                         what="TPU v4, 4 chips (v4-8), megacore"),
    "v6e-2x2": Topology("v6e:2x2", hbm_gib=32, what="TPU v6e, 4 chips (v6e-4)"),
}


@dataclasses.dataclass(frozen=True)
class Program:
    family: str  # sdjax.original_layout built-in config name
    what: str
    call: tuple  # the pipeline call's keyword arguments (besides prompt/negative/seed)
    attention_chunk: int | None = None  # pipe.enable_attention_chunking
    vae_tile: int | None = None  # pipe.enable_vae_tiling(tile_size=...)


SDXL_STEPS, HIGH_NOISE_FRAC = 40, 0.8
PROGRAMS = {
    "sdxl-base-latents": Program(
        "sdxl", "SDXL base 1024², txt2img to latents at denoising_end=0.8 (the base half of base -> refiner)",
        (("height", 1024), ("width", 1024), ("num_inference_steps", SDXL_STEPS), ("guidance_scale", 5.0),
         ("denoising_end", HIGH_NOISE_FRAC), ("output_type", "latent")), attention_chunk=1024),
    "sdxl-refiner": Program(
        "sdxl-refiner", "SDXL refiner 1024², from the base's latents at denoising_start=0.8, decoded "
        "(the refiner half)",
        (("image", "latents:128"), ("num_inference_steps", SDXL_STEPS), ("guidance_scale", 5.0),
         ("denoising_start", HIGH_NOISE_FRAC), ("output_type", "np")), attention_chunk=1024, vae_tile=512),
    "sd15-512-b1": Program("sd15", "SD 1.5 512² txt2img, 1 image", (
        ("height", 512), ("width", 512), ("num_inference_steps", 50), ("guidance_scale", 7.5),
        ("output_type", "np"))),
    "sd15-512-b8": Program("sd15", "SD 1.5 512² txt2img, 8 images (num_images_per_prompt=8)", (
        ("height", 512), ("width", 512), ("num_inference_steps", 50), ("guidance_scale", 7.5),
        ("num_images_per_prompt", 8), ("output_type", "np"))),
    "sdxl-base": Program(
        "sdxl", "SDXL base 1024² txt2img, decoded", (
            ("height", 1024), ("width", 1024), ("num_inference_steps", SDXL_STEPS), ("guidance_scale", 5.0),
            ("output_type", "np")), attention_chunk=1024, vae_tile=512),
    "sd21-768": Program("sd21", "SD 2.1 768² txt2img, v-prediction", (
        ("height", 768), ("width", 768), ("num_inference_steps", 50), ("guidance_scale", 7.5),
        ("output_type", "np")), attention_chunk=1024),
    "x4-2048-tiled": Program(
        "x4-upscaler", "x4 upscaler 512² -> 2048² in 128² tiles (overlap 32): the one tile program, run 25 times",
        (("image", "rgb:512"), ("tile_size", 128), ("tile_overlap", 32), ("num_inference_steps", 75),
         ("guidance_scale", 9.0), ("noise_level", 20), ("output_type", "np"))),
}
# what is compiled first: the SDXL hand-off and the SD 1.5 batches on v5e, then everything else on v5e, then the rest
ORDER = ([("v5e-2x2", p) for p in PROGRAMS]
         + [(t, p) for t in ("v5e-2x4", "v4-2x2x1", "v6e-2x2") for p in PROGRAMS])


def abstract_pipeline(family: str, mesh, dtype):
    """The real `family` pipeline (sdjax.original_layout built-in configs) with shape-only networks on `mesh`."""
    from sdjax import original_layout
    from sdjax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from sdjax.models.clip import CLIPTextModelWithProjection
    from sdjax.pipelines.sd import StableDiffusionPipeline
    from sdjax.pipelines.sdxl import StableDiffusionXLPipeline
    from sdjax.pipelines.upscale import StableDiffusionUpscalePipeline
    from sdjax.tokenizer import Tokenizer

    c = original_layout.builtin_configs(family)
    kw = dict(dtype=dtype, param_dtype=dtype)
    common = dict(vae=AutoencoderKL.abstract(c.vae, **kw), unet=UNet2DConditionModel.abstract(c.unet, **kw),
                  scheduler_config=c.scheduler, name=family, mesh=mesh)
    openclip = Tokenizer.from_pretrained(None, pad_token="!")
    if family.startswith("sdxl"):
        base = c.text_encoder is not None
        return StableDiffusionXLPipeline(
            tokenizer=Tokenizer.from_pretrained() if base else None,
            text_encoder=CLIPTextModel.abstract(c.text_encoder, **kw) if base else None,
            tokenizer_2=openclip, text_encoder_2=CLIPTextModelWithProjection.abstract(c.text_encoder_2, **kw),
            force_zeros_for_empty_prompt=bool(c.force_zeros_for_empty_prompt),
            requires_aesthetics_score=bool(c.requires_aesthetics_score), **common)
    tokenizer = openclip if c.text_encoder.get("hidden_act") == "gelu" else Tokenizer.from_pretrained()
    text_encoder = CLIPTextModel.abstract(c.text_encoder, **kw)
    if family == "x4-upscaler":
        return StableDiffusionUpscalePipeline(tokenizer=tokenizer, text_encoder=text_encoder,
                                              low_res_scheduler_config=c.low_res_scheduler,
                                              max_noise_level=c.max_noise_level or 350, **common)
    return StableDiffusionPipeline(tokenizer=tokenizer, text_encoder=text_encoder, **common)


def _call_arguments(program: Program, pipe) -> dict:
    import numpy as np

    call = dict(prompt="an astronaut riding a horse on the moon, detailed photograph", negative_prompt="blurry",
                sampler="euler", seed=0)
    for key, value in program.call:
        if key == "image" and value.startswith("latents:"):
            side = int(value.split(":")[1])
            value = np.zeros((1, side, side, pipe.latent_channels), np.float32)
        elif key == "image" and value.startswith("rgb:"):
            side = int(value.split(":")[1])
            value = np.full((side, side, 3), 0.5, np.float32)
        call[key] = value
    return call


def _tree_bytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(topology_name: str, program_name: str) -> dict:
    """One job, in this process: compile `program_name` for `topology_name` and read the compiled program."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.experimental import topologies
    from jax.sharding import Mesh

    topology, program = TOPOLOGIES[topology_name], PROGRAMS[program_name]
    record = dict(topology=topology_name, program=program_name, family=program.family, what=program.what,
                  attention_chunk=program.attention_chunk, vae_tile=program.vae_tile, dtype="bfloat16",
                  call={k: v for k, v in program.call}, date=datetime.date.today().isoformat(), **versions())
    devices = topologies.get_topology_desc(topology.name, "tpu", **dict(topology.options)).devices
    record.update(chips=len(devices), device_kind=devices[0].device_kind, hbm_gib=topology.hbm_gib)
    mesh = Mesh(np.asarray(devices), ("data",))
    t0 = time.perf_counter()
    pipe = abstract_pipeline(program.family, mesh, jnp.bfloat16)
    pipe.enable_attention_chunking(program.attention_chunk)
    pipe.enable_vae_tiling(program.vae_tile is not None, tile_size=program.vae_tile)
    record["build_s"] = round(time.perf_counter() - t0, 1)
    params = {k: _tree_bytes(nnx.state(m)) for k, m in
              (*pipe.text_encoders().items(), ("unet", pipe.unet), ("vae", pipe.vae))}
    record.update(params=params, param_total=sum(params.values()))
    try:
        got = pipe.compile_call(**_call_arguments(program, pipe))
    except Exception as e:  # noqa: BLE001 (a failure to compile is a result: recorded, the next job runs)
        record.update(compiled=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:400]}",
                      traceback=traceback.format_exc()[-4000:])
        return record
    plan, compiled = got.plan, got.compiled
    m = compiled.memory_analysis()
    memory = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
                  temp=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes)
    memory["peak"] = memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
    # weights the program does not read (jit drops them: the VAE encoder in txt2img) stay on the chip all the same
    memory["resident"] = memory["peak"] + max(0, record["param_total"] - memory["argument"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    record.update(
        compiled=True, mode=plan.mode, cfg=plan.cfg, batch=plan.batch, latent_hw=list(plan.latent_hw),
        layout=dict(data=plan.layout.data, pair=plan.layout.pair, space=plan.layout.space),
        decode=plan.decode, sampler_calls=plan.calls, memory=memory,
        flops=float(cost.get("flops", 0.0)), bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        lower_s=round(got.lower_seconds, 1), compile_s=round(got.compile_seconds, 1),
        compile_peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2))
    return record


def versions() -> dict:
    from importlib import metadata

    out = {}
    for package in ("jax", "jaxlib", "libtpu", "flax"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    out["python"] = platform.python_version()
    return out


# ----------------------------------------------------------------------------------------------------------------


def load_results() -> dict:
    if JSON_OUT.is_file():
        return json.loads(JSON_OUT.read_text())
    return {"results": []}


def save_result(record: dict) -> None:
    data = load_results()
    data["results"] = [r for r in data["results"]
                       if (r["topology"], r["program"]) != (record["topology"], record["program"])] + [record]
    order = {job: i for i, job in enumerate(ORDER)}
    data["results"].sort(key=lambda r: order.get((r["topology"], r["program"]), len(order)))
    JSON_OUT.write_text(json.dumps(data, indent=1) + "\n")


def _gib(x) -> str:
    return f"{x / GIB:.2f}"


def _options(r) -> str:
    out = []
    if r.get("attention_chunk"):
        out.append(f"chunk {r['attention_chunk']}")
    if r.get("vae_tile"):
        out.append(f"VAE tile {r['vae_tile']}")
    return ", ".join(out) or "-"


def _layout(r) -> str:
    """The batch and how it lies on the chips; a record without a layout predates the small-batch split (†)."""
    lay = r.get("layout")
    if lay is None:
        return f"{r['batch']} ({r['batch'] // r['chips']} per chip) †"
    if lay["pair"] * lay["space"] == 1:
        return f"{r['batch']} ({r['batch'] // lay['data']} per chip)"
    split = " x ".join(f"{what} {n}" for what, n in (("pair", lay["pair"]), ("height", lay["space"])) if n > 1)
    return f"{r['batch']} (an image on {lay['pair'] * lay['space']} chips: {split})"


def split_share(results: list, topology: str) -> str | None:
    """One SD 1.5 image split over the chips against one image's work on a chip (the 8-image program's per chip
    GFLOPs over its images per chip): the small-batch split measured by the TPU compiler."""
    got = {r["program"]: r for r in results if r["topology"] == topology and r.get("compiled")}
    one, eight = got.get("sd15-512-b1"), got.get("sd15-512-b8")
    if not (one and eight and one.get("layout") and one["layout"]["pair"] * one["layout"]["space"] > 1):
        return None
    per_image = eight["flops"] / (eight["batch"] / eight["chips"])
    chips = one["layout"]["pair"] * one["layout"]["space"]
    return (f"One SD 1.5 image split over {chips} chips: {one['flops'] / 1e9:,.0f} GFLOPs per chip, "
            f"{one['flops'] / per_image:.3f} of one image's work on a chip ({per_image / 1e9:,.0f} GFLOPs, from the "
            f"8-image program); 1/{chips} = {1 / chips:.3f}.")


def handoff(results: list, topology: str) -> dict | None:
    """SDXL base + refiner both resident on each chip: the larger of (the base's program + the refiner's weights)
    and (the refiner's program + the base's weights)."""
    got = {r["program"]: r for r in results if r["topology"] == topology and r.get("compiled")}
    base, refiner = got.get("sdxl-base-latents"), got.get("sdxl-refiner")
    if not (base and refiner):
        return None
    during_base = base["memory"]["resident"] + refiner["param_total"]
    during_refiner = refiner["memory"]["resident"] + base["param_total"]
    return dict(during_base=during_base, during_refiner=during_refiner, peak=max(during_base, during_refiner),
                hbm_gib=base["hbm_gib"])


def write_doc(data: dict) -> str:
    results = data["results"]
    done = {(r["topology"], r["program"]) for r in results}
    lines = [
        "# TPU programs, compiled for real TPU slices without a TPU",
        "",
        "Generated by `bench/tpu_aot.py` (do not edit; rerun it). Each row is the pipeline's own jitted program for "
        "the call described, compiled by libtpu's TPU compiler on a CPU for the topology's devices "
        "(`jax.experimental.topologies`), with the real configs, bf16 weights (shape-only: nothing is run) and the "
        "batch laid on all chips as a call lays it (see images (layout) below), weights replicated. Numbers are per "
        "chip, from "
        "`compiled.memory_analysis()` and `compiled.cost_analysis()`; raw records in `docs/tpu.json`.",
        "",
        "- **arguments**: the weights the program reads plus its inputs; **temp**: every intermediate buffer after "
        "XLA's buffer sharing (sampling loop, VAE decode); **peak** = arguments + output + temp - aliased; "
        "**resident** = peak + the pipeline's weights the program does not read (jit drops them, e.g. the VAE "
        "encoder in txt2img; they stay on the chip).",
        "- **GFLOPs**: XLA's count for one chip. XLA counts a loop's body once whatever its trip count (a fori_loop "
        "of 10 matmuls compiled for v5e counts 1), so this is text encoding + one sampler call (the UNet on the "
        "guided pair) + decoding, not a whole generation.",
        "- **compile**: seconds of `lowered.compile()` on this machine (2 shared CPU cores, `nice -n 19`).",
        "- **images (layout)**: the batch the program computes (padding included) and how it lies on the chips. With "
        "fewer images than chips an image's chips split its guided pair and its latents' height "
        "(`sdjax.pipelines.program.Layout`). Rows marked † were compiled before that split existed (then 1 image on "
        "4 chips compiled a batch of 4, one per chip, 3 of them padding); they are the same program for batches of "
        "at least one image per chip.",
        "",
    ]
    stamp = sorted({(r["date"], r["jax"], r["jaxlib"], r["libtpu"]) for r in results})
    for date, jax_v, jaxlib_v, libtpu_v in stamp:
        lines.append(f"Measured {date}: jax {jax_v}, jaxlib {jaxlib_v}, libtpu {libtpu_v}.")
    lines.append("")
    for name, topology in TOPOLOGIES.items():
        rows = [r for r in results if r["topology"] == name]
        lines += [f"## {name}: {topology.what}, {topology.hbm_gib} GiB HBM per chip", ""]
        if not rows:
            lines += ["Not run (not compiled yet; `python bench/tpu_aot.py` compiles every missing job).", ""]
            continue
        lines += ["| program | options | images (layout) | weights | arguments | output | temp | peak | resident | "
                  "code | GFLOPs | compile |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if not r.get("compiled"):
                lines.append(f"| {r['program']} | {_options(r)} | FAILED: {r['error']} |" + " |" * 9)
                continue
            m = r["memory"]
            lines.append(
                f"| {r['program']} | {_options(r)} | {_layout(r)} | "
                f"{_gib(r['param_total'])} | {_gib(m['argument'])} | {_gib(m['output'])} | {_gib(m['temp'])} | "
                f"{_gib(m['peak'])} | {_gib(m['resident'])} | {_gib(m['code'])} | {r['flops'] / 1e9:,.0f} | "
                f"{r['compile_s']:.0f} s |")
        missing = [p for p in PROGRAMS if (name, p) not in done]
        lines.append("")
        if missing:
            lines += [f"Not run (not compiled yet; `python bench/tpu_aot.py` compiles every job missing from "
                      f"docs/tpu.json): {', '.join(missing)}.", ""]
        split = split_share(results, name)
        if split:
            lines += [split, ""]
        h = handoff(results, name)
        if h:
            fits = h["peak"] / GIB + RUNTIME_RESERVE_GIB <= h["hbm_gib"]
            lines += [f"SDXL base + refiner, both resident (1024², 1 image per chip): {_gib(h['during_base'])} GiB "
                      f"while the base runs, {_gib(h['during_refiner'])} GiB while the refiner runs; peak "
                      f"{_gib(h['peak'])} GiB of {h['hbm_gib']} GiB: "
                      f"{'fits' if fits else 'does not fit'} with {RUNTIME_RESERVE_GIB:.0f} GiB left for the runtime.",
                      ""]
    lines += ["## Programs", ""]
    for name, p in PROGRAMS.items():
        call = ", ".join(f"{k}={v!r}" for k, v in p.call)
        lines.append(f"- `{name}`: {p.what}; `{p.family}` configs, sampler euler, `{call}`; options: "
                     f"{_options(dataclasses.asdict(p))}.")
    lines.append("")
    failed = [r for r in results if not r.get("compiled")]
    if failed:
        lines += ["## Failures", ""]
        for r in failed:
            lines += [f"- {r['topology']} {r['program']}: `{r['error']}`"]
        lines.append("")
    MD_OUT.write_text("\n".join(lines))
    return "\n".join(lines)


def _child(topology: str, program: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, __file__, "--one", f"{topology}:{program}"], env=env, capture_output=True,
                       text=True)
    lines = r.stdout.strip().splitlines()
    if r.returncode or not lines:
        return dict(topology=topology, program=program, compiled=False, date=datetime.date.today().isoformat(),
                    error=f"the process ended with status {r.returncode}", traceback=r.stderr[-4000:],
                    **versions())
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", help="comma-separated topology:program (default: every job not yet in docs/tpu.json, "
                                  "in priority order); topologies: " + ", ".join(TOPOLOGIES) + "; programs: "
                                  + ", ".join(PROGRAMS))
    p.add_argument("--redo", action="store_true", help="also rerun jobs already in docs/tpu.json")
    p.add_argument("--doc", action="store_true", help="only rewrite docs/tpu.md from docs/tpu.json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # before libtpu loads: other libtpu users may run
        print(json.dumps(measure(*args.one.split(":"))))
        return 0
    if args.doc:
        write_doc(load_results())
        return 0
    jobs = ORDER if not args.jobs else [tuple(j.split(":")) for j in args.jobs.split(",")]
    for topology, program in jobs:
        if topology not in TOPOLOGIES or program not in PROGRAMS:
            p.error(f"unknown job {topology}:{program}")
    done = {(r["topology"], r["program"]) for r in load_results()["results"] if r.get("compiled")}
    for job in jobs:
        if job in done and not args.redo:
            continue
        t0 = time.perf_counter()
        record = _child(*job)
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        save_result(record)
        write_doc(load_results())
        summary = {k: record.get(k) for k in ("topology", "program", "compiled", "compile_s", "error")}
        if record.get("compiled"):
            summary.update(peak_gib=round(record["memory"]["peak"] / GIB, 2), gflops=round(record["flops"] / 1e9))
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
