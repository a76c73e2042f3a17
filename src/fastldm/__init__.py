"""fastldm: a fast, compact latent diffusion engine in native PyTorch.

`fastldm.load(path)` -> Pipeline; `pipe.generate("a prompt")` -> GenerationResult. A request resolves into a
Plan (`pipe.plan(request)`) that `fastldm.run.run(pipe, plans)` executes, alone or batched. The top-level names are
imported on first use (PEP 562), so `import fastldm.config` or the CLI's `--help` stay fast.
"""
import importlib

__version__ = "0.1.0"
_WHERE = {"load": "api", "default_model": "api", "Pipeline": "pipeline", "GenerationRequest": "request",
          "GenerationResult": "run", "Plan": "plan", "Limits": "plan", "BatchedRun": "run",
          "export_3d": "tools.export3d"}
__all__ = [*_WHERE, "__version__"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'fastldm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
