"""The pipelines: one compiled program (`program`), the shared host side (`base`), one module per model family
(`sd`, `sdxl`, `upscale`), the class picker (`auto`), folders (`folder`), images (`images`), random streams
(`noise`). Names are imported on first use, so `import sdjax.pipelines.noise` stays light."""
import importlib

_WHERE = {
    "StableDiffusionPipeline": "auto",
    "StableDiffusionXLPipeline": "auto",
    "StableDiffusionUpscalePipeline": "auto",
    "from_pretrained": "auto",
    "PipelineOutput": "base",
    "CompiledCall": "base",
    "Conditioning": "program",
    "enable_compilation_cache": "program",
}

__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
