"""Plans -> results: the one denoising loop, for every caller (generate, step labelling, benchmarks, the server).

A `BatchedRun` holds the requests (Jobs) of one pipeline that are in flight. Each job is its sampler's step
generator (samplers/common.py), its conditioning and noise, and its UNet executor. `step()` answers every
job's pending denoiser request: the UNet inputs of jobs that share an executor and input shapes (latent size,
text length, conditioning kinds) are concatenated and run as one UNet call, and each job's slice of the output
goes back to its own sampler with its own guidance. A job leaves when its own steps are done (its latents are
decoded then), and a new job can be added between any two steps: it joins the next UNet batch. That is
step-level ("continuous") batching; `run` is the same loop for a fixed list of plans.

Each request gets exactly the noise, seeds and sampler arithmetic it gets alone; only the UNet's batched
matrix products can round differently (see tests/test_run.py for the bound observed).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .denoiser import Denoiser, call_unet
from .errors import Cancelled, FastLDMError, MemoryBudgetError
from .plan import Plan
from .request import GenerationRequest
from .runtime.context_kv import ContextKV
from .runtime.early_stop import EarlyStop
from .samplers import Steps, randn, start, to_vp

Callback = Callable[[dict], "bool | None"]


@dataclass
class GenerationResult:
    images: list[Image.Image]
    depths: list[np.ndarray] | None       # uint16 (H, W) per image for RGBD models, else None
    seeds: list[int]
    steps: int                            # denoising steps actually run (early stop may cut them)
    request: GenerationRequest
    latents: torch.Tensor | None = None   # final UNet latents (B, C, h, w)
    raw: np.ndarray | None = field(default=None, repr=False)  # decoded images (B, H, W, C) float in [0, 1]
    plan: Plan | None = field(default=None, repr=False)


@dataclass(eq=False)
class Job:
    """One plan in flight. `pending` is the (x, σ) its sampler waits on; `result` or `error` once it ends."""
    plan: Plan
    denoiser: Denoiser
    executor: object
    steps: Steps | None = None
    pending: tuple[torch.Tensor, torch.Tensor] | None = None
    final: torch.Tensor | None = None     # the sampler's last x (σ-space)
    steps_run: int = 0
    stopped: bool = False                 # a callback (early stop, the caller) ended it with its x0 estimate
    result: GenerationResult | None = None
    error: BaseException | None = None
    # The text's cross-attention keys and values, kept from its first UNet call (runtime/context_kv.py) where the
    # job runs alone on an eager executor and without a memory budget (the cache is ~15 MB for SD 1.5, guided).
    context_kv: ContextKV | None = None

    @property
    def done(self) -> bool:
        return self.pending is None


class BatchedRun:
    """The jobs of one pipeline in flight; see the module docstring. Not thread-safe: one owner drives it."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.jobs: list[Job] = []

    def __len__(self) -> int:
        return len(self.jobs)

    @torch.no_grad()
    def add(self, plan: Plan, callback: Callback | None = None) -> Job:
        """Encode the prompt (and init image), draw the noise and start the sampler; the job joins the next
        `step`. `callback(info)` after each of its steps ({"i", "total", "sigma", "sigma_next", "x",
        "denoised"}); returning True stops it with the current x0 estimate."""
        pipe = self.pipe
        with pipe.kernels_active():
            gens = [torch.Generator("cpu").manual_seed(s) for s in plan.seeds]
            cond, uncond = pipe.conditioning([plan.request.prompt] * plan.n, plan.request.negative_prompt, plan.guidance,
                                             plan.width, plan.height)
            init = None if plan.request.init_image is None else pipe.encode_image(
                plan.request.init_image, plan.width, plan.height, gens, plan.memory)
            noise = torch.cat([randn((1, *plan.latent_shape), g, pipe.device, torch.float32) for g in gens])
            extra = pipe.image_condition(plan.width, plan.height, gens, plan.memory)
            cond |= extra
            if uncond is not None:
                uncond |= extra
        executor = pipe.unet_runtime.executor(plan.executor, plan.request.cache_interval)
        denoiser = Denoiser(executor, pipe.schedule, cond, uncond, plan.guidance,
                            guidance_embedding_dim=pipe.config.unet.time_cond_proj_dim).on_grid(plan.grid)
        job = Job(plan, denoiser, executor)
        if plan.executor in ("eager", "deep_cache") and (plan.memory is None or (
                plan.memory.budget is None and plan.memory.mode != "low")):
            job.context_kv = ContextKV()
        early_stop = EarlyStop(plan.request.early_stop) if plan.request.early_stop is not None else None

        def on_step(info: dict) -> bool:
            job.steps_run = info["i"] + 1
            # Under DeepCache a cached call's x0 estimate reuses the last full call's deep features, so it barely
            # moves: judge convergence only between full calls (a longer span, so a more cautious stop).
            fresh = getattr(executor, "last_full", True)
            converged = early_stop(info) if early_stop is not None and fresh else False
            job.stopped = bool(callback(info) if callback is not None else False) or converged
            return job.stopped

        job.steps = start(plan.sampler, plan.grid, noise, init, generator=gens, callback=on_step)
        self._advance(job, lambda: next(job.steps))
        if job.error is None:
            self.jobs.append(job)
        return job

    @torch.no_grad()
    def step(self) -> list[Job]:
        """One denoiser evaluation for every job in flight (one UNet call per group of compatible jobs);
        returns the jobs that ended in this step, finished (result) or failed (error)."""
        groups: dict[tuple, list[tuple[Job, dict]]] = {}
        if self.jobs:
            self.pipe.acquire("unet")  # a staged UNet is loaded (and staged text encoders or VAE released)
        with self.pipe.kernels_active():
            for job in self.jobs:
                inputs = job.denoiser.inputs(*job.pending)
                key = (id(job.executor), tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in inputs.items()))
                groups.setdefault(key, []).append((job, inputs))
            for members in groups.values():
                self._run_group(members)
            ended = [job for job in self.jobs if job.done]
            for job in ended:
                if job.error is None:
                    try:
                        job.result = self._decode(job)
                    except Exception as e:
                        job.error = _user_error(e)
        self.jobs = [job for job in self.jobs if not job.done]
        if not self.jobs:
            self.pipe.residency.release_all()  # a memory plan's staged components are held only while used
        return ended

    def cancel(self, job: Job, error: BaseException | None = None) -> None:
        """End `job` now (it fails with `error`, by default Cancelled); the others go on."""
        if job in self.jobs:
            self.jobs.remove(job)
            job.steps.close()
            job.pending, job.error = None, error or Cancelled("the request was cancelled")

    def _run_group(self, members: list[tuple[Job, dict]]) -> None:
        first = members[0][1]
        batch = first if len(members) == 1 else {k: torch.cat([inp[k] for _, inp in members]) for k in first}
        kv = members[0][0].context_kv if len(members) == 1 else None   # a batch's context is new at every step
        try:
            with kv.active() if kv is not None else contextlib.nullcontext():
                out = self._call(members, batch)
        except Exception as e:  # the whole group fails; jobs in other groups go on
            for job, _ in members:
                self._fail(job, e)
            return
        rows = out.split([inp["sample"].shape[0] for _, inp in members])
        for (job, _), part in zip(members, rows):
            x, sigma = job.pending
            self._advance(job, lambda: job.steps.send(job.denoiser.output(part, x, sigma)))

    @staticmethod
    def _call(members: list[tuple[Job, dict]], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One UNet call for the group, or several of at most the rows its memory plans allow (sequential CFG
        when that is one image's half: the rows are independent, so only GEMM rounding can differ). A DeepCache
        executor keeps per-call features, so its batch is never cut."""
        executor = members[0][0].executor
        limits = [job.plan.memory.unet_batch for job, _ in members
                  if job.plan.memory is not None and job.plan.memory.unet_batch is not None]
        rows = batch["sample"].shape[0]
        if not limits or min(limits) >= rows or members[0][0].plan.executor == "deep_cache":
            return call_unet(executor, batch)
        step = min(limits)
        parts = [call_unet(executor, {k: v[i:i + step] for k, v in batch.items()}) for i in range(0, rows, step)]
        return torch.cat(parts)  # (rows, C, h, w)

    def _advance(self, job: Job, resume: Callable[[], tuple]) -> None:
        """Resume the job's sampler; it either asks for the next denoiser call or returns its final x."""
        try:
            job.pending = resume()
        except StopIteration as done:
            job.pending, job.final = None, done.value
        except Exception as e:
            self._fail(job, e)

    def _fail(self, job: Job, error: BaseException) -> None:
        job.pending, job.error = None, _user_error(error)
        job.steps.close()

    def _decode(self, job: Job) -> GenerationResult:
        plan, pipe = job.plan, self.pipe
        latents = to_vp(job.final, plan.grid, job.stopped)
        raw = pipe.decode(latents.to(pipe.dtype), plan.memory)
        images, depths = pipe.to_outputs(raw)
        return GenerationResult(images, depths, list(plan.seeds), job.steps_run, plan.request, latents, raw, plan)


def _user_error(error: BaseException) -> BaseException:
    """Out-of-memory becomes a MemoryBudgetError (the request ends, the process stays up); anything else is
    kept as it is, with its traceback."""
    if isinstance(error, FastLDMError):
        return error
    oom = isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))
    if oom:
        wrapped = MemoryBudgetError(f"ran out of memory during the run ({str(error).splitlines()[0]}); ask for a "
                                    f"smaller size or fewer images, or load the model with a memory budget")
        wrapped.__cause__ = error
        return wrapped
    return error


def run(pipe, plans: list[Plan], callbacks: list[Callback | None] | None = None) -> list[GenerationResult]:
    """Run `plans` on `pipe` together (one batched run; each plan leaves when its steps are done) and return
    their results in order. The first failure is raised once all have ended."""
    batch = BatchedRun(pipe)
    jobs = [batch.add(plan, cb) for plan, cb in zip(plans, callbacks or [None] * len(plans), strict=True)]
    while batch.jobs:
        batch.step()
    failed = next((job.error for job in jobs if job.error is not None), None)
    if failed is not None:
        raise failed
    return [job.result for job in jobs]
