"""Original-layout (CompVis / SGM) single files written from tiny diffusers pipelines: the test-side inverse of
sdjax.original_layout. The writer is trusted because diffusers' own `from_single_file(path, config=folder)` reads each
file back to exactly the folder's weights (tests/test_original_layout.py checks that)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from sdjax import original_layout as ol

import pipeline_fixtures
from pipeline_fixtures import build_pipeline, build_sdxl


# ----------------------------------------------------------------------------------------------------------------
# The test's writer: diffusers / transformers state dicts -> the original single-file layout


class ShapeOnly:
    """A tensor stand-in with a shape only (real-size layouts without memory)."""

    def __init__(self, shape):
        self.shape = tuple(int(d) for d in shape)

    @property
    def T(self):
        return ShapeOnly(self.shape[::-1])

    def reshape(self, *shape):
        return ShapeOnly(shape)


def concat(parts):
    if isinstance(parts[0], ShapeOnly):
        return ShapeOnly((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
    return np.concatenate(parts)


UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_original(sd: dict, layers_per_block: int) -> dict:
    per = layers_per_block + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "class_embedding": "label_emb"}
    out = {}
    for k, v in sd.items():
        head, _, param = k.rpartition(".")
        p = k.split(".")
        if head in fixed:
            new = f"{fixed[head]}.{param}"
        elif p[0] == "down_blocks":
            b, kind, r, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{1 + b * per + layers_per_block}.0.op.{rest.removeprefix('conv.')}"
            elif kind == "resnets":
                sub, _, prm = rest.rpartition(".")
                new = f"input_blocks.{1 + b * per + r}.0.{UNET_RESNET[sub]}.{prm}"
            else:
                new = f"input_blocks.{1 + b * per + r}.1.{rest}"
        elif p[0] == "up_blocks":
            b, kind, r, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if kind == "upsamplers":
                has_attention = any(x.startswith(f"up_blocks.{b}.attentions.") for x in sd)
                new = f"output_blocks.{b * per + layers_per_block}.{2 if has_attention else 1}.{rest}"
            elif kind == "resnets":
                sub, _, prm = rest.rpartition(".")
                new = f"output_blocks.{b * per + r}.0.{UNET_RESNET[sub]}.{prm}"
            else:
                new = f"output_blocks.{b * per + r}.1.{rest}"
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            if p[1] == "attentions":
                new = f"middle_block.1.{rest}"
            else:
                sub, _, prm = rest.rpartition(".")
                new = f"middle_block.{2 * int(p[2])}.{UNET_RESNET[sub]}.{prm}"
        else:
            raise AssertionError(f"writer: unexpected UNet key {k}")
        out["model.diffusion_model." + new] = v
    return out


def vae_to_original(sd: dict) -> dict:
    n_up = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        new = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if p[1] == "down_blocks":
            rest = ".".join(p[3:]).replace("conv_shortcut", "nin_shortcut")
            rest = rest.replace("downsamplers.0", "downsample").replace("resnets", "block")
            new = f"encoder.down.{p[2]}.{rest}"
        elif p[1] == "up_blocks":
            rest = ".".join(p[3:]).replace("conv_shortcut", "nin_shortcut")
            rest = rest.replace("upsamplers.0", "upsample").replace("resnets", "block")
            new = f"decoder.up.{n_up - 1 - int(p[2])}.{rest}"
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}".replace("conv_shortcut", "nin_shortcut")
        elif p[1] == "mid_block":
            sub, _, prm = ".".join(p[4:]).rpartition(".")
            new = f"{p[0]}.mid.attn_1.{attention[sub]}.{prm}"
            if sub != "group_norm" and prm == "weight":
                v = v.reshape(*v.shape, 1, 1)  # the original's 1x1 convs
        out["first_stage_model." + new] = v
    return out


def text_model_names(sd: dict) -> dict:
    """transformers >= 5 saves a bare CLIPTextModel without `text_model.`: the names every SD folder has."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}


def clip_to_original(sd: dict, prefix: str) -> dict:
    out = {prefix + k: v for k, v in text_model_names(sd).items()}
    out[prefix + "text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]  # as old files have
    return out


def openclip_to_original(sd: dict, prefix: str, *, extra_block: bool, rng=None) -> dict:
    """OpenCLIP text tower: fused in_proj, (width, proj) text_projection, logit_scale; with `extra_block` a last
    resblock (SD2 runs the penultimate layer; diffusers drops block 23) and a (width, width) projection."""
    sd = text_model_names(sd)
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    layer = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out = {}
    n_layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
    for k, v in sd.items():
        if k in fixed:
            out[prefix + fixed[k]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T
        elif k.startswith("text_model.encoder.layers."):
            p = k.split(".")
            n, rest = p[3], ".".join(p[4:])
            sub, _, prm = rest.rpartition(".")
            if sub in ("self_attn.k_proj", "self_attn.v_proj"):
                continue
            if sub == "self_attn.q_proj":
                parts = [sd[f"text_model.encoder.layers.{n}.self_attn.{x}_proj.{prm}"] for x in "qkv"]
                out[f"{prefix}transformer.resblocks.{n}.attn.in_proj_{prm}"] = concat(parts)
            else:
                out[f"{prefix}transformer.resblocks.{n}.{layer[sub]}.{prm}"] = v
        else:
            raise AssertionError(f"writer: unexpected text encoder key {k}")
    width = sd["text_model.final_layer_norm.weight"].shape[0]

    def fill(shape):
        return ShapeOnly(shape) if rng is None else np.asarray(rng.standard_normal(shape), np.float32)

    if extra_block:
        for k in [k for k in out if k.startswith(f"{prefix}transformer.resblocks.0.")]:
            out[k.replace(".resblocks.0.", f".resblocks.{n_layers}.")] = fill(out[k].shape)
        out[prefix + "text_projection"] = fill((width, width))
    out[prefix + "logit_scale"] = fill(())
    return out


DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2")


def original_state(family: str, parts: dict, layers_per_block: int, rng=None) -> dict:
    """The whole single file of `family` from {component: diffusers state dict}."""
    out = unet_to_original(parts["unet"], layers_per_block)
    if "vae" in parts:
        out.update(vae_to_original(parts["vae"]))
    if family.startswith("sd1"):
        out.update(clip_to_original(parts["text_encoder"], ol.CLIP_SD1))
    elif family.startswith("sd2") or family == "x4-upscaler":
        out.update(openclip_to_original(parts["text_encoder"], ol.OPENCLIP_SD2, extra_block=True, rng=rng))
    elif family == "sdxl":
        out.update(clip_to_original(parts["text_encoder"], ol.CLIP_SDXL))
        out.update(openclip_to_original(parts["text_encoder_2"], ol.OPENCLIP_SDXL, extra_block=False, rng=rng))
    elif family == "sdxl-refiner":
        out.update(openclip_to_original(parts["text_encoder_2"], ol.OPENCLIP_REFINER, extra_block=False, rng=rng))
    if not family.startswith("sdxl"):  # LDM files carry the DDPM schedule buffers; SGM files do not
        for name in DDPM_BUFFERS:
            out[name] = fill_like((1000,), rng)
    if family == "x4-upscaler":
        for name in DDPM_BUFFERS:
            out["low_scale_model." + name] = fill_like((1000,), rng)
    return out


def fill_like(shape, rng):
    return ShapeOnly(shape) if rng is None else rng.random(shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Tiny pipelines and their single files


def sd2_text_encoder(folder: Path, seed: int = 1):
    """A tiny OpenCLIP-style (gelu) text encoder with 23 layers, as SD2's ViT-H after diffusers drops block 23."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=23, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407))
    for p in te.parameters():
        p.data.normal_(0.0, 0.1)
    te.save_pretrained(folder / "text_encoder", safe_serialization=True)


def build_upscaler(folder: Path, seed: int = 0) -> Path:
    """The tiny x4 upscaler of pipeline_fixtures with an SD2-style (23-block OpenCLIP) text encoder, as the real one."""
    pipeline_fixtures.build_upscaler(folder, seed)
    sd2_text_encoder(folder)
    return Path(folder)


KINDS = {  # family -> (diffusers pipeline class, components)
    "sd1": ("StableDiffusionPipeline", ("unet", "vae", "text_encoder")),
    "sd1-inpainting": ("StableDiffusionInpaintPipeline", ("unet", "vae", "text_encoder")),
    "sd2": ("StableDiffusionPipeline", ("unet", "vae", "text_encoder")),
    "sdxl": ("StableDiffusionXLPipeline", ("unet", "vae", "text_encoder", "text_encoder_2")),
    "sdxl-refiner": ("StableDiffusionXLImg2ImgPipeline", ("unet", "vae", "text_encoder_2")),
    "x4-upscaler": ("StableDiffusionUpscalePipeline", ("unet", "vae", "text_encoder")),
}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


def folder_weights(folder: Path, parts) -> dict[str, dict[str, np.ndarray]]:
    return {part: load_file(str(folder / part / WEIGHT_FILES[part])) for part in parts}


def config_only(folder: Path, dest: Path) -> Path:
    """The folder without its weights: diffusers' `config=` then cannot fall back to them for a component it does
    not find in the single file."""
    if not dest.exists():
        shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


def write_single_files(root: Path, families=tuple(KINDS)) -> dict:
    """family -> (folder, single file, {component: the folder's state dict}) for each of `families`, made in root."""
    made = {}
    for family in families:
        parts = KINDS[family][1]
        folder = root / family
        if family in ("sd1", "sd1-inpainting", "sd2"):
            build_pipeline(folder, kind=family[:3], unet_in_channels=9 if family.endswith("inpainting") else 4)
            if family == "sd2":
                sd2_text_encoder(folder)
        elif family.startswith("sdxl"):
            build_sdxl(folder, refiner=family == "sdxl-refiner")
        else:
            build_upscaler(folder)
        weights = folder_weights(folder, parts)
        state = original_state(family, weights, layers_per_block=1, rng=np.random.default_rng(0))
        path = root / f"{family}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
        made[family] = (folder, path, weights)
    return made
