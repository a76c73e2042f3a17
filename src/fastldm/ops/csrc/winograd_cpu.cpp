// Winograd F(4×4, 3×3) input and output transforms for CPUs, channels_last; fp32 arithmetic, fp32 or bf16 images.
//
// A 3×3, stride-1, padding-1 convolution is, per 4×4 output tile, Y = Aᵀ [ Σ_c U_c ⊙ (Bᵀ d_c B) ] A
// (Lavin & Gray 2016), d_c the 6×6 input tile of channel c and U_c = G g_c Gᵀ its transformed filter. Over
// all tiles the Σ_c is 36 independent GEMMs, V (36, P, C) · U (36, C, K) -> M (36, P, K) with P the tiles,
// which BLAS runs (winograd_cpu.py); this file does the two element-wise ends around them:
//   winograd_input:  x (B, C, H, W) channels_last -> V[6i + j, p, c] = (Bᵀ d B)[i][j]
//   winograd_output: M (36, P, K) -> y (B, K, H, W) channels_last, y = Aᵀ M A + bias, cropped to H × W
// i runs down the image, j across it. The matrices are those of fastldm/ops/winograd.py (interpolation
// points 0, ±1, ±2, ∞), written out as the adds and shifts they are.
//
// Channels lie along the SIMD lanes (channels_last makes them contiguous), so a tile's 36 values are 36
// vectors: no shuffles, and any channel count (a partial last vector is loaded and stored with a count).
// Tiles are split between torch's intra-op threads. Tiles past the image's edge read zeros (the padding)
// and write nothing, so H and W need not be multiples of 4.
//
// A bf16 image is widened to fp32 as it is read and the result rounded to bf16 as it is written: V, U and M
// stay fp32, so a bf16 model's Winograd layer rounds only its output, as a bf16 direct convolution does
// (transforming in bf16 would cost ~10 % of max|y|: winograd.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "winograd_tiles.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// Bᵀ applied to a column of six values d[0], d[s], ..., d[5s] -> r[0], r[rs], ..., r[5rs].
inline void input_rows(const Vec* d, int64_t s, Vec* r, int64_t rs) {
  const Vec d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s], d4 = d[4 * s], d5 = d[5 * s];
  const Vec four(4.f), five(5.f), two(2.f);
  r[0] = at::vec::fmadd(four, d0, d4 - five * d2);
  r[rs] = (d3 + d4) - four * (d1 + d2);
  r[2 * rs] = at::vec::fmadd(four, d1 - d2, d4 - d3);
  r[3 * rs] = at::vec::fmadd(two, d3 - d1, d4 - d2);
  r[4 * rs] = (d4 - d2) - two * (d3 - d1);
  r[5 * rs] = at::vec::fmadd(four, d1, d5 - five * d3);
}

// Aᵀ applied to six values m[0], m[s], ..., m[5s] -> four outputs o[0], o[os], o[2os], o[3os].
inline void output_rows(const Vec* m, int64_t s, Vec* o, int64_t os) {
  const Vec m1 = m[s], m2 = m[2 * s], m3 = m[3 * s], m4 = m[4 * s];
  const Vec sum12 = m1 + m2, dif12 = m1 - m2, sum34 = m3 + m4, dif34 = m3 - m4;
  o[0] = m[0] + sum12 + sum34;
  o[os] = at::vec::fmadd(Vec(2.f), dif34, dif12);
  o[2 * os] = at::vec::fmadd(Vec(4.f), sum34, sum12);
  o[3 * os] = at::vec::fmadd(Vec(8.f), dif34, dif12) + m[5 * s];
}

// n (≤ kLanes) values at p as fp32 lanes, the rest zero.
inline Vec load(const float* p, int64_t n) { return Vec::loadu(p, n); }
inline Vec load(const c10::BFloat16* p, int64_t n) {
  float wide[kLanes];
  for (int64_t i = 0; i < n; ++i) wide[i] = static_cast<float>(p[i]);
  return Vec::loadu(wide, n);
}

// The first n lanes of v to p, rounded to nearest-even for bf16.
inline void store(const Vec& v, float* p, int64_t n) { v.store(p, n); }
inline void store(const Vec& v, c10::BFloat16* p, int64_t n) {
  float wide[kLanes];
  v.store(wide, n);
  for (int64_t i = 0; i < n; ++i) p[i] = c10::BFloat16(wide[i]);
}

using fastldm::Tiles;

Tiles tiles(int64_t B, int64_t H, int64_t W) { return Tiles(B, H, W, 4); }

// x (B, C, H, W) channels_last -> V (36, P, C) fp32, P = B · ⌈H/4⌉ · ⌈W/4⌉ tiles in (b, tile row, tile col) order.
template <typename T>
void input_tiles(const T* in, float* out, const Tiles& t, int64_t C) {
  const int64_t P = t.count();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    Vec d[36], u[36];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / (t.nH * t.nW), y0 = (p / t.nW) % t.nH * 4 - 1, x0 = p % t.nW * 4 - 1;
      for (int64_t c = 0; c < C; c += kLanes) {
        const int64_t n = std::min(kLanes, C - c);
        for (int64_t i = 0; i < 6; ++i) {
          const int64_t y = y0 + i;
          for (int64_t j = 0; j < 6; ++j) {
            const int64_t xx = x0 + j;
            d[6 * i + j] = (y < 0 || y >= t.H || xx < 0 || xx >= t.W)
                               ? Vec(0.f)
                               : load(in + ((b * t.H + y) * t.W + xx) * C + c, n);
          }
        }
        for (int64_t j = 0; j < 6; ++j) input_rows(d + j, 6, u + j, 6);          // Bᵀ d, down each column
        for (int64_t i = 0; i < 6; ++i) input_rows(u + 6 * i, 1, d + 6 * i, 1);  // (Bᵀ d) B, along each row
        for (int64_t k = 0; k < 36; ++k) d[k].store(out + (k * P + p) * C + c, n);
      }
    }
  });
}

at::Tensor winograd_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "winograd_input: x must be a 4-D float32 or bfloat16 tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "winograd_input: x must be channels_last");
  const int64_t C = x.size(1);
  const Tiles t = tiles(x.size(0), x.size(2), x.size(3));
  at::Tensor v = at::empty({36, t.count(), C}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  if (t.count() == 0 || C == 0) return v;
  if (x.scalar_type() == at::kFloat)
    input_tiles(x.data_ptr<float>(), v.data_ptr<float>(), t, C);
  else
    input_tiles(x.data_ptr<c10::BFloat16>(), v.data_ptr<float>(), t, C);
  return v;
}

// M (36, P, K) contiguous fp32, the tiles of a (B, ·, H, W) image -> y (B, K, H, W) channels_last, plus bias.
template <typename T>
void output_tiles(const float* in, const float* bp, T* out, const Tiles& t, int64_t K) {
  const int64_t P = t.count();
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    Vec a[36], s[24], o[16];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / (t.nH * t.nW), y0 = (p / t.nW) % t.nH * 4, x0 = p % t.nW * 4;
      const int64_t rows = std::min<int64_t>(4, t.H - y0), cols = std::min<int64_t>(4, t.W - x0);
      for (int64_t c = 0; c < K; c += kLanes) {
        const int64_t n = std::min(kLanes, K - c);
        for (int64_t k = 0; k < 36; ++k) a[k] = Vec::loadu(in + (k * P + p) * K + c, n);
        for (int64_t i = 0; i < 6; ++i) output_rows(a + 6 * i, 1, s + 4 * i, 1);  // M A, along each row: (6, 4)
        for (int64_t j = 0; j < 4; ++j) output_rows(s + j, 4, o + j, 4);          // Aᵀ (M A), down each column
        const Vec bv = bp == nullptr ? Vec(0.f) : Vec::loadu(bp + c, n);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < cols; ++j)
            store(o[4 * i + j] + bv, out + ((b * t.H + y0 + i) * t.W + x0 + j) * K + c, n);
      }
    }
  });
}

// dtype: the output's, float32 (default) or bfloat16; the bias may be either.
at::Tensor winograd_output(const at::Tensor& m, const std::optional<at::Tensor>& bias, int64_t B, int64_t H,
                           int64_t W, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(m.dim() == 3 && m.size(0) == 36 && m.scalar_type() == at::kFloat && m.is_contiguous(),
              "winograd_output: M must be a contiguous (36, P, K) float32 tensor");
  const at::ScalarType out_type = dtype.value_or(at::kFloat);
  TORCH_CHECK(out_type == at::kFloat || out_type == at::kBFloat16,
              "winograd_output: dtype must be float32 or bfloat16, got ", out_type);
  const Tiles t = tiles(B, H, W);
  const int64_t P = t.count(), K = m.size(2);
  fastldm::check_tiles(m, t, "winograd_output");
  const at::Tensor b32 = fastldm::bias_fp32(bias, K, "winograd_output");
  at::Tensor y = at::empty({B, K, H, W}, m.options().dtype(out_type).memory_format(at::MemoryFormat::ChannelsLast));
  if (P == 0 || K == 0) return y;
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  if (out_type == at::kFloat)
    output_tiles(m.data_ptr<float>(), bp, y.data_ptr<float>(), t, K);
  else
    output_tiles(m.data_ptr<float>(), bp, y.data_ptr<c10::BFloat16>(), t, K);
  return y;
}

}  // namespace

// The schemas (fastldm::winograd_input, fastldm::winograd_output) are defined in winograd_cpu.py.
TORCH_LIBRARY_IMPL(fastldm, CPU, m) {
  m.impl("winograd_input", &winograd_input);
  m.impl("winograd_output", &winograd_output);
}
