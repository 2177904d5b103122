"""The x4 upscaler against diffusers' `StableDiffusionUpscalePipeline` on a tiny random model (fp32, CPU), its tiled
mode, and `sdjax upscale`.

Both sides get the same weights and the same random numbers: sdjax's initial latents go in as diffusers'
`latents=`, and diffusers' `randn_tensor` is patched to hand out, in call order, the low-res image noise and the
sampler noise that sdjax draws.
"""
from __future__ import annotations

import types

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

import sdjax  # noqa: E402
from sdjax import cli  # noqa: E402
from sdjax.pipelines import noise  # noqa: E402
from sdjax.pipelines import upscale as up  # noqa: E402
from sdjax.bulk import SAMPLE_NAME  # noqa: E402

from pipeline_fixtures import (build_upscaler, diffusers_scheduler, nchw, patch_noise, pil_image,  # noqa: E402
                               quick_compiles, run_on_devices, sdjax_noise, smooth_image)

h, w = 16, 24  # low-res size (non-square); output 64x96
STEPS = 4
TOL = 5e-4
PROMPTS = ["a red circle on a blue background", "a green square"]
NEGATIVES = ["blurry", "a yellow triangle"]

_quick_compiles = pytest.fixture(scope="module", autouse=True)(quick_compiles)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_upscaler(tmp_path_factory.mktemp("upscaler") / "tiny_x4")


@pytest.fixture(scope="module")
def pipe(folder):
    return sdjax.StableDiffusionUpscalePipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def ref(folder):
    p = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


LOW = [pil_image(smooth_image(h, w, 0)), pil_image(smooth_image(h, w, 3))]


def step_noises(n, seed=0):
    """The sampler noise sdjax draws at each call index (stochastic samplers; diffusers asks once per step)."""
    return [sdjax_noise(n, (h, w, 4), noise.STREAM_STEP + i, seed) for i in range(4 * STEPS + 2)]


def run_both(pipe, ref, monkeypatch, *, sampler, prompts, negatives=None, scale=7.5, noise_level=20,
             seed=0):
    """(sdjax images, diffusers images) of one call: diffusers gets the noise sdjax draws for the seed (initial
    latents, low-res noise, sampler noise), and must ask for exactly the low-res and sampler noise."""
    n = len(prompts)
    latents, low_res_noise = pipe.default_noise(h, w, seed=seed, num_prompts=n)
    ours = pipe(prompts, LOW[:n], negatives, num_inference_steps=STEPS, guidance_scale=scale,
                noise_level=noise_level, sampler=sampler, seed=seed, output_type="np").images
    ref.scheduler = diffusers_scheduler(sampler, ref)
    queue = patch_noise(monkeypatch, [low_res_noise] + step_noises(n, seed))
    theirs = ref(prompts, LOW[:n], num_inference_steps=STEPS, guidance_scale=scale, noise_level=noise_level,
                 negative_prompt=negatives, latents=nchw(latents), output_type="np").images
    assert len(queue.arrays) == 4 * STEPS + 2 - (STEPS if sampler in ("euler_a", "ddpm") else 0)
    return ours, theirs


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "euler_a"])
def test_matches_diffusers(sampler, pipe, ref, monkeypatch):
    ours, theirs = run_both(pipe, ref, monkeypatch, sampler=sampler, prompts=PROMPTS[:1])
    assert ours.shape == theirs.shape == (1, 4 * h, 4 * w, 3)
    diff = np.abs(ours - theirs).max()
    print(f"{sampler}: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_matches_diffusers_with_xla_default_optimisations(folder, ref, monkeypatch, xla_default_optimisations):
    """The module compiles with most XLA optimisations off (quick_compiles); here a new pipeline, so a program
    compiled anew, with XLA's defaults (LLVM's optimisations vectorise and contract multiply-adds, which moves
    float32 rounding), within the same tolerance. Measured 1.5e-5 to 1.7e-5 (1.3e-5 with them off)."""
    fresh = sdjax.StableDiffusionUpscalePipeline.from_pretrained(folder)
    ours, theirs = run_both(fresh, ref, monkeypatch, sampler="ddim", prompts=PROMPTS[:1])
    diff = np.abs(ours - theirs).max()
    print(f"XLA default optimisations, ddim: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_guidance_negative_prompts_and_noise_level(pipe, ref, monkeypatch):
    """Two prompts with their own images and negative prompts, a high noise level; and the inputs matter: another
    low-res noise, noise level or no negative prompts move the images far beyond the tolerance (measured: max
    0.51, 0.35, 0.042)."""
    ours, theirs = run_both(pipe, ref, monkeypatch, sampler="dpmpp_2m", prompts=PROMPTS,
                            negatives=NEGATIVES, scale=6.0, noise_level=150)
    assert ours.shape == (2, 4 * h, 4 * w, 3)
    diff = np.abs(ours - theirs).max()
    print(f"two prompts, negatives, noise level 150: max abs diff {diff:.2e}")
    assert diff <= TOL
    call = dict(num_inference_steps=STEPS, guidance_scale=6.0, sampler="dpmpp_2m", output_type="np")
    other_noise = pipe(PROMPTS, LOW, NEGATIVES, noise_level=150, seed=1, latents=pipe.default_noise(h, w, 0, 2)[0],
                       **call).images
    other_level = pipe(PROMPTS, LOW, NEGATIVES, noise_level=20, **call).images
    no_negative = pipe(PROMPTS, LOW, noise_level=150, **call).images
    for other in (other_noise, other_level, no_negative):
        assert np.abs(other - ours).max() > 20 * TOL


def test_without_guidance_and_latent_output(pipe, ref, monkeypatch):
    latents, noise = pipe.default_noise(h, w, seed=3)
    ours = pipe(PROMPTS[0], LOW[0], num_inference_steps=STEPS, guidance_scale=1.0, seed=3,
                output_type="latent").images
    ref.scheduler = diffusers_scheduler("ddim", ref)
    patch_noise(monkeypatch, [noise])
    theirs = ref(PROMPTS[0], LOW[0], num_inference_steps=STEPS, guidance_scale=1.0, latents=nchw(latents),
                 output_type="latent").images
    assert ours.shape == (1, h, w, 4)
    assert np.abs(ours - theirs.numpy().transpose(0, 2, 3, 1)).max() <= 1e-4


def test_images_per_prompt_share_injected_noise_as_diffusers(pipe, ref, monkeypatch):
    """diffusers draws the low-res noise once per prompt; given one (1, h, w, 3) array, sdjax uses it for every
    image too. PIL input whose size is not a multiple of 4 is resized (bicubic) as diffusers does."""
    odd = pil_image(smooth_image(h + 3, w + 2, 5))
    noise = np.random.default_rng(7).standard_normal((1, h, w, 3)).astype(np.float32)
    latents = np.random.default_rng(8).standard_normal((2, h, w, 4)).astype(np.float32)
    ours = pipe(PROMPTS[1], odd, num_inference_steps=STEPS, guidance_scale=5.0, num_images_per_prompt=2,
                sampler="euler", latents=latents, low_res_noise=noise, output_type="np").images
    ref.scheduler = diffusers_scheduler("euler", ref)
    patch_noise(monkeypatch, [noise])
    theirs = ref(PROMPTS[1], odd, num_inference_steps=STEPS, guidance_scale=5.0, num_images_per_prompt=2,
                 latents=nchw(latents), output_type="np").images
    assert ours.shape == (2, 4 * h, 4 * w, 3)
    assert np.abs(ours - theirs).max() <= TOL


def test_clip_skip_matches_diffusers(pipe, ref, monkeypatch):
    noise = np.random.default_rng(11).standard_normal((2, h, w, 3)).astype(np.float32)
    latents = np.random.default_rng(12).standard_normal((2, h, w, 4)).astype(np.float32)
    kw = dict(num_inference_steps=STEPS, guidance_scale=5.0, output_type="np", clip_skip=1)
    ours = pipe(PROMPTS, LOW, NEGATIVES, sampler="ddim", latents=latents, low_res_noise=noise, **kw).images
    ref.scheduler = diffusers_scheduler("ddim", ref)
    patch_noise(monkeypatch, [noise])
    te = ref.text_encoder  # diffusers reaches text_model.final_layer_norm; transformers 5 has it at the top
    monkeypatch.setattr(te, "text_model", types.SimpleNamespace(final_layer_norm=te.final_layer_norm), raising=False)
    theirs = ref(PROMPTS, LOW, negative_prompt=NEGATIVES, latents=nchw(latents), **kw).images
    assert np.abs(ours - theirs).max() <= TOL


def test_loads_as_stable_diffusion_pipeline(folder, pipe):
    loaded = sdjax.StableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(loaded, sdjax.StableDiffusionUpscalePipeline)
    assert loaded.max_noise_level == 350 and loaded.vae.config.scaling_factor == 0.08333
    assert loaded.vae_scale_factor == 4


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(noise_level=351), "noise_level"),
        (dict(noise_level=-1), "noise_level"),
        (dict(noise_level=2.5), "noise_level"),
        (dict(image=np.zeros((18, 24, 3), np.float32)), "multiples of 4"),
        (dict(latents=np.zeros((1, 8, 8, 4), np.float32)), "latents"),
        (dict(low_res_noise=np.zeros((1, h, w, 4), np.float32)), "low_res_noise"),
        (dict(tile_size=4), "tile_size"),
        (dict(tile_size=16, tile_overlap=16), "tile_overlap"),
        (dict(tile_overlap=4), "tile_overlap needs tile_size"),
        (dict(sampler="nope"), "nope"),
    ],
)
def test_bad_input_raises_one_line_value_error(pipe, kwargs, words):
    call = dict(prompt=PROMPTS[0], image=LOW[0], num_inference_steps=2)
    call.update(kwargs)
    with pytest.raises(ValueError) as e:
        pipe(**call)
    assert words in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# Tiles

BIG = (40, 56)  # low-res; tiles of 24 overlapping by >= 8 (or 6): rows start at 0, 16; columns at 0, 16, 32
TILE, TILE_STARTS = 24, ((0, 16), (0, 16, 32))
# DDIM is deterministic, so a tile's own step-noise key (multi-tile runs draw one per tile) changes nothing and a
# tile equals an ordinary untiled call on its crop
TILE_CALL = dict(num_inference_steps=STEPS, guidance_scale=5.0, sampler="ddim", seed=2, output_type="np")


def test_tile_layout():
    assert up.tile_starts(40, 24, 8) == ([0, 16], 24)
    assert up.tile_starts(56, 24, 8) == ([0, 16, 32], 24)
    assert up.tile_starts(16, 24, 8) == ([0], 16)
    assert up.tile_starts(512, 128, 32) == ([0, 96, 192, 288, 384], 128)
    starts, tile = up.tile_starts(500, 128, 32)
    assert starts[0] == 0 and starts[-1] + tile == 500
    assert min(a + tile - b for a, b in zip(starts, starts[1:])) >= 32


@pytest.fixture(scope="module")
def big_tiles(pipe):
    """(the 40x56 low-res image, {(y, x): the untiled upscale (96, 96, 3) of its 24x24 crop at (y, x)}, overlap ->
    the tiled upscale), all through the public call; each crop gets its crop of the full-size latents and low-res
    noise, as tiling crops them."""
    big = smooth_image(*BIG, seed=9)
    latents, noise = pipe.default_noise(*BIG, seed=TILE_CALL["seed"])
    tiles = {}
    for y in TILE_STARTS[0]:
        for x in TILE_STARTS[1]:
            crop = (slice(None), slice(y, y + TILE), slice(x, x + TILE))
            tiles[y, x] = pipe(PROMPTS[0], big[y:y + TILE, x:x + TILE], latents=latents[crop],
                               low_res_noise=noise[crop], **TILE_CALL).images[0]
    cache = {}

    def tiled(overlap):
        if overlap not in cache:
            cache[overlap] = pipe(PROMPTS[0], big, tile_size=TILE, tile_overlap=overlap, **TILE_CALL).images[0]
        return cache[overlap]

    return big, tiles, tiled


def feathered_blend(tiles, overlap, f=4):
    """The documented blend, written out per pixel in float64: each output pixel is the weighted mean of the tiles
    covering it; a tile's weight is the product over both axes of min(1, (d + 0.5) / (f * overlap)), d the pixel's
    distance from the nearest tile edge that lies inside the image (weight 1 along an axis with no such edge)."""
    size = (f * BIG[0], f * BIG[1])
    total = np.zeros(size + (3,))
    weights = np.zeros(size + (1,))
    ramp = f * overlap
    for (y, x), out in tiles.items():
        w = np.ones(out.shape[:2] + (1,))
        for axis, start, length in ((0, y, BIG[0]), (1, x, BIG[1])):
            n = f * TILE
            inner = []  # edges (as the pixel index just inside them) shared with a neighbour
            if start > 0:
                inner.append(0)
            if start + TILE < length:
                inner.append(n - 1)
            for i in range(n):
                d = min((abs(i - e) for e in inner), default=None)
                if d is not None:
                    index = (i, slice(None)) if axis == 0 else (slice(None), i)
                    w[index] *= min(1.0, (d + 0.5) / ramp)
        region = (slice(f * y, f * (y + TILE)), slice(f * x, f * (x + TILE)))
        total[region] += w * out
        weights[region] += w
    assert weights.min() > 0  # the tiles cover the image
    return total / weights


@pytest.mark.parametrize("overlap", [8, 6])
def test_tiles_are_a_feathered_blend_of_crop_upscales(big_tiles, overlap):
    """A 40x56 image in 2x3 tiles of 24: the tiled upscale is, to float32 rounding, the blend written out in the
    test of the untiled upscales of the six crops. overlap 8: neighbours overlap by exactly the ramp (the weights
    of two tiles sum to 1); overlap 6: the same tiles overlap by 8 with ramps of 6, so the division by the weight
    sum matters. Tiles differ in every overlap by far more than the tolerance (checked), so a weight or offset off
    by one pixel would show (one ramp step of 1/32 x a difference >= 0.05 is >= 1.5e-3)."""
    _, tiles, tiled = big_tiles
    out = tiled(overlap)
    assert out.shape == (4 * BIG[0], 4 * BIG[1], 3)
    for (y, x), a in tiles.items():  # neighbours right and below: their overlap strip, 4 * 8 output pixels wide
        for dy, dx in ((0, 16), (16, 0)):
            b = tiles.get((y + dy, x + dx))
            if b is not None:
                strip = (slice(4 * dy, None), slice(4 * dx, None))
                assert np.abs(a[strip] - b[:a.shape[0] - 4 * dy, :a.shape[1] - 4 * dx]).max() >= 0.05
    want = feathered_blend(tiles, overlap)
    diff = np.abs(out - want).max()
    print(f"overlap {overlap}: tiled vs blend of crop upscales: max {diff:.2e}")
    assert diff <= 1e-6  # float32 accumulation of at most 4 weighted values in [0, 1]


def seam_score(image):
    """How much the strongest row or column step of (H, W, 3) stands out: the largest mean |difference| of
    neighbouring rows (columns) over the median one. A tile pasted without blending leaves a step at its edge."""
    scores = []
    for axis in (0, 1):
        steps = np.abs(np.diff(image, axis=axis)).mean(axis=(1 - axis, 2))
        scores.append(steps.max() / np.median(steps))
    return max(scores)


def test_tiled_is_close_to_untiled_without_seams(pipe, big_tiles):
    """Sanity bounds against the untiled upscale, which tiling does not reproduce exactly: on this random model
    every output pixel depends on the whole tile (GroupNorm statistics and self-attention span the tile, not the
    image), so a tile is not the untiled image's crop. Measured: tiled vs untiled mean 0.067, max 0.60, while the
    untiled upscale with other noise (seed 3) is mean 0.26 away: the tiled result is the same image, not an
    unrelated one. Seams: the seam score of the tiled upscale stays at the untiled one's (measured 1.30 vs 1.31),
    while the same tiles pasted without blending score 1.75."""
    big, tiles, tiled = big_tiles
    tiled = tiled(8)
    pasted = np.zeros_like(tiled)
    for (y, x), out in tiles.items():
        pasted[4 * y:4 * (y + TILE), 4 * x:4 * (x + TILE)] = out
    whole = pipe(PROMPTS[0], big, **TILE_CALL).images[0]
    other = pipe(PROMPTS[0], big, **dict(TILE_CALL, seed=3)).images[0]
    scores = {name: seam_score(im) for name, im in (("untiled", whole), ("tiled", tiled), ("pasted", pasted))}
    diff, unrelated = np.abs(tiled - whole), np.abs(other - whole).mean()
    print(f"seam scores {scores}; tiled vs untiled: max {diff.max():.4f}, mean {diff.mean():.5f}; "
          f"other noise vs untiled: mean {unrelated:.5f}")
    assert scores["pasted"] >= scores["untiled"] + 0.3  # the score sees a seam where there is one
    assert scores["tiled"] <= scores["untiled"] + 0.1
    assert diff.mean() <= 0.1 and diff.mean() <= 0.5 * unrelated


MULTI_DEVICE_SCRIPT = """
import sys, numpy as np, jax
import sdjax
from pipeline_fixtures import smooth_image
assert len(jax.devices()) == int(sys.argv[4]), jax.devices()
pipe = sdjax.StableDiffusionUpscalePipeline.from_pretrained(sys.argv[1])
out = pipe(["a red circle", "a blue square", "a white triangle"], smooth_image(16, 40, 1), ["", "dark", ""],
           num_inference_steps=2, guidance_scale=5.0, sampler=sys.argv[2], num_images_per_prompt=2, seed=3,
           tile_size=16, output_type="np").images
np.save(sys.argv[3], out)
"""


def test_same_images_on_1_and_8_devices(folder, tmp_path, monkeypatch):
    """6 images (padded to 8) in 3 tiles, with a stochastic sampler: the same images on 8 fake CPU devices as on
    1, up to float32 rounding amplified by the wide weights (measured 1.0e-5; see test_pipeline's device-count
    tests). A fault in padding, per-image inputs or the tiles' keys would differ by O(0.1)."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent), prepend=":")
    results = run_on_devices(tmp_path, MULTI_DEVICE_SCRIPT, folder, "euler_a")
    assert results[1].shape == (6, 64, 160, 3)
    assert np.abs(results[1] - results[8]).max() <= 1e-4


# ----------------------------------------------------------------------------------------------------------------
# sdjax upscale


def test_cli_upscale_files_metadata_manifest(folder, pipe, tmp_path):
    low = tmp_path / "low.png"
    LOW[0].save(low)
    out = tmp_path / "out"
    args = ["upscale", "--init-img", str(low), "--prompt", PROMPTS[0], "--ckpt", str(folder), "--outdir", str(out),
            "--ddim_steps", "2", "--scale", "5", "--seed", "7", "--noise-level", "30", "--n_samples", "2",
            "--sampler", "euler"]
    assert cli.main(args) == 0
    files = sorted(p for p in (out / "samples").iterdir() if SAMPLE_NAME.match(p.name))
    assert [p.name for p in files] == ["00000.png", "00001.png"]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["samples/00000.png", "samples/00001.png"]
    assert records[0]["noise_level"] == 30 and records[0]["mode"] == "upscale"
    im = Image.open(files[0])
    assert im.size == (4 * w, 4 * h)
    lines = im.text["parameters"].split("\n")
    assert lines[0] == PROMPTS[0]
    assert lines[2].startswith("Steps: 2, Sampler: euler, CFG scale: 5.0, Seed: 7, Size: 96x64, Model: tiny_x4")
    assert "Noise level: 30" in lines[2]
    # the saved image is the library's upscale with the same settings; the default tile is the UNet's sample_size
    # (16 here), so this 16x24 image went through in two tiles
    again = pipe(PROMPTS[0], LOW[0], num_inference_steps=2, guidance_scale=5.0, noise_level=30, sampler="euler",
                 seed=[7], num_images_per_prompt=2, tile_size=16, output_type="pil").images
    assert np.array_equal(np.asarray(im), np.asarray(again[0]))
    # a second run numbers after the first, never overwriting
    assert cli.main(args + ["--n_samples", "1"]) == 0
    assert len(list((out / "samples").glob("*.png"))) == 3


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--init-img", "missing.png"], "no such file"),
        (["--init-img", "NOT_AN_IMAGE"], "not an image"),
        (["--noise-level", "-3"], "--noise-level"),
        (["--noise-level", "1000"], "noise_level"),
        (["--noise-level", "x"], "invalid int"),
        (["--tile-size", "2"], "--tile-size"),
        (["--ddim_steps", "0"], "--ddim_steps"),
        (["--no-ckpt"], "--ckpt"),
    ],
)
def test_cli_upscale_bad_input_is_one_line_exit_2(folder, tmp_path, capsys, extra, words):
    low = tmp_path / "low.png"
    LOW[0].save(low)
    text = tmp_path / "text.png"
    text.write_text("hello")
    args = ["upscale", "--init-img", str(low), "--prompt", "x", "--ckpt", str(folder), "--outdir",
            str(tmp_path / "out"), "--ddim_steps", "1"]
    if extra == ["--no-ckpt"]:
        i = args.index("--ckpt")
        del args[i:i + 2]
        extra = []
    extra = [str(text) if e == "NOT_AN_IMAGE" else str(tmp_path / e) if e == "missing.png" else e for e in extra]
    assert cli.main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdjax: error:") and "\n" not in err and words in err, err
    assert "Traceback" not in err


def test_cli_txt2img_with_an_upscaler_points_to_upscale(folder, tmp_path, capsys):
    assert cli.main(["txt2img", "--prompt", "x", "--ckpt", str(folder), "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "x4 upscaler: use sdjax upscale" in err and "\n" not in err


def test_weighted_long_prompt_matches_reference(pipe, ref, monkeypatch):
    """prompt_syntax="a1111" on the upscaler: a 2-chunk weighted prompt and a 1-chunk negative, against A1111's
    chunking and emphasis computed over transformers' CLIP (test_prompt_parity) handed to diffusers as embeddings."""
    from test_prompt_parity import CASES, NEGATIVES as A1111_NEGATIVES, ref_embed, same_length

    (prompt, fragments), (negative, neg_fragments) = CASES[1], A1111_NEGATIVES[0]
    latents, low_res_noise = pipe.default_noise(h, w, seed=0, num_prompts=1)
    ours = pipe(prompt, LOW[:1], negative, num_inference_steps=STEPS, guidance_scale=7.5, sampler="ddim",
                output_type="np", prompt_syntax="a1111").images
    cond, _ = ref_embed(ref.text_encoder, ref.tokenizer, fragments)
    uncond, _ = ref_embed(ref.text_encoder, ref.tokenizer, neg_fragments)
    cond, uncond = same_length(cond, uncond)
    ref.scheduler = diffusers_scheduler("ddim", ref)
    patch_noise(monkeypatch, [low_res_noise] + step_noises(1))
    theirs = ref(image=LOW[:1], prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS,
                 guidance_scale=7.5, latents=nchw(latents), output_type="np").images
    diff = np.abs(ours - theirs).max()
    print(f"a1111 2-chunk prompt: max abs diff {diff:.2e}")
    assert diff <= TOL
