"""The Python API: `fastldm.load(path)` -> Pipeline; `pipe.generate("a prompt")` -> GenerationResult."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from . import __version__
from .errors import BackendUnavailable, CheckpointError, RequestError, SettingError
from .images import infotext, save_depth_png, save_png
from .loading.load import load_components, read_config, skeleton
from .pipeline import Pipeline
from .ops.registry import Kernels
from .runtime.device import default_dtype
from .runtime.memory_plan import MemoryPlanner
from .runtime.optimize import optimize, winograd_wanted
from .runtime.prepack import KINDS
from .runtime.quant import int8_layer
from .runtime.residency import Residency
from .runtime.weight_storage import store_16bit
from .runtime.tuning import choose
from .samplers import resolve_sampler
from .tokenizer import CLIPTokenizer

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise SettingError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return _DTYPES[dtype]


def _tokenizers(path: Path, config) -> dict[str, CLIPTokenizer]:
    toks = {}
    for name, clip in (("tokenizer", config.text_encoder), ("tokenizer_2", config.text_encoder_2)):
        if clip is None:
            continue
        folder = path / name if path.is_dir() else None
        toks[name] = (CLIPTokenizer.from_folder(folder) if folder is not None and folder.is_dir()
                      else CLIPTokenizer.bundled(pad_id=clip.pad_token_id))
    return toks


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         variant: str | None = None, allow_pickle: bool = False, prediction_type: str | None = None,
         compile: bool | None = None, quant: str | None = None, cuda_graphs: bool | None = None,
         backends: dict[str, str] | None = None, tune: bool = True, memory: str | None = None,
         memory_budget: int | str | None = None) -> Pipeline:
    """Load a diffusers folder or a single-file .safetensors checkpoint (SD 1.x, 2.x, SDXL, LDM3D).

    dtype: "fp32" | "fp16" | "bf16" (default: fp16 on CUDA; on CPU bf16 where it has native bf16 dot
    products, else fp32); variant: e.g. "fp16" to pick `*.fp16.safetensors` in a folder; allow_pickle:
    permit .ckpt/.bin files (read with weights_only=True); prediction_type: override "epsilon" /
    "v_prediction" when the checkpoint cannot tell. Runtime (fastldm.runtime): compile: the UNet through
    torch.compile (default off); quant: "int8" for int8 weights and activations in the UNet (CPU);
    cuda_graphs: capture and replay the UNet call as a CUDA graph per input shape (default: on where the UNet
    runs on CUDA, is not compiled and stays resident: 2.4× faster per step on an H200; False turns it off);
    backends: {op: backend} forced for this pipeline only (see `fastldm.ops.backends(op)`), e.g.
    {"attention": "reference"}; on a CPU the UNet's convolutions, and its linears at few rows, run with
    oneDNN-packed weights (runtime/prepack.py) unless tuning measured packing slower (or, for convolutions, a
    conv2d backend is forced), and its full-resolution convolutions as Winograd where tuning measured that faster
    (F(4×4, 3×3) in fp32, F(2×2, 3×3) in bf16; in a bf16 model the deeper levels too, as far as their transforms
    fit, where measured faster there; runtime/winograd_conv.py). tune: on a CPU with no dtype given, pick the dtype, the
    attention kernel, whether to pack convolution and linear weights and whether to run Winograd by
    measuring them on this model's shapes the first time (seconds; cached on disk, runtime/tuning.py);
    `pipe.runtime_choice` says what was chosen.

    Memory (runtime/memory_plan.py): memory: "balanced" (default: today's speed; the VAE is tiled only when
    an image would not fit the machine), "fast" (never tiles) or "low" (the least memory: components loaded
    per stage, 16-bit weights, sequential CFG, tiled VAE); memory_budget: bytes or a size such as "3GB"
    (powers of 1024) that a request may use above the process's RSS after import (on a CUDA device: of the
    GPU's memory, where the plans are made against the GPU's memory too): the cheapest plan whose
    predicted peak fits is chosen, and a request that cannot fit is refused with MemoryBudgetError before it
    starts. `pipe.memory_plan` says what was chosen.

    Loading changes nothing outside the pipeline it returns: torch's thread count, the allocator and the
    compile cache's folder are the program's to set (`fastldm.runtime.device.configure_process`, which the
    CLI and the server call)."""
    path, dtype = Path(path).expanduser(), parse_dtype(dtype)
    choice = None
    if tune and dtype is None and torch.device(device).type == "cpu":
        config = read_config(path, prediction_type)
        choice = None if config is None else choose(config)
        dtype = None if choice is None else choice.torch_dtype
    kernels = Kernels(forced=dict(backends or {}), preferred={} if choice is None else choice.preferred())
    device = torch.device(device)
    # Layers whose weights are packed for oneDNN (runtime/prepack.py) or transformed for Winograd
    # (runtime/winograd_conv.py): those measured faster so here, less the convolutions where a conv2d backend is
    # forced (packed layers would not reach it), the linears and Winograd layers of a compiled UNet (inductor
    # lowers oneDNN's packed linear only for the frozen weights of its own freezing, and has convolutions of its
    # own), and Winograd where a memory plan gives it up for memory.
    packed_kinds = KINDS if choice is None else choice.packed_kinds
    packed_kinds -= {"conv", "winograd", "winograd2"} if "conv2d" in kernels.forced else set()
    packed_kinds -= {"linear", "winograd", "winograd2"} if compile else set()
    # An int8 UNet's 3×3 convolutions as Winograd F(2×2) with int8 GEMMs, where tuning measured that faster.
    int8_winograd = quant == "int8" and choice is not None and choice.int8_winograd == "faster"
    int8_attention = quant == "int8" and choice is not None and choice.int8_attention == "faster"
    planner = None
    if memory is not None or memory_budget is not None:
        config = read_config(path, prediction_type)
        if config is None:
            raise SettingError("a memory mode or budget needs a safetensors checkpoint (a pickle file cannot be "
                               "read per component); convert it to .safetensors")
        compute = dtype or default_dtype(device, config)
        planner = MemoryPlanner(config, memory, memory_budget, compute=compute, quant=quant,
                                attention=kernels.forced.get("attention"), device=device, int8_winograd=int8_winograd,
                                winograd=winograd_wanted(packed_kinds, device, compute,
                                                         len(config.unet.block_out_channels)))
        packed_kinds -= {"winograd", "winograd2"} if not planner.winograd_levels else set()
    staged, storage = (planner.staged, planner.storage_dtypes()) if planner is not None else ((), {})
    graphs = cuda_graphs_wanted(cuda_graphs, device, bool(compile), "unet" in staged)  # refuses before reading
    optimize({}, device, quant=quant)   # checks the setting before anything is read
    compute = dtype if planner is None else planner.compute
    # With a memory plan, an int8 UNet is quantized layer by layer as it is read: never whole in float.
    while_reading = planner is not None and quant == "int8"
    options = dict(device=device, dtype=dtype, variant=variant, allow_pickle=allow_pickle,
                   prediction_type=prediction_type, storage=storage,
                   channels_last=frozenset({"unet", "vae"} if device.type == "cpu" else ()),  # optimize.layout
                   layers={"unet": int8_layer(compute, winograd=int8_winograd)} if while_reading else None)
    config, modules = load_components(path, components=frozenset(_COMPONENTS) - set(staged), **options)
    compute = compute or default_dtype(device, config)

    def prepare(found: dict) -> dict:
        """Loaded components as they run: layout, int8 or packed convolutions (runtime/optimize.py), 16-bit
        widening."""
        optimize(found, device, quant=None if while_reading else quant, dtype=compute,
                 pack=frozenset() if while_reading or "unet" in storage else packed_kinds,
                 winograd_levels=None if planner is None else planner.winograd_levels, int8_winograd=int8_winograd,
                 int8_attention=int8_attention)
        for name in found:
            if name == "unet" and while_reading:
                found[name].to(compute)  # what int8 leaves in float (norms, skipped layers) computes in fp32
            elif name in storage:
                store_16bit(found[name], storage[name], compute)
        return found

    def reload(name: str):
        """A staged component read again and prepared as at load, for Residency."""
        return prepare({name: load_components(path, components=frozenset({name}), **options)[1][name]})[name]

    modules = prepare(modules)
    for name in staged:   # shapes only; the weights come when the stage first runs
        modules[name] = skeleton(name, config, compute)
    residency = Residency({k: v for k, v in modules.items() if v is not None}, staged, reload,
                          lambda name: skeleton(name, config, compute))
    pipe = Pipeline(config, modules, _tokenizers(path, config), name=path.stem if path.is_file() else path.name,
                    source=path, kernels=kernels, memory=planner, residency=residency, device=device,
                    dtype=compute)
    pipe.runtime_choice = choice
    if compile:
        pipe.unet_runtime.compile()
    if graphs:
        pipe.use_cuda_graphs()
    return pipe


def cuda_graphs_wanted(requested: bool | None, device: torch.device, compile: bool, unet_staged: bool) -> bool:
    """Whether a pipeline replays its UNet calls as CUDA graphs: as `requested`, else (None) wherever it can: on a
    CUDA device, with the UNet neither compiled (inductor's executor instead) nor staged by a memory plan (a graph
    replays fixed weight addresses, and a staged UNet's weights are read again at every stage)."""
    if requested and device.type != "cuda":
        raise BackendUnavailable(f"CUDA graphs need the UNet on a CUDA device, it is on {device.type}; load it "
                                 f"on a CUDA device or turn CUDA graphs off")
    if requested and unet_staged:
        raise SettingError("CUDA graphs replay fixed weight addresses and this memory plan loads the UNet's "
                           "weights again per stage; use the balanced or fast memory mode, a larger memory budget, "
                           "or turn CUDA graphs off")
    if requested and compile:
        raise SettingError("a UNet runs either compiled or as CUDA graphs, not both; choose one")
    if requested is not None:
        return requested
    return device.type == "cuda" and not compile and not unet_staged


_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")


def model_hash(path: Path) -> str:
    """A1111's short model hash: the first 10 hex digits of the SHA-256 of the checkpoint file (for a
    diffusers folder: of its UNet weights)."""
    if path.is_dir():
        files = sorted((path / "unet").glob("*.safetensors")) or sorted((path / "unet").glob("*"))
        path = files[0]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


EMBEDDED_MODEL = Path(__file__).parent / "assets" / "shapes-rgbd"


def default_model() -> Path:
    """The embedded tiny RGBD model shipped in the package."""
    if not (EMBEDDED_MODEL / "model_index.json").exists():
        raise CheckpointError("no model given and the embedded model is not installed; give a model path "
                              "(a diffusers folder or a .safetensors file)")
    return EMBEDDED_MODEL


def parameters_text(pipe: Pipeline, result, index: int) -> str:
    """The A1111 infotext of image `index` of `result`. "Steps" is the number of steps run (result.steps)."""
    r = result.request
    spec = resolve_sampler(r.sampler, r.scheduler)
    w, h = result.images[index].size
    params = {"Steps": result.steps, "Sampler": spec.label,
              "Schedule type": r.scheduler.replace("_", " ").title() if r.scheduler else None,
              "CFG scale": f"{r.guidance:g}", "Seed": result.seeds[index], "Size": f"{w}x{h}",
              "Model hash": pipeline_hash(pipe), "Model": pipe.name,
              "Denoising strength": f"{r.strength:g}" if r.init_image is not None else None,
              "Early stop": f"{r.early_stop:g}" if r.early_stop is not None else None,
              "DeepCache interval": r.cache_interval if r.cache_interval > 1 else None,
              "Version": f"fastldm {__version__}" + (f" ({how})" if (how := runtime_text(pipe)) else "")}
    return infotext(r.prompt, r.negative_prompt, params)


def runtime_text(pipe: Pipeline) -> str | None:
    """How the pipeline ran, for the PNG's Version field: the CPU's measured choice (runtime/tuning.py), or on a
    GPU its dtype and whether the UNet ran as CUDA graphs."""
    if pipe.runtime_choice is not None:
        return str(pipe.runtime_choice)
    if pipe.device.type == "cuda":
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(pipe.dtype, str(pipe.dtype))
        return f"cuda {dtype}" + ("; CUDA graphs" if pipe.unet_runtime.graphs is not None else "")
    return None


def pipeline_hash(pipe: Pipeline) -> str | None:
    """`model_hash` of the checkpoint `pipe` was loaded from (None for one built in code), computed once."""
    if pipe.source is None:
        return None
    if not hasattr(pipe, "_model_hash"):
        pipe._model_hash = model_hash(pipe.source)
    return pipe._model_hash


def save_result(pipe: Pipeline, result, out_dir: str | Path) -> list[Path]:
    """Write each image as NNNNN-SEED.png (with A1111 parameters) and, for RGBD models, NNNNN-SEED-depth.png
    (16-bit). Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = 1 + max((int(p.name[:5]) for p in out.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")), default=-1)
    paths = []
    for i, (img, seed) in enumerate(zip(result.images, result.seeds)):
        stem = f"{start + i:05d}-{seed}"
        paths.append(save_png(img, out / f"{stem}.png", parameters_text(pipe, result, i)))
        if result.depths is not None:
            paths.append(save_depth_png(result.depths[i], out / f"{stem}-depth.png"))
    return paths


def open_image(path: str | Path) -> "Image.Image":
    """An init image for img2img, fully decoded now so a bad file fails before any work is done."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise RequestError("init_image", str(path), "an existing image file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise RequestError("init_image", str(path), f"a readable PNG or JPEG ({type(e).__name__})") from None
