"""Long prompts and A1111's attention syntax against a reference computed here: A1111's chunking (75 tokens, the
tokenizer's padding, BREAK, comma back-tracking) and "Original" emphasis written in this file over transformers'
PyTorch CLIP, handed to diffusers' pipelines as prompt_embeds / negative_prompt_embeds (fp32, CPU).

The reference's fragments are written out by hand (not parsed by sdjax). diffusers needs a prompt and its negative
at one length: the shorter one's chunks are repeated to the longer's length, which is exactly the attention over
the shorter one alone (every key and value twice: each softmax weight halves, their sum does not change) - the
images sdjax must give by masking its padding chunks. Prompts of different lengths share sdjax's batch; diffusers
runs each alone.
"""
from __future__ import annotations

import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import sdjax  # noqa: E402

from pipeline_fixtures import (TOKENIZER_DIR, a1111_chunks, box_mask, build_pipeline, build_sdxl,  # noqa: E402
                               diffusers_scheduler, nchw, patch_noise, pil_image, run_on_devices, sdjax_noise,
                               smooth_image)
from sdjax.pipelines import noise  # noqa: E402

H, W = 32, 48
LATENT = (H // 2, W // 2, 4)
STEPS = 3
TOL = 5e-4
BREAK = None  # a BREAK fragment of the reference

COLORS = ["red", "green", "blue", "yellow", "white"]
NOUNS = ["tree", "house", "cat", "dog", "sun", "moon", "river"]


def filler(n: int, offset: int = 0) -> str:
    """n comma-separated items of two one-token words (3 tokens each with the comma)."""
    return ", ".join(f"{COLORS[(i + offset) % 5]} {NOUNS[(i + offset) % 7]}" for i in range(n))


FILL_1, FILL_2, FILL_N = filler(33), filler(37, 3), filler(30, 1)
# (sdjax prompt, the reference's fragments)
CASES = [
    ("a (red:1.3) circle on a [blue] background",  # 1 chunk, weights above and below 1
     [("a ", 1.0), ("red", 1.3), (" circle on a ", 1.0), ("blue", 1 / 1.1), (" background", 1.0)]),
    ("a ((green)) big square, " + FILL_1 + ", \\(escaped\\) [[faint]] end",  # 2 chunks, nesting, escapes, commas
     [("a ", 1.0), ("green", 1.1 * 1.1), (" big square, " + FILL_1 + ", (escaped) ", 1.0), ("faint", 1 / 1.1 / 1.1),
      (" end", 1.0)]),
    ("(sky:0.7) over the (sea:1.2) BREAK " + FILL_2,  # 3 chunks: BREAK, then two of the filler
     [("sky", 0.7), (" over the ", 1.0), ("sea", 1.2), BREAK, (FILL_2, 1.0)]),
]
NEGATIVES = [
    ("blurry, [ugly]", [("blurry, ", 1.0), ("ugly", 1 / 1.1)]),
    ("[[blurry]], " + FILL_N, [("blurry", 1 / 1.1 / 1.1), (", " + FILL_N, 1.0)]),  # 2 chunks
    ("(lowres:1.4)", [("lowres", 1.4)]),  # 1 chunk against the prompt's 3
]


# -- the reference: A1111's emphasis written here (its chunking: pipeline_fixtures.a1111_chunks) ----------------


@torch.no_grad()
def ref_embed(encoder, tok, fragments, layer=None):
    """Each chunk through the encoder alone, A1111's "Original" emphasis per chunk, concatenated on tokens;
    pooled (text_embeds) of the first chunk."""
    ids, weights = a1111_chunks(tok, fragments)
    zs, pooled = [], None
    for i in range(len(ids)):
        out = encoder(ids[i:i + 1], output_hidden_states=True)
        z = out.last_hidden_state if layer is None else out.hidden_states[layer]
        if i == 0:
            pooled = getattr(out, "text_embeds", None)
        original = z.mean()
        z = z * weights[i][None, :, None]
        zs.append(z * (original / z.mean()))
    return torch.cat(zs, dim=1), pooled


def same_length(a, b):
    """Repeat the shorter embedding's chunks to the longer's length (exact for attention, see the docstring)."""
    if a.shape[1] < b.shape[1]:
        a = a.repeat(1, b.shape[1] // a.shape[1], 1)
    elif b.shape[1] < a.shape[1]:
        b = b.repeat(1, a.shape[1] // b.shape[1], 1)
    assert a.shape == b.shape
    return a, b


def report(name, ours, theirs):
    diff = float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())
    print(f"{name}: max abs diff {diff:.2e}")
    return diff


# -- SD 1 / SD 2 -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_parity")
    sd2 = build_pipeline(root / "sd2", kind="sd2")
    # SD 2's OpenCLIP tokenizer pads with "!" after the first EOS
    transformers.CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!").save_pretrained(sd2 / "tokenizer")
    return {"sd1": build_pipeline(root / "sd1", kind="sd1"), "sd2": sd2}


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_sd_weighted_long_prompts_match_reference(kind, sd_folders):
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(sd_folders[kind])
    assert (pipe.tokenizer.pad_token_id == 0) == (kind == "sd2")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_folders[kind], safety_checker=None,
                                                           requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    latents = np.random.default_rng(1).standard_normal((3, *LATENT)).astype(np.float32)
    ours = pipe([p for p, _ in CASES], [n for n, _ in NEGATIVES], height=H, width=W, num_inference_steps=STEPS,
                guidance_scale=7.5, sampler="ddim", latents=latents, output_type="np",
                prompt_syntax="a1111").images
    # the cases are what they claim: 1, 2 and 3 chunks, and the 2-chunk one was cut at a comma
    chunks = [a1111_chunks(ref.tokenizer, f)[0] for _, f in CASES]
    assert [len(c) for c in chunks] == [1, 2, 3]
    eos = ref.tokenizer.eos_token_id
    assert chunks[1][0].tolist().index(eos) < 76  # back-tracked: the first chunk is not full
    for i, ((_, fragments), (_, neg)) in enumerate(zip(CASES, NEGATIVES)):
        cond, _ = ref_embed(ref.text_encoder, ref.tokenizer, fragments)
        uncond, _ = ref_embed(ref.text_encoder, ref.tokenizer, neg)
        cond, uncond = same_length(cond, uncond)
        theirs = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, height=H, width=W,
                     num_inference_steps=STEPS, guidance_scale=7.5, latents=nchw(latents[i:i + 1]),
                     output_type="np").images
        assert report(f"{kind} prompt {i}", ours[i:i + 1], theirs) <= TOL


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_sd_img2img_and_inpaint_weighted_long_prompt(mode, sd_folders, monkeypatch):
    """The same conditioning in the other modes (SD 2, mask blending for inpainting): a 2-chunk prompt and a
    1-chunk negative."""
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(sd_folders["sd2"])
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_folders["sd2"], safety_checker=None,
                                                           requires_safety_checker=False)
    (prompt, fragments), (negative, neg_fragments) = CASES[1], NEGATIVES[2]
    kw = dict(image=[pil_image(smooth_image(H, W, 1))], strength=0.75, num_inference_steps=STEPS,
              guidance_scale=5.0, output_type="np")
    if mode == "inpaint":
        kw["mask_image"] = [pil_image(box_mask(H, W)).convert("L")]
    ours = pipe(prompt, negative, sampler="ddim", prompt_syntax="a1111", **kw).images
    klass = diffusers.StableDiffusionImg2ImgPipeline if mode == "img2img" else diffusers.StableDiffusionInpaintPipeline
    dp = klass(**ref.components)
    dp.set_progress_bar_config(disable=True)
    dp.scheduler = diffusers_scheduler("ddim", ref)
    cond, _ = ref_embed(ref.text_encoder, ref.tokenizer, fragments)
    uncond, _ = ref_embed(ref.text_encoder, ref.tokenizer, neg_fragments)
    cond, uncond = same_length(cond, uncond)
    queue = [sdjax_noise(1, LATENT, noise.STREAM_IMAGE_LATENTS), sdjax_noise(1, LATENT)]
    if mode == "inpaint":
        queue.append(sdjax_noise(1, LATENT, noise.STREAM_MASKED_LATENTS))
    patch_noise(monkeypatch, queue)
    extra = dict(height=H, width=W) if mode == "inpaint" else {}
    theirs = dp(prompt_embeds=cond, negative_prompt_embeds=uncond, **kw, **extra).images
    assert report(f"sd2 {mode}", ours, theirs) <= TOL


def test_plain_long_prompt_and_emphasis_none(sd_folders):
    """plain: the text is literal, chunked by 75 tokens without back-tracking; emphasis="none" only multiplies."""
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(sd_folders["sd1"])
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_folders["sd1"], safety_checker=None,
                                                           requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    latents = np.random.default_rng(2).standard_normal((1, *LATENT)).astype(np.float32)
    call = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=7.5, sampler="ddim", latents=latents,
                output_type="np")
    text = "a (red:1.5) " + FILL_1  # 2 chunks
    plain = pipe(text, **call).images
    tok = ref.tokenizer
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert 77 < len(ids) <= 151
    with torch.no_grad():
        first = torch.tensor([ids[:76] + [tok.eos_token_id]])
        rest = ids[76:] + [tok.eos_token_id]
        second = torch.tensor([[tok.bos_token_id] + rest + [tok.pad_token_id] * (76 - len(rest))])
        cond = torch.cat([ref.text_encoder(first)[0], ref.text_encoder(second)[0]], dim=1)
        empty = ref.text_encoder(tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
    cond, uncond = same_length(cond, empty)
    theirs = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=nchw(latents),
                 **{k: v for k, v in call.items() if k not in ("sampler", "latents")}).images
    assert report("plain 2 chunks", plain, theirs) <= TOL

    none = pipe("a (red:3) circle", emphasis="none", prompt_syntax="a1111", **call).images
    ids, weights = a1111_chunks(tok, [("a ", 1.0), ("red", 3.0), (" circle", 1.0)])
    with torch.no_grad():
        cond = ref.text_encoder(ids)[0] * weights[:, :, None]
    theirs = ref(prompt_embeds=cond, negative_prompt_embeds=empty, latents=nchw(latents),
                 **{k: v for k, v in call.items() if k not in ("sampler", "latents")}).images
    assert report("emphasis none", none, theirs) <= TOL
    # the weights do matter: the same prompt read plainly is far from it
    assert report("unweighted vs weighted", pipe("a red circle", **call).images, none) > 10 * TOL


def test_batch_does_not_change_an_image(sd_folders):
    """A short prompt alone and next to a 3-chunk prompt (its padding chunks masked), prompt and negative of
    different lengths: the same image. 2 steps at guidance 3: this random model amplifies float rounding, and a
    batch of two rounds its sums differently from a batch of one (two 1-chunk prompts, no mask: 1.1e-5 apart at 3
    steps and guidance 7.5); here that stays near 4e-6, while unmasked padding chunks move the image by ~3e-2."""
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(sd_folders["sd1"])
    call = dict(height=H, width=W, num_inference_steps=2, guidance_scale=3.0, output_type="np",
                prompt_syntax="a1111", seed=11)
    short, negative = CASES[0][0], NEGATIVES[0][0]
    alone = pipe(short, negative_prompt=negative, **call).images
    shared = pipe([short, CASES[2][0]], negative_prompt=[negative, NEGATIVES[1][0]], **call).images
    assert report("alone vs batched", alone[0], shared[0]) <= 1e-5
    # what the padding would do unmasked: the same two empty chunks, made real by BREAKs
    unmasked = pipe(short + " BREAK BREAK", negative_prompt=negative, **call).images
    assert report("padding chunks unmasked", alone[0], unmasked[0]) > 100 * 1e-5


DEVICES_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax
    import sdjax
    from test_prompt_parity import CASES, NEGATIVES
    assert len(jax.devices()) == int(sys.argv[3]), jax.devices()
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(sys.argv[1])
    out = pipe([p for p, _ in CASES], [n for n, _ in NEGATIVES], height=32, width=48, num_inference_steps=2,
               guidance_scale=3.0, seed=5, output_type="np", prompt_syntax="a1111").images
    np.save(sys.argv[2], out)
""")


def test_mixed_lengths_on_1_and_8_devices(sd_folders, tmp_path, monkeypatch):
    """Prompts of 1, 2 and 3 chunks (ids, weights and masks sharded over the batch, padded to 8 rows): the same
    images on 1 and 8 fake CPU devices (float rounding of the per-device batch aside, see
    test_pipeline.test_device_count_changes_only_rounding_on_a_wide_model)."""
    from pathlib import Path

    monkeypatch.setenv("PYTHONPATH", f"{Path(__file__).parent}:{__import__('os').environ.get('PYTHONPATH', '')}")
    results = run_on_devices(tmp_path, DEVICES_SCRIPT, sd_folders["sd1"])
    assert results[1].shape == (3, H, W, 3)
    assert report("1 vs 8 devices", results[1], results[8]) <= 1e-5


# -- SDXL --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("prompt_parity_xl") / "base")


def test_sdxl_weighted_long_prompts_match_reference(sdxl_folder):
    pipe = sdjax.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(1).standard_normal((3, *LATENT)).astype(np.float32)
    call = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np")
    ours = pipe([p for p, _ in CASES], [n for n, _ in NEGATIVES], sampler="euler", latents=latents,
                prompt_syntax="a1111", **call).images

    def embed(fragments):
        a, _ = ref_embed(ref.text_encoder, ref.tokenizer, fragments, layer=-2)
        b, pooled = ref_embed(ref.text_encoder_2, ref.tokenizer_2, fragments, layer=-2)
        return torch.cat([a, b], dim=-1), pooled

    assert ref.tokenizer_2.pad_token == "!"
    for i, ((_, fragments), (_, neg)) in enumerate(zip(CASES, NEGATIVES)):
        cond, pooled = embed(fragments)
        uncond, neg_pooled = embed(neg)
        cond, uncond = same_length(cond, uncond)
        theirs = ref(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
                     negative_pooled_prompt_embeds=neg_pooled, latents=nchw(latents[i:i + 1]), **call).images
        assert report(f"sdxl prompt {i}", ours[i:i + 1], theirs) <= TOL


def test_sdxl_long_prompt_zero_negatives(sdxl_folder):
    """No negative prompt on the SDXL base: zero negative embeddings as long as the prompt's (their padding does
    not matter: zero keys and values)."""
    pipe = sdjax.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(4).standard_normal((1, *LATENT)).astype(np.float32)
    call = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np")
    prompt, fragments = CASES[1]
    ours = pipe(prompt, sampler="euler", latents=latents, prompt_syntax="a1111", **call).images
    a, _ = ref_embed(ref.text_encoder, ref.tokenizer, fragments, layer=-2)
    b, pooled = ref_embed(ref.text_encoder_2, ref.tokenizer_2, fragments, layer=-2)
    theirs = ref(prompt_embeds=torch.cat([a, b], dim=-1), pooled_prompt_embeds=pooled, latents=nchw(latents),
                 **call).images
    assert report("sdxl zero negatives, 2 chunks", ours, theirs) <= TOL


def test_sdxl_refiner_long_weighted_prompt(tmp_path_factory, monkeypatch):
    """The refiner (text_encoder_2 alone) reads the syntax and the chunks as the base does."""
    folder = build_sdxl(tmp_path_factory.mktemp("prompt_parity_refiner") / "refiner", refiner=True, seed=1)
    pipe = sdjax.StableDiffusionXLPipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    (prompt, fragments), (negative, neg_fragments) = CASES[2], NEGATIVES[0]
    kw = dict(image=[pil_image(smooth_image(H, W, 0))], strength=0.6, num_inference_steps=STEPS,
              guidance_scale=6.0, output_type="np", aesthetic_score=7.0)
    ours = pipe(prompt, negative, sampler="euler", prompt_syntax="a1111", **kw).images
    cond, pooled = ref_embed(ref.text_encoder_2, ref.tokenizer_2, fragments, layer=-2)
    uncond, neg_pooled = ref_embed(ref.text_encoder_2, ref.tokenizer_2, neg_fragments, layer=-2)
    cond, uncond = same_length(cond, uncond)
    ref.scheduler = diffusers_scheduler("euler", ref)
    patch_noise(monkeypatch, [sdjax_noise(1, LATENT, noise.STREAM_IMAGE_LATENTS), sdjax_noise(1, LATENT)])
    theirs = ref(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
                 negative_pooled_prompt_embeds=neg_pooled, **kw).images
    assert report("sdxl refiner, 3 chunks", ours, theirs) <= TOL
