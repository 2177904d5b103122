"""Which pipeline class loads a model: read `model_index.json` and pick the family (SD, SDXL, x4 upscaler)."""
from __future__ import annotations

import jax.numpy as jnp

from sdjax.pipelines.sd import StableDiffusionPipeline
from sdjax.pipelines.sdxl import StableDiffusionXLPipeline
from sdjax.pipelines.upscale import StableDiffusionUpscalePipeline

FAMILIES = (StableDiffusionXLPipeline, StableDiffusionUpscalePipeline, StableDiffusionPipeline)  # first match wins


def pipeline_class(index: dict) -> type:
    """The class that loads a folder with this model_index.json."""
    return next(klass for klass in FAMILIES if klass.accepts(index))


def from_pretrained(path_or_id, dtype=jnp.float32, param_dtype=None, vae_dtype=None, variant=None, mesh=None):
    """Load any supported diffusers pipeline folder (or hub id), or a single-file checkpoint, with the class its
    model_index.json (or its keys) call for. Every family is imported here, so the dispatch is complete."""
    return StableDiffusionPipeline.from_pretrained(path_or_id, dtype=dtype, param_dtype=param_dtype,
                                                   vae_dtype=vae_dtype, variant=variant, mesh=mesh)


def from_single_file(path, **options):
    """`StableDiffusionPipeline.from_single_file` with every family loaded."""
    return StableDiffusionPipeline.from_single_file(path, **options)
