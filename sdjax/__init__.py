"""sdjax: Stable Diffusion in JAX/Flax."""
import importlib

__version__ = "0.1.0"

_WHERE = {
    "StableDiffusionPipeline": "sdjax.pipeline",
    "StableDiffusionXLPipeline": "sdjax.pipeline",
    "StableDiffusionUpscalePipeline": "sdjax.upscale",
    "CLIPReranker": "sdjax.rerank",
}

__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
