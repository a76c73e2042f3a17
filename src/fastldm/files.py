"""Writing files so that a failure leaves nothing behind and a success leaves a normal file; where fastldm's
caches live.

`atomic_write(path, write)` has `write(tmp)` fill a temporary file in the destination folder, then renames it
into place (atomic on POSIX within one file system). The temporary file is created with mode 0666 filtered
by the process umask, as `open()` creates files, so the result has the user's normal permissions (typically
0644) — not the private 0600 of `tempfile.mkstemp`, which other tools (a web server, a viewer running as
another user) could not read.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write `path` through a temporary sibling: `write(tmp)` creates its content; then rename. Returns path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def cache_root() -> Path:
    """The folder of fastldm's on-disk caches (measured CPU defaults, model facts, built kernels, compiled
    graphs): $XDG_CACHE_HOME/fastldm, default ~/.cache/fastldm."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastldm"
