"""ShapesWorld: the caption language of fastldm's embedded tiny text-to-RGBD model, and its evaluator.

    fastldm.tools.shapes.captions   vocabulary, grammar, palette and layouts (re-exported here)
    fastldm.tools.shapes.evaluate   evaluate(caption, rgb, depth), score(results), eval_shapes_cli(...)
The renderer that draws the training data is training/shapesworld.py. The evaluator's functions are
not re-exported, so that `fastldm.tools.shapes.evaluate` always names the module.
"""
from .captions import (COLOURS, POSITIONS, RELATIONS, SHAPES, SIZES, ObjectSpec, PlacedObject, Scene,
                       SceneSpec, caption_of, is_held_out, parse_caption, random_caption, random_spec,
                       sample_scene)

__all__ = ["COLOURS", "POSITIONS", "RELATIONS", "SHAPES", "SIZES", "ObjectSpec", "PlacedObject", "Scene",
           "SceneSpec", "caption_of", "is_held_out", "parse_caption", "random_caption", "random_spec",
           "sample_scene"]
