"""ShapesWorld evaluator: does an RGB(+depth) image show what its caption says?

evaluate() answers one yes/no per attribute the caption states:
  colour       every named object colour is present as a blob of reasonable size
  shape        each object's silhouette matches its shape
  size         (one object, size stated) the blob's extent is on the named side of small/large
  position     (one object, position stated) the blob's centre is nearest the named anchor
  relation     (two objects) left of / right of / above / below: the centres are apart mainly along
               that axis, in that order; in front of: the blobs touch and the front one is lower
  depth_order  (in front of, depth given) the front object is nearer: larger median depth, 1 = near
  background   the border is the named background colour (grey when the caption names none, as the
               grammar defines)
Attributes of an object whose colour is missing are failed, not skipped.

Method (any resolution: the image is resampled to the 64-px canvas the thresholds are set on):
1. Each pixel gets a palette label in a shading-invariant way: chroma (max - min) and saturation
   (chroma / max) both at least half the palette's weakest -> the nearest palette hue (ShapesWorld
   shades along constant-hue ramps); otherwise black / grey / white by value, split halfway between
   grey and the nearest shade of black and of white.
2. An object is the largest 8-connected blob of its colour, in the labels of the 3x3-median-filtered
   image, that survives a 3x3 opening (so noise and blurred rims between two colours do not count);
   its silhouette is that blob with its corners restored from the unfiltered labels.
3. Shape, outline: the silhouette's half-width per row, measured from its symmetry axis (the centre
   of its top rows) in units of its largest half-width, against the half-width profiles of
   ShapesWorld's silhouettes: a disc (sphere), a hexagon whose ends are half a half-width deep
   (cube), a kite with its side corners 1.59 half-widths below the apex (pyramid). An object
   touching another is measured on its wider side, since occlusion only removes width.
4. Shape, shading: small spheres and cubes differ by a few pixels in outline, so a sphere/cube call
   also asks whether the lower body is two flat faces meeting at the axis (cube) or smoothly shaded
   (sphere): `_faceted`.
5. Size by the silhouette's extent, position by its bounding-box centre, relation by the centres,
   front/behind by the median depth of each silhouette.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .captions import (CANVAS, COLOURS, DEFAULT_BACKGROUND, GREY, PALETTE, POSITION_XY, RADIUS, SHAPES,
                       parse_caption)

ATTRIBUTES = ("colour", "shape", "size", "position", "relation", "depth_order", "background")
LABELS = COLOURS + (DEFAULT_BACKGROUND,)                 # pixel labels; index = label id


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of (..., 3) RGB (the HSV hexcone)."""
    r, g, b = np.moveaxis(rgb.astype(np.float32), -1, 0)
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    c = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, (g - b) / c, np.where(mx == g, 2 + (b - r) / c, 4 + (r - g) / c))
    return (60 * h) % 360


_CHROMATIC = [c for c in COLOURS if np.ptp(PALETTE[c][0]) > 64]
_HUES = _hue(np.array([PALETTE[c][0] for c in _CHROMATIC]))                  # (6,)
_CHROMA_MIN = 0.5 * min(np.ptp(tone) for c in _CHROMATIC for tone in PALETTE[c])
_SATURATION_MIN = 0.5 * min(np.ptp(tone) / max(tone) for c in _CHROMATIC for tone in PALETTE[c])
_BLACK_MAX = (GREY[0] + PALETTE["black"][0][0]) / 2      # between black's lit shade and grey
_WHITE_MIN = (GREY[0] + PALETTE["white"][1][0]) / 2      # between white's shadow and grey
# Shading coordinate of each colour: a pixel's projection on its ramp's direction (lit - shadow),
# which carries all of the shading signal whatever the colour.
_RAMP = {c: np.subtract(*PALETTE[c]) / np.linalg.norm(np.subtract(*PALETTE[c])) for c in COLOURS}
MIN_AREA = 20                                            # px after opening; a small object has ~95-155
SIZE_SPLIT = RADIUS["small"] + RADIUS["large"]           # px: extent (2r) halfway between small and large
# Sphere or cube: faceted + OUTLINE_WEIGHT * outline > FACETED_MIN (see classify_shape). Set on
# ground-truth renders with noise (sigma 8/255) and blur, where small objects are the hard case: 95%
# of small cubes have faceted > 0.28 and 98% of small spheres < 0.1 (noise pulls both toward 0);
# the outline's log error ratio spans about +-2.5, so it only settles near-ties.
FACETED_MIN = 0.1
OUTLINE_WEIGHT = 0.1


def _profile(shape: str, d: np.ndarray) -> np.ndarray:
    """Ideal half-width (in units of the largest) at depth d below the top (same units), from the
    vertices of the renderer's objects seen 30 degrees from above and turned 45 degrees: a cube is
    2.225 tall with its side corners 0.5 below the top and above the bottom; a pyramid is 2.092 tall
    with its side corners 1.592 below the apex."""
    if shape == "sphere":
        return np.sqrt(np.clip(d * (2 - d), 0, None))
    if shape == "cube":
        return np.clip(np.minimum(np.minimum(d / 0.5, 1.0), (2.225 - d) / 0.5), 0, None)
    return np.clip(np.minimum(d / 1.592, (2.092 - d) / 0.5), 0, None)     # pyramid


def _shift(a: np.ndarray, fill) -> list[np.ndarray]:
    """The 9 views of `a` (H, W, ...) shifted by -1..1 in y and x; edges padded with `fill`
    (None: repeat the edge)."""
    h, w = a.shape[:2]
    if fill is None:
        p = np.pad(a, [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    else:
        p = np.full((h + 2, w + 2) + a.shape[2:], fill, a.dtype)
        p[1:-1, 1:-1] = a
    return [p[i:i + h, j:j + w] for i in range(3) for j in range(3)]


def _erode(m):
    return np.logical_and.reduce(_shift(m, True))


def _dilate(m):
    return np.logical_or.reduce(_shift(m, False))


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (label propagation to a fixed point)."""
    lab = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        new = np.where(mask, np.maximum.reduce(_shift(lab, 0)), 0)
        if np.array_equal(new, lab):
            break
        lab = new
    if not mask.any():
        return mask
    return lab == np.bincount(lab[mask]).argmax()


def _to_canvas(img: np.ndarray) -> np.ndarray:
    """(H, W[, 3]) image -> (64, 64[, 3]) float32 (box filter down, bilinear up)."""
    if img.shape[:2] == (CANVAS, CANVAS):
        return img.astype(np.float32)
    resample = Image.BOX if min(img.shape[:2]) >= CANVAS else Image.BILINEAR
    if img.ndim == 2:
        return np.asarray(Image.fromarray(img.astype(np.float32), "F").resize((CANVAS, CANVAS), resample))
    chans = [Image.fromarray(img[..., k].astype(np.float32), "F").resize((CANVAS, CANVAS), resample)
             for k in range(3)]
    return np.stack([np.asarray(c) for c in chans], -1)


def label_pixels(rgb: np.ndarray) -> np.ndarray:
    """(64, 64, 3) float RGB in 0..255 -> (64, 64) label ids into LABELS."""
    mx, mn = rgb.max(-1), rgb.min(-1)
    dist = np.abs((_hue(rgb)[..., None] - _HUES + 180) % 360 - 180)            # (H, W, 6)
    chromatic = np.array([COLOURS.index(c) for c in _CHROMATIC])[dist.argmin(-1)]
    grey = np.where(mx < _BLACK_MAX, COLOURS.index("black"),
                    np.where(mx > _WHITE_MIN, COLOURS.index("white"), LABELS.index(DEFAULT_BACKGROUND)))
    coloured = (mx - mn >= _CHROMA_MIN) & (mx - mn >= _SATURATION_MIN * mx)
    return np.where(coloured, chromatic, grey)


def _find(labels: np.ndarray, fine: np.ndarray, colour: str) -> np.ndarray | None:
    """Silhouette of the object of `colour`, or None if no blob of reasonable size has it.
    labels: of the median-filtered image (finds the blob); fine: of the raw image (keeps corners)."""
    core = _largest_blob(_dilate(_erode(labels == COLOURS.index(colour))))
    if core.sum() < MIN_AREA:
        return None
    return (fine == COLOURS.index(colour)) & _dilate(core)


def _bbox_centre(m: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(m)
    return np.array([xs.min() + xs.max() + 1, ys.min() + ys.max() + 1]) / 2    # (x, y), px


def _faceted(mask: np.ndarray, shade: np.ndarray, axis: float, width: float) -> float | None:
    """log(RSS_ramp / RSS_step): how much better a step at the axis explains the shading of the lower
    body (unbroken rows 1.05-1.95 half-widths below the top) than a linear ramp does,
    each row with its own offset. A cube's side faces are flat and meet in a vertical edge under its
    top corner (> 0); a sphere is smoothly shaded (< 0). None when no row has two pixels each side."""
    top = np.flatnonzero(mask.any(1))[0]
    d = (np.arange(mask.shape[0]) - top + 0.5) / width                      # (H,) depth below top
    x = np.arange(mask.shape[1]) + 0.5 - axis                                # (W,) offset from axis
    first, last = np.argmax(mask, 1), mask.shape[1] - np.argmax(mask[:, ::-1], 1)
    unbroken = mask.sum(1) == last - first               # (H,) one run of pixels: nothing pokes in
    rows = (d >= 1.05) & (d <= 1.95) & unbroken
    band = _erode(mask) & rows[:, None] & (np.abs(x) > 0.5)[None, :]
    band &= (((band & (x < 0)).sum(1) >= 2) & ((band & (x > 0)).sum(1) >= 2))[:, None]
    if not band.any():
        return None
    ys, xs = np.nonzero(band)
    n = np.bincount(ys, minlength=mask.shape[0])

    def within_row(v):                                   # v minus its row's mean
        return v - (np.bincount(ys, v, minlength=mask.shape[0]) / np.maximum(n, 1))[ys]

    v, step, ramp = within_row(shade[ys, xs]), within_row((x[xs] < 0) * 1.0), within_row(x[xs])
    rss = [np.sum((v - r * (v @ r) / max(r @ r, 1e-9)) ** 2) for r in (ramp, step)]
    return float(np.log((rss[0] + 1) / (rss[1] + 1)))


def classify_shape(mask: np.ndarray, shade: np.ndarray, occluded: bool = False) -> str:
    """Silhouette (H, W) bool and shading (H, W) -> "sphere", "cube" or "pyramid" (steps 3-4 above).
    occluded: another object touches this one, so only its wider side is trusted."""
    rows = np.flatnonzero(mask.any(1))
    rows = np.arange(rows[0], rows[-1] + 1)
    left = np.array([np.argmax(mask[y]) if mask[y].any() else np.nan for y in rows])
    right = np.array([mask.shape[1] - np.argmax(mask[y, ::-1]) if mask[y].any() else np.nan for y in rows])
    top = max(2, len(rows) // 4)                         # the symmetry axis from the top quarter
    axis = np.nanmedian((left[:top] + right[:top]) / 2)
    sides = np.stack([axis - left, right - axis])       # (2, rows) half-widths
    half = sides[np.nanargmax(np.nansum(sides, 1))] if occluded else np.nanmean(sides, 0)
    half = np.nan_to_num(np.clip(half, 0, None))
    width = half.max()
    d = (rows - rows[0] + 0.5) / width
    stretch = (0.85, 0.92, 1.0, 1.08, 1.15)              # blur and pixel rounding change the aspect
    errors = {s: min(np.mean((half / width - _profile(s, d * k)) ** 2) for k in stretch) for s in SHAPES}
    best = min(errors, key=errors.get)
    if best == "pyramid":
        return best
    faceted = _faceted(mask, shade, axis, width)
    if faceted is None:
        return best
    outline = np.log((errors["sphere"] + 1e-6) / (errors["cube"] + 1e-6))   # > 0: cube-like outline
    return "cube" if faceted + OUTLINE_WEIGHT * outline > FACETED_MIN else "sphere"


def _relation(relation: str, a: np.ndarray, b: np.ndarray) -> bool:
    """Silhouettes a, b -> does "a <relation> b" hold in the image plane?"""
    (xa, ya), (xb, yb) = _bbox_centre(a), _bbox_centre(b)
    dx, dy = xb - xa, yb - ya                            # from a to b, y down
    if relation == "in front of":
        return bool((_dilate(a) & b).any() and ya > yb)
    along, across = {"left of": (dx, dy), "right of": (-dx, dy),
                     "above": (dy, dx), "below": (-dy, dx)}[relation]
    return bool(along > abs(across))


def evaluate(caption: str, rgb: np.ndarray, depth: np.ndarray | None = None) -> dict[str, bool]:
    """caption, rgb (H, W, 3) uint8, depth (H, W) in [0, 1] with 1 = near (optional)
    -> {attribute: passed} for the attributes the caption states (see the module docstring)."""
    spec = parse_caption(caption)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}; "
                         "convert floats in [0, 1] with (x * 255).round().astype(np.uint8)")
    if depth is not None and np.shape(depth) != rgb.shape[:2]:
        raise ValueError(f"depth must be (H, W) = {rgb.shape[:2]} like the image, got {np.shape(depth)}")
    img = _to_canvas(rgb)
    smooth = np.median(np.stack(_shift(img, None)), 0)  # (64, 64, 3) 3x3 median
    labels = label_pixels(smooth)
    masks = [_find(labels, label_pixels(img), o.colour) for o in spec.objects]
    found = all(m is not None for m in masks)
    out = {"colour": found, "shape": found}
    if found:
        touching = len(masks) == 2 and bool((_dilate(masks[0]) & masks[1]).any())
        out["shape"] = all(classify_shape(m, smooth @ _RAMP[o.colour], touching) == o.shape
                           for m, o in zip(masks, spec.objects))
    obj = spec.objects[0]
    if obj.size is not None:
        extent = max(np.ptp(np.nonzero(masks[0]), 1)) + 1 if found else 0
        out["size"] = found and bool(extent > SIZE_SPLIT) == (obj.size == "large")
    if obj.position is not None:
        out["position"] = found and obj.position == min(
            POSITION_XY, key=lambda p: np.hypot(*(np.subtract(POSITION_XY[p], _bbox_centre(masks[0])))))
    if spec.relation is not None:
        out["relation"] = found and _relation(spec.relation, *masks)
        if spec.relation == "in front of" and depth is not None:
            d = _to_canvas(np.asarray(depth, np.float32))
            out["depth_order"] = found and bool(np.median(d[masks[0]]) > np.median(d[masks[1]]))
    ring = np.ones((CANVAS, CANVAS), bool)
    ring[2:-2, 2:-2] = False                             # the 2-px border
    out["background"] = LABELS[np.bincount(labels[ring], minlength=len(LABELS)).argmax()] == \
        (spec.background or DEFAULT_BACKGROUND)
    return out


def score(results: list[dict[str, bool]]) -> dict[str, float]:
    """Per-attribute accuracy over the results that have the attribute, and "all": the fraction of
    results that pass every attribute."""
    acc = {k: float(np.mean([r[k] for r in results if k in r])) for k in ATTRIBUTES
           if any(k in r for r in results)}
    acc["all"] = float(np.mean([all(r.values()) for r in results])) if results else float("nan")
    return acc


def load_depth(path: str) -> np.ndarray:
    """A grayscale depth PNG -> (H, W) float32 in [0, 1], 1 = near: 16-bit / 65535, 8-bit / 255."""
    im = Image.open(path)
    if im.mode not in ("L", "I", "I;16", "I;16B", "I;16L"):
        raise ValueError(f"{path}: depth must be a grayscale PNG (16-bit, 65535 = near), not mode {im.mode}")
    return np.asarray(im, dtype=np.float32) / (255.0 if im.mode == "L" else 65535.0)


def eval_shapes_cli(image_path: str, caption: str, depth_path: str | None = None) -> str:
    """`fastldm eval-shapes IMAGE.png --caption "..." [--depth DEPTH.png]` -> a per-attribute table."""
    rgb = np.asarray(Image.open(image_path).convert("RGB"))
    depth = load_depth(depth_path) if depth_path else None
    result = evaluate(caption, rgb, depth)
    lines = [f"caption: {caption}"] + [f"  {k:<12} {'yes' if v else 'NO'}" for k, v in result.items()]
    lines.append(f"  {'passed':<12} {sum(result.values())}/{len(result)}")
    return "\n".join(lines)
