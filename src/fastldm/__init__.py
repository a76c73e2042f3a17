"""fastldm: a fast, compact latent diffusion engine in native PyTorch.

`fastldm.load(path)` -> Pipeline; `pipe.generate("a prompt")` -> GenerationResult. The top-level names are
imported on first use (PEP 562), so `import fastldm.config` or the CLI's `--help` stay fast.
"""
__version__ = "0.1.0"
__all__ = ["load", "Pipeline", "GenerationRequest", "GenerationResult", "export_3d", "__version__"]


def __getattr__(name: str):
    if name == "load":
        from .api import load
        return load
    if name in ("Pipeline", "GenerationRequest", "GenerationResult"):
        from . import pipeline
        return getattr(pipeline, name)
    if name == "export_3d":
        from .tools.export3d import export_3d
        return export_3d
    raise AttributeError(f"module 'fastldm' has no attribute {name!r}")
