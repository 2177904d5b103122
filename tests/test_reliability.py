"""Nothing a user does ends in a traceback, a crash, a hang or a half-written file (issue #18): Ctrl-C at random
moments, faults of the file system (a full disk, a file where a folder should be, ...), sizes beyond what a device
holds, corrupt model folders, bad run configs, and training runs that diverge or are pointed at the wrong files.

The command line runs in subprocesses where the process matters (exit code, stderr, files left on disk, signals),
in-process otherwise; always on the shipped tiny model (or a copy of it), at 32x32 with one step."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import bulk, cli

from pipeline_fixtures import SHIPPED_PIPELINE, TINY_RUN, cli_command, cli_messages, run_cli

MODEL = ["--ckpt", str(SHIPPED_PIPELINE)]


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".tmp-*")) if folder.exists() else []


def samples(outdir: Path) -> list[Path]:
    return sorted(p for p in (outdir / "samples").iterdir() if bulk.SAMPLE_NAME.match(p.name))


def manifest_jobs(outdir: Path) -> list[tuple]:
    return [tuple(r["job"]) for r in bulk.read_manifest(outdir / "manifest.jsonl")]


def assert_one_line(code: int, err: str, words: str, expected_code: int = 2):
    lines = cli_messages(err)
    assert code == expected_code, err
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in err, err


# -- Ctrl-C --------------------------------------------------------------------------------------------------------


def test_ctrl_c_at_random_moments_ends_at_once_with_130(tmp_path):
    """At least 10 SIGINTs at random moments of a run (start-up, loading, compiling, sampling, saving): every one
    ends the process with exit code 130 and one line, no crash, no hang, nothing swallowed, no temporary file, every
    saved image listed; then --resume finishes every job exactly once."""
    n_iter = 4
    args = ["txt2img", "--prompt", "a red circle", "--n_iter", str(n_iter), *MODEL, *TINY_RUN]
    start = time.monotonic()
    full = run_cli(*args, "--outdir", str(tmp_path / "full"))
    length = time.monotonic() - start
    assert full.returncode == 0, full.stderr
    rng = random.Random(18)
    interrupted, tries = 0, 0
    while interrupted < 10 and tries < 20:
        tries += 1
        outdir = tmp_path / f"run{tries}"
        argv, env = cli_command(*args, "--outdir", str(outdir))
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(1.0, max(1.5, length)))  # from 1 s: Python's own start-up is not sdjax's yet
        if proc.poll() is not None:  # finished first (a faster machine): not an interrupt
            proc.communicate()
            continue
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"try {tries}: still running 60 s after Ctrl-C")
        assert proc.returncode == 130, f"try {tries}: exit code {proc.returncode}\n{err}"
        assert cli_messages(err) == ["sdjax: interrupted (run the same command with --resume to continue)"], err
        assert "Traceback" not in err and "Exception ignored" not in err, err
        if outdir.exists():
            assert temporaries(outdir) == []
            listed = {r["file"] for r in bulk.read_manifest(outdir / "manifest.jsonl")}
            assert {f"samples/{p.name}" for p in samples(outdir)} == listed
        interrupted += 1
    assert interrupted >= 10, f"only {interrupted} of {tries} runs were still running when interrupted"
    done = run_cli(*args, "--outdir", str(outdir), "--resume")
    assert done.returncode == 0, done.stderr
    assert sorted(manifest_jobs(outdir)) == [(0, it, 0) for it in range(n_iter)]
    assert len(samples(outdir)) == n_iter


# -- the file system -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, words", [
    ("outdir_file", "Not a directory"),
    ("outdir_proc", "--outdir /proc/"),
    ("manifest_dir", "manifest.jsonl: Is a directory"),
    ("from_file_dir", "a folder, not a text file"),
    ("config_dir", "Is a directory"),
])
def test_environment_faults_one_line_before_any_image(case, words, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    outdir = tmp_path / "out"
    argv = ["txt2img", "--prompt", "x", *MODEL, *TINY_RUN, "--outdir", str(outdir)]
    if case == "outdir_file":
        argv[-1] = str(a_file)
    elif case == "outdir_proc":
        argv[-1] = "/proc/sdjax-test"
    elif case == "manifest_dir":
        (outdir / "manifest.jsonl").mkdir(parents=True)
    elif case == "from_file_dir":
        argv += ["--from-file", str(tmp_path)]
    elif case == "config_dir":
        argv += ["--config", str(tmp_path)]
    r = run_cli(*argv)
    assert_one_line(r.returncode, r.stderr, words)
    if case == "manifest_dir":
        assert samples(outdir) == [] and temporaries(outdir) == []


@pytest.mark.parametrize("err, words", [
    (errno.EACCES, "no permission"), (errno.EROFS, "read-only file system"), (errno.ENOSPC, "the disk is full"),
])
def test_outdir_that_cannot_be_written_is_found_before_the_model_loads(err, words, tmp_path, monkeypatch, capsys):
    """Permission, a read-only disk, a full disk (simulated: the checks run as root here, where modes do not
    bind): one line naming --outdir, nothing left in it."""
    def refuse(*args, **kwargs):
        raise OSError(err, os.strerror(err), str(tmp_path / "out" / "samples"))

    monkeypatch.setattr(bulk, "open", refuse, raising=False)  # the module's builtin open, as writes use it
    loaded = []
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: loaded.append(1))
    code = cli.main(["txt2img", "--prompt", "x", *MODEL, *TINY_RUN, "--outdir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert_one_line(code, err, words)
    assert f"--outdir {tmp_path / 'out'}: " in err
    assert loaded == [] and temporaries(tmp_path) == []


def test_disk_full_during_a_run_leaves_no_temporary_and_resume_finishes(tmp_path, monkeypatch, capsys):
    """The disk fills after two images (simulated in-process: the third image's fsync fails with ENOSPC): one line
    saying what to do, exit 2, no temporary file; --resume then makes every image exactly once."""
    outdir = tmp_path / "out"
    args = ["txt2img", "--prompt", "x", "--n_iter", "4", *MODEL, *TINY_RUN, "--outdir", str(outdir)]
    real_fsync, images = os.fsync, []
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell the image writes from the others")

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if Path(name).name.startswith(".tmp-") and name.endswith(".png"):
            images.append(name)
            if len(images) == 3:  # the third image: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(bulk.os, "fsync", fsync)
    code = cli.main(args)
    err = capsys.readouterr().err
    assert_one_line(code, err, "No space left on device (the disk is full: free some space")
    assert "--resume" in err
    assert temporaries(outdir) == [] and len(samples(outdir)) == 2 and len(manifest_jobs(outdir)) == 2
    monkeypatch.setattr(bulk.os, "fsync", real_fsync)
    assert cli.main(args + ["--resume"]) == 0
    assert sorted(manifest_jobs(outdir)) == [(0, it, 0) for it in range(4)] and len(samples(outdir)) == 4


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 96 KiB tmpfs (a disk that fills), where this machine lets the tests mount one; skipped otherwise."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True,
                       text=True) if shutil.which("mount") else None
    if r is None or r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr.strip() if r else 'no mount command') or 'refused'}): "
                    "the full-disk test runs simulated only (test_disk_full_during_a_run_...)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_on_a_real_tmpfs(small_tmpfs):
    outdir = small_tmpfs / "out"
    n = 40  # more than 96 KiB of PNGs and manifest lines
    args = ["txt2img", "--prompt", "a red circle", "--n_iter", str(n), *MODEL, *TINY_RUN, "--outdir", str(outdir)]
    r = run_cli(*args)
    assert_one_line(r.returncode, r.stderr, "No space left on device")
    assert temporaries(outdir) == []
    saved = len(samples(outdir))
    assert 0 < saved < n
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    r = run_cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    jobs = manifest_jobs(outdir)
    assert sorted(set(jobs)) == [(0, it, 0) for it in range(n)] and len(jobs) == n
    assert len(samples(outdir)) == n and temporaries(outdir) == []


def test_torn_manifest_line_is_never_glued_to(tmp_path, capsys):
    (tmp_path / "manifest.jsonl").write_text('{"file": "samples/00000.png", "job": [0, 0, 0]}\n{"file": "sam')
    bulk.append_manifest(tmp_path, {"file": "samples/00001.png", "job": [0, 1, 0]})
    assert "cut short" in capsys.readouterr().err
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert lines[1] == '{"file": "sam' and json.loads(lines[2]) == {"file": "samples/00001.png", "job": [0, 1, 0]}
    assert [r["file"] for r in bulk.read_manifest(tmp_path / "manifest.jsonl")] == [
        "samples/00000.png", "samples/00001.png"]
    bulk.append_manifest(tmp_path, {"file": "samples/00002.png", "job": [0, 2, 0]})  # no warning for whole lines
    assert capsys.readouterr().err == ""


def test_resume_removes_stale_temporaries(tmp_path):
    samples_dir = tmp_path / "samples"
    samples_dir.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = gone.pid  # a process that has ended
    stale = [samples_dir / f".tmp-{bulk.HOST}-{dead}-{'a' * 32}.png", samples_dir / f".tmp-{dead}-{'b' * 32}.png"]
    alive = samples_dir / f".tmp-{bulk.HOST}-{os.getpid()}-{'c' * 32}.png"
    other_host = samples_dir / f".tmp-elsewhere-{dead}-{'d' * 32}.png"
    for p in (*stale, alive, other_host):
        p.write_bytes(b"partial")
    assert sorted(bulk.remove_stale_temporaries(samples_dir)) == sorted(stale)
    assert alive.exists() and other_host.exists()  # another host's may be a write in progress: an hour's grace
    old = time.time() - 7200
    os.utime(other_host, (old, old))
    assert bulk.remove_stale_temporaries(samples_dir) == [other_host]


# -- sizes ---------------------------------------------------------------------------------------------------------


def test_huge_sizes_refused_at_once(capsys):
    for flag in ("--H", "--W"):
        assert_one_line(cli.main(["txt2img", "--prompt", "x", flag, "100000", *MODEL]), capsys.readouterr().err,
                        f"{flag} must be between 1 and 16384")


def test_pixel_limit_checked_before_compiling(capsys, monkeypatch):
    import sdjax

    pipe = sdjax.StableDiffusionPipeline.from_pretrained(SHIPPED_PIPELINE)
    pipe.max_pixels_per_device = 64 * 64
    with pytest.raises(ValueError, match=r"per device are 0.00461 megapixels, above the limit of 0.0041 "):
        pipe("x", height=64, width=72, num_inference_steps=1)
    pipe.enable_attention_chunking()  # x2
    assert pipe.max_pixels() == 2 * 64 * 64
    pipe("x", height=64, width=72, num_inference_steps=1, guidance_scale=1.0)
    assert len(pipe._programs) == 1  # only the call within the limit compiled
    # the CLI: the limit, the flags that raise it, exit 2
    monkeypatch.setattr("sdjax.pipelines.base.MAX_PIXELS_PER_DEVICE", 32 * 32)
    code = cli.main(["txt2img", "--prompt", "x", *MODEL, *TINY_RUN, "--n_samples", "2"])
    assert_one_line(code, capsys.readouterr().err, "0.00205 megapixels per device, above the limit of 0.00102; make "
                    "fewer or smaller images per batch, or add --attention-chunking and --vae-tiling")


def test_large_init_image_is_resized_with_a_line(tmp_path, monkeypatch, capsys):
    init = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(init)
    monkeypatch.setattr("sdjax.pipelines.base.MAX_PIXELS_PER_DEVICE", 64 * 64)
    out = tmp_path / "out"
    assert cli.main(["img2img", "--prompt", "x", "--init-img", str(init), "--strength", "1", *MODEL,
                     "--ddim_steps", "1", "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--outdir",
                     str(out)]) == 0
    (line,) = cli_messages(capsys.readouterr().err)
    assert line.startswith("sdjax: --init-img is 128x96: resized to 72x52 (larger than 0.0041 megapixels per device")
    assert Image.open(samples(out)[0]).size == (72, 52)  # multiples of the VAE factor, 4
    # --H/--W given: the image is resized to them, and a line says so
    assert cli.main(["img2img", "--prompt", "x", "--init-img", str(init), "--strength", "1", *MODEL, *TINY_RUN,
                     "--n_iter", "1", "--outdir", str(out)]) == 0
    assert cli_messages(capsys.readouterr().err) == ["sdjax: --init-img is 128x96: resized to 32x32 (--H and --W)"]


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims side x side pixels (PIL refuses to decode it) in a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_one_line(tmp_path, capsys):
    bomb = bomb_png(tmp_path / "bomb.png")
    code = cli.main(["img2img", "--prompt", "x", "--init-img", str(bomb), *MODEL, *TINY_RUN])
    assert_one_line(code, capsys.readouterr().err, "--init-img")
    import sdjax

    pipe = sdjax.StableDiffusionPipeline.from_pretrained(SHIPPED_PIPELINE)
    with pytest.raises(ValueError, match="bomb.png: not an image PIL can read"):
        pipe("x", image=str(bomb), num_inference_steps=1)


# -- model folders and run configs ---------------------------------------------------------------------------------


def model_copy(tmp_path: Path) -> Path:
    """The shipped pipeline with its configs copied and its weights linked (to be edited)."""
    dst = tmp_path / "model"
    shutil.copytree(SHIPPED_PIPELINE, dst,
                    copy_function=lambda s, d: os.symlink(s, d) if s.endswith(".safetensors") else shutil.copy(s, d))
    return dst


def edit_json(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize("case, words", [
    ("unet_null", "unet/config.json: UNetConfig: layers_per_block = None must be a list or an integer"),
    ("unet_str", "unet/config.json: UNetConfig: layers_per_block = '4' must be a list or an integer"),
    ("vae_str", "vae/config.json: VAEConfig: latent_channels = '4' must be an integer"),
    ("vae_null", "vae/config.json: VAEConfig: scaling_factor = None must be a finite number"),
    ("text_null", "text_encoder/config.json: CLIPTextConfig: num_hidden_layers = None must be an integer"),
    ("scheduler_str", "scheduler/scheduler_config.json: scheduler config num_train_timesteps='1000' must be an integer"),
    ("index_list", "model_index.json: expected a JSON object, got list"),
    ("no_weight_map", "diffusion_pytorch_model.safetensors.index.json: no weight_map"),
    ("weights_dir", "diffusion_pytorch_model.safetensors: not a file"),
])
def test_bad_model_folder_one_line_naming_file_and_field(case, words, tmp_path, capsys):
    m = model_copy(tmp_path)
    if case == "unet_null":
        edit_json(m / "unet/config.json", lambda c: {**c, "layers_per_block": None})
    elif case == "unet_str":
        edit_json(m / "unet/config.json", lambda c: {**c, "layers_per_block": "4"})
    elif case == "vae_str":
        edit_json(m / "vae/config.json", lambda c: {**c, "latent_channels": "4"})
    elif case == "vae_null":
        edit_json(m / "vae/config.json", lambda c: {**c, "scaling_factor": None})
    elif case == "text_null":
        edit_json(m / "text_encoder/config.json", lambda c: {**c, "num_hidden_layers": None})
    elif case == "scheduler_str":
        edit_json(m / "scheduler/scheduler_config.json", lambda c: {**c, "num_train_timesteps": "1000"})
    elif case == "index_list":
        (m / "model_index.json").write_text("[1, 2]")
    elif case == "no_weight_map":
        weights = m / "unet/diffusion_pytorch_model.safetensors"
        weights.rename(m / "unet/diffusion_pytorch_model-00001-of-00001.safetensors")
        (m / "unet/diffusion_pytorch_model.safetensors.index.json").write_text('{"metadata": {}}')
    elif case == "weights_dir":
        (m / "unet/diffusion_pytorch_model.safetensors").unlink()
        (m / "unet/diffusion_pytorch_model.safetensors").mkdir()
    code = cli.main(["txt2img", "--prompt", "x", "--ckpt", str(m), *TINY_RUN, "--outdir", str(tmp_path / "o")])
    assert_one_line(code, capsys.readouterr().err, words)


@pytest.mark.parametrize("yaml_text, words", [
    ("steps: '4'", "steps must be an integer, got '4'"),
    ("seed: 1.5", "seed must be an integer, got 1.5"),
    ("H: [64]", "H must be an integer, got [64]"),
    ("scale: .nan", "scale must be a finite number"),
    ("negative_prompt: 5", "negative_prompt must be a string, got 5"),
    ("vae_tiling: 'yes'", "vae_tiling must be true or false"),
    ("strength: true", "strength must be a finite number, got True"),
])
def test_config_values_of_the_wrong_type_one_line(yaml_text, words, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text + "\n")
    code = cli.main(["txt2img", "--prompt", "x", "--config", str(config), *MODEL, *TINY_RUN])
    assert_one_line(code, capsys.readouterr().err, f"--config {config}: {words}")


def test_config_null_is_as_if_not_given(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("n_samples: null\nnegative_prompt: null\n")
    assert cli.load_config(str(config)) == {}


# -- training ------------------------------------------------------------------------------------------------------


def tiny_fit(tmp_path, *, steps, nan_from=None, checkpoint_dir=None, resume=False):
    """sdjax.train.fit on a 2->2 linear model, batches NaN from step `nan_from`."""
    import jax.numpy as jnp
    from flax import nnx

    from sdjax import train

    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

    def batches(step):
        x = np.full((2, 2), np.nan if nan_from is not None and step >= nan_from else 1.0, np.float32)
        return {"x": x}

    def loss(m, frozen, batch, key):
        return jnp.mean(m(batch["x"]) ** 2)

    cfg = train.TrainConfig(steps=steps, batch_size=2, warmup=1, checkpoint_every=1, log_every=1)
    return train.fit(model, loss, batches, cfg, checkpoint_dir=checkpoint_dir, resume=resume, progress=False)


def test_training_that_diverges_stops_before_any_nan_is_saved(tmp_path):
    from sdjax.train import TrainingDivergedError

    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingDivergedError, match="the loss is nan by step 3; no model is written"):
        tiny_fit(tmp_path, steps=5, nan_from=2, checkpoint_dir=ckpt)
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [1, 2]  # no NaN checkpoint


def test_resume_from_checkpoints_that_do_not_fit_is_one_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny_fit(tmp_path, steps=2, checkpoint_dir=ckpt)
    with pytest.raises(ValueError, match=r"cannot resume from the checkpoint of step 2 .*resume with the settings"):
        tiny_fit(tmp_path, steps=4, checkpoint_dir=ckpt, resume=True)


@pytest.mark.parametrize("case, words", [
    ("lr_nan", "--lr must be a finite number above 0, got nan"),
    ("out_file", "a file, where the output folder should be"),
    ("data_outside", "is outside"),
    ("data_absolute", "is outside"),
])
def test_train_refuses_before_training(case, words, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    (tmp_path / "secret.png").write_bytes((data / "a.png").read_bytes())
    out = tmp_path / "out"
    argv = ["train", "vae", "--out", str(out), "--steps", "1", "--batch-size", "1"]
    if case == "lr_nan":
        argv += ["--lr", "nan"]
    elif case == "out_file":
        out.write_text("x")
    else:
        name = "../secret.png" if case == "data_outside" else str(tmp_path / "secret.png")
        (data / "captions.jsonl").write_text(json.dumps({"file": name, "caption": "x"}) + "\n")
        argv += ["--data", str(data)]
    assert_one_line(cli.main(argv), capsys.readouterr().err, words)
    assert out.is_file() if case == "out_file" else not out.exists()


def test_failure_line_sorts_expected_failures_from_bugs():
    from sdjax.app import failure_line

    class XlaRuntimeError(RuntimeError):  # jaxlib's, by name: importing it would tie the test to a jaxlib layout
        pass

    oom = failure_line(XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes"))
    assert oom.startswith("out of device memory (RESOURCE_EXHAUSTED") and "--attention-chunking" in oom
    assert failure_line(MemoryError()).startswith("out of host memory")
    assert failure_line(OSError(errno.ENOSPC, "No space left on device", "/x/y.png")) == (
        "/x/y.png: No space left on device (the disk is full: free some space, then run the same command again "
        "(with --resume for a bulk run))")
    assert failure_line(FloatingPointError("the pipeline produced NaN/inf values; load with vae_dtype=...")) == (
        "the pipeline produced NaN/inf values; try --precision full")
    assert failure_line(ValueError("guidance_scale must be a finite number, got inf")) == (
        "guidance_scale must be a finite number, got inf")
    assert failure_line(XlaRuntimeError("INTERNAL: something else")) is None  # a bug: its traceback is shown
    assert failure_line(TypeError("'int' object is not iterable")) is None
