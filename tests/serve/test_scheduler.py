"""The scheduler (serve/scheduler.py) without HTTP: step-level batching gives each request its own image,
requests join between steps and leave when done, max_batch bounds what runs together, the queue is bounded,
interrupt / skip / cancel / shutdown end the right jobs, and models live in an LRU within a memory budget."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import fastldm
from fastldm.api import EMBEDDED_MODEL
from fastldm.errors import Cancelled, QueueFull, RequestError, ShuttingDown, UnknownModel
from fastldm.request import GenerationRequest
from fastldm.serve.catalog import ModelCatalog
from fastldm.serve.metrics import Metrics
from fastldm.serve.scheduler import Scheduler, weights_bytes
from fastldm.serve.settings import Settings

from .conftest import wait_until

pytestmark = pytest.mark.usefixtures("one_thread")
BOUND = 1   # 8-bit levels: the runtime's bound for batched vs alone (tests/test_run.py), in PNG terms


@pytest.fixture
def scheduler(embedded_pipe):
    made = []

    def make(**settings) -> Scheduler:
        s = Settings(**settings)
        sched = Scheduler(s, ModelCatalog(s.model, s.models_dir), Metrics(),
                          lambda path, **kw: embedded_pipe if path == EMBEDDED_MODEL else fastldm.load(path, **kw))
        made.append(sched)
        return sched

    yield make
    for sched in made:
        sched.close()


def ended(job, timeout=120.0):
    wait_until(lambda: job.ended, timeout)
    return job


def pixels(result, i=0):
    return np.asarray(result.images[i], dtype=np.int16)


def test_concurrent_requests_batch_and_match_alone(scheduler, embedded_pipe):
    sched = scheduler(max_batch=8)
    requests = [GenerationRequest("a red cube on the left", steps=6, seed=1, width=64, height=64),
                GenerationRequest("a small blue sphere", steps=9, seed=7, n=2, width=64, height=64),
                GenerationRequest("a green cylinder", steps=4, seed=3, sampler="Euler a", width=64, height=64)]
    jobs = [sched.submit(None, r) for r in requests]
    for job, request in zip(jobs, requests):
        alone = embedded_pipe.generate(request)
        result = ended(job).result
        assert job.status == "done" and result.seeds == alone.seeds and result.steps == alone.steps
        for i in range(request.n):
            assert np.abs(pixels(result, i) - pixels(alone, i)).max() <= BOUND
        assert job.infotexts[0].startswith(request.prompt) and "Model: shapes-rgbd" in job.infotexts[0]
    assert sched.metrics.batch_size.collect()[0].samples[-1].value > 9   # sum over steps of images in flight


def test_a_request_joins_between_steps_and_leaves_when_done(scheduler):
    sched = scheduler(max_batch=8)
    long = sched.submit(None, GenerationRequest("a red cube", steps=40, seed=1, width=64, height=64))
    wait_until(lambda: long.step >= 3)
    short = sched.submit(None, GenerationRequest("a blue sphere", steps=4, seed=2, width=64, height=64))
    ended(short)
    assert short.status == "done" and not long.ended       # joined the running batch, left after its 4 steps
    ended(long)
    assert long.status == "done" and long.result.steps == 40


def test_max_batch_one_runs_one_request_at_a_time(scheduler):
    sched = scheduler(max_batch=1)
    a = sched.submit(None, GenerationRequest("a red cube", steps=5, seed=1, width=64, height=64))
    b = sched.submit(None, GenerationRequest("a blue cube", steps=5, seed=2, width=64, height=64))
    ended(a), ended(b)
    assert b.started >= a.finished


def test_limits_are_checked_before_queueing(scheduler):
    sched = scheduler(max_steps=10, max_n=2, max_width=128, max_height=64, max_prompt_chars=20)
    for request, field in [(GenerationRequest("x", steps=11), "steps"), (GenerationRequest("x", n=3), "n"),
                           (GenerationRequest("x", width=136, height=64), "width"),
                           (GenerationRequest("x", width=128, height=128), "width"),   # 128x64 pixels at most
                           (GenerationRequest("y" * 21), "prompt")]:
        with pytest.raises(RequestError) as e:
            sched.submit(None, request)
        assert e.value.field == field
    assert sched.queued() == [] and sched.running() == []


def test_queue_is_bounded(scheduler):
    sched = scheduler(max_batch=1, max_queue=1)
    running = sched.submit(None, GenerationRequest("a red cube", steps=150, width=64, height=64))
    wait_until(lambda: running.status == "running")
    queued = sched.submit(None, GenerationRequest("a blue cube", steps=4, width=64, height=64))
    with pytest.raises(QueueFull) as e:
        sched.submit(None, GenerationRequest("a green cube", steps=4, width=64, height=64))
    assert 1 <= e.value.retry_after <= 300 and e.value.http_status == 429
    sched.cancel(queued)
    assert queued.status == "cancelled" and isinstance(queued.error, Cancelled)
    sched.cancel(running)
    ended(running)
    assert running.status == "cancelled" and running.result is None


def test_interrupt_and_skip_return_what_is_there(scheduler):
    sched = scheduler(max_batch=8)
    a = sched.submit(None, GenerationRequest("a red cube", steps=150, seed=1, width=64, height=64))
    wait_until(lambda: a.step >= 2)
    b = sched.submit(None, GenerationRequest("a blue cube", steps=150, seed=2, width=64, height=64))
    wait_until(lambda: b.step >= 2)
    assert sched.current() is a
    sched.skip()                                  # the oldest running job only
    ended(a)
    assert a.status == "done" and a.result.steps < 150 and not b.ended
    sched.interrupt()                             # every running job
    ended(b)
    assert b.status == "done" and b.result.steps < 150 and len(b.result.images) == 1


def test_preview_follows_the_running_job(scheduler):
    sched = scheduler()
    job = sched.submit(None, GenerationRequest("a red cube", steps=150, seed=1, width=64, height=64))
    wait_until(lambda: job.step >= 2)
    preview = job.preview()
    assert preview.size == (64, 64) and np.asarray(preview).std() > 0
    sched.cancel(job)


def test_eta_is_known_from_the_first_step(scheduler):
    """A progress poll between a fresh worker's first step and its timing (the step's callback runs inside it)
    still gets an estimate: the job's own time per step."""
    sched = scheduler()
    job = sched.submit(None, GenerationRequest("a red cube", steps=5, seed=1, width=64, height=64))
    etas = []
    job.subscribe(lambda ev: ev["event"] == "step" and etas.append((ev["step"], sched.eta(job))))
    ended(job)
    assert etas and all(eta is not None and (eta > 0 or step == 5) for step, eta in etas), etas


def test_cancel_while_the_worker_starts_the_job(scheduler, monkeypatch):
    """The moment the worker has taken a job from the queue and is starting it (encoding its prompt: the job is
    in neither the queue nor the batch), made long here, is no exception: cancel ends it."""
    sched = scheduler()
    worker = sched.worker(None)
    sched.release(worker)
    add = worker._run.add
    monkeypatch.setattr(worker._run, "add", lambda *a, **kw: (time.sleep(0.5), add(*a, **kw))[1])
    job = sched.submit(None, GenerationRequest("a red cube", steps=150, width=64, height=64))
    wait_until(lambda: not worker.queued)
    assert job.status == "queued" and not worker.running        # being started
    sched.cancel(job)
    assert job.status == "cancelled"
    wait_until(lambda: not worker.running and not worker._run.jobs, timeout=30)   # and it never runs
    assert job.status == "cancelled" and job.result is None


def test_close_cancels_queued_and_running_jobs(scheduler):
    sched = scheduler(max_batch=1)
    running = sched.submit(None, GenerationRequest("a red cube", steps=150, width=64, height=64))
    queued = sched.submit(None, GenerationRequest("a blue cube", steps=150, width=64, height=64))
    wait_until(lambda: running.status == "running")
    sched.close()
    assert running.status == queued.status == "cancelled"
    assert isinstance(running.error, ShuttingDown) and running.error.http_status == 503
    with pytest.raises(ShuttingDown):
        sched.submit(None, GenerationRequest("a red cube", steps=4))


def test_join_tells_whether_a_step_is_still_running(scheduler, monkeypatch):
    """After close, `join` waits for the worker threads; a step that outlasts it is reported (the server then
    exits without it rather than finalising under a running torch op)."""
    sched = scheduler()
    worker = sched.worker(None)
    sched.release(worker)
    step = worker._run.step
    monkeypatch.setattr(worker._run, "step", lambda: (time.sleep(1.0), step())[1])
    job = sched.submit(None, GenerationRequest("a red cube", steps=150, width=64, height=64))
    wait_until(lambda: job.status == "running")
    sched.close(wait_s=0.0)
    assert job.status == "cancelled" and not sched.join(0.0)    # inside its (slow) step
    assert sched.join(30.0) and not worker.alive                # the step ended, then the thread


def test_models_by_listed_name_in_an_lru_within_the_memory_budget(scheduler, embedded_pipe, tmp_path):
    (tmp_path / "copy").symlink_to(EMBEDDED_MODEL, target_is_directory=True)
    (tmp_path / "notes.txt").write_text("not a model")
    size = weights_bytes(embedded_pipe)
    sched = scheduler(models_dir=tmp_path, model_memory=int(1.5 * size))   # one model fits, not two
    assert [e.name for e in sched.catalog.entries()] == ["shapes-rgbd", "copy"]
    for name in ("../shapes-rgbd", "notes.txt", "notes", str(EMBEDDED_MODEL), "/etc/passwd", "copy/unet"):
        with pytest.raises(UnknownModel):
            sched.submit(name, GenerationRequest("x", steps=1))
    a = ended(sched.submit(None, GenerationRequest("a red cube", steps=3, seed=4, width=64, height=64)))
    b = ended(sched.submit("COPY", GenerationRequest("a red cube", steps=3, seed=4, width=64, height=64)))
    assert (a.model, b.model) == ("shapes-rgbd", "copy") and sched.loaded() == ["copy"]   # the idle one left
    assert np.array_equal(pixels(a.result), pixels(b.result))


def test_a_failing_step_fails_its_jobs_and_the_worker_goes_on(scheduler, monkeypatch):
    sched = scheduler()
    worker = sched.worker(None)
    sched.release(worker)
    monkeypatch.setattr(worker, "_step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    job = ended(sched.submit(None, GenerationRequest("a red cube", steps=3, width=64, height=64)))
    assert job.status == "failed" and str(job.error) == "boom"
    monkeypatch.undo()
    assert ended(sched.submit(None, GenerationRequest("a red cube", steps=3, width=64, height=64))).status == "done"


def test_weights_bytes_counts_a_shared_storage_once():
    """Tied weights (one tensor in two components) and views of one storage are resident once."""
    import types

    unet, text = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    text.weight = unet.weight                                  # tied: 64 bytes, once
    vae = torch.nn.Module()
    vae.register_buffer("shift", unet.bias.detach()[:2])       # a view of unet.bias's 16 bytes
    pipe = types.SimpleNamespace(unet=unet, vae=vae, text_encoder=text, text_encoder_2=None)
    assert weights_bytes(pipe) == 64 + 16 + 16
