"""Single-file checkpoints through the pipelines: `from_single_file`, `from_pretrained(file)`, `sdjax convert` and the
CLI's `--ckpt FILE`.

Tiny random diffusers pipelines are written as original-layout files (tests/single_file_fixtures.py; the writer is
trusted because diffusers' own `from_single_file` reads them back exactly, tests/test_original_layout.py). diffusers'
`from_single_file(path, config=folder)` is the reference: sdjax's images from the file equal sdjax's from the folder
(<= 1e-5) and diffusers' from the file (<= 5e-4)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import sdjax  # noqa: E402
from sdjax import samplers  # noqa: E402
from sdjax.loading import CheckpointMismatchError  # noqa: E402

from pipeline_fixtures import box_mask, quick_compiles, smooth_image  # noqa: E402
from single_file_fixtures import config_only, write_single_files  # noqa: E402

H, W = 32, 32
LATENT = (2, H // 2, W // 2, 4)
PROMPTS = ["a red circle", "a blue square"]
TOL_SAME = 1e-5
TOL_DIFFUSERS = 5e-4

_quick = pytest.fixture(scope="module", autouse=True)(quick_compiles)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """family -> (folder, file): SD1 .safetensors, SD2 as a Lightning-style .ckpt (torch.save), SDXL base and
    refiner, SD1 inpainting; plus "sd1-fp16", the SD1 file in float16."""
    root = tmp_path_factory.mktemp("single_files")
    made = write_single_files(root, ("sd1", "sd2", "sdxl", "sdxl-refiner", "sd1-inpainting"))
    out = {family: (folder, path) for family, (folder, path, _) in made.items()}
    from safetensors.numpy import load_file, save_file

    state = load_file(str(out["sd2"][1]))
    ckpt = root / "sd2.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v.copy()) for k, v in state.items()}, "global_step": 12,
                "epoch": 1}, ckpt)
    out["sd2"] = (out["sd2"][0], ckpt)
    sd1 = load_file(str(out["sd1"][1]))
    fp16 = root / "sd1-fp16.safetensors"
    save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in sd1.items()}, str(fp16))
    out["sd1-fp16"] = (out["sd1"][0], fp16)
    return out


def latents(seed=0, shape=LATENT):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ddim(folder):
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return diffusers.DDIMScheduler.from_config(samplers.diffusers_config("ddim", config))


def call(pipe, **kw):
    return pipe(PROMPTS, negative_prompt=["", "blurry"], height=H, width=W, num_inference_steps=3,
                guidance_scale=6.0, sampler="ddim", latents=latents(), output_type="np", **kw).images


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd1-inpainting"])
def test_file_gives_the_folders_images(files, family):
    folder, path = files[family]
    kw = {}
    if family == "sd1-inpainting":
        kw = dict(image=smooth_image(H, W)[None], mask_image=box_mask(H, W)[None], strength=1.0)
    from_file = call(sdjax.StableDiffusionPipeline.from_single_file(path, config=folder), **kw)
    from_folder = call(sdjax.StableDiffusionPipeline.from_pretrained(folder), **kw)
    assert np.abs(from_file - from_folder).max() <= TOL_SAME


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd1-fp16"])
def test_file_matches_diffusers_from_single_file(files, family, tmp_path):
    folder, path = files[family]
    ours = call(sdjax.StableDiffusionPipeline.from_single_file(path, config=folder))
    ref = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(config_only(folder, tmp_path / "config")), torch_dtype=torch.float32,
        safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = ddim(folder)
    theirs = ref(PROMPTS, negative_prompt=["", "blurry"], height=H, width=W, num_inference_steps=3,
                 guidance_scale=6.0, latents=torch.from_numpy(latents().transpose(0, 3, 1, 2)),
                 output_type="np").images
    assert np.abs(ours - theirs).max() <= TOL_DIFFUSERS


def test_sdxl_file_matches_the_folder_and_diffusers(files, tmp_path):
    folder, path = files["sdxl"]
    pipe = sdjax.StableDiffusionPipeline.from_single_file(path, config=folder)
    assert isinstance(pipe, sdjax.StableDiffusionXLPipeline)
    kw = dict(height=H, width=W, num_inference_steps=3, guidance_scale=5.0, sampler="euler", output_type="np")
    ours = pipe(PROMPTS, latents=latents(), **kw).images
    same = sdjax.StableDiffusionPipeline.from_pretrained(folder)(PROMPTS, latents=latents(), **kw).images
    assert np.abs(ours - same).max() <= TOL_SAME
    ref = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(config_only(folder, tmp_path / "config")), torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPTS, height=H, width=W, num_inference_steps=3, guidance_scale=5.0,
                 latents=torch.from_numpy(latents().transpose(0, 3, 1, 2)), output_type="np").images
    assert np.abs(ours - theirs).max() <= TOL_DIFFUSERS


def test_sdxl_refiner_file_gives_the_folders_images(files):
    folder, path = files["sdxl-refiner"]
    pipe = sdjax.StableDiffusionPipeline.from_single_file(path, config=folder)
    assert isinstance(pipe, sdjax.StableDiffusionXLPipeline) and pipe.text_encoder is None
    assert pipe.requires_aesthetics_score
    kw = dict(image=latents(3), strength=0.5, num_inference_steps=4, guidance_scale=5.0, sampler="euler",
              output_type="np")
    ours = pipe(PROMPTS, **kw).images
    same = sdjax.StableDiffusionPipeline.from_pretrained(folder)(PROMPTS, **kw).images
    assert np.abs(ours - same).max() <= TOL_SAME


def test_options_and_detection(files, capsys):
    folder, path = files["sd2"]
    pipe = sdjax.StableDiffusionPipeline.from_single_file(path, config=folder, prediction_type="epsilon",
                                                          upcast_attention=False)
    assert pipe.scheduler_config["prediction_type"] == "epsilon" and not pipe.unet.config.upcast_attention
    # without config= the built-in full-size SD 2.1 config is used: the tiny file does not fit it, and the error
    # says so after the one-line note on the guessed prediction type
    with pytest.raises(CheckpointMismatchError, match="does not match the config"):
        sdjax.StableDiffusionPipeline.from_pretrained(path)
    err = capsys.readouterr().err
    assert "v_prediction" in err and "prediction_type" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="neither a folder nor a built-in name"):
        sdjax.StableDiffusionPipeline.from_single_file(path, config="sd99")
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline does not load|does not load"):
        sdjax.StableDiffusionXLPipeline.from_single_file(files["sd1"][1], config=files["sd1"][0])


def test_lightning_global_step_tells_sd2_base(files, tmp_path):
    """diffusers' rule: an SD 2.x file saved at global step 875000 is the 512 epsilon base model."""
    from safetensors.numpy import load_file

    from sdjax import formats
    from sdjax.pipelines.single_file import open_single_file

    folder, ckpt = files["sd2"]
    assert formats.read_state_dict(ckpt).metadata == {"global_step": "12", "epoch": "1"}
    assert open_single_file(ckpt).detected.config_name == "sd21"  # the documented default: 768 v-prediction
    state = load_file(str(files["sd2"][0].parent / "sd2.safetensors"))
    base = tmp_path / "base.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v.copy()) for k, v in state.items()}, "global_step": 875000},
               base)
    detected = open_single_file(base).detected
    assert (detected.config_name, detected.prediction_type) == ("sd21-base", "epsilon")


def test_convert_writes_a_folder_diffusers_and_sdjax_load(files, tmp_path):
    from sdjax.cli import main

    folder, path = files["sd1"]
    out = tmp_path / "converted"
    assert main(["convert", str(path), str(out), "--model-config", str(folder)]) == 0
    ours = call(sdjax.StableDiffusionPipeline.from_pretrained(out))
    assert np.abs(ours - call(sdjax.StableDiffusionPipeline.from_pretrained(folder))).max() <= TOL_SAME
    ref = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    want = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False)
    for part in ("unet", "vae", "text_encoder"):
        got, exp = getattr(ref, part).state_dict(), getattr(want, part).state_dict()
        assert all(torch.equal(got[k], exp[k]) for k in exp), part
    assert main(["convert", str(path), str(out), "--model-config", str(folder)]) == 2  # never overwrites
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no temporary folder left


def test_cli_txt2img_from_a_file_records_the_model_hash(files, tmp_path):
    import hashlib

    from PIL import Image

    folder, path = files["sd2"]
    out = tmp_path / "out"
    args = [sys.executable, "-m", "sdjax.cli", "txt2img", "--prompt", "a red circle", "--n_samples", "1", "--n_iter",
            "1", "--ddim_steps", "2", "--H", str(H), "--W", str(W), "--ckpt", str(path), "--model-config",
            str(folder), "--prediction-type", "v", "--outdir", str(out), "--skip_grid"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    text = Image.open(out / "samples" / "00000.png").text["parameters"]
    assert f"Model: {path.name}" in text and f"Model hash: {digest}" in text
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert record["model_hash"] == digest


def hostile_files(tmp_path) -> dict:
    """name -> a file the CLI must refuse; each pickle payload would create MARKER if it ran."""
    import zipfile

    marker = tmp_path / "MARKER"
    command = f"touch {marker}".encode()
    payload = (b"\x80\x02cposix\nsystem\nq\x00X" + len(command).to_bytes(4, "little") + command
               + b"q\x01\x85q\x02Rq\x03.")
    files = {}
    files["pickle.safetensors"] = payload  # a raw pickle in disguise
    zipped = tmp_path / "zip.ckpt"
    torch.save({"a": torch.zeros(2)}, zipped)
    with zipfile.ZipFile(zipped) as z:
        records = {name: z.read(name) for name in z.namelist()}
    with zipfile.ZipFile(zipped, "w") as z:  # the torch zip with its data.pkl replaced by the payload
        for name, data in records.items():
            z.writestr(name, payload if name.endswith("data.pkl") else data)
    files["zip.ckpt"] = zipped.read_bytes()
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 30]}}).encode()
    files["lying.safetensors"] = len(header).to_bytes(8, "little") + header + b"\0" * 16
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    files["legacy.pt"] = legacy.read_bytes()
    return files


@pytest.mark.parametrize("name", ["pickle.safetensors", "zip.ckpt", "lying.safetensors", "legacy.pt"])
def test_cli_refuses_hostile_checkpoints_in_one_line(tmp_path, name):
    path = tmp_path / "in" / name
    path.parent.mkdir()
    path.write_bytes(hostile_files(tmp_path)[name])
    r = subprocess.run([sys.executable, "-m", "sdjax.cli", "txt2img", "--ckpt", str(path), "--outdir",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and name in r.stderr
    assert not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "out" / "samples").exists() or not any((tmp_path / "out" / "samples").iterdir())
