"""Pipeline options that trade memory or compile time: attention chunking, tiled VAE decode, the persistent
compilation cache; and the clear errors for NaN output and over-long prompts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import sdjax  # noqa: E402
from sdjax import samplers  # noqa: E402

from pipeline_fixtures import build_pipeline  # noqa: E402

H, W = 32, 48
CALL = dict(prompt=["a red circle", "a blue square"], negative_prompt=["", "blurry"], height=H, width=W,
            num_inference_steps=3, output_type="np", seed=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("opts") / "sd1", kind="sd1")


@pytest.fixture
def pipe(folder):
    return sdjax.StableDiffusionPipeline.from_pretrained(folder)


def test_attention_chunking_gives_the_same_images(pipe):
    plain = pipe(**CALL).images
    pipe.enable_attention_chunking(64)  # 16x24 = 384 latent tokens: 6 chunks in every self-attention
    chunked = pipe(**CALL).images
    assert np.abs(plain - chunked).max() <= 1e-5
    pipe.enable_attention_chunking(None)
    assert np.abs(pipe(**CALL).images - plain).max() <= 1e-6


def test_tiled_vae_decode_matches_diffusers_tiling(pipe, folder):
    """A 32x48 image is wider than the tiny VAE's 32-pixel tile, so it is decoded in blended tiles."""
    latents = np.random.default_rng(0).standard_normal((2, H // 2, W // 2, 4)).astype(np.float32)
    pipe.enable_vae_tiling()
    ours = pipe(**dict(CALL, latents=latents)).images
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    ref.scheduler = diffusers.DDIMScheduler.from_config(samplers.diffusers_config("ddim", config))
    ref.vae.enable_tiling()
    theirs = ref(CALL["prompt"], negative_prompt=CALL["negative_prompt"], height=H, width=W,
                 num_inference_steps=3, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                 output_type="np").images
    assert np.abs(ours - theirs).max() <= 5e-4
    pipe.enable_vae_tiling(False)
    untiled = pipe(**dict(CALL, latents=latents)).images
    assert np.abs(untiled - ours).max() > 1e-4  # the tiled path really ran


def test_nan_output_raises_a_clear_error(pipe):
    bias = pipe.vae.post_quant_conv.bias
    bias.set_value(bias.get_value() * np.nan)
    with pytest.raises(FloatingPointError, match="float16 VAE"):
        pipe(**CALL)


def test_long_prompt_is_not_truncated(pipe):
    """Past 75 tokens a prompt gets another chunk (`sdjax.prompts`): no warning, and its end changes the image."""
    long = " ".join(["red circle"] * 40)  # 80 tokens: two chunks
    first = " ".join(["red circle"] * 37) + " red"  # its first 75 tokens: one chunk
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = pipe(**dict(CALL, prompt=[long, "x"])).images
    b = pipe(**dict(CALL, prompt=[first, "x"])).images
    assert np.abs(a[0] - b[0]).max() > 1e-3
    # the other prompt's image: its padding chunk is masked (float rounding of the longer context aside, as in
    # test_prompt_parity.test_batch_does_not_change_an_image)
    assert np.abs(a[1] - b[1]).max() <= 1e-5


CACHE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    import sdjax
    from sdjax.pipelines.program import enable_compilation_cache
    enable_compilation_cache(sys.argv[2])
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(sys.argv[1])
    out = pipe(["a red circle"], height=32, width=48, num_inference_steps=2, output_type="np").images
    np.save(sys.argv[3], out)
""")


def test_persistent_compilation_cache_is_written_and_reused(folder, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(CACHE_SCRIPT)
    cache = tmp_path / "cache"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}.npy"
        subprocess.run([sys.executable, str(script), str(folder), str(cache), str(out)], check=True, env=env,
                       timeout=600)
        outs.append(np.load(out))
        if i == 0:
            entries = sorted(os.listdir(cache))
            assert entries, "the first process wrote nothing to the compilation cache"
    assert sorted(os.listdir(cache)) == entries  # the second process found every program there
    assert np.array_equal(outs[0], outs[1])
