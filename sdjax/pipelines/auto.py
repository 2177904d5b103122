"""Which pipeline class loads a model. Every family is imported here, so `StableDiffusionPipeline.load` finds the
subclass whose `accepts(model_index)` is true (SD, SDXL, x4 upscaler) for a folder or a single file."""
from __future__ import annotations

import jax.numpy as jnp

from sdjax.pipelines.sd import StableDiffusionPipeline
from sdjax.pipelines.sdxl import StableDiffusionXLPipeline
from sdjax.pipelines.upscale import StableDiffusionUpscalePipeline

__all__ = ["StableDiffusionPipeline", "StableDiffusionUpscalePipeline", "StableDiffusionXLPipeline", "from_pretrained",
           "from_single_file"]


def from_pretrained(path_or_id, dtype=jnp.float32, param_dtype=None, vae_dtype=None, variant=None, mesh=None):
    """Load any supported diffusers pipeline folder (or hub id), or a single-file checkpoint, with the class its
    model_index.json (or its keys) call for. Every family is imported here, so the dispatch is complete."""
    return StableDiffusionPipeline.from_pretrained(path_or_id, dtype=dtype, param_dtype=param_dtype,
                                                   vae_dtype=vae_dtype, variant=variant, mesh=mesh)


def from_single_file(path, **options):
    """`StableDiffusionPipeline.from_single_file` with every family loaded."""
    return StableDiffusionPipeline.from_single_file(path, **options)
