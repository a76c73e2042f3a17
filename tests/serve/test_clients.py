"""`fastldm serve` in a subprocess on a free loopback port, used by the real clients: `webuiapi` (A1111) and
`openai`. Images decode, carry their parameters and match `fastldm generate` for the same seed; progress while a
job runs; the API key both ways; CORS preflight; cancelling one job; a client that disconnects loses its job;
Ctrl-C answers the waiting clients and exits; and test_app.py's jobs API tests over HTTP. One server for the module (its last test stops it); each test runs
against the plain server and, marked `ray`, against `fastldm serve --ray` with 2 model worker replicas."""
from __future__ import annotations

import base64
import functools
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image

from . import test_app
from fastldm.testing import ServerProcess

from .conftest import SRC, wait_until

KEY = "test-key"
ORIGIN = "http://page.example"
PROMPT = "a red cube left of a blue sphere"
SEED, STEPS = 11, 6
LONG = 1000   # steps of a job that must still be running when the test acts on it (the server allows 1000): a
              # 150-step 64x64 job lasts ~2 s, which Ray's hops on a loaded 2-core CI box can use up


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """`fastldm generate` for PROMPT, started at once; `image()` waits for it. The server starts after it has ended,
    so both read one tuning measurement from the shared cache: measured at once by two processes on a loaded
    machine, the runtime choices (and so the PNG's Version line) could differ."""
    out = tmp_path_factory.mktemp("generate")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "fastldm.cli", "generate", PROMPT, "--seed", str(SEED),
                             "--steps", str(STEPS), "--size", "64x64", "--sampler", "DPM++ 2M", "--threads", "1",
                             "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    @functools.cache
    def image() -> Image.Image:
        output = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, output
        return Image.open(out / f"00000-{SEED}.png")
    return image


# The same tests against `fastldm serve` and `fastldm serve --ray` (a local Ray instance of 2 CPUs: the HTTP
# ingress and 2 model worker replicas of 1 CPU; marked `ray`, so they run with `pytest -m ray`).
RAY = ("--ray", "--replicas", "2", "--cpus-per-replica", "1")


@pytest.fixture(scope="module", params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def server(request, tmp_path_factory, reference):
    if request.param == "ray":
        pytest.importorskip("ray")
    reference()  # the generate run has measured and cached the tuning the server's workers then read
    models = tmp_path_factory.mktemp("models")
    from fastldm.api import EMBEDDED_MODEL

    (models / "shapes-copy").symlink_to(EMBEDDED_MODEL, target_is_directory=True)
    proc = ServerProcess("--threads", "1", "--api-key", KEY, "--cors-origin", ORIGIN, "--max-batch", "2",
                         "--max-steps", str(LONG), "--models-dir", str(models),
                         *(RAY if request.param == "ray" else ()),
                         log=tmp_path_factory.mktemp("server") / "server.log")
    proc.kind = request.param
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def a1111(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="me", password=KEY, sampler="DPM++ 2M")


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


def same_image(a: Image.Image, b: Image.Image) -> bool:
    """Within one 8-bit level (the runtime's bound for a request batched or alone, tests/test_run.py)."""
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b.convert("RGB"), dtype=np.int16)).max() <= 1


def test_webuiapi_txt2img_matches_fastldm_generate(a1111, reference):
    result = a1111.txt2img(prompt=PROMPT, seed=SEED, steps=STEPS, width=64, height=64, cfg_scale=5,
                           scheduler="automatic")
    image, info = result.image, result.info
    assert image.size == (64, 64) and info["all_seeds"] == [SEED] and info["steps"] == STEPS
    assert info["sampler_name"] == "DPM++ 2M" and info["sd_model_name"] == "shapes-rgbd"
    text = image.info["parameters"]
    assert text == info["infotexts"][0] and f"Seed: {SEED}" in text and "Steps: 6" in text
    expected = reference()
    assert same_image(image.convert("RGB"), expected)
    drop = lambda t: [line for line in t.split(", ") if not line.startswith("Schedule type")]
    assert drop(text) == drop(expected.text["parameters"])


def test_webuiapi_img2img_samplers_and_models(a1111, reference):
    source = reference()
    result = a1111.img2img(images=[source], prompt="a green cube", seed=3, steps=8, denoising_strength=0.5,
                           width=64, height=64, cfg_scale=5)
    assert result.image.size == (64, 64) and result.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in result.image.info["parameters"]
    assert "DPM++ 2M" in a1111.util_get_sampler_names() and "karras" in a1111.util_get_scheduler_names()
    assert a1111.util_get_model_names() == ["shapes-copy", "shapes-rgbd"]
    a1111.util_set_model("shapes-copy")
    assert a1111.util_get_current_model() == "shapes-copy"
    assert a1111.txt2img(prompt="a cube", steps=2, width=64, height=64).info["sd_model_name"] == "shapes-copy"
    a1111.util_set_model("shapes-rgbd")
    refused = a1111.session.post(f"{a1111.baseurl}/options", json={"sd_model_checkpoint": "../../etc/passwd"})
    assert refused.status_code == 404 and "no model called" in refused.json()["detail"]


def test_webuiapi_progress_while_a_job_runs(a1111):
    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("r", a1111.txt2img(
        prompt=PROMPT, seed=1, steps=LONG, width=64, height=64)))
    worker.start()
    progress = wait_until(lambda: (p := a1111.get_progress())["current_image"] and p["progress"] > 0 and p)
    assert progress["state"]["job_count"] == 1 and 0 < progress["state"]["sampling_step"] < LONG
    assert progress["eta_relative"] > 0 and progress["state"]["sampling_steps"] == LONG
    assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (64, 64)
    a1111.interrupt()                    # A1111: end the running job with what it has
    worker.join(120)
    assert done["r"].image.size == (64, 64) and done["r"].info["steps"] < LONG
    a1111.util_wait_for_ready(check_interval=0.1)


def test_openai_generate_and_edit(oai, reference):
    r = oai.images.generate(prompt=PROMPT, size="64x64", n=2,
                            extra_body={"steps": STEPS, "seed": SEED, "sampler": "DPM++ 2M", "guidance": 5})
    assert r.size == "64x64" and r.output_format == "png" and len(r.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in r.data]
    assert f"Seed: {SEED + 1}" in images[1].text["parameters"]
    assert same_image(images[0].convert("RGB"), reference())      # image 0 of n=2 is the seed's image alone
    jpeg = oai.images.generate(prompt=PROMPT, size="64x64", output_format="jpeg", extra_body={"steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(jpeg.data[0].b64_json))).format == "JPEG"

    buf = io.BytesIO()
    images[0].save(buf, format="PNG")
    edit = oai.images.edit(image=("cube.png", buf.getvalue(), "image/png"), prompt="a green cube",
                           extra_body={"steps": 8, "seed": 2, "strength": 0.5, "negative_prompt": "blue"})
    out = Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json)))
    assert out.size == (64, 64) and "Denoising strength: 0.5" in out.text["parameters"]
    assert [m.id for m in oai.models.list()] == ["shapes-rgbd", "shapes-copy"]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.images.generate(prompt=PROMPT, size="63x64")
    assert e.value.body["param"] == "size" and "multiple of 8" in e.value.body["message"]


def test_api_key_is_required(server, a1111):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    anonymous = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    with pytest.raises(RuntimeError, match="401"):
        anonymous.txt2img(prompt="x", steps=1, width=64, height=64)
    assert httpx.get(f"{server.url}/healthz").status_code == 200          # no key needed


def test_cors_preflight(server):
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{server.url}/v1/images/generations", headers={"Origin": ORIGIN, **ask})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert httpx.options(f"{server.url}/v1/images/generations",
                         headers={"Origin": "http://other.example", **ask}).status_code == 400


def test_cancel_cancels_that_job_only(http):
    slow = http.post("/fastldm/v1/jobs", json={"prompt": PROMPT, "steps": LONG, "width": 64, "height": 64}).json()
    quick = http.post("/fastldm/v1/jobs", json={"prompt": PROMPT, "steps": 8, "width": 64, "height": 64}).json()
    assert http.post(f"{slow['url']}/cancel").json()["status"] == "cancelled"
    assert wait_until(lambda: (v := http.get(quick["url"]).json())["status"] == "done" and v)["result"]
    assert http.get(slow["url"]).json()["error"]["type"] == "Cancelled"


@pytest.mark.parametrize("jobs_test", [test_app.test_jobs_api_events_files_and_cancel,
                                       test_app.test_plan_check_answers_200_either_way,
                                       test_app.test_openai_url_responses_point_at_kept_files],
                         ids=lambda f: f.__name__.removeprefix("test_"))
def test_jobs_api_over_http(http, jobs_test):
    """test_app.py's jobs API tests (written for the in-process app) over HTTP, against this module's servers."""
    jobs_test(http)


def raw_request(server, path: str, body: dict) -> socket.socket:
    """Send a request on a raw socket and return it unread (closing it = the client going away)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def counter(http, name: str) -> float:
    lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_a_client_that_disconnects_loses_its_job(server, http):
    health = lambda: http.get("/healthz").json()
    before = counter(http, "fastldm_disconnects_total"), counter(http, 'fastldm_jobs_total{outcome="cancelled"}')
    workers = 2 if server.kind == "ray" else 1        # each gets one job that fills its --max-batch 2
    full = [http.post("/fastldm/v1/jobs", json={"prompt": PROMPT, "steps": LONG, "n": 2, "width": 64,
                                                "height": 64}).json() for _ in range(workers)]
    wait_until(lambda: health()["running"] == workers)
    queued = raw_request(server, "/v1/images/generations", {"prompt": PROMPT, "size": "64x64", "steps": 4})
    wait_until(lambda: health()["queued"] == 1)
    queued.close()                                                  # dropped from the queue
    wait_until(lambda: health()["queued"] == 0)
    for job in full:
        http.post(f"{job['url']}/cancel")
    wait_until(lambda: health()["running"] == 0)
    running = raw_request(server, "/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": LONG, "width": 64, "height": 64})
    wait_until(lambda: health()["running"] == 1)
    running.close()                                                 # leaves the batch at the next step
    wait_until(lambda: health()["running"] == 0, timeout=30)
    after = counter(http, "fastldm_disconnects_total"), counter(http, 'fastldm_jobs_total{outcome="cancelled"}')
    assert after[0] - before[0] == 2 and after[1] - before[1] == 2 + workers   # the two clients' and the full


def test_zz_ctrl_c_answers_waiting_clients_and_exits(server, a1111):
    """Last: stops the module's server."""
    errors = []
    waiting = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, a1111.txt2img, prompt=PROMPT,
                                                                          steps=LONG, width=64, height=64)))
    waiting.start()
    wait_until(lambda: httpx.get(f"{server.url}/healthz").json()["running"] == 1)
    started = time.monotonic()
    assert server.stop() == 0
    waiting.join(30)
    assert "503" in str(errors[0].value) and "shutting down" in str(errors[0].value)
    assert time.monotonic() - started < 60
    assert "fastldm serving shapes-rgbd at http://127.0.0.1:" in server.output()
