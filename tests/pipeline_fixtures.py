"""Tiny random diffusers pipelines, built with diffusers/transformers (PyTorch) and saved in the diffusers layout."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "sdjax" / "default_model" / "pipeline" / "tokenizer"

SD1_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
    clip_sample=False, skip_prk_steps=True,
)
SD2_SCHEDULER = dict(SD1_SCHEDULER, prediction_type="v_prediction", timestep_spacing="trailing")


def build_pipeline(folder: Path, *, kind: str = "sd1", unet_in_channels: int = 4, seed: int = 0,
                   narrow: bool = False) -> Path:
    """Write a tiny random SD pipeline folder. kind "sd1": conv proj, epsilon; "sd2": linear proj, upcast
    attention, per-block heads, gelu text encoder, v-prediction. narrow=True: small weights and norm gains, a
    model that damps float32 rounding instead of amplifying it (images stay near grey)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    sd2 = kind == "sd2"
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=unet_in_channels,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=(2, 4) if sd2 else 4, use_linear_projection=sd2, upcast_attention=sd2,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    # Random weights with a spread large enough that every layer and every conditioning input matters: norm gains
    # near 1 (near-zero gains flatten every image to grey and hide conditioning bugs), other weights wide.
    for module, std in ((unet, 0.05), (vae, 0.1), (text_encoder, 0.1)):
        for name, p in module.named_parameters():
            if narrow:
                p.data.normal_(0.0, 0.05 if p.dim() > 1 else 0.02)
            elif p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.data.normal_(1.0, 0.1)
            else:
                p.data.normal_(0.0, std)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    scheduler = DDIMScheduler(**{k: v for k, v in (SD2_SCHEDULER if sd2 else SD1_SCHEDULER).items()
                                 if k != "skip_prk_steps"})
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth deterministic RGB image (H, W, 3) in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6.28, 3)
    return np.stack([0.5 + 0.45 * np.sin(xx / 5 + yy / 7 + p) for p in phase], -1).astype(np.float32)


def box_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    m[h // 4: 3 * h // 4, w // 3: w] = 1.0
    return m


def build_clip(folder: Path, seed: int = 3) -> Path:
    """A tiny random transformers CLIPModel (real vocabulary, 32x32 images) with its processor and tokenizer."""
    import torch
    import transformers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, hidden_act="gelu")
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(folder), safe_serialization=True)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True).save_pretrained(str(folder))
    return Path(folder)


def run_on_devices(tmp_path: Path, script: str, *args: str, counts=(1, 8)) -> dict:
    """Run `script` once per fake CPU device count, each in a fresh process, as `run.py *args OUT.npy COUNT`;
    the script saves one array to OUT.npy. Returns {device count: that array}."""
    import os
    import subprocess
    import sys

    path = tmp_path / "run.py"
    path.write_text(script)
    results = {}
    for n in counts:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        out = tmp_path / f"out{n}.npy"
        subprocess.run([sys.executable, str(path), *map(str, args), str(out), str(n)],
                       check=True, env=env, timeout=900)
        results[n] = np.load(out)
    return results


SDXL_SCHEDULER = dict(  # SDXL's own scheduler config (EulerDiscreteScheduler, leading spacing)
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
)


def build_sdxl(folder: Path, *, refiner: bool = False, seed: int = 0) -> Path:
    """Write a tiny random SDXL base (or refiner: text_encoder_2 only, aesthetic score) pipeline folder."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    common = dict(vocab_size=49408, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, projection_dim=24)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, hidden_act="quick_gelu", pad_token_id=49407,
                                                **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=40, hidden_act="gelu", pad_token_id=0,
                                                                **common))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=(5 if refiner else 6) * 8 + 24,
        cross_attention_dim=40 if refiner else 32 + 40, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, sample_size=32, scaling_factor=0.13025,
    )
    # Random weights with norm gains near 1: with diffusers' tiny-test init (or gains near 0) the decoded image is
    # nearly constant and the text/size conditioning moves it by less than the tolerance, so parity would not see it.
    for module, std in ((unet, 0.05), (vae, 0.1), (text_encoder, 0.1), (text_encoder_2, 0.1)):
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.data.normal_(0.0, std)
            elif name.endswith("weight"):
                p.data.normal_(1.0, 0.1)
            else:
                p.data.normal_(0.0, 0.02)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer_2 = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!")
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
            unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            add_watermarker=False)
    else:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
            add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


# as stabilityai/stable-diffusion-x4-upscaler: v-prediction DDIM, DDPM low-res noising
UPSCALER_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                 prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                 clip_sample=False)
LOW_RES_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                         clip_sample=False, variance_type="fixed_small")


def build_upscaler(folder: Path, seed: int = 0) -> Path:
    """A tiny random x4 upscaler folder: 7-channel UNet with noise-level class embeddings and cross-attention-only
    blocks, factor-4 VAE (scaling factor 0.08333), tiny CLIP text encoder, DDIM + DDPM low-res scheduler."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=1, sample_size=16, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=(True, True, False), num_class_embeds=1000, attention_head_dim=8,
        cross_attention_dim=32, use_linear_projection=True, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, sample_size=32, scaling_factor=0.08333,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407,
    ))
    # wide random weights, norm gains near 1: every input (text, low-res image, noise level) visibly matters
    for module, std in ((unet, 0.05), (vae, 0.1), (text_encoder, 0.1)):
        for name, p in module.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.data.normal_(1.0, 0.1)
            else:
                p.data.normal_(0.0, std)
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), unet=unet,
        low_res_scheduler=DDPMScheduler(**LOW_RES_SCHEDULER), scheduler=DDIMScheduler(**UPSCALER_SCHEDULER),
        max_noise_level=350,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


class NoiseQueue:
    """Replaces diffusers' randn_tensor: returns the queued arrays (NHWC numpy -> NCHW torch) in order."""

    def __init__(self, arrays):
        self.arrays = list(arrays)

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        import torch

        assert self.arrays, f"diffusers asked for more noise than expected (shape {tuple(shape)})"
        a = self.arrays.pop(0)
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
        assert tuple(t.shape) == tuple(shape), (tuple(t.shape), tuple(shape))
        return t.to(dtype or torch.float32)


def patch_noise(monkeypatch, arrays):
    """Make every diffusers module's randn_tensor hand out `arrays` in order."""
    queue = NoiseQueue(arrays)
    for name, module in list(sys.modules.items()):
        if name.startswith("diffusers") and hasattr(module, "randn_tensor"):
            monkeypatch.setattr(module, "randn_tensor", queue, raising=False)
    return queue


def quick_compiles():
    """Module fixture body: XLA's optimisation passes take most of the compile time of the tiny test programs and
    change nothing the tolerances could see; the setting is restored for the rest of the session."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def count_compiles():
    """Fixture body (`compiles = pytest.fixture(count_compiles)`): a `CompileLog` active for the test."""
    with CompileLog() as log:
        yield log


def diffusers_scheduler(name: str, pipe):
    """diffusers' scheduler for sdjax sampler `name`, made from the diffusers pipeline's folder's own scheduler
    config (never from a scheduler an earlier test swapped in)."""
    import diffusers

    from sdjax import samplers

    config = json.loads((Path(pipe.name_or_path) / "scheduler" / "scheduler_config.json").read_text())
    return getattr(diffusers, samplers.DIFFUSERS_CLASS[name]).from_config(samplers.diffusers_config(name, config))


def sdjax_noise(n_prompts: int, latent_shape, stream=None, seed: int = 0) -> np.ndarray:
    """The noise sdjax draws for images 0..n_prompts-1 (one image per prompt) in `stream`."""
    import jax.numpy as jnp

    from sdjax.pipelines import noise

    keys = noise.image_keys(seed, np.arange(n_prompts), np.zeros(n_prompts, int))
    return np.asarray(noise.image_noise(jnp.asarray(keys), latent_shape, stream))


def pil_image(a: np.ndarray):
    """(H, W, 3) float in [0, 1] -> PIL image, rounded as sdjax and diffusers round."""
    from PIL import Image

    return Image.fromarray((a * 255).round().astype(np.uint8))


def nchw(a):
    """NHWC array -> NCHW torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


class CompileLog:
    """Counts XLA compilations of the pipeline program (jit(generate)) while installed (a context manager)."""

    def __init__(self):
        import logging

        class Handler(logging.Handler):
            def emit(inner, record):
                if record.getMessage().startswith("Finished XLA compilation of jit(generate)"):
                    self.count += 1

        self.count = 0
        self._handler = Handler()

    def __enter__(self):
        import logging

        import jax

        logger = logging.getLogger("jax")
        self._level = logger.level
        logger.addHandler(self._handler)
        logger.setLevel(logging.DEBUG)
        jax.config.update("jax_log_compiles", True)
        return self

    def __exit__(self, *exc):
        import logging

        import jax

        jax.config.update("jax_log_compiles", False)
        logger = logging.getLogger("jax")
        logger.removeHandler(self._handler)
        logger.setLevel(self._level)


def a1111_chunks(tok, fragments, groups=None):
    """The reference for sdjax.prompts: A1111's FrozenCLIPEmbedderWithCustomWords.tokenize_line, written here, as
    (ids (k, 77), weights (k, 77)) torch tensors. fragments: (text, weight) pairs, None for BREAK. An embedding's
    vectors (its head id -> all its ids in `groups`) never split: when they do not fit they start the next chunk."""
    import torch

    groups = groups or {}
    comma = tok.convert_tokens_to_ids(",</w>")
    chunks, current, last_comma = [], [], -1
    for fragment in fragments:
        if fragment is None:
            chunks.append(current)
            current, last_comma = [], -1
            continue
        text, weight = fragment
        for t in tok(text, add_special_tokens=False)["input_ids"]:
            if t == comma:
                last_comma = len(current)
            elif len(current) == 75 and last_comma != -1 and 75 - last_comma <= 20:
                chunks.append(current[:last_comma + 1])
                current, last_comma = current[last_comma + 1:], -1
            if len(current) == 75:
                chunks.append(current)
                current, last_comma = [], -1
            ids = groups.get(t, [t])
            if len(current) + len(ids) > 75:
                chunks.append(current)
                current, last_comma = [], -1
            current += [(i, weight) for i in ids]
    if current or not chunks:
        chunks.append(current)
    ids, weights = [], []
    for chunk in chunks:
        row = [tok.bos_token_id] + [t for t, _ in chunk] + [tok.eos_token_id]
        ids.append(row + [tok.pad_token_id] * (77 - len(row)))
        weights.append([1.0] + [w for _, w in chunk] + [1.0] * (76 - len(chunk)))
    return torch.tensor(ids), torch.tensor(weights, dtype=torch.float32)


SHIPPED_PIPELINE = Path(__file__).resolve().parents[1] / "sdjax" / "default_model" / "pipeline"
TINY_RUN = ["--H", "32", "--W", "32", "--ddim_steps", "1", "--n_samples", "1", "--skip_grid"]  # the fastest images


def cli_messages(stderr: str) -> list[str]:
    """The lines of the `sdjax` command's stderr that are messages, without its progress bars (tqdm redraws with
    \\r; a message after a bar starts a line of its own)."""
    parts = stderr.replace("\r", "\n").splitlines()
    return [p for p in parts if p.strip() and not re.match(r"^\S+: +\d+%\|", p)]


def cli_command(*args: str) -> tuple[list[str], dict]:
    """(argv, environment) of `python -m sdjax.cli *args` on the CPU, this checkout's sdjax first on the path."""
    import os

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    return [sys.executable, "-m", "sdjax.cli", *args], env


def run_cli(*args: str, timeout: float = 300):
    """`sdjax *args` in a fresh process (`cli_command`): subprocess.CompletedProcess with text stdout/stderr and
    `.messages` (`cli_messages` of stderr)."""
    import subprocess

    argv, env = cli_command(*args)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    done.messages = cli_messages(done.stderr)
    return done
