"""LoRA / LyCORIS adapters (`sdjax.lora`, `DiffusionPipeline.load_lora_weights`) against diffusers' own
`load_lora_weights` / `set_adapters` on tiny random models (fp32, final images <= 5e-4), LoHa / LoKr against their
published definition (the merged weights computed in PyTorch here, then diffusers without adapters), unloading
bit-exact, and no recompile of the generation program when adapters or weights change."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs it

from safetensors.torch import save_file  # noqa: E402

import sdjax  # noqa: E402
from sdjax.lora.formats import AdapterFormatError  # noqa: E402

from pipeline_fixtures import (CompileLog, build_pipeline, build_sdxl, diffusers_scheduler,  # noqa: E402
                               quick_compiles)

H, W = 32, 32
LATENT = (H // 2, W // 2, 4)
PROMPTS = ["a red circle on a blue background", "a green square"]
STEPS = 3
TOL = 5e-4

_quick = pytest.fixture(scope="module", autouse=True)(quick_compiles)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_models")
    return {"sd1": build_pipeline(root / "sd1", kind="sd1"), "sdxl": build_sdxl(root / "sdxl")}


@pytest.fixture(scope="module")
def sd1(folders):
    return sdjax.StableDiffusionPipeline.from_pretrained(folders["sd1"])


@pytest.fixture(scope="module")
def sdxl(folders):
    return sdjax.StableDiffusionPipeline.from_pretrained(folders["sdxl"])


def reference(folders, kind):
    """A fresh diffusers pipeline (adapters change it in place)."""
    klass = diffusers.StableDiffusionPipeline if kind == "sd1" else diffusers.StableDiffusionXLPipeline
    extra = dict(safety_checker=None, requires_safety_checker=False) if kind == "sd1" else {}
    pipe = klass.from_pretrained(folders[kind], **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler("ddim", pipe)
    return pipe


def latents(seed=1):
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), *LATENT)).astype(np.float32)


def ours(pipe, lat=None):
    return pipe(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0, sampler="ddim",
                latents=latents() if lat is None else lat, output_type="np").images


def theirs(pipe, lat=None):
    lat = latents() if lat is None else lat
    with torch.no_grad():
        return pipe(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0,
                    latents=torch.from_numpy(lat.transpose(0, 3, 1, 2)), output_type="np").images


# -- adapter files made here -----------------------------------------------------------------------------------------


def layers(module, include=None):
    """(name, layer) of the Linear / Conv2d layers of a torch module (`include`: predicate on the name)."""
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (include is None or include(n))]


def lora_pair(layer, rank, gen, std=0.15):
    """(down, up) in the kohya/PEFT layout: Linear (r, in) / (out, r); Conv (LoCon) (r, in, kh, kw) / (out, r, 1, 1)."""
    if isinstance(layer, torch.nn.Conv2d):
        down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=gen) * std
        up = torch.randn(layer.out_channels, rank, 1, 1, generator=gen) * std
    else:
        down = torch.randn(rank, layer.in_features, generator=gen) * std
        up = torch.randn(layer.out_features, rank, generator=gen) * std
    return down, up


def kohya_file(path, parts, seed=0, rank=4, alpha=2.0):
    """A kohya LoRA: parts = [(prefix, [(kohya module name, torch layer)])]; alpha None: 1..4 by module (diffusers
    applies per-module alphas of attention and text-encoder layers wrongly: its alpha_pattern keys keep the processor
    names; one alpha for all is what it reads right)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, named in parts:
        for i, (name, layer) in enumerate(named):
            down, up = lora_pair(layer, rank, gen)
            key = f"{prefix}{name}"
            sd[f"{key}.lora_down.weight"] = down
            sd[f"{key}.lora_up.weight"] = up
            sd[f"{key}.alpha"] = torch.tensor(alpha if alpha is not None else float(1 + i % 4))
    save_file(sd, str(path))
    return path


def joined(named):
    return [(n.replace(".", "_"), m) for n, m in named]


def sd1_kohya(folder, path, seed=0):
    ref = reference(folder, "sd1")
    unet = joined(layers(ref.unet))
    te = joined(layers(ref.text_encoder))
    return kohya_file(path, [("lora_unet_", unet), ("lora_te_", te)], seed=seed)


# -- parity with diffusers ---------------------------------------------------------------------------------------------


def test_kohya_sd1_matches_diffusers(sd1, folders, tmp_path):
    """Every Linear and Conv of the UNet (attention, feed-forward, proj_in/out 1x1 convs, LoCon 3x3 convs of the
    resnets, down/upsamplers, conv_in/out, time embedding) and of the text encoder."""
    path = sd1_kohya(folders, tmp_path / "kohya.safetensors")
    base = ours(sd1)
    sd1.load_lora_weights(path)
    try:
        got = ours(sd1)
    finally:
        sd1.unload_lora_weights()
    ref = reference(folders, "sd1")
    ref.load_lora_weights(str(path))
    want = theirs(ref)
    assert np.abs(got - base).max() > 0.05  # the adapter matters
    assert np.abs(got - want).max() <= TOL
