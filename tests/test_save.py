"""`DiffusionPipeline.save_pretrained`: a pipeline written as a diffusers folder that diffusers loads with the
images sdjax made before saving (fp32, <= 5e-4; LoRA fused into the weights included) and sdjax loads with the same
images bit for bit, for SD 1.x, SDXL base and refiner and the x4 upscaler; never over an existing folder; refused
with one line while adapters or embeddings are loaded."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights (the LoRA made here is written as kohya)

from safetensors.numpy import load_file, save_file  # noqa: E402

import sdjax  # noqa: E402

from pipeline_fixtures import (build_pipeline, build_sdxl, build_upscaler, diffusers_scheduler,  # noqa: E402
                               quick_compiles)

H = W = 32
PROMPTS = ["a red circle on a blue background", "a green square"]
STEPS = 3
TOL = 5e-4

_quick = pytest.fixture(scope="module", autouse=True)(quick_compiles)


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("save") / "sd1")


def latents(shape=(H // 2, W // 2, 4), seed=1):
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), *shape)).astype(np.float32)


def ours(pipe):
    return pipe(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0, sampler="ddim",
                latents=latents(), output_type="np").images


def theirs(folder, klass=None):
    ref = (klass or diffusers.StableDiffusionPipeline).from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler("ddim", ref)
    with torch.no_grad():
        return ref(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0,
                   latents=torch.from_numpy(latents().transpose(0, 3, 1, 2)), output_type="np").images


def test_sd1_saved_folder_loads_in_diffusers_and_sdjax(sd1_folder, tmp_path):
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(sd1_folder)
    before = ours(pipe)
    out = pipe.save_pretrained(tmp_path / "saved")
    assert out == tmp_path / "saved" and not [p for p in tmp_path.iterdir() if p.name.startswith(".saved")]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert np.abs(theirs(out) - before).max() <= TOL
    assert np.array_equal(ours(sdjax.StableDiffusionPipeline.from_pretrained(out)), before)
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):  # same arrays
        # (transformers 5 writes a CLIPTextModel without the `text_model.` prefix, sdjax with it: both load)
        saved, original = ({k.removeprefix("text_model."): v for k, v in load_file(str(f / name)).items()}
                           for f in (out, sd1_folder))
        assert saved.keys() == original.keys()
        assert all(np.array_equal(saved[k], original[k]) for k in saved), name


def test_fused_lora_saved_is_what_diffusers_loads(sd1_folder, tmp_path):
    """fuse_lora(lora_scale=0.8) then unload_lora_weights then save_pretrained: diffusers loading the folder gives
    the images of the fused pipeline; while the adapter is loaded, or an embedding is, saving is refused in one line
    and writes nothing; an existing folder is never written over."""
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(sd1_folder)
    base = ours(pipe)
    maker = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder)
    rng = np.random.default_rng(5)
    lora = {}
    for prefix, module in (("lora_unet_", maker.unet), ("lora_te_", maker.text_encoder)):
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear):
                key = prefix + name.replace(".", "_")
                lora[f"{key}.lora_down.weight"] = rng.normal(0, 0.15, (4, layer.in_features)).astype(np.float32)
                lora[f"{key}.lora_up.weight"] = rng.normal(0, 0.15, (layer.out_features, 4)).astype(np.float32)
                lora[f"{key}.alpha"] = np.array(2.0, np.float32)
    save_file(lora, str(tmp_path / "style.safetensors"))
    pipe.load_lora_weights(tmp_path / "style.safetensors", adapter_name="style")
    with pytest.raises(ValueError, match=r"LoRA adapters are loaded \(style\): fuse_lora\(\) then") as e:
        pipe.save_pretrained(tmp_path / "refused")
    assert "\n" not in str(e.value) and not (tmp_path / "refused").exists()
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    fused = ours(pipe)
    out = pipe.save_pretrained(tmp_path / "fused")
    assert np.abs(fused - base).max() > 0.05
    assert np.abs(theirs(out) - fused).max() <= TOL
    save_file({"emb_params": rng.normal(0, 0.3, (2, 32)).astype(np.float32)}, str(tmp_path / "tok.safetensors"))
    pipe.load_textual_inversion(str(tmp_path / "tok.safetensors"), token="<tok>")
    with pytest.raises(ValueError, match="textual-inversion embeddings are loaded: unload_textual_inversion"):
        pipe.save_pretrained(tmp_path / "refused")
    pipe.unload_textual_inversion()  # the embedding table keeps its grown rows: the saved one has the config's
    out2 = pipe.save_pretrained(tmp_path / "after_embedding", variant="fp16", dtype=np.float16)
    table = load_file(str(out2 / "text_encoder/model.fp16.safetensors"))["text_model.embeddings.token_embedding.weight"]
    assert table.shape == (49408, 32) and table.dtype == np.float16
    assert (out2 / "unet/diffusion_pytorch_model.fp16.safetensors").is_file()
    diffusers.StableDiffusionPipeline.from_pretrained(out2, variant="fp16", torch_dtype=torch.float16)
    marker = out / "model_index.json"
    old = marker.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        pipe.save_pretrained(out)
    assert marker.read_bytes() == old


@pytest.mark.parametrize("kind", ["sdxl", "sdxl-refiner", "x4-upscaler"])
def test_other_families_round_trip(kind, tmp_path):
    """SDXL base, refiner and the x4 upscaler: the saved folder's model_index.json is the family's, diffusers loads
    it as that pipeline class, and sdjax loads it with the same images."""
    if kind == "x4-upscaler":
        folder = build_upscaler(tmp_path / "model")
    else:
        folder = build_sdxl(tmp_path / "model", refiner=kind == "sdxl-refiner")
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(folder)
    out = pipe.save_pretrained(tmp_path / "saved")
    original, saved = (json.loads((f / "model_index.json").read_text()) for f in (folder, out))
    keys = {k for k, v in original.items() if not k.startswith("_") and v not in ([None, None], None)}
    keys -= {"image_encoder", "feature_extractor", "watermark", "safety_checker"}  # parts sdjax does not load
    assert {k: saved[k] for k in keys} == {k: original[k] for k in keys}
    assert saved["_class_name"] == original["_class_name"]
    loaded = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(loaded).__name__ == original["_class_name"]
    again = sdjax.StableDiffusionPipeline.from_pretrained(out)
    if kind == "x4-upscaler":
        low = np.random.default_rng(2).uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)
        call = dict(prompt="a cat", image=low, num_inference_steps=2, output_type="np")
    elif kind == "sdxl-refiner":
        image = np.random.default_rng(2).uniform(0, 1, (1, H, W, 3)).astype(np.float32)
        call = dict(prompt="a cat", image=image, strength=0.5, num_inference_steps=3, output_type="np")
    else:
        call = dict(prompt="a cat", height=H, width=W, num_inference_steps=2, output_type="np")
    assert np.array_equal(pipe(**call).images, again(**call).images)
