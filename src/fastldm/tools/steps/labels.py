"""Step labels: how many denoising steps each prompt needs, measured by generating it at a grid of step counts
with one fixed seed and sampler (StepSaver, Yu & Barad 2024, arXiv 2408.02054, §3). Two kinds:

* **quality** (when a judge ran, e.g. ShapesWorld's evaluator for the embedded model): the fewest steps whose
  image the judge passes *and* passes at every larger count of the grid — an image that is right, then wrong
  again, is not done yet. A prompt whose image fails at the largest count gets NEVER (0): no count on the grid
  makes it right, so more steps buy nothing for it.
* **ssim** (StepSaver's, for models without a judge): the fewest steps whose image is within SSIM τ of the
  image at the most steps (steps[-1]).

A `LabelTable` keeps the whole SSIM matrix and the judge's verdict matrix (prompts x step counts), so the
kind and τ can be changed without generating again; the verdict matrix also gives each fixed count's accuracy.
Images are rendered in batches of prompts through the pipeline's own conditioning, denoiser and sampler, with the
noise of prompt i drawn from its own generator seeded `seed + i` — the image `pipe.generate(prompt, seed=seed + i)`
gives, up to batched-matmul rounding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...request import GenerationRequest
from ...run import run
from ...samplers import resolve_sampler
from ..ssim import ssim

# Every count up to 8, where most judged labels lie on the embedded model (docs/benchmarks.md), then 10, 12, 16 and
# 20 (the usual fixed default), the last ones also the "stays right" checks. 94 steps a prompt: the grid is what a
# label costs.
STEP_GRID = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20)
DEFAULT_TAU = 0.9           # SSIM labels' threshold when none is given
NEVER = 0                   # quality label of a prompt whose image is wrong at the largest count
FORMAT = "fastldm-step-labels-1"


def quality_labels(passed, steps) -> np.ndarray:
    """Verdicts (N, K) at the counts `steps` (K, increasing) -> (N,) the fewest steps from which every verdict
    is a pass, NEVER where the last one fails."""
    passed = np.asarray(passed, dtype=bool)                                      # (N, K)
    stays = np.flip(np.logical_and.accumulate(np.flip(passed, 1), axis=1), 1)    # (N, K): pass here and after
    first = stays.argmax(axis=1)
    return np.where(stays[:, -1], np.asarray(steps)[first], NEVER)


@dataclass
class LabelTable:
    """SSIM of every prompt's image at every step count to its image at steps[-1]; `passed` the judge's verdicts."""
    model: str
    sampler: str                  # canonical name (SamplerSpec.name)
    scheduler: str | None
    guidance: float
    width: int
    height: int
    steps: tuple[int, ...] = STEP_GRID
    tau: float = DEFAULT_TAU
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    ssim: list[list[float]] = field(default_factory=list)          # (N, K)
    passed: list[list[bool]] | None = None                         # (N, K) when a judge ran

    @property
    def kind(self) -> str:
        """The labels this table gives by default: "quality" when a judge ran, else "ssim"."""
        return "ssim" if self.passed is None else "quality"

    def labels(self, kind: str | None = None, tau: float | None = None) -> np.ndarray:
        """(N,) step counts: quality labels (quality_labels) or SSIM ones — the fewest steps whose SSIM to the
        reference reaches τ (the reference count when none does). kind None: the table's `kind`."""
        kind = kind or self.kind
        if kind == "quality":
            if self.passed is None:
                raise ValueError("quality labels need a judge's verdicts; this table has none (label with a judge)")
            return quality_labels(self.passed, self.steps)
        if kind != "ssim":
            raise ValueError(f"unknown label kind {kind!r}; use 'quality' or 'ssim'")
        reach = np.asarray(self.ssim) >= (self.tau if tau is None else tau)      # (N, K)
        first = np.where(reach.any(axis=1), reach.argmax(axis=1), len(self.steps) - 1)
        return np.asarray(self.steps)[first]

    def accuracy(self, steps) -> float:
        """The judge's pass rate when prompt i runs steps[i] steps (a count of the grid), or every prompt the
        same count."""
        passed, grid = np.asarray(self.passed, dtype=bool), list(self.steps)                     # (N, K)
        steps = np.broadcast_to(np.asarray(steps), (len(passed),))
        return float(passed[np.arange(len(passed)), [grid.index(int(s)) for s in steps]].mean())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": FORMAT, **self.__dict__}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LabelTable":
        data = json.loads(Path(path).read_text())
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a fastldm label table; make one with `fastldm steps label`")
        data["steps"] = tuple(data["steps"])
        return cls(**data)


def shapes_judge(prompt: str, raw: np.ndarray) -> bool:
    """ShapesWorld's evaluator on one decoded RGBD image (H, W, 4) in [0, 1]: does it pass every attribute?"""
    from ..shapes.evaluate import evaluate

    rgb = (raw[..., :3] * 255).round().astype(np.uint8)
    depth = raw[..., 3] if raw.shape[-1] > 3 else None
    return all(evaluate(prompt, rgb, depth).values())


@torch.no_grad()
def render(pipe, prompts: list[str], seeds: list[int], steps: int | list[int], sampler: str = "DPM++ 2M",
           scheduler: str | None = None, guidance: float | None = None, width: int | None = None,
           height: int | None = None, callbacks=None) -> np.ndarray:
    """Txt2img images through the run loop (fastldm.run, one batched run), prompt i from seed i with steps[i]
    (or `steps` for all) -> (B, H, W, C) float32 in [0, 1]: the images `pipe.generate(prompt, seed=s, ...)`
    gives. guidance None: the model's default. `callbacks`: one per-step callback per prompt, or None."""
    counts = steps if isinstance(steps, list) else [steps] * len(prompts)
    plans = [pipe.plan(GenerationRequest(p, steps=n, sampler=sampler, scheduler=scheduler, guidance=guidance,
                                         seed=s, width=width, height=height))
             for p, s, n in zip(prompts, seeds, counts, strict=True)]
    return np.concatenate([r.raw for r in run(pipe, plans, callbacks)])


def build_label_table(pipe, prompts: list[str], sampler: str = "DPM++ 2M", *, scheduler: str | None = None,
                      guidance: float | None = None, width: int | None = None, height: int | None = None,
                      steps: tuple[int, ...] = STEP_GRID, tau: float | None = None, seed: int = 0, batch: int = 8,
                      judge: Callable[[str, np.ndarray], bool] | None = None, table: LabelTable | None = None,
                      on_batch: Callable[[LabelTable], None] | None = None) -> LabelTable:
    """Label `prompts` (prompt i with seed `seed + i`): render each at every count of `steps`, SSIM (all output
    channels: RGB, and depth for RGBD models) against the image at steps[-1], and the judge's verdicts.
    `table`: a partial table of the same prompts to resume; `on_batch(table)` after every batch (to save it).
    guidance None: the model's default."""
    spec = resolve_sampler(sampler, scheduler)
    guidance = pipe.config.default_guidance if guidance is None else guidance
    width, height = width or pipe.config.default_size, height or pipe.config.default_size
    if table is None:
        table = LabelTable(pipe.name, spec.name, scheduler, guidance, width, height, tuple(steps),
                           DEFAULT_TAU if tau is None else tau,
                           passed=[] if judge is not None else None)
    if ((table.sampler, table.guidance, tuple(table.steps)) != (spec.name, guidance, tuple(steps))
            or table.prompts != prompts[:len(table.prompts)] or (judge is None) != (table.passed is None)):
        raise ValueError("the table to resume was made with other prompts, sampler, guidance, step grid or judge; "
                         "give a new output file")
    for start in range(len(table.prompts), len(prompts), batch):
        chunk = prompts[start:start + batch]
        seeds = [seed + i for i in range(start, start + len(chunk))]
        B = len(chunk)   # every step count of every prompt of the chunk in one batched run
        grid = render(pipe, chunk * len(steps), seeds * len(steps), [n for n in steps for _ in chunk], sampler,
                      scheduler, guidance, width, height)                         # (K·B, H, W, C)
        images = [grid[k * B:(k + 1) * B] for k in range(len(steps))]            # K x (B, H, W, C)
        reference = images[-1]
        sims = np.stack([ssim(img, reference) for img in images], axis=1)        # (B, K)
        table.prompts += chunk
        table.seeds += seeds
        table.ssim += sims.round(5).tolist()
        if judge is not None:
            table.passed += [[bool(judge(p, img[b])) for img in images] for b, p in enumerate(chunk)]
        if on_batch is not None:
            on_batch(table)
    return table
