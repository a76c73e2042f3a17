"""Bulk generation: a prompts file -> images (+ depth maps) and a manifest in one folder, resumable.

PROMPTS is a .txt file (one prompt a line) or a .jsonl file (one GenerationRequest a line, in its JSON form,
request.py: any field, an init image as base64). `defaults` (the command's options) fill the fields a line does
not give. A line with no seed (or -1) gets `seed + MAX_N·(L − 1)`, L its line number in the file: a rerun makes
the same image, and no two lines share an image's seed (a request has at most MAX_N images, seeds seed + i).
Blank lines are skipped; line numbers count them, so they stay the numbers an editor shows.

Output names come from the line number and image index: 000042-0.png (A1111 `parameters` chunk) and, for RGBD
models, 000042-0-depth.png. manifest.jsonl gets one JSON object per request as it ends: {"line", "status":
"done" | "failed", "request" (every field, seed fixed, an init image as its digest), "settings" (model, dtype,
quantization), "seeds", "files", "steps", "seconds" (from start to end of this request; requests in flight
together overlap), "worker", "error"}. The latest entry of a line is the one that counts.

Resume: a line is done when its latest entry is "done" for the same request and settings and all its files
exist; every other line is (re)done: never reached, failed, files missing, or changed since. Each file is
written atomically (files.atomic_write) before its entry is appended, so a killed run leaves at worst files
without an entry (redone and overwritten) and a torn last manifest line (ignored, and cut off by the next
run). One process writes a folder at a time (an exclusive lock on the manifest).

Execution is an `Engine`: items in, Outcomes (with the encoded files) out, in any order. `local` runs them in
this process through one BatchedRun (run.py: compatible requests share each UNet call, each leaves when its
steps are done); tools/ray_batch.py runs the same `render` in Ray Data actors. Either way this module's
`Batch` is the only writer of the folder.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from ..errors import FastLDMError, SettingError
from ..files import atomic_write_bytes
from ..images import depth_png_bytes, png_bytes
from ..plan import Limits
from ..request import GenerationRequest

MANIFEST = "manifest.jsonl"
MAX_N = Limits().max_n                      # images per request at most: the seed stride between lines
# atomic_write's temporary names for our files: .000042-0.png.0123456789ab.tmp
_TEMPORARY = re.compile(r"\.\d{6,}-\d+(-depth)?\.png\.[0-9a-f]{12}\.tmp")


@dataclass(frozen=True)
class Item:
    """One line of the prompts file: its request in JSON form (seed fixed), or why it is not one."""
    line: int
    request: dict[str, Any] | None = None
    error: str | None = None

    @property
    def key(self) -> dict[str, Any] | None:
        """The request as the manifest records it: an init image by its digest, not its bytes."""
        image = (self.request or {}).get("init_image")
        if image is None:
            return self.request
        return self.request | {"init_image": "sha256:" + hashlib.sha256(image.encode()).hexdigest()[:16]}


@dataclass
class Outcome:
    """How one item ended: its encoded files (name -> PNG bytes) and numbers, or its error (one line)."""
    line: int
    files: dict[str, bytes] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    steps: int | None = None
    seconds: float = 0.0
    worker: str | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        return "failed" if self.error is not None else "done"


Engine = Callable[[list[Item]], Iterator[Outcome]]


def read_prompts(path: Path, defaults: Mapping[str, Any] = {}, seed: int = 0) -> list[Item]:
    """The items of a .txt or .jsonl prompts file (see the module docstring); a bad line is an item with its
    error, so it is recorded and the rest go on."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".txt", ".jsonl"):
        raise SettingError(f"{path.name}: prompts must be a .txt file (one prompt a line) or a .jsonl file (one "
                           "request object a line)")
    items = []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if text.strip():
                items.append(_item(line, text, kind, defaults, seed))
    return items


def _item(line: int, text: str, kind: str, defaults: Mapping[str, Any], seed: int) -> Item:
    try:
        fields = {"prompt": text.strip()} if kind == ".txt" else json.loads(text)
        fields = {**defaults, **fields} if isinstance(fields, dict) else fields
        request = GenerationRequest.from_dict(fields)
    except json.JSONDecodeError as e:
        return Item(line, error=f"not JSON ({e})")
    except FastLDMError as e:
        return Item(line, error=_one_line(e))
    if request.seed in (None, -1):
        request.seed = seed + MAX_N * (line - 1)
    form = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
    return Item(line, form | {"init_image": fields.get("init_image")})  # the image as given, not re-encoded


def _one_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return text if isinstance(e, FastLDMError) else f"{type(e).__name__}: {text}"


def output_name(line: int, index: int, depth: bool = False) -> str:
    return f"{line:06d}-{index}{'-depth' if depth else ''}.png"


def render(pipe, items: Iterable[Item], batch: int = 8, worker: str | None = None) -> Iterator[Outcome]:
    """Generate `items` with `pipe` through one BatchedRun, at most `batch` images in flight (a larger request
    runs alone); yield each Outcome as its request ends. A request that fails (refused by its plan, or during
    the run) yields a failed Outcome and the others go on."""
    from ..api import parameters_text
    from ..run import BatchedRun

    run, started = BatchedRun(pipe), {}
    pending = iter(items)
    item = next(pending, None)
    while item is not None or run.jobs:
        while item is not None and (not run.jobs or sum(j.plan.n for j in run.jobs) + item.request["n"] <= batch):
            t0 = time.perf_counter()
            try:
                job = run.add(pipe.plan(GenerationRequest.from_dict(item.request)))
            except Exception as e:   # recorded in the manifest; the batch goes on
                job = None
                yield Outcome(item.line, seconds=time.perf_counter() - t0, worker=worker, error=_one_line(e))
            if job is not None and job.error is not None:
                yield Outcome(item.line, seconds=time.perf_counter() - t0, worker=worker, error=_one_line(job.error))
            elif job is not None:
                started[job] = (item, t0)
            item = next(pending, None)
        for job in run.step():
            done, t0 = started.pop(job)
            seconds = time.perf_counter() - t0
            if job.error is not None:
                yield Outcome(done.line, seconds=seconds, worker=worker, error=_one_line(job.error))
                continue
            result, files = job.result, {}
            for i, image in enumerate(result.images):
                files[output_name(done.line, i)] = png_bytes(image, parameters_text(pipe, result, i))
                if result.depths is not None:
                    files[output_name(done.line, i, depth=True)] = depth_png_bytes(result.depths[i])
            yield Outcome(done.line, files, list(result.seeds), result.steps, seconds, worker)


def local(load: Callable[[], Any], batch: int = 8) -> Engine:
    """The one-process engine: `load()` the model once there is work, then `render`."""
    def engine(items: list[Item]) -> Iterator[Outcome]:
        if items:
            yield from render(load(), items, batch)
    return engine


def read_manifest(path: Path) -> dict[int, dict]:
    """The latest entry of each line. A line that is not JSON (a torn last line of a killed run) is ignored:
    its request is simply redone."""
    entries = {}
    if path.exists():
        for text in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(text)
                entries[int(entry["line"])] = entry
            except (ValueError, KeyError, TypeError):
                continue
    return entries


@dataclass
class Summary:
    done: int = 0          # this run
    failed: int = 0        # this run
    skipped: int = 0       # already done by an earlier run
    images: int = 0        # written by this run
    seconds: float = 0.0   # this run's wall time


class Batch:
    """One batch: the prompts file's items, the output folder and its manifest. Use as a context manager (it
    holds the folder's lock); `todo` is what is not done yet, `run(engine)` does it and records each outcome."""

    def __init__(self, prompts: Path, out: Path, settings: Mapping[str, Any], defaults: Mapping[str, Any] = {},
                 seed: int = 0):
        self.prompts, self.out, self.settings = Path(prompts), Path(out), dict(settings)
        self.defaults, self.seed = dict(defaults), seed
        self.items: list[Item] = []
        self.todo: list[Item] = []
        self.entries: dict[int, dict] = {}
        self.summary = Summary()
        self._manifest = None

    def __enter__(self) -> "Batch":
        self.items = read_prompts(self.prompts, self.defaults, self.seed)
        self.out.mkdir(parents=True, exist_ok=True)
        self._manifest = open(self.out / MANIFEST, "ab+")   # created like any file: 0666 less the umask
        try:
            fcntl.flock(self._manifest, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._cut_torn_line()
            for tmp in self.out.iterdir():  # a killed run's temporary files (ours, by name); the lock says it is gone
                if _TEMPORARY.fullmatch(tmp.name):
                    tmp.unlink(missing_ok=True)
        except BlockingIOError:
            self._manifest.close()
            raise BlockingIOError(f"{self.out} is in use by another fastldm batch (its manifest is locked)") from None
        except BaseException:
            self._manifest.close()
            raise
        self.entries = read_manifest(self.out / MANIFEST)
        self.todo = [item for item in self.items if not self.done(item)]
        self.summary.skipped = len(self.items) - len(self.todo)
        return self

    def __exit__(self, *exc) -> None:
        self._manifest.close()        # releases the lock

    def _cut_torn_line(self) -> None:
        """A killed run can leave a last line without its newline: cut it, so the next entry starts a line."""
        self._manifest.seek(0)
        data = self._manifest.read()
        if data and not data.endswith(b"\n"):
            self._manifest.truncate(data.rfind(b"\n") + 1)

    def done(self, item: Item) -> bool:
        entry = self.entries.get(item.line)
        return (entry is not None and entry.get("status") == "done" and entry.get("request") == item.key
                and entry.get("settings") == self.settings
                and all((self.out / name).is_file() for name in entry.get("files", ())))

    def run(self, engine: Engine) -> Iterator[Outcome]:
        """Do `todo` with `engine`, recording each outcome as it comes (a bad line at once, as failed); yields
        them, for a progress display."""
        t0 = time.perf_counter()
        by_line = {item.line: item for item in self.todo}
        for item in self.todo:
            if item.error is not None:
                yield self.record(item, Outcome(item.line, error=item.error))
        for outcome in engine([item for item in self.todo if item.error is None]):
            yield self.record(by_line[outcome.line], outcome)
        self.summary.seconds = time.perf_counter() - t0

    def record(self, item: Item, outcome: Outcome) -> Outcome:
        """Write the outcome's files (atomically), drop files of the line's previous "done" entry that this one
        does not make, then append its manifest entry."""
        for name, data in outcome.files.items():
            atomic_write_bytes(self.out / name, data)
        previous = self.entries.get(item.line, {})
        if outcome.status == "done" and previous.get("status") == "done":
            for name in set(previous.get("files", ())) - set(outcome.files):
                (self.out / name).unlink(missing_ok=True)
        entry = {"line": item.line, "status": outcome.status, "request": item.key, "settings": self.settings,
                 "seeds": outcome.seeds, "files": list(outcome.files), "steps": outcome.steps,
                 "seconds": round(outcome.seconds, 3), "worker": outcome.worker, "error": outcome.error}
        self._manifest.write((json.dumps(entry) + "\n").encode())
        self._manifest.flush()
        self.entries[item.line] = entry
        if outcome.status == "done":
            self.summary.done += 1
            self.summary.images += len(outcome.seeds)
        else:
            self.summary.failed += 1
        return outcome
