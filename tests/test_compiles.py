"""Changing only values never recompiles the generation program: one compile per (mode, size, batch, bucket of
sampler calls). Compilations are counted from JAX's own compile log (`jax_log_compiles`), not from sdjax's cache."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import sdjax  # noqa: E402
from sdjax import samplers  # noqa: E402

from pipeline_fixtures import build_pipeline, build_sdxl, count_compiles, quick_compiles, smooth_image  # noqa: E402

H, W = 32, 32

_quick = pytest.fixture(scope="module", autouse=True)(quick_compiles)


compiles = pytest.fixture(count_compiles)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = build_pipeline(tmp_path_factory.mktemp("compiles") / "sd1", kind="sd1")
    return sdjax.StableDiffusionPipeline.from_pretrained(folder)


def test_calls_bucket():
    assert [samplers.calls_bucket(n) for n in (1, 8, 9, 50, 64, 65, 1000)] == [8, 8, 16, 64, 64, 128, 1024]


def test_values_do_not_recompile(sd, compiles):
    call = dict(height=H, width=W, output_type="np")
    # txt2img: prompts, negatives, seeds, guidance and step counts within the bucket of 8 calls
    first = sd(["a red circle", "a blue square"], num_inference_steps=3, **call).images
    sd(["a green triangle", "x"], negative_prompt=["blurry", ""], num_inference_steps=5, seed=7,
       guidance_scale=3.0, **call)
    sd(["a"] * 2, negative_prompt="ugly", num_inference_steps=8, seed=[1, 2], guidance_scale=12.0, **call)
    sd(["a", "b"], num_inference_steps=4, guidance_scale=5.0, guidance_rescale=0.7, **call)
    assert compiles.count == 1
    # the same call again gives the same images: nothing of the earlier calls stuck to the program
    again = sd(["a red circle", "a blue square"], num_inference_steps=3, **call).images
    assert np.array_equal(first, again)
    # img2img: strength and steps change, the program stays (one more compile for the mode)
    image = smooth_image(H, W)[None]
    for strength, steps in ((0.8, 5), (0.3, 7), (1.0, 6)):
        sd(["a", "b"], image=image, strength=strength, num_inference_steps=steps, **call)
    assert compiles.count == 2
    # a step count past the bucket: one new program; a new batch size: one more
    sd(["a", "b"], num_inference_steps=9, **call)
    sd(["a", "b"], num_inference_steps=16, seed=3, **call)
    assert compiles.count == 3
    sd(["a"], num_inference_steps=3, **call)
    assert compiles.count == 4
    # every sampler has the same property (Heun: 2n-1 calls; PNDM: n+1)
    for name in ("heun", "pndm", "dpmpp_2m", "euler_a", "unipc"):
        before = compiles.count
        for steps in (2, 3, 4):
            sd(["a", "b"], num_inference_steps=steps, sampler=name, **call)
        assert compiles.count == before + 1, name


def test_one_program_per_chunk_bucket(sd, compiles):
    """Prompts of any length: one program per bucket of chunks (1, 2, 3, 4, then multiples of 4), whatever the
    mix of lengths, weights and negatives within it."""
    call = dict(height=H, width=W, num_inference_steps=2, output_type="latent", prompt_syntax="a1111")

    def words(n):  # n tokens: n // 75 + 1 chunks
        return " ".join(["cat"] * n)

    sd(["a (red:1.2) circle", "[b]"], **call)
    sd(["x", "y"], negative_prompt=["blurry", "(ugly:1.4)"], **call)
    assert compiles.count == 1
    sd([words(80), "a"], **call)
    sd(["a", "b"], negative_prompt=[words(100), "c"], **call)
    sd(["a BREAK b", words(140)], **call)
    assert compiles.count == 2
    sd([words(200), "a"], negative_prompt="(blurry:0.8)", **call)
    assert compiles.count == 3
    sd([words(310), "a"], **call)  # 5 chunks: bucket 8
    sd([words(500), words(10)], negative_prompt=words(400), **call)  # 7 chunks: bucket 8
    assert compiles.count == 4


def test_sdxl_denoising_fractions_do_not_recompile(tmp_path_factory, compiles):
    folder = build_sdxl(tmp_path_factory.mktemp("compiles") / "sdxl")
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(folder)
    call = dict(height=H, width=W, num_inference_steps=6, output_type="latent")
    for end in (0.5, 0.7, 0.9):
        latents = pipe("a red circle", negative_prompt="blurry", denoising_end=end, seed=2, **call).images
    assert compiles.count == 1
    for start in (0.5, 0.7, 0.9):
        pipe("a red circle", negative_prompt="blurry", image=latents, denoising_start=start, **call)
    for strength in (0.3, 0.6):
        pipe("a red circle", negative_prompt="blurry", image=latents, strength=strength, **call)
    assert compiles.count == 2  # img2img from latents: with or without denoising_start, one program


def test_compile_call_compiles_and_does_not_run(sd, compiles):
    """`compile_call` gives the program a call would run, compiled and not run (bench/tpu_aot.py reads TPU programs
    this way): its plan, memory and FLOPs; the same call made afterwards runs that program, compiling nothing."""
    call = dict(height=48, width=32, num_inference_steps=3, output_type="np")
    got = sd.compile_call(["a", "b", "c"], "blurry", **call)
    f = sd.vae_scale_factor
    assert (got.plan.mode, got.plan.cfg, got.plan.latent_hw) == ("txt2img", True, (48 // f, 32 // f))
    assert got.plan.batch >= 3 and got.compile_seconds > 0
    cost = got.compiled.cost_analysis()
    assert (cost[0] if isinstance(cost, list) else cost)["flops"] > 0
    assert got.compiled.memory_analysis().temp_size_in_bytes > 0
    assert compiles.count == 1
    images = sd(["a", "b", "c"], "blurry", **call).images
    assert images.shape == (3, 48, 32, 3) and compiles.count == 1  # JAX reuses the executable
