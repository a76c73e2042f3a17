"""`fastldm bench memory` on a tiny diffusers folder: each stage's numbers are there and hang together.
Nothing here compares the engines (the benchmark's job). Stages run in this process, but for one CLI run."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fastldm.bench import memory as M
from fastldm.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    from conftest import tiny_diffusers_pipeline

    path = tmp_path_factory.mktemp("tiny") / "sd1"
    tiny_diffusers_pipeline("sd1").save_pretrained(path)
    return path


def test_status_reads_this_process():
    s = M.status()
    assert s["VmHWM"] >= s["VmRSS"] >= s["RssAnon"] > 0 and s["RssFile"] > 0


def test_a_stage_in_this_process_traces_its_tensors(folder):
    r = M.child("fastldm", "decode", str(folder), 64, 64, None, 1)
    assert r["na"] is None and r["weight_mb"] > 0 and r["seconds"] > 0
    assert 0 < r["bound_mb"] <= r["tensor_mb"]           # the lower bound never exceeds the traced peak
    assert r["peak_rss_mb"] >= r["added_mb"]              # the stage starts above the post-import baseline


@pytest.mark.parametrize("engine, stage", [("diffusers", "text"), ("diffusers-lowmem", "decode")])
def test_diffusers_stages(folder, engine, stage):
    r = M.child(engine, stage, str(folder), 64, 64, None, 1)
    assert r["na"] is None and r["weight_mb"] > 0 and 0 < r["bound_mb"] <= r["tensor_mb"]


def test_cli_runs_a_stage_in_a_fresh_process(folder, tmp_path):
    out = tmp_path / "m.json"
    res = CliRunner().invoke(main, ["bench", "memory", "-m", str(folder), "--size", "64x64", "--engine", "fastldm",
                                    "--stage", "load", "--json", str(out)])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(out.read_text())["rows"]
    assert row["engine"] == "fastldm" and row["stage"] == "load" and row["na"] is None
    assert row["peak_rss_mb"] > 0 and row["weight_mb"] > 0 and row["tensor_mb"] is None  # no trace of a load
    assert "| load | fastldm (defaults) |" in res.output and "RssFile" in res.output


def test_engine_settings():
    assert M.engine_settings("fastldm") == {} and M.engine_settings("diffusers-lowmem") == {}
    assert M.engine_settings("fastldm:budget=2.1GB,quant=int8") == {"budget": "2.1GB", "quant": "int8"}
    assert M.label("fastldm:memory=low") == "fastldm --memory low"
    for bad in ("diffusers:budget=1G", "fastldm:size=3", "nope"):
        with pytest.raises(ValueError):
            M.engine_settings(bad)


def test_generate_stage_with_a_budget_reports_its_prediction(folder):
    r = M.child("fastldm:budget=2GB", "generate", str(folder), 64, 64, None, 1)
    assert r["na"] is None and r["peak_rss_mb"] > 0 and r["predicted_mb"] > 0 and r["seconds"] > 0


def test_cli_budget_adds_a_generate_row(folder, tmp_path):
    out = tmp_path / "g.json"
    res = CliRunner().invoke(main, ["bench", "memory", "-m", str(folder), "--size", "64x64", "--engine", "fastldm",
                                    "--memory-budget", "2GB", "--stage", "generate", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["engine"] for r in rows] == ["fastldm", "fastldm:budget=2GB"]
    assert all(r["stage"] == "generate" and r["na"] is None for r in rows)
    assert "| generate | fastldm --memory-budget 2GB |" in res.output and "predicted" in res.output
