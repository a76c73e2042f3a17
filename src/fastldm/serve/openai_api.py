"""The OpenAI images API under /v1, as the `openai` Python client calls it.

Source of the shapes: openai/openai-python src/openai/resources/images.py and types/images_response.py.
POST /v1/images/generations (JSON) and POST /v1/images/edits (multipart: `image` or `image[]`, optional `mask`)
answer `{"created", "data": [{"b64_json"} | {"url"}], "output_format", "size"}`. `size` is "WxH" or "auto" (the
model's default; for edits, the input image's size down to a multiple of 8); `output_format` png | jpeg | webp
(`output_compression` is the JPEG/WebP quality); PNGs carry the A1111 `parameters` chunk. An edit is img2img of
the whole image: a `mask` is accepted and not applied. `quality`, `style`, `background`, `moderation`, `user`
are accepted and ignored; `stream` is refused (poll the jobs API for progress instead).

Our extras, sent through the client's `extra_body` (form fields for edits): `negative_prompt`, `steps` (a number
or "auto"), `seed`, `sampler`, `scheduler`, `guidance`, and for edits `strength` (default 0.75).
`response_format="url"` keeps the job in the jobs API's store and answers links to its files
(/fastldm/v1/jobs/{id}/files/{i}.{format}), valid while finished jobs are kept (`result_ttl_s`); they need the
API key like every API route. `model` is a name from GET /v1/models; an unknown one is a 404.
"""
from __future__ import annotations

import io
import os
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..errors import RequestError
from ..request import GenerationRequest
from .jobs import ServeJob
from .outputs import b64, image_bytes
from .waiting import wait_for


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    stream: bool | None = None
    negative_prompt: str = ""
    steps: int | Literal["auto"] | None = None
    seed: int | None = None
    sampler: str | None = None
    scheduler: str | None = None
    guidance: float | None = None


class ImageEditRequest(ImageGenerationRequest):
    strength: float = 0.75


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fastldm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def router(ctx) -> APIRouter:
    api = APIRouter()

    async def generate(body: ImageGenerationRequest, request: Request, init_image: Image.Image | None = None,
                       strength: float = 0.75) -> ImagesResponse:
        if body.stream:
            raise RequestError("stream", True, "false: streamed partial images are not supported; follow a job's "
                               "progress with GET /fastldm/v1/jobs/{id}/events")

        def submit() -> ServeJob:
            width, height = _size(body.size, init_image)
            req = GenerationRequest(
                prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps or 20,
                sampler=body.sampler or "DPM++ 2M", scheduler=body.scheduler, guidance=body.guidance,
                seed=body.seed, width=width, height=height, n=1 if body.n is None else body.n,
                init_image=init_image, strength=strength)
            return ctx.scheduler.submit(body.model, req)

        job = await run_in_threadpool(submit)
        if body.response_format == "url":
            ctx.store.add(job)
        await wait_for(job, request, ctx)
        fmt = body.output_format or "png"
        if body.response_format == "url":
            base = str(request.base_url).rstrip("/")
            data = [ImageData(url=f"{base}/fastldm/v1/jobs/{job.id}/files/{i}.{fmt}") for i in range(job.plan.n)]
        else:
            data = await run_in_threadpool(lambda: [
                ImageData(b64_json=b64(image_bytes(im, fmt, text, body.output_compression)))
                for im, text in zip(job.result.images, job.infotexts)])
        return ImagesResponse(created=int(job.created), data=data, output_format=fmt,
                              size=f"{job.plan.width}x{job.plan.height}")

    @api.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
    async def generations(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
        return await generate(body, request)

    @api.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
              openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["image", "prompt"],
                  "properties": {"image": {"type": "string", "format": "binary"},
                                 "mask": {"type": "string", "format": "binary"},
                                 **ImageEditRequest.model_json_schema()["properties"]}}}}}})
    async def edits(request: Request) -> ImagesResponse:
        """img2img of the uploaded `image` (multipart form; the other fields as in generations, plus strength)."""
        form = await request.form()
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        try:
            body = ImageEditRequest.model_validate(fields)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        files = [v for k, v in form.multi_items() if k in ("image", "image[]") and isinstance(v, UploadFile)]
        if not files:
            raise RequestError("image", None, "an image file in the multipart field `image`")
        init = _open_image(await files[0].read())
        return await generate(body, request, init, body.strength)

    @api.get("/models", response_model=ModelList)
    def models() -> ModelList:
        return ModelList(data=[_card(e) for e in ctx.catalog.entries()])

    @api.get("/models/{model}", response_model=ModelCard)
    def model(model: str) -> ModelCard:
        return _card(ctx.catalog.resolve(model))

    return api


def _card(entry) -> ModelCard:
    return ModelCard(id=entry.name, created=int(os.stat(entry.path).st_mtime))


def _size(size: str | None, init_image: Image.Image | None) -> tuple[int | None, int | None]:
    """'WxH' -> (W, H); None or 'auto' -> the model's default, or an edit's input size down to a multiple of 8."""
    if size in (None, "auto"):
        if init_image is None:
            return None, None
        return tuple(max(8, v // 8 * 8) for v in init_image.size)
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise RequestError("size", size, "WIDTHxHEIGHT in pixels (e.g. 512x512), or auto") from None
    return w, h


def _open_image(data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise RequestError("image", f"<{len(data)} bytes>", f"a PNG, JPEG or WebP image ({type(e).__name__})") \
            from None
