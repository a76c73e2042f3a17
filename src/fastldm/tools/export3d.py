"""3-D export: an image and its depth map -> a textured triangle mesh (GLB, OBJ) or a coloured point cloud (PLY).

Depth -> distance. LDM3D (Stan et al. 2023, arXiv 2305.10853) is trained on DPT-Large depth (MiDaS, Ranftl et
al. 2021), which is relative *inverse* depth: a disparity known only up to an unknown scale and shift, larger =
nearer, normalised per image to 16 bits (65535 = nearest). The embedded ShapesWorld model writes its depth the
same way (training/shapesworld.py). So a 16-bit value v is a disparity d = v / 65535 in [0, 1] that is affine in
1/z, and we fix the two unknowns by pinning its ends to a near and a far plane:

    1 / z = d / near + (1 - d) / far            d = 1 -> z = near,  d = 0 -> z = far

z is the distance along the optical axis (what MiDaS's disparity inverts), in the units of `near` (1 by default:
"metric-like", the scene's true scale is unknowable from relative depth). Only far / near shapes the relief.
The default far = 4 near keeps the embedded model's objects about as deep as they are wide under the default
camera (measured on single-object ShapesWorld renders: a cube's visible depth / width is 1.0, a large sphere's
0.57 against 0.5 for a true hemisphere). The map is not re-stretched: the model was trained on per-image
normalised maps, so its values already span about [0, 1].

Camera: a pinhole at the origin looking down -z with y up (the glTF / OpenGL frame), principal point at the image
centre, square pixels, `fov` degrees across the image width; 55 by default, the field of view ZoeDepth's
point-cloud demo assumes for unknown photographs (Bhat et al. 2023, isl-org/ZoeDepth). Pixel (r, c) at distance z:

    x = (c + 0.5 - W/2) z / f,   y = -(r + 0.5 - H/2) z / f,   -z          f = (W/2) / tan(fov/2) pixels

Mesh: one vertex per pixel centre, two triangles per 2x2 block of pixels, wound counter-clockwise as the camera
sees them. A triangle whose farthest vertex is more than (1 + max_jump) times as far as its nearest is dropped,
so surfaces on either side of a depth discontinuity come apart instead of being joined by stretched "rubber
sheet" triangles; vertices left without triangles are removed. Default 0.15 (with far / near = 4): on 400
ShapesWorld renders every 2x2 block inside one object jumps by less than 0.15 and every block across an
object's outline by 0.2 or more; the embedded model's generated maps blur outlines over a pixel or two, and the
low side of that gap cuts more of those blurred steps.

Files. GLB: the mesh with the image as its baseColorTexture (UVs at the pixel centres), double-sided and
KHR_materials_unlit (the image is already lit: unlit, it looks as generated; the PBR values and smooth normals
are the fallback). Its node transform moves the middle of the depth range to the origin and scales by one over
that distance, so the scene is about a unit across and centred, and the camera that took the image sits at
(0, 0, 1) looking down -z (stored too, as a glTF perspective camera); the vertices stay in camera space. In
<model-viewer> that view is camera-orbit="0deg 90deg 1m" camera-target="0m 0m 0m" min-camera-orbit="auto auto
0m" with field-of-view and max-field-of-view the vertical field of view (its defaults look from 15 degrees
above at 30 degrees and keep the camera outside the model). OBJ: the same mesh in camera space, with STEM.mtl
and STEM-texture.png beside it. PLY: a point cloud in camera space, one point per pixel (H*W, row-major) with
its RGB colour, nothing cut. Files are written whole or not at all (a temporary file, then a rename).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from ..errors import RequestError
from ..files import atomic_write_bytes

FORMATS = ("glb", "ply", "obj")
DEFAULT_FOV = 55.0          # degrees across the image width
DEFAULT_NEAR, DEFAULT_FAR = 1.0, 4.0
DEFAULT_MAX_JUMP = 0.15     # relative depth jump above which a triangle is cut


def _check_options(fov: float, near: float, far: float, max_jump: float) -> None:
    if not 0 < fov < 180:
        raise RequestError("fov", fov, "an angle in degrees between 0 and 180 (exclusive)")
    if not 0 < near:
        raise RequestError("near", near, "a positive distance")
    if not near < far:
        raise RequestError("far", far, f"a distance greater than near ({near:g})")
    if not 0 < max_jump:
        raise RequestError("max_jump", max_jump, "a positive relative depth jump, e.g. 0.15")


def _check_rgbd(image: Image.Image, depth: np.ndarray) -> None:
    w, h = image.size
    if not (isinstance(depth, np.ndarray) and depth.dtype == np.uint16 and depth.shape == (h, w)):
        got = f"{getattr(depth, 'dtype', type(depth).__name__)} {getattr(depth, 'shape', '')}"
        raise RequestError("depth", got, f"a uint16 (H, W) = ({h}, {w}) array, the image's size")
    if h < 2 or w < 2:
        raise RequestError("depth", depth.shape, "at least 2 x 2 pixels")


def distance(depth: np.ndarray, near: float = DEFAULT_NEAR, far: float = DEFAULT_FAR) -> np.ndarray:
    """uint16 relative inverse depth (H, W), 65535 = nearest -> distance z along the optical axis (H, W) float64,
    in [near, far] (the mapping in the module docstring)."""
    d = depth.astype(np.float64) / 65535.0
    return 1.0 / (d / near + (1.0 - d) / far)


def unproject(z: np.ndarray, fov: float = DEFAULT_FOV) -> np.ndarray:
    """Distances (H, W) -> camera-space points (H, W, 3): x right, y up, the camera looking down -z."""
    h, w = z.shape
    f = (w / 2) / math.tan(math.radians(fov) / 2)
    u = (np.arange(w) + 0.5 - w / 2) / f                 # (W,) x / z of each column
    v = -(np.arange(h) + 0.5 - h / 2) / f                # (H,) y / z of each row
    return np.stack([u[None, :] * z, v[:, None] * z, -z], axis=-1)   # (H, W, 3)


def grid_faces(z: np.ndarray, max_jump: float = DEFAULT_MAX_JUMP) -> np.ndarray:
    """Triangles over the pixel grid of z (H, W) -> vertex indices (F, 3) into the row-major (H*W) vertices,
    counter-clockwise seen from the camera, without those whose far/near vertex ratio exceeds 1 + max_jump."""
    h, w = z.shape
    idx = np.arange(h * w).reshape(h, w)
    tl, tr, bl, br = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]        # (H-1, W-1) each
    faces = np.concatenate([np.stack([tl, bl, tr], -1).reshape(-1, 3),
                            np.stack([tr, bl, br], -1).reshape(-1, 3)])         # (2 (H-1)(W-1), 3)
    zf = z.reshape(-1)[faces]                                                    # (F, 3)
    return faces[zf.max(1) <= (1 + max_jump) * zf.min(1)]


def depth_mesh(image: Image.Image, depth: np.ndarray, fov: float = DEFAULT_FOV, near: float = DEFAULT_NEAR,
               far: float = DEFAULT_FAR, max_jump: float = DEFAULT_MAX_JUMP) -> trimesh.Trimesh:
    """An image and its uint16 depth (H, W) -> a textured mesh in camera space (see the module docstring)."""
    _check_options(fov, near, far, max_jump)
    _check_rgbd(image, depth)
    z = distance(depth, near, far)
    faces = grid_faces(z, max_jump)
    if len(faces) == 0:
        raise RequestError("max_jump", max_jump, "a larger jump: every triangle of this depth map was cut")
    h, w = z.shape
    uv = np.stack(np.meshgrid((np.arange(w) + 0.5) / w, 1 - (np.arange(h) + 0.5) / h), -1)   # (H, W, 2), v up
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=image.convert("RGB"), metallicFactor=0.0,
                                                   roughnessFactor=1.0, doubleSided=True)
    mesh = trimesh.Trimesh(unproject(z, fov).reshape(-1, 3), faces,
                           visual=trimesh.visual.TextureVisuals(uv=uv.reshape(-1, 2), material=material),
                           process=False)
    mesh.remove_unreferenced_vertices()
    return mesh


def point_cloud(image: Image.Image, depth: np.ndarray, fov: float = DEFAULT_FOV, near: float = DEFAULT_NEAR,
                far: float = DEFAULT_FAR) -> trimesh.PointCloud:
    """An image and its uint16 depth (H, W) -> H*W camera-space points (row-major) with the pixels' colours."""
    _check_options(fov, near, far, DEFAULT_MAX_JUMP)
    _check_rgbd(image, depth)
    rgb = np.asarray(image.convert("RGB")).reshape(-1, 3)                          # (H*W, 3) uint8
    return trimesh.PointCloud(unproject(distance(depth, near, far), fov).reshape(-1, 3), colors=rgb)


def _postprocess(tree: dict, aspect: float) -> None:
    """glTF JSON post-processor: every material KHR_materials_unlit (a Khronos extension that three.js, and so
    <model-viewer>, reads; the PBR values stay as the fallback), and the cameras' aspect ratio W / H (trimesh
    writes fov_x / fov_y, which is not)."""
    for m in tree.get("materials", []):
        m.setdefault("extensions", {})["KHR_materials_unlit"] = {}
    tree["extensionsUsed"] = sorted(set(tree.get("extensionsUsed", [])) | {"KHR_materials_unlit"})
    for c in tree.get("cameras", []):
        c["perspective"]["aspectRatio"] = aspect


def _framed(mesh: trimesh.Trimesh, size: tuple[int, int], fov: float) -> trimesh.Scene:
    """The mesh under a node transform that moves the middle of its depth range to the origin and scales by one
    over that distance, so the scene is about a unit across and the camera that took the image of `size`
    (W, H) sits at (0, 0, 1) looking down -z at the origin; that camera is in the scene (glTF perspective)."""
    z_mid = -float(mesh.bounds[:, 2].mean())
    transform = np.diag([1 / z_mid, 1 / z_mid, 1 / z_mid, 1.0])
    transform[2, 3] = 1.0
    w, h = size
    yfov = math.degrees(2 * math.atan(math.tan(math.radians(fov) / 2) * h / w))
    scene = trimesh.Scene(camera=trimesh.scene.Camera(name="camera", resolution=size, fov=(fov, yfov)))
    scene.add_geometry(mesh, node_name="rgbd", geom_name="rgbd", transform=transform)
    scene.graph["camera"] = trimesh.transformations.translation_matrix([0.0, 0.0, 1.0])
    return scene


def encode(image: Image.Image, depth: np.ndarray, format: str, stem: str = "rgbd", fov: float = DEFAULT_FOV,
           near: float = DEFAULT_NEAR, far: float = DEFAULT_FAR,
           max_jump: float = DEFAULT_MAX_JUMP) -> dict[str, bytes]:
    """An image and its depth -> the file(s) of one 3-D format as {file name: bytes}: STEM.glb, STEM.ply, or
    STEM.obj with STEM.mtl and STEM-texture.png (what a server sends or a writer saves)."""
    if format not in FORMATS:
        raise RequestError("format", format, ", ".join(FORMATS))
    if format == "ply":
        return {f"{stem}.ply": point_cloud(image, depth, fov, near, far).export(file_type="ply")}
    mesh = depth_mesh(image, depth, fov, near, far, max_jump)
    if format == "glb":
        return {f"{stem}.glb": _framed(mesh, image.size, fov).export(
            file_type="glb", include_normals=True,
            tree_postprocessor=lambda tree: _postprocess(tree, image.size[0] / image.size[1]))}
    plain = "_".join(stem.split())                      # OBJ/MTL names end at whitespace
    white, black = (255, 255, 255, 255), (0, 0, 0, 255)  # Kd (and Ka) multiply map_Kd; no highlight
    mesh.visual.material = trimesh.visual.material.SimpleMaterial(
        image=mesh.visual.material.baseColorTexture, diffuse=white, ambient=white, specular=black,
        name=f"{plain}-texture")
    text, files = trimesh.exchange.obj.export_obj(mesh, return_texture=True, write_texture=False,
                                                  mtl_name=f"{plain}.mtl")
    return files | {f"{stem}.obj": text.encode("utf-8")}


def export_rgbd(image: Image.Image, depth: np.ndarray, path: str | Path, format: str | None = None,
                **options) -> list[Path]:
    """Write an image and its uint16 depth (H, W) as a 3-D file at `path` (format from its suffix when not
    given: "glb", "ply" or "obj"); OBJ's material and texture go beside it. `options`: fov, near, far, max_jump
    (see `encode`). Returns the paths written, the 3-D file last."""
    path = Path(path)
    format = format or path.suffix.lower().lstrip(".")
    if format not in FORMATS:
        raise RequestError("format", format or path.name, f"{', '.join(FORMATS)} (or a path ending in one)")
    files = encode(image, depth, format, stem=path.stem, **options)
    main = files.pop(f"{path.stem}.{format}")
    written = []
    for name, data in files.items():
        atomic_write_bytes(path.parent / name, data)
        written.append(path.parent / name)
    atomic_write_bytes(path, main)
    return written + [path]


def export_3d(result, i: int, path: str | Path, format: str | None = None, **options) -> list[Path]:
    """Write image `i` of a GenerationResult of an RGBD model (LDM3D, the embedded model) and its depth as a 3-D
    file: "glb" (textured mesh), "ply" (coloured point cloud) or "obj" (mesh + .mtl + texture); the format comes
    from the suffix of `path` when not given. `options`: fov (degrees across the width, default 55), near and
    far (the distances of the nearest and farthest depth value, default 1 and 4), max_jump (relative depth
    jump above which mesh triangles are cut, default 0.15); the module docstring says why. Returns the paths
    written, the 3-D file last."""
    if result.depths is None:
        raise RequestError("depths", None, "3-D export needs a depth map, which only RGBD models (LDM3D, the "
                           "embedded model) produce; this result's model makes images only")
    if not 0 <= i < len(result.images):
        raise RequestError("i", i, f"an image index from 0 to {len(result.images) - 1}")
    return export_rgbd(result.images[i], result.depths[i], path, format, **options)


def export_beside(result, saved: list[Path], formats: list[str] | tuple[str, ...], **options) -> list[Path]:
    """Write each image of `result` in each of `formats` next to its saved PNG (same stem), given the paths
    that api.save_result returned (image i's PNG, then its -depth.png). Returns the paths written."""
    pngs = [p for p in saved if p.suffix == ".png" and not p.stem.endswith("-depth")]
    if len(pngs) != len(result.images):
        raise ValueError(f"{len(pngs)} image files saved for {len(result.images)} images")
    return [p for i, png in enumerate(pngs) for fmt in formats
            for p in export_3d(result, i, png.with_suffix(f".{fmt}"), fmt, **options)]
