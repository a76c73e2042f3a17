"""The memory planner: which components stay resident, how weights are stored, how the UNet batch and the VAE
decode are cut, and the peak each stage is predicted to reach; chosen by a mode or a byte budget.

A `MemoryPlan` is plain data. A `MemoryPlanner` (owned by a Pipeline) makes them: once at load for the model's
default request (what `fastldm.load` builds: residency and weight storage cannot change afterwards), and once
per request in `plan.resolve` (the UNet batch and the VAE tiling for that size; a request whose cheapest plan
does not fit the budget is refused there, before any work, with the bytes it would need).

The levers, cheapest in speed first (a budget takes the first plan whose predicted peak fits):

    load time   1. everything resident, weights in the compute dtype (today's default)
                2. text encoders loaded for encoding and released after (a reload per request: ~0.3 s SD 1.5)
                3. + the VAE loaded for its encode/decode and released after
                4. + weights stored in fp16 and widened to fp32 layer by layer (runtime/weight_storage.py;
                   only where the compute dtype is fp32: a per-step cost, see docs/benchmarks.md)
                5. + the UNet released during the decode (reloaded for the next request's denoise)
            Where the machine runs the UNet's convolutions as Winograd (runtime/winograd_conv.py: their weights
            transformed, F(4×4)'s 8× a bf16 3×3 weight in fp32, F(2×2)'s 16/9 of it in bf16), levels 1-3 are
            tried with all the UNet levels it would run, then level 3 with one level fewer at a time down to
            none: per step they save more (~10 % of a step) than a text encoder's or the VAE's reload costs per
            request, and they are given up before the weights go to 16 bits. "low" runs without them.
    per request a. one UNet call per step for the whole batch, untiled VAE
                b. tiled VAE decode/encode (runtime/tiled_vae.py, exact statistics: the same image)
                c. sequential CFG (uncond and cond as two calls), then one image per call
                d. both

Attention is never a lever here: every attention backend fastldm picks by itself (torch's fused CPU kernel,
flash_cpu, blocked; on CUDA SDPA/Triton) keeps no N×N score matrix, so the UNet's activations are linear in
the image area. Only a forced `reference` backend writes the scores; the prediction then counts them.

Predictions are bytes above the process's RSS after its imports: the weights resident in that stage, the
stage's tensor peak (a MemoryTrace of the module on the meta device at a small size, scaled by the area),
and the runtime's overhead beside the tensors (oneDNN's weight reorders and the allocator's slack:
OVERHEAD_FRACTION of the tensors plus one reordered copy of the largest weight, calibrated on the RSS
measured by `fastldm bench memory`, docs/benchmarks.md "Memory planner").

On a CUDA device the stages are predicted in the GPU's memory and the machine is the GPU (its free memory plus
what this process already holds when the planner is made): the same weights and traced tensors, and beside them
CUDA_OVERHEAD_FRACTION of the tensors for cuDNN's workspaces, which no trace sees (calibrated on one H200
measurement: an SD 1.5 VAE decode at 512² in fp16 allocated 546 MB where its traced tensors are 320; the
UNet call, 90 MB against 103 traced, is over-predicted). A load holds the resident weights and one tensor
being converted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import MemoryBudgetError, SettingError
from ..families import vae_dtype
from ..files import atomic_write_bytes, cache_root
from .weight_storage import MAX_WIDEN
from .winograd_conv import buffer_bytes, level_convs, levels_that_fit, transformed_bytes

MODES = ("fast", "balanced", "low")
TEXT = ("text_encoder", "text_encoder_2")
MiB = 1 << 20
OVERHEAD_FRACTION = 0.5        # runtime bytes beside a stage's traced tensors (see the module docstring)
OVERHEAD_FIXED = 128 * MiB     # torch's and oneDNN's own buffers once a model runs
CUDA_OVERHEAD_FRACTION = 0.75  # on a GPU: cuDNN's workspaces beside the traced tensors (see the module docstring)
CUDA_OVERHEAD_FIXED = 64 * MiB
TEXT_TENSORS = 32 * MiB        # a CLIP pass over a few 77-token chunks
# The tiled VAE: 32 latent px tiles (their halos come on top: with 64, a 512² image is one tile and a halo), and
# full-size checkpoints within 256 MiB (exact statistics; states that do not fit are recomputed from the last
# checkpoint: at 512² 1.7× an untiled decode's time for 60 % of its tensors, docs/benchmarks.md "Tiled VAE").
TILE = 32
TILE_BUDGET = 256 * MiB


def parse_bytes(text: str | int) -> int:
    """'8G', '512M', '2.1GB', '1000000' (or an int) -> bytes, in powers of 1024; SettingError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        t = str(text).strip().upper().removesuffix("B").removesuffix("I")
        num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
        try:
            value = float(num) * units[unit]
        except ValueError:
            raise SettingError(f"{text!r} is not a size such as 8G or 512M") from None
    if value <= 0:
        raise SettingError(f"{text!r}: the size must be positive")
    return int(value)


def _mib(n: int) -> str:
    return f"{n / MiB:,.0f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    """What a pipeline (and one request on it) does with memory; plain data (see the module docstring).

    resident: components kept loaded between stages; staged: loaded for their stage and released after.
    storage: {component: "fp32" | "bf16" | "fp16" | "fp16 -> fp32" (stored 16-bit, widened per layer) | "int8"}.
    unet_batch: most rows per UNet call (None: the whole batch at once); <= n means sequential CFG.
    vae_tile: latent pixels per tile side of the tiled VAE (None: untiled); vae_tile_budget: bytes its
    full-size checkpoints may hold (None: keep every one). peaks: predicted bytes per stage, for
    (width, height, n, guided)."""
    mode: str
    budget: int | None
    level: int                                 # the load-time lever reached (1-5, module docstring)
    resident: tuple[str, ...]
    staged: tuple[str, ...]
    storage: tuple[tuple[str, str], ...]
    attention: str
    unet_batch: int | None
    vae_tile: int | None
    vae_tile_budget: int | None
    peaks: tuple[tuple[str, int], ...]
    width: int
    height: int
    n: int
    guided: bool
    winograd: int = 0      # bytes of Winograd's transformed weights held (0: the convolutions run direct)
    winograd_levels: int = 0  # UNet levels, from the full resolution down, whose 3×3 convolutions run as Winograd

    @property
    def sequential_cfg(self) -> bool:
        return self.guided and self.unet_batch is not None and self.unet_batch <= self.n

    @property
    def peak(self) -> int:
        return max(b for _, b in self.peaks)

    def fits(self) -> bool:
        return self.budget is None or self.peak <= self.budget

    def describe(self) -> str:
        """Lines for `fastldm info`."""
        rows = [f"memory plan:     {self.mode}" + (f", budget {_mib(self.budget)}" if self.budget else "")
                + f" (level {self.level} of 5)",
                f"  resident:      {', '.join(self.resident) or 'none'}",
                f"  staged:        {', '.join(self.staged) or 'none'} (loaded for their stage, released after)",
                "  weights:       " + ", ".join(f"{c} {d}" for c, d in self.storage),
                f"  attention:     {self.attention}",
                "  Winograd:      " + (_levels(self.winograd_levels) + f" convs, {_mib(self.winograd)} of "
                                        "transformed weights" if self.winograd else "none"),
                "  UNet batch:    " + ("whole batch per call" if self.unet_batch is None else
                                        f"at most {self.unet_batch} rows per call"
                                        + (" (sequential CFG)" if self.sequential_cfg else "")),
                "  VAE:           " + ("untiled" if self.vae_tile is None else
                                        f"tiled, {self.vae_tile} latent px tiles"
                                        + (f", checkpoints within {_mib(self.vae_tile_budget)}"
                                           if self.vae_tile_budget else "")),
                f"  predicted peak ({self.width}x{self.height}, n={self.n}{', guided' if self.guided else ''}): "
                + ", ".join(f"{s} {_mib(b)}" for s, b in self.peaks)]
        return "\n".join(rows)


# ---- what a model weighs and what its stages hold ---------------------------------------------------------

@dataclass(frozen=True)
class ModelFacts:
    """Sizes read from a config (modules built on the meta device, no data): per component the elements of its
    weight matrices/kernels (>= 2-D, what 16-bit storage and int8 shrink) and of the rest, the largest weight,
    and the UNet's traced tensor peak per batch row per latent pixel (fp32)."""
    matrix: dict[str, int]
    rest: dict[str, int]
    largest: dict[str, int]
    unet_per_row_pixel: float
    unet_attention_heads: int           # heads at the highest resolution (for a forced reference backend)
    winograd_weights: tuple[int, ...] = ()   # per UNet level, elements of its Winograd-eligible 3×3 weights
    winograd_channels: tuple[int, ...] = ()  # per level, the widest such layer's in + out channels (V and M)

    def winograd_bytes(self, levels: int, dtype: torch.dtype) -> int:
        """Bytes of the transformed weights of the UNet's first `levels` levels of 3×3 convolutions in `dtype`."""
        return transformed_bytes(sum(self.winograd_weights[:levels]), dtype)

    def weight_bytes(self, component: str, storage: str) -> int:
        m, r = self.matrix[component], self.rest[component]
        if storage in ("fp32",):
            return 4 * (m + r)
        if storage in ("fp16", "bf16"):
            return 2 * (m + r)
        if storage == "fp16 -> fp32":
            return 2 * m + 4 * r
        if storage == "int8":  # int8 matrices + an fp32 scale per output channel (~1 %), the rest fp32
            return m + 4 * r + m // 100
        raise ValueError(storage)


FACTS_FORMAT = 4   # bump when what ModelFacts holds, or how it is measured, changes


def model_facts(config: ModelConfig) -> ModelFacts:
    """The ModelFacts of `config`: read from the cache ($XDG_CACHE_HOME/fastldm/facts, keyed by the config, torch's
    version and FACTS_FORMAT), else measured (`measure_facts`: 0.6 s for SD 1.5 and 1.7 s for SDXL on an AVX2 core,
    paid by a process's first request) and stored. A cache that cannot be read or written is measured around."""
    key = json.dumps([FACTS_FORMAT, torch.__version__, dataclasses.asdict(config)], sort_keys=True, default=str)
    path = cache_root() / "facts" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    try:
        raw = json.loads(path.read_text())
        return ModelFacts(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except (OSError, ValueError, TypeError):
        pass
    facts = measure_facts(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(dataclasses.asdict(facts)).encode())
    except OSError:
        pass
    return facts


def measure_facts(config: ModelConfig) -> ModelFacts:
    """The ModelFacts of `config`, measured: every component built on the meta device, one UNet call traced there."""
    from ..models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel

    built = {"text_encoder": (CLIPTextModel, config.text_encoder), "text_encoder_2": (CLIPTextModel,
             config.text_encoder_2), "unet": (UNet2DConditionModel, config.unet), "vae": (AutoencoderKL, config.vae)}
    matrix, rest, largest, modules = {}, {}, {}, {}
    for name, (cls, sub) in built.items():
        if sub is None:
            continue
        with torch.device("meta"):
            modules[name] = m = cls(sub)
        weights = [p.numel() for n, p in m.named_parameters() if n.endswith("weight") and p.dim() >= 2]
        matrix[name] = sum(weights)
        rest[name] = sum(p.numel() for p in m.parameters()) - matrix[name] + sum(b.numel() for b in m.buffers())
        largest[name] = max(weights)
    per_pixel = _unet_tensor_peak(modules["unet"], config) / 64
    unet = modules["unet"]
    levels = [[unet.get_submodule(n) for n in level_convs(unet, level)] for level in range(len(unet.down_blocks))]
    weights = tuple(sum(c.weight.numel() for c in convs) for convs in levels)
    channels = tuple(max((c.in_channels + c.out_channels for c in convs), default=0) for convs in levels)
    return ModelFacts(matrix, rest, largest, per_pixel, int(config.unet.attention_heads[0]), weights, channels)


def _unet_tensor_peak(unet: nn.Module, config: ModelConfig) -> int:
    """Traced tensor peak (bytes) of one fp32 UNet call, batch 1, 8×8 latent, one 77-token context."""
    from .memory_trace import MemoryTrace

    u = config.unet
    kw = {}
    if u.addition_time_embed_dim:
        kw = {"text_embeds": torch.empty(1, u.projection_class_embeddings_input_dim - 6 * u.addition_time_embed_dim,
                                         device="meta"),
              "time_ids": torch.empty(1, 6, device="meta")}
    if getattr(u, "time_cond_proj_dim", None):
        kw["timestep_cond"] = torch.empty(1, u.time_cond_proj_dim, device="meta")
    x = torch.empty(1, u.in_channels, 8, 8, device="meta")
    ctx = torch.empty(1, 77, u.cross_attention_dim, device="meta")
    with torch.no_grad(), MemoryTrace() as trace:
        unet(x, torch.zeros(1, device="meta"), ctx, **kw)
    return trace.report().peak_bytes


# ---- the planner ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Levers:
    """The load-time part of a plan."""
    level: int
    staged: tuple[str, ...]
    widen: bool            # weights stored fp16, widened to the fp32 compute dtype
    winograd: int = 0      # UNet levels whose convolutions run as Winograd (transformed weights held), from the top


def _levers(config: ModelConfig, winograd: int = 0) -> list[Levers]:
    """The load-time ladder, cheapest in speed first (the module docstring)."""
    text = tuple(c for c in TEXT if getattr(config, c) is not None)
    plain = [Levers(1, (), False), Levers(2, text, False), Levers(3, (*text, "vae"), False),
             Levers(4, (*text, "vae"), True), Levers(5, (*text, "vae", "unet"), True)]
    if not winograd:
        return plain
    return ([dataclasses.replace(lv, winograd=winograd) for lv in plain[:3]]
            + [dataclasses.replace(plain[2], winograd=levels) for levels in range(winograd - 1, 0, -1)] + plain[2:])


class MemoryPlanner:
    """Makes a pipeline's MemoryPlans (see the module docstring). mode: "fast" | "balanced" | "low"; budget:
    bytes (or "3GB") above the post-import RSS that a request may reach; compute: the dtype the models compute
    in; quant: "int8" or None; attention: the pipeline's forced attention backend, if any; winograd: how many
    levels of the UNet's convolutions the pipeline would run as Winograd (the machine's tuning measured it
    faster: 1 the full resolution, more the levels below too, as far as their transforms fit beside weights in
    `compute`, runtime/winograd_conv.py; a plan may still give them up); int8_winograd: an int8 UNet's 3×3
    convolutions run as int8 Winograd F(2×2), whose weights are 16/9 of theirs (runtime/quant.py)."""

    def __init__(self, config: ModelConfig, mode: str | None = None, budget: int | str | None = None, *,
                 compute: torch.dtype = torch.float32, quant: str | None = None, attention: str | None = None,
                 device: torch.device | str = "cpu", machine_bytes: int | None = None,
                 facts: ModelFacts | None = None, winograd: int = 0, int8_winograd: bool = False):
        mode = mode or "balanced"
        if mode not in MODES:
            raise SettingError(f"unknown memory mode {mode!r}; use one of: {', '.join(MODES)}")
        self.config, self.mode, self.compute, self.quant = config, mode, compute, quant
        self.int8_winograd = int8_winograd and quant is not None
        self.budget = None if budget is None else parse_bytes(budget)
        self.attention, self.device = attention, torch.device(device)
        self.machine_bytes = machine_bytes if machine_bytes is not None else _machine_memory(self.device)
        self.facts = facts or model_facts(config)
        f = self.facts
        self.winograd = 0 if quant is not None or not any(f.winograd_weights) else levels_that_fit(
            list(f.winograd_weights), f.matrix["unet"] + f.rest["unet"], compute, winograd)
        self._decode_cache: dict[tuple, int] = {}   # meta-device traces of the VAE decode, per size
        w, h = config.default_size, config.default_size
        self.levers = self._choose_levers(w, h)
        self.plan = self.for_request(w, h, 1, guided=True, refuse=False)  # what `fastldm info` shows

    # -- load time --

    def _choose_levers(self, width: int, height: int) -> Levers:
        ladder = _levers(self.config, self.winograd)
        if self.budget is None:
            return ladder[-1] if self.mode == "low" else ladder[0]
        start = len(ladder) - 1 if self.mode == "low" else 0
        for lv in ladder[start:]:
            if self._pick(lv, width, height, 1, True, refuse=False).fits():
                return lv
        return ladder[-1]   # nothing fits the default request: the smallest plan (requests are refused)

    def storage(self, levers: Levers | None = None) -> dict[str, str]:
        lv = levers or self.levers
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        out = {}
        for c in self.facts.matrix:
            widen = lv.widen and self.compute == torch.float32 and not (c == "unet" and self.quant)
            name = names[self.vae_dtype if c == "vae" else self.compute]
            out[c] = "int8" if c == "unet" and self.quant else "fp16 -> fp32" if widen else name
        return out

    @property
    def vae_dtype(self) -> torch.dtype:
        return vae_dtype(self.config, self.compute)

    def storage_dtypes(self) -> dict[str, torch.dtype]:
        """{component: dtype its tensors are loaded in} for components stored in 16 bits and widened."""
        return {c: torch.float16 for c, s in self.storage().items() if s == "fp16 -> fp32"}

    @property
    def staged(self) -> tuple[str, ...]:
        return self.levers.staged

    # -- per request --

    def for_request(self, width: int, height: int, n: int, guided: bool, *, refuse: bool = True
                    ) -> MemoryPlan:
        """The cheapest plan for a (width, height) request of n images (guided: with a CFG batch). With a budget:
        the first that fits, else MemoryBudgetError naming the bytes its smallest plan needs (refuse=False:
        that smallest plan). Balanced without a budget: untiled unless that would not fit the machine's RAM."""
        return self._pick(self.levers, width, height, n, guided, refuse)

    def _pick(self, lv: Levers, width: int, height: int, n: int, guided: bool, refuse: bool) -> MemoryPlan:
        limit = self.budget if self.budget is not None else self.machine_bytes if self.mode == "balanced" else None
        smallest = None
        for batch, tile, tile_budget in self._candidates(width, height, n, guided):
            plan = self._plan(lv, width, height, n, guided, batch, tile, tile_budget)
            if limit is None or plan.peak <= limit:
                return plan
            smallest = plan if smallest is None or plan.peak < smallest.peak else smallest
        if refuse and self.budget is not None:
            raise MemoryBudgetError(
                f"a {width}x{height} request for {n} image{'s' if n > 1 else ''} needs about {_mib(smallest.peak)} "
                f"({smallest.peak:,} bytes) at its smallest (stage peaks: "
                + ", ".join(f"{s} {_mib(b)}" for s, b in smallest.peaks)
                + f"), more than the memory budget of {_mib(self.budget)} ({self.budget:,} bytes); ask for a "
                  f"smaller size or fewer images, or give a larger budget", needed=smallest.peak, budget=self.budget)
        return smallest

    def _candidates(self, width: int, height: int, n: int, guided: bool):
        """(UNet rows per call, VAE tile, tile checkpoint budget) in order of speed cost."""
        rows = 2 * n if guided else n
        batches = [None] + sorted({b for b in (n, 1) if b < rows}, reverse=True)
        if self.mode == "low":
            yield batches[-1], TILE, TILE_BUDGET
            return
        yield None, None, None
        if self.budget is None:
            if self.mode == "balanced":
                yield None, TILE, TILE_BUDGET
            return
        for batch in batches:
            if batch is not None:
                yield batch, None, None
            yield batch, TILE, TILE_BUDGET

    @property
    def winograd_levels(self) -> int:
        """How many levels of the UNet's convolutions, from the full resolution down, the load-time plan keeps as
        Winograd."""
        return self.levers.winograd

    def _weights(self, lv: Levers, components) -> int:
        storage = self.storage(lv)
        winograd = self.facts.winograd_bytes(lv.winograd, self.compute) if "unet" in components else 0
        if self.int8_winograd and "unet" in components:  # int8 F(2×2) weights: 16/9 of the int8 ones, 7/9 more
            winograd += 7 * sum(self.facts.winograd_weights) // 9
        return sum(self.facts.weight_bytes(c, storage[c]) for c in components if c in storage) + winograd

    def _overhead(self, tensors: int, component: str, lv: Levers) -> int:
        """Runtime bytes beside a stage's tensors: OVERHEAD_FRACTION of them, OVERHEAD_FIXED, one reordered
        fp32 copy of the largest weight (oneDNN), and for 16-bit weights the widening scratch (chunked layers
        widen at most MAX_WIDEN weights at a time, runtime/weight_storage.py)."""
        largest = self.facts.largest[component]
        if self.device.type == "cuda":   # cuDNN's workspaces; no weight reorders
            return int(CUDA_OVERHEAD_FRACTION * tensors) + CUDA_OVERHEAD_FIXED
        if self.storage(lv)[component] == "fp16 -> fp32":
            largest = min(largest, MAX_WIDEN)
            return int(OVERHEAD_FRACTION * tensors) + OVERHEAD_FIXED + 2 * 4 * largest
        return int(OVERHEAD_FRACTION * tensors) + OVERHEAD_FIXED + 4 * largest

    def _plan(self, lv: Levers, width: int, height: int, n: int, guided: bool, batch: int | None,
              tile: int | None, tile_budget: int | None) -> MemoryPlan:
        from .tiled_vae import decode_peak_bytes, tiled_decode_peak_bytes

        f = self.facts
        staged = lv.staged
        resident = tuple(c for c in f.matrix if c not in staged)
        scale = self.config.vae_scale
        h, w = height // scale, width // scale
        rows = (2 * n if guided else n) if batch is None else batch
        itemsize = torch.empty((), dtype=self.compute).element_size()
        unet_tensors = int(f.unet_per_row_pixel * rows * h * w * itemsize / 4)
        if lv.winograd:   # a Winograd layer's V and M beside its output, which the trace counts
            unet_tensors += max(buffer_bytes(rows, -(-h // 2 ** level), -(-w // 2 ** level),
                                             f.winograd_channels[level], self.compute) for level in range(lv.winograd))
        attention = "fused (no N×N scores)"
        if self.attention == "reference":
            scores = rows * f.unet_attention_heads * (h * w) ** 2 * itemsize
            unet_tensors += scores
            attention = f"reference (writes {_mib(scores)} of N×N scores)"
        vae = self.config.vae
        image = 2 * n * 4 * width * height    # the decoded image, and its float numpy copy
        key = (h, w, n, tile, tile_budget)
        if key not in self._decode_cache:
            self._decode_cache[key] = (
                decode_peak_bytes(vae, h, w, self.vae_dtype, n) if tile is None else
                tiled_decode_peak_bytes(vae, h, w, tile, tile_budget, self.vae_dtype, n))
        decode_tensors = self._decode_cache[key]
        # The largest tensor of a load: a file's 16-bit tensor and its fp32 conversion (on a GPU, the converted
        # tensor arrives as the weights do: one tensor beside them).
        largest = max((f.largest[c] for c in resident), default=0)
        load_peak = self._weights(lv, resident) + (4 if self.device.type == "cuda" else 6) * largest
        # An int8 UNet is quantized layer by layer as it is read (api.load with a memory plan): the float
        # weights are held one layer at a time, so its load peaks at about its int8 size.
        text = [c for c in TEXT if c in f.matrix]
        peaks = {
            "load": load_peak,
            "text": self._weights(lv, set(resident) | set(text)) + TEXT_TENSORS
            + max(self._overhead(TEXT_TENSORS, c, lv) for c in text),
            "denoise": self._weights(lv, set(resident) | {"unet"}) + unet_tensors
            + self._overhead(unet_tensors, "unet", lv),
            "decode": self._weights(lv, set(resident) | {"vae"}) + decode_tensors + image
            + self._overhead(decode_tensors, "vae", lv),
        }
        return MemoryPlan(mode=self.mode, budget=self.budget, level=lv.level, resident=resident, staged=staged,
                          storage=tuple(self.storage(lv).items()), attention=attention, unet_batch=batch,
                          vae_tile=tile, vae_tile_budget=tile_budget, peaks=tuple(peaks.items()), width=width,
                          height=height, n=n, guided=guided,
                          winograd=f.winograd_bytes(lv.winograd, self.compute), winograd_levels=lv.winograd)


def _levels(n: int) -> str:
    """Words for the first `n` levels of a UNet's resolutions."""
    return {1: "full-resolution", 2: "full- and half-resolution"}.get(n, f"the first {n} levels'")


def _machine_memory(device: torch.device) -> int:
    """The memory a plan must fit: the GPU's free memory plus what this process already holds there, or the
    machine's RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device)
    return _physical_memory()


def _physical_memory() -> int:
    """This machine's RAM (bytes), or a very large number where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62

__all__ = ["MODES", "MemoryPlan", "MemoryPlanner", "ModelFacts", "parse_bytes"]
