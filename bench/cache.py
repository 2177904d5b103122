"""Time to images of the README's main command in fresh processes: a first run (empty compilation cache), a second
run (the cache the first one wrote), and a run with the cache off, alternating in one run of this script.

    python bench/cache.py --rounds 5

Each round runs, each in its own process: `sdjax txt2img --prompt "a red circle on a blue background" --no-compile-cache`,
the same command with SDJAX_COMPILE_CACHE set to a new empty directory (first), and once more with that directory
(second). The table gives medians of wall time and of the process's CPU time (all threads), and the ratio second /
first both as the median of each round's own ratio (the two runs are seconds apart, so they see the same load on a
shared machine) and as the ratio of the medians. Results go to bench/cache_results.json and into docs/benchmarks.md
between the `cache` markers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "cache_results.json"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- cache:start -->", "<!-- cache:end -->"
COMMAND = ["txt2img", "--prompt", "a red circle on a blue background"]  # README "Set up"
KINDS = ("off", "first", "second")


def run_once(kind: str, cache: Path, outdir: Path) -> dict:
    """One `sdjax` process: wall and CPU seconds, and the cache entries it leaves."""
    env = dict(os.environ, SDJAX_COMPILE_CACHE=str(cache))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    flags = ["--no-compile-cache"] if kind == "off" else []
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sdjax.cli", *COMMAND, "--outdir", str(outdir), *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{kind} run failed: {stderr[-2000:]}")
    entries = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []
    return dict(kind=kind, seconds=wall, cpu_seconds=usage.ru_utime + usage.ru_stime, cache_entries=len(entries))


def machine() -> str:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model or 'CPU'}, {os.cpu_count()} CPUs"


def measure(rounds: int) -> dict:
    load_start = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="sdjax-cache-bench-") as tmp:
        tmp = Path(tmp)
        run_once("off", tmp / "warmup-cache", tmp / "warmup")  # page cache, .pyc files: not counted
        for r in range(rounds):
            cache = tmp / f"cache{r}"
            for kind in KINDS:
                out = run_once(kind, cache, tmp / f"out{r}-{kind}")
                out["round"] = r
                runs.append(out)
                print(f"round {r} {kind}: {out['seconds']:.2f} s wall, {out['cpu_seconds']:.2f} s CPU, "
                      f"{out['cache_entries']} cache entries", flush=True)
    by = {k: [x for x in runs if x["kind"] == k] for k in KINDS}
    for r in range(rounds):
        first = next(x for x in by["first"] if x["round"] == r)
        second = next(x for x in by["second"] if x["round"] == r)
        if not first["cache_entries"] or second["cache_entries"] != first["cache_entries"]:
            raise RuntimeError(f"round {r}: the first run wrote {first['cache_entries']} entries, the second left "
                               f"{second['cache_entries']}: the second did not run from the cache")
    med = {k: {m: statistics.median(x[m] for x in by[k]) for m in ("seconds", "cpu_seconds")} for k in KINDS}
    pair = lambda m: statistics.median(s[m] / f[m] for f, s in zip(by["first"], by["second"]))  # noqa: E731
    import jax

    return dict(
        date=datetime.date.today().isoformat(), machine=machine(), jax=jax.__version__, rounds=rounds,
        load_start=load_start, load_end=os.getloadavg()[0], command="sdjax " + shlex.join(COMMAND), runs=runs,
        median=med, pair_ratio=pair("seconds"), pair_ratio_cpu=pair("cpu_seconds"),
        ratio_of_medians=med["second"]["seconds"] / med["first"]["seconds"],
    )


def render(res: dict) -> str:
    m = res["median"]
    row = lambda k, what: (f"| {what} | {m[k]['seconds']:.2f} | {m[k]['cpu_seconds']:.2f} | "  # noqa: E731
                           f"{m[k]['seconds'] / m['first']['seconds']:.2f} |")
    return "\n".join([
        f"`{res['command']}` (the shipped model, 2 batches of 3 images, 50 DDIM steps, 64²), each run a new process; "
        f"{res['rounds']} rounds of (cache off, first run, second run), medians; {res['date']}, {res['machine']}, "
        f"jax {res['jax']}, load average {res['load_start']:.1f} at the start, {res['load_end']:.1f} at the end.",
        "",
        "| run | wall s | CPU s | wall / first run |",
        "|---|---|---|---|",
        row("off", "`--no-compile-cache`"),
        row("first", "first run (empty cache: compiles and writes it)"),
        row("second", "second run (the cache of the first)"),
        "",
        f"Second / first run: **{res['pair_ratio']:.2f}** of the wall time (median of the rounds' own ratios; ratio "
        f"of the medians {res['ratio_of_medians']:.2f}), {res['pair_ratio_cpu']:.2f} of the CPU time. Target: "
        f"second run <= 0.60 of the first: {'met' if res['pair_ratio'] <= 0.6 else 'not met'}.",
    ])


def write_doc(res: dict, doc: Path) -> None:
    text = doc.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{doc} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    doc.write_text(head + START + "\n" + render(res) + "\n" + END + rest.split(END, 1)[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--out", default=str(DOC), help="markdown file whose cache section is rewritten")
    args = ap.parse_args()
    res = measure(args.rounds)
    Path(args.results).write_text(json.dumps(res, indent=1) + "\n")
    write_doc(res, Path(args.out))
    print(render(res))


if __name__ == "__main__":
    main()
