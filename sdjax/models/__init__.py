"""sdjax networks: Flax (nnx) ports of the CLIP encoders, the VAE and the UNet."""
import importlib

_WHERE = {
    "CLIPTextModel": "clip",
    "CLIPTextModelWithProjection": "clip",
    "CLIPVisionModelWithProjection": "clip",
    "CLIPModel": "clip",
    "AutoencoderKL": "vae",
    "UNet2DConditionModel": "unet",
}

__all__ = list(_WHERE)


def __getattr__(name):
    # Imported on first use so that `import sdjax` stays cheap.
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
