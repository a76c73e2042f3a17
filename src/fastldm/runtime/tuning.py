"""CPU defaults chosen by measurement on this machine, not by assumption.

CPUs differ: some have native bf16 dot products (AVX-512 bf16, AMX, Arm bf16) and some only AVX2, where oneDNN
emulates bf16 and it is slower than fp32; attention kernels win or lose by head dim, sequence length and ISA.
So the first time a model architecture is loaded on a CPU (`fastldm.load` with no dtype), `choose` times the
candidates that matter on the model's real shapes, for a few seconds:

    dtype       bf16 vs fp32 on the model's widest 3×3 convolution and a GEGLU-sized matmul, where bf16 is
                not native (where it is, bf16 without measuring: 2-4.5× faster, docs/benchmarks.md); fp32 for
                models too small for bf16 to pay (device.BF16_MIN_CHANNELS)
    attention   every registered attention backend that can run the model's first-level self-attention at
                its default size, in the chosen dtype (and stays within 2 % of the reference's output)
    int8        whether oneDNN's int8 kernels exist here and how a quantized linear compares (reported; int8
                changes the images, so it stays the user's choice)
    int8 winograd  where int8 runs: the first two levels' 3×3 convolutions (at full and half resolution; the
                first alone is Winograd's weakest case, within timing noise on an AVX-512 EPYC) as oneDNN's int8
                convolution against Winograd F(2×2, 3×3) with int8 GEMMs (runtime/quant.py
                `Int8WinogradConv2d`), which `quant="int8"` then runs for every 3×3 convolution where faster
    int8 attention  where int8 runs: the first-level self-attention in the chosen float backend against int8
                GEMMs (ops/int8_attention_cpu.py), which an int8 UNet's attention layers then run where faster
                (never the float path's: its error is an int8 model's, not the 2 % the float backends keep to)
    conv pack   the UNet's deepest 3×3 convolution at its real shape (CFG batch 2, the default size), plain
                against its weight packed for oneDNN (runtime/prepack.py): the deep levels are where packing
                pays (1.7× at SD 1.5's 4² latents on an AVX2 EPYC) or does not, and `fastldm.load` packs only
                where it measured faster
    linear pack the feed-forward (GEGLU) product of the UNet's deepest level at few rows (CFG batch 2 at the
                default size, at most prepack.MAX_ROWS), plain against its weight packed for oneDNN: the
                small-row products are the only ones packing serves (1.2× on SD 1.5's 64-token level)
    winograd    a 3×3 convolution of the UNet's first level at its full resolution (CFG batch 2, the default
                size up to a 64² latent) in the chosen dtype, packed for oneDNN against Winograd
                (runtime/winograd_conv.py): in fp32 F(4×4, 3×3) with fp32 GEMMs, 2.2-2.5× on an AVX2 EPYC; in
                bf16 F(2×2, 3×3) in bf16, 1.7-1.8× native bf16 on an AVX-512 bf16 EPYC; a CPU with faster
                direct convolutions may rank them the other way
    winograd2   the same at the second level (half the resolution, its channels: up to a 32² latent), where
                the first measured faster and the dtype is 16-bit (only there do more transforms fit,
                runtime/winograd_conv.py); it decides that level and the deeper ones, as far as they fit
                (F(2×2) at SD 1.5's 512²: 1.7-1.9× per layer at 32², 1.7× at 16², 1.2× at 8²)

The choice is stored as JSON under ~/.cache/fastldm/tuning (or $XDG_CACHE_HOME/fastldm/tuning), keyed by the
CPU's model and flags, torch's version, the thread count and the shapes measured, so a later load reads it
instead of measuring; `fastldm info --runtime` and each PNG's "Version" field say what was chosen.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..files import atomic_write_bytes, cache_root
from ..ops import autotune, registry
from ..ops.int8_attention_cpu import BACKEND as INT8_ATTENTION   # an int8 UNet's choice, never a float one's
from .device import BF16_MIN_CHANNELS, cpu_info
from .prepack import MAX_ROWS, PackedConv2d, PackedLinear
from .prepack import unsupported as unpackable
from .quant import Int8Conv2d, Int8WinogradConv2d, fused_quantizer
from .quant import supported as int8_unsupported
from .quant import winograd_unavailable as int8_winograd_unavailable
from .winograd_conv import WinogradConv2d, algorithm
from .winograd_conv import unavailable as winograd_unavailable

FORMAT = "fastldm-tuning-9"
MAX_REL_ERR = 0.02      # an attention backend further than this from the reference is not a candidate


@dataclass(frozen=True)
class RuntimeChoice:
    dtype: str                                   # "bf16" | "fp32"
    attention: str                               # the attention backend `auto` tries first in that dtype
    int8: str                                    # "faster" | "slower" | "unavailable: <why>"
    pack: str = "unavailable: not measured"      # packed conv weights: "faster" | "slower" | "unavailable: <why>"
    pack_linear: str = "unavailable: not measured"   # packed small-row linear weights: the same
    winograd: str = "unavailable: not measured"  # full-resolution convs as Winograd rather than packed: the same
    winograd2: str = "unavailable: not measured"  # the deeper levels' convs as Winograd too: the same
    int8_winograd: str = "unavailable: not measured"  # an int8 UNet's 3×3 convs as int8 Winograd F(2×2): the same
    int8_attention: str = "unavailable: not measured"  # an int8 UNet's attention with int8 GEMMs: the same
    ms: dict = field(default_factory=dict)       # what was timed: {label: median ms}
    key: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]

    def preferred(self) -> dict[tuple[str, str, torch.dtype], str]:
        """The `preferred` table of a registry.Kernels that applies the choice."""
        return {("attention", "cpu", self.torch_dtype): self.attention}

    @property
    def packed_kinds(self) -> frozenset[str]:
        """The kinds of UNet layer (runtime/prepack.py) whose weights measured faster packed."""
        return frozenset(k for k, v in (("conv", self.pack), ("linear", self.pack_linear),
                                        ("winograd", self.winograd), ("winograd2", self.winograd2)) if v == "faster")

    def __str__(self) -> str:
        packed = [name for kind, name in (("conv", "convs"), ("linear", "linears")) if kind in self.packed_kinds]
        return (f"cpu {self.dtype}; attention {self.attention}" + (f"; packed {', '.join(packed)}" if packed else "")
                + ("" if "winograd" not in self.packed_kinds else "; Winograd full-resolution convs"
                   if "winograd2" not in self.packed_kinds else "; Winograd convs at every level that fits"))


def cache_dir() -> Path:
    return cache_root() / "tuning"


def _shapes(config: ModelConfig) -> dict:
    """The shapes timed for a model, at its default size. For the dtype, whose ratio needs compute-bound
    products, not whole layers: a 3×3 conv of the widest level (up to 640 channels, 8×8) and a feed-forward
    matmul of the first attention level (up to 512 rows). For attention, the first-level self-attention
    with its real token count and head dim, on 2 heads of one image (time ∝ heads: the ranking holds)."""
    u = config.unet
    latent = config.default_size // config.vae_scale
    level = max(range(len(u.block_out_channels)), key=lambda i: u.block_out_channels[i])
    first = next((i for i, c in enumerate(u.cross_attn) if c), 0)
    tokens = (latent // 2 ** first) ** 2
    width = u.block_out_channels[first]
    deepest = len(u.block_out_channels) - 1
    deep_tokens = max(1, latent // 2 ** deepest) ** 2
    return {"conv": (min(u.block_out_channels[level], 640), max(1, min(8, latent // 2 ** level))),
            "matmul": (min(tokens, 512), width),
            "attention": (tokens, width // u.attention_heads[first]),
            "deep conv": (u.block_out_channels[deepest], max(1, latent // 2 ** deepest)),
            "deep linear": (min(2 * deep_tokens, MAX_ROWS), u.block_out_channels[deepest]),
            "full conv": (u.block_out_channels[0], min(latent, 64)),
            "half conv": (u.block_out_channels[min(1, deepest)], max(1, min(latent // 2, 32)))}


def _key(config: ModelConfig) -> str:
    info = cpu_info()
    raw = json.dumps([FORMAT, info.name, sorted(info.flags), torch.__version__, torch.get_num_threads(),
                      _shapes(config), sorted(registry.backends("attention"))])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def cached(config: ModelConfig) -> RuntimeChoice | None:
    """The CPU defaults measured for `config` on this machine earlier, or None (not measured, or a damaged entry)."""
    key = _key(config)
    try:
        data = json.loads((cache_dir() / f"{key}.json").read_text())
        return RuntimeChoice(**data) if data.pop("format", None) == FORMAT else None
    except (OSError, ValueError, TypeError):
        return None


def choose(config: ModelConfig, *, repeats: int = 2) -> RuntimeChoice:
    """The measured CPU defaults for `config` on this machine, from the cache or measured now (seconds)."""
    choice = cached(config)
    if choice is not None:
        return choice
    key = _key(config)
    path = cache_dir() / f"{key}.json"
    choice = measure(config, key, repeats)   # not cached, or a damaged entry: measured and (re)written
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({"format": FORMAT, **asdict(choice)}, indent=1).encode())
    except OSError:
        pass       # a read-only home: the choice still applies to this process
    return choice


def measure(config: ModelConfig, key: str = "", repeats: int = 2) -> RuntimeChoice:
    cpu = torch.device("cpu")
    shapes, ms = _shapes(config), {}
    g = torch.Generator().manual_seed(0)
    small = max(config.unet.block_out_channels) < BF16_MIN_CHANNELS
    dtype = torch.float32 if small or not torch.backends.mkldnn.is_available() else torch.bfloat16
    if not small and not cpu_info().bf16:
        C, S = shapes["conv"]
        M, K = shapes["matmul"]
        x = torch.randn(1, C, S, S, generator=g).to(memory_format=torch.channels_last)
        w = torch.randn(C, C, 3, 3, generator=g) / (3 * C ** 0.5)
        a, b = torch.randn(M, K, generator=g), torch.randn(K, 4 * K, generator=g) / K ** 0.5
        # Emulated bf16 is several times slower: one timed call of it settles the question.
        for name, dt, n in (("fp32", torch.float32, repeats), ("bf16", torch.bfloat16, 1)):
            ms[f"conv {name}"] = autotune.time_ms(F.conv2d, (x.to(dt), w.to(dt)), {"padding": 1}, cpu, n)
            ms[f"matmul {name}"] = autotune.time_ms(torch.mm, (a.to(dt), b.to(dt)), {}, cpu, n)
        slower = ms["conv bf16"] + ms["matmul bf16"] > ms["conv fp32"] + ms["matmul fp32"]
        dtype = torch.float32 if slower else torch.bfloat16
    attention = _fastest_attention(shapes["attention"], dtype, ms, repeats, g)
    int8 = _int8(shapes, ms, repeats, g)
    pack = _packing(shapes["deep conv"], dtype, ms, repeats, g)
    pack_linear = _linear_packing(shapes["deep linear"], dtype, ms, repeats, g)
    # Winograd's margin in bf16 is only ~1.2x: with two timed calls it once measured 1 % slower (33.5 against
    # 33.3 ms) on the AVX-512 box where it makes a whole 512² UNet call 7 % faster; five calls each settle it.
    wino = _winograd(shapes["full conv"], dtype, ms, max(repeats, 5), g)
    if wino != "faster":
        wino2 = "unavailable: " + ("Winograd measured slower at full resolution" if wino == "slower"
                                   else wino.removeprefix("unavailable: "))
    elif dtype == torch.float32 or len(config.unet.block_out_channels) < 2:
        wino2 = ("unavailable: " + ("the model has one level" if dtype != torch.float32 else
                                    "an fp32 model's weights leave no room for more transformed ones"))
    else:
        wino2 = _winograd(shapes["half conv"], dtype, ms, max(repeats, 5), g)
    int8_wino = _int8_winograd((shapes["full conv"], shapes["half conv"]), dtype, ms, max(repeats, 5), g)
    int8_attention = _int8_attention(shapes["attention"], dtype, attention, ms, max(repeats, 3), g)
    return RuntimeChoice("bf16" if dtype == torch.bfloat16 else "fp32", attention, int8, pack, pack_linear, wino,
                         wino2, int8_wino, int8_attention, {k: round(v, 3) for k, v in ms.items()}, key)


def _attention_case(shape, dtype, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """q, k, v (1, 2, N, D) for `shape` (N, D): 2 heads of one image, as the UNet's transposed (B, N, H, D) views."""
    N, D = shape
    return tuple(torch.randn(1, N, 2, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3))


def _fastest_attention(shape, dtype, ms: dict, repeats: int, g: torch.Generator) -> str:
    q, k, v = _attention_case(shape, dtype, g)
    best, ref = None, None
    with torch.inference_mode():
        for backend in autotune.candidates("attention", torch.device("cpu")):
            if backend.name == INT8_ATTENTION or backend.supports(q, k, v) is not None:
                continue
            out = backend.fn(q, k, v).float()
            ref = out if ref is None else ref
            if autotune.rel_err(out, ref) > MAX_REL_ERR:
                continue
            ms[f"attention {backend.name}"] = t = autotune.time_ms(backend.fn, (q, k, v), {}, torch.device("cpu"),
                                                                   repeats)
            if best is None or t < ms[f"attention {best}"]:
                best = backend.name
    return best or "reference"


def _int8(shapes: dict, ms: dict, repeats: int, g: torch.Generator) -> str:
    why = int8_unsupported()
    if why is not None:
        return f"unavailable: {why}"
    from .quant import Int8Linear

    M, K = shapes["matmul"]
    linear = torch.nn.Linear(K, 4 * K).requires_grad_(False)
    x = torch.randn(M, K, generator=g)
    ms["linear fp32"] = autotune.time_ms(linear, (x,), {}, torch.device("cpu"), repeats)
    ms["linear int8"] = autotune.time_ms(Int8Linear(linear), (x,), {}, torch.device("cpu"), repeats)
    return "faster" if ms["linear int8"] < ms["linear fp32"] else "slower"


def _conv_case(C: int, S: int, dtype: torch.dtype, g: torch.Generator) -> tuple[torch.nn.Conv2d, torch.Tensor]:
    """A C -> C 3×3 convolution in `dtype` with weights N(0, 1/(9C)) and its input: CFG batch 2 at S×S,
    channels_last (the UNet's CPU layout)."""
    conv = torch.nn.utils.skip_init(torch.nn.Conv2d, C, C, 3, padding=1, dtype=dtype).requires_grad_(False)
    conv.weight.copy_(torch.randn(C, C, 3, 3, generator=g) / (3 * C ** 0.5))
    conv.bias.zero_()
    return conv, torch.randn(2, C, S, S, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)


def _packing(shape: tuple[int, int], dtype: torch.dtype, ms: dict, repeats: int, g: torch.Generator) -> str:
    why = unpackable(dtype)
    if why is not None:
        return f"unavailable: {why}"
    C, S = shape
    conv, x = _conv_case(C, S, dtype, g)
    ms[f"conv {C}x{S}x{S} plain"] = plain = autotune.time_ms(conv, (x,), {}, torch.device("cpu"), repeats)
    # The warm-up call packs, as a pipeline's first call does; the timed calls run packed. The probe in
    # `unpackable` is a 1×1 weight: a CPU whose oneDNN packs that but not this layer keeps its weights plain.
    try:
        packed = autotune.time_ms(PackedConv2d(conv), (x,), {}, torch.device("cpu"), repeats)
    except RuntimeError as e:
        return f"unavailable: {str(e).strip().splitlines()[0]}"
    ms[f"conv {C}x{S}x{S} packed"] = packed
    return "faster" if packed < plain else "slower"


def _linear_packing(shape: tuple[int, int], dtype: torch.dtype, ms: dict, repeats: int,
                    g: torch.Generator) -> str:
    why = unpackable(dtype, "linear")
    if why is not None:
        return f"unavailable: {why}"
    M, C = shape
    linear = torch.nn.utils.skip_init(torch.nn.Linear, C, 8 * C, dtype=dtype).requires_grad_(False)
    linear.weight.copy_(torch.randn(8 * C, C, generator=g) / C ** 0.5)
    linear.bias.zero_()
    x = torch.randn(M, C, generator=g).to(dtype)
    ms[f"linear {M}x{C}x{8 * C} plain"] = plain = autotune.time_ms(linear, (x,), {}, torch.device("cpu"), repeats)
    try:  # the warm-up call packs
        packed = autotune.time_ms(PackedLinear(linear), (x,), {}, torch.device("cpu"), repeats)
    except RuntimeError as e:
        return f"unavailable: {str(e).strip().splitlines()[0]}"
    ms[f"linear {M}x{C}x{8 * C} packed"] = packed
    return "faster" if packed < plain else "slower"


def _winograd(shape: tuple[int, int], dtype: torch.dtype, ms: dict, repeats: int, g: torch.Generator) -> str:
    why = winograd_unavailable(dtype)
    if why is not None:
        return f"unavailable: {why}"
    C, S = shape
    conv, x = _conv_case(C, S, dtype, g)
    # What a full-resolution layer runs otherwise: packed where oneDNN packs it here, else plain.
    direct = None
    if unpackable(dtype) is None:
        try:
            direct = autotune.time_ms(PackedConv2d(conv), (x,), {}, torch.device("cpu"), repeats)
        except RuntimeError:
            pass   # oneDNN will not pack this layer here: it would run plain
    if direct is None:
        direct = autotune.time_ms(conv, (x,), {}, torch.device("cpu"), repeats)
    ms[f"conv {C}x{S}x{S} direct"] = direct
    ms[f"conv {C}x{S}x{S} winograd"] = t = autotune.time_ms(WinogradConv2d(conv), (x,), {}, torch.device("cpu"),
                                                            repeats)
    return "faster" if t < direct else "slower"


def _int8_winograd(shapes, dtype: torch.dtype, ms: dict, repeats: int, g: torch.Generator) -> str:
    """Int8 Winograd against oneDNN's int8 convolution over the convolutions of `shapes` ((C, S) each), summed."""
    why = int8_winograd_unavailable()
    if why is not None:
        return f"unavailable: {why}"
    quantize = fused_quantizer()
    total = {"int8": 0.0, "int8 winograd": 0.0}
    for C, S in dict.fromkeys(shapes):    # one model level's shape once
        conv, x = _conv_case(C, S, dtype, g)
        for name, cls in (("int8", Int8Conv2d), ("int8 winograd", Int8WinogradConv2d)):
            ms[f"conv {C}x{S}x{S} {name}"] = t = autotune.time_ms(cls(conv, quantize, dtype), (x,), {},
                                                                  torch.device("cpu"), repeats)
            total[name] += t
    return "faster" if total["int8 winograd"] < total["int8"] else "slower"


def _int8_attention(shape, dtype: torch.dtype, attention: str, ms: dict, repeats: int, g: torch.Generator) -> str:
    """The int8 attention backend against `attention` (the float path's choice, timed again beside it) at `shape`."""
    q, k, v = _attention_case(shape, dtype, g)
    int8, chosen = registry.backend("attention", INT8_ATTENTION), registry.backend("attention", attention)
    why = int8_unsupported() or int8.supports(q, k, v)
    if why is not None:
        return f"unavailable: {why}"
    labels = {chosen: f"attention {attention} (beside int8)", int8: f"attention {INT8_ATTENTION}"}
    with torch.inference_mode():
        for b, label in labels.items():
            ms[label] = autotune.time_ms(b.fn, (q, k, v), {}, torch.device("cpu"), repeats)
    return "faster" if ms[labels[int8]] < ms[labels[chosen]] else "slower"


def conv_weights(choice: RuntimeChoice) -> str:
    """How a float UNet's convolution weights are held on this CPU under `choice` (runtime/prepack.py)."""
    return _held(choice.pack, "packed for oneDNN once per input shape")


def linear_weights(choice: RuntimeChoice) -> str:
    """How a float UNet's linear weights are held on this CPU under `choice` (runtime/prepack.py)."""
    return _held(choice.pack_linear, f"packed for oneDNN, for calls of at most {MAX_ROWS} rows")


def full_resolution_convs(choice: RuntimeChoice) -> str:
    """How a float UNet's full-resolution 3×3 convolutions run on this CPU under `choice`."""
    return _winograd_verdict(choice, choice.winograd, "")


def half_resolution_convs(choice: RuntimeChoice) -> str:
    """How a float UNet's 3×3 convolutions below full resolution run on this CPU under `choice`."""
    return _winograd_verdict(choice, choice.winograd2, ", where the transforms fit beside 16-bit weights")


def _winograd_verdict(choice: RuntimeChoice, verdict: str, where: str) -> str:
    if verdict == "faster":
        return (f"Winograd {algorithm(choice.torch_dtype)}, weights transformed at load (measured faster "
                f"here{where})")
    return f"as the other convolutions ({_why_not(verdict, 'Winograd')})"


def int8_convs(choice: RuntimeChoice) -> str:
    """How an int8 UNet's 3×3 convolutions run on this CPU under `choice` (runtime/quant.py)."""
    if choice.int8_winograd == "faster":
        return "Winograd F(2x2, 3x3) with int8 GEMMs (measured faster here)"
    return f"oneDNN's int8 convolution ({_why_not(choice.int8_winograd, 'Winograd')})"


def int8_attention(choice: RuntimeChoice) -> str:
    """How an int8 UNet's attention runs on this CPU under `choice` (ops/int8_attention_cpu.py)."""
    if choice.int8_attention == "faster":
        return "int8 GEMMs where it has 256 keys or more (measured faster here)"
    return f"as the float model's ({_why_not(choice.int8_attention, 'int8 attention')})"


def _why_not(verdict: str, candidate: str) -> str:
    """Why a verdict other than "faster" keeps `candidate` out: it measured slower, or why it is unavailable."""
    return f"{candidate} measured slower here" if verdict == "slower" else verdict.removeprefix("unavailable: ")


def _held(verdict: str, packed: str) -> str:
    if verdict == "faster":
        return f"{packed} (measured faster here)"
    if verdict == "slower":
        return "plain (packing measured slower here)"
    return f"plain ({verdict.removeprefix('unavailable: ')})"


def describe(choice: RuntimeChoice) -> str:
    """Lines for `fastldm info --runtime`."""
    info = cpu_info()
    isa = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx512_vnni", "avx_vnni", "avx2") if f in info.flags]
    lines = [f"cpu:             {info.name} ({info.cpus} CPUs available; {', '.join(isa) or 'no x86 vector flags'})",
             f"threads:         {torch.get_num_threads()}", f"torch:           {torch.__version__}",
             f"dtype:           {choice.dtype}", f"attention:       {choice.attention}", f"int8:            {choice.int8}",
             f"conv weights:    {conv_weights(choice)}", f"linear weights:  {linear_weights(choice)}",
             f"full-res convs:  {full_resolution_convs(choice)}", f"deeper convs:    {half_resolution_convs(choice)}",
             f"int8 3x3 convs:  {int8_convs(choice)}", f"int8 attention:  {int8_attention(choice)}"]
    width = max(map(len, choice.ms), default=0)
    lines += [f"  {label:<{width}}{t:10.3f} ms" for label, t in sorted(choice.ms.items())]
    lines.append(f"cached:          {cache_dir() / (choice.key + '.json')}")
    return "\n".join(lines)

