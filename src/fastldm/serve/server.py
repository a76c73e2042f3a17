"""Running the app under uvicorn, as `fastldm serve` does: the process settings once (configure_process), the
URL printed at startup, and a clean Ctrl-C.

uvicorn's graceful shutdown stops accepting connections and then waits for the requests in flight, and only then
runs the app's shutdown; a client waiting for a long job would hold the server up. So the first Ctrl-C (or
SIGTERM) first shuts the scheduler: no job is admitted any more, queued and running jobs end as cancelled and
their waiting clients are answered at once (503, "the server is shutting down"), event streams end; then uvicorn
finishes those responses and exits. A running UNet step cannot be interrupted: it gets STEP_GRACE_S to end, and
past that the process exits without it (exit code 0), so nothing hangs.
"""
from __future__ import annotations

import logging
import os
import sys
import webbrowser

import uvicorn

from ..runtime.device import SERVER_ARENAS, configure_process
from .app import create_app
from .settings import Settings

STEP_GRACE_S = 10.0   # after Ctrl-C, how long a running denoising step may take to finish


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit, banner: str, open_url: str | None):
        super().__init__(config)
        self._on_exit, self._banner, self._open_url = on_exit, banner, open_url

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)   # the app's startup (the default model is loaded), then the socket
        if self.started:
            print(self._banner, flush=True)
            if self._open_url:
                webbrowser.open(self._open_url)

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self._on_exit()
        super().handle_exit(sig, frame)


def serve(settings: Settings, log_level: str = "info", open_page: bool = False) -> None:
    """Configure this process, start the server on settings.host:port and block until Ctrl-C; `open_page` opens
    the page in the default web browser once the server is up."""
    # A memory plan wants freed pages returned: glibc's default (not the tuned allocator, which keeps its peak).
    configure_process(settings.threads, allocator=settings.memory in (None, "fast", "balanced")
                      and settings.memory_budget is None, arenas=SERVER_ARENAS)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(message)s")
    app = create_app(settings)
    scheduler = app.state.fastldm.scheduler
    scheduler.load(None)   # the default model now: a bad one is a one-line error, not a traceback
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=5, access_log=False)
    url = f"http://{'[' + settings.host + ']' if ':' in settings.host else settings.host}:{settings.port}"
    banner = (f"fastldm serving {app.state.fastldm.catalog.default.name} at {url}/  (API docs: {url}/docs; "
              "Ctrl-C stops)")
    try:
        _Server(config, lambda: scheduler.close(wait_s=0.0), banner, f"{url}/" if open_page else None).run()
    except KeyboardInterrupt:   # uvicorn re-raises the Ctrl-C it handled once it has shut down
        pass
    if not scheduler.join(STEP_GRACE_S):
        # A worker is still inside a UNet call (its jobs are already answered as cancelled). Letting the
        # interpreter finalise under a running torch op aborts the process ("terminate called without an
        # active exception", exit 134); end it here instead, as the server's own program.
        logging.getLogger("fastldm.serve").warning("stopped during a denoising step; its jobs were cancelled")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
