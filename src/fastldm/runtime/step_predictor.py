"""Step predictor: how many denoising steps a prompt needs with a given sampler, read off the prompt's own
text-encoder output before any denoising (StepSaver, Yu & Barad 2024, arXiv 2408.02054: a small model trained on
per-prompt labels, see tools/steps/labels.py).

Features (`prompt_features`), per text encoder of the model: the pooled embedding, the mean and standard deviation
of the final hidden states over the prompt's real tokens (BOS..EOS), and the token count / 77 — what the encoder
made of the prompt's objects, attributes and relations, learnt from rather than parsed.
Model (`StepPredictor`), ordinal (a cumulative-link model, McCullagh 1980): standardise, Linear -> GELU -> Linear
to one difficulty d per prompt, and P(label <= k) = F(k) = sigmoid(θ_k - d) with increasing cut-points θ over the
label grid; what lies above the last one is NEVER (a judged prompt that no count of the grid makes right). One
number per prompt instead of a distribution over the grid: labels are few and noisy (one seed per prompt), and a
harder prompt is taken to be less likely done at every count. Trained by the labels' likelihood.
Decision: a prompt gets the count k of the grid that maximises F(k) - cost·k: one more step must raise the chance
of a finished image by at least `cost`. Where more steps buy little (the prompt is done early, or likely NEVER)
it stops early; `cost` is chosen by cross-validation on the training prompts (tools/steps/train.py) and saved
with the predictor.
`ConstantSteps` is the fallback a predictor file may hold instead: one count for every prompt, when no
prompt-aware predictor beat the best fixed count for that sampler.

Saved as safetensors next to the model, one file per sampler: `<diffusers folder>/step_predictor/<sampler>.safetensors`
(for a single-file checkpoint `model.safetensors`: `model.step_predictor/<sampler>.safetensors`); the metadata says
the mode (predictor / constant), sampler, label kind (quality / ssim), grid, cost, the step range, the best
constant and, in `info`, how it was trained and its held-out results.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import StepPredictorMissing

FORMAT = "fastldm-step-predictor-2"

# Step counts an SSIM-labelled predictor may pick (SSIM to a many-step image is only a proxy for "done", so it is
# clamped to where a sampler is sensible). Second-order multistep solvers (the default: DPM++ 2M, UniPC) from 8:
# DPM-Solver++'s README calls them usable from ~10 NFE; first-order and stochastic samplers converge more slowly,
# so no lower either. Heun pays two UNet calls per step (its 4 steps are 7 calls, 30 already 59); LCM 1-8 (Luo et
# al. 2023 recommend 2-8). Up to 50: StepSaver's reference. A quality-labelled predictor (its labels are a judge's
# verdicts) may pick any count of its grid.
STEP_RANGES = {"heun": (4, 30), "lcm": (1, 8)}
DEFAULT_RANGE = (8, 50)


def step_range(sampler: str) -> tuple[int, int]:
    """(fewest, most) steps an SSIM-labelled predictor may pick for a sampler (its canonical name, e.g. "dpmpp_2m")."""
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
    """features (N, F) -> difficulty (N,); with the cut-points θ (K,) over `steps` (the label grid, K counts),
    F(k) = sigmoid(θ_k - difficulty)."""

    def __init__(self, n_features: int, steps: tuple[int, ...], sampler: str, hidden: int = 16, cost: float = 0.01,
                 kind: str = "quality", step_range: tuple[int, int] | None = None, constant: int | None = None):
        super().__init__()
        self.sampler, self.cost, self.kind, self.constant = sampler, float(cost), kind, constant
        self.range = tuple(step_range or (steps[0], steps[-1]))                   # (fewest, most) it may pick
        self.info: dict = {}
        self.register_buffer("steps", torch.tensor(steps, dtype=torch.long))    # (K,)
        self.register_buffer("mean", torch.zeros(n_features))                    # (F,) feature standardisation
        self.register_buffer("std", torch.ones(n_features))
        self.hidden = nn.Linear(n_features, hidden)
        self.out = nn.Linear(hidden, 1)
        self.cut0 = nn.Parameter(torch.zeros(1))                                 # θ_0
        self.gaps = nn.Parameter(torch.zeros(len(steps) - 1))                    # θ_k - θ_(k-1) = softplus(gap)

    def cut_points(self) -> torch.Tensor:
        """(K,) θ, increasing."""
        return torch.cat([self.cut0, self.cut0 + F.softplus(self.gaps).cumsum(0)])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) difficulty."""
        return self.out(F.gelu(self.hidden((features - self.mean) / self.std)))[:, 0]

    def cumulative(self, features: torch.Tensor) -> torch.Tensor:
        """(N, K) F(k) = P(label <= k) at each count of the grid (differentiable)."""
        return torch.sigmoid(self.cut_points()[None] - self(features.float())[:, None])

    def label_probs(self, features: torch.Tensor) -> torch.Tensor:
        """(N, K + 1) P(label = k) over the grid and NEVER (last)."""
        done = self.cumulative(features)                                                  # (N, K)
        ones = torch.ones_like(done[:, :1])
        return torch.diff(torch.cat([0 * ones, done, ones], dim=1), dim=1)                 # (N, K + 1)

    def prompt_features(self, pipe, prompts: list[str]) -> torch.Tensor:
        return prompt_features(pipe, prompts)

    @torch.no_grad()
    def done_by(self, features: torch.Tensor) -> torch.Tensor:
        """(N, K) F(k): the predicted probability that the prompt's image is done by each count of the grid."""
        return self.cumulative(features)

    def buckets(self, features: torch.Tensor, cost: float | None = None) -> torch.Tensor:
        """(N,) index into `steps` of the count maximising F(k) - cost·k (default cost: the saved one); ties go to
        the fewer steps."""
        c = self.cost if cost is None else cost
        return (self.done_by(features) - c * self.steps).argmax(dim=1)

    def predict_steps(self, features: torch.Tensor, cost: float | None = None) -> list[int]:
        """Step counts (N,) from `buckets`, clamped to the step range."""
        lo, hi = self.range
        return [min(max(int(s), lo), hi) for s in self.steps[self.buckets(features, cost)]]

    def save(self, path: str | Path, **info) -> Path:
        """Write the weights and metadata (and `info`: training settings, held-out results) as safetensors."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "mode": "predictor", "sampler": self.sampler, "kind": self.kind,
                "grid": json.dumps(self.steps.tolist()), "cost": repr(self.cost), "range": json.dumps(self.range),
                "constant": json.dumps(self.constant), "hidden": str(self.hidden.out_features),
                "info": json.dumps(info)}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)
        return path

    @classmethod
    def from_file(cls, path: Path, meta: dict) -> "StepPredictor":
        state = load_file(str(path))
        model = cls(state["mean"].numel(), tuple(state["steps"].tolist()), meta["sampler"], int(meta["hidden"]),
                    float(meta["cost"]), meta["kind"], tuple(json.loads(meta["range"])), json.loads(meta["constant"]))
        model.load_state_dict(state)
        return model.eval()


class ConstantSteps:
    """The fallback a predictor file may hold: every prompt gets `steps` (the best fixed count for the sampler,
    used where no prompt-aware predictor beat it); the features are not computed."""

    def __init__(self, steps: int, sampler: str, kind: str = "quality", grid: tuple[int, ...] = ()):
        self.constant, self.sampler, self.kind, self.grid = int(steps), sampler, kind, tuple(grid)
        self.info: dict = {}

    def prompt_features(self, pipe, prompts: list[str]) -> torch.Tensor:
        return torch.zeros(len(prompts), 0)                                       # (N, 0): nothing to read

    def predict_steps(self, features: torch.Tensor) -> list[int]:
        return [self.constant] * len(features)

    def save(self, path: str | Path, **info) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "mode": "constant", "sampler": self.sampler, "kind": self.kind,
                "grid": json.dumps(list(self.grid)), "constant": json.dumps(self.constant), "info": json.dumps(info)}
        save_file({}, str(path), metadata=meta)
        return path

    @classmethod
    def from_file(cls, path: Path, meta: dict) -> "ConstantSteps":
        return cls(json.loads(meta["constant"]), meta["sampler"], meta["kind"], tuple(json.loads(meta["grid"])))


def load_predictor_file(path: str | Path) -> StepPredictor | ConstantSteps:
    """A saved predictor or constant fallback, by the mode in its metadata; `.info` holds its training info."""
    path = Path(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastldm step predictor ({FORMAT}); train one with `fastldm steps train`")
    model = {"predictor": StepPredictor, "constant": ConstantSteps}[meta["mode"]].from_file(path, meta)
    model.info = json.loads(meta.get("info", "{}"))
    return model


def predictor_path(model_source: str | Path, sampler: str) -> Path:
    """Where the predictor for `sampler` (canonical name) lives next to a model folder or file."""
    src = Path(model_source)
    folder = src / "step_predictor" if src.is_dir() else src.with_name(src.stem + ".step_predictor")
    return folder / f"{sampler}.safetensors"


class StepPredictors:
    """The step predictors saved next to one model (a folder or file, `predictor_path`), each read once per
    file version (path, mtime, size: a rewritten file is read again) and kept in a bounded LRU. A Pipeline
    owns one; `steps="auto"` asks it on every request."""

    def __init__(self, model_source: str | Path | None, max_entries: int = 16):
        self.source, self.max_entries = model_source, max_entries
        self._entries: OrderedDict[tuple, StepPredictor | ConstantSteps] = OrderedDict()

    def get(self, spec) -> StepPredictor | ConstantSteps:
        """The predictor (or constant fallback) for sampler `spec` (a SamplerSpec)."""
        if self.source is None:
            raise StepPredictorMissing("steps='auto' needs a model loaded from disk (its step predictor lies next "
                                       "to it); give a number of steps")
        path = predictor_path(self.source, spec.name)
        if not path.exists():
            have = sorted(p.stem for p in path.parent.glob("*.safetensors"))
            raise StepPredictorMissing(f"no step predictor for sampler {spec.label} at {path} (have: "
                                       f"{', '.join(have) or 'none'}); give a number of steps, or build one with "
                                       "`fastldm steps label` and `fastldm steps train`")
        st = path.stat()
        key = (path.resolve(), st.st_mtime_ns, st.st_size)
        if key not in self._entries:
            self._entries[key] = load_predictor_file(path)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return self._entries[key]
