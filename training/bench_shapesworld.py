"""ShapesWorld throughput: renderer scenes/s (sampling + rendering) and evaluator scenes/s, with the
evaluator's accuracy on the ground-truth renders it scored.

    python training/bench_shapesworld.py [--n 4096] [--batch 512] [--eval 500]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))          # like training/common.py
from shapesworld import render_batch  # noqa: E402

from fastldm.tools.shapes.evaluate import evaluate, score  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="scenes to render")
    ap.add_argument("--batch", type=int, default=512, help="scenes per render_batch call")
    ap.add_argument("--eval", type=int, default=500, help="scenes to evaluate")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    render_batch(rng, 64)                                          # warm up
    n = args.n // args.batch * args.batch
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n // args.batch):
        render_batch(rng, args.batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"render_batch: {n / wall:,.0f} scenes/s wall, {n / cpu:,.0f} per CPU second "
          f"(batches of {args.batch}, one process)")
    captions, rgb, depth = render_batch(rng, args.eval)
    wall, cpu = time.perf_counter(), time.process_time()
    results = [evaluate(c, rgb[i], depth[i]) for i, c in enumerate(captions)]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"evaluate: {args.eval / wall:,.0f} scenes/s wall, {args.eval / cpu:,.0f} per CPU second; "
          "accuracy on ground truth: " + ", ".join(f"{k} {v:.3f}" for k, v in score(results).items()))


if __name__ == "__main__":
    main()
