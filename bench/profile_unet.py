"""Where the compiled SD 1.5 UNet step (or VAE decode) spends its time on XLA:CPU, per XLA op.

    python bench/profile_unet.py --res 256                  # UNet CFG step (batch 2), fp32, top 20 + summary
    python bench/profile_unet.py --res 512 --calls 1
    python bench/profile_unet.py --model vae --res 512 --calls 1

The network is the real SD 1.5 config with random weights (the folder bench/run.py writes once). Its step is
compiled under `jax.jit` as the pipeline runs it, warmed up, then traced with `jax.profiler`: XLA:CPU's thunk
executor records one event per op it runs (a fusion, a convolution or dot handed to YNNPACK, a copy, the loop), on
the thread that ran it. The events are summed per op over the traced calls and matched to the compiled HLO, which
gives each op its kind, its FLOPs (convolutions and dots: 2 x output elements x contracted size) and the bytes it
reads and writes (operands + result), so the table shows an achieved GFLOP/s for compute and GB/s for the rest.

Shares are of the summed op time (with 2 threads, two independent ops can run at once, so the sum can pass the
wall time); "idle" is wall time during which no op ran on any thread: the runtime's own overhead.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|pred|s8|u8|f64|s64)\[([\d,]*)\]")
INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")


@dataclasses.dataclass
class Op:
    """One HLO instruction the runtime ran, with what the compiled text says about it."""
    name: str
    kind: str  # convolution 3x3 / convolution 1x1 / dot / reduction / elementwise / copy / loop / other
    flops: float
    bytes: float
    detail: str


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in SHAPE.findall(text)]


def _nbytes(shape: tuple[str, tuple[int, ...]]) -> int:
    return DTYPE_BYTES.get(shape[0], 4) * math.prod(shape[1])


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(instruction name -> its line, computation name -> its instructions' lines) of a compiled HLO module."""
    lines, comps, current = {}, {}, None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if m and line.rstrip().endswith("{"):
            current = m.group(1)
            comps[current] = []
            continue
        m = INSTR.match(line)
        if m:
            lines[m.group(1)] = m.group(2)
            if current is not None:
                comps[current].append(m.group(2))
    return lines, comps


def _result_shape(rhs: str) -> tuple[str, tuple[int, ...]] | None:
    s = _shapes(rhs.split(" ", 1)[0] if not rhs.startswith("(") else rhs.split(")", 1)[0])
    return s[0] if s else None


def _operands(rhs: str) -> list[str]:
    m = re.search(r"\w[\w\-]*\((.*?)\)(?:,|$)", rhs)
    return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def _compute_flops(body: list[str], lines: dict[str, str]) -> tuple[str, float, str]:
    """(kind, FLOPs, detail) of the convolution or dot inside a fusion's computation (or of the op itself)."""
    for rhs in body:
        if " convolution(" in rhs:
            out = _result_shape(rhs)
            ops = _operands(rhs)
            kernel = _result_shape(lines.get(ops[1], "")) if len(ops) > 1 else None
            labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rhs)
            window = re.search(r"size=(\d+)x(\d+)", rhs)
            if out is None or kernel is None or labels is None:
                return "convolution", 0.0, ""
            k = labels.group(2)
            kshape = dict(zip(k, kernel[1]))
            taps = int(window.group(1)) * int(window.group(2)) if window else 1
            cin = kshape.get("i", 1)  # per feature group
            kh, kw = (window.group(1), window.group(2)) if window else ("1", "1")
            shape = "x".join(map(str, out[1]))
            return f"convolution {kh}x{kw}", 2.0 * math.prod(out[1]) * taps * cin, f"{shape} <- {cin} ch"
        if " dot(" in rhs:
            out = _result_shape(rhs)
            ops = _operands(rhs)
            lhs = _result_shape(lines.get(ops[0], "")) if ops else None
            contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rhs)
            if out is None or lhs is None:
                return "dot", 0.0, ""
            dims = contract.group(1).split(",") if contract and contract.group(1) else []
            k = math.prod(lhs[1][int(i)] for i in dims)
            return "dot", 2.0 * math.prod(out[1]) * k, f"{'x'.join(map(str, out[1]))}, K={k}"
    return "", 0.0, ""


def classify(name: str, lines: dict[str, str], comps: dict[str, list[str]]) -> Op:
    rhs = lines.get(name, "")
    called = re.search(r"calls=%([\w.\-]+)", rhs)
    body = comps.get(called.group(1), []) if called else [rhs]
    kind, flops, detail = _compute_flops(body, lines)
    if kind == "dot" and any(" exponential(" in b for b in body):
        kind = "dot + softmax (attention scores)"  # YNNPACK fuses the scores' max and exp into their matmul
    ops = _operands(rhs)
    out = _result_shape(rhs)
    nbytes = sum(_nbytes(s) for s in (_result_shape(lines.get(o, "")) for o in ops) if s) + (_nbytes(out) if out else 0)
    if not kind:
        text = " ".join(body)
        if rhs.startswith("(") or " while(" in rhs:
            kind = "loop"
        elif " reduce(" in text or " reduce-window(" in text:
            kind = "reduction (norm/softmax)"
        elif name.startswith(("copy", "transpose")) or re.match(r"^\S+ (copy|transpose)\(", rhs):
            kind = "copy/transpose"
        elif " exponential(" in text or " logistic(" in text or " tanh(" in text:
            kind = "elementwise (exp/silu/gelu)"
        else:
            kind = "elementwise/other"
        detail = "x".join(map(str, out[1])) if out else ""
    return Op(name, kind, flops, nbytes, detail)


def build(model: str, res: int):
    """(jitted step, args, its compiled HLO text) for the SD 1.5 UNet CFG step or the VAE decode, fp32."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import run as bench_run
    from sdjax.models import AutoencoderKL, UNet2DConditionModel

    folder = bench_run.sd15_folder(Path.home() / ".cache" / "sdjax-bench")
    rng = np.random.default_rng(0)
    if model == "unet":
        net = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        args = (jnp.asarray(rng.standard_normal((2, res // 8, res // 8, 4)), jnp.float32),
                jnp.asarray(rng.standard_normal((2, 77, 768)), jnp.float32))
        call = lambda m, x, c: m(x, 500.0, c)  # noqa: E731
    else:
        net = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        args = (jnp.asarray(rng.standard_normal((1, res // 8, res // 8, 4)), jnp.float32),)
        call = lambda m, z: m.decode(z)  # noqa: E731
    graphdef, state = nnx.split(net)
    step = jax.jit(lambda s, *a: call(nnx.merge(graphdef, s), *a)).lower(state, *args).compile()
    return step, (state, *args), step.as_text()


def trace_events(step, args, calls: int) -> tuple[list[tuple[str, int, int, str]], list[float]]:
    """[(op, start ns, duration ns, thread)] of `calls` traced calls after two warm-up calls, and each call's wall."""
    import jax

    for _ in range(2):
        jax.block_until_ready(step(*args))
    walls = []
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(step(*args))
            walls.append(time.perf_counter() - t0)
        jax.profiler.stop_trace()
        path = sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))[-1]
        data = jax.profiler.ProfileData.from_file(path)
    events = []
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                if "hlo_op" in stats:
                    events.append((stats["hlo_op"], int(e.start_ns), int(e.duration_ns), line.name))
    return events, walls


def busy_ns(events) -> int:
    """Wall time covered by at least one op on any thread."""
    spans = sorted((s, s + d) for _, s, d, _ in events)
    total, end = 0, -1
    for s, e in spans:
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def profile(model: str, res: int, calls: int, matmul_gflops: float | None) -> dict:
    step, args, hlo = build(model, res)
    lines, comps = parse_hlo(hlo)
    events, walls = trace_events(step, args, calls)
    per_op, runs = collections.Counter(), collections.Counter()
    for name, _, dur, _ in events:
        per_op[name] += dur
        runs[name] += 1
    ops = {name: classify(name, lines, comps) for name in per_op}
    total = sum(per_op.values())
    wall = sum(walls)
    rows = []
    for name, ns in per_op.most_common():
        op = ops[name]
        sec, n = ns / 1e9 / calls, runs[name] / calls  # an op inside a loop runs n times per call
        rows.append(dict(op=name, kind=op.kind, detail=op.detail + (f" (x{n:g})" if n != 1 else ""), ms=sec * 1e3,
                         share=ns / total, gflops=op.flops * n / sec / 1e9 if op.flops and sec else None,
                         gbs=op.bytes * n / sec / 1e9 if sec else None, gflop=op.flops * n / 1e9))
    kinds = collections.defaultdict(lambda: dict(ms=0.0, gflop=0.0, n=0))
    for r in rows:
        k = kinds[r["kind"]]
        k["ms"] += r["ms"]
        k["gflop"] += r["gflop"]
        k["n"] += 1
    idle = (wall * 1e9 - busy_ns(events)) / 1e9 / calls
    return dict(model=model, res=res, calls=calls, wall_s=statistics.median(walls), walls=walls,
                op_sum_s=total / 1e9 / calls, idle_s=idle, matmul_gflops=matmul_gflops, rows=rows,
                kinds={k: dict(v) for k, v in kinds.items()})


def matmul_rate() -> float:
    """GFLOP/s of a warmed-up jitted 2048² fp32 matmul (median of 10), this process, now."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    for _ in range(3):
        f(a).block_until_ready()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def _pct(rate, peak):
    return f"{rate:.0f} ({rate / peak * 100:.0f}%)" if rate and peak else (f"{rate:.0f}" if rate else "")


def render(p: dict, top: int) -> str:
    peak = p["matmul_gflops"]
    what = "UNet CFG step (batch 2)" if p["model"] == "unet" else "VAE decode (one image)"
    out = [f"{what}, {p['res']}², fp32: wall {p['wall_s']:.2f} s per call (median of {p['calls']}), "
           f"op time summed over threads {p['op_sum_s']:.2f} s, no op running {p['idle_s'] * 1e3:.0f} ms; "
           f"jax 2048² matmul in the same process {peak:.0f} GFLOP/s.", "",
           "| kind | ops | ms per call | share | GFLOP | GFLOP/s (% of matmul) |", "|---|---|---|---|---|---|"]
    total = sum(k["ms"] for k in p["kinds"].values())
    for kind, k in sorted(p["kinds"].items(), key=lambda kv: -kv[1]["ms"]):
        rate = k["gflop"] / (k["ms"] / 1e3) if k["gflop"] else None
        out.append(f"| {kind} | {k['n']} | {k['ms']:.0f} | {k['ms'] / total * 100:.1f}% | "
                   f"{k['gflop']:.1f} | {_pct(rate, peak)} |")
    out += ["", f"Top {top} ops:", "", "| op | kind | shape | ms | share | GFLOP/s (% of matmul) | GB/s |",
            "|---|---|---|---|---|---|---|"]
    for r in p["rows"][:top]:
        out.append(f"| {r['op']} | {r['kind']} | {r['detail']} | {r['ms']:.1f} | {r['share'] * 100:.1f}% | "
                   f"{_pct(r['gflops'], peak)} | {r['gbs']:.1f} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("unet", "vae"), default="unet")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--calls", type=int, default=3, help="traced calls (after two warm-up calls)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--json", type=Path, help="write every op's row here")
    a = ap.parse_args()
    peak = matmul_rate()
    p = profile(a.model, a.res, a.calls, peak)
    print(render(p, a.top))
    if a.json:
        a.json.write_text(json.dumps(p, indent=1))


if __name__ == "__main__":
    main()
