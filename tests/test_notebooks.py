"""notebooks/*.ipynb executed top to bottom with nbclient, on the CPU, with a tiny model from the environment."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline_fixtures import build_clip, build_pipeline

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")
pytest.importorskip("diffusers")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb")
    return dict(SDJAX_MODEL=str(build_pipeline(root / "tiny")), SDJAX_CLIP=str(build_clip(root / "clip")),
                SDJAX_STEPS="2", SDJAX_SIZE="32", SDJAX_IMAGES_PER_DEVICE="2", JAX_PLATFORMS="cpu")


def execute(name: str, env: dict, tmp_path: Path, monkeypatch) -> Path:
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # the kernel process inherits them; the parameters cell reads them
    monkeypatch.setenv("SDJAX_OUTDIR", str(tmp_path / "outputs"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on any error
    return tmp_path / "outputs"


def test_txt2img_and_rerank(tiny_env, tmp_path, monkeypatch):
    out = execute("txt2img_and_rerank.ipynb", tiny_env, tmp_path, monkeypatch) / "txt2img_and_rerank"
    assert len(list(out.glob("*.png"))) == 2  # KEEP=4 capped at the 2 images made on one CPU device


def test_tpu_vm_bulk_run(tiny_env, tmp_path, monkeypatch):
    out = execute("tpu_vm_bulk_run.ipynb", tiny_env, tmp_path, monkeypatch) / "tpu_vm_bulk_run"
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 and {r["rank"] for r in records} == {0, 1}  # 3 prompts x KEEP 2
    assert all((out / r["file"]).is_file() and r["clip_score"] is not None for r in records)
