// Winograd F(2×2, 3×3) input and output transforms for CPUs with native bf16, channels_last, bf16 in and out.
//
// Per 2×2 output tile, Y = Aᵀ [ Σ_c U_c ⊙ (Bᵀ d_c B) ] A (Lavin & Gray 2016, §4.1), d_c the 4×4 input tile
// of channel c and U_c = G g_c Gᵀ its transformed filter, with
//   Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  Aᵀ = [1 1 1 0; 0 1 -1 -1].
// Their entries are 0 and ±1 (G's are ½), so the transformed tiles V = Bᵀ d B, the filters U and the GEMMs'
// products M may all be held in bf16 at the cost of one rounding each, and the Σ_c — 16 GEMMs
// V (16, P, C) · U (16, C, K) -> M (16, P, K), P the tiles, which torch.bmm runs (winograd_f2_cpu.py) — run
// at the bf16 rate with fp32 accumulators. (F(4×4)'s entries reach 5 and 8 and cancel: it must stay fp32,
// csrc/winograd_cpu.cpp.) This file does the two element-wise ends around the GEMMs:
//   winograd_f2_input:  x (B, C, H, W) channels_last -> V[4i + j, p, c] = (Bᵀ d B)[i][j]
//   winograd_f2_output: M (16, P, K) -> y (B, K, H, W) channels_last, y = Aᵀ M A + bias, cropped to H × W
// i runs down the image, j across it; each transform sums in fp32 and rounds once.
//
// Channels lie along the SIMD lanes (channels_last makes them contiguous), so a tile's 16 values are 16
// vectors — 32 bf16 channels, widened to two fp32 vectors — and any channel count works (a partial last
// vector is loaded and stored with a count). Tiles are split between torch's intra-op threads. Tiles past
// the image's edge read zeros (the padding) and write nothing, so H and W need not be even.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "winograd_tiles.h"

namespace {

using Vec = at::vec::Vectorized<float>;
using BVec = at::vec::Vectorized<c10::BFloat16>;
using bf16 = c10::BFloat16;

// Bᵀ applied to four values d[0], d[s], d[2s], d[3s] -> r[0], r[rs], r[2rs], r[3rs].
inline void input_rows(const Vec* d, int64_t s, Vec* r, int64_t rs) {
  const Vec d1 = d[s], d2 = d[2 * s];
  r[0] = d[0] - d2;
  r[rs] = d1 + d2;
  r[2 * rs] = d2 - d1;
  r[3 * rs] = d1 - d[3 * s];
}

// Aᵀ applied to four values m[0], m[s], m[2s], m[3s] -> two outputs o[0], o[os].
inline void output_rows(const Vec* m, int64_t s, Vec* o, int64_t os) {
  const Vec m1 = m[s], m2 = m[2 * s];
  o[0] = m[0] + m1 + m2;
  o[os] = m1 - m2 - m[3 * s];
}

using fastldm::Tiles;

Tiles tiles(int64_t B, int64_t H, int64_t W) { return Tiles(B, H, W, 2); }

// x (B, C, H, W) bf16 channels_last -> V (16, P, C) bf16, P = B · ⌈H/2⌉ · ⌈W/2⌉ in (b, tile row, tile col) order.
void input_tiles(const bf16* in, bf16* out, const Tiles& t, int64_t C) {
  const int64_t P = t.count();
  constexpr int64_t L = BVec::size();  // bf16 lanes: two fp32 vectors
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    Vec lo[16], hi[16], r[16];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / (t.nH * t.nW), y0 = (p / t.nW) % t.nH * 2 - 1, x0 = p % t.nW * 2 - 1;
      for (int64_t c = 0; c < C; c += L) {
        const int64_t n = std::min(L, C - c);
        for (int64_t i = 0; i < 4; ++i) {
          const int64_t y = y0 + i;
          for (int64_t j = 0; j < 4; ++j) {
            const int64_t xx = x0 + j;
            if (y < 0 || y >= t.H || xx < 0 || xx >= t.W) {
              lo[4 * i + j] = hi[4 * i + j] = Vec(0.f);
            } else {
              const BVec v = BVec::loadu(in + ((b * t.H + y) * t.W + xx) * C + c, n);
              std::tie(lo[4 * i + j], hi[4 * i + j]) = at::vec::convert_to_float<bf16>(v);
            }
          }
        }
        for (Vec* d : {lo, hi}) {
          for (int64_t j = 0; j < 4; ++j) input_rows(d + j, 4, r + j, 4);          // Bᵀ d, down each column
          for (int64_t i = 0; i < 4; ++i) input_rows(r + 4 * i, 1, d + 4 * i, 1);  // (Bᵀ d) B, along each row
        }
        for (int64_t k = 0; k < 16; ++k)
          at::vec::convert_from_float<bf16>(lo[k], hi[k]).store(out + (k * P + p) * C + c, n);
      }
    }
  });
}

at::Tensor winograd_f2_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16, "winograd_f2_input: x must be a 4-D bfloat16 tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "winograd_f2_input: x must be channels_last");
  const int64_t C = x.size(1);
  const Tiles t = tiles(x.size(0), x.size(2), x.size(3));
  at::Tensor v = at::empty({16, t.count(), C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (t.count() > 0 && C > 0) input_tiles(x.data_ptr<bf16>(), v.data_ptr<bf16>(), t, C);
  return v;
}

// M (16, P, K) bf16 contiguous, the tiles of a (B, ·, H, W) image -> y (B, K, H, W) channels_last bf16,
// y = Aᵀ M A + bias, summed in fp32 and rounded once.
void output_tiles(const bf16* in, const float* bp, bf16* out, const Tiles& t, int64_t K) {
  const int64_t P = t.count();
  constexpr int64_t L = BVec::size();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    Vec lo[16], hi[16], s[8], ylo[4], yhi[4];  // M's planes and y's 2×2 outputs, low and high 16 channels
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / (t.nH * t.nW), y0 = (p / t.nW) % t.nH * 2, x0 = p % t.nW * 2;
      const int64_t ny = std::min<int64_t>(2, t.H - y0), nx = std::min<int64_t>(2, t.W - x0);
      for (int64_t c = 0; c < K; c += L) {
        const int64_t n = std::min(L, K - c);
        for (int64_t k = 0; k < 16; ++k)
          std::tie(lo[k], hi[k]) = at::vec::convert_to_float<bf16>(BVec::loadu(in + (k * P + p) * K + c, n));
        for (int64_t h = 0; h < 2; ++h) {
          Vec *m = h ? hi : lo, *y = h ? yhi : ylo;
          for (int64_t i = 0; i < 4; ++i) output_rows(m + 4 * i, 1, s + 2 * i, 1);  // M A, along each row: (4, 2)
          for (int64_t j = 0; j < 2; ++j) output_rows(s + j, 2, y + j, 2);          // Aᵀ (M A), down each column
        }
        Vec blo(0.f), bhi(0.f);
        if (bp != nullptr) {
          blo = Vec::loadu(bp + c, std::min<int64_t>(n, Vec::size()));
          if (n > Vec::size()) bhi = Vec::loadu(bp + c + Vec::size(), n - Vec::size());
        }
        for (int64_t yy = 0; yy < ny; ++yy)
          for (int64_t xx = 0; xx < nx; ++xx)
            at::vec::convert_from_float<bf16>(ylo[2 * yy + xx] + blo, yhi[2 * yy + xx] + bhi)
                .store(out + ((b * t.H + y0 + yy) * t.W + x0 + xx) * K + c, n);
      }
    }
  });
}

// The bias may be float32 or bfloat16.
at::Tensor winograd_f2_output(const at::Tensor& m, const std::optional<at::Tensor>& bias, int64_t B, int64_t H,
                              int64_t W) {
  TORCH_CHECK(m.dim() == 3 && m.size(0) == 16 && m.scalar_type() == at::kBFloat16 && m.is_contiguous(),
              "winograd_f2_output: M must be a contiguous (16, P, K) bfloat16 tensor");
  const Tiles t = tiles(B, H, W);
  const int64_t P = t.count(), K = m.size(2);
  fastldm::check_tiles(m, t, "winograd_f2_output");
  const at::Tensor b32 = fastldm::bias_fp32(bias, K, "winograd_f2_output");
  at::Tensor y = at::empty({B, K, H, W}, m.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (P == 0 || K == 0) return y;
  output_tiles(m.data_ptr<bf16>(), b32.defined() ? b32.data_ptr<float>() : nullptr, y.data_ptr<bf16>(), t, K);
  return y;
}

}  // namespace

// The schemas (fastldm::winograd_f2_input, fastldm::winograd_f2_output) are defined in winograd_f2_cpu.py.
TORCH_LIBRARY_IMPL(fastldm, CPU, m) {
  m.impl("winograd_f2_input", &winograd_f2_input);
  m.impl("winograd_f2_output", &winograd_f2_output);
}
