"""Step predictor: how many denoising steps a prompt needs with a given sampler, read off the prompt's own
text-encoder output before any denoising (StepSaver, Yu & Barad 2024, arXiv 2408.02054: a small model trained on
per-prompt convergence labels, see labels.py).

Features (`prompt_features`), per text encoder of the model: the pooled embedding, the mean and standard deviation
of the final hidden states over the prompt's real tokens (BOS..EOS), and the token count / 77.
Model (`StepPredictor`): standardise, Linear -> GELU -> Linear to one logit per step count of the label grid,
trained with cross-entropy on the labels. A prediction is the smallest step count whose cumulative probability
reaches `quantile`: quantile 0.5 is the median; higher values trade steps for fewer under-predictions (an
under-predicted prompt loses quality, an over-predicted one only time).

Saved as safetensors next to the model, one file per sampler: `<diffusers folder>/step_predictor/<sampler>.safetensors`
(for a single-file checkpoint `model.safetensors`: `model.step_predictor/<sampler>.safetensors`), with the step grid,
sampler and quantile in the file's metadata.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "fastldm-step-predictor-1"

# Step counts a sampler is sensible at. Second-order multistep solvers (the default: DPM++ 2M, UniPC) from 8:
# DPM-Solver++'s README calls them usable from ~10 NFE, and on the embedded model DPM++ 2M's evaluator accuracy
# was 8 / 19 / 25 / 27 % at 4 / 6 / 8 / 10 steps against 26 % at 20 (320 training captions, docs/benchmarks.md);
# first-order and stochastic samplers converge more slowly, so no lower either. Heun pays two UNet calls per
# step (its 4 steps are 7 calls, 30 already 59); LCM 1-8 (Luo et al. 2023 recommend 2-8). Up to 50: the label
# grid's reference.
STEP_RANGES = {"heun": (4, 30), "lcm": (1, 8)}
DEFAULT_RANGE = (8, 50)


def step_range(sampler: str) -> tuple[int, int]:
    """(fewest, most) steps `steps="auto"` may pick for a sampler (its canonical name, e.g. "dpmpp_2m")."""
    return STEP_RANGES.get(sampler, DEFAULT_RANGE)


@torch.no_grad()
def prompt_features(pipe, prompts: list[str]) -> torch.Tensor:
    """Prompts -> features (N, F) float32 on the CPU from the pipeline's text encoder(s): per encoder the pooled
    embedding (P), mean and std of the final hidden states over BOS..EOS (C each), and the token count / 77.
    The prompt is read as written (first 75 tokens; no (word:1.2) weighting)."""
    feats = []
    for encoder, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        if encoder is None:
            continue
        tok = tok or pipe.tokenizer
        ids = tok(prompts).to(pipe.device)                                        # (N, 77)
        enc = encoder(ids)
        hidden = enc.hidden.float()                                               # (N, 77, C)
        n = (ids == tok.eos_id).int().argmax(dim=1) + 1                           # (N,) tokens up to the first EOS
        mask = (torch.arange(ids.shape[1], device=ids.device)[None] < n[:, None]).float()[..., None]  # (N, 77, 1)
        count = n[:, None].float()                                                # (N, 1)
        mean = (hidden * mask).sum(1) / count                                     # (N, C)
        std = (((hidden - mean[:, None]) ** 2 * mask).sum(1) / count).sqrt()      # (N, C)
        feats += [enc.pooled.float(), mean, std, count / ids.shape[1]]
    return torch.cat(feats, dim=1).cpu()                                          # (N, F)


class StepPredictor(nn.Module):
    """features (N, F) -> logits (N, K) over `steps` (the label grid, K counts)."""

    def __init__(self, n_features: int, steps: tuple[int, ...], sampler: str, hidden: int = 64,
                 quantile: float = 0.5):
        super().__init__()
        self.sampler, self.quantile = sampler, float(quantile)
        self.register_buffer("steps", torch.tensor(steps, dtype=torch.long))    # (K,)
        self.register_buffer("mean", torch.zeros(n_features))                    # (F,) feature standardisation
        self.register_buffer("std", torch.ones(n_features))
        self.hidden = nn.Linear(n_features, hidden)
        self.out = nn.Linear(hidden, len(steps))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.hidden((features - self.mean) / self.std)))

    @torch.no_grad()
    def buckets(self, features: torch.Tensor, quantile: float | None = None) -> torch.Tensor:
        """(N,) index into `steps` of the first bucket whose cumulative probability reaches `quantile`
        (default: the saved one)."""
        q = self.quantile if quantile is None else quantile
        cdf = self(features.float()).softmax(dim=1).cumsum(dim=1)                 # (N, K)
        return (cdf < q - 1e-6).sum(dim=1).clamp(max=len(self.steps) - 1)

    def predict_steps(self, features: torch.Tensor, quantile: float | None = None) -> list[int]:
        """Step counts (N,) from `buckets`, clamped to the sampler's sensible range (step_range)."""
        lo, hi = step_range(self.sampler)
        return [min(max(int(s), lo), hi) for s in self.steps[self.buckets(features, quantile)]]

    def save(self, path: str | Path, **info) -> Path:
        """Write the weights and metadata (grid, sampler, quantile, and `info` such as τ) as safetensors."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "sampler": self.sampler, "quantile": repr(self.quantile),
                "hidden": str(self.hidden.out_features), "info": json.dumps(info)}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "StepPredictor":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a fastldm step predictor ({FORMAT}); train one with `fastldm steps train`")
        state = load_file(str(path))
        model = cls(state["mean"].numel(), tuple(state["steps"].tolist()), meta["sampler"], int(meta["hidden"]),
                    float(meta["quantile"]))
        model.load_state_dict(state)
        model.info = json.loads(meta.get("info", "{}"))
        return model.eval()


def predictor_path(model_source: str | Path, sampler: str) -> Path:
    """Where the predictor for `sampler` (canonical name) lives next to a model folder or file."""
    src = Path(model_source)
    folder = src / "step_predictor" if src.is_dir() else src.with_name(src.stem + ".step_predictor")
    return folder / f"{sampler}.safetensors"


def load_step_predictor(model_source: str | Path | None, spec) -> StepPredictor:
    """The predictor saved next to the model for sampler `spec` (a SamplerSpec)."""
    if model_source is None:
        raise ValueError("steps='auto' needs a model loaded from disk (its step predictor lies next to it); "
                         "give a number of steps")
    path = predictor_path(model_source, spec.name)
    if not path.exists():
        have = sorted(p.stem for p in path.parent.glob("*.safetensors"))
        raise FileNotFoundError(f"no step predictor for sampler {spec.label} at {path} (have: "
                                f"{', '.join(have) or 'none'}); give a number of steps, or build one with "
                                "`fastldm steps label` and `fastldm steps train`")
    st = path.stat()
    return _load_cached(path.resolve(), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _load_cached(path: Path, mtime_ns: int, size: int) -> StepPredictor:
    """Read once per file version: `steps="auto"` asks on every request, and a rewritten file (new mtime
    or size) is read again."""
    return StepPredictor.load(path)
