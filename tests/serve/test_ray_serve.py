"""The Ray Serve application (serve/ray_app.py) on a local Ray instance in this process (2 CPUs, a 300 MB object
store; the HTTP ingress and 2 model worker replicas of the embedded model): a replica killed with `ray.kill`
mid-request fails its request with a 503 and a JSON reason instead of hanging, Serve replaces it, and requests
succeed on the replacement; controls reach the replica that owns the job. Marked `ray` (pytest -m ray). The
client tests (test_clients.py) run against `fastldm serve --ray` too."""
from __future__ import annotations

import os
import threading

import httpx
import pytest

from fastldm.serve import Settings

from fastldm.testing import free_port

from .conftest import SRC, wait_until

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytestmark = pytest.mark.ray

SLOW = {"prompt": "a red cube", "steps": 150, "width": 64, "height": 64}
QUICK = {"prompt": "a blue sphere", "steps": 4, "width": 64, "height": 64}
WORKER = "SERVE_REPLICA::fastldm#ModelWorker#"


@pytest.fixture(scope="module")
def http():
    from fastldm.serve.ray_app import application

    ray.init(num_cpus=2, object_store_memory=300 << 20, include_dashboard=False, logging_level="warning",
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(SRC),
                                                                                  os.environ.get("PYTHONPATH")]))}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(Settings(max_batch=2), replicas=2), name="fastldm", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def workers() -> set[str]:
    """The unique ids of the live ModelWorker replicas (from their actors' names)."""
    return {a["name"].removeprefix(WORKER) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(WORKER)}


def owner(job: dict) -> str:
    return job["id"].split(".")[0]


def test_skip_reaches_the_replica_that_owns_the_job(http):
    """stop_early is routed by the job id's owner: with two replicas, a wrong route would miss half the time."""
    for _ in range(4):
        url = http.post("/fastldm/v1/jobs", json=SLOW).json()["url"]
        wait_until(lambda u=url: http.get(u).json()["progress"]["step"] > 0)
        http.post("/sdapi/v1/skip")
        view = wait_until(lambda u=url: (v := http.get(u).json())["status"] == "done" and v)
        assert view["result"]["steps"] < 150


def test_a_killed_replica_fails_its_request_with_503_and_is_replaced(http):
    before = workers()
    assert len(before) == 2
    answer = {}
    waiting = threading.Thread(target=lambda: answer.setdefault("r", http.post("/sdapi/v1/txt2img", json=SLOW)))
    waiting.start()
    job_id = wait_until(lambda: http.get("/sdapi/v1/progress").json()["state"]["job"])
    killed = job_id.split(".")[0]
    ray.kill(ray.get_actor(WORKER + killed, namespace="serve"), no_restart=True)
    waiting.join(60)
    r = answer["r"]
    assert r.status_code == 503 and r.json()["error"] == "WorkerLost"
    assert "replica died" in r.json()["detail"] and "send the request again" in r.json()["detail"]

    assert http.post("/sdapi/v1/txt2img", json=QUICK).status_code == 200     # the survivor serves at once
    now = wait_until(lambda: len(w := workers()) == 2 and killed not in w and w, timeout=120)
    replacement = (now - before).pop()
    wait_until(lambda: serve.status().applications["fastldm"].deployments["ModelWorker"].status == "HEALTHY")
    seen = set()
    for _ in range(8):   # two overlapping jobs go to the two replicas (the less busy one takes the second)
        if replacement in seen:
            break
        jobs = [http.post("/fastldm/v1/jobs", json=QUICK | {"steps": s}).json() for s in (30, 4)]
        for job in jobs:
            view = wait_until(lambda url=job["url"]: (v := http.get(url).json())["status"] in ("done", "failed") and v)
            assert view["status"] == "done"
            seen.add(owner(job))
    assert replacement in seen and killed not in seen
