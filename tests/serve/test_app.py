"""The app in-process (TestClient): every bad input answered with the right 4xx, a JSON body and a message naming
the field, in each API's error shape; the queue limit (429 + Retry-After); the API key; CORS; the body cap; the
jobs API with its events and files; metrics; kept jobs bounded in time and count."""
from __future__ import annotations

import base64
import io
import json
import time

import pytest
from PIL import Image

from fastldm.errors import UnknownJob
from fastldm.request import GenerationRequest
from fastldm.serve.jobs import JobStore, ServeJob

from .conftest import wait_until

SMALL = {"width": 64, "height": 64, "steps": 2}


def png_b64(size=(64, 64), colour=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def client(make_client):
    return make_client(max_steps=50, max_n=4, max_width=256, max_height=256, max_prompt_chars=100,
                       max_body_bytes=200_000)


BAD = [  # (method, path, body, status, field that the message names)
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "width": 65, "height": 64}, 422, "width"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "width": 512, "height": 512}, 422, "width"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}, 422, "steps"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 51}, 422, "steps"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "steps": "many"}, 422, "steps"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 3, "n_iter": 2}, 422, "batch_size"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": 1000}, 422, "cfg_scale"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Nope"}, 422, "sampler_name"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "scheduler": "bogus"}, 422, "scheduler"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x" * 101}, 422, "prompt"),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "../x"}}, 404, None),
    ("post", "/sdapi/v1/img2img", {"prompt": "x", "init_images": ["not base64!"]}, 422, "init_image"),
    ("post", "/sdapi/v1/img2img", {"prompt": "x", "init_images": []}, 422, "init_images"),
    ("post", "/sdapi/v1/img2img", {"prompt": "x", "init_images": [png_b64()], "denoising_strength": 2}, 422,
     "denoising_strength"),
    ("post", "/sdapi/v1/options", {"sd_model_checkpoint": "/etc/passwd"}, 404, None),
    ("post", "/sdapi/v1/png-info", {"image": "AAAA"}, 422, "image"),
    ("post", "/v1/images/generations", {"prompt": "x", "size": "big"}, 422, "size"),
    ("post", "/v1/images/generations", {"prompt": "x", "size": "1024x1024"}, 422, "size"),
    ("post", "/v1/images/generations", {"prompt": "x", "n": 0}, 422, "n"),
    ("post", "/v1/images/generations", {"prompt": "x", "output_format": "gif"}, 422, "output_format"),
    ("post", "/v1/images/generations", {"prompt": "x", "stream": True}, 422, "stream"),
    ("post", "/v1/images/generations", {"prompt": "x", "model": "../../etc/passwd"}, 404, None),
    ("post", "/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, 404, None),
    ("post", "/v1/images/generations", {"size": "64x64"}, 422, "prompt"),
    ("post", "/fastldm/v1/jobs", {"prompt": "x", "colour": "red"}, 422, "colour"),
    ("post", "/fastldm/v1/jobs", {"prompt": "x", "cache_interval": 0}, 422, "cache_interval"),
    ("post", "/fastldm/v1/jobs", {"prompt": "x", "init_image": "data:image/png;base64,AAAA"}, 422, "init_image"),
    ("post", "/fastldm/v1/jobs", {"prompt": "x", "guidance": -1}, 422, "guidance"),
    ("get", "/fastldm/v1/jobs/nonexistent", None, 404, None),
    ("get", "/v1/models/..%2F..%2Fetc", None, 404, None),
    ("get", "/no/such/route", None, 404, None),
    ("get", "/sdapi/v1/txt2img", None, 405, None),
]


@pytest.mark.parametrize("method, path, body, status, field", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_get_a_4xx_with_a_json_reason(client, method, path, body, status, field):
    r = getattr(client, method)(path, **({} if body is None else {"json": body}))
    assert r.status_code == status, r.text
    data = r.json()
    if path.startswith("/sdapi/"):
        assert set(data) == {"error", "detail", "body", "errors"}
        message = data["detail"]
    else:
        assert set(data["error"]) == {"message", "type", "param", "code"}
        message = data["error"]["message"]
        if field is not None:
            assert data["error"]["param"] == field
    assert message and (field is None or field in message)


def test_body_too_large_is_413_and_the_server_goes_on(client):
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["A" * 300_000]})
    assert r.status_code == 413 and "200000 bytes" in r.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "a red cube", **SMALL}).status_code == 200


def test_a1111_txt2img_answers_like_a1111(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red cube", "seed": 5, "batch_size": 2, "styles": [],
                                               "enable_hr": False, "restore_faces": False, **SMALL})
    assert r.status_code == 200
    data = r.json()
    info = json.loads(data["info"])
    assert info["all_seeds"] == [5, 6] and info["width"] == 64 and info["sd_model_name"] == "shapes-rgbd"
    assert len(data["images"]) == len(data["depths"]) == 2 and len(info["infotexts"]) == 2
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][1])))
    assert image.size == (64, 64) and image.text["parameters"] == info["infotexts"][1]
    assert "Seed: 6" in info["infotexts"][1]
    depth = Image.open(io.BytesIO(base64.b64decode(data["depths"][0])))
    assert depth.mode.startswith("I;16") and depth.size == (64, 64)
    png = client.post("/sdapi/v1/png-info", json={"image": data["images"][0]}).json()
    assert png["parameters"]["Prompt"] == "a red cube" and png["parameters"]["Seed"] == "5"


def test_queue_full_is_429_with_retry_after(make_client):
    client = make_client(max_batch=1, max_queue=1)
    running = client.post("/fastldm/v1/jobs", json={"prompt": "a red cube", "steps": 150, **SMALL} | {"steps": 150})
    queued = client.post("/fastldm/v1/jobs", json={"prompt": "a blue cube", **SMALL})
    assert running.status_code == queued.status_code == 202
    wait_until(lambda: client.get(running.json()["url"]).json()["status"] == "running")
    for path, body in [("/fastldm/v1/jobs", {"prompt": "a green cube", **SMALL}),
                       ("/v1/images/generations", {"prompt": "a green cube", "size": "64x64"}),
                       ("/sdapi/v1/txt2img", {"prompt": "a green cube", **SMALL})]:
        r = client.post(path, json=body)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert "busy" in r.text
    for job in (queued, running):
        assert client.post(job.json()["url"] + "/cancel").json()["status"] == "cancelled"
    metrics = client.get("/metrics").text
    assert "fastldm_queue_rejections_total 3.0" in metrics and 'fastldm_http_errors_total{status="429"} 3.0' in metrics


def test_api_key(make_client):
    client = make_client(api_key="s3cret")
    job = {"prompt": "a red cube", **SMALL}
    basic = lambda pair: {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, basic("user:wrong"), {"Authorization": "s3cret"}):
        r = client.post("/sdapi/v1/txt2img", json=job, headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        assert "API key" in r.json()["detail"]
    assert client.get("/v1/models").status_code == 401 and client.get("/metrics").status_code == 401
    for headers in ({"Authorization": "Bearer s3cret"}, basic("anyone:s3cret")):
        assert client.post("/sdapi/v1/txt2img", json=job, headers=headers).status_code == 200
    assert make_client(api_key="alice:pw").get("/v1/models", headers=basic("alice:pw")).status_code == 200


def test_cors_preflight_for_configured_origins_only(make_client):
    client = make_client(cors_origins=("http://page.example",), api_key="k")
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    ok = client.options("/v1/images/generations", headers={"Origin": "http://page.example", **ask})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://page.example"
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    refused = client.options("/v1/images/generations", headers={"Origin": "http://evil.example", **ask})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    simple = client.get("/v1/models", headers={"Origin": "http://page.example", "Authorization": "Bearer k"})
    assert simple.headers["access-control-allow-origin"] == "http://page.example"
    assert "access-control-allow-origin" not in make_client().get("/healthz", headers={"Origin": "http://x"}).headers


def test_jobs_api_events_files_and_cancel(client):
    created = client.post("/fastldm/v1/jobs", json={"prompt": "a red cube", "seed": 3, **SMALL} | {"steps": 3})
    assert created.status_code == 202 and created.headers["Location"] == created.json()["url"]
    with client.stream("GET", created.json()["events"]) as stream:
        lines = [line for line in stream.iter_lines() if line]
    kinds = [line.split(": ", 1)[1] for line in lines if line.startswith("event:")]
    assert kinds[0] in ("queued", "started") and kinds[-1] == "done" and kinds.count("step") >= 1
    steps = [json.loads(line[6:]) for line, kind in zip(lines[1::2], kinds) if kind == "step"]
    assert steps[-1]["step"] == 3 and steps[-1]["preview"].startswith("data:image/png;base64,")
    view = client.get(created.json()["url"]).json()
    assert view["status"] == "done" and view["progress"]["fraction"] == 1.0
    image = view["result"]["images"][0]
    assert image["seed"] == 3 and "Seed: 3" in image["parameters"]
    png = client.get(image["png"])
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).text["parameters"] == image["parameters"]
    glb = client.get(image["glb"])
    assert glb.headers["content-type"] == "model/gltf-binary" and glb.content[:4] == b"glTF"
    assert Image.open(io.BytesIO(client.get(image["depth"]).content)).mode.startswith("I;16")
    assert client.get(image["png"].replace("0.png", "5.png")).status_code == 404
    assert client.get(image["png"].replace("0.png", "x.exe")).status_code == 404

    slow = client.post("/fastldm/v1/jobs", json={"prompt": "a red cube", **SMALL} | {"steps": 50}).json()
    assert client.post(slow["url"] + "/cancel").json()["status"] == "cancelled"
    assert client.get(slow["url"] + "/files/0.png").status_code == 409


def test_plan_check_answers_200_either_way(client):
    ok = client.post("/fastldm/v1/plan", json={"prompt": "a red cube", "seed": 9, **SMALL}).json()
    assert ok["ok"] and ok["plan"]["seeds"] == [9] and ok["plan"]["width"] == 64
    bad = client.post("/fastldm/v1/plan", json={"prompt": "a red cube", "width": 65}).json()
    assert not bad["ok"] and bad["error"]["field"] == "width" and "multiple of 8" in bad["error"]["message"]
    assert client.get("/healthz").json()["queued"] == 0


def test_openai_url_responses_point_at_kept_files(client):
    r = client.post("/v1/images/generations", json={"prompt": "a red cube", "size": "64x64", "steps": 2,
                                                    "response_format": "url", "output_format": "webp"})
    url = r.json()["data"][0]["url"]
    assert r.status_code == 200 and url.endswith("/files/0.webp")
    assert client.get(url).headers["content-type"] == "image/webp"


def test_info_healthz_metrics_and_docs(client):
    info = client.get("/fastldm/v1/info").json()
    assert info["default_model"] == "shapes-rgbd" and "DPM++ 2M" in info["samplers"]
    assert info["limits"]["max_n"] == 4
    assert client.get("/healthz").json()["models_loaded"] == ["shapes-rgbd"]
    client.post("/sdapi/v1/txt2img", json={"prompt": "a red cube", **SMALL})
    metrics = client.get("/metrics").text
    for name in ("fastldm_queue_depth", "fastldm_batch_images_bucket", "fastldm_step_seconds_bucket",
                 "fastldm_images_total", 'fastldm_jobs_total{outcome="done"}'):
        assert name in metrics
    assert "/sdapi/v1/txt2img" in client.get("/openapi.json").json()["paths"]


def test_finished_jobs_are_kept_for_a_bounded_time_and_count():
    def finished(at: float) -> ServeJob:
        job = ServeJob("m", _plan())
        job.emit("done")
        job.finished = at
        return job

    store = JobStore(ttl_s=60, count=2)
    now = time.time()
    old, a, b, c = finished(now - 61), finished(now - 3), finished(now - 2), finished(now - 1)
    running = ServeJob("m", _plan())
    for job in (running, old, a, b, c):
        store.add(job)
    for gone in (old, a):
        with pytest.raises(UnknownJob):
            store.get(gone.id)
    assert [store.get(j.id) for j in (b, c, running)] == [b, c, running]


def _plan():
    from fastldm.plan import Plan

    return Plan(GenerationRequest("x"), 64, 64, (4, 16, 16), None, 1, _Grid(), (1,), 5.0, None, "eager")


class _Grid:
    sigmas = (1.0, 0.0)
