"""The Gradio demo: served on a free 127.0.0.1 port with a tiny model, called through gradio_client."""
from __future__ import annotations

import re
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import cli

from pipeline_fixtures import build_clip, build_pipeline, build_sdxl

pytest.importorskip("diffusers")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo (tiny model, tiny CLIP, the same tiny model as refiner) running in this process."""
    pytest.importorskip("gradio")
    from sdjax.demo import launch

    root = tmp_path_factory.mktemp("demo")
    model, clip = build_pipeline(root / "tiny"), build_clip(root / "clip")
    port = free_port()
    demo = launch(str(model), str(clip), host="127.0.0.1", port=port, refiner_model=str(model), block=False)
    yield demo, port
    demo.close()


def test_generate_through_client_gallery_by_clip_score(served, tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    demo, port = served
    assert demo.server_name == "127.0.0.1"
    client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path))
    # prompt, negative, scale, width, height, steps, refiner steps, high-noise fraction (hidden: not SDXL), seed,
    # randomize, sampler, candidates, rerank
    gallery, parameters, seed = client.predict(
        "a red circle", "blurry", 5.0, 32, 24, 2, 2, 0.8, 7, False, "ddim", 3, True, api_name="/generate")
    assert seed == 7 and len(gallery) == 3
    scores = []
    for item in gallery:
        path = Path(item["image"])
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (32, 24)
            assert im.text["parameters"].startswith("a red circle\nNegative prompt: blurry\n")
        m = re.match(r"#(\d+)  CLIP (-?\d+\.\d+)  \(pos (\d)\)$", item["caption"])
        assert m, item["caption"]
        scores.append(float(m.group(2)))
    assert scores == sorted(scores, reverse=True)
    assert [int(item["caption"][1]) for item in gallery] == [1, 2, 3]
    assert "Steps: 2, Sampler: ddim, CFG scale: 5.0, Seed: 7, Size: 32x24, Model: tiny" in parameters
    assert "Refiner mode: img2img, Refiner steps: 2, Refiner strength: 0.3" in parameters  # not SDXL: img2img
    assert re.search(r"CLIP score: -?\d+\.\d{4}$", parameters)

    # without reranking: batch order, no scores; a random seed is drawn and returned
    gallery, parameters, seed = client.predict(
        "a red circle", "", 5.0, 32, 24, 2, 0, 0.8, 0, True, "ddim", 3, False, api_name="/generate")
    assert [item["caption"] for item in gallery] == [f"#{i + 1}  (pos {i})" for i in range(3)]
    assert "CLIP score" not in parameters and f"Seed: {seed}," in parameters

    # a bad request is a message to the user, not a crash
    with pytest.raises(Exception, match="multiples of 2"):
        client.predict("x", "", 5.0, 33, 24, 2, 0, 0.8, 0, False, "ddim", 1, False, api_name="/generate")


def control(demo, label_start):
    found = [b for b in demo.blocks.values() if str(getattr(b, "label", "")).startswith(label_start)]
    assert len(found) == 1, label_start
    return found[0]


def test_refiner_steps_only_with_a_refiner(served, sdxl):
    from sdjax.demo import build_demo

    # an SD base with a refiner: img2img steps, labelled so, and no hand-off fraction
    assert control(served[0], "Refiner steps").visible is True
    assert "img2img" in control(served[0], "Refiner steps").label
    assert control(served[0], "High-noise fraction").visible is False
    fake = types.SimpleNamespace(vae_scale_factor=8, default_size=512, name="fake", clip_skip_limit=lambda: 11,
                                 mesh=types.SimpleNamespace(devices=types.SimpleNamespace(size=1)))
    for demo in (build_demo(fake), build_demo(sdxl["base"])):  # no refiner: neither control
        assert control(demo, "Refiner steps").visible is False
        assert control(demo, "High-noise fraction").visible is False
    demo = build_demo(sdxl["base"], refiner=sdxl["refiner"])  # SDXL base + SDXL refiner: both
    assert control(demo, "Refiner steps").visible is True and "img2img" not in control(demo, "Refiner steps").label
    assert control(demo, "High-noise fraction").visible is True


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    import sdjax

    root = tmp_path_factory.mktemp("demo_sdxl")
    return {"base": sdjax.StableDiffusionXLPipeline.from_pretrained(build_sdxl(root / "base")),
            "refiner": sdjax.StableDiffusionXLPipeline.from_pretrained(build_sdxl(root / "refiner", refiner=True,
                                                                                  seed=1))}


def test_sdxl_refiner_hands_off_in_latent_space(sdxl, tmp_path):
    """An SDXL base + SDXL refiner demo, served and called through gradio_client, gives the images of the library's
    one-call hand-off pipe(..., refiner=, high_noise_frac=, refiner_num_inference_steps=) for the same seed."""
    gradio_client = pytest.importorskip("gradio_client")
    from sdjax.demo import build_demo

    base, refiner = sdxl["base"], sdxl["refiner"]
    demo = build_demo(base, refiner=refiner)
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(demo.sdjax_outdir)], share=False)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path))
        gallery, parameters, seed = client.predict(
            "a red circle", "", 5.0, 48, 32, 4, 10, 0.7, 3, False, "euler", 2, False, api_name="/generate")
    finally:
        demo.close()
    assert seed == 3 and len(gallery) == 2
    assert "Refiner: refiner, Refiner switch at: 0.7, Refiner steps: 10" in parameters
    assert "img2img" not in parameters
    served = np.stack([np.asarray(Image.open(item["image"]).convert("RGB"), np.float32) / 255 for item in gallery])

    call = dict(height=32, width=48, num_inference_steps=4, guidance_scale=5.0, sampler="euler", seed=3,
                num_images_per_prompt=2, output_type="np")
    lib = base("a red circle", None, refiner=refiner, high_noise_frac=0.7, refiner_num_inference_steps=10,
               **call).images
    diff = float(np.abs(served - (np.clip(lib, 0, 1) * 255).round() / 255).max())
    print(f"demo vs library hand-off (after 8-bit rounding): max abs diff {diff:.1e}")
    assert diff <= 1e-5
    # guards: not the base alone, and not the refiner as img2img over the base's images
    base_only = base("a red circle", None, **call).images
    img2img = refiner(["a red circle"] * 2, None, image=base_only, strength=0.3,
                      **{**call, "height": None, "width": None, "num_images_per_prompt": 1}).images
    assert np.abs(base_only - lib).max() > 1e-2 and np.abs(img2img - lib).max() > 1e-2


def test_demo_without_gradio_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert cli.main(["demo", "--port", "7861"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and 'pip install "sdjax[demo]"' in err


def test_prompt_syntax_toggle(served, tmp_path):
    """The syntax toggle (default a1111, as the CLI) reaches the pipeline and the PNG metadata."""
    gradio_client = pytest.importorskip("gradio_client")
    demo, port = served
    assert control(demo, "Prompt syntax").value == "a1111"
    client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path))
    results = {}
    for syntax in ("a1111", "plain"):
        gallery, parameters, _ = client.predict(
            "a (red:1.6) circle", "", 5.0, 32, 24, 2, 0, 0.8, 5, False, "ddim", 1, False, syntax,
            api_name="/generate")
        with Image.open(gallery[0]["image"]) as im:
            results[syntax] = (parameters, np.asarray(im.convert("RGB"), np.float32) / 255)
    assert "Emphasis: Original" in results["a1111"][0] and "Emphasis" not in results["plain"][0]
    assert np.abs(results["a1111"][1] - results["plain"][1]).max() > 0.02


def test_clip_skip_control(served, tmp_path):
    """The Clip skip slider (A1111's numbering, default 1) reaches the pipeline (prompt and negative) and the
    metadata: Clip skip 2 gives another image and "Clip skip: 2"; 1 writes nothing."""
    gradio_client = pytest.importorskip("gradio_client")
    demo, port = served
    assert control(demo, "Clip skip").value == 1
    client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path))
    results = {}
    for skip in (1, 2):
        gallery, parameters, _ = client.predict(
            "a red circle", "blurry", 5.0, 32, 24, 2, 0, 0.8, 5, False, "ddim", 1, False, "a1111", skip,
            api_name="/generate")
        with Image.open(gallery[0]["image"]) as im:
            results[skip] = (parameters, np.asarray(im.convert("RGB"), np.float32) / 255)
    assert "Clip skip: 2" in results[2][0] and "Clip skip" not in results[1][0]
    assert np.abs(results[1][1] - results[2][1]).max() > 0.02
