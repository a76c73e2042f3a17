"""`fastldm serve --ray` against the plain server: throughput and latency with 1 and 2 model worker replicas, and
Ray Serve's overhead per request.

    python benchmarks/serve_ray.py [--requests 48] [--clients 8] [--probes 40] [--configs plain,ray-1,ray-2]
        [--json benchmarks/results/serve_ray.json]

Configurations, one at a time, each a fresh `fastldm serve` process on loopback with the embedded model:
plain = the ordinary server with 1 torch thread; ray-R = `--ray --replicas R --cpus-per-replica 1` (a local
Ray instance of R CPUs: the HTTP ingress and R model workers of 1 thread each). Every server has --max-batch 8.
Two measurements per configuration, after a warm-up burst:

- load: --clients A1111 clients send --requests txt2img requests in all (64x64, 20 steps, DPM++ 2M): images/s
  (wall), p50 / p99 latency, and the CPU seconds per request of the server's whole process tree (for Ray: the
  driver, Ray's own processes, the proxy, the ingress and the replicas), which does not depend on what else
  the machine runs;
- overhead: one client sends --probes requests of 1 step at 8x8, one after another: the median latency, whose
  difference between ray-1 and plain is what a request pays for Ray Serve (proxy, ingress replica, the handle
  call to the worker and the stream of messages back) on top of the same work.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

from serve_load import run_level   # benchmarks/ is on sys.path when this script runs

from fastldm.testing import ServerProcess

LOAD = {"width": 64, "height": 64, "steps": 20, "sampler_name": "DPM++ 2M"}
PROBE = {"width": 8, "height": 8, "steps": 1, "sampler_name": "Euler"}


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of `root` and all its live descendants."""
    parent, cpu = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid, c in cpu.items():
        p = pid
        while p not in (0, 1, root) and p in parent:
            p = parent[p]
        total += c if p == root else 0.0
    return total


def server(config: str, log: Path) -> ServerProcess:
    args = ["--max-batch", "8", "--max-queue", "256", "--log-level", "warning"]
    args += ["--threads", "1"] if config == "plain" else ["--ray", "--replicas", config.split("-")[1],
                                                          "--cpus-per-replica", "1"]
    proc = ServerProcess(*args, log=log)
    proc.wait_ready(600)
    return proc


def bench(config: str, requests: int, clients: int, probes: int, logs: Path) -> dict:
    t0 = time.perf_counter()
    proc = server(config, logs / f"serve_ray-{config}.log")
    url = proc.url
    ready_s = time.perf_counter() - t0
    try:
        warm = run_level(url, clients, clients, LOAD, 600, 90_000)
        assert warm["failed"] == 0, warm["failures"]
        c0 = tree_cpu_s(proc.proc.pid)
        load = run_level(url, clients, requests, LOAD, 1800, 0)
        cpu = tree_cpu_s(proc.proc.pid) - c0
        lat = sorted(load["latencies"])
        probe = run_level(url, 1, probes, PROBE, 600, 50_000)
        plat = sorted(probe["latencies"])
        row = {"config": config, "ready_s": round(ready_s, 1), "clients": clients, "requests": load["requests"],
               "failed": load["failed"] + probe["failed"], "failures": load["failures"] + probe["failures"],
               "images_per_s": round(load["ok"] / load["wall_s"], 3), "p50_s": round(statistics.median(lat), 3),
               "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
               "cpu_s_per_request": round(cpu / max(1, load["ok"]), 3),
               "probe_p50_ms": round(1000 * statistics.median(plat), 1),
               "probe_p10_ms": round(1000 * plat[len(plat) // 10], 1), "load_avg": os.getloadavg()}
        print(json.dumps(row), flush=True)
        return row
    finally:
        proc.stop(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--probes", type=int, default=40)
    ap.add_argument("--configs", default="plain,ray-1,ray-2")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # stop the server (finally) when terminated
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_avg_before": os.getloadavg(),
                       "command": "python benchmarks/serve_ray.py " + " ".join(sys.argv[1:]),
                       "load_request": LOAD, "probe_request": PROBE}, "rows": []}
    for config in args.configs.split(","):
        result["rows"].append(bench(config, args.requests, args.clients, args.probes, logs))
    result["meta"]["load_avg_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
