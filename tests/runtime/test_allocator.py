"""Process allocator settings (runtime/device.py), each checked in a fresh interpreter: they change the process."""
from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or "glibc" not in " ".join(platform.libc_ver()),
                                reason="glibc's mallopt settings")

THREADS = textwrap.dedent("""
    import ctypes, sys, threading
    from fastldm.runtime.device import limit_arenas
    if len(sys.argv) > 1:
        assert limit_arenas(int(sys.argv[1]))
    together = threading.Barrier(6)
    def work():  # allocate while the other threads are alive, so no thread inherits another's arena
        blobs = [bytearray(100_000) for _ in range(5)]
        together.wait()
    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctypes.CDLL("libc.so.6").malloc_stats()  # to stderr: one "Arena i:" block per arena
""")


def arenas(*args: str) -> int:
    out = subprocess.run([sys.executable, "-c", THREADS, *args], capture_output=True, text=True, check=True)
    return sum(line.startswith("Arena ") for line in out.stderr.splitlines())


def test_limit_arenas_caps_the_arenas_of_concurrent_threads():
    assert arenas() >= 4   # glibc's default: an arena per concurrently allocating thread (up to 8 per core)
    assert arenas("2") == 2
