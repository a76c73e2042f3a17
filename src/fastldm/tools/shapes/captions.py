"""The ShapesWorld language: its vocabulary, its two-sentence grammar, and what a caption means on a
64 x 64 canvas (palette, sizes, positions, relations). The renderer (training/shapesworld.py) draws
what this file lays out; the evaluator (fastldm.tools.shapes.evaluate) checks images against it.

Grammar (the words are fixed so that anyone can write a caption):
    a [small|large] <colour> <shape> [on the <left|right|top|bottom>|in the center] [on a <colour> background]
    a <colour> <shape> <relation> a <colour> <shape> [on a <colour> background]
Optional parts are optional: no size means either size, no position means anywhere, no background
means the default grey one. Case and spacing are free, and "an" may stand for "a".

Ill-posed captions are refused (ValueError), so that every caption has exactly one reading:
  * an object may not have the colour of its background (it would be invisible);
  * the two objects of a relation must differ in colour (objects are told apart by colour).
Grey is the default background only, never an object colour, and the palette keeps white and black
objects far from it: the darkest shade of white is 175/255, the lightest of black 75/255, grey 128/255.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

SHAPES = ("sphere", "cube", "pyramid")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left of", "right of", "above", "below", "in front of")
DEFAULT_BACKGROUND = "grey"

# Palette: each colour is a ramp from its shadow tone (Lambert term 0) to its lit tone (term 1).
# Chromatic shadows are half the lit tone, so hue is constant along a ramp; achromatic ramps stay
# clear of the grey background.
PALETTE: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    #          lit               shadow
    "red":    ((225, 35, 35),   (112, 18, 18)),
    "green":  ((50, 200, 70),   (25, 100, 35)),
    "blue":   ((45, 90, 230),   (22, 45, 115)),
    "yellow": ((240, 215, 30),  (120, 108, 15)),
    "purple": ((160, 60, 210),  (80, 30, 105)),
    "orange": ((245, 130, 20),  (122, 65, 10)),
    "white":  ((250, 250, 250), (175, 175, 175)),
    "black":  ((75, 75, 75),    (15, 15, 15)),
}
GREY = (128, 128, 128)

# Geometry on the 64-px canvas (pixel units; x right, y down, pixel i covers [i, i+1)).
CANVAS = 64
RADIUS = {"small": 7.0, "large": 13.0}     # half the height of the object's silhouette
POSITION_XY = {"left": (17.0, 32.0), "right": (47.0, 32.0), "top": (32.0, 17.0),
               "bottom": (32.0, 47.0), "center": (32.0, 32.0)}
POSITION_JITTER = 2.0                        # +- px around a named position
MARGIN = 1.5                                 # px kept free between a silhouette and the canvas edge
HALF_DEPTH = 1.1                             # largest half-extent along Z of any shape, in radii

_GRAMMAR = ('"a [small|large] <colour> <shape> [on the left|right|top|bottom | in the center] '
            '[on a <colour> background]" or "a <colour> <shape> <relation> a <colour> <shape> '
            '[on a <colour> background]" with colour in ' + "|".join(COLOURS) + ", shape in "
            + "|".join(SHAPES) + ", relation in " + "|".join(RELATIONS))
_C, _S = "|".join(COLOURS), "|".join(SHAPES)
_BG = rf"(?: on a (?P<bg>{_C}) background)?"
_SINGLE = re.compile(rf"a(?: (?P<size>small|large))? (?P<c>{_C}) (?P<s>{_S})"
                     rf"(?: on the (?P<pos>left|right|top|bottom)| in the (?P<ctr>center))?{_BG}")
_PAIR = re.compile(rf"a (?P<c1>{_C}) (?P<s1>{_S}) (?P<rel>{'|'.join(RELATIONS)}) "
                   rf"a (?P<c2>{_C}) (?P<s2>{_S}){_BG}")


@dataclass(frozen=True)
class ObjectSpec:
    """One object as a caption states it; size/position None = not stated."""
    shape: str
    colour: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class SceneSpec:
    """What a caption says: one object, or two with `relation` (objects[0] <relation> objects[1]).
    background None = not stated (grey)."""
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str | None = None


@dataclass(frozen=True)
class PlacedObject:
    """A concrete object: (x, y) is the centre of its silhouette's bounding box in canvas pixels,
    r half its height, z the nearness of its centre in front of the background plane (px, larger =
    nearer; every object lies wholly in front of the plane: z >= HALF_DEPTH * r)."""
    shape: str
    colour: str
    size: str
    x: float
    y: float
    z: float

    @property
    def r(self) -> float:
        return RADIUS[self.size]


@dataclass(frozen=True)
class Scene:
    """A caption's spec and one concrete layout of it."""
    spec: SceneSpec
    objects: tuple[PlacedObject, ...]
    background: str                          # a colour name or DEFAULT_BACKGROUND

    @property
    def caption(self) -> str:
        return caption_of(self.spec)


def _check_well_posed(spec: SceneSpec, text: str) -> None:
    colours = [o.colour for o in spec.objects]
    if spec.background in colours:
        raise ValueError(f"ill-posed caption {text!r}: an object has the colour of its background; "
                         "pick a different background or object colour")
    if len(set(colours)) < len(colours):
        raise ValueError(f"ill-posed caption {text!r}: the two objects have the same colour; "
                         "give them different colours")


def _normalise(text: str) -> str:
    """Lower case, single spaces, and "an" read as the grammar's "a"."""
    return " ".join("a" if w == "an" else w for w in text.lower().split())


def parse_caption(text: str) -> SceneSpec:
    """Caption -> SceneSpec, by the strict grammar above (after _normalise)."""
    norm = _normalise(text)
    if m := _SINGLE.fullmatch(norm):
        pos = m["pos"] or m["ctr"]
        spec = SceneSpec((ObjectSpec(m["s"], m["c"], m["size"], pos),), None, m["bg"])
    elif m := _PAIR.fullmatch(norm):
        spec = SceneSpec((ObjectSpec(m["s1"], m["c1"]), ObjectSpec(m["s2"], m["c2"])), m["rel"], m["bg"])
    else:
        raise ValueError(f"not a ShapesWorld caption: {text!r}; write {_GRAMMAR}")
    _check_well_posed(spec, text)
    return spec


def caption_of(scene: SceneSpec | Scene) -> str:
    """The caption of a spec (or of a scene's spec); parse_caption(caption_of(s)) == s."""
    spec = scene.spec if isinstance(scene, Scene) else scene
    bg = f" on a {spec.background} background" if spec.background else ""
    if spec.relation is not None:
        a, b = spec.objects
        return f"a {a.colour} {a.shape} {spec.relation} a {b.colour} {b.shape}{bg}"
    (o,) = spec.objects
    size = f" {o.size}" if o.size else ""
    pos = {None: "", "center": " in the center"}.get(o.position, f" on the {o.position}")
    return f"a{size} {o.colour} {o.shape}{pos}{bg}"


def is_held_out(caption: str) -> bool:
    """The evaluation split: a fixed ~10% of captions (by SHA-1 of the normalised caption) that
    training must never see."""
    return hashlib.sha1(_normalise(caption).encode()).digest()[0] < 26      # 26/256 = 10.2%


def _pick(rng: np.random.Generator, options, p_none: float = 0.0):
    return None if p_none and rng.random() < p_none else options[rng.integers(len(options))]


def random_spec(rng: np.random.Generator, split: str | None = None) -> SceneSpec:
    """A random well-posed SceneSpec: half single objects (size and position each stated 3 times in 4),
    half pairs (any relation, two different colours); a background is stated in 35%.
    split: None (any caption), "train" or "heldout" (is_held_out)."""
    if split not in (None, "train", "heldout"):
        raise ValueError(f"unknown split {split!r}; use None, 'train' or 'heldout'")
    while True:
        if rng.random() < 0.5:
            objects = (ObjectSpec(_pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, SIZES, 0.25),
                       _pick(rng, POSITIONS, 0.25)),)
            relation = None
        else:
            c1, c2 = rng.choice(len(COLOURS), 2, replace=False)
            objects = (ObjectSpec(_pick(rng, SHAPES), COLOURS[c1]),
                       ObjectSpec(_pick(rng, SHAPES), COLOURS[c2]))
            relation = _pick(rng, RELATIONS)
        free = [c for c in COLOURS if c not in {o.colour for o in objects}]
        spec = SceneSpec(objects, relation, _pick(rng, free, 0.65))
        if split is None or is_held_out(caption_of(spec)) == (split == "heldout"):
            return spec


def random_caption(rng: np.random.Generator, split: str | None = None) -> str:
    return caption_of(random_spec(rng, split))


def _place_single(o: ObjectSpec, rng: np.random.Generator) -> PlacedObject:
    size = o.size or _pick(rng, SIZES)
    r = RADIUS[size]
    if o.position is None:                   # anywhere on the canvas
        x, y = rng.uniform(r + MARGIN, CANVAS - r - MARGIN, 2)
    else:
        x, y = np.add(POSITION_XY[o.position], rng.uniform(-POSITION_JITTER, POSITION_JITTER, 2))
    z = HALF_DEPTH * r + rng.uniform(1, 6)
    return PlacedObject(o.shape, o.colour, size, float(x), float(y), float(z))


def _place_pair(a: ObjectSpec, b: ObjectSpec, relation: str, rng: np.random.Generator):
    """Two objects laid out by `relation` (a <relation> b). Side by side: centres apart along the
    axis by the two radii plus a 2-5 px gap, +-4 px across it. "in front of": a is nearer (its whole
    body in front of b's) and lower on screen: its top 0.3-0.6 radii of b below b's centre and at
    most half of b's radius to the side, so it always hides part of b's lower half and never more."""
    sa, sb = _pick(rng, SIZES), _pick(rng, SIZES)
    ra, rb = RADIUS[sa], RADIUS[sb]
    za, zb = HALF_DEPTH * ra + rng.uniform(1, 6), HALF_DEPTH * rb + rng.uniform(1, 6)
    if relation == "in front of":
        dx, dy = rng.uniform(-0.5, 0.5) * rb, rng.uniform(0.3, 0.6) * rb + ra
        zb = HALF_DEPTH * rb + rng.uniform(1, 3)
        za = zb + HALF_DEPTH * (ra + rb) + rng.uniform(2, 4)
    else:
        along = (ra + rb) + rng.uniform(2, 5)
        across = rng.uniform(-4, 4)
        dx, dy = {"left of": (-along, across), "right of": (along, across),
                  "above": (across, -along), "below": (across, along)}[relation]
    # centre the pair, then shift it by up to 2 px while keeping both silhouettes on the canvas
    xy = np.array([[CANVAS + dx, CANVAS + dy], [CANVAS - dx, CANVAS - dy]]) / 2     # (2 objects, xy)
    r = np.array([[ra], [rb]])
    shift = np.clip(rng.uniform(-2, 2, 2), (MARGIN - (xy - r)).max(0), (CANVAS - MARGIN - (xy + r)).min(0))
    (xa, ya), (xb, yb) = xy + shift
    return (PlacedObject(a.shape, a.colour, sa, float(xa), float(ya), float(za)),
            PlacedObject(b.shape, b.colour, sb, float(xb), float(yb), float(zb)))


def sample_scene(rng: np.random.Generator, spec: SceneSpec | str | None = None,
                 split: str | None = None) -> Scene:
    """A concrete random layout of `spec` (a SceneSpec or a caption), or of a random caption."""
    if spec is None:
        spec = random_spec(rng, split)
    elif isinstance(spec, str):
        spec = parse_caption(spec)
    if spec.relation is None:
        objects = (_place_single(spec.objects[0], rng),)
    else:
        objects = _place_pair(*spec.objects, spec.relation, rng)
    return Scene(spec, objects, spec.background or DEFAULT_BACKGROUND)
