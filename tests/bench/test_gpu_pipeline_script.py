"""benchmarks/gpu_pipeline.py runs end to end: on the CPU with a tiny model, as its smoke mode says."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_pipeline.py"


def test_gpu_pipeline_script_smoke_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--family", "tiny:sd1", "--size", "64",
                          "--short", "1", "--long", "3", "--rounds", "2", "--engine", "fastldm", "--engine",
                          "diffusers", "--json", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["engines"]) == {"fastldm", "diffusers"}
    for rec in result["engines"].values():
        assert len(rec["short_s"]) == len(rec["long_s"]) == 2 and math.isfinite(rec["per_step_ms"])
    assert "| fastldm |" in run.stdout and "÷ fastldm" in run.stdout
