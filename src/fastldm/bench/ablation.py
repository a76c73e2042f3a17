"""The kernel ablation of Chen et al. 2023 ("Speed Is All You Need", Table 1) for this engine.

Rows are cumulative backend sets, applied with `fastldm.ops.use` on top of the reference for every op:
    Baseline        plain PyTorch for every op
    +Opt. softmax   attention "triton_softmax" (partially fused softmax, §3.2.1)
    +S-GN/GELU      + group_norm, gelu, geglu "triton" (specialized kernels, §3.1)
    +FlashAttn      attention "triton" (§3.2.2)
    +FlashAttn CPU  attention "flash_cpu" instead: the same algorithm in C++ for CPUs (ops/flash_attention_cpu.py)
    +Winograd       + conv2d "triton_winograd" on CUDA, on CPU "winograd_cpu" in fp32 and bf16 (C++ transforms,
                    fp32 GEMMs), else
                    "winograd" (plain PyTorch) (F(4×4, 3×3), §3.3)
    +Packed conv    the convolutions' weights packed for oneDNN once per input shape instead of Winograd
                    (runtime/prepack.py; CPU): a twin of the UNet sharing every other tensor
    +Packed linear  + the linears' weights packed too, for the calls of few rows (prepack.MAX_ROWS)
    +CUDA graphs    + the step captured and replayed (fastldm.runtime.cuda_graph)
A row that cannot run on the device is reported as "n/a (why)" and adds nothing to the rows after it, so
the `backends` column always says what ran. Peers in the same run, on the same weights (shared, not
copied) and inputs: diffusers' UNet2DConditionModel eager and under torch.compile (diffusers is imported
only here, and only when installed: it is a peer, not a dependency).

Per row: latency of one UNet call at batch 2 (classifier-free guidance), the median over rounds that
run every row once in turn (A, B, C, A, B, C, …) after warm-up, timed with CUDA events on a GPU and
perf_counter on a CPU; Tensor MB, the peak bytes one call allocates above what was live before it (CUDA:
max_memory_allocated; CPU: the allocation events of torch.profiler's memory profile, so buffers inside
ops and compiled code count too); beside it the live-set lower bound of the same call's op order, from
fastldm.runtime.memory_trace (every op output freed right after its last use; a CUDA graph replays the op
order of the row before it; n/a under torch.compile, whose kernels allocate out of the dispatcher's sight);
Weight MB, the parameter bytes plus the transformed weights Winograd keeps (or the packed copies the twin
holds after its first call); the first call's time
(compilation, capture); and max|out − Baseline out| / max|Baseline out|.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import ops
from ..config import UNetConfig
from ..families import PRESETS
from ..testing import random_module
from ..errors import BackendUnavailable, RequestError
from ..models import UNet2DConditionModel
from ..ops import autotune, flash_attention_cpu, registry, winograd, winograd_cpu
from ..runtime.memory_trace import MemoryTrace
from ..runtime.prepack import KINDS, PackedLayer, prepack, unsupported as unpackable

ROWS: list[tuple[str, dict[str, str]]] = [
    ("Baseline", {}),
    ("+Opt. softmax", {"attention": "triton_softmax"}),
    ("+S-GN/GELU", {"group_norm": "triton", "gelu": "triton", "geglu": "triton"}),
    ("+FlashAttn", {"attention": "triton"}),
    ("+FlashAttn CPU", {"attention": "flash_cpu"}),
    ("+Winograd", {"conv2d": "winograd"}),  # "triton_winograd" on CUDA; 3×3 stride-1 convs only
    ("+Packed conv", {}),                    # conv2d backends do not apply to packed layers: Winograd dropped
    ("+Packed linear", {}),
    ("+CUDA graphs", {}),
]
CONTEXT_TOKENS = 77
MODELS = {"sd15": "sd1", "sdxl": "sdxl"}


@dataclass
class Row:
    name: str
    backends: str                       # what ran: "reference" plus the ops forced to another backend
    ms: float | None = None             # median per-call latency
    tensor_mb: float | None = None
    bound_mb: float | None = None       # live-set lower bound of the op order (MemoryTrace)
    weight_mb: float | None = None
    first_call_s: float | None = None
    rel_err: float | None = None        # max|out − Baseline out| / max|Baseline out|
    na: str | None = None               # why the row could not run


def random_unet(config: UNetConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> UNet2DConditionModel:
    """A full-size UNet with seeded fan-in-scaled random weights (fastldm.testing)."""
    return random_module("unet", config, dtype=dtype, device=device, seed=seed)


def unet_inputs(config: UNetConfig, latent: int, device, dtype: torch.dtype, batch: int = 2,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword arguments of one UNet call: latent (batch, Cin, latent, latent), timesteps, a 77-token
    context, and SDXL's pooled text embedding and size ids or an LCM guidance embedding when the UNet takes them."""
    g = torch.Generator().manual_seed(seed)
    args = {"sample": torch.randn(batch, config.in_channels, latent, latent, generator=g),
            "timestep": torch.full((batch,), 500.0),
            "encoder_hidden_states": torch.randn(batch, CONTEXT_TOKENS, config.cross_attention_dim, generator=g)}
    if config.addition_time_embed_dim:
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        args["text_embeds"] = torch.randn(batch, pooled, generator=g)
        px = float(latent * 8)
        args["time_ids"] = torch.tensor([[px, px, 0.0, 0.0, px, px]]).expand(batch, 6).clone()  # (B, 6)
    if config.time_cond_proj_dim:
        args["timestep_cond"] = torch.randn(batch, config.time_cond_proj_dim, generator=g)
    return {k: v.to(device, torch.float32 if k == "timestep" else dtype) for k, v in args.items()}


def _diffusers_peer(unet: UNet2DConditionModel) -> tuple[nn.Module, Callable]:
    """diffusers' UNet built from the same config on the meta device, holding our parameter tensors."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    with torch.device("meta"):
        peer = DiffusersUNet.from_config(unet.config.to_diffusers())
    peer.load_state_dict(unet.state_dict(), strict=True, assign=True)
    peer.eval()

    def call(module, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return module(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                      added_cond_kwargs=added, return_dict=False)[0]
    return peer, call


def _time_ms(fn: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _cuda_reset(device: torch.device) -> int:
    """On CUDA: reset the peak statistic and return the bytes allocated now; elsewhere 0."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _cuda_peak(device: torch.device, base: int) -> int | None:
    """On CUDA: the peak allocated bytes since `_cuda_reset` above `base`; elsewhere None."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_bytes(fn: Callable, device: torch.device) -> int:
    """Peak bytes allocated during `fn()` above those live when it started (its output included).
    CUDA: the caching allocator's max_memory_allocated. CPU: the running sum of the CPU allocation and
    free events torch.profiler records with profile_memory=True."""
    if device.type == "cuda":
        base = _cuda_reset(device)
        fn()
        return _cuda_peak(device, base)
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _winograd_bytes(module: nn.Module) -> int:
    """Bytes of the transformed weights of every conv Winograd runs, at most: 36/9 = 4× their 3×3 weights, in fp32
    (winograd_cpu's GEMMs are fp32 in a bf16 model too)."""
    return sum(4 * m.weight.numel() * max(m.weight.element_size(), 4) for m in module.modules()
               if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1))


def _packed_twin(unet: nn.Module, kinds: frozenset[str]) -> nn.Module:
    """`unet`'s module tree with its layers of `kinds` packed (runtime/prepack.py), sharing every tensor with it
    until the first call packs the twin's own copies of their weights."""
    shared = {id(t): t for t in (*unet.parameters(), *unet.buffers())}
    twin = copy.deepcopy(unet, memo=shared)
    prepack(twin, kinds)
    return twin


def _packed_bytes(module: nn.Module) -> int:
    """Bytes of the packed weights `module` holds (the copies of a packed twin)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules()
               if isinstance(m, PackedLayer) and m.packed_for is not None)


@contextlib.contextmanager
def _backend_set(backends: dict[str, str], device: torch.device, dtype: torch.dtype):
    """Force `backends` over the reference for every op, except conv2d: Winograd runs only 3×3 stride-1
    convolutions, so it is put first in `auto`'s order (registry.prefer) and the other convs fall back
    to the reference."""
    forced = {op: b for op, b in backends.items() if op != "conv2d"}
    conv = backends.get("conv2d")
    with registry.prefer({} if conv is None else {("conv2d", device.type, dtype): conv}):
        with ops.use("reference", **forced, **({} if conv is None else {"conv2d": "auto"})):
            yield


def _cpu_kernel_problem(backends: dict[str, str], device: torch.device) -> str | None:
    """Why a row that forces the C++ CPU attention cannot run here: another device, or no build."""
    if "flash_cpu" not in backends.values():
        return None
    return "flash_cpu is a CPU kernel" if device.type != "cpu" else flash_attention_cpu.unavailable()


def _run(step: Callable, args: dict, backends: dict[str, str], device: torch.device, dtype: torch.dtype):
    with _backend_set(backends, device, dtype):
        return step(**args)


def _fastldm_rows(unet: nn.Module, args: dict, device: torch.device,
                  dtype: torch.dtype) -> list[tuple[Row, Callable | None]]:
    """Each ablation row with the function that runs one call, or None and the reason it cannot run."""
    rows, active = [], {}
    for name, extra in ROWS:
        if name == "+Winograd" and device.type == "cuda":
            extra = {"conv2d": "triton_winograd"}
        elif (name == "+Winograd" and dtype in (torch.float32, torch.bfloat16)
              and winograd_cpu.unavailable() is None):
            extra = {"conv2d": "winograd_cpu"}  # the C++ transforms
        graphs = name == "+CUDA graphs"
        packed = {"+Packed conv": frozenset({"conv"}), "+Packed linear": KINDS}.get(name, frozenset())
        trial = {op: b for op, b in active.items() if op != "conv2d"} if packed else active | extra
        label = "; ".join(["reference"] + [f"{op}={b}" + (" (3x3 stride 1)" if op == "conv2d" else "")
                                           for op, b in trial.items()]) + (" + CUDA graph" if graphs else "") + (
            " + packed " + " and ".join(sorted(packed)) + " weights" if packed else "")
        missing = [f"{b} for {op}" for op, b in extra.items() if b not in registry.backends(op)]
        why = ("Triton needs CUDA" if device.type != "cuda" and any(b.startswith("triton") for b in extra.values())
               else "CUDA graphs need CUDA" if graphs and device.type != "cuda"
               else "packed oneDNN weights are a CPU layout" if packed and device.type != "cpu"
               else next((w for w in (unpackable(dtype, kind) for kind in sorted(packed)) if w), None) if packed
               else f"backend {', '.join(missing)} is not registered (pip install triton)" if missing
               else _cpu_kernel_problem(extra, device))
        if why is not None:
            rows.append((Row(name, label, na=why), None))
            continue
        active = trial
        step = unet
        if graphs:
            from ..runtime.cuda_graph import CUDAGraphUNet
            step = CUDAGraphUNet(unet)
        if packed:
            step = _packed_twin(unet, packed)

        rows.append((Row(name, label), functools.partial(_run, step, args, dict(active), device, dtype)))
    return rows


def _peer_rows(unet: nn.Module, args: dict, with_compile: bool) -> list[tuple[Row, Callable | None]]:
    try:
        peer, call = _diffusers_peer(unet)
    except ImportError:
        return [(Row(n, "diffusers", na="diffusers is not installed"), None)
                for n in ("diffusers eager", "diffusers + torch.compile")]
    rows = [(Row("diffusers eager", "diffusers, SDPA attention"), lambda: call(peer, **args))]
    if not with_compile:
        rows.append((Row("diffusers + torch.compile", "diffusers", na="skipped: --no-compile"), None))
        return rows
    compiled = torch.compile(peer)

    def run_compiled():
        with torch._inductor.config.patch(freezing=True):  # weights as constants, as for inference
            return call(compiled, **args)
    rows.append((Row("diffusers + torch.compile", "diffusers, inductor, freezing"), run_compiled))
    return rows


def run_ablation(unet: UNet2DConditionModel, *, latent: int, batch: int = 2, repeats: int = 5, warmup: int = 1,
                 peers: bool = True, with_compile: bool = True, seed: int = 0) -> dict:
    """Measure every row on `unet`'s device and dtype at a `latent`×`latent` latent; returns
    {"meta": {...}, "rows": [Row as dict, ...]}."""
    p = next(unet.parameters())
    device, dtype = p.device, p.dtype
    args = unet_inputs(unet.config, latent, device, dtype, batch, seed)
    load_before = os.getloadavg()
    kernels = registry.Kernels()  # the table's own selection and caches, whatever the caller has active
    # Room for all of this UNet's transformed weights: an eviction would re-transform them on every call.
    with registry.using(kernels):
        winograd.weights().max_bytes = max(winograd.weights().max_bytes, 2 * _winograd_bytes(unet))
    candidates = _fastldm_rows(unet, args, device, dtype) + (_peer_rows(unet, args, with_compile) if peers else [])
    params = _param_bytes(unet)
    runnable, ref, bound = [], None, None
    with torch.inference_mode(), registry.using(kernels):
        for row, fn in candidates:
            if fn is None:
                continue
            # A row that breaks (a kernel's limits, out of memory, a kernel that does not compile for this GPU)
            # is reported as such and the table goes on; the traceback goes to stderr.
            try:
                cuda_base = _cuda_reset(device)
                t0 = time.perf_counter()
                out = fn().float()
                # A CUDA graph allocates during warm-up and capture, and nothing on replay: Tensor MB is
                # measured on that first call.
                first_peak = _cuda_peak(device, cuda_base)
                row.first_call_s = round(time.perf_counter() - t0, 3)
                for _ in range(warmup):
                    fn()
                if not torch.isfinite(out).all():
                    row.na = "non-finite output"
                    continue
                if "CUDA graph" in row.backends:
                    tensor = first_peak  # and `bound` stays the captured row's
                elif "inductor" in row.backends:
                    tensor, bound = peak_bytes(fn, device), None
                else:
                    with MemoryTrace() as trace:
                        tensor = peak_bytes(fn, device)
                    bound = trace.report().lower_bound_bytes
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row.na = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                continue
            if row.name == "Baseline":
                ref = out
            if ref is not None:
                row.rel_err = float((out - ref).abs().max() / ref.abs().max())
            derived = (winograd.weights().nbytes if "winograd" in row.backends
                       else _packed_bytes(fn.args[0]) if "packed" in row.backends else 0)  # args[0]: the twin
            row.weight_mb = round((params + derived) / 2**20, 1)
            row.tensor_mb = round(tensor / 2**20, 1)
            row.bound_mb = None if bound is None else round(bound / 2**20, 1)
            runnable.append((row, fn))
        times: dict[str, list[float]] = {row.name: [] for row, _ in runnable}
        for _ in range(repeats):
            for row, fn in runnable:
                times[row.name].append(_time_ms(fn, device))
    for row, _ in runnable:
        row.ms = round(statistics.median(times[row.name]), 3)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device.type, "device_kind": autotune.device_kind(device), "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch."), "latent": latent, "batch": batch, "repeats": repeats,
            "warmup": warmup, "threads": torch.get_num_threads(),
            "timer": "CUDA events" if device.type == "cuda" else "time.perf_counter",
            "tensor_mb": ("max_memory_allocated above the bytes live before the call" if device.type == "cuda"
                          else "torch.profiler CPU allocation events: peak above the bytes live before the call"),
            "lower_bound": "MemoryTrace: the op order's live set with every output freed after its last use",
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    try:
        import diffusers
        meta["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return {"meta": meta, "rows": [asdict(row) for row, _ in candidates]}


def ablation(model: str = "sd15", device: str = "cpu", size: int | None = None, dtype: torch.dtype | None = None,
             repeats: int | None = None, warmup: int = 1, with_compile: bool = True) -> dict:
    """Run the ablation on `model`: "sd15" or "sdxl" (full size, random weights) or a checkpoint path, at a
    `size`×`size` image (default: the model's), with the process's intra-op CPU threads."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("a CUDA device was asked for but none is available; use the CPU")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if model in MODELS:
        config = PRESETS[MODELS[model]]
        unet = None
    else:
        from ..api import load

        pipe = load(model, device=device, dtype=dtype)
        config, unet = pipe.config, pipe.unet
    scale = config.vae_scale
    size = size or config.unet.sample_size * scale
    if size <= 0 or size % scale:
        raise RequestError("width", size, f"a positive multiple of {scale} (the VAE's scale factor), e.g. "
                                          f"{max(size // scale, 1) * scale}")
    unet = unet or random_unet(config.unet, device, dtype)
    result = run_ablation(unet, latent=size // scale, repeats=repeats or (20 if device.type == "cuda" else 5),
                          warmup=warmup, with_compile=with_compile)
    result["meta"] |= {"model": model, "size": size}
    return result


def markdown(result: dict) -> str:
    """The table, with a header line naming the work and the machine."""
    m, rows = result["meta"], result["rows"]
    base = next((r["ms"] for r in rows if r["name"] == "Baseline"), None)
    size = f"{m['size']}² image, " if "size" in m else ""
    head = (f"{m.get('model', 'UNet')}: {size}{m['latent']}² latent, batch {m['batch']} (guided), {m['dtype']}, "
            f"{m['device_kind']}, torch {m['torch']}, median of {m['repeats']} ({m['timer']}); "
            f"Tensor MB: {m['tensor_mb']}; lower bound: {m.get('lower_bound', 'n/a')}")
    columns = ["row", "backends", "ms / UNet call", "× Baseline", "Tensor MB", "lower bound", "Weight MB",
               "first call (s)", "rel. Δ vs Baseline"]
    lines = [head, "", "| " + " | ".join(columns) + " |", "|---|---|" + "---:|" * 7]
    for r in rows:
        if r["na"] is not None:
            lines.append(f"| {r['name']} | {r['backends']} | n/a ({r['na']}) | | | | | | |")
            continue
        speed = f"{base / r['ms']:.2f}" if base else ""
        bound = "n/a" if r.get("bound_mb") is None else f"{r['bound_mb']:.1f}"
        lines.append(f"| {r['name']} | {r['backends']} | {r['ms']:.1f} | {speed} | {r['tensor_mb']:.1f} | {bound} | "
                     f"{r['weight_mb']:.1f} | {r['first_call_s']:.2f} | {r['rel_err']:.1e} |")
    return "\n".join(lines)
