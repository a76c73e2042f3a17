"""3-D export (fastldm.tools.export3d): files that load back with trimesh, exact geometry for known depth maps,
cuts at depth discontinuities, the CLI's --export on the embedded model, and user errors."""
from __future__ import annotations

import io
import json
import math
import os
import struct

import numpy as np
import pytest
import trimesh
from click.testing import CliRunner
from PIL import Image

import fastldm
from conftest import randomize_
from fastldm.api import EMBEDDED_MODEL
from fastldm.cli import main
from fastldm.errors import RequestError
from fastldm.pipeline import GenerationRequest, GenerationResult
from fastldm.tools import export3d as E

H, W = 6, 8                  # not square: catches rows and columns swapped


def _image(h=H, w=W, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _result(image, depth) -> GenerationResult:
    return GenerationResult(images=[image], depths=None if depth is None else [depth], seeds=[0], steps=1,
                            request=GenerationRequest(prompt="x"))


def _two_planes(h=12, w=16, square=(3, 7, 5, 11)) -> np.ndarray:
    """A far background (disparity 0.2) with a near square (disparity 1.0) over rows r0:r1, columns c0:c1."""
    depth = np.full((h, w), round(0.2 * 65535), np.uint16)
    r0, r1, c0, c1 = square
    depth[r0:r1, c0:c1] = 65535
    return depth


def test_distance_pins_near_and_far_and_is_inverse_in_disparity():
    z = E.distance(np.array([[65535, 0, 32768]], np.uint16), near=2.0, far=10.0)
    d = 32768 / 65535
    assert np.allclose(z, [[2.0, 10.0, 1 / (d / 2.0 + (1 - d) / 10.0)]])


def test_glb_plane_counts_bounds_texture_and_framing(tmp_path):
    image, fov = _image(), 90.0                                # f = (W/2) / tan(45 deg) = W/2 pixels
    depth = np.full((H, W), 65535, np.uint16)                  # everything at z = near = 2
    path = tmp_path / "plane.glb"
    assert E.export_rgbd(image, depth, path, fov=fov, near=2.0, far=5.0) == [path]
    scene = trimesh.load(path)
    mesh = trimesh.load(path, force="mesh", process=False)     # the node transform applied
    (raw,) = scene.geometry.values()                           # the vertices as stored: camera space
    assert len(raw.vertices) == H * W and len(raw.faces) == 2 * (H - 1) * (W - 1)
    f, z0 = W / 2, 2.0
    half = np.array([(W / 2 - 0.5) / f * z0, (H / 2 - 0.5) / f * z0])
    assert np.allclose(raw.bounds, [[-half[0], -half[1], -z0], [half[0], half[1], -z0]], atol=1e-6)
    # framed: the middle of the depth range at the origin, scaled by 1 / its distance; the camera at (0, 0, 1)
    assert np.allclose(mesh.bounds, [[-half[0] / z0, -half[1] / z0, 0], [half[0] / z0, half[1] / z0, 0]],
                       atol=1e-6)
    assert np.allclose(scene.camera_transform, trimesh.transformations.translation_matrix([0, 0, 1]))
    assert np.isclose(scene.camera.fov[1], np.degrees(2 * np.arctan(H / W)))    # yfov (glTF stores no xfov)
    # faces towards the camera (+z), texture = the image, vertex 0 = pixel (0, 0) at its centre
    assert np.allclose(raw.face_normals, [0, 0, 1], atol=1e-6)
    assert np.array_equal(np.asarray(raw.visual.material.baseColorTexture.convert("RGB")), np.asarray(image))
    assert np.allclose(raw.visual.uv[0], [0.5 / W, 1 - 0.5 / H], atol=1e-6)


def test_glb_material_is_unlit_and_double_sided(tmp_path):
    files = E.encode(_image(), np.full((H, W), 40000, np.uint16), "glb")
    glb = io.BytesIO(files["rgbd.glb"])
    glb.seek(12)
    length, _ = struct.unpack("<II", glb.read(8))
    gltf = json.loads(glb.read(length))                        # the GLB's JSON chunk (glTF 2.0 spec, 4.4)
    (material,) = gltf["materials"]
    assert material["extensions"] == {"KHR_materials_unlit": {}} and material["doubleSided"] is True
    assert "KHR_materials_unlit" in gltf["extensionsUsed"]
    assert gltf["cameras"][0]["perspective"]["aspectRatio"] == W / H
    assert material["pbrMetallicRoughness"]["baseColorTexture"] == {"index": 0}


def test_two_planes_give_two_disconnected_surfaces(tmp_path):
    depth = _two_planes()
    path = tmp_path / "planes.glb"
    E.export_rgbd(_image(12, 16), depth, path)
    mesh = trimesh.load(path, force="mesh", process=False)
    parts = mesh.split(only_watertight=False)
    assert len(parts) == 2
    assert sorted(len(p.vertices) for p in parts) == [4 * 6, 12 * 16 - 4 * 6]       # square, background
    assert len(trimesh.load(path).geometry["rgbd"].vertices) == 12 * 16
    # with no cut the two planes are one rubber sheet
    E.export_rgbd(_image(12, 16), depth, path, max_jump=10.0)
    assert len(trimesh.load(path, force="mesh", process=False).split(only_watertight=False)) == 1


def test_ply_point_cloud_has_every_pixel_with_its_colour(tmp_path):
    image, depth = _image(), _two_planes(H, W, (1, 4, 2, 5))
    path = tmp_path / "cloud.ply"
    E.export_rgbd(image, depth, path, fov=60.0)
    cloud = trimesh.load(path)
    assert isinstance(cloud, trimesh.PointCloud) and len(cloud.vertices) == H * W
    assert np.array_equal(cloud.colors[:, :3], np.asarray(image).reshape(-1, 3))
    z = E.distance(depth)
    assert np.allclose(cloud.vertices, E.unproject(z, 60.0).reshape(-1, 3), atol=1e-5)
    f = (W / 2) / math.tan(math.radians(30))
    assert np.isclose(cloud.vertices[0, 0], (0.5 - W / 2) / f * z[0, 0], atol=1e-5)   # pixel (0, 0): left, up
    assert cloud.vertices[0, 1] > 0 and np.allclose(cloud.vertices[:, 2], -z.reshape(-1), atol=1e-5)


def test_obj_writes_mesh_material_and_texture_beside_it(tmp_path):
    image = _image()
    paths = E.export_rgbd(image, _two_planes(H, W, (2, 4, 2, 6)), tmp_path / "my scene.obj")
    assert [p.name for p in paths] == ["my_scene-texture.png", "my_scene.mtl", "my scene.obj"]
    mesh = trimesh.load(tmp_path / "my scene.obj", process=False)
    assert len(mesh.vertices) == H * W
    assert np.array_equal(np.asarray(mesh.visual.material.image.convert("RGB")), np.asarray(image))
    assert "Kd 1.0" in (tmp_path / "my_scene.mtl").read_text()


def test_files_are_0644_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "a.glb"
    E.export_rgbd(_image(), np.zeros((H, W), np.uint16), path)
    assert (path.stat().st_mode & 0o777) == 0o644

    def fail(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        E.export_rgbd(_image(), np.zeros((H, W), np.uint16), tmp_path / "b.ply")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.glb"]


def test_export_3d_from_a_result_and_its_errors(tmp_path):
    image, depth = _image(), np.full((H, W), 30000, np.uint16)
    assert fastldm.export_3d is E.export_3d
    assert fastldm.export_3d(_result(image, depth), 0, tmp_path / "r.ply") == [tmp_path / "r.ply"]
    bad = {
        "depths": lambda: E.export_3d(_result(image, None), 0, tmp_path / "x.glb"),
        "i": lambda: E.export_3d(_result(image, depth), 1, tmp_path / "x.glb"),
        "format": lambda: E.export_3d(_result(image, depth), 0, tmp_path / "x.stl"),
        "fov": lambda: E.export_rgbd(image, depth, tmp_path / "x.glb", fov=180),
        "near": lambda: E.export_rgbd(image, depth, tmp_path / "x.glb", near=0),
        "far": lambda: E.export_rgbd(image, depth, tmp_path / "x.glb", near=2, far=2),
        "max_jump": lambda: E.export_rgbd(image, depth, tmp_path / "x.glb", max_jump=0),
        "depth": lambda: E.export_rgbd(image, depth.T.copy(), tmp_path / "x.glb"),
    }
    for field, call in bad.items():
        with pytest.raises(RequestError) as e:
            call()
        assert e.value.field == field, e.value
    with pytest.raises(RequestError, match="RGBD"):
        E.export_3d(_result(image, None), 0, tmp_path / "x.glb")
    checker = np.where(np.indices((H, W)).sum(0) % 2 == 0, 65535, 0).astype(np.uint16)
    with pytest.raises(RequestError, match="every triangle"):
        E.export_rgbd(image, checker, tmp_path / "x.glb")
    with pytest.raises(RequestError, match="uint16"):
        E.export_rgbd(image, depth.astype(np.float32), tmp_path / "x.glb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.ply"]


@pytest.mark.skipif(not (EMBEDDED_MODEL / "model_index.json").exists(), reason="the embedded model is not installed")
@pytest.mark.usefixtures("one_thread")
def test_cli_export_on_the_embedded_model(tmp_path):
    res = CliRunner().invoke(main, ["generate", "a red cube on the left", "--steps", "2", "--seed", "3", "--out",
                                    str(tmp_path), "--export", "glb", "--export", "ply"])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00000-3-depth.png", "00000-3.glb", "00000-3.ply", "00000-3.png"]
    assert all(str(tmp_path / n) in res.output for n in names)
    scene = trimesh.load(tmp_path / "00000-3.glb")
    (mesh,) = scene.geometry.values()
    assert 0 < len(mesh.vertices) <= 64 * 64 and len(mesh.faces) > 0
    assert np.allclose(scene.camera_transform[:3, 3], [0, 0, 1]) and np.allclose(scene.bounds[:, 2].mean(), 0)
    assert len(trimesh.load(tmp_path / "00000-3.ply").vertices) == 64 * 64


@pytest.mark.usefixtures("one_thread")
def test_cli_export_with_an_rgb_model_says_so(tmp_path):
    from fastldm.config import CLIPConfig, ModelConfig, UNetConfig, VAEConfig
    from fastldm.loading.save import save_folder
    from fastldm.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from fastldm.tokenizer import CLIPTokenizer

    text = CLIPConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    unet = UNetConfig(block_out_channels=(32,), layers_per_block=(1,), cross_attn=(True,), attention_heads=(2,),
                      cross_attention_dim=32, norm_num_groups=8, sample_size=8)
    vae = VAEConfig(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8, force_upcast=False,
                    sample_size=8)
    modules = {"text_encoder": randomize_(CLIPTextModel(text), 1, std=0.1),
               "unet": randomize_(UNet2DConditionModel(unet), 2, std=0.08),
               "vae": randomize_(AutoencoderKL(vae), 3, std=0.05)}
    folder = save_folder(ModelConfig("sd1", text, unet, vae, default_size=8), modules,
                         {"tokenizer": CLIPTokenizer.bundled()}, tmp_path / "tiny-rgb")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["generate", "a cube", "--model", str(folder), "--steps", "1", "--seed", "0",
                                    "--out", str(out), "--export", "glb"])
    assert res.exit_code == 0, res.output
    assert "no 3-D export" in res.output and "RGBD" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["00000-0.png"]
