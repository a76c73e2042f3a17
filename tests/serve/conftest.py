"""Servers for the tests: in-process apps on one shared embedded pipeline (TestClient), and `fastldm serve` in a
subprocess on a free loopback port (for the real clients, disconnects and Ctrl-C)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

import fastldm
from fastldm.api import EMBEDDED_MODEL
from fastldm.serve import Settings, create_app

SRC = Path(fastldm.__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def embedded_pipe():
    return fastldm.load(EMBEDDED_MODEL, dtype="fp32")


@pytest.fixture
def make_client(embedded_pipe, one_thread):
    """make_client(**settings) -> a TestClient of a new app (lifespan run), sharing the loaded embedded model."""
    clients = []

    def load(path, **kw):
        return embedded_pipe if Path(path) == EMBEDDED_MODEL else fastldm.load(path, **kw)

    def make(**settings) -> TestClient:
        client = TestClient(create_app(Settings(**settings), load=load), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m fastldm.cli serve ARGS` on a free port; `stop()` sends Ctrl-C (SIGINT) and waits."""

    def __init__(self, *args: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "fastldm.cli", "serve", "--port", str(self.port),
                                          "--threads", "1", *args], stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def server_process(tmp_path: Path, *args: str):
    server = ServerProcess(*args, log=tmp_path / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def wait_until(condition, timeout: float = 60.0, every: float = 0.05):
    """Poll `condition()` until it returns something true; that value, or AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")
