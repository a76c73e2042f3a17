"""`fastldm batch --ray` on a local Ray instance (2 actors of 1 CPU, the embedded model): the same
manifest, names and resume semantics as the local engine, images equal to its (within one 8-bit level).
Marked `ray` (a Ray start and two model loads take about a minute): `pytest -m ray`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fastldm.cli import main
from fastldm.tools.batch import MANIFEST, read_manifest

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def no_ray_left():
    yield
    assert not ray.is_initialized(), "the engine must shut down the Ray instance it started"
    ray.shutdown()


def test_ray_resumes_a_local_run_with_the_same_manifest(tmp_path):
    lines = [{"prompt": f"a {c} {s}"} for c in ("red", "blue", "green") for s in ("cube", "sphere")]
    lines.insert(3, {"prompt": "a cube", "width": 65})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    out, args = tmp_path / "out", ["--steps", "3", "--size", "32x32", "--batch", "2"]
    res = CliRunner().invoke(main, ["batch", str(prompts), "--out", str(out), *args])
    assert res.exit_code == 1 and "6 done, 1 failed" in res.output
    local = read_manifest(out / MANIFEST)
    images = {p.name: np.asarray(Image.open(p), dtype=np.float64) for p in out.glob("*.png")}
    # Forget lines 1, 2 and 7 (entries and files): the Ray run must do exactly them and the failed line 4.
    kept = [ln for ln in (out / MANIFEST).read_text().splitlines() if json.loads(ln)["line"] not in (1, 2, 7)]
    (out / MANIFEST).write_text("".join(ln + "\n" for ln in kept))
    for line in (1, 2, 7):
        for name in local[line]["files"]:
            (out / name).unlink()
    res = CliRunner().invoke(main, ["batch", str(prompts), "--out", str(out), "--ray", "--workers", "2", *args])
    assert res.exit_code == 1 and "3 done, 1 failed, 3 already done" in res.output, res.output
    remote = read_manifest(out / MANIFEST)
    for line in (1, 2, 4, 7):
        assert {k: v for k, v in remote[line].items() if k not in ("seconds", "worker")} == \
            {k: v for k, v in local[line].items() if k not in ("seconds", "worker")}
    assert all(":" in remote[line]["worker"] for line in (1, 2, 7))                # host:pid of the actor
    for name, ref in images.items():
        assert np.abs(np.asarray(Image.open(out / name), dtype=np.float64) - ref).max() \
            <= (65535 if "depth" in name else 255) / 255
