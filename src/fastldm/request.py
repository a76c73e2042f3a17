"""GenerationRequest: what to generate, as plain data. The Python API, the CLI, the HTTP server and bulk
generation all build one; `Pipeline.plan` checks it against a model and resolves it into a Plan (plan.py).

`to_dict` / `from_dict` give a JSON-friendly form with the same field names (an init image as a base64 PNG,
a `data:image/...;base64,` prefix accepted). `from_dict` checks names and types only; values are checked
against the model by `Pipeline.plan`, which raises RequestError naming the field, the value and what is
allowed. Both raise RequestError, so every front end reports a bad field the same way.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from PIL import Image, UnidentifiedImageError

from .errors import RequestError


@dataclass
class GenerationRequest:
    """What to generate. None means "the model's default" (guidance, size) or "random" (seed)."""
    prompt: str
    negative_prompt: str = ""
    steps: int | Literal["auto"] = 20     # "auto": the model's step predictor for this prompt and sampler
    sampler: str = "DPM++ 2M"
    scheduler: str | None = None          # sigma schedule: "karras", "exponential", "normal", ... (None: sampler's)
    guidance: float | None = None         # None: the model's default (config.default_guidance; 7.5 for SD)
    seed: int | None = None               # None (or -1, A1111's convention): random; image i uses seed + i
    width: int | None = None              # None: the model's default size
    height: int | None = None
    n: int = 1
    init_image: Image.Image | None = None # img2img source, with `strength` in (0, 1]
    strength: float = 0.75
    early_stop: float | None = None       # stop when the x0 estimate changes by less than this (runtime.early_stop)
    cache_interval: int = 1               # DeepCache: the full UNet every N calls, the shallow path between

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (init_image as a base64 PNG)."""
        d = dataclasses.asdict(self) | {"init_image": None}
        if self.init_image is not None:
            d["init_image"] = image_to_base64(self.init_image)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationRequest":
        """A request from JSON-like data: unknown names and wrong types raise RequestError."""
        if not isinstance(data, Mapping):
            raise RequestError("request", type(data).__name__, "an object of request fields")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise RequestError(unknown[0], data[unknown[0]], f"not a request field; fields are {', '.join(_FIELDS)}")
        if "prompt" not in data:
            raise RequestError("prompt", None, "a text prompt is required")
        return cls(**data).checked()

    def checked(self) -> "GenerationRequest":
        """This request with every field's type checked (RequestError otherwise) and normalised: numbers as
        float, a base64 init image decoded."""
        values = {f: _CHECK[f](f, getattr(self, f)) for f in _FIELDS}
        if isinstance(values["init_image"], str):
            values["init_image"] = image_from_base64(values["init_image"], "init_image")
        return GenerationRequest(**values)


def _text(name, value):
    if not isinstance(value, str):
        raise RequestError(name, value, "a string")
    return value


def _optional_text(name, value):
    return None if value is None else _text(name, value)


def _integer(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RequestError(name, value, "a whole number")
    return value


def _optional_integer(name, value):
    return None if value is None else _integer(name, value)


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(name, value, "a finite number")
    return float(value)


def _optional_number(name, value):
    return None if value is None else _number(name, value)


def _steps(name, value):
    return value if value == "auto" else _integer(name, value)


def _image(name, value):
    if value is None or isinstance(value, (str, Image.Image)):
        return value
    raise RequestError(name, type(value).__name__, "a PIL image or a base64-encoded PNG/JPEG")


_CHECK = {"prompt": _text, "negative_prompt": _text, "steps": _steps, "sampler": _text,
          "scheduler": _optional_text, "guidance": _optional_number, "seed": _optional_integer,
          "width": _optional_integer, "height": _optional_integer, "n": _integer, "init_image": _image,
          "strength": _number, "early_stop": _optional_number, "cache_interval": _integer}
_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest))
assert set(_CHECK) == set(_FIELDS)


def image_to_base64(image: Image.Image) -> str:
    """A PIL image as a base64 PNG (no data: prefix), keeping its text chunks (A1111 `parameters`)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in getattr(image, "text", {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_from_base64(text: str, field: str = "image") -> Image.Image:
    """A base64 PNG/JPEG/WebP (optionally `data:image/...;base64,`-prefixed) -> a decoded RGB PIL image; a bad
    one raises RequestError naming `field`."""
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        raw = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return im.convert("RGB")
    except (binascii.Error, ValueError):
        raise RequestError(field, f"{text[:24]}...", "base64-encoded image data") from None
    except (UnidentifiedImageError, OSError) as e:
        raise RequestError(field, f"{text[:24]}...", f"a readable PNG, JPEG or WebP image ({type(e).__name__})") \
            from None
