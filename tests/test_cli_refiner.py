"""`sdjax txt2img --refiner`: the SDXL base -> refiner hand-off from the command line, on tiny SDXL folders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import cli
from sdjax.bulk import SAMPLE_NAME

from pipeline_fixtures import build_pipeline, build_sdxl

pytest.importorskip("diffusers")


PROMPT = "a red circle on a blue background"
# 4 base steps at 0.7: the base runs timesteps 751, 501; the refiner's own 10-step schedule then runs 201, 101, 1
# (with its default, the base's 4 steps, it would run 251, 1): the refiner's step count changes the images
FAST = ["--H", "32", "--W", "48", "--ddim_steps", "4", "--scale", "5", "--sampler", "euler", "--seed", "5",
        "--n_iter", "1", "--skip_grid"]
REFINE = ["--refiner-steps", "10", "--high-noise-frac", "0.7"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_sdxl")
    return {"base": build_sdxl(root / "base"), "refiner": build_sdxl(root / "refiner", refiner=True, seed=1),
            "sd1": build_pipeline(root / "sd1")}


@pytest.fixture(scope="module")
def pipes(folders):
    import sdjax

    return {k: sdjax.StableDiffusionXLPipeline.from_pretrained(folders[k]) for k in ("base", "refiner")}


def samples(outdir: Path):
    return sorted(p for p in (outdir / "samples").iterdir() if SAMPLE_NAME.match(p.name))


def test_txt2img_with_refiner_equals_the_library_call(folders, pipes, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["txt2img", "--prompt", PROMPT, "--n_samples", "2", "--ckpt", str(folders["base"]),
                     "--refiner", str(folders["refiner"]), "--outdir", str(out), *REFINE, *FAST]) == 0
    files = samples(out)
    assert len(files) == 2
    saved = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) / 255 for p in files])

    base, refiner = pipes["base"], pipes["refiner"]
    call = dict(height=32, width=48, num_inference_steps=4, guidance_scale=5.0, sampler="euler", seed=[5],
                num_images_per_prompt=2, output_type="np")
    lib = base([PROMPT], [""], refiner=refiner, high_noise_frac=0.7, refiner_num_inference_steps=10, **call).images
    quantised = (np.clip(lib, 0, 1) * 255).round() / 255  # what a PNG holds
    diff = float(np.abs(saved - quantised).max())
    print(f"CLI vs library (after 8-bit rounding): max abs diff {diff:.1e}")
    assert diff <= 1e-5

    # guards: the refiner really ran, and with the CLI's step count
    base_only = base([PROMPT], [""], **call).images
    default_steps = base([PROMPT], [""], refiner=refiner, high_noise_frac=0.7, **call).images
    assert np.abs(base_only - lib).max() > 1e-2
    assert np.abs(default_steps - lib).max() > 1e-2

    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["refiner"], r["refiner_steps"], r["high_noise_frac"]) for r in records] == [("refiner", 10, 0.7)] * 2
    text = Image.open(files[0]).text["parameters"]
    assert "Model: base" in text and "Refiner: refiner, Refiner switch at: 0.7, Refiner steps: 10" in text


def test_refiner_settings_from_a_config(folders, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {folders['base']}\nsteps: 40\nrefiner: {folders['refiner']}\nrefiner_steps: 30\n"
                      "high_noise_frac: 0.75\n")
    args = cli.build_parser().parse_args(["txt2img", "--config", str(config)])
    s = cli.resolve_settings(args, "txt2img")
    assert (s["refiner"], s["refiner_steps"], s["high_noise_frac"]) == (str(folders["refiner"]), 30, 0.75)
    args = cli.build_parser().parse_args(["txt2img", "--config", str(config), "--high-noise-frac", "0.6"])
    assert cli.resolve_settings(args, "txt2img")["high_noise_frac"] == 0.6  # flags override the config
    # the default split when only the refiner is named
    args = cli.build_parser().parse_args(["txt2img", "--refiner", str(folders["refiner"])])
    assert cli.resolve_settings(args, "txt2img")["high_noise_frac"] == 0.8
    # a refiner in a config is an error for img2img, which has no hand-off
    args = cli.build_parser().parse_args(["img2img", "--config", str(config), "--init-img", "x.png"])
    with pytest.raises(cli.UsageError, match="txt2img only"):
        cli.resolve_settings(args, "img2img")


@pytest.mark.parametrize("case, words", [
    ("sd1_base", "needs an SDXL base"),
    ("frac_zero", "--high-noise-frac must be strictly between 0 and 1"),
    ("frac_one", "--high-noise-frac must be strictly between 0 and 1"),
    ("frac_big", "--high-noise-frac must be strictly between 0 and 1"),
    ("missing", "no such folder"),
    ("not_sdxl_refiner", "cannot load an SDXL pipeline"),
    ("steps_zero", "--refiner-steps must be"),
    ("frac_alone", "needs --refiner"),
    ("refiner_no_step", "has no step after high_noise_frac 0.999"),
    ("base_no_step", "leaves the base no step"),
])
def test_bad_refiner_input_one_line_exit_2(case, words, folders, tmp_path, capsys):
    base = ["txt2img", "--prompt", "x", "--n_samples", "1", "--outdir", str(tmp_path / "o"), *FAST]
    sdxl, refiner = ["--ckpt", str(folders["base"])], ["--refiner", str(folders["refiner"])]
    argv = base + {
        "sd1_base": ["--ckpt", str(folders["sd1"]), *refiner],
        "frac_zero": [*sdxl, *refiner, "--high-noise-frac", "0"],
        "frac_one": [*sdxl, *refiner, "--high-noise-frac", "1"],
        "frac_big": [*sdxl, *refiner, "--high-noise-frac", "1.5"],
        "missing": [*sdxl, "--refiner", str(tmp_path / "no-refiner")],
        "not_sdxl_refiner": [*sdxl, "--refiner", str(folders["sd1"])],
        "steps_zero": [*sdxl, *refiner, "--refiner-steps", "0"],
        "frac_alone": [*sdxl, "--high-noise-frac", "0.7"],
        # cut-off timestep round(1000 - 999.0) = 1: no timestep of the refiner's schedule (..., 101, 1) is below it
        "refiner_no_step": [*sdxl, *refiner, "--high-noise-frac", "0.999"],
        # cut-off 999: no timestep of the base's 4-step schedule (751, 501, 251, 1) is at or above it
        "base_no_step": [*sdxl, *refiner, "--high-noise-frac", "0.001"],
    }[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "o" / "samples").is_dir() or not samples(tmp_path / "o")
