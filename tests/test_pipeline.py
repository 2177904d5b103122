"""End-to-end parity of sdjax's pipeline with diffusers' SD pipelines on tiny random models (fp32, CPU).

Both sides get the same weights and the same random numbers: diffusers' `randn_tensor` is patched to hand out, in
call order, the noise sdjax draws for each image (initial noise, VAE posterior samples, sampler noise).
"""
from __future__ import annotations

import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

import sdjax  # noqa: E402
from sdjax.pipelines import noise  # noqa: E402
from sdjax import samplers  # noqa: E402

from pipeline_fixtures import (box_mask, build_pipeline, diffusers_scheduler, patch_noise, pil_image,  # noqa: E402
                               run_on_devices, sdjax_noise, smooth_image)

H, W = 32, 48  # non-square; the tiny VAE has factor 2, so latents are 16x24
PROMPTS = ["a red circle on a blue background", "a green square"]
NEGATIVES = ["blurry", "a yellow triangle"]
STEPS = 4
TOL = 5e-4



@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {
        "sd1": build_pipeline(root / "sd1", kind="sd1"),
        "sd2": build_pipeline(root / "sd2", kind="sd2"),
        "sd1_inpaint": build_pipeline(root / "sd1_inpaint", kind="sd1", unet_in_channels=9),
    }


@pytest.fixture(scope="module")
def pipes(folders):
    return {k: sdjax.StableDiffusionPipeline.from_pretrained(v) for k, v in folders.items()}


@pytest.fixture(scope="module")
def refs(folders):
    out = {}
    for k, v in folders.items():
        p = diffusers.StableDiffusionPipeline.from_pretrained(v, safety_checker=None, requires_safety_checker=False)
        p.set_progress_bar_config(disable=True)
        out[k] = p
    return out


def step_noises(sampler, start, n_prompts, latent_shape, seed=0):
    """The sampler noise sdjax draws at each call index (diffusers asks for it once per step)."""
    return [sdjax_noise(n_prompts, latent_shape, noise.STREAM_STEP + i, seed) for i in range(start, 4 * STEPS + 2)]


LATENT = (H // 2, W // 2, 4)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_txt2img_matches_diffusers(kind, sampler, pipes, refs, monkeypatch):
    pipe, ref = pipes[kind], refs[kind]
    latents = np.random.default_rng(1).standard_normal((2, *LATENT)).astype(np.float32)
    ours = pipe(PROMPTS, NEGATIVES, height=H, width=W, num_inference_steps=STEPS, guidance_scale=7.5,
                sampler=sampler, latents=latents, output_type="np").images
    ref.scheduler = diffusers_scheduler(sampler, ref)
    patch_noise(monkeypatch, step_noises(sampler, 0, 2, LATENT))
    theirs = ref(PROMPTS, negative_prompt=NEGATIVES, height=H, width=W, num_inference_steps=STEPS,
                 guidance_scale=7.5, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                 output_type="np").images
    assert ours.shape == theirs.shape == (2, H, W, 3)
    assert np.abs(ours - theirs).max() <= TOL





def clip_skip_in_transformers_5(ref, monkeypatch):
    """diffusers' clip_skip reaches the final layer norm as `text_encoder.text_model.final_layer_norm`; transformers
    5's CLIPTextModel has it at the top (no `text_model`): point diffusers' path at it."""
    import types

    te = ref.text_encoder
    if not hasattr(te, "text_model"):
        monkeypatch.setattr(te, "text_model", types.SimpleNamespace(final_layer_norm=te.final_layer_norm),
                            raising=False)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_clip_skip_matches_diffusers(kind, pipes, refs, monkeypatch):
    """diffusers' clip_skip=1 (A1111's "Clip skip: 2"): the prompt read from the text encoder's penultimate layer
    through its final layer norm; it moves the image; past the encoder's layers is one line."""
    pipe, ref = pipes[kind], refs[kind]
    clip_skip_in_transformers_5(ref, monkeypatch)
    latents = np.random.default_rng(4).standard_normal((2, *LATENT)).astype(np.float32)
    kw = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=7.5, output_type="np")
    ours = pipe(PROMPTS, NEGATIVES, sampler="ddim", latents=latents, clip_skip=1, **kw).images
    ref.scheduler = diffusers_scheduler("ddim", ref)
    theirs = ref(PROMPTS, negative_prompt=NEGATIVES, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                 clip_skip=1, **kw).images
    assert np.abs(ours - theirs).max() <= TOL
    plain = pipe(PROMPTS, NEGATIVES, sampler="ddim", latents=latents, clip_skip=0, **kw).images
    assert np.abs(plain - ours).max() > 0.02
    # negative_clip_skip (A1111 skips on both sides): diffusers given the negatives read the same way
    both = pipe(PROMPTS, NEGATIVES, sampler="ddim", latents=latents, clip_skip=1, negative_clip_skip=1, **kw).images
    ids = ref.tokenizer(NEGATIVES, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        te = ref.text_encoder
        negative = te.final_layer_norm(te(ids.input_ids, output_hidden_states=True).hidden_states[-2])
    theirs = ref(PROMPTS, negative_prompt_embeds=negative, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                 clip_skip=1, **kw).images
    assert np.abs(both - theirs).max() <= TOL and np.abs(both - ours).max() > 0.02
    with pytest.raises(ValueError, match="clip_skip must be an integer from 0 to 1 for this model's text encoder, "
                                         "got 2"):
        pipe(PROMPTS, clip_skip=2, **kw)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_img2img_matches_diffusers(kind, sampler, pipes, refs, monkeypatch):
    pipe, ref = pipes[kind], refs[kind]
    images = [pil_image(smooth_image(H, W, 0)), pil_image(smooth_image(H, W, 1))]
    strength = 0.6
    ours = pipe(PROMPTS, NEGATIVES, num_inference_steps=STEPS, guidance_scale=6.0, sampler=sampler,
                image=images, strength=strength, output_type="np").images
    dp = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    dp.set_progress_bar_config(disable=True)
    dp.scheduler = diffusers_scheduler(sampler, ref)
    start = samplers.make_sampler(sampler, pipe.scheduler_config, STEPS).index_for_strength(strength)
    patch_noise(monkeypatch, [sdjax_noise(2, LATENT, noise.STREAM_IMAGE_LATENTS), sdjax_noise(2, LATENT)]
                + step_noises(sampler, start, 2, LATENT))
    theirs = dp(PROMPTS, negative_prompt=NEGATIVES, image=images, strength=strength, num_inference_steps=STEPS,
                guidance_scale=6.0, output_type="np").images
    assert np.abs(ours - theirs).max() <= TOL


@pytest.mark.parametrize("kind,strength", [("sd1_inpaint", 1.0), ("sd1_inpaint", 0.7), ("sd2", 0.75)])
@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_inpaint_matches_diffusers(kind, strength, sampler, pipes, refs, monkeypatch):
    """9-channel inpainting UNet, and an ordinary UNet with mask blending."""
    pipe, ref = pipes[kind], refs[kind]
    images = [pil_image(smooth_image(H, W, 0)), pil_image(smooth_image(H, W, 2))]
    masks = [pil_image(box_mask(H, W)).convert("L")] * 2
    ours = pipe(PROMPTS, NEGATIVES, num_inference_steps=STEPS, guidance_scale=5.0, sampler=sampler,
                image=images, mask_image=masks, strength=strength, output_type="np").images
    dp = diffusers.StableDiffusionInpaintPipeline(**ref.components)
    dp.set_progress_bar_config(disable=True)
    dp.scheduler = diffusers_scheduler(sampler, ref)
    start = samplers.make_sampler(sampler, pipe.scheduler_config, STEPS).index_for_strength(strength)
    nine = kind == "sd1_inpaint"
    queue = []
    if not (nine and strength == 1.0):
        queue.append(sdjax_noise(2, LATENT, noise.STREAM_IMAGE_LATENTS))
    queue.append(sdjax_noise(2, LATENT))
    queue.append(sdjax_noise(2, LATENT, noise.STREAM_MASKED_LATENTS))
    queue += step_noises(sampler, start, 2, LATENT)
    patch_noise(monkeypatch, queue)
    theirs = dp(PROMPTS, negative_prompt=NEGATIVES, image=images, mask_image=masks, strength=strength,
                height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np").images
    assert np.abs(ours - theirs).max() <= TOL


def test_no_guidance_and_latent_output(pipes, refs):
    pipe, ref = pipes["sd1"], refs["sd1"]
    latents = np.random.default_rng(2).standard_normal((1, *LATENT)).astype(np.float32)
    ours = pipe(PROMPTS[0], height=H, width=W, num_inference_steps=STEPS, guidance_scale=1.0, latents=latents,
                output_type="latent").images
    ref.scheduler = diffusers_scheduler("ddim", ref)
    theirs = ref(PROMPTS[0], height=H, width=W, num_inference_steps=STEPS, guidance_scale=1.0,
                 latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), output_type="latent").images
    assert ours.shape == (1, *LATENT)
    assert np.abs(ours - theirs.numpy().transpose(0, 2, 3, 1)).max() <= 1e-4


def test_pil_output_and_num_images_per_prompt(pipes):
    out = pipes["sd1"](PROMPTS, height=H, width=W, num_inference_steps=2, num_images_per_prompt=3).images
    assert len(out) == 6 and all(isinstance(im, Image.Image) and im.size == (W, H) for im in out)
    # images of a prompt differ from each other (each has its own noise)
    a = np.asarray(out[0], np.float32)
    assert np.abs(a - np.asarray(out[1], np.float32)).max() > 1


def test_seed_per_prompt_reproduces_alone(pipes):
    pipe = pipes["sd1"]
    both = pipe(PROMPTS, height=H, width=W, num_inference_steps=2, seed=[5, 9], output_type="np").images
    # An image depends on its prompt and seed only, not on its place in the batch. (Alone, in a batch of one, it
    # differs by float32 rounding only: XLA's CPU kernels round differently for another batch size.)
    swapped = pipe(PROMPTS[::-1], height=H, width=W, num_inference_steps=2, seed=[9, 5], output_type="np").images
    assert np.abs(both[::-1] - swapped).max() <= 1e-6
    alone = pipe(PROMPTS[1], height=H, width=W, num_inference_steps=2, seed=[9], output_type="np").images
    assert np.abs(both[1] - alone[0]).max() <= 1e-4


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(height=33, width=48), "multiples of 2"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(image="img", strength=0.0), "strength"),
        (dict(image="img", strength=1.5), "strength"),
        (dict(negative_prompt=["a", "b", "c"]), "negative_prompt"),
        (dict(sampler="nope"), "nope"),
        (dict(output_type="jpg"), "output_type"),
        (dict(latents=np.zeros((2, 3, 3, 4), np.float32)), "latents"),
    ],
)
def test_bad_input_raises_one_line_value_error(pipes, kwargs, words):
    if kwargs.get("image") == "img":
        kwargs = dict(kwargs, image=pil_image(smooth_image(H, W)))
    call = dict(prompt=PROMPTS, height=H, width=W, num_inference_steps=2)
    call.update(kwargs)
    with pytest.raises(ValueError) as e:
        pipes["sd1"](**call)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bfloat16_close_to_float32(folders):
    fp32 = sdjax.StableDiffusionPipeline.from_pretrained(folders["sd1"])
    bf16 = sdjax.StableDiffusionPipeline.from_pretrained(folders["sd1"], dtype=jnp.bfloat16)
    a = fp32(PROMPTS, NEGATIVES, height=H, width=W, num_inference_steps=STEPS, output_type="np").images
    b = bf16(PROMPTS, NEGATIVES, height=H, width=W, num_inference_steps=STEPS, output_type="np").images
    assert np.isfinite(b).all()
    diff = np.abs(a - b)
    print(f"bf16 vs fp32: max abs diff {diff.max():.4f}, mean {diff.mean():.5f}")
    assert diff.mean() < 0.02 and diff.max() < 0.15


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax
    import sdjax
    assert len(jax.devices()) == int(sys.argv[4]), jax.devices()
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(sys.argv[1])
    prompts = ["a red circle", "a blue square", "a white triangle"]
    out = pipe(prompts, ["", "dark", ""], height=32, width=48, num_inference_steps=3, sampler=sys.argv[2],
               num_images_per_prompt=2, seed=7, output_type="np").images
    np.save(sys.argv[3], out)
""")


@pytest.fixture(scope="module")
def narrow_sd2(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("pipes") / "sd2_narrow", kind="sd2", narrow=True)


def _run_on_devices(folder, tmp_path, sampler):
    results = run_on_devices(tmp_path, MULTI_DEVICE_SCRIPT, folder, sampler)
    assert results[1].shape == (6, 32, 48, 3)
    return np.abs(results[1] - results[8]).max()


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_same_images_on_1_and_8_devices(narrow_sd2, tmp_path, sampler):
    """A batch of 6 on 8 fake CPU devices (padded to 8) equals the 1-device result: the seeding, padding and
    cutting back do not depend on the device count."""
    assert _run_on_devices(narrow_sd2, tmp_path, sampler) <= 1e-5


def test_device_count_changes_only_rounding_on_a_wide_model(folders, tmp_path):
    """On a model with wide weights, float32 rounding is amplified: XLA's CPU kernels round differently for a
    per-device batch of 6 than of 1, and the images differ by a few 1e-5 (measured 2.4e-5 to 3.5e-5). A seeding
    or padding fault would differ by O(0.1)."""
    assert _run_on_devices(folders["sd2"], tmp_path, "euler_a") <= 1e-4


SMALL_BATCH_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, jax
    import sdjax
    assert len(jax.devices()) == int(sys.argv[4]), jax.devices()
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(sys.argv[1])
    real, seen = pipe.program, []

    def spy(plan):  # run the program compiled ahead of time, to read XLA's cost analysis of each device's part
        program = real(plan)

        def run(*args):
            compiled = program.lower(*args).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            layout = plan.layout
            seen.append(dict(layout=[layout.batch, layout.data, layout.pair, layout.space], flops=cost["flops"]))
            return compiled(*args)
        return run

    pipe.program = spy
    call = dict(height=32, width=48, num_inference_steps=3, seed=7, output_type="np")
    outs = [
        pipe("a red circle", "dark", sampler="euler_a", **call).images,  # guided: pair and height split
        pipe("a blue square", image=np.linspace(0, 1, 32 * 48 * 3).reshape(32, 48, 3), strength=0.7, guidance_scale=1.0, sampler="ddim",
             **call).images,  # no guidance: the height alone, VAE encode included
        pipe(["a", "b", "c"], ["x", "", ""], sampler="ddim", **call).images,  # 3 images: padded to 4 on 8 devices
    ]
    np.save(sys.argv[3], np.concatenate(outs))
    with open(sys.argv[3][:-4] + ".json", "w") as f:
        json.dump(seen, f)
""")


def test_small_batches_split_images_over_devices(narrow_sd2, tmp_path):
    """With fewer images than devices an image's devices split its guided pair and its height (program.Layout)
    instead of computing padding images: the images equal the 1-device ones on 2, 4 and 8 fake CPU devices, and
    each device's share of the program's FLOPs (XLA's cost analysis of the partitioned program) falls with the
    device count."""
    import json

    results = run_on_devices(tmp_path, SMALL_BATCH_SCRIPT, narrow_sd2, "-", counts=(1, 2, 4, 8))
    seen = {n: json.loads((tmp_path / f"out{n}.json").read_text()) for n in results}
    layouts = {n: [s["layout"] for s in seen[n]] for n in seen}  # [batch, data, pair, space] of the three calls
    assert layouts[1] == [[1, 1, 1, 1], [1, 1, 1, 1], [3, 1, 1, 1]]
    assert layouts[2] == [[1, 1, 2, 1], [1, 1, 1, 2], [4, 2, 1, 1]]
    assert layouts[4] == [[1, 1, 2, 2], [1, 1, 1, 4], [4, 4, 1, 1]]
    assert layouts[8] == [[1, 1, 2, 4], [1, 1, 1, 8], [4, 4, 2, 1]]
    assert results[1].shape == (5, 32, 48, 3)
    for n in (2, 4, 8):
        assert np.abs(results[n] - results[1]).max() <= 1e-5, n
    flops = {n: seen[n][0]["flops"] for n in seen}  # the guided batch-1 call
    print({n: f"{flops[n] / flops[1]:.3f}" for n in flops})
    assert flops[2] <= 0.55 * flops[1] and flops[4] <= 0.3 * flops[1] and flops[8] <= 0.2 * flops[1]


@pytest.mark.parametrize("n, devices, cfg, height, expected", [
    (6, 8, True, 64, (8, 8, 1, 1)),  # as many images as devices or more: padded, one image per device
    (9, 8, True, 64, (16, 8, 1, 1)),
    (1, 1, True, 64, (1, 1, 1, 1)),
    (1, 8, True, 64, (1, 1, 2, 4)),
    (1, 8, False, 64, (1, 1, 1, 8)),
    (3, 8, True, 64, (4, 4, 2, 1)),
    (2, 8, True, 64, (2, 2, 2, 2)),
    (1, 8, True, 6, (2, 2, 2, 2)),  # height 6 takes 2 bands, not 4: the other devices take a padding image
    (1, 8, True, 5, (4, 4, 2, 1)),
    (1, 6, True, 9, (1, 1, 2, 3)),
    (1, 3, True, 64, (3, 3, 1, 1)),  # no even split of the pair, and height 64 does not split in 3
])
def test_choose_layout(n, devices, cfg, height, expected):
    from sdjax.pipelines.program import choose_layout

    layout = choose_layout(n, devices, cfg=cfg, latent_height=height)
    assert (layout.batch, layout.data, layout.pair, layout.space) == expected
    assert layout.data * layout.pair * layout.space == devices and layout.batch >= n
