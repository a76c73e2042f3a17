"""Encoding results for the wire: images as PNG (with the A1111 `parameters` text chunk), JPEG or WebP, depth
maps as 16-bit grayscale PNG, and base64 text of either."""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, PngImagePlugin

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}


def image_bytes(image: Image.Image, fmt: str = "png", parameters: str | None = None,
                quality: int | None = None) -> bytes:
    """`image` in `fmt` (png | jpeg | webp); a PNG carries `parameters` as its text chunk, as A1111 writes it.
    quality (0-100) applies to JPEG and WebP."""
    buf = io.BytesIO()
    if FORMATS[fmt] == "PNG":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        image.save(buf, format="PNG", pnginfo=info)
    else:
        image.save(buf, format=FORMATS[fmt], quality=90 if quality is None else quality)
    return buf.getvalue()


def depth_png(depth: np.ndarray) -> bytes:
    """uint16 depth (H, W) -> 16-bit grayscale PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(depth.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
