"""Running `fastldm serve --ray`: join a Ray cluster (or start a bounded local instance), deploy the Serve
application of ray_app.py with Serve's HTTP proxy on settings.host:port, print the URL, and on Ctrl-C (or
SIGTERM) take the application down and leave the cluster as it was found.

Without `--address` the local instance gets the CPUs the replicas reserve (replicas, or the autoscaling
maximum, times `cpus_per_replica`) and a small object store (tools/ray_batch.py). With `--address` the cluster
must have fastldm (and the models' files, at the same paths) on every node; Serve starts an HTTP proxy on each
node, listening on host:port.
"""
from __future__ import annotations

import logging
import signal
import threading
import webbrowser

from ..errors import BackendUnavailable, SettingError
from ..loading.load import read_config
from ..tools.ray_batch import INSTALL, connect
from .catalog import ModelCatalog
from .settings import Settings

APP = "fastldm"


def require_serve():
    """The `ray` module with Ray Serve, or BackendUnavailable saying how to install it."""
    try:
        import ray
        import ray.serve
    except ImportError:
        raise BackendUnavailable(INSTALL) from None
    return ray


def parse_autoscale(text: str) -> tuple[int, int]:
    """'1:4' -> (1, 4); SettingError otherwise."""
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise SettingError(f"{text!r} is not MIN:MAX replicas, e.g. 1:4") from None
    if not 0 <= lo <= hi or hi < 1:
        raise SettingError(f"{text!r}: replicas need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def serve_on_ray(settings: Settings, address: str | None = None, replicas: int = 1,
                 autoscale: tuple[int, int] | None = None, cpus_per_replica: float = 1,
                 gpus_per_replica: float = 0, log_level: str = "info", open_page: bool = False) -> None:
    """Deploy and block until Ctrl-C or SIGTERM (see the module docstring); `open_page` opens the page in the
    default web browser once the application is up."""
    ray = require_serve()
    from ray import serve

    from .ray_app import application

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(message)s")
    default = ModelCatalog(settings.model, settings.models_dir).default
    if address is None:   # the replicas will load it here: a bad model is one error now, not each replica's retries
        read_config(default.path)
    most = replicas if autoscale is None else autoscale[1]
    ours = connect(ray, address, most * cpus_per_replica, most * gpus_per_replica)
    stop = threading.Event()
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(settings, replicas, autoscale, cpus_per_replica, gpus_per_replica), name=APP,
                  route_prefix="/", blocking=False)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        url = f"http://{host}:{settings.port}"
        scale = f"{replicas}" if autoscale is None else f"{autoscale[0]} to {autoscale[1]}"
        print(f"fastldm serving {default.name} at {url}/ on Ray "
              f"Serve ({scale} model worker replicas of {cpus_per_replica:g} CPU)  (API docs: {url}/docs; Ctrl-C "
              "stops)", flush=True)
        if open_page:
            webbrowser.open(f"{url}/")
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        try:
            try:
                serve.get_app_handle(APP).close.remote().result(timeout_s=10)   # waiting clients: 503 now
            except Exception as e:   # not deployed (a failed start), or its ingress is gone: nothing to answer
                logging.getLogger("fastldm.serve").debug("closing the ingress: %s", e)
            serve.delete(APP)
            if ours:
                serve.shutdown()
        finally:
            if ours:
                ray.shutdown()
