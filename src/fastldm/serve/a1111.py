"""The AUTOMATIC1111 web UI API under /sdapi/v1, as its clients (the `webuiapi` package, scripts) call it.

Source of the field names and shapes: AUTOMATIC1111/stable-diffusion-webui modules/api/api.py and models.py.
Requests are pydantic models that ignore the fields we do not use (clients send about 45: hires fix, face
restoration, scripts, ...). Mapping: `sampler_name` (or `sampler_index`) + `scheduler` -> sampler; `cfg_scale` ->
guidance; `batch_size` x `n_iter` -> images; `seed` -1 -> random; `denoising_strength` + the first of
`init_images` -> img2img. Differences from A1111, on purpose: a field left out takes the *model's* default (size,
guidance; A1111 assumes 512 px and 7), `steps` may be "auto", and an img2img `mask` is accepted but not applied
(the whole image is redrawn). `override_settings.sd_model_checkpoint` picks the model of one request; POST
options switches the default, as A1111 does; model names come from GET sd-models only.

Responses carry base64 PNGs with the A1111 `parameters` text chunk and `info`, a JSON *string* with the keys
clients read (seeds, infotexts, sampler, steps, size, model); RGBD models add `depths` (16-bit PNGs). Jobs from
here are batched with everyone else's (scheduler.py); `progress` reports the oldest running job with its ETA from
the measured step time and a live preview (preview.py); interrupt ends every running job, skip the oldest, each
with the image it has so far.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import RequestError
from ..images import parse_infotext
from ..request import GenerationRequest, image_from_base64
from ..samplers import list_samplers, list_schedulers
from .jobs import ServeJob
from .outputs import b64, depth_png, image_bytes
from .waiting import wait_for


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str | None = ""
    seed: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | Literal["auto"] | None = 20
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    override_settings: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = []
    denoising_strength: float | None = 0.75
    mask: str | None = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str
    depths: list[str] | None = None


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None
    textinfo: str | None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float
    need_inner_model: bool


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class PngInfoRequest(BaseModel):
    image: str


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ScriptsList(BaseModel):
    txt2img: list[str]
    img2img: list[str]


def router(ctx) -> APIRouter:
    api = APIRouter()
    scheduler = ctx.scheduler

    async def generate(body: Txt2ImgRequest, request: Request, init_image: str | None = None,
                       strength: float | None = None) -> GenerationResponse:
        def submit() -> ServeJob:
            req = GenerationRequest(
                prompt=body.prompt, negative_prompt=body.negative_prompt or "",
                sampler=body.sampler_name or body.sampler_index or "Euler", scheduler=body.scheduler,
                steps=20 if body.steps is None else body.steps, guidance=body.cfg_scale,
                seed=body.seed, width=body.width, height=body.height,
                n=(body.batch_size or 1) * (body.n_iter or 1),
                init_image=None if init_image is None else image_from_base64(init_image, "init_image"),
                strength=0.75 if strength is None else strength)
            model = (body.override_settings or {}).get("sd_model_checkpoint") or ctx.a1111_model
            return scheduler.submit(model, req)

        job = await run_in_threadpool(submit)
        await wait_for(job, request, ctx)
        return await run_in_threadpool(_response, job, body)

    @api.post("/txt2img", response_model=GenerationResponse, response_model_exclude_none=True)
    async def txt2img(body: Txt2ImgRequest, request: Request) -> GenerationResponse:
        return await generate(body, request)

    @api.post("/img2img", response_model=GenerationResponse, response_model_exclude_none=True)
    async def img2img(body: Img2ImgRequest, request: Request) -> GenerationResponse:
        if not body.init_images:
            raise RequestError("init_image", [], "at least one base64 image in init_images")
        return await generate(body, request, body.init_images[0], body.denoising_strength)

    @api.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = False) -> ProgressResponse:
        job = scheduler.current()
        count = len(scheduler.queued()) + len(scheduler.running())
        if job is None:
            return ProgressResponse(progress=0.0, eta_relative=0.0, current_image=None, textinfo=None,
                                    state=_state(None, count))
        eta = scheduler.eta(job)
        preview = None if skip_current_image else job.preview()
        return ProgressResponse(progress=job.step / max(job.steps, 1), eta_relative=eta or 0.0,
                                state=_state(job, count), textinfo=f"step {job.step} of {job.steps}",
                                current_image=None if preview is None else b64(image_bytes(preview)))

    @api.post("/interrupt")
    def interrupt() -> dict:
        scheduler.interrupt()
        return {}

    @api.post("/skip")
    def skip() -> dict:
        scheduler.skip()
        return {}

    @api.get("/samplers", response_model=list[SamplerItem])
    def samplers() -> list[SamplerItem]:
        return [SamplerItem(name=s.label, aliases=[s.name, *s.aliases], options={}) for s in list_samplers()]

    @api.get("/schedulers", response_model=list[SchedulerItem])
    def schedulers() -> list[SchedulerItem]:
        return [SchedulerItem(name=n, label=n.replace("_", " ").title(), aliases=None, default_rho=-1,
                              need_inner_model=False) for n in list_schedulers()]

    @api.get("/sd-models", response_model=list[SDModelItem])
    def sd_models() -> list[SDModelItem]:
        hashes = scheduler.model_hashes()
        return [SDModelItem(title=e.name, model_name=e.name, hash=hashes.get(e.name), sha256=None,
                            filename=e.file_name, config=None) for e in ctx.catalog.entries()]

    @api.get("/options")
    def get_options() -> dict[str, Any]:
        hashes = scheduler.model_hashes()
        return {"sd_model_checkpoint": ctx.a1111_model, "sd_checkpoint_hash": hashes.get(ctx.a1111_model),
                "samples_format": "png"}

    @api.post("/options")
    async def set_options(body: dict[str, Any]) -> None:
        name = body.get("sd_model_checkpoint")
        if name is not None:
            entry = ctx.catalog.resolve(str(name))
            await run_in_threadpool(scheduler.load, entry.name)   # load it, as A1111 does
            ctx.a1111_model = entry.name

    @api.get("/scripts", response_model=ScriptsList)
    def scripts() -> ScriptsList:
        return ScriptsList(txt2img=[], img2img=[])

    @api.post("/png-info", response_model=PngInfoResponse)
    def png_info(body: PngInfoRequest) -> PngInfoResponse:
        items = _text_chunks(body.image)
        text = items.pop("parameters", "")
        parameters = {}
        if text:
            prompt, negative, params = parse_infotext(text)
            parameters = {"Prompt": prompt, "Negative prompt": negative, **params}
        return PngInfoResponse(info=text, items=items, parameters=parameters)

    return api


def _state(job: ServeJob | None, count: int) -> ProgressState:
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if job else "0"
    return ProgressState(skipped=bool(job and job.stop_early), interrupted=bool(job and job.stop_early),
                         stopping_generation=False, job=job.id if job else "", job_count=count,
                         job_timestamp=stamp, job_no=0, sampling_step=job.step if job else 0,
                         sampling_steps=job.steps if job else 0)


def _response(job: ServeJob, body: Txt2ImgRequest) -> GenerationResponse:
    result, plan = job.result, job.plan
    images = [b64(image_bytes(im, "png", text)) for im, text in zip(result.images, job.infotexts)] \
        if body.send_images else []
    depths = [b64(depth_png(d)) for d in result.depths] if result.depths is not None and body.send_images else None
    r = result.request
    info = {"prompt": r.prompt, "all_prompts": [r.prompt] * plan.n, "negative_prompt": r.negative_prompt,
            "all_negative_prompts": [r.negative_prompt] * plan.n, "seed": result.seeds[0],
            "all_seeds": result.seeds, "subseed": -1, "all_subseeds": [-1] * plan.n, "subseed_strength": 0,
            "width": plan.width, "height": plan.height, "sampler_name": plan.sampler.label,
            "scheduler": r.scheduler or "Automatic", "cfg_scale": plan.guidance, "steps": result.steps,
            "batch_size": plan.n, "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": job.model, "sd_model_hash": job.model_hash, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": plan.strength,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": job.infotexts, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), "clip_skip": 1,
            "is_using_inpainting_conditioning": False, "version": f"fastldm {__version__}"}
    echo = body.model_dump(exclude={"init_images", "mask"})
    return GenerationResponse(images=images, parameters=echo, info=json.dumps(info), depths=depths)


def _text_chunks(text: str) -> dict[str, Any]:
    """The text chunks of a base64 image (PNG tEXt/iTXt), without decoding it to pixels."""
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as im:
            return {k: v for k, v in im.info.items() if isinstance(v, str)}
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise RequestError("image", f"{text[:24]}...", "a base64-encoded PNG, JPEG or WebP image") from None
