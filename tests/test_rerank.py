"""CLIP reranking against transformers: `preprocess` vs `CLIPImageProcessorPil`, scores vs `CLIPModel`'s
`logits_per_image`, ranking, and the same scores on 8 fake CPU devices. Tiny random model made here (fp32), with
the real 49408-token vocabulary so that the real tokenizer feeds it."""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from sdjax.rerank import CLIPImageProcessorConfig, CLIPReranker, preprocess
from sdjax.tokenizer import PACKAGED

PIXEL_TOL = 1e-5
LOGITS_TOL = 1e-4  # logits are cosine similarities times exp(logit_scale) ~ 50
DEVICE_TOL = 1e-5

PROMPTS = ["a red circle on grass", "a blue square", "a photo of a cat", "", "A Café's neon sign, 3 cats & 2 dogs"]


def _randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            if name == "logit_scale":
                p.fill_(math.log(50.0))  # not the init value, so that reading it is tested
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model.eval()


def _images(seed=0):
    """PIL images of odd sizes and modes: portrait, landscape, smaller than the crop, square, RGBA, L, P."""
    rng = np.random.default_rng(seed)

    def rgb(w, h):
        # smooth gradients plus noise, so that resampling has something to do
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200
        return np.clip(base + rng.integers(0, 56, (h, w, 3)), 0, 255).astype(np.uint8)

    rgba = np.concatenate([rgb(45, 33), rng.integers(0, 256, (33, 45, 1)).astype(np.uint8)], -1)
    return [
        Image.fromarray(rgb(37, 61)),  # portrait
        Image.fromarray(rgb(75, 41)),  # landscape
        Image.fromarray(rgb(13, 9)),  # smaller than the crop
        Image.fromarray(rgb(32, 32)),  # exactly the size
        Image.fromarray(rgba, "RGBA"),
        Image.fromarray(rgb(50, 40)).convert("L"),
        Image.fromarray(rgb(40, 50)).convert("P"),
    ]


def _hf_pixels(processor, images, **kw):
    """transformers' pixel values, NCHW -> NHWC."""
    return np.asarray(processor(images, return_tensors="np", **kw)["pixel_values"]).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, hidden_act="gelu")
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    model = _randomize(transformers.CLIPModel(config), seed=3)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(str(folder), safe_serialization=True)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    transformers.CLIPTokenizer.from_pretrained(str(PACKAGED), local_files_only=True).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def torch_clip(clip_dir):
    return transformers.CLIPModel.from_pretrained(str(clip_dir)).eval()


@pytest.fixture(scope="module")
def reranker(clip_dir):
    return CLIPReranker.from_pretrained(clip_dir)


def _torch_logits(torch_clip, clip_dir, images, prompts):
    """transformers end to end: its image processor and tokenizer, then `CLIPModel(...).logits_per_image`."""
    processor = CLIPImageProcessorPil.from_pretrained(str(clip_dir))
    tok = transformers.CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    enc = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = torch_clip(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
    return out.logits_per_image.numpy().astype(np.float64)  # (images, prompts)


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize("size,crop", [(32, 32), (35, 32), (28, 32), (224, 224)],
                         ids=["size=crop", "crop-offsets", "pad-to-crop", "openai-224"])
def test_preprocess_matches_transformers(size, crop):
    images = _images()
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})
    want = _hf_pixels(processor, images)
    got = preprocess(images, size=size, crop=crop)
    assert got.shape == (len(images), crop, crop, 3) and got.dtype == np.float32
    diff = float(np.abs(got - want).max())
    print(f"size {size} crop {crop}: max diff {diff:.1e}")
    assert diff <= PIXEL_TOL


def test_preprocess_arrays_match_transformers():
    """Float arrays in [0, 1] are what transformers makes of them when told they are already rescaled
    (`do_rescale=False`); uint8 arrays are what it makes of them as they are."""
    rng = np.random.default_rng(1)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    floats = rng.random((3, 40, 52, 3), dtype=np.float32)
    floats[0, :5] = 1.0  # exact ends of the range
    floats[0, 5:9] = 0.0
    got = preprocess(floats, size=32, crop=32)
    want = _hf_pixels(processor, list(floats), do_rescale=False)
    assert float(np.abs(got - want).max()) <= PIXEL_TOL
    uint8 = (rng.random((2, 29, 45, 3)) * 255).astype(np.uint8)
    assert float(np.abs(preprocess(uint8, size=32, crop=32) - _hf_pixels(processor, list(uint8))).max()) <= PIXEL_TOL
    # grey and RGBA arrays: transformers' convert_to_rgb (alpha onto white, in the array's dtype)
    for arr in (rng.random((30, 41, 4), dtype=np.float32), (rng.random((30, 41, 4)) * 255).astype(np.uint8),
                rng.random((37, 41, 1), dtype=np.float32), (rng.random((37, 41, 1)) * 255).astype(np.uint8)):
        kw = {} if arr.dtype == np.uint8 else dict(do_rescale=False)
        diff = float(np.abs(preprocess([arr], size=32, crop=32) - _hf_pixels(processor, [arr], **kw)).max())
        assert diff <= PIXEL_TOL, (arr.dtype, arr.shape, diff)
    # one (H, W, C) array is one image
    assert preprocess(floats[1], size=32, crop=32).shape == (1, 32, 32, 3)


def test_preprocess_bad_inputs():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess(np.full((1, 8, 8, 3), 1.5, np.float32))
    with pytest.raises(ValueError, match="channels-last"):
        preprocess(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="no images"):
        preprocess([])


def test_processor_config_forms(clip_dir, tmp_path):
    assert CLIPImageProcessorConfig.from_pretrained(clip_dir) == CLIPImageProcessorConfig(size=32, crop=(32, 32))
    # old feature-extractor files (openai/clip-vit-base-patch32): bare ints
    old = CLIPImageProcessorConfig.from_dict({"size": 224, "crop_size": 224, "resample": 3,
                                              "feature_extractor_type": "CLIPFeatureExtractor"})
    assert old.size == 224 and old.crop_hw == (224, 224)
    # no file: the vision model's input size
    assert CLIPImageProcessorConfig.from_pretrained(tmp_path, image_size=336).crop_hw == (336, 336)
    with pytest.raises(ValueError, match="do_center_crop"):
        CLIPImageProcessorConfig.from_dict({"do_center_crop": False})


# ----------------------------------------------------------------------------------------------------------------
# Scores


def test_scores_match_transformers_logits(reranker, torch_clip, clip_dir):
    """score(image i, prompt i) is logits_per_image[i, i] of transformers' processor + tokenizer + CLIPModel."""
    images = _images()[:5]
    want = _torch_logits(torch_clip, clip_dir, images, PROMPTS)
    got = reranker.score(images, PROMPTS)
    assert got.shape == (5,) and got.dtype == np.float32
    diff = float(np.abs(got - np.diag(want)).max())
    # the model's own logits_per_image on the same pixels and tokens: the whole matrix
    ids, mask = reranker.tokenizer(PROMPTS)
    full = np.asarray(reranker.model(ids, reranker.preprocess(images), mask).logits_per_image)
    full_diff = float(np.abs(full - want).max())
    print(f"score vs logits_per_image diagonal: {diff:.1e}; full logits_per_image: {full_diff:.1e}")
    assert diff <= LOGITS_TOL and full_diff <= LOGITS_TOL
    assert np.ptp(want) > 1.0  # the scores differ: a mix-up of images or prompts would show


def test_one_prompt_for_all_images(reranker, torch_clip, clip_dir):
    images = _images()
    want = _torch_logits(torch_clip, clip_dir, images, [PROMPTS[2]])[:, 0]
    got = reranker.score(images, PROMPTS[2])
    assert float(np.abs(got - want).max()) <= LOGITS_TOL
    with pytest.raises(ValueError, match="2 prompts for 7 images"):
        reranker.score(images, PROMPTS[:2])


def test_batches_reuse_one_program(reranker):
    """Chunks of 2 (the last one padded) give the scores of one batch; equal shapes compile once."""
    images = _images()[:5]
    whole = reranker.score(images, PROMPTS)
    compiled = reranker._score_fn._cache_size()
    chunked = reranker.score(images, PROMPTS, batch_size=2)
    assert float(np.abs(whole - chunked).max()) <= DEVICE_TOL
    assert reranker._score_fn._cache_size() == compiled + 1  # one more shape (2), however many chunks
    reranker.score(images[:2], PROMPTS[:2])
    assert reranker._score_fn._cache_size() == compiled + 1


def test_rank(reranker):
    images = _images()
    scores = reranker.score(images, "a photo of a cat")
    idx, top = reranker.rank(images, "a photo of a cat", k=3)
    assert idx.tolist() == np.argsort(-scores)[:3].tolist() and idx[0] == int(np.argmax(scores))
    np.testing.assert_array_equal(top, scores[idx])
    assert (np.diff(top) <= 0).all()
    all_idx, _ = reranker.rank(images, "a photo of a cat")
    assert sorted(all_idx.tolist()) == list(range(len(images)))


def test_bfloat16_scores_within_bf16_rounding(clip_dir, reranker):
    """bf16 compute (fp32 weights) against fp32, bounded in two steps. bf16 keeps 8 significant bits (a relative
    step of 2^-8 = 0.39%); the unit text and image embeddings, through 2 layers of LayerNorm/attention/MLP and the
    projection, may move by 2% (about five such steps; measured at most 1.1% text, 0.6% image). A score is
    exp(logit_scale) * cos(text, image) and for unit vectors |cos(t', i') - cos(t, i)| <= |t' - t| + |i' - i|, so
    each score may move by at most 50 * (|dt| + |di|) <= 2.0 (measured 0.19, while the scores span 27.7)."""
    import jax.numpy as jnp

    images, prompts = _images(), PROMPTS + PROMPTS[:2]
    bf16 = CLIPReranker.from_pretrained(clip_dir, dtype=jnp.bfloat16)
    got, want = bf16.score(images, prompts), reranker.score(images, prompts)
    assert got.dtype == np.float32 and np.isfinite(got).all()

    def unit_embeddings(r):
        ids, mask = r.tokenizer(prompts)
        text, image = r.model.get_text_features(ids, mask), r.model.get_image_features(r.preprocess(images))
        return [x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (np.asarray(text, np.float64),
                                                                        np.asarray(image, np.float64))]

    (t16, i16), (t32, i32) = unit_embeddings(bf16), unit_embeddings(reranker)
    dt, di = np.linalg.norm(t16 - t32, axis=-1), np.linalg.norm(i16 - i32, axis=-1)
    scale = float(np.exp(reranker.model.logit_scale.get_value()))
    diff = np.abs(got.astype(np.float64) - want)
    print(f"bfloat16 vs float32: unit embeddings text {dt.max():.4f}, image {di.max():.4f}; scores {diff.max():.3f} "
          f"(scale {scale:.1f}, scores span {np.ptp(want):.1f})")
    assert dt.max() <= 0.02 and di.max() <= 0.02
    assert np.all(diff <= scale * (dt + di) + 1e-4)  # + fp32 rounding of the two score computations
    assert diff.max() <= 2.0 < np.ptp(want)


@pytest.mark.parametrize("k", [0, 8, -1, 2.5, True])
def test_rank_bad_k(reranker, k):
    with pytest.raises(ValueError, match=r"between 1 and the number of images \(7\)") as info:
        reranker.rank(_images(), "a cat", k=k)
    assert "\n" not in str(info.value)


def test_packaged_tokenizer_fallback(clip_dir, tmp_path, reranker):
    """A folder without tokenizer files uses the packaged CLIP tokenizer (the same BPE); no preprocessor file
    means the vision input size."""
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(clip_dir / name)
    bare = CLIPReranker.from_pretrained(tmp_path)
    images = _images()[:3]
    assert float(np.abs(bare.score(images, "a red circle") - reranker.score(images, "a red circle")).max()) == 0.0


def test_crop_must_fit_the_model(clip_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(clip_dir / name)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        tmp_path)
    with pytest.raises(ValueError, match="takes 32x32"):
        CLIPReranker.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Devices


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax
    import sdjax
    from PIL import Image
    assert len(jax.devices()) == 8, jax.devices()
    images = [Image.open(p) for p in sys.argv[3:]]
    r = sdjax.CLIPReranker.from_pretrained(sys.argv[1])
    assert r.mesh.devices.size == 8
    scores = r.score(images, ["a red circle", "a blue square", "a cat", "", "a dog"])
    idx, _ = r.rank(images, "a cat", k=2)
    np.save(sys.argv[2], np.concatenate([scores, idx.astype(np.float32)]))
""")


def test_same_scores_on_8_devices(clip_dir, reranker, tmp_path):
    """5 images on 8 fake CPU devices (padded to 8, cut back) score as on one."""
    images = _images()[:5]
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    prompts = ["a red circle", "a blue square", "a cat", "", "a dog"]
    want = reranker.score([Image.open(p) for p in paths], prompts)
    want_idx, _ = reranker.rank([Image.open(p) for p in paths], "a cat", k=2)
    script = tmp_path / "run.py"
    script.write_text(MULTI_DEVICE_SCRIPT)
    out = tmp_path / "out.npy"
    # the repository first on the path, so the subprocess imports this checkout whether or not it is installed
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=path)
    subprocess.run([sys.executable, str(script), str(clip_dir), str(out), *paths], check=True, env=env, timeout=600)
    got = np.load(out)
    diff = float(np.abs(got[:5] - want).max())
    print(f"8 devices vs 1: {diff:.1e}")
    assert diff <= DEVICE_TOL
    assert got[5:].astype(int).tolist() == want_idx.tolist()
