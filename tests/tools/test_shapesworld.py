"""ShapesWorld: the caption grammar (fastldm.tools.shapes.captions) and the renderer (training/shapesworld.py)."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from fastldm.tools.shapes.captions import (COLOURS, GREY, PALETTE, POSITION_XY, POSITIONS, RELATIONS, SHAPES, SIZES,
                                     ObjectSpec, Scene, SceneSpec, caption_of, is_held_out, parse_caption,
                                     random_caption, random_spec, sample_scene)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "training"))  # training/ holds scripts, not a package
import shapesworld  # noqa: E402


def all_captions():
    """Every well-posed caption of the grammar (enumerated, not sampled)."""
    for size, c, s, pos, bg in itertools.product((None,) + SIZES, COLOURS, SHAPES, (None,) + POSITIONS,
                                                 (None,) + COLOURS):
        if bg != c:
            yield caption_of(SceneSpec((ObjectSpec(s, c, size, pos),), None, bg))
    for c1, s1, rel, c2, s2, bg in itertools.product(COLOURS, SHAPES, RELATIONS, COLOURS, SHAPES, (None,) + COLOURS):
        if c1 != c2 and bg not in (c1, c2):
            yield caption_of(SceneSpec((ObjectSpec(s1, c1), ObjectSpec(s2, c2)), rel, bg))


# --- captions -------------------------------------------------------------------------------------------------

def test_parse_examples():
    spec = parse_caption("a small red sphere on the left on a blue background")
    assert (spec.objects[0].size, spec.objects[0].colour, spec.objects[0].shape, spec.objects[0].position,
            spec.relation, spec.background) == ("small", "red", "sphere", "left", None, "blue")
    spec = parse_caption("a green cube in the center")
    assert spec.objects[0].position == "center" and spec.objects[0].size is None and spec.background is None
    spec = parse_caption("a yellow pyramid in front of a white cube")
    assert spec.relation == "in front of" and [o.colour for o in spec.objects] == ["yellow", "white"]
    assert parse_caption("  An ORANGE  cube ") == parse_caption("a orange cube")   # case, spacing, "an"


@pytest.mark.parametrize("bad", ["a red sphere on the center", "a big red sphere", "a red circle",
                                 "a small red cube left of a blue sphere", "red sphere", "a grey cube",
                                 "a red cube behind a blue cube", ""])
def test_parse_rejects_text_outside_the_grammar(bad):
    with pytest.raises(ValueError, match="not a ShapesWorld caption") as e:
        parse_caption(bad)
    msg = str(e.value)
    assert "\n" not in msg and "a [small|large] <colour> <shape>" in msg and "in front of" in msg


@pytest.mark.parametrize("ill", ["a red cube on a red background", "a red cube left of a red sphere",
                                 "a blue cube above a red sphere on a red background"])
def test_parse_rejects_ill_posed_captions(ill):
    with pytest.raises(ValueError, match="ill-posed"):
        parse_caption(ill)


def test_every_caption_parses_and_round_trips():
    for caption in all_captions():
        assert caption_of(parse_caption(caption)) == caption


def test_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(500):
        spec = random_spec(rng)
        assert parse_caption(caption_of(spec)) == spec
        assert caption_of(parse_caption(caption_of(spec))) == caption_of(spec)


def test_every_word_is_reachable():
    rng = np.random.default_rng(1)
    seen = {k: set() for k in ("shape", "colour", "size", "position", "relation", "background")}
    for _ in range(3000):
        spec = parse_caption(random_caption(rng))
        for o in spec.objects:
            seen["shape"].add(o.shape), seen["colour"].add(o.colour)
            seen["size"].add(o.size), seen["position"].add(o.position)
        seen["relation"].add(spec.relation), seen["background"].add(spec.background)
    assert seen["shape"] == set(SHAPES) and seen["colour"] == set(COLOURS)
    assert seen["size"] == set(SIZES) | {None} and seen["position"] == set(POSITIONS) | {None}
    assert seen["relation"] == set(RELATIONS) | {None} and seen["background"] == set(COLOURS) | {None}


def test_held_out_split():
    captions = list(all_captions())
    held = [c for c in captions if is_held_out(c)]
    assert len(set(captions)) == len(captions) > 20000
    assert 0.08 < len(held) / len(captions) < 0.12                     # ~10%, by hash: binomial sd is 0.2%
    assert is_held_out(held[0].upper()) and not is_held_out(next(c for c in captions if not is_held_out(c)))
    rng = np.random.default_rng(2)
    assert not any(is_held_out(random_caption(rng, split="train")) for _ in range(500))
    assert all(is_held_out(random_caption(rng, split="heldout")) for _ in range(50))
    captions, _, _ = shapesworld.render_batch(rng, 200, split="train")
    assert not any(map(is_held_out, captions))
    with pytest.raises(ValueError, match="split"):
        random_caption(rng, split="test")


def test_layouts_follow_the_caption():
    rng = np.random.default_rng(3)
    for _ in range(300):
        scene = sample_scene(rng)
        spec = scene.spec
        for o, s in zip(scene.objects, spec.objects):
            assert (o.shape, o.colour) == (s.shape, s.colour) and (s.size is None or s.size == o.size)
            assert o.r + 1 <= o.x <= 63 - o.r and o.r + 1 <= o.y <= 63 - o.r      # on the canvas
            if s.position is not None:
                assert np.hypot(o.x - POSITION_XY[s.position][0], o.y - POSITION_XY[s.position][1]) <= 3
        if spec.relation is not None:
            a, b = scene.objects
            dx, dy = b.x - a.x, b.y - a.y
            if spec.relation == "in front of":
                assert a.z - 1.1 * a.r > b.z + 1.1 * b.r and a.y > b.y     # wholly nearer, lower on screen
            else:
                along, across = {"left of": (dx, dy), "right of": (-dx, dy),
                                 "above": (dy, dx), "below": (-dy, dx)}[spec.relation]
                assert along >= a.r + b.r + 2 and abs(across) <= 4
        assert scene.background == (spec.background or "grey")


# --- renderer -------------------------------------------------------------------------------------------------

def test_render_batch_shapes_and_determinism():
    caps, rgb, depth = shapesworld.render_batch(np.random.default_rng(7), 32)
    assert len(caps) == 32 and rgb.shape == (32, 64, 64, 3) and rgb.dtype == np.uint8
    assert depth.shape == (32, 64, 64) and depth.dtype == np.float32
    assert depth.min() == 0.0 and depth.max() <= 1.0
    caps2, rgb2, depth2 = shapesworld.render_batch(7, 32)              # a seed works as well as a Generator
    assert caps == caps2 and np.array_equal(rgb, rgb2) and np.array_equal(depth, depth2)
    caps3, rgb3, _ = shapesworld.render_batch(8, 32)
    assert caps3 != caps and not np.array_equal(rgb3, rgb)


def test_batch_equals_single_renders():
    rng = np.random.default_rng(4)
    scenes = [sample_scene(rng) for _ in range(24)]
    rgb, depth = shapesworld.render_scenes(scenes)
    for i, s in enumerate(scenes):
        r, d = shapesworld.render(s)
        assert np.array_equal(r, rgb[i]) and np.array_equal(d, depth[i])


def test_background_colour_and_depth():
    rng = np.random.default_rng(5)
    rgb, depth = shapesworld.render(sample_scene(rng, "a small red cube in the center"))
    assert tuple(rgb[0, 0]) == GREY and depth[0, 0] == 0.0
    assert depth[32, 32] > 0.1                                         # the object is nearer than the backdrop
    for colour in COLOURS:
        other = "white" if colour != "white" else "black"
        rgb, _ = shapesworld.render(sample_scene(rng, f"a small {other} sphere on a {colour} background"))
        lit, shadow = np.array(PALETTE[colour], float)
        t = (rgb[0, 0] - shadow) @ (lit - shadow) / ((lit - shadow) @ (lit - shadow))
        assert np.abs(shadow + t * (lit - shadow) - rgb[0, 0]).max() <= 1 and 0 < t < 1   # on its colour's ramp


def test_in_front_of_is_nearer_and_occludes():
    rng = np.random.default_rng(6)
    for shapes in itertools.product(SHAPES, SHAPES):
        scene = sample_scene(rng, f"a red {shapes[0]} in front of a blue {shapes[1]}")
        rgb, depth = shapesworld.render(scene)
        alone_rgb, alone_depth = shapesworld.render(Scene(scene.spec, scene.objects[1:], scene.background))
        red, blue = rgb[..., 0] > rgb[..., 2], rgb[..., 2] > rgb[..., 0]
        red &= rgb.max(-1) - rgb.min(-1) > 30
        blue &= rgb.max(-1) - rgb.min(-1) > 30
        assert depth[red].min() > depth[blue].max()                    # the front object is wholly nearer
        hidden = (alone_depth > 0) & red                               # back-object pixels the front one covers
        assert hidden.sum() >= 5                                       # it occludes ...
        assert blue.sum() >= 0.5 * (alone_depth > 0).sum()             # ... but the back object stays recognisable


def test_the_look():
    """Cubes show three flat faces, pyramids two, spheres a smooth gradient; large is clearly larger."""
    rng = np.random.default_rng(9)

    def shades(caption):
        rgb, depth = shapesworld.render(sample_scene(rng, caption))
        return {tuple(p) for p in rgb[depth > 0]}, (depth > 0).sum()

    cube, cube_area = shades("a large red cube in the center")
    pyramid, _ = shades("a large red pyramid in the center")
    sphere, sphere_area = shades("a large red sphere in the center")
    assert len(cube) == 3 and len(pyramid) == 2 and len(sphere) > 30
    _, small_area = shades("a small red sphere in the center")
    assert sphere_area > 2.5 * small_area and cube_area > 0.6 * sphere_area   # (13/7)^2 = 3.4
