"""Load test of `fastldm serve`: step-level batching vs one request at a time (A1111's behaviour), side by side.

For each model, two servers run at once on loopback, identical but for --max-batch (BATCH vs 1); each is warmed
up, then each concurrency level runs in ROUNDS rounds that alternate between the two (batching, one-at-a-time,
batching, ...), so both see the same machine even when its load drifts. Each client sends A1111 txt2img requests
one after another (prompt from a fixed list, seed = request number) until the round's count is reached or its
time is up. Reported per level: images/s (wall), images per CPU-second of the server process (robust on a shared
machine), p50/p99 latency, failures (anything but 200; there is no 429 at these queue sizes), and the servers'
RSS after warm-up and at the end.

    python benchmarks/serve_load.py [--quick] [--threads N] [--skip-embedded | --skip-sd15] [--json benchmarks/results/serve_load.json]
        [--markdown benchmarks/results/serve_load.md]

Models: the embedded RGBD model at 64x64, 20 steps; a full-size SD 1.5 with random weights (built once into
--sd15-folder by fastldm.testing.save_random_folder, fp16 on disk) at 256x256, 4 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

from fastldm.testing import ServerProcess

PROMPTS = ["a red cube left of a blue sphere", "a small green cone", "a yellow sphere in front of a purple cube",
           "a large blue cylinder on the right", "two red spheres", "a white cube behind a green sphere"]


def server(model: str | None, max_batch: int, threads: int | None, log: Path) -> ServerProcess:
    args = ["--max-batch", str(max_batch), "--max-queue", "256", "--log-level", "warning"]
    args += (["--model", model] if model else []) + (["--threads", str(threads)] if threads else [])
    return ServerProcess(*args, log=log)


def run_level(url: str, clients: int, count: int, body: dict, max_seconds: float, first_seed: int) -> dict:
    """`clients` threads send `count` requests in all; -> throughput, latencies, failures."""
    latencies, failures, images = [], [], []
    lock, next_index = threading.Lock(), [0]
    deadline = time.monotonic() + max_seconds

    def client():
        with httpx.Client(timeout=3600) as http:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= count or time.monotonic() > deadline:
                        return
                    next_index[0] += 1
                t0 = time.perf_counter()
                try:
                    r = http.post(f"{url}/sdapi/v1/txt2img",
                                  json=body | {"prompt": PROMPTS[i % len(PROMPTS)], "seed": first_seed + i})
                    ok = r.status_code == 200 and len(r.json()["images"]) == 1
                except httpx.HTTPError as e:
                    ok, r = False, e
                dt = time.perf_counter() - t0
                with lock:
                    (latencies if ok else failures).append(dt if ok else repr(r)[:200])
                    images.append(int(ok))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(images), "ok": len(latencies), "failed": len(failures),
            "failures": failures[:5], "wall_s": wall, "latencies": latencies}


def merge(parts: list[dict], cpu_s: float) -> dict:
    """The rounds of one level on one server -> one row."""
    lat = sorted(x for p in parts for x in p.pop("latencies"))
    ok, wall = sum(p["ok"] for p in parts), sum(p["wall_s"] for p in parts)
    return {"clients": parts[0]["clients"], "requests": sum(p["requests"] for p in parts), "ok": ok,
            "failed": sum(p["failed"] for p in parts), "failures": [f for p in parts for f in p["failures"]][:5],
            "wall_s": round(wall, 2), "cpu_s": round(cpu_s, 2), "images_per_s": round(ok / wall, 3),
            "images_per_cpu_s": round(ok / cpu_s, 3),
            "p50_s": round(statistics.median(lat), 3) if lat else None,
            "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None}


def bench_model(name: str, model: str | None, body: dict, levels: dict[int, int], batch: int, threads: int | None,
                rounds: int, max_seconds: float, logs: Path) -> dict:
    servers = {"batched": server(model, batch, threads, logs / f"{name}-batched.log"),
               "one-at-a-time": server(model, 1, threads, logs / f"{name}-single.log")}
    try:
        for s in servers.values():
            s.wait_ready(900)
        loaded = {mode: s.rss_mb() for mode, s in servers.items()}
        for mode, s in servers.items():   # warm-up: one request, then a full burst (so the batch size peaks)
            for clients in (1, max(levels)):
                warm = run_level(s.url, clients, clients, body, max_seconds, 10_000 * clients)
                assert warm["failed"] == 0, warm["failures"]
        start = {mode: s.rss_mb() for mode, s in servers.items()}
        rows = []
        for clients, count in levels.items():
            parts = {mode: [] for mode in servers}
            cpu = dict.fromkeys(servers, 0.0)
            n_rounds = max(1, min(rounds, count // clients))   # each round keeps every client busy
            for r in range(n_rounds):
                for mode, s in servers.items():
                    c0 = s.cpu_s()
                    parts[mode].append(run_level(s.url, clients, count // n_rounds, body, max_seconds / n_rounds,
                                                 100_000 * clients + r * count))
                    cpu[mode] += s.cpu_s() - c0
            for mode in servers:
                row = merge(parts[mode], cpu[mode])
                rows.append({"mode": mode, **row})
                print(f"{name} {mode:>13} {clients:>2} clients: {row['images_per_s']:.3f} img/s, "
                      f"{row['images_per_cpu_s']:.3f} img/CPU-s, p50 {row['p50_s']} s, p99 {row['p99_s']} s, "
                      f"failed {row['failed']}", flush=True)
        end = {mode: s.rss_mb() for mode, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()
    return {"model": name, "request": body, "max_batch": batch, "rows": rows,
            "rss_mb": {m: {"loaded": round(loaded[m]), "start": round(start[m]), "end": round(end[m]),
                           "growth_pct": round(100 * (end[m] - start[m]) / start[m], 2)} for m in servers}}


def markdown(result: dict) -> str:
    lines = []
    for m in result["models"]:
        lines += [f"**{m['model']}** ({m['request']['width']}x{m['request']['height']}, {m['request']['steps']} steps; "
                  f"batching = --max-batch {m['max_batch']}, one-at-a-time = --max-batch 1)", "",
                  "| clients | requests (batched / single) | images/s batched | images/s one-at-a-time | ratio | "
                  "images per CPU-s batched / single (ratio) | p50 batched / single (s) | p99 batched / single (s) "
                  "| failed |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        by = {(r["mode"], r["clients"]): r for r in m["rows"]}
        for c in sorted({r["clients"] for r in m["rows"]}):
            b, s = by[("batched", c)], by[("one-at-a-time", c)]
            lines.append(f"| {c} | {b['requests']} / {s['requests']} | {b['images_per_s']:.3f} | {s['images_per_s']:.3f} "
                         f"| {b['images_per_s'] / s['images_per_s']:.2f}x | {b['images_per_cpu_s']:.3f} / "
                         f"{s['images_per_cpu_s']:.3f} ({b['images_per_cpu_s'] / s['images_per_cpu_s']:.2f}x) "
                         f"| {b['p50_s']} / {s['p50_s']} "
                         f"| {b['p99_s']} / {s['p99_s']} | {b['failed'] + s['failed']} |")
        rss = m["rss_mb"]
        lines += ["", "RSS (MB) after load / after warm-up / at the end: " + "; ".join(
            f"{mode} {r['loaded']} / {r['start']} / {r['end']} ({r['growth_pct']:+.1f} % over the run)"
            for mode, r in rss.items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few requests per level (a smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each server (default: the "
                    "server's, one per available core)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per level, alternating the two servers")
    ap.add_argument("--batch", type=int, default=16, help="--max-batch of the batching server")
    ap.add_argument("--max-seconds", type=float, default=1800, help="per level: no new request after this")
    ap.add_argument("--sd15-folder", type=Path, default=Path("/tmp/sd15-fp16"))
    ap.add_argument("--skip-sd15", action="store_true")
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # stop the servers (finally) when terminated
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "serve_load_logs"
    logs.mkdir(exist_ok=True)

    embedded_levels = {1: 4, 4: 8, 16: 32} if args.quick else {1: 24, 4: 64, 16: 192}
    sd_levels = {1: 1, 4: 4, 16: 16} if args.quick else {1: 4, 4: 8, 16: 16}
    rounds = 1 if args.quick else args.rounds
    load_before = os.getloadavg()
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "threads": args.threads, "load_avg_before": load_before,
                       "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])}, "models": []}
    if not args.skip_embedded:
        result["models"].append(bench_model("embedded shapes-rgbd", None, {"width": 64, "height": 64, "steps": 20},
                                            embedded_levels, args.batch, args.threads, rounds, args.max_seconds, logs))
    if not args.skip_sd15:
        if not args.sd15_folder.exists():
            import torch

            from fastldm.testing import save_random_folder

            save_random_folder("sd1", args.sd15_folder, dtype=torch.float16)
        result["models"].append(bench_model("SD 1.5 (random weights)", str(args.sd15_folder),
                                            {"width": 256, "height": 256, "steps": 4}, sd_levels, args.batch,
                                            args.threads, rounds, args.max_seconds, logs))
    result["meta"]["load_avg_after"] = os.getloadavg()
    table = markdown(result)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
