"""Writing results: PNGs carrying the A1111 `parameters` text chunk, and 16-bit depth PNGs.

Infotext format (A1111 `create_infotext`): "<prompt>\\nNegative prompt: <neg>\\n<k: v, k: v, ...>", values
quoted with json.dumps when they contain ',', ':' or a newline.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .files import atomic_write_bytes

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(v) -> str:
    v = str(v)
    return json.dumps(v, ensure_ascii=False) if any(c in v for c in ",\n:") else v


def infotext(prompt: str, negative: str, params: dict) -> str:
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    neg = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{neg}\n{line}".strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Inverse of `infotext` -> (prompt, negative prompt, {key: value as text})."""
    *lines, last = text.strip().split("\n")
    params = {k: (json.loads(v) if v.startswith('"') else v) for k, v in _PARAM.findall(last)}
    if len(params) < 3:
        lines, params = lines + [last], {}
    prompt, negative, into_neg = [], [], False
    for ln in lines:
        if ln.startswith("Negative prompt:"):
            into_neg, ln = True, ln[len("Negative prompt:"):].strip()
        (negative if into_neg else prompt).append(ln)
    return "\n".join(prompt), "\n".join(negative), params


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """An image as PNG bytes, with the A1111 `parameters` text chunk when given."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def depth_png_bytes(depth: np.ndarray) -> bytes:
    """depth (H, W) uint16 -> 16-bit grayscale PNG bytes (PIL mode "I;16")."""
    buf = io.BytesIO()
    Image.fromarray(depth.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: Image.Image, path: Path, parameters: str | None = None) -> Path:
    return atomic_write_bytes(path, png_bytes(image, parameters))


def save_depth_png(depth: np.ndarray, path: Path) -> Path:
    return atomic_write_bytes(path, depth_png_bytes(depth))
