"""Evaluate the embedded model on held-out ShapesWorld captions with fastldm's own pipeline.

For each caption i of a fixed held-out list (is_held_out True, never seen in training):
`fastldm.load(folder).generate(caption, steps=S, seed=i, guidance=G)`, then fastldm.tools.shapes.evaluate on
the RGB image and the 16-bit depth map (/ 65535, 1 = near). Each --part writes per-attribute
accuracies (fastldm.tools.shapes.score, in %) and the median seconds per image as JSON, and a markdown table.
The parts are separate so that they can run side by side:

    python training/eval_embedded.py --part guidance --n 30 --out runs/eval_guidance.json
    python training/eval_embedded.py --part main --n 200 --guidance G --out runs/eval_main.json
    python training/eval_embedded.py --part steps --n 40 --guidance G --out runs/eval_steps.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

import fastldm
from fastldm.tools.shapes.captions import random_caption
from fastldm.tools.shapes.evaluate import ATTRIBUTES, evaluate, score


def heldout_captions(n: int, seed: int = 1234) -> list[str]:
    rng = np.random.default_rng(seed)
    return [random_caption(rng, split="heldout") for _ in range(n)]


def run(pipe, captions: list[str], steps: int, guidance: float, sampler: str) -> tuple[dict, list[float]]:
    results, times = [], []
    for i, c in enumerate(captions):
        t = time.perf_counter()
        r = pipe.generate(c, steps=steps, seed=i, guidance=guidance, sampler=sampler)
        times.append(time.perf_counter() - t)
        depth = r.depths[0].astype(np.float32) / 65535.0
        results.append(evaluate(c, np.asarray(r.images[0]), depth))
    return score(results), times


def fmt(col: str, s: dict) -> str:
    if col not in s:
        return "-"
    return f"{s[col]:.3f}" if col == "median_s_per_image" else f"{100 * s[col]:.1f}"


def table(rows: list[tuple[str, dict]]) -> str:
    cols = [a for a in ATTRIBUTES + ("all",) if any(a in s for _, s in rows)] + ["median_s_per_image"]
    lines = ["| setting | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, s in rows:
        lines.append(f"| {name} | " + " | ".join(fmt(c, s) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="src/fastldm/assets/shapes-rgbd")
    p.add_argument("--part", choices=("guidance", "main", "steps"), required=True,
                   help="guidance: 2 / 3 / 4 / 5 / 7.5 at 20 steps; main: 20 steps at --guidance; steps: 4..50 steps")
    p.add_argument("--out", required=True, help="JSON file for this part's results")
    p.add_argument("--n", type=int, default=200, help="held-out captions (the first n of a fixed list)")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's (its fastldm.json)")
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe = fastldm.load(a.model)
    a.guidance = pipe.config.default_guidance if a.guidance is None else a.guidance
    caps = heldout_captions(a.n)
    settings = {"guidance": [(f"guidance {g}", 20, g) for g in (2.0, 3.0, 4.0, 5.0, 7.5)],
                "main": [("20 steps", 20, a.guidance)],
                "steps": [(f"{k} steps", k, a.guidance) for k in (4, 8, 12, 20, 50)]}[a.part]
    rows = []
    for name, steps, g in settings:
        s, t = run(pipe, caps, steps, g, a.sampler)
        rows.append((name, s | {"median_s_per_image": statistics.median(t)}))
        print(rows[-1], flush=True)
    with open(a.out, "w") as f:
        json.dump({"part": a.part, "n": a.n, "sampler": a.sampler, "guidance": a.guidance, "rows": dict(rows)},
                  f, indent=2)
    print(f"\n{a.part}: {a.sampler}, CFG {a.guidance:g}, {a.n} held-out captions\n")
    print(table(rows))


if __name__ == "__main__":
    main()
