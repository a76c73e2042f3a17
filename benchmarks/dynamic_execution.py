"""Dynamic execution (issue 7): step labels, the shipped step predictor, and the results table.

Embedded model (ShapesWorld captions, judged by fastldm.tools.shapes.evaluate), in stages that each write to --out:

    python benchmarks/dynamic_execution.py labels --split train --n 320     # label table of training captions
    python benchmarks/dynamic_execution.py labels --split heldout --n 200   # ... and of the held-out captions
    python benchmarks/dynamic_execution.py tune                             # τ, early-stop threshold, quantile;
                                                                            # trains + ships the predictor
    python benchmarks/dynamic_execution.py results                          # the table on the held-out captions

Random-weight Stable Diffusion 1.5 (speed only; its images mean nothing):

    python benchmarks/dynamic_execution.py sd15 --size 256 --steps 10

Captions: training ones from random_caption(default_rng(0), "train") (unique), held-out ones exactly those of
training/eval_embedded.py (default_rng(1234), split "heldout"); caption i is generated with seed i.
Timings interleave the settings caption by caption (A, B, C, ... per caption) so that the shared machine's load
falls on all of them alike; one thread (--threads).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import fastldm
from fastldm.runtime.early_stop import DEFAULT_THRESHOLD, EarlyStop
from fastldm.tools.steps.labels import LabelTable, build_label_table, shapes_judge
from fastldm.runtime.step_predictor import predictor_path, prompt_features, step_range
from fastldm.tools.steps.train import evaluate_predictor, train_step_predictor
from fastldm.tools.ssim import ssim
from fastldm.tools.shapes.captions import random_caption

TAUS = (0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98)
THRESHOLDS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08)
QUANTILES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def captions(split: str, n: int) -> list[str]:
    if split == "heldout":                      # training/eval_embedded.py's list
        rng = np.random.default_rng(1234)
        return [random_caption(rng, split="heldout") for _ in range(n)]
    rng, out = np.random.default_rng(0), []
    while len(out) < n:
        c = random_caption(rng, split="train")
        if c not in out:
            out.append(c)
    return out


def load(a):
    """The model of --model; a --guidance left out becomes the model's default CFG scale."""
    pipe = fastldm.load(a.model)
    a.guidance = pipe.config.default_guidance if a.guidance is None else a.guidance
    return pipe


# ---- labels -------------------------------------------------------------------------------------------------

def cmd_labels(a) -> None:
    pipe = load(a)
    path = a.out / f"labels-{a.split}-{pipe_sampler(a)}.json"
    table = LabelTable.load(path) if path.exists() else None
    t0 = time.perf_counter()
    done = len(table.prompts) if table else 0

    def saved(t: LabelTable) -> None:
        t.save(path)
        rate = (time.perf_counter() - t0) / max(len(t.prompts) - done, 1)
        print(f"{len(t.prompts)}/{a.n} labelled, {rate:.1f} s/prompt", flush=True)

    build_label_table(pipe, captions(a.split, a.n), a.sampler, guidance=a.guidance, batch=a.batch,
                      judge=shapes_judge, table=table, on_batch=saved)


def pipe_sampler(a) -> str:
    from fastldm.samplers import resolve_sampler
    return resolve_sampler(a.sampler).name


# ---- tune: τ, early-stop threshold, predictor quantile --------------------------------------------------------

def accuracy_at(table: LabelTable, steps) -> float:
    """Evaluator accuracy (all attributes) of each prompt's image at its own step count, read off the table."""
    passed, grid = np.asarray(table.passed), list(table.steps)
    return float(np.mean([passed[i, grid.index(int(s))] for i, s in enumerate(steps)]))


def tune_tau(train: LabelTable) -> tuple[float, list[dict]]:
    """The smallest τ whose oracle labels (a perfect predictor; as labels, before the sampler's range clamps them)
    keep the evaluator accuracy of fixed 20 steps within 1 point. Judged unclamped so that the labels
    themselves carry the quality, not the clamp's floor."""
    acc20 = accuracy_at(train, [20] * len(train.prompts))
    lo, hi = step_range(train.sampler)
    rows = [{"tau": t, "mean_label": float(train.labels(t).mean()), "accuracy": accuracy_at(train, train.labels(t)),
             "mean_steps_clamped": float(np.clip(train.labels(t), lo, hi).mean())} for t in TAUS]
    ok = [r["tau"] for r in rows if r["accuracy"] >= acc20 - 0.01]
    return (min(ok) if ok else max(TAUS)), rows


def tune_quantile(pipe, train: LabelTable, tau: float, folds: int = 5) -> tuple[float, list[dict]]:
    """Out-of-fold predictions over the training captions for each quantile, clamped to the sampler's range: the
    quantile with the fewest mean steps whose accuracy stays within 1 point (the issue's bound) of fixed 20
    steps, else the most accurate one."""
    feats, labels = prompt_features(pipe, train.prompts), train.labels(tau)
    order = np.random.default_rng(0).permutation(len(labels))
    preds = {q: np.zeros(len(labels), int) for q in QUANTILES}
    lo, hi = step_range(train.sampler)
    for k in range(folds):
        held = order[k::folds]
        fit = np.setdiff1d(order, held)
        model = train_step_predictor(feats[fit], labels[fit], train.steps, train.sampler)
        for q in QUANTILES:
            preds[q][held] = model.steps[model.buckets(feats[held], q)].numpy()
    acc20 = accuracy_at(train, [20] * len(labels))
    preds = {q: np.clip(p, lo, hi) for q, p in preds.items()}                 # what --steps auto would run
    rows = [{"quantile": q, "mean_steps": float(p.mean()), "accuracy": accuracy_at(train, p)}
            for q, p in preds.items()]
    ok = [r for r in rows if r["accuracy"] >= acc20 - 0.01]
    best = min(ok, key=lambda r: r["mean_steps"]) if ok else max(rows, key=lambda r: r["accuracy"])
    return best["quantile"], rows


@torch.no_grad()
def tune_threshold(pipe, prompts: list[str], a) -> tuple[float, list[dict]]:
    """Early stop at fixed 20 steps, offline: one run per caption records every step's x0 estimate and δ; the
    image a threshold would return is the decoded estimate of its stopping step. The largest threshold whose
    accuracy stays within 1 point of running all 20 steps."""
    from fastldm.tools.shapes.evaluate import evaluate
    stops, passed = [], []
    for i, p in enumerate(prompts):
        es, estimates = EarlyStop(0.0), []
        r = pipe.generate(p, steps=20, seed=i, guidance=a.guidance, sampler=a.sampler,
                          callback=lambda info: estimates.append(info["denoised"].clone()) or es(info))
        raws = list(pipe.decode(torch.cat(estimates[:-1]).to(pipe.dtype))) + [r.raw[0]]      # step i -> image
        passed.append([all(evaluate(p, (x[..., :3] * 255).round().astype(np.uint8), x[..., 3]).values())
                       for x in raws])
        stops.append(es.deltas)
    rows = []
    for th in (*THRESHOLDS, 0.0):
        idx = [next((j for j, d in enumerate(ds[:-1]) if d < th), len(ds) - 1) for ds in stops]
        rows.append({"threshold": th, "mean_steps": float(np.mean(idx) + 1),
                     "accuracy": float(np.mean([passed[k][j] for k, j in enumerate(idx)]))})
    full = rows[-1]["accuracy"]
    ok = [r["threshold"] for r in rows[:-1] if r["accuracy"] >= full - 0.01]
    return (max(ok) if ok else min(THRESHOLDS)), rows


def cmd_tune(a) -> None:
    torch.set_num_threads(a.threads)
    pipe = load(a)
    name = pipe_sampler(a)
    train = LabelTable.load(a.out / f"labels-train-{name}.json")
    held = LabelTable.load(a.out / f"labels-heldout-{name}.json")
    report = {"per_step_accuracy_heldout": dict(zip(held.steps, np.asarray(held.passed).mean(0).tolist())),
              "per_step_ssim_heldout": dict(zip(held.steps, np.asarray(held.ssim).mean(0).tolist()))}
    tau, report["tau_sweep"] = tune_tau(train)
    q, report["quantile_sweep"] = tune_quantile(pipe, train, tau)
    th, report["threshold_sweep"] = tune_threshold(pipe, captions("train", a.n_threshold), a)
    report.update(tau=tau, quantile=q, early_stop_threshold=th)

    model = train_step_predictor(prompt_features(pipe, train.prompts), train.labels(tau), train.steps, name,
                                 quantile=q)
    feats = prompt_features(pipe, held.prompts)
    err = evaluate_predictor(model, feats, held.labels(tau))
    lo, hi = step_range(name)
    pred = np.clip(model.steps[model.buckets(feats)].numpy(), lo, hi)
    const = int(np.clip(np.quantile(train.labels(tau), q, method="higher"), lo, hi))  # a prompt-blind predictor
    err.update(accuracy_at_predicted=accuracy_at(held, pred), mean_steps_predicted=float(pred.mean()),
               constant_steps=const, constant_mae=float(np.abs(held.labels(tau) - const).mean()),
               accuracy_at_constant=accuracy_at(held, [const] * len(pred)),
               accuracy_fixed20=accuracy_at(held, [20] * len(pred)))
    report["heldout_predictor"] = err
    dest = model.save(predictor_path(a.model, name), tau=tau, quantile=q, train_prompts=len(train.prompts),
                      guidance=a.guidance, heldout=err)
    report["predictor"] = {"path": str(dest), "bytes": dest.stat().st_size}
    (a.out / f"tune-{name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


# ---- results on the held-out captions -------------------------------------------------------------------------

def _counting(pipe):
    """Forward hooks counting UNet calls and full (deep-path) calls; returns (counts, remove)."""
    counts = {"calls": 0, "full": 0}
    h1 = pipe.unet.register_forward_hook(lambda m, i, o: counts.__setitem__("calls", counts["calls"] + 1))
    h2 = pipe.unet.mid_block.register_forward_hook(lambda m, i, o: counts.__setitem__("full", counts["full"] + 1))
    return counts, lambda: (h1.remove(), h2.remove())


@torch.no_grad()
def shallow_cost(pipe, size: int, repeats: int = 20) -> tuple[float, float]:
    """(time of a DeepCache cached UNet call / a full one, the full one's seconds): CFG batch 2, medians."""
    from fastldm.runtime.deep_cache import DeepCache
    c = pipe.config
    x = torch.randn(2, c.unet.in_channels, size // c.vae_scale, size // c.vae_scale, dtype=pipe.dtype)
    ctx = torch.randn(2, 77, c.unet.cross_attention_dim, dtype=pipe.dtype)
    t = torch.tensor([500.0, 500.0])
    times = {True: [], False: []}
    cache = DeepCache(interval=2)
    for k in range(2 * repeats + 2):
        full = k % 2 == 0
        t0 = time.perf_counter()
        pipe.unet(x, t, ctx, cache=cache)
        if k >= 2:
            times[full].append(time.perf_counter() - t0)
    return statistics.median(times[False]) / statistics.median(times[True]), statistics.median(times[True])


def settings(a) -> dict[str, dict]:
    """The rows of the table; with a tune report, also the prompt-blind constant with the predictor's quantile."""
    th = a.early_stop
    rows = {"fixed 50 (reference)": dict(steps=50), "fixed 20": dict(steps=20), "--steps auto": dict(steps="auto"),
            f"--early-stop {th:g}": dict(steps=20, early_stop=th),
            "--cache-interval 3": dict(steps=20, cache_interval=3),
            f"auto + early-stop {th:g} + cache 3": dict(steps="auto", early_stop=th, cache_interval=3)}
    tune = a.out / f"tune-{pipe_sampler(a)}.json"
    if tune.exists():
        const = json.loads(tune.read_text())["heldout_predictor"]["constant_steps"]
        rows[f"fixed {const} (prompt-blind)"] = dict(steps=const)
    return rows


def cmd_results(a) -> None:
    from fastldm.tools.shapes.evaluate import evaluate
    torch.set_num_threads(a.threads)
    pipe = load(a)
    prompts = captions("heldout", a.n)
    ratio, full_s = shallow_cost(pipe, pipe.config.default_size)
    table = settings(a)
    rows = {name: {"steps": [], "unet_eq": [], "time": [], "passed": [], "ssim": []} for name in table}
    counts, remove = _counting(pipe)
    for i, p in enumerate(prompts):
        reference = None
        for name, kw in table.items():
            counts.update(calls=0, full=0)
            t0 = time.perf_counter()
            r = pipe.generate(p, seed=i, guidance=a.guidance, sampler=a.sampler, **kw)
            dt = time.perf_counter() - t0
            raw = r.raw[0]
            reference = raw if reference is None else reference
            row = rows[name]
            row["steps"].append(r.steps)
            row["unet_eq"].append(counts["full"] + ratio * (counts["calls"] - counts["full"]))
            row["time"].append(dt)
            row["passed"].append(all(evaluate(p, np.asarray(r.images[0]), r.depths[0] / 65535.0).values()))
            row["ssim"].append(ssim(raw, reference))
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(prompts)}", flush=True)
    remove()
    summary = {name: {"mean_steps": float(np.mean(r["steps"])), "unet_equivalents": float(np.mean(r["unet_eq"])),
                      "time_s": float(np.mean(r["time"])), "accuracy": float(np.mean(r["passed"])),
                      "ssim_to_50": float(np.mean(r["ssim"]))} for name, r in rows.items()}
    out = {"captions": len(prompts), "sampler": a.sampler, "guidance": a.guidance, "threads": a.threads,
           "shallow_over_full": ratio, "full_call_s": full_s, "settings": summary}
    (a.out / "results.json").write_text(json.dumps(out, indent=1))
    print(f"embedded model, {len(prompts)} held-out captions, {a.sampler}, CFG {a.guidance:g}, "
          f"{a.threads} thread(s); cached UNet call = {ratio:.2f} x a full one ({1e3 * full_s:.1f} ms)")
    base = summary["fixed 20"]
    print("| setting | mean steps | UNet-equivalents | time / image (s) | vs fixed 20 | evaluator accuracy (%) "
          "| SSIM to 50 steps |\n|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['mean_steps']:.2f} | {s['unet_equivalents']:.2f} | {s['time_s']:.3f} | "
              f"{s['time_s'] / base['time_s']:.2f} | {100 * s['accuracy']:.1f} | {s['ssim_to_50']:.3f} |")


# ---- random-weight SD 1.5: speed ------------------------------------------------------------------------------

def sd15_pipeline(dtype: torch.dtype):
    """SD 1.5's architecture with random weights (fastldm.testing)."""
    from fastldm.testing import fan_in_init_, random_pipeline

    return random_pipeline("sd1", dtype=dtype, init=fan_in_init_)


def cmd_sd15(a) -> None:
    torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    pipe = sd15_pipeline(dtype)
    ratio, full_s = shallow_cost(pipe, a.size, repeats=3)
    runs = {f"fixed {a.steps}": dict(steps=a.steps),
            f"--early-stop {DEFAULT_THRESHOLD:g}": dict(steps=a.steps, early_stop=DEFAULT_THRESHOLD),
            "--cache-interval 3": dict(steps=a.steps, cache_interval=3)}
    times = {k: [] for k in runs}
    steps = {}
    counts, remove = _counting(pipe)
    for rep in range(a.repeats + 1):                   # the first round warms up and is not counted
        for name, kw in runs.items():
            counts.update(calls=0, full=0)
            t0 = time.perf_counter()
            r = pipe.generate("a photograph of an astronaut riding a horse", seed=0, width=a.size, height=a.size, **kw)
            if rep:
                times[name].append(time.perf_counter() - t0)
            steps[name] = (r.steps, counts["full"] + ratio * (counts["calls"] - counts["full"]))
    remove()
    out = {"size": a.size, "dtype": a.dtype, "threads": a.threads, "shallow_over_full": ratio, "full_call_s": full_s,
           "runs": {k: {"steps": steps[k][0], "unet_equivalents": steps[k][1], "time_s": statistics.median(v),
                        "times": v} for k, v in times.items()}}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    print(f"random-weight SD 1.5, {a.size}x{a.size}, {a.dtype}, DPM++ 2M, CFG 7.5, {a.threads} thread(s), median of "
          f"{a.repeats}; full UNet call {full_s:.2f} s, cached call {ratio:.2f} x full")
    base = out["runs"][f"fixed {a.steps}"]["time_s"]
    print("| setting | steps | UNet-equivalents | time / image (s) | vs fixed |\n|---|---|---|---|---|")
    for k, r in out["runs"].items():
        print(f"| {k} | {r['steps']} | {r['unet_equivalents']:.2f} | {r['time_s']:.2f} | {r['time_s'] / base:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["labels", "tune", "results", "sd15"])
    p.add_argument("--model", type=Path, default=Path("src/fastldm/assets/shapes-rgbd"))
    p.add_argument("--out", type=Path, default=Path("runs/dynamic"))
    p.add_argument("--split", choices=["train", "heldout"], default="train")
    p.add_argument("--n", type=int, default=200, help="captions (labels: of --split; results: held-out)")
    p.add_argument("--n-threshold", type=int, default=60, help="training captions for the early-stop sweep")
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's (its fastldm.json)")
    p.add_argument("--early-stop", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    {"labels": cmd_labels, "tune": cmd_tune, "results": cmd_results, "sd15": cmd_sd15}[a.stage](a)


if __name__ == "__main__":
    main()
