// Row softmax of int32 attention scores into 8-bit probabilities, for int8 attention (int8_attention_cpu.py).
//
// Between its two integer GEMMs (q·kᵀ and P·v, both oneDNN's via torch._int_mm) int8 attention needs, per row
// r of a block of scores s (R, M) = q_int8 · k_int8ᵀ whose real value is a_r · b_j · s_j (a: q's per-token
// scales, b: k's):
//   p_j = 2^(c · (b_j s_j − m)) with m = max_j b_j s_j and c = a_r · log2 e, so max_j p = 1;
//   level_j = round(255 · p_j) ∈ [0, 255], stored as the int8 level_j − 128 (torch._int_mm multiplies signed
//   int8 only; the caller adds back 128 · Σ_j v_j);
//   L = Σ_j level_j, returned, for the caller's normalisation out = (Σ_j level_j v_j) / L.
// Normalising by the sum of the rounded levels (not of the exact p) keeps each output a convex combination of
// v's rows. Per row two passes over data in the core's caches: the max, then exp2 (vec_exp2.h's degree-3
// polynomial: 7.5e-5 relative, far below a level's 1/255), the rounding and the narrowing to bytes (AVX-512's
// vpmovdb, AVX2's packs; a scalar loop there took as long as the rest). Rows are split over torch's intra-op
// threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "vec_bytes.h"
#include "vec_exp2.h"

namespace {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int64_t kLanes = Vec::size();
static_assert(IVec::size() == kLanes, "int32 and fp32 vectors have the same lanes");
constexpr int64_t kPair = 2 * kLanes;

// One row: s (M) scores, b (M) their per-key scales, c the row's scale times log2 e; writes p (M) and returns
// Σ level (see the top).
float softmax_row(const int32_t* s, const float* b, int8_t* p, int64_t M, float c) {
  const auto logit = [&](int64_t j) {  // b_j s_j: s is an integer below 2^24 in magnitude, exact in fp32
    return at::vec::convert_to_fp_of_same_size<float>(IVec::loadu(s + j)) * Vec::loadu(b + j);
  };
  Vec mv(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= M; j += kLanes) mv = at::vec::maximum(mv, logit(j));
  float lanes[kLanes];
  mv.store(lanes);
  float m = *std::max_element(lanes, lanes + kLanes);
  for (; j < M; ++j) m = std::max(m, b[j] * static_cast<float>(s[j]));

  const Vec cv(c), shift(-c * m), full(255.f);
  const IVec offset(128);
  IVec total(0);
  const auto level = [&](int64_t j) {
    const IVec q = at::vec::convert_to_int_of_same_size(
        (fastldm::exp2_poly<3>(at::vec::fmadd(logit(j), cv, shift)) * full).round());
    total = total + q;
    return q - offset;
  };
  for (j = 0; j + kPair <= M; j += kPair) fastldm::store_bytes(p + j, level(j), level(j + kLanes));
  int32_t counts[kLanes];
  total.store(counts);
  int64_t sum = 0;
  for (int64_t t = 0; t < kLanes; ++t) sum += counts[t];
  for (; j < M; ++j) {
    const float x = b[j] * static_cast<float>(s[j]);
    const int32_t q = static_cast<int32_t>(std::nearbyint(255.f * std::exp2(c * x - c * m)));
    p[j] = static_cast<int8_t>(q - 128);
    sum += q;
  }
  return static_cast<float>(sum);
}

// scores (R, M) int32 with unit stride along M, row_scale (R,) and col_scale (M,) fp32 -> p (R, M) int8
// contiguous and levels (R,) fp32, written in place (the caller keeps them across blocks: a fresh multi-MB buffer
// per block costs its page faults every time).
void int8_softmax_(const at::Tensor& scores, const at::Tensor& row_scale, const at::Tensor& col_scale, at::Tensor& p,
                   at::Tensor& levels) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kInt, "int8_softmax_: scores must be (R, M) int32");
  TORCH_CHECK(scores.stride(1) == 1 || scores.size(1) <= 1, "int8_softmax_: scores need unit stride along rows");
  const int64_t R = scores.size(0), M = scores.size(1);
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == R && row_scale.scalar_type() == at::kFloat,
              "int8_softmax_: row_scale must be (R,) float32");
  TORCH_CHECK(col_scale.dim() == 1 && col_scale.size(0) == M && col_scale.scalar_type() == at::kFloat,
              "int8_softmax_: col_scale must be (M,) float32");
  TORCH_CHECK(p.scalar_type() == at::kChar && p.is_contiguous() && p.dim() == 2 && p.size(0) == R &&
              p.size(1) == M, "int8_softmax_: p must be a contiguous (R, M) int8 tensor");
  TORCH_CHECK(levels.scalar_type() == at::kFloat && levels.is_contiguous() && levels.numel() == R,
              "int8_softmax_: levels must be a contiguous (R,) float32 tensor");
  const at::Tensor rs = row_scale.contiguous(), cs = col_scale.contiguous();
  const int32_t* s = scores.data_ptr<int32_t>();
  const float* a = rs.data_ptr<float>();
  const float* b = cs.data_ptr<float>();
  int8_t* out = p.data_ptr<int8_t>();
  float* ls = levels.data_ptr<float>();
  const int64_t stride = scores.stride(0);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(M, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      ls[r] = softmax_row(s + r * stride, b, out + r * M, M, a[r] * static_cast<float>(M_LOG2E));
  });
}

}  // namespace

// The schema (fastldm::int8_softmax_) is defined in int8_attention_cpu.py; this is its CPU kernel.
TORCH_LIBRARY_IMPL(fastldm, CPU, m) { m.impl("int8_softmax_", &int8_softmax_); }
