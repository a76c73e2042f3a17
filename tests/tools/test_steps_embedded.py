"""`--steps auto` on the embedded model out of the box: a predictor or constant fallback ships for every sampler the
dynamic-execution benchmark covers, says how it was trained, and `generate(steps="auto")` runs what it picks."""
from __future__ import annotations

import pytest

import fastldm
from fastldm.api import EMBEDDED_MODEL
from fastldm.runtime.step_predictor import ConstantSteps, StepPredictors
from fastldm.samplers import resolve_sampler

SAMPLERS = ("DDIM", "Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M Karras", "UniPC")
PROMPT = "a large red cube left of a blue sphere"

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (EMBEDDED_MODEL / "model_index.json").exists(),
                                 reason="the embedded model is not installed")]


@pytest.fixture(scope="module")
def pipe():
    return fastldm.load(EMBEDDED_MODEL)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_steps_auto_out_of_the_box(pipe, sampler):
    spec = resolve_sampler(sampler)
    predictor = StepPredictors(EMBEDDED_MODEL).get(spec)
    assert predictor.sampler == spec.name and predictor.kind == "quality"
    assert {"constant", "eval"} <= set(predictor.info)                        # the fallback and held-out results
    features = predictor.prompt_features(pipe, [PROMPT])
    picked = predictor.predict_steps(features)[0]
    if isinstance(predictor, ConstantSteps):
        assert picked == predictor.constant == predictor.info["constant"]
    assert pipe.generate(PROMPT, steps="auto", seed=0, sampler=sampler).steps == picked
