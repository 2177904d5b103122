"""Multi-process runs on this machine: two local processes (coordinator on 127.0.0.1, 2 fake CPU devices each, 4 in
all) against one process with 4 devices, through the library and through `sdjax txt2img` (bulk run, resume)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import cli
from sdjax.bulk import SAMPLE_NAME, job_order, merge_manifests
from sdjax.distributed import DistributedError, gather_rows, initialize

from pipeline_fixtures import build_pipeline

PROMPTS = ["a red circle on a blue background", "a green square"]
TIMEOUT = 600  # seconds for one launch of the processes (a hung coordinator fails the test, not CI)

# Run by every process: the CLI bulk run (it starts jax.distributed from the flags), then, unless --cli-only, a
# library call in the same (already started) processes, saving this process's images and their batch positions.
SCRIPT = r"""
import sys
import numpy as np

from sdjax import cli

model, outdir, prompts, result, *flags = sys.argv[1:]
cli_only = "--cli-only" in flags
flags = [f for f in flags if f != "--cli-only"]
rc = cli.main(["txt2img", "--from-file", prompts, "--n_samples", "3", "--n_iter", "2", "--ckpt", model,
               "--outdir", outdir, "--H", "32", "--W", "32", "--ddim_steps", "2", "--scale", "5", "--seed", "7",
               "--resume", *flags])
assert rc == 0, rc
if not cli_only:
    import jax

    from sdjax import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    # 6 images on 4 devices: padded to 8, two per device; process 0 holds 0-3, process 1 holds 4, 5 (and padding)
    out = pipe(open(prompts).read().split("\n")[:2], height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
               seed=[3, 4], num_images_per_prompt=3, output_type="np")
    # 1 image on 4 devices: split over all of them (program.Layout); process 0 alone returns it
    one = pipe(open(prompts).read().split("\n")[0], height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
               seed=5, output_type="np")
    np.savez(result, images=out.images, indices=out.indices, process=jax.process_index(),
             processes=jax.process_count(), devices=len(jax.devices()), local=len(jax.local_devices()),
             one_images=one.images, one_indices=one.indices)
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("diffusers")
    return build_pipeline(tmp_path_factory.mktemp("multihost") / "tiny", kind="sd1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, name: str, model: Path, outdir: Path, *, processes: int, devices: int,
           cli_only: bool = False) -> list[Path]:
    """Start `processes` processes of SCRIPT (each with `devices` fake CPU devices) and wait for all of them;
    returns their result files. Their output goes to files, so that no full pipe can stall a process that the
    others wait for."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDJAX_", "JAX_COORDINATOR"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               SDJAX_INIT_TIMEOUT="120",
               # a later launch of the same layout (the resume) reuses the compiled programs
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    port = free_port()
    procs, logs, results = [], [], []
    for i in range(processes):
        flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
        result = tmp_path / f"{name}-{i}.npz"
        log = tmp_path / f"{name}-{i}.log"
        args = [sys.executable, str(script), str(model), str(outdir), str(prompts), str(result)]
        args += (flags if processes > 1 else []) + (["--cli-only"] if cli_only else [])
        with open(log, "w") as f:
            procs.append(subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT))
        logs.append(log)
        results.append(result)
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"{name}: the processes did not finish in {TIMEOUT} s:\n" + tails(logs))
    if any(p.returncode for p in procs):
        pytest.fail(f"{name}: exit codes {[p.returncode for p in procs]}:\n" + tails(logs))
    return results


def tails(logs) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)


def manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


def test_two_processes_match_one(model, tmp_path):
    """The acceptance check: two processes make the same images as one, and save and list each image once."""
    one_out, two_out = tmp_path / "one", tmp_path / "two"
    t0 = time.perf_counter()
    (ref,) = launch(tmp_path, "one", model, one_out, processes=1, devices=4)
    t1 = time.perf_counter()
    parts = launch(tmp_path, "two", model, two_out, processes=2, devices=2)
    t2 = time.perf_counter()
    print(f"one process: {t1 - t0:.1f} s, two processes: {t2 - t1:.1f} s")

    # library: each process holds its own devices' images; together they are the one-process batch
    ref = np.load(ref)
    assert ref["processes"] == 1 and ref["devices"] == 4 and list(ref["indices"]) == list(range(6))
    got = [np.load(p) for p in parts]
    assert [int(g["process"]) for g in got] == [0, 1]
    assert all(g["processes"] == 2 and g["devices"] == 4 and g["local"] == 2 for g in got)
    assert [list(g["indices"]) for g in got] == [[0, 1, 2, 3], [4, 5]]
    diff = max(float(np.abs(g["images"] - ref["images"][g["indices"]]).max()) for g in got)
    print(f"max |two processes - one process| = {diff:.3g}")
    assert diff <= 1e-5
    assert ref["images"].std() > 0.01  # real pictures, not a constant that would match anyway
    # one image split over both processes' devices: returned once, by process 0, as the one-process run makes it
    assert list(ref["one_indices"]) == [0] and [list(g["one_indices"]) for g in got] == [[0], []]
    assert len(got[1]["one_images"]) == 0
    assert np.abs(got[0]["one_images"] - ref["one_images"]).max() <= 1e-5

    # CLI bulk run: each process saved its own images and listed them in its manifest; process 0 merged
    records = manifest(two_out / "manifest.jsonl")
    files = sorted(p.name for p in (two_out / "samples").iterdir() if SAMPLE_NAME.match(p.name))
    assert len(files) == 12 and sorted(Path(r["file"]).name for r in records) == files  # each file listed once
    jobs = [tuple(r["job"]) for r in records]
    assert sorted(jobs) == [(p, it, k) for p in range(2) for it in range(2) for k in range(3)]
    assert records == sorted(records, key=job_order)
    shards = [manifest(two_out / f"manifest.{i}.jsonl") for i in range(2)]
    # 3 images per batch on 4 devices: process 0's two devices hold positions 0, 1; process 1's position 2
    assert [sorted({r["batch_position"] for r in s}) for s in shards] == [[0, 1], [2]]
    assert [len(s) for s in shards] == [8, 4] and all(r["process"] == i for i, s in enumerate(shards) for r in s)
    assert sorted(r["file"] for s in shards for r in s) == sorted(r["file"] for r in records)
    assert not (one_out / "manifest.0.jsonl").exists()

    # the same pictures as the one-process run, job by job, and the same grid
    ref_files = {tuple(r["job"]): r["file"] for r in manifest(one_out / "manifest.jsonl")}
    for r in records:
        assert np.array_equal(pixels(two_out / r["file"]), pixels(one_out / ref_files[tuple(r["job"])])), r["job"]
    assert np.array_equal(pixels(two_out / "grid-0000.png"), pixels(one_out / "grid-0000.png"))

    # resume after a kill before the merge: iteration 1's files gone, no merged manifest; each job once at the end
    for r in records:
        if r["job"][1] == 1:
            (two_out / r["file"]).unlink()
    for i, s in enumerate(shards):
        kept = [r for r in s if r["job"][1] == 0]
        (two_out / f"manifest.{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    (two_out / "manifest.jsonl").unlink()
    t3 = time.perf_counter()
    launch(tmp_path, "resume", model, two_out, processes=2, devices=2, cli_only=True)
    print(f"resume with two processes: {time.perf_counter() - t3:.1f} s")
    resumed = manifest(two_out / "manifest.jsonl")
    files = sorted(p.name for p in (two_out / "samples").iterdir() if SAMPLE_NAME.match(p.name))
    assert len(files) == 12 and sorted(Path(r["file"]).name for r in resumed) == files
    assert sorted(tuple(r["job"]) for r in resumed) == sorted(jobs)
    for r in resumed:
        assert np.array_equal(pixels(two_out / r["file"]), pixels(one_out / ref_files[tuple(r["job"])])), r["job"]


# ----------------------------------------------------------------------------------------------------------------
# Settings and helpers, in this process (nothing is started)


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SDJAX_") or k == "JAX_COORDINATOR_ADDRESS":
            monkeypatch.delenv(k)
    monkeypatch.setenv("SDJAX_COMPILE_CACHE", "off")  # cli.main in this process: no cache in the user's home
    return monkeypatch


def test_initialize_single_process_is_a_no_op(clean_env):
    assert initialize() == (0, 1)
    assert initialize(num_processes=1) == (0, 1)
    assert initialize("127.0.0.1:1234", 1, 0) == (0, 1)


@pytest.mark.parametrize("kwargs, env, message", [
    (dict(num_processes=2), {}, "needs --process-id"),
    (dict(process_id=1), {}, "needs --num-processes"),
    (dict(coordinator="127.0.0.1:1234"), {}, "needs --num-processes N and --process-id I"),
    (dict(num_processes=2, process_id=0), {}, "needs --coordinator HOST:PORT"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), {}, "HOST:PORT"),
    (dict(coordinator="h:99999", num_processes=2, process_id=0), {}, "HOST:PORT"),
    (dict(coordinator="h:1234", num_processes=2, process_id=2), {}, "between 0 and 1"),
    (dict(num_processes=0), {}, "at least 1"),
    (dict(coordinator="auto", num_processes=2), {}, "drop --num-processes"),
    ({}, {"SDJAX_NUM_PROCESSES": "two"}, "SDJAX_NUM_PROCESSES must be an integer, got 'two'"),
    ({}, {"SDJAX_NUM_PROCESSES": "2", "SDJAX_PROCESS_ID": "0"}, "needs --coordinator"),
])
def test_initialize_inconsistent_settings(clean_env, kwargs, env, message):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(DistributedError, match=message.replace("(", r"\(")):
        initialize(**kwargs)


def test_cli_reports_bad_distributed_flags_in_one_line(clean_env, capsys, tmp_path):
    rc = cli.main(["txt2img", "--prompt", "x", "--num-processes", "2", "--outdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--num-processes 2 needs --process-id" in err
    assert not (tmp_path / "samples").exists()


def test_gather_rows_single_process():
    rows = np.arange(12.0).reshape(3, 4)
    assert np.array_equal(gather_rows(rows[::-1], [2, 1, 0], 3), rows)


def test_merge_manifests_lists_each_image_once_in_job_order(tmp_path, capsys):
    def rec(job, file, run="r1"):
        return dict(run_id=run, job=job, file=f"samples/{file}")

    def write(name, records):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))

    write("manifest.jsonl", [rec([0, 0, 0], "00000.png")])  # merged before (or mended by a resume)
    write("manifest.0.jsonl", [rec([0, 0, 0], "00000.png"), rec([1, 1, 0], "00003.png"),
                               rec([0, 0, 0], "00009.png", run="other")])
    write("manifest.1.jsonl", [rec([0, 1, 0], "00002.png"), rec([1, 0, 0], "00001.png")])
    merged = merge_manifests(tmp_path, "r1", 2)
    assert [r["job"] for r in merged] == [[1, 0, 0], [0, 1, 0], [1, 1, 0]]  # iteration, then prompt
    assert [r["file"] for r in manifest(tmp_path / "manifest.jsonl")] == [
        "samples/00000.png", "samples/00001.png", "samples/00002.png", "samples/00003.png"]
    assert merge_manifests(tmp_path, "r1", 2) == []  # a second merge adds nothing
    assert merge_manifests(tmp_path, "r1", 3) == [] and "no manifest of process(es) [2]" in capsys.readouterr().out
