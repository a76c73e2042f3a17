"""`fastldm` command line: a thin shell over the Python API (no logic of its own).

Errors a user can fix (fastldm.errors) are printed as one line, with the flag to change where there is one,
and exit with the error's code (see `fastldm --help`); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import click

from .errors import FastLDMError, MemoryBudgetError, RequestError, StepPredictorMissing
from .runtime.early_stop import DEFAULT_THRESHOLD

EXIT_CODES = """Exit codes: 0 done; 1 error; 2 bad usage or setting; 3 model file; 4 bad request (size, steps,
sampler, ...); 5 backend or device unavailable; 6 no step predictor; 7 out of memory; 8 file system; 130
interrupted."""
EXIT_FILE_SYSTEM = 8
# The option that sets each GenerationRequest field, for the hint after a RequestError.
_FLAG = {"prompt": "PROMPT", "negative_prompt": "--negative", "steps": "--steps", "sampler": "--sampler",
         "scheduler": "--schedule", "guidance": "--guidance", "seed": "--seed", "width": "--size",
         "height": "--size", "n": "-n", "init_image": "--init-image", "strength": "--strength",
         "early_stop": "--early-stop", "cache_interval": "--cache-interval"}


class UserError(click.ClickException):
    """A one-line error with its own exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _hint(e: Exception) -> str:
    if isinstance(e, RequestError) and e.field in _FLAG:
        return f" [{_FLAG[e.field]}]"
    if isinstance(e, StepPredictorMissing):
        return " [--steps N, or make one with `fastldm steps label` and `fastldm steps train`]"
    if isinstance(e, MemoryBudgetError):
        return " [--size, -n]"
    return ""


def user_errors(command):
    """Report fastldm's user-fixable errors and file-system errors as one line each, with their exit codes."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FastLDMError as e:
            raise UserError(_one_line(e) + _hint(e), e.exit_code) from None
        except OSError as e:
            raise UserError(_one_line(e), EXIT_FILE_SYSTEM) from None
    return wrapper


def _one_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _fail(e: Exception) -> None:
    raise click.ClickException(_one_line(e))


class _Steps(click.ParamType):
    """A positive step count, or "auto" (the model's step predictor)."""
    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        if str(value).isdigit() and 1 <= int(value) <= 1000:
            return int(value)
        self.fail(f"{value!r} is not a positive number of steps or 'auto'", param, ctx)


def _progress(bar):
    """A sampler callback that advances `bar`; its length becomes the steps the sampler runs ("auto", img2img)."""
    def update(info: dict) -> None:
        bar.length = info["total"]
        bar.update(1)
    return update


def _size(value: str | None) -> tuple[int | None, int | None]:
    if value is None:
        return None, None
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
    return w, h


@click.group(epilog=EXIT_CODES)
@click.version_option(package_name="fastldm")
def main() -> None:
    """fastldm: fast latent diffusion (Stable Diffusion 1.x/2.x/XL, LDM3D) on CPU and GPU.

    Commands that run a model own their process: they set torch's CPU threads (--threads), keep freed memory
    for reuse (glibc malloc settings) and keep compiled graphs under ~/.cache/fastldm/inductor, once, at start
    (fastldm.runtime.device.configure_process). The Python API changes none of these."""


THREADS_HELP = ("CPU threads for this process (default: torch's, capped at the CPUs available); set once at start "
                "with the allocator and compile-cache settings (see `fastldm --help`)")


MEMORY_HELP = ("balanced (default: today's speed; the VAE is tiled only for an image that would not fit), fast, or "
               "low (the least memory: components loaded per stage, 16-bit weights, sequential CFG, tiled VAE)")
BUDGET_HELP = ("the most memory a generation may use above the process's start, e.g. 3GB (powers of 1024): the "
               "fastest plan predicted to fit is chosen, a request that cannot fit is refused before it starts "
               "(`fastldm info --memory-budget` shows the plan)")


def _tuned_allocator(memory: str | None, budget: str | None) -> bool:
    """Tune glibc to keep freed memory (the speed setting) unless a memory plan wants freed pages returned."""
    return memory in (None, "fast", "balanced") and budget is None


MODEL_HELP = "diffusers folder or .safetensors file (default: the embedded tiny RGBD model)"
DTYPE_HELP = ("default: fp16 on CUDA; on a CPU bf16 or fp32 as measured once per machine and model "
              "(`fastldm info --runtime` says which)")


def _request_options(defaults: bool):
    """The options that set GenerationRequest fields (all but the prompt, seed and init image): `generate`'s with
    the request's defaults; `batch`'s unset unless given (a prompts line's own fields win over them)."""
    def d(value):
        return value if defaults else None

    options = [
        click.option("--negative", default=d(""), help="negative prompt"),
        click.option("--steps", default=d(20), show_default=defaults, type=_Steps(),
                     help="denoising steps, or 'auto': the model's step predictor picks them for this prompt"),
        click.option("--sampler", default=d("DPM++ 2M"), show_default=defaults, help="see `fastldm samplers`"),
        click.option("--schedule", "scheduler", default=None, help="sigma schedule: karras, exponential, normal, ..."),
        click.option("--guidance", "--cfg", default=None, type=float,
                     help="classifier-free guidance scale (default: the model's, 7.5 for Stable Diffusion)"),
        click.option("--size", default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the model's)"),
        click.option("-n", "n", default=d(1), show_default=defaults, type=click.IntRange(1, 64), help="images"),
        click.option("--strength", default=d(0.75), show_default=defaults, type=float,
                     help="img2img denoising strength"),
        click.option("--early-stop", is_flag=False, flag_value=DEFAULT_THRESHOLD, default=None, type=float,
                     metavar="[THRESHOLD]", help="stop once a step changes the clean-image estimate by less than "
                     f"THRESHOLD (relative; {DEFAULT_THRESHOLD:g} when given without a value)"),
        click.option("--cache-interval", default=d(1), show_default=defaults, type=click.IntRange(1, 100),
                     help="DeepCache: run the full UNet every N calls, only its shallow path in between"),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


@main.command()
@click.argument("prompt")
@click.option("--model", "-m", type=click.Path(path_type=Path), help=MODEL_HELP)
@_request_options(defaults=True)
@click.option("--seed", default=None, type=int, help="random if not given; image i uses seed + i")
@click.option("--init-image", type=click.Path(path_type=Path), help="img2img source image")
@click.option("--out", default="outputs", show_default=True, type=click.Path(path_type=Path))
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default=None, type=click.Choice(["fp32", "fp16", "bf16"]), help=DTYPE_HELP)
@click.option("--compile/--no-compile", "compile_unet", default=None,
              help="torch.compile the UNet (default: off); compiled graphs are cached in ~/.cache/fastldm/inductor")
@click.option("--quant", default=None, type=click.Choice(["int8"]), help="int8 weights and activations in the "
              "UNet (CPU)")
@click.option("--memory", "memory", default=None, type=click.Choice(["fast", "balanced", "low"]), help=MEMORY_HELP)
@click.option("--memory-budget", default=None, help=BUDGET_HELP)
@click.option("--threads", default=None, type=click.IntRange(1, 4096), help=THREADS_HELP)
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="capture the UNet step as a CUDA graph per shape and replay it (default: on with --device cuda, "
              "unless compiled or the memory plan stages the UNet)")
@click.option("--allow-pickle", is_flag=True, help="allow loading .ckpt/.bin pickle files (trusted files only)")
@click.option("--export", "exports", multiple=True, type=click.Choice(["glb", "ply", "obj"]),
              help="RGBD models: also write each image and its depth as a 3-D file beside its PNG (same name): glb "
              "textured mesh, ply coloured point cloud, obj mesh + .mtl + texture; repeat for several")
@user_errors
def generate(prompt, model, negative, steps, sampler, scheduler, guidance, seed, size, n, init_image, strength,
             early_stop, cache_interval, out, device, dtype, compile_unet, quant, memory, memory_budget, threads,
             cuda_graphs, allow_pickle, exports) -> None:
    """Generate images from PROMPT and write them as PNGs (with A1111 parameters) to --out."""
    from . import api
    from .request import GenerationRequest
    from .run import run
    from .runtime.device import configure_process

    width, height = _size(size)
    configure_process(threads, allocator=_tuned_allocator(memory, memory_budget))
    init = api.open_image(init_image) if init_image is not None else None
    pipe = api.load(model or api.default_model(), device=device, dtype=dtype, allow_pickle=allow_pickle,
                    compile=compile_unet, quant=quant, cuda_graphs=cuda_graphs, memory=memory,
                    memory_budget=memory_budget)
    req = GenerationRequest(prompt=prompt, negative_prompt=negative, steps=steps, sampler=sampler,
                            scheduler=scheduler, guidance=guidance, seed=seed, width=width, height=height,
                            n=n, init_image=init, strength=strength, early_stop=early_stop,
                            cache_interval=cache_interval)
    plan = pipe.plan(req)   # every field checked before any work
    if compile_unet:  # compile (or load from the cache) on a one-step run, and say how long it took
        from .runtime.compile import timed_first_call

        click.echo(str(timed_first_call(pipe.generate, dataclasses.replace(plan.request, steps=1))), err=True)
    with click.progressbar(length=plan.denoising_steps, label="denoising", file=sys.stderr) as bar:
        result = run(pipe, [plan], [_progress(bar)])[0]
    paths = api.save_result(pipe, result, out)
    if exports and result.depths is None:
        click.echo("no 3-D export: this model makes images without depth (3-D export needs an RGBD model)", err=True)
    elif exports:
        from .tools.export3d import export_beside

        paths += export_beside(result, paths, exports)
    for p in paths:
        click.echo(p)


@main.command()
@click.argument("prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="output folder (default: outputs/<PROMPTS name>); running again resumes it")
@click.option("--model", "-m", type=click.Path(path_type=Path), help=MODEL_HELP)
@_request_options(defaults=False)
@click.option("--seed", default=0, show_default=True, type=int,
              help="base seed: a line without its own seed gets SEED + 64 x (line number - 1)")
@click.option("--batch", "in_flight", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="images in flight per worker; compatible requests share each UNet call")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default=None, type=click.Choice(["fp32", "fp16", "bf16"]), help=DTYPE_HELP)
@click.option("--quant", default=None, type=click.Choice(["int8"]), help="int8 weights and activations in the "
              "UNet (CPU)")
@click.option("--memory", "memory", default=None, type=click.Choice(["fast", "balanced", "low"]), help=MEMORY_HELP)
@click.option("--memory-budget", default=None, help=BUDGET_HELP)
@click.option("--threads", default=None, type=click.IntRange(1, 4096), help=THREADS_HELP + " (without --ray)")
@click.option("--ray", "use_ray", is_flag=True, help='run on Ray: a Ray Data actor pool, one model per actor '
              '(pip install "fastldm[ray]")')
@click.option("--address", default=None, help="with --ray: the cluster to join, auto or HOST:PORT (default: start "
              "a local Ray instance of --workers x --cpus-per-worker CPUs)")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 100000), help="with --ray: actors")
@click.option("--cpus-per-worker", default=1, show_default=True, type=click.IntRange(1, 4096),
              help="with --ray: CPUs each actor reserves (and its torch threads)")
@click.option("--gpus-per-worker", default=0.0, type=click.FloatRange(0, 64), help="with --ray: GPUs each actor "
              "reserves (use with --device cuda)")
@user_errors
def batch(prompts, out, model, negative, steps, sampler, scheduler, guidance, size, n, strength, early_stop,
          cache_interval, seed, in_flight, device, dtype, quant, memory, memory_budget, threads, use_ray, address,
          workers, cpus_per_worker, gpus_per_worker) -> None:
    """Generate every request of PROMPTS into --out, with a manifest.jsonl; running it again skips what is done.

    PROMPTS is a .txt file (a prompt a line) or a .jsonl file (a request object a line, any field of
    fastldm.GenerationRequest, e.g. {"prompt": "a red cube", "steps": 30, "seed": 7}). The generation options
    are defaults that a line's own fields override. A bad line or a failed request is recorded in the manifest
    and the rest go on; the command then exits with 1."""
    from . import api
    from .tools import batch as bulk

    if address is not None and not use_ray:
        raise click.UsageError("--address needs --ray")
    width, height = _size(size)
    given = dict(negative_prompt=negative, steps=steps, sampler=sampler, scheduler=scheduler, guidance=guidance,
                 width=width, height=height, n=n, strength=strength, early_stop=early_stop,
                 cache_interval=cache_interval)
    model = model.resolve() if model is not None else api.default_model()
    load_options = dict(device=device, dtype=dtype, quant=quant,
                        **{k: v for k, v in (("memory", memory), ("memory_budget", memory_budget)) if v is not None})
    if use_ray:
        from .tools import ray_batch

        engine = ray_batch.engine(model, load_options, workers=workers, cpus_per_worker=cpus_per_worker,
                                  gpus_per_worker=gpus_per_worker, batch=in_flight, address=address)
    else:
        from .runtime.device import configure_process

        configure_process(threads, allocator=_tuned_allocator(memory, memory_budget))
        engine = bulk.local(functools.partial(api.load, model, **load_options), in_flight)
    out = out or Path("outputs") / prompts.stem
    settings = {"model": str(model), "dtype": dtype, "quant": quant}
    with bulk.Batch(prompts, out, settings, {k: v for k, v in given.items() if v is not None}, seed) as job:
        with click.progressbar(length=len(job.todo), label="generating", show_pos=True, file=sys.stderr) as bar:
            for _ in job.run(engine):
                bar.update(1)
    s = job.summary
    click.echo(f"{out}: {s.done} done, {s.failed} failed, {s.skipped} already done; {s.images} images in "
               f"{s.seconds:.1f} s; manifest {out / bulk.MANIFEST}")
    if s.failed:
        raise UserError(f"{s.failed} of {s.done + s.failed} requests failed; their errors are in "
                        f"{out / bulk.MANIFEST}", 1)


@main.command()
@click.option("--model", "-m", type=click.Path(path_type=Path), help="the model served by default: a diffusers "
              "folder or .safetensors file (default: the embedded tiny RGBD model, which is always listed)")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path),
              help="also list the diffusers folders and .safetensors files in this folder, by name")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="FASTLDM_API_KEY", help="require this key: `Authorization: Bearer KEY`, or HTTP "
              "Basic with KEY as password (or KEY = user:password) [env FASTLDM_API_KEY]")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="allow browser pages from this origin (repeat for several), e.g. http://localhost:3000")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1, 100000),
              help="jobs waiting to start; one more is answered 429 with Retry-After")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="images denoised together per model (1: one request at a time, as A1111)")
@click.option("--max-size", default="1024x1024", show_default=True, help="largest WIDTHxHEIGHT a request may ask for")
@click.option("--max-steps", default=150, show_default=True, type=click.IntRange(1, 1000))
@click.option("--max-n", default=8, show_default=True, type=click.IntRange(1, 64), help="images per request")
@click.option("--max-prompt-chars", default=4000, show_default=True, type=click.IntRange(1, 1000000))
@click.option("--max-body", default="32M", show_default=True, help="largest request body (base64 images)")
@click.option("--model-memory", default=None, help="weights of loaded models, all together, e.g. 16G; the least "
              "recently used idle model is unloaded to make room (default: half the RAM, or of the GPU's memory)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default=None, type=click.Choice(["fp32", "fp16", "bf16"]), help=DTYPE_HELP)
@click.option("--threads", default=None, type=click.IntRange(1, 4096), help=THREADS_HELP + " (with --ray, each "
              "model worker runs --cpus-per-replica threads)")
@click.option("--memory", "memory", default=None, type=click.Choice(["fast", "balanced", "low"]), help=MEMORY_HELP)
@click.option("--memory-budget", default=None, help=BUDGET_HELP)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--open", "open_page", is_flag=True, help="open the page in the web browser once the server is up")
@click.option("--ray", "use_ray", is_flag=True, help='serve on Ray Serve: this app as the ingress, the models in a '
              'ModelWorker deployment of its own (pip install "fastldm[ray]")')
@click.option("--address", default=None, help="with --ray: the cluster to join, auto or HOST:PORT (default: start "
              "a local Ray instance of the replicas' CPUs)")
@click.option("--replicas", default=None, type=click.IntRange(1, 10000), help="with --ray: model worker replicas "
              "[default: 1]")
@click.option("--autoscale", default=None, metavar="MIN:MAX", help="with --ray: autoscale the model workers "
              "between MIN and MAX replicas, aiming at --max-batch jobs in flight per replica")
@click.option("--cpus-per-replica", default=1.0, show_default=True, type=click.FloatRange(0.1, 4096),
              help="with --ray: CPUs each model worker reserves (and its torch threads)")
@click.option("--gpus-per-replica", default=0.0, type=click.FloatRange(0, 64), help="with --ray: GPUs each model "
              "worker reserves (use with --device cuda)")
@user_errors
def serve(model, models_dir, host, port, api_key, cors_origins, max_queue, max_batch, max_size, max_steps, max_n,
          max_prompt_chars, max_body, model_memory, device, dtype, threads, memory, memory_budget, log_level, open_page,
          use_ray, address, replicas, autoscale, cpus_per_replica, gpus_per_replica) -> None:
    """Serve models over HTTP: A1111 (/sdapi/v1) and OpenAI (/v1/images) APIs, async jobs (/fastldm/v1), and a
    page at / ; concurrent requests are batched step by step. With --ray, on Ray Serve (same routes)."""
    from .serve.settings import Settings, parse_bytes, parse_size

    ray_only = {"--address": address, "--replicas": replicas, "--autoscale": autoscale}
    if not use_ray and any(v is not None for v in ray_only.values()):
        raise click.UsageError(f"{next(k for k, v in ray_only.items() if v is not None)} needs --ray")
    if replicas is not None and autoscale is not None:
        raise click.UsageError("--replicas and --autoscale exclude each other")
    width, height = parse_size(max_size)
    settings = Settings(model=model, models_dir=models_dir, host=host, port=port, api_key=api_key,
                        cors_origins=tuple(cors_origins), max_queue=max_queue, max_batch=max_batch, max_width=width,
                        max_height=height, max_steps=max_steps, max_n=max_n, max_prompt_chars=max_prompt_chars,
                        max_body_bytes=parse_bytes(max_body),
                        model_memory=None if model_memory is None else parse_bytes(model_memory),
                        device=device, dtype=dtype, threads=threads, memory=memory,
                        memory_budget=None if memory_budget is None else parse_bytes(memory_budget))
    if use_ray:
        from .serve.ray_server import parse_autoscale, serve_on_ray

        serve_on_ray(settings, address, replicas or 1, None if autoscale is None else parse_autoscale(autoscale),
                     cpus_per_replica, gpus_per_replica, log_level, open_page)
        return
    from .serve.server import serve as run_server

    run_server(settings, log_level=log_level, open_page=open_page)


@main.group()
def steps() -> None:
    """Step prediction: label prompts with the steps they need, train the predictor behind --steps auto."""


def _grid(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        grid = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of step counts, e.g. 4,8,12,20") from None
    if list(grid) != sorted(set(grid)) or grid[0] < 1:
        raise click.BadParameter(f"{value!r}: give increasing positive step counts")
    return grid


@steps.command("label")
@click.option("--model", "-m", type=click.Path(path_type=Path), help="default: the embedded model")
@click.option("--prompts", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="text file, one prompt per line")
@click.option("--sampler", default="DPM++ 2M", show_default=True)
@click.option("--schedule", "scheduler", default=None)
@click.option("--guidance", "--cfg", default=None, type=float,
              help="classifier-free guidance scale (default: the model's, 7.5 for Stable Diffusion)")
@click.option("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
@click.option("--grid", default=None, help="step counts to render, comma-separated, increasing "
              "(default: fastldm.tools.steps.labels.STEP_GRID, 1-12, 14, 16, 20, 30)")
@click.option("--tau", default=None, type=float,
              help="SSIM threshold of a label (default: fastldm.tools.steps.labels.DEFAULT_TAU)")
@click.option("--seed", default=0, show_default=True, type=int, help="prompt i uses seed + i")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("--judge", type=click.Choice(["shapes"]),
              help="record ShapesWorld's evaluator per image: quality labels (without: SSIM labels)")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="label table (JSON); an existing one for the same prompts is resumed")
@click.option("--device", default="cpu", show_default=True)
def steps_label(model, prompts, sampler, scheduler, guidance, size, grid, tau, seed, batch, judge, out,
                device) -> None:
    """Generate each prompt at every count of the grid and label it: with a judge, the fewest steps from which its
    image is judged right (quality); without, the fewest within SSIM TAU of the most steps."""
    from . import api
    from .tools.steps.labels import NEVER, STEP_GRID, LabelTable, build_label_table, shapes_judge

    width, height = _size(size)
    lines = [p.strip() for p in prompts.read_text(encoding="utf-8").splitlines() if p.strip()]
    try:
        pipe = api.load(model or api.default_model(), device=device)
        table = LabelTable.load(out) if out.exists() else None
        with click.progressbar(length=len(lines), label="labelling", file=sys.stderr) as bar:
            def saved(t):
                t.save(out)
                bar.update(len(t.prompts) - bar.pos)
            table = build_label_table(pipe, lines, sampler, scheduler=scheduler, guidance=guidance, width=width,
                                      height=height, steps=_grid(grid) or STEP_GRID, tau=tau, seed=seed, batch=batch,
                                      table=table, on_batch=saved, judge=shapes_judge if judge == "shapes" else None)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        _fail(e)
    labels = table.labels()
    some = labels[labels != NEVER] if table.kind == "quality" else labels
    click.echo(f"{out}: {len(labels)} prompts, {table.kind} labels, mean {some.mean() if some.size else 0:.1f} steps"
               + (f" (tau {table.tau:g})" if table.kind == "ssim" else f", {len(labels) - some.size} never right"))


@steps.command("train")
@click.option("--model", "-m", type=click.Path(path_type=Path), help="default: the embedded model")
@click.option("--labels", "tables", required=True, multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="label table(s), one per sampler")
@click.option("--eval-labels", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="held-out label table(s), same samplers as --labels: the error, and with a judge's verdicts "
                   "whether the predictor beats the best fixed count (else the constant is saved)")
@click.option("--kind", type=click.Choice(["quality", "ssim"]), default=None,
              help="labels to learn (default: quality when the table has a judge's verdicts, else ssim)")
@click.option("--tau", default=None, type=float, help="SSIM threshold (default: the table's)")
@click.option("--cost", default=None, type=click.FloatRange(0.0, 1.0),
              help="accuracy one more step must buy (default: cross-validated with quality labels, else 0.01)")
@click.option("--holdout", default=0.2, show_default=True, type=click.FloatRange(0.0, 0.9),
              help="fraction of prompts held out to report the error when no --eval-labels")
@click.option("--out", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="folder for the predictors (default: the model's step_predictor/)")
def steps_train(model, tables, eval_labels, kind, tau, cost, holdout, out) -> None:
    """Train the --steps auto predictor from label tables and save it next to the model."""
    from . import api
    from .tools.steps.labels import LabelTable
    from .runtime.step_predictor import predictor_path
    from .tools.steps.train import train_from_table

    try:
        source = Path(model or api.default_model())
        pipe = api.load(source)
        evals = {t.sampler: t for t in map(LabelTable.load, eval_labels)}
        for path in tables:
            table = LabelTable.load(path)
            predictor, report = train_from_table(pipe, table, kind=kind, tau=tau, cost=cost, holdout=holdout,
                                                 eval_table=evals.get(table.sampler))
            dest = (out / f"{table.sampler}.safetensors" if out else predictor_path(source, table.sampler))
            predictor.save(dest, **report)
            e = report.get("eval")
            click.echo(f"{dest}: {table.sampler}, {report['kind']} labels, {report['train']} prompts"
                       + (f"; held-out ({e['n']}): mean |error| {e['mae_steps']:.2f} steps, under by >1 bucket "
                          f"{100 * e['under_gt_1_bucket']:.1f}%, mean {e['mean_predicted']:.1f} vs label "
                          f"{e['mean_label']:.1f} steps" if e else ""))
            if e and "predictor" in e:
                p, c = e["predictor"], e["constant"]
                needed = p["fixed_steps_same_accuracy"]
                click.echo(f"  predictor {p['mean_steps']:.1f} steps at {100 * p['accuracy']:.1f}% (fixed steps for "
                           f"that: {'none' if needed is None else f'{needed:.1f}'}); constant {report['constant']} at "
                           f"{100 * c['accuracy']:.1f}%; fixed 20 {100 * p['accuracy_fixed_reference']:.1f}% -> saved "
                           + ("the predictor" if p["beats_fixed"] else f"the constant {report['constant']}"))
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        _fail(e)


@main.command()
def samplers() -> None:
    """List the samplers and the names they accept."""
    from .samplers import list_samplers, list_schedulers

    click.echo(f"{'A1111 label':<22}{'name':<22}aliases")
    for s in list_samplers():
        click.echo(f"{s.label:<22}{s.name:<22}{', '.join(s.aliases)}")
    click.echo(f"\nschedules (--schedule): {', '.join(list_schedulers())}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--allow-pickle", is_flag=True)
@click.option("--runtime", is_flag=True, help="also what runs it on this CPU: the dtype and attention kernel "
              "measured for this model (measured now if not cached), int8, threads")
@click.option("--threads", default=None, type=click.IntRange(1, 4096), help=THREADS_HELP)
@click.option("--memory", "memory", default=None, type=click.Choice(["fast", "balanced", "low"]), help=MEMORY_HELP)
@click.option("--memory-budget", default=None, help=BUDGET_HELP)
@click.option("--quant", default=None, type=click.Choice(["int8"]), help="plan for int8 UNet weights")
@user_errors
def info(path, allow_pickle, runtime, threads, memory, memory_budget, quant) -> None:
    """Print a checkpoint's family, components, parameter counts, dtype and prediction type, and the memory plan
    `fastldm.load` would make for it (with --memory / --memory-budget: for those)."""
    from .inspect import describe
    from .loading.load import read_config

    import torch

    from .runtime import tuning
    from .runtime.device import configure_process, default_dtype
    from .runtime.memory_plan import MemoryPlanner
    from .runtime.optimize import winograd_wanted

    click.echo(describe(path, allow_pickle=allow_pickle))
    config = read_config(path)
    if runtime:
        configure_process(threads)
    # The plan as `fastldm.load` makes it: with the dtype and Winograd levels this CPU's tuning chose (measured now
    # with --runtime, else as measured at an earlier load, else the defaults without measuring).
    choice = None if config is None else tuning.choose(config) if runtime else tuning.cached(config)
    if config is not None:
        cpu = torch.device("cpu")
        compute = default_dtype(cpu, config) if choice is None else choice.torch_dtype
        wino = 0 if choice is None else winograd_wanted(choice.packed_kinds, cpu, compute,
                                                        len(config.unet.block_out_channels))
        click.echo(MemoryPlanner(config, memory, memory_budget, compute=compute, quant=quant, winograd=wino,
                                 int8_winograd=choice is not None and choice.int8_winograd == "faster"
                                 ).plan.describe())
    if runtime:
        click.echo("runtime:         (not measured for pickle files; convert the checkpoint to safetensors)"
                   if choice is None else tuning.describe(choice))


@main.command("eval-shapes")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--caption", required=True, help='a ShapesWorld caption, e.g. "a large red sphere on the left"')
@click.option("--depth", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="16-bit depth PNG")
@user_errors
def eval_shapes(image, caption, depth) -> None:
    """Check a generated ShapesWorld image (and depth) against its caption, attribute by attribute."""
    from .tools.shapes.evaluate import eval_shapes_cli

    try:
        click.echo(eval_shapes_cli(str(image), caption, None if depth is None else str(depth)))
    except ValueError as e:  # a caption outside the ShapesWorld grammar
        _fail(e)


@main.group()
def bench() -> None:
    """Benchmarks: the kernel ablation table."""


@bench.command("ablation")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--model", "-m", default="sd15", show_default=True,
              help="sd15 or sdxl (full size, random weights) or a checkpoint path")
@click.option("--size", default=None, type=click.IntRange(8, 4096), help="image side in pixels (default: the model's)")
@click.option("--dtype", default=None, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="default fp16 on CUDA, fp32 on CPU")
@click.option("--repeats", default=None, type=click.IntRange(1, 1000), help="timed calls per row (default 20 on "
              "CUDA, 5 on CPU)")
@click.option("--no-compile", is_flag=True, help="skip the diffusers + torch.compile row (compiling takes minutes)")
@click.option("--threads", default=None, type=click.IntRange(1, 1024), help=THREADS_HELP)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="write the result as JSON")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path), help="write the table")
@user_errors
def bench_ablation(device, model, size, dtype, repeats, no_compile, threads, json_path, md_path) -> None:
    """Per-UNet-call latency and memory as kernels are added (Chen et al. 2023, Table 1), with diffusers
    eager and compiled on the same weights."""
    from .api import parse_dtype
    from .bench.ablation import ablation, markdown
    from .runtime.device import configure_process

    configure_process(threads)
    result = ablation(model, device, size, parse_dtype(dtype), repeats, with_compile=not no_compile)
    _report(result, markdown, json_path, md_path)


def _report(result: dict, markdown, json_path: Path | None, md_path: Path | None) -> None:
    """Print a benchmark's table; also write it and its JSON (with the command that made them) where asked."""
    import json

    from .files import atomic_write_bytes

    result["meta"]["command"] = "fastldm " + " ".join(sys.argv[1:])
    table = markdown(result)
    if json_path:
        atomic_write_bytes(json_path, json.dumps(result, indent=1).encode())
    if md_path:
        atomic_write_bytes(md_path, (table + "\n").encode())
    click.echo(table)


@bench.command("memory")
@click.option("--model", "-m", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="a diffusers folder (both engines load it)")
@click.option("--size", default="512x512", show_default=True, help="WIDTHxHEIGHT")
@click.option("--dtype", default=None, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="default: each engine's (fastldm: its measured CPU default, see `fastldm info --runtime`; diffusers: fp32)")
@click.option("--steps", default=2, show_default=True, type=click.IntRange(1, 1000), help="guided denoising steps")
@click.option("--engine", "engines", multiple=True, help="fastldm, fastldm-tiled, diffusers, diffusers-lowmem, or "
              "fastldm:KEY=VALUE,... with memory, budget, quant (e.g. fastldm:budget=2.1GB,quant=int8); repeatable "
              "(default: the first four)")
@click.option("--memory-budget", "budgets", multiple=True, help="add a fastldm engine loaded with this memory "
              "budget (e.g. 2.1GB); repeatable")
@click.option("--memory", "modes", multiple=True, type=click.Choice(["fast", "balanced", "low"]),
              help="add a fastldm engine loaded with this memory mode; repeatable")
@click.option("--quant", default=None, type=click.Choice(["int8"]), help="with --memory-budget/--memory: also add "
              "each of those engines with int8 weights")
@click.option("--stage", "stages", multiple=True, type=click.Choice(["load", "text", "denoise", "decode", "generate"]),
              help="repeatable (default: all; engines with memory settings run only generate: load + one whole "
              "generation in one process)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="write the result as JSON")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path), help="write the table")
def bench_memory(model, size, dtype, steps, engines, budgets, modes, quant, stages, json_path, md_path) -> None:
    """Peak RSS (RssAnon / RssFile), Weight MB, Tensor MB and its live-set lower bound per stage (load, text
    encode, denoise, decode, and the whole generation), each in a fresh process, for fastldm (with and without
    memory plans) and diffusers with and without its memory options, on the same folder. Peak RSS does not
    depend on the step count, so a few steps stand for 20."""
    from .bench.memory import ENGINES, STAGES, bench_memory as run, markdown

    width, height = _size(size)
    planned = [f"fastldm:budget={b}" for b in budgets] + [f"fastldm:memory={m}" for m in modes]
    planned += [f"{e},quant={quant}" for e in planned] if quant else []
    engines = tuple(dict.fromkeys([*(engines or ENGINES), *planned]))  # side by side in one run
    try:
        result = run(str(model), width, height, dtype, steps, engines, tuple(stages) or STAGES)
    except (ValueError, OSError) as e:
        _fail(e)
    _report(result, markdown, json_path, md_path)


if __name__ == "__main__":
    main()
