"""Bulk generation throughput (`fastldm batch`): the local engine against Ray Data with 1 and 2 workers on the
same prompts, and the Ray path's own cost per request with no model and PNG-sized results.

    python benchmarks/batch_scale.py [--prompts 48] [--noop-requests 500] [--steps 20] [--batch 8] [--model PATH]
        [--size S] [--configs local,ray-1,ray-2,noop-1,noop-2] [--json out.json]

Each configuration runs in a fresh process, through tools/batch.Batch into a fresh folder (so the driver's
file and manifest writes are counted): local = one process, 1 torch thread; ray-W = W actors of 1 CPU on a
local Ray instance (tools/ray_batch.engine); noop-W = the same engine with `Blobs` for its actor, which returns
PAYLOAD random bytes per request at once (a 512² PNG is about that size), so its time per request is Ray's and
the driver's overhead alone. Reported: wall time (Ray start and model loads included), time to the
first result, steady throughput (the requests that arrive after the first result, over the time from it to
the last: results come in blocks of --batch), CPU seconds per request in that steady part for the renderers
(the actors, or the local process) and for the Ray driver (it receives and writes the files), mean request
seconds, and peak RSS of each process that renders (an actor's VmHWM from /proc; the local process's
ru_maxrss). CPU seconds are what the work costs whatever else runs on the machine; wall times are not, on a
shared machine (the load average is reported with each row).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PAYLOAD = 400 << 10        # bytes per request in the noop rows: about a 512x512 RGB PNG (400-600 KB)


class Actors:
    """The Ray Data actors of this run (process title "ray::MapWorker..."), sampled from /proc: each one's peak
    RSS (VmHWM) and CPU seconds (utime + stime). Actors alive before (a previous run's, still exiting) are left
    out; /proc is scanned only while fewer than `expected` actors are alive (at start, and after one died and Ray
    replaced it), so the sampling costs the driver next to nothing. A dead actor's numbers are kept."""

    def __init__(self, expected: int):
        self.expected, self.old, self.peak_kb, self.cpu_s, self.dead = expected, set(self._scan()), {}, {}, set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            self.sample()

    @staticmethod
    def _scan():
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::MapWorker"):
                    yield pid
            except OSError:
                continue

    def sample(self) -> float:
        """Update every actor's numbers; return their CPU seconds in all."""
        if len(self.cpu_s) - len(self.dead) < self.expected:
            for pid in set(self._scan()) - self.old:
                self.cpu_s.setdefault(pid, 0.0)
        for pid in set(self.cpu_s) - self.dead:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                self.dead.add(pid)
                continue
            hwm = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM"))
            self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), hwm)
            self.cpu_s[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        return sum(self.cpu_s.values())


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Blobs:
    """Stands in for ray_batch.Renderer: no model; each request's result is PAYLOAD random bytes at once."""

    def __init__(self, **_):
        self.payload = os.urandom(PAYLOAD)

    def __call__(self, rows):
        import pyarrow as pa

        lines = [int(line) for line in rows["line"]]
        record = json.dumps({"seeds": [0], "steps": 0, "seconds": 0.0, "worker": None, "error": None})
        return pa.table({"line": pa.array(lines, pa.int64()), "record": pa.array([record] * len(lines)),
                         "names": pa.array([[f"{line:06d}-0.png"] for line in lines], pa.list_(pa.string())),
                         "blobs": pa.array([[self.payload]] * len(lines), pa.list_(pa.large_binary()))})


def child(config: str, args) -> dict:
    from fastldm import api
    from fastldm.runtime.device import configure_process
    from fastldm.tools import batch, ray_batch

    model = args.model or api.default_model()
    if config == "local":
        configure_process(1)
        engine = batch.local(lambda: api.load(model), args.batch)
    else:
        engine = ray_batch.engine(model, {}, workers=int(config.split("-")[1]), cpus_per_worker=1, batch=args.batch,
                                  actor=Blobs if config.startswith("noop") else ray_batch.Renderer)
    defaults = {"steps": args.steps} | ({"width": args.size, "height": args.size} if args.size else {})
    actors = Actors(0 if config == "local" else int(config.split("-")[1]))
    actors.thread.start()
    arrivals, seconds, cpu = [], [], {}
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        with batch.Batch(args.prompts_file, Path(out), {"model": str(model)}, defaults) as job:
            for outcome in job.run(engine):
                arrivals.append(time.perf_counter() - t0)
                seconds.append(outcome.seconds)
                assert outcome.error is None, outcome.error
                cpu.setdefault("first", (actors.sample(), _own_cpu_s()))
                cpu["last"] = (actors.sample(), _own_cpu_s())
    actors.stop.set()
    first = sum(t <= arrivals[0] + 0.05 for t in arrivals)          # the first block's results
    after = len(arrivals) - first
    (actors_first, own_first), (actors_last, own_last) = cpu["first"], cpu["last"]
    renderer_cpu = own_last - own_first if config == "local" else actors_last - actors_first
    steady = after > 0          # None below: every result came in the first block
    return {"config": config, "requests": len(arrivals), "wall_s": arrivals[-1], "first_s": arrivals[0],
            "steady_req_per_s": after / (arrivals[-1] - arrivals[0]) if steady else None,
            "renderer_cpu_s_per_req": renderer_cpu / after if steady else None,   # after the first block
            "driver_cpu_s_per_req": (own_last - own_first) / after if steady and config != "local" else None,
            "renderer_cpu_s": actors_last if config != "local" else own_last,    # all of it, load included
            "mean_request_s": sum(seconds) / len(seconds),
            "actors_replaced": len(actors.dead),
            "peak_rss_mb": ([round(v / 1024) for v in actors.peak_kb.values()] if config != "local" else
                            [round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)]),
            "load_avg_1min": os.getloadavg()[0]}


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--noop-requests", type=int, default=500)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded model")
    ap.add_argument("--configs", default="local,ray-1,ray-2,noop-1,noop-2")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    shapes = [f"a {c} {s} on the {w}" for c in ("red", "green", "blue", "yellow") for s in ("cube", "sphere", "cylinder")
              for w in ("left", "right")]
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for kind, count in (("model", args.prompts), ("noop", args.noop_requests)):
            files[kind] = Path(tmp) / f"{kind}.txt"
            files[kind].write_text("".join(shapes[i % len(shapes)] + "\n" for i in range(count)))
        rows = []
        for config in args.configs.split(","):
            prompts = files["noop" if config.startswith("noop") else "model"]
            cmd = [sys.executable, __file__, "--child", config, "--prompts-file", str(prompts),
                   "--steps", str(args.steps), "--batch", str(args.batch)]
            cmd += (["--size", str(args.size)] if args.size else []) + (["--model", str(args.model)] if args.model else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.prompts} prompts ({args.noop_requests} for noop), {args.steps} steps, --batch {args.batch}, "
          f"model {args.model or 'embedded'}")
    print("| config | wall (s) | first result (s) | steady (req/s) | renderer CPU s/req | driver CPU s/req | "
          "mean request (s) | peak RSS per renderer (MB) | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        cells = [r["config"], f"{r['wall_s']:.1f}", f"{r['first_s']:.1f}", _num(r["steady_req_per_s"], 2),
                 _num(r["renderer_cpu_s_per_req"], 4), _num(r["driver_cpu_s_per_req"], 4), f"{r['mean_request_s']:.2f}",
                 ", ".join(map(str, r["peak_rss_mb"])), f"{r['load_avg_1min']:.1f}"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "argv": sys.argv[1:], "payload_bytes": PAYLOAD, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
