"""The Gradio demo: served on a free 127.0.0.1 port with a tiny model, called through gradio_client."""
from __future__ import annotations

import re
import socket
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from sdjax import cli

from pipeline_fixtures import build_clip, build_pipeline

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
    # prompt, negative, scale, width, height, steps, refiner steps, seed, randomize, sampler, candidates, rerank
    gallery, parameters, seed = client.predict(
        "a red circle", "blurry", 5.0, 32, 24, 2, 2, 7, False, "ddim", 3, True, api_name="/generate")
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
    assert "Refiner steps: 2" in parameters and re.search(r"CLIP score: -?\d+\.\d{4}$", parameters)

    # without reranking: batch order, no scores; a random seed is drawn and returned
    gallery, parameters, seed = client.predict(
        "a red circle", "", 5.0, 32, 24, 2, 0, 0, True, "ddim", 3, False, api_name="/generate")
    assert [item["caption"] for item in gallery] == [f"#{i + 1}  (pos {i})" for i in range(3)]
    assert "CLIP score" not in parameters and f"Seed: {seed}," in parameters

    # a bad request is a message to the user, not a crash
    with pytest.raises(Exception, match="multiples of 2"):
        client.predict("x", "", 5.0, 33, 24, 2, 0, 0, False, "ddim", 1, False, api_name="/generate")


def test_refiner_steps_only_with_a_refiner(served):
    from sdjax.demo import build_demo

    def refiner_slider(demo):
        return next(b for b in demo.blocks.values() if getattr(b, "label", None) == "Refiner steps")

    assert refiner_slider(served[0]).visible is True
    fake = types.SimpleNamespace(vae_scale_factor=8, default_size=512, name="fake",
                                 mesh=types.SimpleNamespace(devices=types.SimpleNamespace(size=1)))
    assert refiner_slider(build_demo(fake)).visible is False


def test_demo_without_gradio_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert cli.main(["demo", "--port", "7861"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and 'pip install "sdjax[demo]"' in err
