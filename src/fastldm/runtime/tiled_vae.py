"""Seam-free tiled VAE decode and encode: tiles with halos, GroupNorm statistics of the whole image.

The method is "Tiled VAE" (Li Yi & Kahsolt, pkuliyi2015/multidiffusion-upscaler-for-automatic1111,
`scripts/tilevae.py`): cut the latent (or image) into tiles, run the network tile by tile, and at every
GroupNorm — the one op that looks beyond a pixel's neighbourhood — stop, gather each tile's per-group
statistics, and normalise every tile with those of the whole image. No tile gets a tone of its own (diffusers'
`enable_vae_tiling` normalises each tile by itself, and blends the seams that this leaves).

Here the result is meant to *equal* the untiled pass, not approximate it, within a byte budget:

1. **Halos from the receptive field.** The network is a list of `Step`s. Between two GroupNorms it is
   local, so the overlap a tile needs is found by walking the steps back: +k//2 per k×k conv, halved
   (rounded up) across a nearest 2× upsampling, 2n+1 across the encoder's stride-2 conv (and tile edges
   aligned so the stride-2 grids agree). Each tile's *core* — its share of a partition of the latent
   grid — is then computed exactly as in the untiled pass (the published method pads a fixed 11 / 32 px).
2. **Exact statistics.** Per GroupNorm, every tile contributes the count, mean and M2 of each group over its
   core only, merged in float64 (Chan, Golub & LeVeque 1979, pairwise update); the published method averages
   per-tile variances, which omits the spread between tile means.
3. **Checkpoints under a byte budget.** At a GroupNorm, all tiles must stop (a barrier). When the state
   there — the activation and the residuals saved for later adds, full size — fits in `budget` bytes with
   the previous checkpoint (a residual unchanged since then is shared, not copied), the tiles' cores are
   written into full-size tensors and the next segment slices its tiles, halo included, out of them. When
   it does not fit, `stats="exact"` re-runs the tiles from the last checkpoint for each later barrier: cheap
   when a checkpoint a resnet or two back fits (SD at 512², 300 MB: 1.15× the keep-all time, 60 % of the
   untiled peak), ~10× a decode when nothing above the latent resolution fits (levels 1–3 re-run per
   GroupNorm; at 4096² those activations are 2–16 GiB each). `stats="estimate"` instead takes such a
   GroupNorm's statistics from the same tiled run on the input subsampled 2× (recursively, until its states
   fit or it is MIN_ESTIMATE latent pixels a side, which runs exactly): one pass over the full-size tiles
   plus about a third; seam-free (every tile shares them) but not the untiled image (the published "fast
   mode" estimates from a downsampled input in the same way).
4. **Global mid-block attention.** The VAE's mid block attends over every latent position. It runs
   untiled, as in the model: the activation at the latent resolution is assembled, K and V are computed
   for all positions and queries are attended in chunks, written back in place (memory: the activation
   plus K and V). The published method attends within each tile, which changes the result.

Shapes: latents (B, Clat, h, w); images (B, C, 8h, 8w) for SD's 3-level VAE; a level's resolution is `f`
pixels per latent pixel (decoder 1 → 8, encoder 8 → 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import VAEConfig
from ..models.vae import AutoencoderKL, MidBlock, VAEAttention

ATTENTION_CHUNK = 4096  # query tokens per attention call at the latent resolution
STATS = ("exact", "estimate")
MIN_ESTIMATE = 32  # latent pixels per side below which "estimate" stops subsampling and runs exactly


@dataclass(frozen=True)
class Step:
    """One step of a VAE half, as a tile sees it: "conv" (stride 1), "up" (nearest 2× + 3×3 conv), "down"
    (pad (0, 1, 0, 1) + stride-2 3×3 conv), "norm" (GroupNorm [+ SiLU], a barrier), "save" (push the
    activation for a later residual add), "add" (pop, project by `module` if any, add), "attn" (global)."""
    kind: str
    module: nn.Module | None = None


def _resnet(r: nn.Module) -> list[Step]:
    return [Step("save"), Step("norm", r.norm1), Step("conv", r.conv1), Step("norm", r.norm2),
            Step("conv", r.conv2), Step("add", r.conv_shortcut)]


def _mid(m: MidBlock) -> list[Step]:
    return _resnet(m.resnets[0]) + [Step("attn", a) for a in m.attentions] + _resnet(m.resnets[1])


def decoder_steps(vae: AutoencoderKL) -> list[Step]:
    """`vae.decode` as steps: post_quant_conv, conv_in, mid block, up blocks, norm_out, conv_out."""
    d = vae.decoder
    steps = [Step("conv", vae.post_quant_conv), Step("conv", d.conv_in), *_mid(d.mid_block)]
    for block in d.up_blocks:
        steps += [s for r in block.resnets for s in _resnet(r)] + [Step("up", u) for u in block.upsamplers]
    return steps + [Step("norm", d.conv_norm_out), Step("conv", d.conv_out)]


def encoder_steps(vae: AutoencoderKL) -> list[Step]:
    """`vae.encode` up to the moments as steps: conv_in, down blocks, mid block, norm_out, conv_out, quant_conv."""
    e = vae.encoder
    steps = [Step("conv", e.conv_in)]
    for block in e.down_blocks:
        steps += [s for r in block.resnets for s in _resnet(r)] + [Step("down", d) for d in block.downsamplers]
    return steps + [*_mid(e.mid_block), Step("norm", e.conv_norm_out), Step("conv", e.conv_out),
                    Step("conv", vae.quant_conv)]


def _halo(steps: list[Step]) -> tuple[int, int]:
    """(halo, alignment) at the input of `steps` so that their output is exact on a tile's core: the halo in
    pixels of the input's level, and the multiple tile edges must sit on for stride-2 grids to agree."""
    need, align = 0, 1
    for s in reversed(steps):
        if s.kind == "conv":
            need += s.module.kernel_size[0] // 2
        elif s.kind == "up":
            need = -(-(need + 1) // 2)
        elif s.kind == "down":
            need, align = 2 * need + 1, 2 * align
    return need, align


def state_sizes(steps: list[Step], channels: int, f: int) -> list[dict[int, tuple[int, int]]]:
    """Per step index, and one past the end: the distinct full-size tensors of the state at its input — the
    activation and the residuals saved for later adds — as {tensor id: (channels, level f)}. A tensor keeps
    its id from the step that makes it until it is consumed, so two states share what has the same ids."""
    h, stack, sizes = (0, channels, f), [], []
    for i, s in enumerate(steps):
        sizes.append({t[0]: t[1:] for t in [h, *stack]})
        c, f = h[1:]
        if s.kind == "save":
            stack.append(h)
            continue
        if s.kind == "add":
            stack.pop()
        c = s.module.out_channels if s.kind == "conv" else c
        f = 2 * f if s.kind == "up" else f // 2 if s.kind == "down" else f
        h = (i + 1, c, f)  # a new tensor
    return sizes + [{h[0]: h[1:]}]


def _cores(h: int, w: int, tile: int) -> list[tuple[int, int, int, int]]:
    """A partition of the h×w latent grid into near-equal tiles of at most `tile` per side: (y0, y1, x0, x1)."""
    def cuts(n):
        k = -(-n // tile)
        return [round(i * n / k) for i in range(k + 1)]
    ys, xs = cuts(h), cuts(w)
    return [(ys[i], ys[i + 1], xs[j], xs[j + 1]) for i in range(len(ys) - 1) for j in range(len(xs) - 1)]


def _moments(core: torch.Tensor, groups: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) per (batch, group) of `core` (B, C, h, w), float64."""
    x = core.unflatten(1, (groups, -1))  # (B, G, C/G, h, w)
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    var, mean = torch.var_mean(x, dim=(2, 3, 4), correction=0)  # (B, G) each
    n = x[0, 0].numel()
    return n, mean.double(), var.double() * n


def _merge(a, b):
    """Chan et al.'s pairwise update of (count, mean, M2)."""
    if a is None:
        return b
    (na, ma, sa), (nb, mb, sb) = a, b
    n, delta = na + nb, mb - ma
    return n, ma + delta * (nb / n), sa + sb + delta.square() * (na * nb / n)


def _normalize(h: torch.Tensor, gn: nn.GroupNorm, stats) -> torch.Tensor:
    """GroupNorm of `h` (B, C, H, W) with the whole image's (count, mean, M2), then the module's SiLU."""
    n, mean, m2 = stats
    per = h.shape[1] // gn.num_groups
    rstd = (m2 / n + gn.eps).rsqrt().repeat_interleave(per, dim=1)  # (B, C)
    scale = rstd * gn.weight.double()
    shift = gn.bias.double() - mean.repeat_interleave(per, dim=1) * scale
    y = torch.addcmul(shift.to(h.dtype)[:, :, None, None], h, scale.to(h.dtype)[:, :, None, None])
    return F.silu(y, inplace=True) if getattr(gn, "act", None) == "silu" else y


def _attention(m: VAEAttention, x: torch.Tensor, chunk: int = ATTENTION_CHUNK) -> None:
    """x ← x + attention(GroupNorm(x)) over all positions (VAEAttention.forward), in place; x (B, C, H, W).
    K and V are built for every position, queries are attended `chunk` tokens at a time."""
    B, C, H, W = x.shape
    stats = _moments(x, m.group_norm.num_groups)
    tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C), a view of x
    k = x.new_empty(B, H * W, C)
    v = x.new_empty(B, H * W, C)
    for i in range(0, H * W, chunk):
        t = _normalize(tokens[:, i:i + chunk].transpose(1, 2).unsqueeze(-1), m.group_norm, stats)  # (B, C, n, 1)
        t = t.squeeze(-1).transpose(1, 2)  # (B, n, C)
        k[:, i:i + chunk], v[:, i:i + chunk] = m.to_k(t), m.to_v(t)
    for i in range(0, H * W, chunk):
        t = _normalize(tokens[:, i:i + chunk].transpose(1, 2).unsqueeze(-1), m.group_norm, stats)
        q = m.to_q(t.squeeze(-1).transpose(1, 2))  # (B, n, C)
        o = ops.attention(q[:, None], k[:, None], v[:, None])[:, 0]  # one head: (B, 1, n, C) -> (B, n, C)
        tokens[:, i:i + chunk] += m.to_out[0](o)


@dataclass
class _Checkpoint:
    index: int                       # the step the state is the input of
    f: int                           # its level
    h: torch.Tensor                  # full-size activation
    stack: list[torch.Tensor]        # full-size saved residuals

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in {id(t): t for t in [self.h, *self.stack]}.values())


class _Tiling:
    """One tiled run of `steps` over a full input `x` at level `f` (see the module docstring)."""

    def __init__(self, steps: list[Step], x: torch.Tensor, f: int, tile: int, budget: int | None,
                 stats: str = "exact"):
        if stats not in STATS:
            raise ValueError(f"unknown GroupNorm statistics {stats!r}; use one of {', '.join(STATS)}")
        self.steps, self.budget, self.mode, self.x, self.f, self.tile = steps, budget, stats, x, f, tile
        self.smaller: _Tiling | None = None  # the run on the subsampled input (stats="estimate")
        self.lh, self.lw = x.shape[-2] // f, x.shape[-1] // f
        self.cores = _cores(self.lh, self.lw, tile)
        self.sizes = state_sizes(steps, x.shape[1], f)
        self.itemsize, self.batch = x.element_size(), x.shape[0]
        self.ckpt = _Checkpoint(0, f, x, [])
        self.stats: dict[int, tuple] = {}
        self.done = 0  # barriers before this step are processed

    def _new_bytes(self, index: int) -> int:
        """Bytes a checkpoint at step `index` adds to the current one (the tensors they share are not copied)."""
        old = self.sizes[self.ckpt.index]
        return sum(self.batch * c * self.lh * self.lw * f * f * self.itemsize
                   for t, (c, f) in self.sizes[index].items() if t not in old)

    def _segment(self, core, stop: int):
        """Run one tile from the checkpoint to step `stop` (excluded): (activation, residuals, y0, x0, f,
        [(tile view, the checkpoint tensor it views)])."""
        c = self.ckpt
        halo, align = _halo(self.steps[c.index:stop])
        H, W = c.h.shape[-2:]
        y0 = max(0, (core[0] * c.f - halo) // align * align)
        y1 = min(H, -(-(core[1] * c.f + halo) // align) * align)
        x0 = max(0, (core[2] * c.f - halo) // align * align)
        x1 = min(W, -(-(core[3] * c.f + halo) // align) * align)
        h, f = c.h[..., y0:y1, x0:x1], c.f
        stack = [t[..., y0:y1, x0:x1] for t in c.stack]
        views = [(h, c.h), *zip(stack, c.stack)]
        for i in range(c.index, stop):
            s = self.steps[i]
            if s.kind == "save":
                stack.append(h)
            elif s.kind == "norm":
                h = _normalize(h, s.module, self.stats[i])
            elif s.kind == "add":  # h: the conv before it made it; no name keeps the residual past its add
                h = h.add_(stack.pop() if s.module is None else s.module(stack.pop()))
            else:  # conv, up, down
                h = s.module(h)
                if s.kind != "conv":
                    f, y0, x0 = (2 * f, 2 * y0, 2 * x0) if s.kind == "up" else (f // 2, y0 // 2, x0 // 2)
        return h, stack, y0, x0, f, views

    @staticmethod
    def _core_of(t: torch.Tensor, core, y0: int, x0: int, f: int) -> torch.Tensor:
        return t[..., core[0] * f - y0:core[1] * f - y0, core[2] * f - x0:core[3] * f - x0]

    def _pass(self, stop: int, keep: bool, groups: int | None):
        """Every tile to step `stop`: merged moments of the activation's cores (when `groups`), and when `keep`
        the state written into full-size tensors (a new checkpoint)."""
        moments, full = None, None
        for core in self.cores:
            h, stack, y0, x0, f, views = self._segment(core, stop)
            if groups is not None:
                moments = _merge(moments, _moments(self._core_of(h, core, y0, x0, f), groups))
            if keep:
                full = self._store(core, [h, *stack], views, y0, x0, f, full)
            del h, stack, views  # nothing of this tile is held while the next one runs
        if keep:
            whole, order = full
            self.ckpt = _Checkpoint(stop, f, whole[order[0]], [whole[j] for j in order[1:]])
        return moments

    def _store(self, core, state: list[torch.Tensor], views, y0: int, x0: int, f: int, full):
        """Write a tile's state (activation, residuals) into the full-size tensors of a new checkpoint, made
        at the first tile: -> (the distinct full-size tensors, the index of each state entry among them)."""
        distinct = list({id(t): t for t in state}.values())  # a residual saved just now *is* the activation
        # What is still a view of the checkpoint (a residual saved before it) is shared, not copied.
        shared = [next((whole for view, whole in views if view is t), None) for t in distinct]
        if full is None:
            ids = [id(t) for t in distinct]
            full = ([whole if whole is not None else
                     torch.empty(*t.shape[:2], self.lh * f, self.lw * f, dtype=t.dtype, device=t.device,
                                 memory_format=_format(t)) for t, whole in zip(distinct, shared)],
                    [ids.index(id(t)) for t in state])
        for t, dst, whole in zip(distinct, full[0], shared):
            if whole is None:
                self._core_of(dst, core, 0, 0, f).copy_(self._core_of(t, core, y0, x0, f))
        return full

    def advance(self, stop: int) -> None:
        """Process the barriers before step `stop` not yet processed (statistics, checkpoints, attention)."""
        for k in range(self.done, stop):
            s = self.steps[k]
            if s.kind == "attn":
                self._pass(k, keep=True, groups=None)
                if self.ckpt.h is self.x:  # the caller's: attention writes in place
                    self.ckpt.h = self.x.clone()
                _attention(s.module, self.ckpt.h)
                self.ckpt.index = k + 1
            elif s.kind == "norm":
                fits = self.budget is None or self.ckpt.nbytes + self._new_bytes(k) <= self.budget
                self.stats[k] = (self._pass(k, keep=fits, groups=s.module.num_groups)
                                 if fits or self.mode == "exact" else self._estimate(k))
        self.done = max(self.done, stop)

    def _estimate(self, k: int):
        """Statistics of step k from the same run on the input subsampled 2× (stats="estimate")."""
        if self.smaller is None:
            f = self.f
            x = self.x[..., ::2, ::2]
            x = x[..., :x.shape[-2] // f * f, :x.shape[-1] // f * f]
            small = min(x.shape[-2:]) < MIN_ESTIMATE * f  # statistics of a tiny image are not the image's
            budget = max(self.budget - self.ckpt.nbytes, 0)  # what this run's checkpoint leaves
            self.smaller = _Tiling(self.steps, x, f, self.tile, budget, "exact" if small else "estimate")
        self.smaller.advance(k + 1)
        return self.smaller.stats[k]

    def run(self) -> torch.Tensor:
        self.advance(len(self.steps))
        self.smaller = None  # its checkpoints
        self._pass(len(self.steps), keep=True, groups=None)
        return self.ckpt.h


def _format(t: torch.Tensor) -> torch.memory_format:
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


@torch.no_grad()
def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, tile: int = 64, budget: int | None = None,
                 stats: str = "exact") -> torch.Tensor:
    """`vae.decode(z)` tile by tile: z (B, Clat, h, w) in VAE latent units -> image (B, Cimg, 8h, 8w).

    tile: the largest tile side in latent pixels (its halo comes on top). budget: the bytes the full-size
    checkpoints may hold at once (None: keep every one, the fastest; less: see `stats`). stats: "exact"
    recomputes tiles for a GroupNorm whose state does not fit (equal to `vae.decode`), "estimate" takes its
    statistics from the run on the latent subsampled 2× (one pass; seam-free, not equal)."""
    z = z.to(vae.post_quant_conv.weight.dtype)
    return _Tiling(decoder_steps(vae), z, 1, tile, budget, stats).run()


@torch.no_grad()
def tiled_encode(vae: AutoencoderKL, x: torch.Tensor, tile: int = 64, budget: int | None = None,
                 stats: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """`vae.encode(x)` tile by tile: x (B, Cimg, H, W) in [-1, 1], H and W multiples of the VAE's scale ->
    (mean, logvar), each (B, Clat, H/8, W/8). tile (latent pixels), budget and stats as for `tiled_decode`."""
    steps = encoder_steps(vae)
    f = 2 ** sum(s.kind == "down" for s in steps)
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"image size {x.shape[-1]}x{x.shape[-2]} is not a multiple of {f}, the VAE's scale; "
                         f"resize or crop it to a multiple of {f}")
    moments = _Tiling(steps, x.to(vae.quant_conv.weight.dtype), f, tile, budget, stats).run()
    mean, logvar = moments.chunk(2, dim=1)  # (B, Clat, h, w) each
    return mean, logvar.clamp(-30.0, 20.0)


# ---- estimates for a planner ------------------------------------------------------------------------------

def _meta_vae(config: VAEConfig, dtype: torch.dtype, channels_last: bool) -> AutoencoderKL:
    with torch.device("meta"):
        vae = AutoencoderKL(config).to(dtype)
    return vae.to(memory_format=torch.channels_last) if channels_last else vae


def decode_peak_bytes(config: VAEConfig, height: int, width: int, dtype: torch.dtype = torch.float32,
                      batch: int = 1, channels_last: bool = False) -> int:
    """Peak bytes of the intermediate tensors of an untiled `vae.decode` of a (batch, Clat, height, width)
    latent: the MemoryTrace peak of that decode on the meta device at an 8×8 latent, scaled by the area.
    Every activation is proportional to the area; the attention's kernel keeps no N×N scores on CPU or CUDA
    (the meta device's math path does, 0.2% of the 8×8 total). Not counted: the weights, scratch inside ops."""
    from .memory_trace import MemoryTrace

    vae = _meta_vae(config, dtype, channels_last)
    z = torch.empty(batch, config.latent_channels, 8, 8, device="meta", dtype=dtype)
    with torch.no_grad(), MemoryTrace() as trace:
        vae.decode(z)
    return trace.report().peak_bytes * height * width // 64


def tiled_decode_peak_bytes(config: VAEConfig, height: int, width: int, tile: int = 64,
                            budget: int | None = None, dtype: torch.dtype = torch.float32, batch: int = 1,
                            channels_last: bool = False) -> int:
    """An estimate of `tiled_decode`'s peak intermediate bytes (output included) for a (batch, Clat, height,
    width) latent: the most bytes of checkpoints held at once (the decisions `budget` leads to, as in the run),
    or the attention's activation plus K and V, plus one tile's working set, bounded by an untiled decode
    of a tile with the largest halo of any segment that runs (exact stats; "estimate" adds its smaller runs)."""
    steps = decoder_steps(_meta_vae(config, dtype, channels_last))
    sizes = state_sizes(steps, config.latent_channels, 1)
    itemsize = torch.empty((), dtype=dtype).element_size()

    def nbytes(tensors: dict) -> int:
        return sum(batch * c * height * width * f * f * itemsize for c, f in tensors.values())

    held, start, halo = sizes[0], 0, 0
    peak = nbytes(held)
    for k, s in enumerate(steps + [Step("end")]):
        if s.kind not in ("attn", "norm", "end"):
            continue
        new = {t: v for t, v in sizes[k].items() if t not in held}
        keep = s.kind != "norm" or budget is None or nbytes(held) + nbytes(new) <= budget
        level = next(iter(sizes[start].values()))[1]  # of the checkpoint's activation
        halo = max(halo, -(-_halo(steps[start:k])[0] // level))  # in latent pixels
        if keep:
            peak = max(peak, nbytes(held) + nbytes(new))
            held, start = sizes[k], k
        if s.kind == "attn":
            peak = max(peak, 3 * nbytes(held))  # the activation, K and V
            held, start = sizes[k + 1], k + 1
    t = min(tile + 2 * halo, max(height, width))
    return peak + decode_peak_bytes(config, min(t, height), min(t, width), dtype, batch, channels_last)
