"""`fastldm serve`: an HTTP server for A1111 and OpenAI clients, an async jobs API and a web page, with
step-level batching of concurrent requests.

    settings.py    the flags, as one frozen Settings          catalog.py    listed models, by name only
    app.py         create_app(settings): routes, errors       scheduler.py  one worker thread per model, batching
    a1111.py       /sdapi/v1 (A1111)                          jobs.py       a job's state and events; kept jobs
    openai_api.py  /v1/images (OpenAI)                        waiting.py    wait for a job or the client leaving
    jobs_api.py    /fastldm/v1 (async jobs, SSE, files)       preview.py    latent -> RGB live previews
    security.py    the optional API key                       outputs.py    PNG/JPEG/WebP/depth encoding
    metrics.py     Prometheus metrics                         server.py     uvicorn, clean Ctrl-C

`fastldm serve --ray`: the same app in front of model workers in other processes, on Ray Serve:
    model_worker.py   a Scheduler behind picklable calls       remote_scheduler.py  the app's scheduler over them
    messages.py       what they say about a job                ray_app.py           the Serve deployments
    ray_server.py     join or start Ray, deploy, Ctrl-C
"""
from .app import create_app
from .settings import Settings

__all__ = ["create_app", "Settings"]
