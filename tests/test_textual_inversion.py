"""Textual-inversion embeddings against diffusers' own `load_textual_inversion` on tiny random models (fp32, CPU).

The embedding files are made here in each format people download (A1111 `.pt` with `string_to_param`, kohya
`.safetensors` with `emb_params`, diffusers `learned_embeds.bin/.safetensors`, SDXL `clip_l`/`clip_g`), loaded by
sdjax (torch-free) and by diffusers, and the images of prompts that use the tokens compared. Embeddings are drawn
wide (std 1, the CLIP token table's is 0.1) so that a token that is read wrong moves the image far past the tolerance
(`test_the_tokens_move_the_image` checks it). A1111's prompt syntax around a multi-vector embedding (emphasis, a chunk
boundary, BREAK) is checked against A1111's chunking written here over transformers' CLIP, fed to diffusers as
prompt embeddings.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from PIL import Image  # noqa: E402

import sdjax  # noqa: E402
from sdjax import cli, prompts as prompts_lib  # noqa: E402
from sdjax.pipelines import noise  # noqa: E402
from sdjax.pipelines.textual_inversion import ROOM  # noqa: E402
from sdjax.tokenizer import Tokenizer  # noqa: E402

from pipeline_fixtures import (a1111_chunks, box_mask, build_pipeline, build_sdxl, build_upscaler, count_compiles,  # noqa: E402
                               diffusers_scheduler, nchw, patch_noise, pil_image, quick_compiles, sdjax_noise,
                               smooth_image)

H, W = 32, 32
LATENT = (H // 2, W // 2, 4)
STEPS = 3
TOL = 5e-4

_quick = pytest.fixture(scope="module", autouse=True)(quick_compiles)


def vectors(n: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def report(name, ours, theirs):
    diff = float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())
    print(f"{name}: max abs diff {diff:.2e}")
    return diff


# -- the files ------------------------------------------------------------------------------------------------------


def a1111_pt(path, name, vecs):
    """An A1111 embedding as its train_embedding saves it (the vectors as a Parameter, as A1111 keeps them)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(torch.from_numpy(vecs))},
                "name": name, "step": 1500, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5"}, path)
    return path


def kohya_safetensors(path, vecs):
    safetensors_torch.save_file({"emb_params": torch.from_numpy(vecs)}, str(path))
    return path


def diffusers_bin(path, token, vecs):
    torch.save({token: torch.from_numpy(vecs)}, path)
    return path


def diffusers_safetensors(path, token, vecs):
    safetensors_torch.save_file({token: torch.from_numpy(vecs)}, str(path))
    return path


def sdxl_safetensors(path, clip_l, clip_g):
    safetensors_torch.save_file({"clip_l": torch.from_numpy(clip_l), "clip_g": torch.from_numpy(clip_g)}, str(path))
    return path


# -- models -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti")
    return {"sd1": build_pipeline(root / "sd1", kind="sd1"), "base": build_sdxl(root / "base"),
            "refiner": build_sdxl(root / "refiner", refiner=True, seed=1)}


@pytest.fixture(scope="module")
def sd1(folders):
    return sdjax.StableDiffusionPipeline.from_pretrained(folders["sd1"])


@pytest.fixture(scope="module")
def base(folders):
    return sdjax.StableDiffusionXLPipeline.from_pretrained(folders["base"])


@pytest.fixture(scope="module")
def refiner(folders):
    return sdjax.StableDiffusionXLPipeline.from_pretrained(folders["refiner"])


def diffusers_sd1(folder):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    return ref


@pytest.fixture
def unload_after(sd1, base, refiner):
    yield
    for pipe in (sd1, base, refiner):
        pipe.unload_textual_inversion()


def sd1_images(pipe, ref, prompts, negatives, monkeypatch, **kw):
    latents = np.random.default_rng(1).standard_normal((len(prompts), *LATENT)).astype(np.float32)
    args = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=7.5, output_type="np")
    ours = pipe(prompts, negatives, sampler="ddim", latents=latents, **args, **kw).images
    patch_noise(monkeypatch, [])
    theirs = ref(prompts, negative_prompt=negatives, latents=nchw(latents), **args).images
    return ours, theirs


PROMPTS = ["a photo of <tok> on a table", "<tok>, in the style of <tok>"]
NEGATIVES = ["blurry <tok>", ""]


def test_readers_give_the_saved_vectors_and_names(tmp_path, sd1, unload_after):
    from sdjax.embeddings import read_embedding

    v = vectors(3, 32, 50)
    e = read_embedding(a1111_pt(tmp_path / "file-name.pt", "<named>", v))
    assert (e.name, e.stem, e.is_sdxl) == ("<named>", "file-name", False) and np.array_equal(e.vectors, v)
    half = tmp_path / "easyneg-v2.safetensors"
    safetensors_torch.save_file({"emb_params": torch.from_numpy(v).to(torch.bfloat16)}, str(half))
    e = read_embedding(half)
    assert e.name is None and e.stem == "easyneg-v2"
    assert np.array_equal(e.vectors, torch.from_numpy(v).to(torch.bfloat16).float().numpy())
    (tmp_path / "folder").mkdir()
    diffusers_bin(tmp_path / "folder" / "custom.bin", "<key>", v[0])
    e = read_embedding(tmp_path / "folder", weight_name="custom.bin")
    assert e.name == "<key>" and e.vectors.shape == (1, 32)
    e = read_embedding(sdxl_safetensors(tmp_path / "xl.safetensors", v[:2, :8].copy(), vectors(2, 12, 51)))
    assert e.is_sdxl and e.num_vectors == 2 and np.array_equal(e.clip_l, v[:2, :8])
    # a file that names no token: its file name is the token
    sd1.load_textual_inversion(str(half))
    ids = sd1.tokenizer.bpe(["a easyneg-v2 b"])[0]
    assert len(ids) == 5 and ids[1:4] == [sd1.tokenizer.token_id(t) for t in
                                          ("easyneg-v2", "easyneg-v2_1", "easyneg-v2_2")]


# -- SD 1: each format ----------------------------------------------------------------------------------------------


FORMATS = {
    # name: (write the file(s) in a folder -> the path to load, token= or None)
    "a1111-pt-1": (lambda d: a1111_pt(d / "tok.pt", "<tok>", vectors(1, 32, 1)), None),
    "a1111-pt-4": (lambda d: a1111_pt(d / "my-style.pt", "<tok>", vectors(4, 32, 2)), None),
    "kohya-safetensors-3": (lambda d: kohya_safetensors(d / "tok.safetensors", vectors(3, 32, 3)), "<tok>"),
    "diffusers-bin-folder-1d": (lambda d: diffusers_bin(d / "learned_embeds.bin", "<tok>", vectors(1, 32, 4)[0])
                                and d, None),
    "diffusers-safetensors-2": (lambda d: diffusers_safetensors(d / "learned_embeds.safetensors", "<tok>",
                                                                 vectors(2, 32, 5)), None),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_sd1_formats_match_diffusers(fmt, sd1, folders, tmp_path, monkeypatch, unload_after):
    write, token = FORMATS[fmt]
    path = write(tmp_path)
    ref = diffusers_sd1(folders["sd1"])
    sd1.load_textual_inversion(str(path), token=token)
    ref.load_textual_inversion(str(path), token=token)
    ours, theirs = sd1_images(sd1, ref, PROMPTS, NEGATIVES, monkeypatch)
    assert report(f"sd1 {fmt}", ours, theirs) <= TOL


def test_sd1_lists_state_dicts_and_rows(sd1, folders, tmp_path, monkeypatch, unload_after):
    """A list of sources (a dict in memory, an array with its token), then one array whose rows are tokens."""
    ref = diffusers_sd1(folders["sd1"])
    sources = [{"<tok>": vectors(3, 32, 6)}, vectors(2, 32, 7)]
    sd1.load_textual_inversion(sources, token=[None, "<two>"])  # None: the dict's token
    # (diffusers repeats a token list that starts with None: it gets the token by name)
    ref.load_textual_inversion([{"<tok>": torch.from_numpy(sources[0]["<tok>"])}, torch.from_numpy(sources[1])],
                               token=["<tok>", "<two>"])
    rows = vectors(3, 32, 8)
    sd1.load_textual_inversion(rows, token=["<r0>", "<r1>", "<r2>"])
    ref.load_textual_inversion(torch.from_numpy(rows), token=["<r0>", "<r1>", "<r2>"])
    prompts = ["<two> and <tok> and <r1>", "<r2> <r0>, <tok>"]
    ours, theirs = sd1_images(sd1, ref, prompts, ["<two>", "<r1>"], monkeypatch)
    assert report("sd1 lists", ours, theirs) <= TOL


def test_the_tokens_move_the_image(sd1, monkeypatch, unload_after):
    """Guards the parity tests: the embedding's vectors (each of them) change the image by far more than TOL."""
    kw = dict(height=H, width=W, num_inference_steps=STEPS, sampler="ddim", output_type="np",
              latents=np.random.default_rng(1).standard_normal((1, *LATENT)).astype(np.float32))
    vecs = vectors(3, 32, 9)
    sd1.load_textual_inversion({"<tok>": vecs})
    ref = sd1("a photo of <tok>", **kw).images
    for i in range(3):
        moved = vecs.copy()
        moved[i] = vectors(1, 32, 10 + i)[0]
        sd1.unload_textual_inversion()
        sd1.load_textual_inversion({"<tok>": moved})
        assert report(f"vector {i} moved", ref, sd1("a photo of <tok>", **kw).images) > 10 * TOL


def test_inpainting_and_upscaler_match_diffusers(tmp_path_factory, monkeypatch):
    """The other SD families: a 9-channel inpainting model and the x4 upscaler, each with a multi-vector A1111
    embedding loaded by both sides."""
    root = tmp_path_factory.mktemp("ti_families")
    path = a1111_pt(root / "tok.pt", "<tok>", vectors(3, 32, 30))
    folder = build_pipeline(root / "inpaint", unet_in_channels=9)
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler("ddim", ref)
    for p in (pipe, ref):
        p.load_textual_inversion(str(path))
    kw = dict(image=[pil_image(smooth_image(H, W, 0))] * 2, mask_image=[pil_image(box_mask(H, W)).convert("L")] * 2,
              strength=0.7, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np")
    ours = pipe(PROMPTS, NEGATIVES, sampler="ddim", **kw).images
    patch_noise(monkeypatch, [sdjax_noise(2, LATENT, noise.STREAM_IMAGE_LATENTS), sdjax_noise(2, LATENT),
                              sdjax_noise(2, LATENT, noise.STREAM_MASKED_LATENTS)])
    theirs = ref(PROMPTS, negative_prompt=NEGATIVES, height=H, width=W, **kw).images
    assert report("inpainting", ours, theirs) <= TOL

    folder = build_upscaler(root / "x4")
    pipe = sdjax.StableDiffusionUpscalePipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler("ddim", ref)
    for p in (pipe, ref):
        p.load_textual_inversion(str(path))
    low = [pil_image(smooth_image(8, 8, 1))]
    latents, low_res_noise = pipe.default_noise(8, 8, seed=0, num_prompts=1)
    kw = dict(num_inference_steps=STEPS, guidance_scale=7.5, noise_level=20, output_type="np")
    ours = pipe(["a <tok> photo"], low, ["<tok>"], sampler="ddim", seed=0, **kw).images
    patch_noise(monkeypatch, [low_res_noise])
    theirs = ref(["a <tok> photo"], low, negative_prompt=["<tok>"], latents=nchw(latents), **kw).images
    assert report("x4 upscaler", ours, theirs) <= TOL


# -- SDXL ---------------------------------------------------------------------------------------------------------


def sdxl_refs(folders):
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(folders["base"], add_watermarker=False)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folders["refiner"], add_watermarker=False)
    for p in (base, refiner):
        p.set_progress_bar_config(disable=True)
        p.scheduler = diffusers.EulerDiscreteScheduler.from_config(p.scheduler.config)
    return base, refiner


def test_sdxl_clip_l_clip_g_file_matches_diffusers(base, refiner, folders, tmp_path, monkeypatch, unload_after):
    """An SDXL file: clip_l into text_encoder, clip_g into text_encoder_2 (diffusers: one call per encoder, the
    documented way); the refiner takes clip_g. Plus a plain embedding loaded into text_encoder_2 alone."""
    clip_l, clip_g = vectors(2, 32, 11), vectors(2, 40, 12)
    path = sdxl_safetensors(tmp_path / "xl-style.safetensors", clip_l, clip_g)
    ref_base, ref_refiner = sdxl_refs(folders)
    base.load_textual_inversion(str(path), token="<xl>")
    refiner.load_textual_inversion(str(path), token="<xl>")
    for ref in (ref_base, ref_refiner):
        encoders = [("text_encoder", clip_l), ("text_encoder_2", clip_g)]
        for name, vecs in encoders if ref.text_encoder is not None else encoders[1:]:
            ref.load_textual_inversion(torch.from_numpy(vecs), token="<xl>", text_encoder=getattr(ref, name),
                                       tokenizer=getattr(ref, name.replace("text_encoder", "tokenizer")))
    only_g = vectors(3, 40, 13)
    base.load_textual_inversion({"<g>": only_g}, text_encoder=base.text_encoder_2, tokenizer=base.tokenizer_2)
    ref_base.load_textual_inversion({"<g>": torch.from_numpy(only_g)}, text_encoder=ref_base.text_encoder_2,
                                    tokenizer=ref_base.tokenizer_2)

    prompts, negatives = ["a <xl> photo of a <g>", "<xl>"], ["<g> blurry", "<xl>, dark"]
    latents = np.random.default_rng(1).standard_normal((2, *LATENT)).astype(np.float32)
    kw = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
              negative_prompt=negatives, prompt_2=["<g> and <xl>", "a <g>"])
    ours = base(prompts, sampler="euler", latents=latents, **kw).images
    patch_noise(monkeypatch, [])
    theirs = ref_base(prompts, latents=nchw(latents), **kw).images
    assert report("sdxl base", ours, theirs) <= TOL

    images = [pil_image(smooth_image(H, W, 0)), pil_image(smooth_image(H, W, 1))]
    kw = dict(image=images, strength=0.6, num_inference_steps=STEPS, guidance_scale=6.0, output_type="np",
              negative_prompt=["<xl>", "blurry"])
    ours = refiner(["a <xl> photo", "<xl>"], sampler="euler", **kw).images
    patch_noise(monkeypatch, [sdjax_noise(2, LATENT, noise.STREAM_IMAGE_LATENTS), sdjax_noise(2, LATENT)])
    theirs = ref_refiner(["a <xl> photo", "<xl>"], **kw).images
    assert report("sdxl refiner", ours, theirs) <= TOL


def test_sdxl_encoders_get_their_own_vectors(base, unload_after):
    base.load_textual_inversion({"clip_l": vectors(2, 32, 14), "clip_g": vectors(2, 40, 15)}, token="<xl>")
    for name, width in (("text_encoder", 32), ("text_encoder_2", 40)):
        tok = getattr(base, name.replace("text_encoder", "tokenizer"))
        ids = tok.bpe(["<xl>"])[0]
        assert len(ids) == 2 and tok.token_id("<xl>_1") == ids[1]
        table = np.asarray(getattr(base, name).text_model.embeddings.token_embedding.embedding.get_value())
        want = vectors(2, 32, 14) if width == 32 else vectors(2, 40, 15)
        assert np.array_equal(table[ids], want)


# -- A1111's syntax around an embedding ---------------------------------------------------------------------------


@torch.no_grad()
def ref_embed(encoder, ids, weights):
    zs = []
    for i in range(len(ids)):
        z = encoder(ids[i:i + 1]).last_hidden_state
        original = z.mean()
        z = z * weights[i][None, :, None]
        zs.append(z * (original / z.mean()))
    return torch.cat(zs, dim=1)


def test_a1111_syntax_keeps_an_embedding_together(sd1, folders, unload_after):
    """A 6-vector embedding with emphasis that would straddle the 75-token boundary moves whole to the second chunk
    (A1111), then BREAK starts a third; against A1111's algorithm over transformers' CLIP with diffusers' loaded
    tokens, fed to diffusers as prompt embeddings."""
    vecs = vectors(6, 32, 16)
    sd1.load_textual_inversion({"<tok>": vecs})
    ref = diffusers_sd1(folders["sd1"])
    ref.load_textual_inversion({"<tok>": torch.from_numpy(vecs)})
    filler = " ".join(["red", "tree"] * 36)  # 72 tokens: the embedding would take positions 73..78
    prompt = f"{filler} (<tok>:1.3) house BREAK a [<tok>] sun"
    fragments = [(filler + " ", 1.0), ("<tok>", 1.3), (" house ", 1.0), None, ("a ", 1.0), ("<tok>", 1 / 1.1),
                 (" sun", 1.0)]
    head = ref.tokenizer.convert_tokens_to_ids("<tok>")
    groups = {head: ref.tokenizer.convert_tokens_to_ids(["<tok>"] + [f"<tok>_{i}" for i in range(1, 6)])}
    ids, weights = a1111_chunks(ref.tokenizer, fragments, groups)
    assert len(ids) == 3 and ids[0].tolist()[73] == ref.tokenizer.eos_token_id  # moved on whole
    chunks = prompts_lib.prompt_chunks(sd1.tokenizer, prompt, "a1111")
    assert np.array_equal(chunks.ids, ids.numpy()) and np.allclose(chunks.weights, weights.numpy())

    latents = np.random.default_rng(1).standard_normal((1, *LATENT)).astype(np.float32)
    kw = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=7.5, output_type="np")
    ours = sd1(prompt, "<tok>", sampler="ddim", latents=latents, prompt_syntax="a1111", **kw).images
    cond = ref_embed(ref.text_encoder, ids, weights)
    neg_ids, neg_weights = a1111_chunks(ref.tokenizer, [("<tok>", 1.0)], groups)
    uncond = ref_embed(ref.text_encoder, neg_ids, neg_weights).repeat(1, 3, 1)  # same attention as one chunk
    theirs = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=nchw(latents), **kw).images
    assert report("sd1 a1111 embedding", ours, theirs) <= TOL


def test_plain_chunks_keep_an_embedding_together():
    tok = Tokenizer.from_pretrained()
    ids = tok.add_tokens(["<e>", "<e>_1", "<e>_2", "<e>_3"])
    tok.group_tokens(ids)
    assert tok.bpe(["a <e> b"])[0] == [320, *ids, 321]
    chunks = prompts_lib.prompt_chunks(tok, " ".join(["cat"] * 73) + " <e> dog", "plain")
    assert len(chunks) == 2 and list(chunks.ids[1][1:6]) == [*ids, tok.token_id("dog</w>")]
    assert chunks.ids[0][74] == tok.eos_token_id  # 73 cats, then EOS: the 4 vectors did not fit
    # emphasis weighs all the vectors; an embedding right after a full chunk's comma stays whole
    weighted = prompts_lib.prompt_chunks(tok, "a (<e>:1.5) b", "a1111")
    assert list(weighted.weights[0][1:7]) == [1.0, 1.5, 1.5, 1.5, 1.5, 1.0]
    tok.remove_added_tokens()
    assert tok.token_id("<e>") is None and tok.vocab_size == 49408 and tok.bpe(["<e>"])[0] != [ids[0]]


# -- the command line ---------------------------------------------------------------------------------------------


def test_cli_embedding_flag(sd1, folders, tmp_path, capsys, unload_after):
    """`--embedding FILE` (the token the file names) and `--embedding FILE:TOKEN`; the CLI's image is the library's
    with the same embeddings; a bad one is one line on stderr and exit 2."""
    pt = a1111_pt(tmp_path / "named.pt", "<tok>", vectors(2, 32, 40))
    kohya = kohya_safetensors(tmp_path / "style.safetensors", vectors(3, 32, 41))
    prompt = "a (<tok>:1.2) photo, <k> style"
    base = ["txt2img", "--prompt", prompt, "--n_samples", "1", "--n_iter", "1", "--ckpt", str(folders["sd1"]),
            "--skip_grid", "--seed", "3", "--H", "32", "--W", "32", "--ddim_steps", "2", "--scale", "5"]
    out = tmp_path / "out"
    assert cli.main(base + ["--outdir", str(out), "--embedding", str(pt), "--embedding", f"{kohya}:<k>"]) == 0
    (png,) = (out / "samples").glob("*.png")
    with Image.open(png) as im:
        theirs = np.asarray(im.convert("RGB"), np.float32) / 255
    sd1.load_textual_inversion([str(pt), str(kohya)], token=[None, "<k>"])
    ours = sd1(prompt, "", height=32, width=32, num_inference_steps=2, guidance_scale=5.0, seed=[3],
               prompt_syntax="a1111").images[0]
    assert np.array_equal(np.asarray(ours, np.float32) / 255, theirs)
    capsys.readouterr()
    for spec, words in ((str(tmp_path / "missing.pt"), "no such embedding"), (f"{pt}:cat", "'cat' is already"),
                        (f"{pt}:", "empty")):
        assert cli.main(base + ["--outdir", str(tmp_path / "bad"), "--embedding", spec]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and words in err and "--embedding" in err, err


def test_cli_embeddings_dir(sd1, folders, tmp_path, capsys, unload_after):
    """`--embeddings-dir DIR` (A1111's embeddings folder): the files whose names the prompt and the negative prompt
    use are loaded under those names (not the name inside the file) and give the library's image with them; files
    nobody names are not read (a broken one does no harm until a prompt names it: then one line, exit 2)."""
    folder = tmp_path / "embeddings"
    (folder / "negative").mkdir(parents=True)
    neg = a1111_pt(folder / "negative" / "EasyNeg.pt", "<inside>", vectors(2, 32, 42))
    style = kohya_safetensors(folder / "style-v2.safetensors", vectors(3, 32, 43))
    (folder / "unused.pt").write_bytes(b"not an embedding at all")
    prompt, negative = "a (style-v2:1.2) photo of a cat", "EasyNeg, blurry"
    base = ["txt2img", "--n_samples", "1", "--n_iter", "1", "--ckpt", str(folders["sd1"]), "--skip_grid", "--seed",
            "3", "--H", "32", "--W", "32", "--ddim_steps", "2", "--scale", "5", "--embeddings-dir", str(folder)]
    out = tmp_path / "out"
    assert cli.main(base + ["--outdir", str(out), "--prompt", prompt, "--negative-prompt", negative]) == 0
    (png,) = (out / "samples").glob("*.png")
    with Image.open(png) as im:
        theirs = np.asarray(im.convert("RGB"), np.float32) / 255
    sd1.load_textual_inversion([str(neg), str(style)], token=["EasyNeg", "style-v2"])
    ours = sd1(prompt, negative, height=32, width=32, num_inference_steps=2, guidance_scale=5.0, seed=[3],
               prompt_syntax="a1111").images[0]
    assert np.array_equal(np.asarray(ours, np.float32) / 255, theirs)
    sd1.unload_textual_inversion()
    plain = sd1(prompt, negative, height=32, width=32, num_inference_steps=2, guidance_scale=5.0, seed=[3],
                prompt_syntax="a1111").images[0]
    assert np.abs(np.asarray(plain, np.float32) / 255 - theirs).max() > 0.02  # the embeddings were used
    capsys.readouterr()
    for extra, words in ((["--prompt", "a unused cat"], "embedding unused"),
                         (["--prompt", "a cat", "--embeddings-dir", str(tmp_path / "none")], "no such folder")):
        assert cli.main(base + ["--outdir", str(tmp_path / "bad")] + extra) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and words in err, err


# -- errors -------------------------------------------------------------------------------------------------------


def bad_sources(d):
    safetensors_torch.save_file({"a": torch.zeros(2, 32), "b": torch.zeros(2, 32)}, str(d / "two.safetensors"))
    (d / "text.pt").write_bytes(b"not an embedding at all")
    import pickle
    (d / "pickle.pt").write_bytes(pickle.dumps({"string_to_param": {"*": [0.0] * 32}}))
    return d


ERRORS = {
    # name: (call kwargs, text the one-line message has)
    "wrong width": (lambda d: dict(pretrained_model_name_or_path={"<w>": vectors(1, 40, 0)}), "width 40"),
    "in the vocabulary": (lambda d: dict(pretrained_model_name_or_path={"cat": vectors(1, 32, 0)}),
                          "'cat' is already"),
    "no embedding": (lambda d: dict(pretrained_model_name_or_path=str(d / "two.safetensors")),
                     "no textual-inversion embedding"),
    "not a checkpoint": (lambda d: dict(pretrained_model_name_or_path=str(d / "text.pt")), "text.pt"),
    "a raw pickle": (lambda d: dict(pretrained_model_name_or_path=str(d / "pickle.pt")), "refused"),
    "no such file": (lambda d: dict(pretrained_model_name_or_path=str(d / "missing.pt")), "no such"),
    "empty folder": (lambda d: dict(pretrained_model_name_or_path=str(d)), "learned_embeds"),
    "NaN": (lambda d: dict(pretrained_model_name_or_path={"<n>": np.full((1, 32), np.nan, np.float32)}), "NaN"),
    "an array needs a token": (lambda d: dict(pretrained_model_name_or_path=vectors(1, 32, 0)), "token="),
    "SDXL file on SD1": (lambda d: dict(pretrained_model_name_or_path={"clip_l": vectors(1, 32, 0),
                                                                       "clip_g": vectors(1, 40, 0)}, token="<x>"),
                         "SDXL pipeline"),
    "too many vectors": (lambda d: dict(pretrained_model_name_or_path={"<many>": vectors(76, 32, 0)}), "at most 75"),
    "tokens and sources": (lambda d: dict(pretrained_model_name_or_path=[{"<a>": vectors(1, 32, 0)}],
                                          token=["<a>", "<b>"]), "one token per"),
    "repeated token": (lambda d: dict(pretrained_model_name_or_path=[{"<a>": vectors(1, 32, 0)},
                                                                     {"<b>": vectors(1, 32, 1)}],
                                      token=["<a>", "<a>"]), "repeat"),
    "second fails, none loaded": (lambda d: dict(pretrained_model_name_or_path=[{"<ok>": vectors(2, 32, 0)},
                                                                                {"<ok>_1": vectors(1, 32, 1)}]),
                                  "'<ok>_1' is already"),
    "not a string token": (lambda d: dict(pretrained_model_name_or_path=[{"<a>": vectors(1, 32, 0)},
                                                                         {"<b>": vectors(1, 32, 1)}],
                                          token=["<a>", 7]), "non-empty string"),
    "foreign text encoder": (lambda d: dict(pretrained_model_name_or_path={"<a>": vectors(1, 32, 0)},
                                            text_encoder=object()), "text_encoder must be"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_embeddings_one_line_nothing_loaded(case, sd1, tmp_path):
    make, words = ERRORS[case]
    before = (sd1.tokenizer.vocab_size, sd1.text_encoder.text_model.embeddings.token_embedding.num_embeddings)
    with pytest.raises(ValueError) as err:
        sd1.load_textual_inversion(**make(bad_sources(tmp_path)))
    message = str(err.value)
    print(message)
    assert words in message and "\n" not in message
    after = (sd1.tokenizer.vocab_size, sd1.text_encoder.text_model.embeddings.token_embedding.num_embeddings)
    assert after == before and sd1.tokenizer.groups == {}


def test_unload_errors_and_wrong_encoder(base, unload_after):
    with pytest.raises(ValueError, match="no textual-inversion token '<none>'"):
        base.unload_textual_inversion("<none>")
    base.load_textual_inversion({"<g>": vectors(1, 40, 0)}, text_encoder=base.text_encoder_2)
    with pytest.raises(ValueError, match="width 40 does not fit text_encoder .*text_encoder=pipe.text_encoder_2"):
        base.load_textual_inversion({"<h>": vectors(1, 40, 0)})
    with pytest.raises(ValueError, match="give the encoder's own tokenizer"):
        base.load_textual_inversion({"<h>": vectors(1, 40, 0)}, text_encoder=base.text_encoder_2,
                                    tokenizer=base.tokenizer)
    assert base.tokenizer.token_id("<g>") is None and base.tokenizer_2.token_id("<g>") is not None


# -- compiles -----------------------------------------------------------------------------------------------------


compiles = pytest.fixture(count_compiles)


def test_loading_and_unloading_do_not_recompile(folders, compiles):
    """The table grows once (one compile); more embeddings, unloading some or all, and loading others reuse the
    program. Unloading gives the images of the pipeline without embeddings back exactly."""
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(folders["sd1"])
    kw = dict(height=H, width=W, num_inference_steps=STEPS, sampler="ddim", output_type="np")
    prompts = ["a photo of <a> and <b>", "<b>, <c>"]
    plain = pipe(prompts, **kw).images
    assert compiles.count == 1
    pipe.load_textual_inversion({"<a>": vectors(2, 32, 20)})
    rows = pipe.text_encoder.text_model.embeddings.token_embedding.num_embeddings
    assert rows == 49408 + ROOM
    pipe(prompts, **kw)
    assert compiles.count == 2
    pipe.load_textual_inversion([{"<b>": vectors(5, 32, 21)}, {"<c>": vectors(1, 32, 22)}])
    with_all = pipe(prompts, **kw).images
    pipe.unload_textual_inversion("<a>")
    without_a = pipe(prompts, **kw).images
    pipe.unload_textual_inversion()
    assert np.array_equal(pipe(prompts, **kw).images, plain)
    pipe.load_textual_inversion([{"<b>": vectors(5, 32, 21)}, {"<c>": vectors(1, 32, 22)}])
    assert np.array_equal(pipe(prompts, **kw).images, without_a)  # the same tokens, renumbered
    assert compiles.count == 2
    assert pipe.text_encoder.text_model.embeddings.token_embedding.num_embeddings == rows
    # past the bucket: one more compile, once
    pipe.load_textual_inversion({"<big>": vectors(ROOM, 32, 23)})
    pipe(prompts, **kw)
    pipe(["<big>", "<c>"], **kw)
    assert compiles.count == 3
    assert not np.array_equal(with_all, without_a) and not np.array_equal(with_all, plain)


def test_demo_embeddings_dir(sd1, tmp_path, unload_after):
    """The demo's --embeddings-dir (`EmbeddingFolders`): the embeddings a request's prompt and negative prompt name
    are loaded once (a second request naming them loads nothing again) and give the library's image."""
    pytest.importorskip("gradio")
    from sdjax.demo import EmbeddingFolders, generate

    folder = tmp_path / "embeddings"
    folder.mkdir()
    neg = a1111_pt(folder / "EasyNeg.pt", "<inside>", vectors(2, 32, 44))
    style = kohya_safetensors(folder / "style-v2.safetensors", vectors(3, 32, 45))
    folders = EmbeddingFolders((str(folder),))
    kw = dict(guidance_scale=5.0, width=32, height=32, steps=2, sampler="ddim", seed=3, n_candidates=1)
    got = generate(sd1, "a style-v2 cat", "EasyNeg", outdir=tmp_path / "a", embeddings=folders, **kw)[0]
    again = generate(sd1, "a style-v2 dog", "EasyNeg", outdir=tmp_path / "b", embeddings=folders, **kw)[0]
    assert folders.loaded == {"EasyNeg", "style-v2"} and again.path != got.path
    sd1.unload_textual_inversion()
    sd1.load_textual_inversion([str(neg), str(style)], token=["EasyNeg", "style-v2"])
    want = sd1("a style-v2 cat", "EasyNeg", height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
               seed=3, sampler="ddim", prompt_syntax="a1111").images[0]
    with Image.open(got.path) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(want))
