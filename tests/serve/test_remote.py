"""The app on a RemoteScheduler whose ModelWorker is reached through pickle (in_process.py), without Ray: the
same answers as the app on its own Scheduler, errors that keep their status and fields across the boundary,
previews, cancel and interrupt over the protocol, and a lost worker answered 503 in each API's error shape. And
`fastldm serve --ray`'s flags, and its one line when Ray is not installed."""
from __future__ import annotations

import base64
import io
import json
import pickle
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

import fastldm
from fastldm.api import EMBEDDED_MODEL
from fastldm.cli import main
from fastldm.errors import (BackendUnavailable, MemoryBudgetError, QueueFull, RequestError, SettingError,
                            ShuttingDown, UnknownJob, UnknownModel, WorkerLost)
from fastldm.request import GenerationRequest
from fastldm.serve import Settings, create_app
from fastldm.serve.model_worker import ModelWorker
from fastldm.serve.ray_server import parse_autoscale
from fastldm.serve.remote_scheduler import RemoteScheduler

from .conftest import wait_until
from .in_process import InProcessClient

SMALL = {"width": 64, "height": 64}


@pytest.mark.parametrize("error", [
    RequestError("steps", 0, "a whole number from 1 to 150"), QueueFull(3, 7), UnknownModel("x", ["a", "b"]),
    MemoryBudgetError("too big", 10, 5), UnknownJob("j1"), WorkerLost("gone"), ShuttingDown("bye")])
def test_errors_pickle_with_their_fields(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and copy.__dict__ == error.__dict__
    assert copy.http_status == error.http_status


def test_plans_pickle(embedded_pipe):
    for sampler in ("DDIM", "DPM++ 2M Karras"):
        plan = embedded_pipe.plan(GenerationRequest(prompt="a cube", sampler=sampler, steps=4, **SMALL))
        copy = pickle.loads(pickle.dumps(plan))
        assert copy.sampler == plan.sampler and dict(copy.sampler.options) == dict(plan.sampler.options)
        assert (copy.seeds, copy.steps, copy.width) == (plan.seeds, plan.steps, plan.width)


@pytest.fixture
def remote(embedded_pipe, one_thread):
    """remote(**settings) -> (TestClient of an app on a RemoteScheduler, its InProcessClient)."""
    made = []

    def load(path, **kw):
        return embedded_pipe if Path(path) == EMBEDDED_MODEL else fastldm.load(path, **kw)

    def make(**settings):
        s = Settings(**settings)
        client = InProcessClient(ModelWorker(s, "w1", load=load))
        http = TestClient(create_app(s, scheduler=RemoteScheduler(s, client)), raise_server_exceptions=False)
        http.__enter__()
        made.append((http, client))
        return http, client

    yield make
    for http, client in made:
        http.__exit__(None, None, None)
        client.close()


def test_same_answers_as_the_local_app(remote, make_client):
    body = {"prompt": "a red cube", "seed": 5, "steps": 4, "cfg_scale": 5, **SMALL}
    answers = [c.post("/sdapi/v1/txt2img", json=body).json() for c in (remote()[0], make_client())]
    infos = [json.loads(a["info"]) for a in answers]
    for info in infos:  # when each job was made, to the second: the two runs may straddle a second
        del info["job_timestamp"]
    assert answers[0]["images"] == answers[1]["images"] and infos[0] == infos[1]
    http, _ = remote()
    assert http.get("/sdapi/v1/sd-models").json()[0]["hash"] == json.loads(answers[1]["info"])["sd_model_hash"]
    bad = http.post("/v1/images/generations", json={"prompt": "x", "size": "63x64"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "size"
    unknown = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}})
    assert unknown.status_code == 404 and "no model called 'nope'" in unknown.json()["detail"]
    plan = http.post("/fastldm/v1/plan", json={"prompt": "x", "steps": 7, **SMALL}).json()
    assert plan["ok"] and plan["plan"]["steps"] == 7


def test_events_previews_files_cancel_and_interrupt(remote):
    http, client = remote(max_batch=4)
    created = http.post("/fastldm/v1/jobs", json={"prompt": "a red cube", "seed": 3, "steps": 3, **SMALL}).json()
    with http.stream("GET", created["events"]) as stream:
        lines = [line for line in stream.iter_lines() if line]
    kinds = [line.split(": ", 1)[1] for line in lines if line.startswith("event:")]
    steps = [json.loads(line[6:]) for line, kind in zip(lines[1::2], kinds) if kind == "step"]
    assert kinds[-1] == "done" and steps[-1]["preview"].startswith("data:image/png;base64,")
    image = http.get(created["url"]).json()["result"]["images"][0]
    assert Image.open(io.BytesIO(http.get(image["png"]).content)).text["parameters"] == image["parameters"]

    slow = {"prompt": "a cube", "steps": 150, **SMALL}
    cancelled, interrupted = (http.post("/fastldm/v1/jobs", json=slow).json() for _ in range(2))
    wait_until(lambda: http.get("/healthz").json()["running"] == 2)
    assert http.post(f"{cancelled['url']}/cancel").json()["status"] == "cancelled"
    wait_until(lambda: len(client.worker.scheduler.running()) == 1)      # the worker dropped it
    wait_until(lambda: http.get("/sdapi/v1/progress").json()["state"]["sampling_step"] > 0)
    http.post("/sdapi/v1/interrupt")
    view = wait_until(lambda: (v := http.get(interrupted["url"]).json())["status"] == "done" and v)
    assert view["result"]["steps"] < 150 and http.get("/healthz").json() | {"version": ""} == {
        "status": "ok", "version": "", "models_loaded": ["shapes-rgbd"], "queued": 0, "running": 0}


def test_a_lost_worker_fails_its_jobs_with_503(remote):
    http, client = remote()
    answers = {}
    for path, body in (("/sdapi/v1/txt2img", {"prompt": "x", "steps": 150, **SMALL}),
                       ("/v1/images/generations", {"prompt": "x", "steps": 150, "size": "64x64"})):
        threading.Thread(target=lambda p=path, b=body: answers.setdefault(p, http.post(p, json=b))).start()
    job = http.post("/fastldm/v1/jobs", json={"prompt": "x", "steps": 150, **SMALL}).json()
    wait_until(lambda: http.get("/healthz").json()["running"] == 3)
    client.cut()
    wait_until(lambda: len(answers) == 2)
    a1111, oai = answers["/sdapi/v1/txt2img"], answers["/v1/images/generations"]
    assert a1111.status_code == 503 and a1111.json()["error"] == "WorkerLost" and "stopped" in a1111.json()["detail"]
    assert oai.status_code == 503 and oai.json()["error"]["type"] == "service_unavailable"
    assert http.get(job["url"]).json()["error"]["type"] == "WorkerLost"
    assert base64.b64decode(http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, **SMALL}
                                      ).json()["images"][0])[:4] == b"\x89PNG"   # the transport still serves


def test_serve_ray_flags_and_without_ray_one_line_to_install_it(monkeypatch):
    run = lambda *args: CliRunner().invoke(main, ["serve", *args])
    assert "--replicas needs --ray" in run("--replicas", "2").output
    assert "exclude each other" in run("--ray", "--replicas", "2", "--autoscale", "1:2").output
    monkeypatch.setitem(sys.modules, "ray", None)          # `import ray` raises ImportError
    res = run("--ray", "--replicas", "2")
    assert res.exit_code == BackendUnavailable.exit_code
    assert res.output.strip().splitlines() == ['Error: Ray is not installed: pip install "fastldm[ray]"']
    assert parse_autoscale("1:4") == (1, 4)
    for bad in ("4", "2:1", "a:b", "0:0"):
        with pytest.raises(SettingError):
            parse_autoscale(bad)
