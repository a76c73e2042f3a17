"""`fastldm` command line: a thin shell over the Python API (no logic of its own)."""
from __future__ import annotations

import sys
from pathlib import Path

import click


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _size(value: str | None) -> tuple[int | None, int | None]:
    if value is None:
        return None, None
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
    return w, h


@click.group()
@click.version_option(package_name="fastldm")
def main() -> None:
    """fastldm: fast latent diffusion (Stable Diffusion 1.x/2.x/XL, LDM3D) on CPU and GPU."""


@main.command()
@click.argument("prompt")
@click.option("--model", "-m", type=click.Path(path_type=Path), help="diffusers folder or .safetensors file "
              "(default: the embedded tiny RGBD model)")
@click.option("--negative", default="", help="negative prompt")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--sampler", default="DPM++ 2M", show_default=True, help="see `fastldm samplers`")
@click.option("--schedule", "scheduler", default=None, help="sigma schedule: karras, exponential, normal, ...")
@click.option("--guidance", "--cfg", default=7.5, show_default=True, type=float)
@click.option("--seed", default=None, type=int, help="random if not given; image i uses seed + i")
@click.option("--size", default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the model's)")
@click.option("-n", "n", default=1, show_default=True, type=click.IntRange(1, 64), help="images")
@click.option("--init-image", type=click.Path(path_type=Path), help="img2img source image")
@click.option("--strength", default=0.75, show_default=True, type=float, help="img2img denoising strength")
@click.option("--out", default="outputs", show_default=True, type=click.Path(path_type=Path))
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default=None, type=click.Choice(["fp32", "fp16", "bf16"]))
@click.option("--allow-pickle", is_flag=True, help="allow loading .ckpt/.bin pickle files (trusted files only)")
def generate(prompt, model, negative, steps, sampler, scheduler, guidance, seed, size, n, init_image, strength,
             out, device, dtype, allow_pickle) -> None:
    """Generate images from PROMPT and write them as PNGs (with A1111 parameters) to --out."""
    from . import api
    from .pipeline import GenerationRequest
    from .samplers import resolve_sampler

    width, height = _size(size)
    try:
        resolve_sampler(sampler, scheduler)
        init = api.open_image(init_image) if init_image is not None else None
        pipe = api.load(model or api.default_model(), device=device, dtype=dtype, allow_pickle=allow_pickle)
        req = GenerationRequest(prompt=prompt, negative_prompt=negative, steps=steps, sampler=sampler,
                                scheduler=scheduler, guidance=guidance, seed=seed, width=width, height=height,
                                n=n, init_image=init, strength=strength)
        with click.progressbar(length=steps, label="denoising", file=sys.stderr) as bar:
            result = pipe.generate(req, callback=lambda info: bar.update(1))
        paths = api.save_result(pipe, result, out)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        _fail(e)
    for p in paths:
        click.echo(p)


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
def info(path, allow_pickle) -> None:
    """Print a checkpoint's family, components, parameter counts, dtype and prediction type."""
    from .inspect import describe

    try:
        click.echo(describe(path, allow_pickle=allow_pickle))
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(e)


@main.command("eval-shapes")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--caption", required=True, help='a ShapesWorld caption, e.g. "a large red sphere on the left"')
@click.option("--depth", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="16-bit depth PNG")
def eval_shapes(image, caption, depth) -> None:
    """Check a generated ShapesWorld image (and depth) against its caption, attribute by attribute."""
    from .shapes.evaluate import eval_shapes_cli

    try:
        click.echo(eval_shapes_cli(str(image), caption, None if depth is None else str(depth)))
    except (ValueError, OSError) as e:
        _fail(e)


if __name__ == "__main__":
    main()
