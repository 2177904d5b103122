"""sdjax: Stable Diffusion in JAX/Flax."""
import importlib

__version__ = "0.1.0"

_WHERE = {
    # the pipelines come from sdjax.pipelines.auto, which loads every family: StableDiffusionPipeline.from_pretrained
    # then finds the SDXL and upscaler classes for their folders
    "StableDiffusionPipeline": "sdjax.pipelines.auto",
    "StableDiffusionXLPipeline": "sdjax.pipelines.auto",
    "StableDiffusionUpscalePipeline": "sdjax.pipelines.auto",
    "CLIPReranker": "sdjax.rerank",
}

__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
