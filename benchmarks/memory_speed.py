"""Seconds per denoising step of each memory plan, beside today's default: the speed cost of the planner's levers.

    python benchmarks/memory_speed.py -m /work/models/sd15-fp16 --size 512 --steps 6 [--json out.json]

Each configuration runs in a fresh process (alternating, `--rounds` times): load, one warm-up generation of one
step, then one generation of `--steps` guided steps whose per-step times come from the step callback; the
first step is dropped (it carries the prompt encoding and, for a staged UNet, its load). Reported: the median
step and its ratio to the default's. Run it on a quiet machine: the ratios are the result ("balanced" must be
within 5 % of the default; the budget and "low" rows state what 16-bit weights and sequential CFG cost).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONFIGS = {"default": {}, "balanced": {"memory": "balanced"}, "budget-2.1GB": {"memory_budget": "2.1GB"},
           "low": {"memory": "low"}}


def child(model: str, size: int, steps: int, load: dict) -> list[float]:
    import fastldm
    from fastldm.request import GenerationRequest
    from fastldm.runtime.device import configure_process

    # As the CLI does: the tuned allocator unless a budget or "low" wants freed pages returned.
    configure_process(allocator=load.get("memory") in (None, "fast", "balanced") and "memory_budget" not in load)
    pipe = fastldm.load(model, **load)
    req = GenerationRequest("an astronaut riding a horse", steps=steps, seed=0, width=size, height=size)
    pipe.generate(GenerationRequest("warm-up", steps=1, seed=0, width=size, height=size))
    times, last = [], [time.perf_counter()]

    def step(info):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
    pipe.generate(req, callback=step)
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--json")
    a = ap.parse_args()
    steps: dict[str, list[float]] = {c: [] for c in a.config}
    for _ in range(a.rounds):
        for c in a.config:
            p = subprocess.run([sys.executable, __file__, "--child", a.model, str(a.size), str(a.steps),
                                json.dumps(CONFIGS[c])], capture_output=True, text=True, check=True)
            steps[c] += json.loads(p.stdout.strip().splitlines()[-1])
    base = statistics.median(steps[a.config[0]])
    rows = [{"config": c, "median_step_s": statistics.median(v), "x_first": statistics.median(v) / base,
             "steps_timed": len(v)} for c, v in steps.items()]
    for r in rows:
        print(f"{r['config']:>14}: {r['median_step_s']:.2f} s/step  ({r['x_first']:.3f}x {a.config[0]}, "
              f"{r['steps_timed']} steps)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        model, size, steps, load = sys.argv[2:6]
        print(json.dumps(child(model, int(size), int(steps), json.loads(load))))
    else:
        main()
