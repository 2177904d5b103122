"""The `sdjax` command end to end on a tiny model in a temporary folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import cli
from sdjax.bulk import SAMPLE_NAME

from pipeline_fixtures import box_mask, build_clip, build_pipeline, smooth_image

pytest.importorskip("diffusers")

FAST = ["--H", "32", "--W", "48", "--ddim_steps", "2", "--scale", "5"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("cli") / "tiny", kind="sd1")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return build_clip(tmp_path_factory.mktemp("cli") / "clip")


def samples(outdir: Path):
    return sorted(p for p in (outdir / "samples").iterdir() if SAMPLE_NAME.match(p.name))


def manifest(outdir: Path):
    return [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines()]


def test_txt2img_files_grid_metadata_manifest(model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n\na green square\n")
    out = tmp_path / "out"
    args = ["txt2img", "--from-file", str(prompts), "--n_samples", "2", "--n_iter", "2", "--ckpt", str(model),
            "--outdir", str(out), "--negative-prompt", "blurry", "--seed", "11", *FAST]
    assert cli.main(args) == 0
    files = samples(out)
    assert [p.name for p in files] == [f"{i:05d}.png" for i in range(8)]
    assert (out / "grid-0000.png").is_file()
    records = manifest(out)
    assert len(records) == 8 and {r["file"] for r in records} == {f"samples/{p.name}" for p in files}
    assert {(r["prompt"], r["seed"]) for r in records} == {
        (p, s) for p in ("a red circle on a blue background", "a green square") for s in (11, 12)}
    text = Image.open(files[0]).text["parameters"]
    lines = text.split("\n")
    assert lines[0] == records[0]["prompt"] and lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 2, Sampler: ddim, CFG scale: 5.0, Seed: 11, Size: 48x32, Model: tiny")

    # a second run into the same folder keeps every file and numbers after them
    assert cli.main(args + ["--skip_grid"]) == 0
    assert len(samples(out)) == 16 and len(manifest(out)) == 16
    assert not (out / "grid-0001.png").exists()


def test_rerank_keeps_the_best_candidate(model, clip, tmp_path):
    import sdjax

    out = tmp_path / "out"
    prompt = "a red circle on a blue background"
    assert cli.main(["txt2img", "--prompt", prompt, "--n-candidates", "4", "--keep", "1", "--rerank-model",
                     str(clip), "--n_iter", "1", "--ckpt", str(model), "--outdir", str(out), "--seed", "3",
                     "--skip_grid", *FAST]) == 0
    (record,) = manifest(out)
    # generate the four candidates again and score them all
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(model)
    candidates = pipe([prompt], [""], height=32, width=48, num_inference_steps=2, guidance_scale=5.0,
                      seed=[3], num_images_per_prompt=4).images
    scores = sdjax.CLIPReranker.from_pretrained(clip).score(candidates, prompt)
    best = int(np.argmax(scores))
    saved = np.asarray(Image.open(out / record["file"]))
    assert np.array_equal(saved, np.asarray(candidates[best]))
    assert record["rank"] == 0 and abs(record["clip_score"] - float(scores[best])) < 1e-4
    assert record["clip_score"] == pytest.approx(max(float(s) for s in scores), abs=1e-4)


def test_rerank_command_orders_a_folder(model, clip, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((smooth_image(32, 32, i) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    assert cli.main(["rerank", str(folder), "--prompt", "a cat", "--model", str(clip)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    scores = [float(line.split("\t")[0]) for line in lines]
    assert len(lines) == 3 and scores == sorted(scores, reverse=True)


def test_img2img_and_inpaint_commands(model, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray((smooth_image(32, 48) * 255).astype(np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    Image.fromarray((box_mask(32, 48) * 255).astype(np.uint8)).save(mask)
    assert cli.main(["img2img", "--prompt", "a cat", "--init-img", str(init), "--strength", "0.5", "--n_iter", "1",
                     "--n_samples", "1", "--ckpt", str(model), "--outdir", str(tmp_path / "i2i"), *FAST]) == 0
    assert cli.main(["inpaint", "--prompt", "a cat", "--init-img", str(init), "--mask", str(mask), "--n_iter", "1",
                     "--n_samples", "1", "--ckpt", str(model), "--outdir", str(tmp_path / "inp"), *FAST]) == 0
    assert len(samples(tmp_path / "i2i")) == 1 and len(samples(tmp_path / "inp")) == 1
    assert manifest(tmp_path / "inp")[0]["mode"] == "inpaint"


def test_resume_after_sigkill(model, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "sdjax.cli", "txt2img", "--prompt", "a red circle", "--n_samples", "1",
            "--n_iter", "10", "--ckpt", str(model), "--outdir", str(out), "--skip_grid", *FAST]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (out / "samples").is_dir() and samples(out):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(samples(out))
    assert 1 <= before < 10
    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    records = manifest(out)
    jobs = [tuple(r["job"]) for r in records]
    assert sorted(jobs) == [(0, it, 0) for it in range(10)]
    assert len(samples(out)) == 10 and len({r["file"] for r in records}) == 10


@pytest.fixture
def bad_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    text = tmp_path / "notimage.png"
    text.write_text("hello")
    return dict(empty=str(empty), notimage=str(text), missing=str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("case, words", [
    ("ckpt", "--ckpt"),
    ("from_file", "no such file"),
    ("empty", "no prompts"),
    ("H", "multiple of 2"),
    ("steps", "--ddim_steps"),
    ("sampler", "unknown sampler"),
    ("n_samples", "--n_samples"),
    ("keep", "--keep"),
    ("init_img", "not an image"),
    ("flag", "unrecognized"),
    ("scale_nan", "finite number"),
    ("plms_and_sampler", "give one of them"),
    ("prompts_per_batch", "--prompts-per-batch"),
    ("seed", "--seed"),
])
def test_bad_input_one_line_exit_2(case, words, model, bad_files, tmp_path, capsys):
    base = ["txt2img", "--prompt", "x", "--ckpt", str(model), "--outdir", str(tmp_path / "o"), *FAST]
    argv = {
        "ckpt": ["txt2img", "--prompt", "x", "--ckpt", str(tmp_path / "no-model"), *FAST],
        "from_file": base + ["--from-file", bad_files["missing"]],
        "empty": base + ["--from-file", bad_files["empty"]],
        "H": base + ["--H", "33"],
        "steps": base + ["--ddim_steps", "0"],
        "sampler": base + ["--sampler", "magic"],
        "n_samples": base + ["--n_samples", "0"],
        "keep": base + ["--n-candidates", "2", "--keep", "3", "--rerank-model", str(tmp_path)],
        "init_img": ["img2img", "--prompt", "x", "--init-img", bad_files["notimage"], "--ckpt", str(model), *FAST],
        "flag": base + ["--no-such-flag"],
        "scale_nan": base + ["--scale", "nan"],
        "plms_and_sampler": base + ["--plms", "--sampler", "euler"],
        "prompts_per_batch": base + ["--prompts-per-batch", "-1"],
        "seed": base + ["--seed", str(2**64)],
    }[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "txt2img", "--ddim_steps", "0", "--ckpt", str(tmp_path)],
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_prompt_file_with_bom_and_crlf_reads_the_same(tmp_path):
    plain, windows = tmp_path / "plain.txt", tmp_path / "windows.txt"
    plain.write_bytes("a (red:1.2) circle\n\nun carré vert\n".encode())
    windows.write_bytes("\ufeffa (red:1.2) circle\r\n\r\nun carré vert\r\n".encode())
    assert cli.read_prompts({"from_file": str(windows)}) == cli.read_prompts({"from_file": str(plain)}) == [
        "a (red:1.2) circle", "un carré vert"]


def test_prompt_syntax_flag_metadata_and_images(model, tmp_path):
    """The CLI reads A1111 syntax by default (the library: plain); the manifest, the PNG's sdjax record and its A1111
    text say how the prompt was read; the images of the two readings differ, and the CLI's images are the library's
    with the same options."""
    import sdjax

    prompt = "a (red:1.4) circle on a [[blue]] background"
    base = ["txt2img", "--prompt", prompt, "--n_samples", "1", "--n_iter", "1", "--ckpt", str(model), "--skip_grid",
            "--seed", "3", *FAST]
    runs = {}
    for name, extra in (("a1111", []), ("plain", ["--prompt-syntax", "plain"]),
                        ("none", ["--emphasis", "none"])):
        out = tmp_path / name
        assert cli.main(base + ["--outdir", str(out)] + extra) == 0
        (record,) = manifest(out)
        with Image.open(out / record["file"]) as im:
            runs[name] = (record, im.text, np.asarray(im.convert("RGB"), np.float32) / 255)
    assert runs["a1111"][0]["prompt_syntax"] == "a1111" and runs["a1111"][0]["emphasis"] == "original"
    assert runs["plain"][0]["prompt_syntax"] == "plain" and runs["plain"][0]["emphasis"] is None
    assert runs["none"][0]["emphasis"] == "none"
    assert "Emphasis: Original" in runs["a1111"][1]["parameters"]
    assert "Emphasis: No norm" in runs["none"][1]["parameters"]
    assert "Emphasis" not in runs["plain"][1]["parameters"]
    assert json.loads(runs["a1111"][1]["sdjax"])["prompt_syntax"] == "a1111"
    assert runs["a1111"][0]["run_id"] != runs["plain"][0]["run_id"]
    assert np.abs(runs["a1111"][2] - runs["plain"][2]).max() > 0.02
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(model)
    for name, emphasis in (("a1111", "original"), ("none", "none")):
        ours = pipe(prompt, "", height=32, width=48, num_inference_steps=2, guidance_scale=5.0, seed=[3],
                    prompt_syntax="a1111", emphasis=emphasis).images[0]
        assert np.array_equal(np.asarray(ours, np.float32) / 255, runs[name][2])


def test_clip_skip_flag(model, tmp_path, capsys):
    """--clip-skip 2 (A1111's numbering): the library's image with clip_skip = negative_clip_skip = 1, "Clip skip: 2"
    in the PNG text and the manifest, another run id; past the model's text encoder, or below 1: one line, exit 2."""
    import sdjax

    base = ["txt2img", "--prompt", "a red circle", "--negative-prompt", "blurry", "--n_samples", "1", "--n_iter",
            "1", "--ckpt", str(model), "--skip_grid", "--seed", "3", *FAST]
    out, plain_out = tmp_path / "skip", tmp_path / "plain"
    assert cli.main(base + ["--outdir", str(out), "--clip-skip", "2"]) == 0
    assert cli.main(base + ["--outdir", str(plain_out), "--clip-skip", "1"]) == 0
    (record,), (plain,) = manifest(out), manifest(plain_out)
    with Image.open(out / record["file"]) as im:
        text, image = im.text["parameters"], np.asarray(im.convert("RGB"), np.float32) / 255
    assert record["clip_skip"] == 2 and "Clip skip: 2" in text
    assert "clip_skip" not in plain and record["run_id"] != plain["run_id"]
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(model)
    ours = pipe("a red circle", "blurry", height=32, width=48, num_inference_steps=2, guidance_scale=5.0, seed=[3],
                prompt_syntax="a1111", clip_skip=1, negative_clip_skip=1).images[0]
    assert np.array_equal(np.asarray(ours, np.float32) / 255, image)
    capsys.readouterr()
    for n, words in (("3", "--clip-skip 3: this model's text encoder allows 1 to 2"), ("0", "at least 1")):
        assert cli.main(base + ["--outdir", str(tmp_path / "bad"), "--clip-skip", n]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err


def test_an_empty_prompt_is_kept_not_replaced(model, tmp_path):
    out = tmp_path / "o"
    assert cli.main(["txt2img", "--prompt", "", "--ckpt", str(model), "--outdir", str(out), "--n_samples", "1",
                     "--n_iter", "1", "--skip_grid", *FAST]) == 0
    assert [r["prompt"] for r in manifest(out)] == [""]
