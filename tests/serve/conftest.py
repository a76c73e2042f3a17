"""Servers for the tests: in-process apps on one shared embedded pipeline (TestClient), and `fastldm serve` in a
subprocess on a free loopback port (for the real clients, disconnects and Ctrl-C)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import fastldm
from fastldm import testing
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


def server_process(tmp_path: Path, *args: str):
    """`fastldm serve --threads 1 ARGS` in a subprocess (fastldm.testing.server_process), logging into tmp_path."""
    return testing.server_process(tmp_path / "server.log", "--threads", "1", *args)


def wait_until(condition, timeout: float = 60.0, every: float = 0.05):
    """Poll `condition()` until it returns something true; that value, or AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")
