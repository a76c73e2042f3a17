"""What a model worker in another process (model_worker.py) and the HTTP process (remote_scheduler.py) say to
each other about one job: plain picklable records, no threads, locks or callbacks inside.

A job's stream, in order: Refused (the request was not queued: its error, e.g. RequestError 422 or QueueFull
429, and nothing follows), or Accepted, then Started, then Step for each denoising step (a slow reader gets
the latest), then one of Done, Failed, Cancelled. Plans and errors pickle (SamplerSpec and FastLDMError define
how); a result travels without its latents and raw float images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import Plan
from ..run import GenerationResult
from .preview import LatentPreview


@dataclass(frozen=True)
class ModelInfo:
    name: str               # the listed name
    model_hash: str         # A1111's short hash


@dataclass(frozen=True)
class Refused:
    error: BaseException


@dataclass(frozen=True)
class Accepted:
    job_id: str             # "<worker id>.<job>": the worker that owns it (ray_app.py routes controls by it)
    model: ModelInfo
    plan: Plan
    created: float


@dataclass(frozen=True)
class Started:
    started: float
    projection: LatentPreview    # the worker's latent -> RGB map, for previews drawn by the HTTP process


@dataclass(frozen=True)
class Step:
    step: int
    steps: int
    eta_s: float | None
    x0: torch.Tensor        # (C, h, w) image 0's x0 estimate, on the CPU


@dataclass(frozen=True)
class Done:
    result: GenerationResult
    infotexts: list[str]
    finished: float


@dataclass(frozen=True)
class Failed:
    error: BaseException
    finished: float


@dataclass(frozen=True)
class Cancelled:
    error: BaseException
    finished: float


ENDS = (Refused, Done, Failed, Cancelled)
