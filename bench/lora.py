"""Time and memory of loading and applying a kohya LoRA: sdjax's `load_lora_weights` (read, merge on the devices)
against diffusers' `load_lora_weights` + `fuse_lora`, in the same process, on the same networks.

    python bench/lora.py                      # SD 1.5 UNet + CLIP ViT-L text encoder (real configs), rank 32
    python bench/lora.py --model tiny --rank 4  # a quick check that the script runs

The networks are built with random weights from the real configs in sdjax/model_configs/ (PyTorch, diffusers /
transformers), and sdjax's are filled from the same state dicts. The LoRA is made here, as kohya's trainer makes
them by default: every attention, feed-forward and proj_in/proj_out layer of the UNet's transformer blocks and the
text encoder's attention and MLP layers, rank `--rank`, alpha rank / 2, fp16 safetensors. The VAE is a tiny one (no
adapter touches it).

sdjax: the wall time of `load_lora_weights` (file read, key resolution, factors to the devices, the jitted merge
including its compile, the merged weights ready), of a `set_adapters` weight change (the merge program reused) and of
`unload_lora_weights`; the device memory it keeps (bytes of all live jax arrays after minus before: the base arrays
of the touched weights and the factors). diffusers: the wall time of `load_lora_weights` and of `fuse_lora`, and the
parameter bytes the LoRA layers add to the modules.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "sdjax" / "model_configs"
TOKENIZER = ROOT / "sdjax" / "default_model" / "pipeline" / "tokenizer"
MIB = 1024 ** 2

TINY_UNET = dict(block_out_channels=[32, 64], layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=32, norm_num_groups=8,
                 attention_head_dim=4)
TINY_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
TINY_VAE = dict(block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                layers_per_block=1, sample_size=32)


def torch_networks(model: str):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if model == "sd15":
        unet_cfg = json.loads((CONFIGS / "sd15_unet.json").read_text())
        clip_cfg = json.loads((CONFIGS / "clip_vit_l14_text.json").read_text())
    else:
        unet_cfg, clip_cfg = TINY_UNET, TINY_CLIP
    unet = UNet2DConditionModel.from_config(unet_cfg).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_cfg)).eval()
    vae = AutoencoderKL.from_config(TINY_VAE).eval()
    return (unet, dict(unet.config)), (text_encoder, text_encoder.config.to_dict()), (vae, dict(vae.config))


def kohya_lora(unet, text_encoder, rank: int, path: Path) -> int:
    """kohya's default targets (Transformer2DModel layers of the UNet, CLIP attention + MLP), fp16; returns bytes."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    sd = {}
    for prefix, module, keep in (
            ("lora_unet_", unet, lambda n: ".attentions." in n),
            ("lora_te_", text_encoder, lambda n: ".self_attn." in n or ".mlp." in n)):
        for name, layer in module.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or not keep(name):
                continue
            key = prefix + name.replace(".", "_")
            if isinstance(layer, torch.nn.Conv2d):
                down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=gen)
                up = torch.randn(layer.out_channels, rank, 1, 1, generator=gen)
            else:
                down = torch.randn(rank, layer.in_features, generator=gen)
                up = torch.randn(layer.out_features, rank, generator=gen)
            sd[f"{key}.lora_down.weight"] = (down * 0.01).half()
            sd[f"{key}.lora_up.weight"] = (up * 0.01).half()
            sd[f"{key}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    save_file(sd, str(path))
    return path.stat().st_size


def state(module) -> dict:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def live_bytes() -> int:
    import jax

    return sum(a.nbytes for a in jax.live_arrays())


def bench_sdjax(nets, lora: Path) -> dict:
    import jax
    from flax import nnx

    from sdjax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from sdjax.pipelines.sd import StableDiffusionPipeline
    from sdjax.tokenizer import Tokenizer

    (unet, unet_cfg), (te, te_cfg), (vae, vae_cfg) = nets
    pipe = StableDiffusionPipeline(
        tokenizer=Tokenizer.from_pretrained(TOKENIZER), text_encoder=CLIPTextModel.from_state(te_cfg, state(te)),
        vae=AutoencoderKL.from_state(vae_cfg, state(vae)), unet=UNet2DConditionModel.from_state(unet_cfg, state(unet)),
        scheduler_config={})

    def ready():
        for m in (pipe.unet, pipe.text_encoder):
            jax.block_until_ready(jax.tree.leaves(nnx.state(m)))

    ready()
    before = live_bytes()
    t0 = time.perf_counter()
    pipe.load_lora_weights(lora, adapter_name="bench")
    ready()
    load_s = time.perf_counter() - t0
    kept = live_bytes() - before
    t0 = time.perf_counter()
    pipe.set_adapters("bench", 0.5)
    ready()
    reweight_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.unload_lora_weights()
    ready()
    unload_s = time.perf_counter() - t0
    touched = len(pipe.adapters().base) if pipe.adapters().base else None
    return dict(load_and_apply_s=round(load_s, 3), set_adapters_s=round(reweight_s, 3), unload_s=round(unload_s, 3),
                device_bytes_kept_mib=round(kept / MIB, 1), after_unload_mib=round((live_bytes() - before) / MIB, 1),
                touched_after_unload=touched, devices=str(jax.devices()[0].platform))


def bench_diffusers(nets, lora: Path) -> dict:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    (unet, _), (te, _), (vae, _) = nets
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
                                   unet=unet, scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

    def param_bytes():
        return sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.text_encoder) for p in m.parameters())

    before = param_bytes()
    with torch.no_grad():
        t0 = time.perf_counter()
        pipe.load_lora_weights(str(lora), adapter_name="bench")
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe.fuse_lora()
        fuse_s = time.perf_counter() - t0
    return dict(load_lora_weights_s=round(load_s, 3), fuse_lora_s=round(fuse_s, 3),
                load_and_fuse_s=round(load_s + fuse_s, 3), param_bytes_added_mib=round((param_bytes() - before) / MIB, 1),
                device="cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--out", help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    nets = torch_networks(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        lora = Path(tmp) / "lora.safetensors"
        size = kohya_lora(nets[0][0], nets[1][0], args.rank, lora)
        result = dict(model=args.model, rank=args.rank, lora_file_mib=round(size / MIB, 1),
                      sdjax=bench_sdjax(nets, lora), diffusers=bench_diffusers(nets, lora))
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
