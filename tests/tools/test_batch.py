"""Bulk generation (fastldm.tools.batch, `fastldm batch`): prompts files, the manifest, resume after a killed run
or a half-written line, bad lines and failed requests recorded while the rest go on, files readable by others."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fastldm.cli import main
from fastldm.errors import SettingError
from fastldm.tools.batch import MANIFEST, MAX_N, Batch, Outcome, read_manifest, read_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = {"model": "m", "dtype": None, "quant": None}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_prompts_files_fix_seeds_and_keep_bad_lines(tmp_path):
    txt = read_prompts(_write(tmp_path / "p.txt", ["a red cube", "", "  a blue sphere  "]), {"steps": 4}, seed=10)
    assert [(i.line, i.request["prompt"], i.request["seed"], i.request["steps"]) for i in txt] == [
        (1, "a red cube", 10, 4), (3, "a blue sphere", 10 + 2 * MAX_N, 4)]
    jsonl = read_prompts(_write(tmp_path / "p.jsonl", [{"prompt": "a", "seed": 7, "steps": 9}, "{not json",
                                                       {"prompt": "b", "colour": 1}, {"prompt": 3}, [1],
                                                       {"prompt": "c", "seed": -1}]), {"steps": 4})
    assert jsonl[0].request["seed"] == 7 and jsonl[0].request["steps"] == 9      # a line's fields win
    assert [i.line for i in jsonl if i.error] == [2, 3, 4, 5]
    assert "not JSON" in jsonl[1].error and "colour" in jsonl[2].error and "prompt=3" in jsonl[3].error
    assert jsonl[5].request["seed"] == 5 * MAX_N                                  # -1: the line's seed
    with pytest.raises(SettingError, match=r"\.txt"):
        read_prompts(_write(tmp_path / "p.csv", ["a"]))


def _fake(files_of):
    """An engine that 'renders' without a model: `files_of(line)` names the files of each line."""
    def engine(items):
        for item in items:
            names = files_of(item.line)
            yield Outcome(item.line, {n: f"{item.line}:{n}".encode() for n in names}, [item.request["seed"]], 4)
    return engine


def test_manifest_resume_and_half_written_lines(tmp_path):
    prompts, out = _write(tmp_path / "p.txt", ["a", "b", "c"]), tmp_path / "out"
    pair = lambda line: [f"{line:06d}-0.png", f"{line:06d}-0-depth.png"]  # noqa: E731
    with Batch(prompts, out, SETTINGS) as batch:
        assert len(batch.todo) == 3
        list(batch.run(_fake(pair)))
    assert batch.summary.done == 3 and batch.summary.images == 3
    # A kill between an image and its depth map, an orphan file of a line with no entry, a torn last line and a
    # temporary file: lines 1 and 3 are redone, line 2 is skipped.
    entries = read_manifest(out / MANIFEST)
    (out / "000001-0-depth.png").unlink()
    kept = [ln for ln in (out / MANIFEST).read_text().splitlines() if json.loads(ln)["line"] != 3]
    (out / MANIFEST).write_text("\n".join(kept) + '\n{"line": 3, "sta')
    (out / ".000003-0.png.0123456789ab.tmp").write_bytes(b"partial")
    with Batch(prompts, out, SETTINGS) as batch:
        assert [i.line for i in batch.todo] == [1, 3]
        assert batch.summary.skipped == 1 and not (out / ".000003-0.png.0123456789ab.tmp").exists()
        list(batch.run(_fake(pair)))
    lines = (out / MANIFEST).read_text().splitlines()
    assert all(json.loads(ln) for ln in lines)                          # the torn line was cut, not continued
    assert read_manifest(out / MANIFEST)[2] == entries[2]
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, *pair(1), *pair(2), *pair(3)])
    # A changed request is redone; the files its previous entry made and this one does not are removed.
    with Batch(prompts, out, SETTINGS, {"steps": 9}) as batch:
        assert len(batch.todo) == 3
        list(batch.run(_fake(lambda line: [f"{line:06d}-0.png"])))
    assert sorted(p.name for p in out.iterdir()) == ["000001-0.png", "000002-0.png", "000003-0.png", MANIFEST]
    with Batch(prompts, out, SETTINGS | {"dtype": "bf16"}) as batch:  # other settings: not done either
        assert len(batch.todo) == 3


def test_one_writer_per_folder(tmp_path):
    prompts, out = _write(tmp_path / "p.txt", ["a"]), tmp_path / "out"
    with Batch(prompts, out, SETTINGS):
        with pytest.raises(BlockingIOError, match="in use"):
            Batch(prompts, out, SETTINGS).__enter__()
        res = CliRunner().invoke(main, ["batch", str(prompts), "--out", str(out)])
        assert res.exit_code == 8 and "in use by another fastldm batch" in res.output


def test_cli_batch_records_failures_and_resumes(tmp_path, umask_022):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "a red cube", "n": 2, "seed": 3}, "not json",
                                            {"prompt": "a blue sphere", "width": 65},
                                            {"prompt": "a green cylinder", "sampler": "Euler a", "steps": 3}])
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--out", str(out), "--steps", "2", "--size", "32x32", "--batch", "4"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "2 done, 2 failed" in res.output and "2 of 4 requests failed" in res.output
    entries = read_manifest(out / MANIFEST)
    assert {k: e["status"] for k, e in entries.items()} == {1: "done", 2: "failed", 3: "failed", 4: "done"}
    assert "not JSON" in entries[2]["error"] and "width=65" in entries[3]["error"]
    assert entries[1]["seeds"] == [3, 4] and entries[4]["seeds"] == [3 * MAX_N] and entries[4]["steps"] == 3
    assert entries[1]["files"] == ["000001-0.png", "000001-0-depth.png", "000001-1.png", "000001-1-depth.png"]
    files = sorted(out.iterdir())
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in files)                 # the manifest too
    with Image.open(out / "000004-0.png") as im:
        assert im.size == (32, 32) and "Seed: 192" in im.text["parameters"] and "Euler a" in im.text["parameters"]
    mtimes = {f.name: f.stat().st_mtime_ns for f in files if f.suffix == ".png"}
    res = CliRunner().invoke(main, args)                 # done lines are skipped; failed ones are tried again
    assert res.exit_code == 1 and "0 done, 2 failed, 2 already done" in res.output
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir() if f.suffix == ".png"} == mtimes


def _images(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.float64) for p in sorted(out.glob("*.png"))}


def test_resume_after_a_killed_run(tmp_path):
    """SIGKILL a running batch once some lines are done; the rerun does only the rest, and every image equals an
    uninterrupted run's (within one 8-bit level: batch composition changes the UNet's rounding)."""
    prompts = _write(tmp_path / "p.txt", [f"a {c} {s} on the {w}" for c in ("red", "blue", "green")
                                          for s in ("cube", "sphere") for w in ("left", "right")])
    args = ["--steps", "4", "--size", "32x32", "--batch", "2", "--seed", "5"]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fastldm.cli", "batch", str(prompts), "--out", str(out), "--threads", "1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if sum(e["status"] == "done" for e in read_manifest(out / MANIFEST).values()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {k for k, e in read_manifest(out / MANIFEST).items() if e["status"] == "done"}
    assert 3 <= len(done_before) < 12, "the run ended before it could be killed mid-way"
    res = CliRunner().invoke(main, ["batch", str(prompts), "--out", str(out), *args])
    assert res.exit_code == 0 and f"{12 - len(done_before)} done, 0 failed, {len(done_before)} already done" \
        in res.output
    res = CliRunner().invoke(main, ["batch", str(prompts), "--out", str(tmp_path / "whole"), *args])
    assert res.exit_code == 0
    resumed, whole = _images(out), _images(tmp_path / "whole")
    assert list(resumed) == list(whole) and len(whole) == 24
    assert max(np.abs(resumed[k] - whole[k]).max() / (65535 if "depth" in k else 255) for k in whole) <= 1 / 255


def test_ray_without_ray_installed_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)          # `import ray` raises ImportError
    res = CliRunner().invoke(main, ["batch", str(_write(tmp_path / "p.txt", ["a"])), "--ray"])
    assert res.exit_code == 5
    assert res.output.strip().splitlines() == ['Error: Ray is not installed: pip install "fastldm[ray]"']


def test_ray_with_a_bad_model_path_fails_before_starting_ray(tmp_path):
    ray = pytest.importorskip("ray")
    res = CliRunner().invoke(main, ["batch", str(_write(tmp_path / "p.txt", ["a"])), "--ray", "--model",
                                    str(tmp_path / "missing")])
    assert res.exit_code == 3 and "no such file or folder" in res.output and not ray.is_initialized()
