"""bench/device_check.sh, the one prepared accelerator check, runs every step to the end on the CPU (quick mode).

A dry run of the steps (setup, env, parity, one row of sdjax vs diffusers), not of the timings: the timings are
measured on an accelerator and rendered into docs/benchmarks.md by the same code.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_quick_on_cpu(tmp_path):
    out = tmp_path / "out"
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nkept\n")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    p = subprocess.run(
        ["bash", str(ROOT / "bench" / "device_check.sh"), "--device", "cpu", "--quick", "--rows", "sd15_512_b1",
         "--results", str(tmp_path / "results.json"), "--doc", str(doc), "--out", str(out), "--budget", "600"],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = p.stdout.split("== summary", 1)[1]
    for step in ("setup", "env", "parity", "rows"):
        assert f"{step}: rc=0" in summary
    acc = json.loads((tmp_path / "results.json").read_text())["accelerator"]
    assert acc["parity"]["ok"] and acc["parity"]["highest"]["max_abs_diff"] <= 5e-4
    row = acc["rows"]["sd15_512_b1"]
    for framework in ("sdjax", "torch"):
        r = row[framework]
        assert "error" not in r, r
        assert r["seconds"] > 0 and r["step_seconds"] > 0 and len(r["walls"]) == 3
    text = doc.read_text()
    assert "kept" in text and "<!-- accelerator:start -->" in text and "| sd15_512_b1 in quick mode" in text
    assert sorted(f.name for f in out.iterdir()) == ["benchmarks.md", "device_check.log", "results.json"]


def test_device_check_refuses_unknown_options(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--frobnicate"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "unknown option --frobnicate" in p.stderr and "Traceback" not in p.stderr
