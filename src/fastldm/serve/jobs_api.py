"""fastldm's own async jobs API under /fastldm/v1 (what the page uses; sd.cpp's `/sdcpp/v1/img_gen` and
ComfyUI's `/prompt` + `/history` play the same part in theirs).

    POST /jobs                  a GenerationRequest (its JSON form, request.py) + optional `model` -> 202 {id, ...}
    GET  /jobs/{id}             status, progress (step, steps, ETA), the request, the result or the error
    GET  /jobs/{id}/events      server-sent events: queued, started, step (with a preview PNG as a data URL),
                                then done (the job as GET returns it), failed or cancelled (the error)
    POST /jobs/{id}/cancel      cancels this job only
    GET  /jobs/{id}/files/NAME  I.png (with A1111 parameters), I.jpeg, I.webp, and for RGBD models I-depth.png
                                (16-bit) and I.glb (textured depth mesh, tools/export3d.py), image I from 0
    POST /plan                  the same body -> 200 {ok, plan | error}: what the job would run (size, steps
                                after "auto", seeds, sampler) or why it would be refused, without queueing it
    GET  /info                  models, samplers, schedulers and limits (what the page offers)

A job's connection is not its lifetime: it runs whether or not anyone watches, and is kept after it ends for
`result_ttl_s` seconds, at most `result_count` finished jobs (jobs.py, JobStore).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import FastLDMError, RequestError
from ..request import GenerationRequest
from ..samplers import list_samplers, list_schedulers
from ..tools.export3d import DEFAULT_FOV, encode
from .jobs import ServeJob
from .outputs import MEDIA_TYPES, b64, depth_png, image_bytes

KEEPALIVE_S = 15.0
_FILE = re.compile(r"(\d+)(-depth)?\.(png|jpeg|jpg|webp|glb)")


class JobRequest(BaseModel):
    """GenerationRequest's fields (request.py) and the model's name; unknown fields are refused."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    negative_prompt: str = ""
    steps: int | Literal["auto"] = 20
    sampler: str = "DPM++ 2M"
    scheduler: str | None = None
    guidance: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    n: int = 1
    init_image: str | None = None
    strength: float = 0.75
    early_stop: float | None = None
    cache_interval: int = 1


class JobCreated(BaseModel):
    id: str
    status: str
    url: str
    events: str


class Progress(BaseModel):
    step: int
    steps: int
    fraction: float
    eta_s: float | None


class ErrorInfo(BaseModel):
    type: str
    message: str
    field: str | None = None


class ImageFiles(BaseModel):
    seed: int
    parameters: str
    png: str
    depth: str | None
    glb: str | None
    glb_fov_y: float | None     # vertical field of view (degrees) of the camera that took the image, in the GLB


class JobResult(BaseModel):
    steps: int
    width: int
    height: int
    images: list[ImageFiles]


class JobView(BaseModel):
    id: str
    status: str
    model: str
    created: float
    started: float | None
    finished: float | None
    progress: Progress
    request: dict[str, Any]
    result: JobResult | None
    error: ErrorInfo | None


class Limits(BaseModel):
    max_width: int
    max_height: int
    max_steps: int
    max_n: int
    max_prompt_chars: int


class PlanView(BaseModel):
    model: str
    width: int
    height: int
    steps: int
    denoising_steps: int
    seeds: list[int]
    sampler: str
    guidance: float


class PlanCheck(BaseModel):
    ok: bool
    plan: PlanView | None = None
    error: ErrorInfo | None = None


class ServerInfo(BaseModel):
    version: str
    default_model: str
    models: list[str]
    samplers: list[str]
    schedulers: list[str]
    limits: Limits


def router(ctx) -> APIRouter:
    api = APIRouter()
    scheduler, store = ctx.scheduler, ctx.store

    @api.post("/jobs", status_code=202, response_model=JobCreated)
    async def create(body: JobRequest) -> JSONResponse:
        fields = body.model_dump(exclude={"model"}, exclude_unset=True)   # GenerationRequest's defaults
        job = await run_in_threadpool(lambda: scheduler.submit(body.model, GenerationRequest.from_dict(fields)))
        store.add(job)
        url = f"/fastldm/v1/jobs/{job.id}"
        created = JobCreated(id=job.id, status=job.status, url=url, events=f"{url}/events")
        return JSONResponse(created.model_dump(), status_code=202, headers={"Location": url})

    @api.post("/plan", response_model=PlanCheck)
    async def plan(body: dict[str, Any]) -> PlanCheck:
        """Check a job request without queueing it: 200 either way, with the plan or the reason. (The page asks
        this first, so a refused request is a message, not a failed request in the browser's console.)"""
        fields = dict(body)
        model = fields.pop("model", None)

        def check() -> PlanView:
            name, p = scheduler.check(None if model is None else str(model), GenerationRequest.from_dict(fields))
            return PlanView(model=name, width=p.width, height=p.height, steps=p.steps,
                            denoising_steps=p.denoising_steps, seeds=list(p.seeds), sampler=p.sampler.label,
                            guidance=p.guidance)
        try:
            return PlanCheck(ok=True, plan=await run_in_threadpool(check))
        except FastLDMError as e:
            return PlanCheck(ok=False, error=error_info(e))

    @api.get("/jobs/{job_id}", response_model=JobView)
    def get(job_id: str) -> JobView:
        return view(store.get(job_id))

    @api.post("/jobs/{job_id}/cancel", response_model=JobView)
    def cancel(job_id: str) -> JobView:
        job = store.get(job_id)
        scheduler.cancel(job)
        return view(job)

    @api.get("/jobs/{job_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def events(job_id: str) -> StreamingResponse:
        job = store.get(job_id)

        async def stream():
            async for ev in job.events(KEEPALIVE_S):
                kind = ev["event"]
                if kind == "ping":
                    yield ": keep-alive\n\n"
                    continue
                data: dict[str, Any] = {"status": job.status}
                if kind == "step":
                    preview = job.preview()
                    data |= {"step": ev["step"], "steps": ev["steps"], "eta_s": scheduler.eta(job),
                             "preview": None if preview is None
                             else "data:image/png;base64," + b64(image_bytes(preview))}
                elif kind == "done":
                    data = view(job).model_dump()
                elif kind in ("failed", "cancelled"):
                    data["error"] = error_info(job.error).model_dump()
                yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/jobs/{job_id}/files/{name}", response_class=Response,
             responses={200: {"content": {t: {} for t in (*MEDIA_TYPES.values(), "model/gltf-binary")}}})
    async def file(job_id: str, name: str) -> Response:
        job = store.get(job_id)
        match = _FILE.fullmatch(name)
        if match is None:
            raise HTTPException(404, f"no file {name!r}: files are I.png, I.jpeg, I.webp, I-depth.png, I.glb")
        if job.status != "done":
            raise HTTPException(409, f"job {job.id} is {job.status}; its files exist once it is done")
        i, depth, ext = int(match[1]), bool(match[2]), match[3]
        result = job.result
        if i >= len(result.images) or (depth and ext != "png"):
            raise HTTPException(404, f"no file {name!r}: this job has images 0 to {len(result.images) - 1}")
        if (depth or ext == "glb") and result.depths is None:
            raise HTTPException(404, "this job's model makes images without depth (RGBD models only)")
        if name not in job.files:
            job.files[name] = await run_in_threadpool(_encode, job, i, depth, ext)
        media = "model/gltf-binary" if ext == "glb" else MEDIA_TYPES[ext]
        return Response(job.files[name], media_type=media,
                        headers={"Content-Disposition": f'inline; filename="{job.id[:8]}-{name}"'})

    @api.get("/info", response_model=ServerInfo)
    def info() -> ServerInfo:
        s = ctx.settings
        return ServerInfo(version=__version__, default_model=ctx.catalog.default.name,
                          models=[e.name for e in ctx.catalog.entries()],
                          samplers=[spec.label for spec in list_samplers()], schedulers=list_schedulers(),
                          limits=Limits(max_width=s.max_width, max_height=s.max_height, max_steps=s.max_steps,
                                        max_n=s.max_n, max_prompt_chars=s.max_prompt_chars))

    def view(job: ServeJob) -> JobView:
        request = job.plan.request.to_dict() | {"init_image": None}
        result = None
        if job.result is not None:
            base = f"/fastldm/v1/jobs/{job.id}/files/"
            rgbd = job.result.depths is not None
            w, h = job.plan.width, job.plan.height
            fov_y = math.degrees(2 * math.atan(math.tan(math.radians(DEFAULT_FOV) / 2) * h / w))
            result = JobResult(steps=job.result.steps, width=job.plan.width, height=job.plan.height, images=[
                ImageFiles(seed=seed, parameters=text, png=f"{base}{i}.png",
                           depth=f"{base}{i}-depth.png" if rgbd else None, glb=f"{base}{i}.glb" if rgbd else None,
                           glb_fov_y=fov_y if rgbd else None)
                for i, (seed, text) in enumerate(zip(job.result.seeds, job.infotexts))])
        return JobView(id=job.id, status=job.status, model=job.model, created=job.created, started=job.started,
                       finished=job.finished, request=request, result=result,
                       error=None if job.error is None else error_info(job.error),
                       progress=Progress(step=job.step, steps=job.steps, fraction=job.step / max(job.steps, 1),
                                         eta_s=scheduler.eta(job) if job.status == "running" else None))

    return api


def error_info(error: BaseException) -> ErrorInfo:
    if isinstance(error, RequestError):
        return ErrorInfo(type=type(error).__name__, message=str(error), field=error.field)
    message = str(error) if isinstance(error, FastLDMError) else f"internal error: {type(error).__name__}: {error}"
    return ErrorInfo(type=type(error).__name__, message=message)


def _encode(job: ServeJob, i: int, depth: bool, ext: str) -> bytes:
    result = job.result
    if depth:
        return depth_png(result.depths[i])
    if ext == "glb":
        return encode(result.images[i], result.depths[i], "glb", stem="rgbd")["rgbd.glb"]
    return image_bytes(result.images[i], ext, job.infotexts[i] if ext == "png" else None)
