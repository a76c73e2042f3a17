"""ShapesWorld renderer: 64 x 64 RGBD scenes of shaded spheres, cubes and pyramids, with captions.

What a caption means (vocabulary, palette, sizes, positions, relations) is fastldm.tools.shapes.captions;
this file only draws a laid-out Scene. Objects are ray-cast in numpy, vectorised over all objects of
one (slot, shape, size) in a batch, each inside a square window around it:

* Camera: orthographic, looking 30 degrees down onto objects turned 45 degrees about the vertical, so a
  cube shows its top and two sides and a pyramid its two front faces. Screen frame: X right, Y up,
  Z toward the viewer, in canvas pixels; the background is the plane Z = 0.
* Sphere: exact ray-sphere hit. Cube and pyramid: convex polyhedra as intersections of half-spaces
  n.p <= d; an orthographic ray (X, Y) enters where Z = min over front-facing planes of
  (d - nx X - ny Y) / nz and hits if that is >= the max over back-facing planes (the slab method of
  Kay & Kajiya 1986, generalised to any convex polyhedron).
* Shading: Lambert with one fixed light from the upper left, plus ambient:
  f = AMBIENT + (1 - AMBIENT) max(0, n.l); the pixel is its colour's ramp at f (captions.PALETTE),
  so hue never changes with shading and black/white stay far from the grey background.
* Depth: float32 in [0, 1], **1 = near**, 0 = the background plane; Z / DEPTH_RANGE. LDM3D trains on
  DPT-Large (MiDaS) depth, which is relative inverse depth (larger = nearer), and its 16-bit depth
  PNGs follow it, so a ShapesWorld depth PNG is uint16 depth * 65535 with 65535 = nearest.

Throughput (python training/bench_shapesworld.py: sampling + rendering, one process): about 8,300
scenes per CPU second, 3,500-5,700 scenes/s wall on the shared 2-core development machine under load.
"""
from __future__ import annotations

import numpy as np

from fastldm.tools.shapes.captions import CANVAS, COLOURS, DEFAULT_BACKGROUND, GREY, PALETTE, Scene, sample_scene

DEPTH_RANGE = 72.0                                       # Z (px) of depth 1; the nearest surface is < 65
AMBIENT = 0.25
YAW, PITCH = np.radians(45.0), np.radians(30.0)
PYRAMID_HEIGHT = 2.6                                     # in half-base units


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


LIGHT = _unit([-0.4, 0.56, 0.72])                        # toward the light, screen frame
_VIEW = (np.array([[1, 0, 0], [0, np.cos(PITCH), -np.sin(PITCH)], [0, np.sin(PITCH), np.cos(PITCH)]])
         @ np.array([[np.cos(YAW), 0, np.sin(YAW)], [0, 1, 0], [-np.sin(YAW), 0, np.cos(YAW)]]))


def _polyhedron(normals, offsets, vertices):
    """Object-frame half-spaces n.p <= d -> screen-frame planes, moved so that the silhouette's
    bounding box is centred on the origin and scaled so that its half-height is 1.
    Returns normals (P, 3), offsets (P,), and the Lambert shade of each face (P,)."""
    n = _unit(normals) @ _VIEW.T                         # (P, 3) rotated normals
    d = np.asarray(offsets, np.float64) * np.linalg.norm(normals, axis=-1) ** -1
    v = np.asarray(vertices, np.float64) @ _VIEW.T      # (V, 3)
    centre = (v.max(0) + v.min(0)) / 2
    scale = 2.0 / (v[:, 1].max() - v[:, 1].min())
    d = scale * (d - n @ centre)
    shade = AMBIENT + (1 - AMBIENT) * np.clip(n @ LIGHT, 0, None)
    return n.astype(np.float32), d.astype(np.float32), shade.astype(np.float32)


_CUBE = _polyhedron(np.concatenate([np.eye(3), -np.eye(3)]), np.ones(6),
                    [[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
_PYRAMID = _polyhedron(                                 # base y >= -H/2; four sides through the apex
    [[0, -1, 0], [PYRAMID_HEIGHT, 1, 0], [-PYRAMID_HEIGHT, 1, 0], [0, 1, PYRAMID_HEIGHT],
     [0, 1, -PYRAMID_HEIGHT]],
    [PYRAMID_HEIGHT / 2] * 5,
    [[0, PYRAMID_HEIGHT / 2, 0]] + [[x, -PYRAMID_HEIGHT / 2, z] for x in (-1, 1) for z in (-1, 1)])
_LIT = np.array([PALETTE[c][0] for c in COLOURS], np.float32)        # (C, 3)
_SHADOW = np.array([PALETTE[c][1] for c in COLOURS], np.float32)     # (C, 3)
_BG_SHADE = AMBIENT + (1 - AMBIENT) * LIGHT[2]          # a coloured background is lit head-on


def _background_rgb(name: str) -> np.ndarray:
    if name == DEFAULT_BACKGROUND:
        return np.array(GREY, np.float32)
    c = COLOURS.index(name)
    return _SHADOW[c] + _BG_SHADE * (_LIT[c] - _SHADOW[c])


def _sphere(X, Y, r):
    """X (m, 1, W), Y (m, H, 1), r (m, 1, 1) relative to each centre -> Z (m, H, W) (-inf = miss), shade."""
    h2 = r * r - X * X - Y * Y
    nz = np.sqrt(np.maximum(h2, 0))
    lx, ly, lz = LIGHT.astype(np.float32)
    lambert = (X * lx + Y * ly + nz * lz) / r
    shade = AMBIENT + (1 - AMBIENT) * np.clip(lambert, 0, None)
    return np.where(h2 > 0, nz, -np.inf), shade


def _convex(X, Y, r, planes):
    """Orthographic ray cast of a convex polyhedron (normals (P, 3), offsets (P,), face shades (P,))."""
    n, d, face_shade = planes
    front, back = n[:, 2] > 0, n[:, 2] < 0
    # Z where the ray at (X, Y) crosses each plane: (m, P, H, W)
    z = (r[:, None] * d[None, :, None, None] - n[None, :, 0, None, None] * X[:, None]
         - n[None, :, 1, None, None] * Y[:, None]) / n[None, :, 2, None, None]
    entry = z[:, front].min(1)                           # (m, H, W) the visible surface
    face = np.flatnonzero(front)[z[:, front].argmin(1)]  # (m, H, W) which plane it lies on
    hit = entry >= z[:, back].max(1)
    return np.where(hit, entry, -np.inf), face_shade[face]


_RAYCAST = {"sphere": _sphere, "cube": lambda X, Y, r: _convex(X, Y, r, _CUBE),
            "pyramid": lambda X, Y, r: _convex(X, Y, r, _PYRAMID)}


def render_scenes(scenes: list[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """Scenes -> rgb (n, 64, 64, 3) uint8, depth (n, 64, 64) float32 in [0, 1] (1 = near).
    Objects are cast in groups of one (slot, shape, size), each inside a square window around it."""
    n = len(scenes)
    rgb = np.empty((n, CANVAS, CANVAS, 3), np.uint8)
    rgb[:] = np.rint(np.stack([_background_rgb(s.background) for s in scenes]))[:, None, None, :]
    zbuf = np.zeros((n, CANVAS, CANVAS), np.float32)    # the background plane is Z = 0
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(scenes):                       # a scene has at most one object per slot
        for slot, o in enumerate(s.objects):
            groups.setdefault((slot, o.shape, o.size), []).append(i)
    for (slot, shape, _), members in groups.items():
        idx = np.array(members)
        objs = [scenes[i].objects[slot] for i in idx]
        x, y, z = (np.array(v, np.float32) for v in zip(*[(o.x, o.y, o.z) for o in objs]))
        c = np.array([COLOURS.index(o.colour) for o in objs])
        r = np.float32(objs[0].r)
        w = 2 * int(np.ceil(r)) + 2                      # window side, px
        x0 = np.clip(np.floor(x).astype(np.int64) - w // 2, 0, CANVAS - w)    # (m,) window origin
        y0 = np.clip(np.floor(y).astype(np.int64) - w // 2, 0, CANVAS - w)
        cols = x0[:, None] + np.arange(w)                # (m, w) canvas columns of the window
        rows = y0[:, None] + np.arange(w)                # (m, w)
        Z, shade = _RAYCAST[shape]((cols + 0.5 - x[:, None])[:, None, :],     # X (m, 1, w)
                                   (y[:, None] - rows - 0.5)[:, :, None],     # Y (m, w, 1)
                                   np.full((len(idx), 1, 1), r, np.float32))
        Z = Z + z[:, None, None]                         # (m, w, w) nearness of the surface
        seen = Z > zbuf[idx[:, None, None], rows[:, :, None], cols[:, None, :]]
        k, i, j = np.nonzero(seen)                       # (p,) object, window row, window column
        at = idx[k], rows[k, i], cols[k, j]              # (p,) scene, canvas row, canvas column
        zbuf[at] = Z[k, i, j]
        ramp = _SHADOW[c[k]] + shade[k, i, j, None] * (_LIT - _SHADOW)[c[k]]          # (p, 3)
        rgb[at] = np.rint(ramp).astype(np.uint8)
    return rgb, np.clip(zbuf / DEPTH_RANGE, 0.0, 1.0)


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """One scene -> rgb (64, 64, 3) uint8, depth (64, 64) float32 in [0, 1] (1 = near)."""
    rgb, depth = render_scenes([scene])
    return rgb[0], depth[0]


def render_batch(rng: np.random.Generator | int, n: int, split: str | None = None
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """n random scenes -> captions, rgb (n, 64, 64, 3) uint8, depth (n, 64, 64) float32 (1 = near).
    rng: a numpy Generator or a seed. split: None, "train" (never a held-out caption) or "heldout"
    (captions.is_held_out)."""
    rng = np.random.default_rng(rng)
    scenes = [sample_scene(rng, split=split) for _ in range(n)]
    rgb, depth = render_scenes(scenes)
    return [s.caption for s in scenes], rgb, depth
