"""Request -> Plan: one RequestError per bad field (naming field, value and allowed range) for every front end,
and GenerationRequest's JSON form."""
from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

import fastldm
from fastldm.errors import RequestError, StepPredictorMissing
from fastldm.plan import Limits
from fastldm.request import GenerationRequest, image_to_base64


@pytest.fixture(scope="module")
def pipe():
    return fastldm.load(fastldm.default_model(), dtype="fp32")


GREY = Image.new("RGB", (64, 64), (128, 128, 128))


@pytest.mark.parametrize("field,kw,allowed", [
    ("width", dict(width=50), "a multiple of 8"),   # lcm(8, the VAE's factor 4)
    ("height", dict(height=0), "a multiple of"),
    ("steps", dict(steps=0), "a number of steps from 1 to 1000"),
    ("steps", dict(steps=1001), "from 1 to 1000"),
    ("n", dict(n=0), "a whole number from 1 to 64"),
    ("guidance", dict(guidance=-1.0), "a number from 0 to 100"),
    ("seed", dict(seed=-5), "a seed"),
    ("sampler", dict(sampler="warp"), "one of Euler (euler)"),
    ("scheduler", dict(scheduler="zigzag"), "one of automatic"),
    ("strength", dict(init_image=GREY, strength=0.0), "a denoising strength in (0, 1]"),
    ("strength", dict(init_image=GREY, strength=0.01, steps=10), "at least 0.1 with 10 steps"),
    ("early_stop", dict(early_stop=-0.1), "a threshold >= 0"),
    ("cache_interval", dict(cache_interval=0), "from 1 to 100"),
    ("prompt", dict(prompt=3), "a string"),
    ("steps", dict(steps="many"), "a whole number"),
    ("guidance", dict(guidance=float("nan")), "a finite number"),
])
def test_bad_fields(pipe, field, kw, allowed):
    request = GenerationRequest(**({"prompt": "a red cube"} | kw))
    with pytest.raises(RequestError) as e:
        pipe.plan(request)
    assert e.value.field == field and allowed in str(e.value) and str(e.value).startswith(f"{field}=")


def test_width_message_suggests_a_valid_size(pipe):
    with pytest.raises(RequestError, match=r"width=50 is not valid: a multiple of 8 from 8 to 8192 \(e\.g\. 48\)"):
        pipe.plan(GenerationRequest("x", width=50))


def test_limits_are_the_callers(pipe):
    tight = Limits(max_steps=30, max_n=2, max_side=256, max_pixels=128 * 128, max_prompt_chars=20)
    for kw, field in [(dict(steps=31), "steps"), (dict(n=3), "n"), (dict(width=264), "width"),
                      (dict(width=256, height=256), "width"), (dict(prompt="x" * 21), "prompt")]:
        with pytest.raises(RequestError) as e:
            pipe.plan(GenerationRequest(**({"prompt": "a red cube"} | kw)), tight)
        assert e.value.field == field
    assert pipe.plan(GenerationRequest("a red cube", steps=30, n=2, width=128, height=128), tight).n == 2


def test_plan_resolves_defaults_and_img2img(pipe):
    plan = pipe.plan(GenerationRequest("a red cube", init_image=GREY, strength=0.5, steps=10, seed=-1))
    assert plan.steps == 10 and plan.denoising_steps == 5 and plan.strength == 0.5
    assert 0 <= plan.seeds[0] < 2**32 and plan.guidance == 5.0          # the embedded model's default CFG
    txt = pipe.plan(GenerationRequest("a red cube", strength=0.3))      # strength without an image: ignored
    assert txt.strength is None and txt.denoising_steps == 20


def test_auto_steps_without_predictor(pipe):
    with pytest.raises(StepPredictorMissing, match="no step predictor for sampler DPM\+\+ 2M SDE"):
        pipe.plan(GenerationRequest("a red cube", steps="auto", sampler="DPM++ 2M SDE"))


def test_json_round_trip_with_image():
    img = Image.new("RGB", (8, 8), (10, 200, 30))
    req = GenerationRequest("a cube", negative_prompt="blur", steps="auto", seed=3, init_image=img, strength=0.4)
    data = json.loads(json.dumps(req.to_dict()))
    back = GenerationRequest.from_dict(data)
    assert back.init_image.getpixel((0, 0)) == (10, 200, 30) and back.steps == "auto" and back.seed == 3
    assert back.to_dict() == data


def test_from_dict_accepts_data_urls_and_rejects_unknown_fields_and_types():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    assert GenerationRequest.from_dict({"prompt": "x", "init_image": url}).init_image.size == (4, 4)
    assert GenerationRequest.from_dict({"prompt": "x", "guidance": 7, "n": 2.0}).guidance == 7.0
    for data, field in [({"prompt": "x", "cfg": 7}, "cfg"), ({"negative_prompt": "x"}, "prompt"),
                        ({"prompt": "x", "n": True}, "n"), ({"prompt": "x", "init_image": "not base64!"}, "init_image"),
                        ({"prompt": "x", "init_image": base64.b64encode(b"text").decode()}, "init_image"),
                        ({"prompt": "x", "width": "512"}, "width")]:
        with pytest.raises(RequestError) as e:
            GenerationRequest.from_dict(data)
        assert e.value.field == field


def test_image_to_base64_keeps_parameters():
    from PIL import PngImagePlugin

    buf = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cube\nSteps: 4")
    Image.new("RGB", (4, 4)).save(buf, format="PNG", pnginfo=info)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        again = Image.open(io.BytesIO(base64.b64decode(image_to_base64(im))))
    assert again.text["parameters"] == "a cube\nSteps: 4"
