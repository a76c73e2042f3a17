// GEGLU for CPUs in one pass: x (rows, 2F) -> y (rows, F), y = value · GELU(gate), value and gate the two halves
// of each row (Shazeer 2020), GELU the exact one, x · Φ(x) = x/2 · (1 + erf(x/√2)).
//
// The plain-PyTorch form (ops/reference.py) makes three passes over (rows, F): a contiguous copy of the gate,
// GELU in place, the product in place, each rounding to the model's dtype. Here each row's value and gate are
// read once, widened to fp32 (bf16 through ATen's conversions), combined in fp32 and the result rounded once.
// Rows are split between torch's intra-op threads; any F (a partial last vector is loaded and stored with a
// count).
//
// erf is the one ATen's vectorised erf (and so torch's CPU GELU) computes, Abramowitz & Stegun 7.1.26
// (|error| ≤ 1.5e-7), with exp(−x²) as 2^(−x²·log2 e) through vec_exp2.h's polynomial (2.3e-7 relative) in place
// of Sleef's expf: the exponential was most of the pass's time, which is compute-bound (one erf per output).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "vec_exp2.h"

namespace {

using Vec = at::vec::Vectorized<float>;

// erf(x) = sign(x) · (1 − t · r(t) · exp(−x²)), t = 1 / (1 + p·|x|) (Abramowitz & Stegun 7.1.26).
inline Vec erf(const Vec& x) {
  const Vec a = x.abs(), one(1.f);
  const Vec t = one / at::vec::fmadd(Vec(0.3275911f), a, one);
  Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  r = at::vec::fmadd(r, t, Vec(1.421413741f));
  r = at::vec::fmadd(r, t, Vec(-0.284496736f));
  r = at::vec::fmadd(r, t, Vec(0.254829592f));
  const Vec e = fastldm::exp2_poly<5>(Vec(-1.44269504088896340736f) * a * a);  // exp(−x²)
  const Vec y = one - r * t * e;
  return at::vec::Vectorized<float>::blendv(y, Vec(0.f) - y, x < Vec(0.f));
}

inline Vec geglu(const Vec& value, const Vec& gate) {
  return value * (Vec(0.5f) * gate * (Vec(1.f) + erf(gate * Vec(0.70710678118654752440f))));
}

// x rows of 2F values `stride` apart -> y rows of F contiguous values.
void rows_fp32(const float* x, int64_t stride, float* y, int64_t rows, int64_t F) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *v = x + r * stride, *g = v + F;
      for (int64_t c = 0; c < F; c += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), F - c);
        geglu(Vec::loadu(v + c, n), Vec::loadu(g + c, n)).store(y + r * F + c, n);
      }
    }
  });
}

void rows_bf16(const c10::BFloat16* x, int64_t stride, c10::BFloat16* y, int64_t rows, int64_t F) {
  using BVec = at::vec::Vectorized<c10::BFloat16>;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const c10::BFloat16 *v = x + r * stride, *g = v + F;
      for (int64_t c = 0; c < F; c += BVec::size()) {
        const int64_t n = std::min<int64_t>(BVec::size(), F - c);
        auto [v0, v1] = at::vec::convert_to_float<c10::BFloat16>(BVec::loadu(v + c, n));
        auto [g0, g1] = at::vec::convert_to_float<c10::BFloat16>(BVec::loadu(g + c, n));
        at::vec::convert_from_float<c10::BFloat16>(geglu(v0, g0), geglu(v1, g1)).store(y + r * F + c, n);
      }
    }
  });
}

// x (..., 2F) float32 or bfloat16 -> y (..., F) contiguous.
at::Tensor geglu_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "geglu_cpu: the last dim must be even (value and gate)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "geglu_cpu: dtype must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t F = x.size(-1) / 2, rows = x.numel() / std::max<int64_t>(1, x.size(-1));
  at::Tensor flat = x.reshape({rows, 2 * F});  // a view where rows are evenly spaced, else a contiguous copy
  if (flat.stride(1) != 1) flat = flat.contiguous();  // the kernel reads each row's values side by side
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = F;
  at::Tensor y = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (rows == 0 || F == 0) return y;
  if (x.scalar_type() == at::kFloat)
    rows_fp32(flat.data_ptr<float>(), flat.stride(0), y.data_ptr<float>(), rows, F);
  else
    rows_bf16(flat.data_ptr<c10::BFloat16>(), flat.stride(0), y.data_ptr<c10::BFloat16>(), rows, F);
  return y;
}

}  // namespace

// The schema (fastldm::geglu_cpu) is defined in geglu_cpu.py.
TORCH_LIBRARY_IMPL(fastldm, CPU, m) { m.impl("geglu_cpu", &geglu_cpu); }
