"""Dynamic execution: predict each prompt's step count, stop when converged, skip work that does not change
the result.

    ssim.py         SSIM (Wang et al. 2004), the similarity the step labels are made with
    labels.py       StepSaver-style labels: the fewest steps whose image is within SSIM τ of the 50-step one
    predictor.py    a small MLP over the prompt's text-encoder output -> step count per sampler (`steps="auto"`)
    early_stop.py   stop when the x0 prediction stops changing, then jump to σ = 0
    deep_cache.py   DeepCache feature reuse across adjacent UNet calls

The names below are imported on first use (PEP 562), so the CLI can read a default without importing torch.
"""
import importlib

_WHERE = {"DeepCache": "deep_cache", "DEFAULT_THRESHOLD": "early_stop", "EarlyStop": "early_stop",
          "LabelTable": "labels", "STEP_GRID": "labels", "build_label_table": "labels",
          "StepPredictor": "predictor", "evaluate_predictor": "predictor", "load_step_predictor": "predictor",
          "predictor_path": "predictor", "prompt_features": "predictor", "step_range": "predictor",
          "train_step_predictor": "predictor", "train_from_table": "predictor", "ssim": "ssim"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'fastldm.adaptive' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
