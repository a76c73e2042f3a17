"""Dynamic execution (issues 7 and 18): quality step labels, the shipped step predictors, and the accuracy-vs-steps
curves of every sampler on the embedded model, with and without int8.

Embedded model (ShapesWorld captions, judged by fastldm.tools.shapes.evaluate), in stages that each write to --out:

    python benchmarks/dynamic_execution.py labels --split train --n 160 --sampler Euler   # label table (verdicts)
    python benchmarks/dynamic_execution.py labels --split heldout --n 200 --sampler Euler # ... of held-out captions
    python benchmarks/dynamic_execution.py labels --split heldout --n 200 --sampler Euler --quant int8
    python benchmarks/dynamic_execution.py tune --sampler Euler       # cost by CV, train, judge on held-out, ship
                                                                      # the predictor or the best constant
    python benchmarks/dynamic_execution.py early --sampler Euler      # early stop at fixed 20, and auto + early stop
    python benchmarks/dynamic_execution.py timing --sampler "DPM++ 2M" --n 20   # s / image, fp32 vs int8, alternated
    python benchmarks/dynamic_execution.py report --json benchmarks/results/dynamic_embedded.json \
        --plot docs/dynamic_execution.png                            # tables (markdown), summary JSON, plot

Random-weight Stable Diffusion 1.5 (speed only; its images mean nothing):

    python benchmarks/dynamic_execution.py sd15 --size 256 --steps 10

Captions: training ones from random_caption(default_rng(0), "train") (unique), held-out ones exactly those of
training/eval_embedded.py (default_rng(1234), split "heldout"); caption i is generated with seed i.
The fixed-steps curve of a sampler is its held-out verdict matrix's column means; a predictor's point is (mean
predicted steps, pass rate of the images at those steps), read off the same matrix (predictions lie on the grid).
Early stop is replayed offline from one run per caption that records every step's x0 estimate: the image a
threshold returns is the decoded estimate of the step it stops at (what `generate(early_stop=...)` returns).
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
from fastldm.runtime.step_predictor import load_predictor_file, predictor_path
from fastldm.samplers import resolve_sampler
from fastldm.tools.shapes.captions import parse_caption, random_caption
from fastldm.tools.steps.labels import NEVER, LabelTable, build_label_table, render, shapes_judge
from fastldm.tools.steps.train import TOLERANCE, fixed_curve, judge_point, steps_to_reach, train_from_table

SAMPLERS = ("DDIM", "Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M Karras", "UniPC")
THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.08)


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


def load(a, quant: str | None = None):
    """The model of --model; a --guidance left out becomes the model's default CFG scale."""
    pipe = fastldm.load(a.model, quant=quant)
    a.guidance = pipe.config.default_guidance if a.guidance is None else a.guidance
    return pipe


def name(sampler: str) -> str:
    return resolve_sampler(sampler).name


def table_path(a, split: str, sampler: str, quant: str | None = None) -> Path:
    return a.out / f"labels-{split}{'-' + quant if quant else ''}-{name(sampler)}.json"


# ---- labels -------------------------------------------------------------------------------------------------

def cmd_labels(a) -> None:
    pipe = load(a, a.quant)
    path = table_path(a, a.split, a.sampler, a.quant)
    table = LabelTable.load(path) if path.exists() else None
    t0 = time.perf_counter()
    done = len(table.prompts) if table else 0

    def saved(t: LabelTable) -> None:
        t.save(path)
        rate = (time.perf_counter() - t0) / max(len(t.prompts) - done, 1)
        print(f"{len(t.prompts)}/{a.n} labelled, {rate:.1f} s/prompt", flush=True)

    build_label_table(pipe, captions(a.split, a.n), a.sampler, guidance=a.guidance, batch=a.batch,
                      judge=shapes_judge, table=table, on_batch=saved)


# ---- tune: cost by cross-validation, train, judge on the held-out captions, ship ------------------------------

def cmd_tune(a) -> None:
    pipe = load(a)
    train, held = (LabelTable.load(table_path(a, s, a.sampler)) for s in ("train", "heldout"))
    predictor, report = train_from_table(pipe, train, eval_table=held)
    dest = predictor.save(predictor_path(a.model, train.sampler), **report)
    report.update(shipped=type(predictor).__name__, path=str(dest), bytes=dest.stat().st_size,
                  sampler=train.sampler, steps=list(train.steps))
    (a.out / f"tune-{train.sampler}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "cost_sweep"}, indent=1))


def auto_steps(pipe, a, prompts: list[str]) -> list[int]:
    """What `steps="auto"` runs for each prompt with --sampler: the shipped predictor (or constant) file."""
    model = load_predictor_file(predictor_path(a.model, name(a.sampler)))
    return model.predict_steps(model.prompt_features(pipe, prompts))


# ---- early stop, replayed offline -----------------------------------------------------------------------------

@torch.no_grad()
def early_stop_points(pipe, a, prompts: list[str], counts: list[int]) -> dict[str, dict]:
    """Prompt i runs counts[i] steps once, recording every step's x0 estimate; for each threshold of THRESHOLDS
    (and 0: no stop) the step an EarlyStop would stop at and the judge's verdict on the image it returns."""
    steps_run = {th: np.zeros(len(prompts), int) for th in (0.0, *THRESHOLDS)}
    passed = {th: np.zeros(len(prompts), bool) for th in steps_run}
    for count in sorted(set(counts)):
        members = [i for i, c in enumerate(counts) if c == count]
        for start in range(0, len(members), a.batch):
            chunk = members[start:start + a.batch]
            records = [[] for _ in chunk]                                 # per prompt, per step: (x0, σ_next)
            final = render(pipe, [prompts[i] for i in chunk], chunk, count, a.sampler, guidance=a.guidance,
                           callbacks=[lambda info, keep=r.append: keep((info["denoised"].clone(),
                                                                          float(info["sigma_next"])))
                                      for r in records])
            for b, i in enumerate(chunk):
                es, record = EarlyStop(0.0), records[b]
                for denoised, sigma_next in record:                       # δ of prompt i alone, step by step
                    es({"denoised": denoised, "sigma_next": sigma_next})
                images = {}
                for th in steps_run:
                    j = next((j for j, (d, (_, s)) in enumerate(zip(es.deltas, record)) if d < th and s > 0),
                             len(record) - 1)
                    if j not in images:
                        images[j] = final[b] if j == len(record) - 1 else pipe.decode(record[j][0])[0]
                    steps_run[th][i], passed[th][i] = j + 1, shapes_judge(prompts[i], images[j])
        print(f"{count} steps: {len(members)} prompts", flush=True)
    return {f"{th:g}": {"mean_steps": float(steps_run[th].mean()), "accuracy": float(passed[th].mean()),
                        "steps": steps_run[th].tolist()} for th in steps_run}


def cmd_early(a) -> None:
    pipe = load(a, a.quant)
    prompts = captions("heldout", a.n)
    out = {"sampler": name(a.sampler), "quant": a.quant, "captions": len(prompts),
           "fixed20": early_stop_points(pipe, a, prompts, [20] * len(prompts)),
           "auto": early_stop_points(pipe, a, prompts, auto_steps(pipe, a, prompts))}
    (a.out / f"early{'-' + a.quant if a.quant else ''}-{name(a.sampler)}.json").write_text(json.dumps(out, indent=1))


# ---- time per image: fp32 vs int8, fixed 20 vs auto, alternated ---------------------------------------------

def cmd_timing(a) -> None:
    pipes = {"fp32": load(a), "int8": load(a, "int8")}
    prompts = captions("heldout", a.n)
    runs = {f"{steps_} {q}": (q, steps_) for q in pipes for steps_ in ("fixed 20", "auto")}
    times, steps = {k: [] for k in runs}, {k: [] for k in runs}
    for i, p in enumerate([prompts[0], *prompts]):          # round 0 warms up (int8 compiles) and is not counted
        for k, (q, setting) in runs.items():
            t0 = time.perf_counter()
            r = pipes[q].generate(p, steps=20 if setting == "fixed 20" else "auto", seed=max(i - 1, 0),
                                  sampler=a.sampler, guidance=a.guidance)
            if i:
                times[k].append(time.perf_counter() - t0)
                steps[k].append(r.steps)
    base = statistics.median(times["fixed 20 fp32"])
    out = {"sampler": name(a.sampler), "captions": len(prompts), "threads": a.threads,
           "runs": {k: {"median_s": statistics.median(v), "vs_fixed20_fp32": statistics.median(v) / base,
                        "mean_steps": float(np.mean(steps[k])), "times": v} for k, v in times.items()}}
    (a.out / f"timing-{name(a.sampler)}.json").write_text(json.dumps(out, indent=1))
    for k, r in out["runs"].items():
        print(f"{k}: {r['mean_steps']:.2f} steps, {r['median_s']:.3f} s / image, {r['vs_fixed20_fp32']:.2f}x")


# ---- report: tables, summary JSON, plot -----------------------------------------------------------------------

def caption_type(caption: str) -> str:
    """For the analysis only, never a predictor's feature: one object by its stated size, two by their relation."""
    spec = parse_caption(caption)
    return f"two, {spec.relation}" if spec.relation else f"one, {spec.objects[0].size or 'any'} size"


def type_oracle(held: LabelTable) -> dict:
    """The best that knowing each caption's type (caption_type) could do, fitted on the held-out verdicts
    themselves (an optimistic bound for a prompt-aware predictor): every type its own count, the one maximising
    the type's accuracy - λ·k, for the λ with the fewest mean steps within TOLERANCE of fixed 20."""
    types, passed, grid = np.array([caption_type(p) for p in held.prompts]), np.asarray(held.passed), held.steps
    best = None
    for lam in np.linspace(0, 0.05, 101):
        picks = np.zeros(len(types), int)
        for t in set(types):
            picks[types == t] = grid[int(np.argmax(passed[types == t].mean(0) - lam * np.asarray(grid)))]
        p = judge_point(passed, grid, picks)
        if p["accuracy"] >= p["accuracy_fixed_reference"] - TOLERANCE - 1e-12 and (
                best is None or p["mean_steps"] < best["mean_steps"]):
            best = p | {"per_type": {str(t): int(picks[types == t][0]) for t in sorted(set(types))}}
    return best


def image_oracle(held: LabelTable) -> dict:
    """Every image at its own quality label (NEVER: the fewest steps, more buy nothing): what a predictor that also
    knew the seed's noise could do."""
    labels = held.labels("quality")
    return judge_point(held.passed, held.steps, np.where(labels == NEVER, held.steps[0], labels))


def sampler_summary(pipe, a, sampler: str) -> dict | None:
    """Everything measured for one sampler on the held-out captions (None before its labels are tuned)."""
    path, tune = table_path(a, "heldout", sampler), a.out / f"tune-{name(sampler)}.json"
    if not (path.exists() and tune.exists()):
        return None
    held, a.sampler, tune = LabelTable.load(path), sampler, json.loads(tune.read_text())
    predicted = auto_steps(pipe, a, held.prompts)
    out = {"steps": list(held.steps), "captions": len(held.prompts), "train_captions": tune["train"],
           "fixed": fixed_curve(held.passed, held.steps).tolist(), "shipped": tune["shipped"],
           "cost": tune["cost"], "constant": tune["constant"], "predictor": tune["eval"]["predictor"],
           "predictor_sweep": tune["eval"]["cost_sweep"],
           "constant_point": tune["eval"]["constant"], "auto": judge_point(held.passed, held.steps, predicted),
           "type_oracle": type_oracle(held), "image_oracle": image_oracle(held)}
    for quant in ("int8",):                      # on its first n held-out captions, fp32 on the same ones beside it
        p8 = table_path(a, "heldout", sampler, quant)
        if p8.exists():
            held8 = LabelTable.load(p8)
            n, fp32 = len(held8.prompts), held.passed[:len(held8.prompts)]
            out[quant] = {"captions": n, "fixed": fixed_curve(held8.passed, held8.steps).tolist(),
                          "auto": judge_point(held8.passed, held8.steps, predicted[:n]),
                          "fixed_fp32": fixed_curve(fp32, held.steps).tolist(),
                          "auto_fp32": judge_point(fp32, held.steps, predicted[:n])}
    for quant in ("", "-int8"):
        early = a.out / f"early{quant}-{held.sampler}.json"
        if early.exists():
            e = json.loads(early.read_text())
            curve = fixed_curve(held.passed[:e["captions"]], held.steps)        # the same captions' fixed curve
            out[f"early{quant}"] = {"captions": e["captions"], "fixed_curve": curve.tolist()} | {
                k: {th: {"mean_steps": v["mean_steps"], "accuracy": v["accuracy"],
                         "fixed_steps_same_accuracy": _finite(steps_to_reach(curve, held.steps, v["accuracy"]))}
                    for th, v in e[k].items()} for k in ("fixed20", "auto")}
    return out


def _finite(x: float) -> float | None:
    return x if np.isfinite(x) else None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _point(v: dict) -> str:
    return f"{v['mean_steps']:.2f} @ {_pct(v['accuracy'])}"


def _needed(v: dict) -> str:
    return "none as accurate" if v["fixed_steps_same_accuracy"] is None else f"{v['fixed_steps_same_accuracy']:.1f}"


def _saving(v: dict) -> str:
    return "above the curve" if v["saving"] is None else f"{100 * v['saving']:.0f} %"


def print_tables(summary: dict) -> None:
    grid = next(iter(summary.values()))["steps"]
    print("Fixed step counts, accuracy (%) on the held-out captions:\n")
    print("| sampler | captions | " + " | ".join(map(str, grid)) + " |\n|---|---|" + "---|" * len(grid))
    for s, r in summary.items():
        print(f"| {s} | {r['captions']} | " + " | ".join(map(_pct, r["fixed"])) + " |")
    print("\nPredictor vs the fixed curve (mean steps @ accuracy %; saving: 1 - its steps / the fixed steps reaching "
          "its accuracy):\n")
    print("| sampler | fixed 20 | best constant (train) | predictor (CV cost) | fixed steps at its accuracy | saving | "
          "beats? | `--steps auto` ships | caption-type oracle (saving) | image oracle |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for s, r in summary.items():
        p, c, o, i = r["predictor"], r["constant_point"], r["type_oracle"], r["image_oracle"]
        print(f"| {s} | {_pct(p['accuracy_fixed_reference'])} | {r['constant']} @ {_pct(c['accuracy'])} | "
              f"{_point(p)} | {_needed(p)} | {_saving(p)} | {'yes' if p['beats_fixed'] else 'no'} | "
              f"{'predictor' if r['shipped'] == 'StepPredictor' else 'constant ' + str(r['constant'])} | "
              f"{_point(o)} ({_saving(o)}) | {_point(i)} |")
    if any("early" in r for r in summary.values()):
        ths = [th for th in next(r for r in summary.values() if "early" in r)["early"]["fixed20"] if th != "0"]
        print("\nEarly stop by threshold, from fixed 20 and from `--steps auto`: mean steps @ accuracy % (the fixed "
              "steps reaching that accuracy on the same captions):\n")
        print("| sampler | captions | start | " + " | ".join(ths) + " |\n|---|---|---|" + "---|" * len(ths))
        for s, r in summary.items():
            for key, start in (("fixed20", "fixed 20"), ("auto", "`--steps auto`")):
                if "early" in r:
                    e = r["early"]
                    print(f"| {s} | {e['captions']} | {start} | " + " | ".join(
                        f"{_point(e[key][th])} ({_needed(e[key][th])})" for th in ths) + " |")
    if any("int8" in r for r in summary.values()):
        print("\nint8 (`quant=\"int8\"`) against fp32 on the same held-out captions (accuracy %; fixed curve at "
              f"{', '.join(map(str, grid))} steps):\n")
        print("| sampler | captions | runtime | fixed curve | fixed 20 | `--steps auto` |\n|---|---|---|---|---|---|")
        for s, r in summary.items():
            if "int8" in r:
                i8, ref = r["int8"], grid.index(20)
                for q, fixed, auto in (("fp32", i8["fixed_fp32"], i8["auto_fp32"]), ("int8", i8["fixed"], i8["auto"])):
                    print(f"| {s} | {i8['captions']} | {q} | {' / '.join(map(_pct, fixed))} | {_pct(fixed[ref])} | "
                          f"{auto['mean_steps']:.2f} @ {_pct(auto['accuracy'])} |")


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), sharey=True)
    for ax, (s, r) in zip(axes.flat, summary.items()):
        best = 100 * np.maximum.accumulate(r["fixed"])
        ax.plot(r["steps"], 100 * np.asarray(r["fixed"]), "o-", color="0.3", ms=3, label="fixed steps")
        ax.plot(0.75 * np.asarray(r["steps"]), best, "-", color="0.75", lw=4, alpha=0.6, zorder=0,
                label="target: 25 % fewer steps")
        if "int8" in r:
            i8 = r["int8"]
            ax.plot(r["steps"], 100 * np.asarray(i8["fixed"]), "o--", color="tab:purple", ms=3, alpha=0.7,
                    label=f"fixed, int8 (first {i8['captions']})")
            ax.plot(i8["auto"]["mean_steps"], 100 * i8["auto"]["accuracy"], "*", color="tab:purple", ms=11,
                    label=f"auto, int8 (first {i8['captions']})")
        p, c = r["auto"], r["constant_point"]
        sweep = r["predictor_sweep"]
        ax.plot([v["mean_steps"] for v in sweep], [100 * v["accuracy"] for v in sweep], ".--", color="tab:red",
                ms=4, alpha=0.6, label="predictor, other costs")
        ax.plot(r["predictor"]["mean_steps"], 100 * r["predictor"]["accuracy"], "*", color="tab:red", ms=13,
                label="predictor (CV cost)")
        ax.plot(c["mean_steps"], 100 * c["accuracy"], "s", color="tab:blue", ms=7, label="best constant")
        for key, marker, label in (("type_oracle", "P", "caption-type oracle"), ("image_oracle", "X", "image oracle")):
            ax.plot(r[key]["mean_steps"], 100 * r[key]["accuracy"], marker, color="0.45", ms=7, label=label)
        if "early" in r:
            for key, colour, label in (("fixed20", "tab:green", "early stop (20)"),
                                       ("auto", "tab:orange", "auto + early stop")):
                pts = [v for th, v in r["early"][key].items() if th != "0"]
                ax.plot([v["mean_steps"] for v in pts], [100 * v["accuracy"] for v in pts], "^:", color=colour,
                        ms=5, label=label)
        ax.set_title(f"{s}, {r['captions']} captions (--steps auto: {p['mean_steps']:.1f})", fontsize=10)
        ax.set_xlabel("mean steps")
        ax.grid(alpha=0.3)
        ax.set_ylim(100 * r["predictor"]["accuracy_fixed_reference"] - 30, 100)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%), held-out captions")
    handles = {}                                     # every kind of mark once, in the spare panel
    for ax in axes.flat:
        handles |= dict(zip(*reversed(ax.get_legend_handles_labels())))
    for ax in list(axes.flat)[len(summary):]:
        ax.axis("off")
    axes.flat[-1].legend(handles.values(), handles.keys(), fontsize=9, loc="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cmd_report(a) -> None:
    pipe = load(a)
    summary = {s: r for s in SAMPLERS if (r := sampler_summary(pipe, a, s)) is not None}
    timing = {f.stem[len("timing-"):]: json.loads(f.read_text()) for f in sorted(a.out.glob("timing-*.json"))}
    print_tables(summary)
    for sampler, t in timing.items():
        print(f"\nTime per image, {sampler}, {t['captions']} held-out captions, medians:\n\n"
              "| setting | mean steps | s / image | vs fixed 20 fp32 |\n|---|---|---|---|")
        for k, r in t["runs"].items():
            print(f"| {k} | {r['mean_steps']:.2f} | {r['median_s']:.3f} | {r['vs_fixed20_fp32']:.2f} |")
    if a.json:
        for t in timing.values():
            for r in t["runs"].values():
                r.pop("times")
        a.json.write_text(json.dumps({"samplers": summary, "timing": timing}, indent=1))
    if a.plot:
        plot(summary, a.plot)


# ---- random-weight SD 1.5: speed ------------------------------------------------------------------------------

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
    p.add_argument("stage", choices=["labels", "tune", "early", "timing", "report", "sd15"])
    p.add_argument("--model", type=Path, default=Path("src/fastldm/assets/shapes-rgbd"))
    p.add_argument("--out", type=Path, default=Path("runs/dynamic"))
    p.add_argument("--split", choices=["train", "heldout"], default="train")
    p.add_argument("--n", type=int, default=200, help="captions (labels: of --split; early, timing: held-out)")
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--quant", choices=["int8"], default=None, help="labels, early: the int8 runtime")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's (its fastldm.json)")
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--json", type=Path, help="report: summary JSON; sd15: results JSON")
    p.add_argument("--plot", type=Path, help="report: PNG of the curves")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    {"labels": cmd_labels, "tune": cmd_tune, "early": cmd_early, "timing": cmd_timing, "report": cmd_report,
     "sd15": cmd_sd15}[a.stage](a)


if __name__ == "__main__":
    main()
