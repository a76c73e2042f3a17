"""The ShapesWorld evaluator (fastldm.tools.shapes.evaluate) against ground-truth renders: it must pass true captions,
fail false ones, and survive noise, blur and other resolutions."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastldm.tools.shapes import captions as C
from fastldm.tools.shapes.evaluate import ATTRIBUTES, eval_shapes_cli, evaluate, label_pixels, load_depth, score

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "training"))  # training/ holds scripts, not a package
import shapesworld  # noqa: E402

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@pytest.fixture(scope="module")
def renders():
    """500 seeded scenes of random captions with their ground-truth RGB and depth."""
    scenes = [C.sample_scene(np.random.default_rng(2024 + i)) for i in range(500)]
    rgb, depth = shapesworld.render_scenes(scenes)
    return scenes, rgb, depth


def degrade(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mild blur (separable [1, 2, 1] / 4) then Gaussian noise of sigma 8/255."""
    x = rgb.astype(np.float32)
    for axis in (0, 1):
        p = np.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
        lo, mid, hi = (np.take(p, np.arange(k, k + x.shape[axis]), axis) for k in range(3))
        x = (lo + 2 * mid + hi) / 4
    return np.clip(np.rint(x + rng.normal(0, 8, x.shape)), 0, 255).astype(np.uint8)


def stated(spec: C.SceneSpec) -> set[str]:
    keys = {"colour", "shape", "background"}
    keys |= {"size"} if spec.objects[0].size else set()
    keys |= {"position"} if spec.objects[0].position else set()
    keys |= {"relation"} if spec.relation else set()
    keys |= {"depth_order"} if spec.relation == "in front of" else set()
    return keys


def falsify(spec: C.SceneSpec, attribute: str, rng: np.random.Generator) -> C.SceneSpec:
    """A spec that differs from `spec` in `attribute` only, and is false of any render of `spec`."""
    objs, rep = list(spec.objects), dataclasses.replace
    used = {o.colour for o in objs} | {spec.background}
    if attribute == "colour":
        k = rng.integers(len(objs))
        objs[k] = rep(objs[k], colour=str(rng.choice([c for c in C.COLOURS if c not in used])))
    elif attribute == "shape":
        k = rng.integers(len(objs))
        objs[k] = rep(objs[k], shape=str(rng.choice([s for s in C.SHAPES if s != objs[k].shape])))
    elif attribute == "size":
        objs[0] = rep(objs[0], size="large" if objs[0].size == "small" else "small")
    elif attribute == "position":
        objs[0] = rep(objs[0], position=str(rng.choice([p for p in C.POSITIONS if p != objs[0].position])))
    elif attribute in ("relation", "depth_order"):
        if spec.relation == "in front of":                     # the other one is in front
            return rep(spec, objects=tuple(objs[::-1]))
        return rep(spec, relation=OPPOSITE[spec.relation])
    elif attribute == "background":
        return rep(spec, background=str(rng.choice([c for c in C.COLOURS if c not in used])))
    return rep(spec, objects=tuple(objs))


def test_ground_truth_passes(renders):
    scenes, rgb, depth = renders
    results = [evaluate(s.caption, rgb[i], depth[i]) for i, s in enumerate(scenes)]
    for s, r in zip(scenes, results):
        assert set(r) == stated(s.spec)                        # exactly the attributes the caption states
    acc = score(results)
    assert set(acc) == set(ATTRIBUTES) | {"all"}
    assert min(acc.values()) >= 0.98, acc                     # the requirement (measured: 1.000 everywhere)
    assert all(score([evaluate(s.caption, rgb[i]) for i, s in enumerate(scenes[:100])]).values())


def test_false_captions_fail(renders):
    """Not a yes-machine: a caption changed in one attribute fails on that attribute."""
    scenes, rgb, depth = renders
    rng = np.random.default_rng(0)
    rejected = {k: [] for k in ATTRIBUTES}
    for i, s in enumerate(scenes[:200]):
        for attribute in stated(s.spec):
            result = evaluate(C.caption_of(falsify(s.spec, attribute, rng)), rgb[i], depth[i])
            rejected[attribute].append(not result[attribute])
    rates = {k: float(np.mean(v)) for k, v in rejected.items()}
    assert min(len(v) for v in rejected.values()) >= 15       # every attribute is exercised
    assert min(rates.values()) >= 0.9, rates                  # the requirement (measured: >= 0.99 everywhere)


def test_robust_to_noise_and_blur(renders):
    scenes, rgb, depth = renders
    rng = np.random.default_rng(1)
    acc = score([evaluate(s.caption, degrade(rgb[i], rng), depth[i]) for i, s in enumerate(scenes[:300])])
    # the requirement; measured: shape 0.98 (small spheres vs cubes are the hard case), the rest >= 0.99
    assert min(acc.values()) >= 0.9, acc


@pytest.mark.parametrize("size", [40, 128, 512])
def test_any_resolution(renders, size):
    scenes, rgb, depth = renders
    results = []
    for i, s in enumerate(scenes[:40]):
        im = Image.fromarray(rgb[i]).resize((size, size), Image.BICUBIC)
        d = np.asarray(Image.fromarray(depth[i], "F").resize((size, size), Image.BILINEAR))
        results.append(evaluate(s.caption, np.asarray(im), d))
    acc = score(results)
    # Bicubic resampling rounds small corners and rims (at 40 px a small object is 9 px tall), hence
    # the looser bar; measured: >= 0.99 everywhere.
    assert min(acc.values()) >= 0.9, acc


def test_palette_labels():
    """Every shade of every palette colour is labelled as that colour; the default grey as grey."""
    t = np.linspace(0, 1, 11)[:, None]
    for colour, (lit, shadow) in C.PALETTE.items():
        ramp = np.array(shadow) + t * (np.array(lit) - np.array(shadow))      # (11, 3)
        assert (label_pixels(ramp[None].astype(np.float32)) == C.COLOURS.index(colour)).all(), colour
    assert label_pixels(np.full((1, 1, 3), C.GREY, np.float32))[0, 0] == len(C.COLOURS)


def test_score():
    acc = score([{"colour": True, "shape": False}, {"colour": True, "shape": True, "size": False}])
    assert acc == {"colour": 1.0, "shape": 0.5, "size": 0.0, "all": 0.0}


def test_blank_image_fails():
    blank = np.full((64, 64, 3), C.GREY, np.uint8)
    result = evaluate("a red cube on the left", blank)
    assert result == {"colour": False, "shape": False, "position": False, "background": True}


def test_errors():
    rgb = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="not a ShapesWorld caption"):
        evaluate("a dog", rgb)
    with pytest.raises(ValueError, match="uint8"):
        evaluate("a red cube", rgb.astype(np.float32))
    with pytest.raises(ValueError, match="depth must be"):
        evaluate("a red cube in front of a blue cube", rgb, np.zeros((32, 32)))


def test_cli(tmp_path):
    caption = "a green pyramid in front of a white sphere on a blue background"
    scene = C.sample_scene(np.random.default_rng(3), caption)
    rgb, depth = shapesworld.render(scene)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    Image.fromarray(np.rint(depth * 65535).astype(np.uint16)).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "I;16"
    assert np.abs(load_depth(str(tmp_path / "depth.png")) - depth).max() < 1e-4
    table = eval_shapes_cli(str(tmp_path / "img.png"), scene.caption, str(tmp_path / "depth.png"))
    assert "depth_order  yes" in table and "NO" not in table and "passed       5/5" in table
    table = eval_shapes_cli(str(tmp_path / "img.png"), "a white sphere in front of a green pyramid")
    assert "relation     NO" in table and "depth_order" not in table
    Image.fromarray(rgb).save(tmp_path / "rgb_depth.png")
    with pytest.raises(ValueError, match="grayscale"):
        load_depth(str(tmp_path / "rgb_depth.png"))
