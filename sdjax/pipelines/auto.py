"""Which pipeline class loads a model: read `model_index.json` and pick the family (SD, SDXL, x4 upscaler)."""
from __future__ import annotations

import jax.numpy as jnp

from sdjax.pipelines import folder as folder_lib
from sdjax.pipelines.sd import StableDiffusionPipeline
from sdjax.pipelines.sdxl import StableDiffusionXLPipeline
from sdjax.pipelines.upscale import StableDiffusionUpscalePipeline

FAMILIES = (StableDiffusionXLPipeline, StableDiffusionUpscalePipeline, StableDiffusionPipeline)  # first match wins


def pipeline_class(index: dict) -> type:
    """The class that loads a folder with this model_index.json."""
    return next(klass for klass in FAMILIES if klass.accepts(index))


def from_pretrained(path_or_id, dtype=jnp.float32, param_dtype=None, vae_dtype=None, variant=None, mesh=None):
    """Load any supported diffusers pipeline folder (or hub id) with the class its model_index.json calls for."""
    folder, index = folder_lib.read_index(path_or_id)
    return pipeline_class(index).load_folder(folder, index, dtype=dtype, param_dtype=param_dtype,
                                             vae_dtype=vae_dtype, variant=variant, mesh=mesh)
