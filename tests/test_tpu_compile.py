"""The pipeline's own program lowers and compiles for a TPU slice, on this CPU, with no TPU attached.

libtpu (`pip install "jax[tpu]"`, in the test extra) holds the TPU compiler; `jax.experimental.topologies` gives the
devices of a v5e 2x2 slice (4 chips) to compile for. The pipelines are built shape-only from tiny random folders
on a `data` mesh of those devices; the call is made as a user makes it and the program it would run is lowered and
compiled instead (`bench/tpu_aot.py` does the same with the real models and reads the TPU compiler's memory and
FLOPs). What is checked is the TPU compiler's own plan: every chip holds all the weights and one image of the batch.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

# libtpu takes a lock file per process unless told that several processes may load it (bench/tpu_aot.py may run)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
pytest.importorskip("libtpu")
pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from sdjax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel  # noqa: E402
from sdjax.models.clip import CLIPTextModelWithProjection  # noqa: E402
from sdjax.pipelines.sd import StableDiffusionPipeline  # noqa: E402
from sdjax.pipelines.sdxl import StableDiffusionXLPipeline  # noqa: E402
from sdjax.pipelines.upscale import StableDiffusionUpscalePipeline  # noqa: E402
from sdjax.tokenizer import Tokenizer  # noqa: E402

from pipeline_fixtures import build_pipeline, build_sdxl, build_upscaler, smooth_image  # noqa: E402

TOPOLOGY = "v5e:2x2"
CHIPS = 4


@pytest.fixture(scope="module")
def mesh():
    devices = topologies.get_topology_desc(TOPOLOGY, "tpu").devices
    assert len(devices) == CHIPS and all(d.platform == "tpu" for d in devices)
    return Mesh(np.asarray(devices), ("data",))


def _config(folder, part):
    return json.loads((folder / part / "config.json").read_text())


def _scheduler(folder, part="scheduler"):
    return json.loads((folder / part / "scheduler_config.json").read_text())


def _abstract(klass, folder, part, dtype):
    return klass.abstract(_config(folder, part), dtype=dtype)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpu")
    return dict(sd=build_pipeline(root / "sd"), sdxl=build_sdxl(root / "sdxl"),
                refiner=build_sdxl(root / "refiner", refiner=True), upscaler=build_upscaler(root / "up"))


def sd_pipeline(folder, mesh, dtype=jnp.bfloat16):
    return StableDiffusionPipeline(
        tokenizer=Tokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=_abstract(CLIPTextModel, folder, "text_encoder", dtype),
        vae=_abstract(AutoencoderKL, folder, "vae", dtype), unet=_abstract(UNet2DConditionModel, folder, "unet", dtype),
        scheduler_config=_scheduler(folder), mesh=mesh)


def sdxl_pipeline(folder, mesh, refiner=False, dtype=jnp.bfloat16):
    index = json.loads((folder / "model_index.json").read_text())
    return StableDiffusionXLPipeline(
        tokenizer=None if refiner else Tokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=None if refiner else _abstract(CLIPTextModel, folder, "text_encoder", dtype),
        tokenizer_2=Tokenizer.from_pretrained(folder / "tokenizer_2"),
        text_encoder_2=_abstract(CLIPTextModelWithProjection, folder, "text_encoder_2", dtype),
        vae=_abstract(AutoencoderKL, folder, "vae", dtype), unet=_abstract(UNet2DConditionModel, folder, "unet", dtype),
        scheduler_config=_scheduler(folder), force_zeros_for_empty_prompt=index["force_zeros_for_empty_prompt"],
        requires_aesthetics_score=index.get("requires_aesthetics_score", False), mesh=mesh)


def upscaler_pipeline(folder, mesh, dtype=jnp.bfloat16):
    return StableDiffusionUpscalePipeline(
        tokenizer=Tokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=_abstract(CLIPTextModel, folder, "text_encoder", dtype),
        vae=_abstract(AutoencoderKL, folder, "vae", dtype), unet=_abstract(UNet2DConditionModel, folder, "unet", dtype),
        scheduler_config=_scheduler(folder), low_res_scheduler_config=_scheduler(folder, "low_res_scheduler"),
        mesh=mesh)


def compile_call(pipe, **call):
    """(plan, compiled) of the program `pipe(**call)` would run: the call prepares its inputs (shapes only, with
    their shardings, on compile-only devices) and the pipeline's own jitted program is lowered and compiled."""
    got = pipe.compile_call(**call)
    return got.plan, got.compiled


def weight_bytes(*modules) -> int:
    return sum(x.size * x.dtype.itemsize for m in modules for x in jax.tree.leaves(nnx.state(m)))


def entry_result(compiled) -> tuple[str, tuple]:
    """(dtype, shape) of one chip's result, from the TPU compiler's partitioned program."""
    m = re.search(r"^ENTRY .*\) -> (\w+)\[([\d,]*)\]", compiled.as_text(), re.M)
    return m.group(1), tuple(int(d) for d in m.group(2).split(","))


def check_per_chip(compiled, plan, weights: int, image: tuple, dtype: str = "f32"):
    """The TPU compiler's plan for one chip: one image of the batch (`image` (h, w, c)), all the weights."""
    assert plan.batch == CHIPS
    out = compiled.output_shardings
    assert out.mesh.devices.size == CHIPS and {d.platform for d in out.device_set} == {"tpu"}
    assert entry_result(compiled) == (dtype, (1, *image))  # one image per chip, not the batch of four
    memory = compiled.memory_analysis()
    # replicated weights, once (TPU layouts pad small arrays to whole tiles, hence not an equality)
    assert weights <= memory.argument_size_in_bytes < 2 * weights
    assert memory.temp_size_in_bytes > 0 and memory.generated_code_size_in_bytes > 0
    assert flops(compiled) > 0


def flops(compiled) -> float:
    """The TPU compiler's FLOPs of one chip's program."""
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_sd_txt2img_compiles_for_v5e(folders, mesh):
    pipe = sd_pipeline(folders["sd"], mesh)
    pipe.enable_attention_chunking(64)
    pipe.enable_vae_tiling(tile_size=32)
    call = dict(prompt="a red circle", negative_prompt="blurry", height=64, width=64, num_inference_steps=4,
                guidance_scale=7.5, sampler="dpmpp_2m", output_type="np")
    plan, compiled = compile_call(pipe, **call, num_images_per_prompt=CHIPS)
    assert (plan.mode, plan.cfg, plan.latent_hw, plan.vae_tiling) == ("txt2img", True, (32, 32), True)
    # the VAE's encoder is not an argument of txt2img (jit drops unused weights)
    used = weight_bytes(pipe.text_encoder, pipe.unet, pipe.vae.decoder, pipe.vae.post_quant_conv)
    check_per_chip(compiled, plan, used, (64, 64, 3))
    # one image: its chips split the guided pair (2) and the latents' height (2) instead of computing padding
    # images: each chip does less than the half that splitting the pair alone would leave (0.37 of one image's
    # work measured with this tiny model, whose text encoder, not split, weighs more than SD 1.5's)
    one_plan, one = compile_call(pipe, **call)
    assert (one_plan.layout.batch, one_plan.layout.pair, one_plan.layout.space) == (1, 2, 2)
    assert flops(one) < 0.5 * flops(compiled)


def test_sdxl_base_to_refiner_compiles_for_v5e(folders, mesh):
    base = sdxl_pipeline(folders["sdxl"], mesh)
    refiner = sdxl_pipeline(folders["refiner"], mesh, refiner=True)
    call = dict(prompt=["a cat"] * CHIPS, num_inference_steps=8, guidance_scale=5.0, sampler="euler")
    plan, compiled = compile_call(base, **call, height=64, width=64, denoising_end=0.8, output_type="latent")
    assert (plan.mode, plan.decode) == ("txt2img", False)
    used = weight_bytes(base.text_encoder, base.text_encoder_2, base.unet)
    side = 64 // base.vae_scale_factor
    check_per_chip(compiled, plan, used, (side, side, 4))
    latents = np.zeros((CHIPS, side, side, 4), np.float32)
    plan, compiled = compile_call(refiner, **call, image=latents, denoising_start=0.8, output_type="np")
    assert (plan.mode, plan.image_is_latents) == ("img2img", True)
    used = weight_bytes(refiner.text_encoder_2, refiner.unet, refiner.vae.decoder, refiner.vae.post_quant_conv)
    check_per_chip(compiled, plan, used, (64, 64, 3))


def test_upscaler_tile_compiles_for_v5e(folders, mesh):
    pipe = upscaler_pipeline(folders["upscaler"], mesh)
    plan, compiled = compile_call(pipe, prompt=["a cat"] * CHIPS, image=[smooth_image(24, 24)] * CHIPS, tile_size=16,
                                  tile_overlap=4,
                                  num_inference_steps=4, guidance_scale=9.0, noise_level=20, output_type="np")
    assert plan.latent_hw == (16, 16)  # the first tile's program (each tile runs the same one)
    used = weight_bytes(pipe.text_encoder, pipe.unet, pipe.vae.decoder, pipe.vae.post_quant_conv)
    check_per_chip(compiled, plan, used, (64, 64, 3))
