// Dynamic per-tensor uint8 quantization of an int8 layer's input (runtime/quant.py `quantize_activation`):
//   lo = min(min x, 0), hi = max(max x, 0), scale = max((hi − lo) / 255, 1e-12), zero = clamp(round(−lo/scale)),
//   q = clamp(round(x / scale + zero), 0, 255) as uint8,
// with the formula's own operations in fp32 (a division, not a multiply by 1/scale, and round half to even), so
// the result is bit for bit the reference's. Two passes over x: a min/max reduction split over torch's threads,
// then the quantization (narrowed to bytes by AVX-512's vpmovdb, or AVX2's packs).
//
// Why not TorchInductor's fusion of the same function (what int8 layers ran before): its kernels are as good, but
// every call also pays TorchDynamo's guards and the compiled region's entry, ~0.1 ms a call, ~18 ms of a 256² SD
// 1.5 int8 UNet call with its ~200 quantized inputs (docs/benchmarks.md, "int8 attention").
//
// x must be non-overlapping and dense (any memory format): it is read, and q written with the same strides, as
// one flat array.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "vec_bytes.h"

namespace {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kPair = 2 * kLanes;
constexpr int64_t kGrain = 1 << 16;          // values per task: a thread's start costs little against them

// Values of x as fp32 vectors: a pair of whole vectors (kPair values), or the first n ≤ kLanes of one.
template <typename scalar_t>
struct In;

template <>
struct In<float> {
  static void load2(const float* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kLanes);
  }
  static Vec load(const float* p, int64_t n) { return Vec::set(Vec(0.f), Vec::loadu(p, n), n); }
};

template <>
struct In<c10::BFloat16> {
  using BVec = at::vec::Vectorized<c10::BFloat16>;
  static_assert(BVec::size() == kPair, "a bf16 vector holds two fp32 vectors' values");
  static void load2(const c10::BFloat16* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<c10::BFloat16>(BVec::loadu(p));
  }
  static Vec load(const c10::BFloat16* p, int64_t n) {
    return Vec::set(Vec(0.f), std::get<0>(at::vec::convert_to_float<c10::BFloat16>(BVec::loadu(p, n))), n);
  }
};

template <typename scalar_t>
std::tuple<float, float> min_max(const scalar_t* x, int64_t n) {
  using in = In<scalar_t>;
  const int64_t tasks = (n + kGrain - 1) / kGrain;
  std::vector<float> lo(tasks, 0.f), hi(tasks, 0.f);  // 0 in both: the range always includes it
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      Vec mn(0.f), mx(0.f), a, b;
      const int64_t stop = std::min(n, (t + 1) * kGrain);
      int64_t j = t * kGrain;
      for (; j + kPair <= stop; j += kPair) {
        in::load2(x + j, a, b);
        mn = at::vec::minimum(mn, at::vec::minimum(a, b));
        mx = at::vec::maximum(mx, at::vec::maximum(a, b));
      }
      for (; j < stop; j += kLanes) {  // zeros pad the tail: the range includes 0 anyway
        a = in::load(x + j, std::min(kLanes, stop - j));
        mn = at::vec::minimum(mn, a);
        mx = at::vec::maximum(mx, a);
      }
      float u[kLanes], w[kLanes];
      mn.store(u);
      mx.store(w);
      lo[t] = *std::min_element(u, u + kLanes);
      hi[t] = *std::max_element(w, w + kLanes);
    }
  });
  return {*std::min_element(lo.begin(), lo.end()), *std::max_element(hi.begin(), hi.end())};
}

template <typename scalar_t>
void quantize(const scalar_t* x, uint8_t* q, int64_t n, float scale, float zero) {
  using in = In<scalar_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const Vec s(scale), z(zero), top(255.f), bottom(0.f);
    const auto level_of = [&](const Vec& v) {
      return at::vec::convert_to_int_of_same_size(at::vec::clamp(((v / s) + z).round(), bottom, top));
    };
    int64_t j = begin;
    for (; j + kPair <= end; j += kPair) {
      Vec a, b;
      in::load2(x + j, a, b);
      fastldm::store_bytes(q + j, level_of(a), level_of(b));
    }
    int32_t level[kLanes];
    for (; j < end; j += kLanes) {
      const int64_t m = std::min(kLanes, end - j);
      level_of(in::load(x + j, m)).store(level);
      for (int64_t t = 0; t < m; ++t) q[j + t] = static_cast<uint8_t>(level[t]);
    }
  });
}

// x (any shape, fp32 or bf16, non-overlapping and dense) -> (q uint8 with x's strides, scale fp32 0-dim,
// zero point int64 0-dim).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_u8(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quantize_u8: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "quantize_u8: x must be non-overlapping and dense");
  at::Tensor q = at::empty_like(x, x.options().dtype(at::kByte));
  TORCH_CHECK(q.strides() == x.strides(), "quantize_u8: the output did not keep x's strides");
  const int64_t n = x.numel();
  float lo = 0.f, hi = 0.f;
  if (n == 0)
    ;
  else if (x.scalar_type() == at::kFloat)
    std::tie(lo, hi) = min_max(x.data_ptr<float>(), n);
  else
    std::tie(lo, hi) = min_max(x.data_ptr<c10::BFloat16>(), n);
  const float scale = std::max((hi - lo) / 255.f, 1e-12f);
  const float zero = std::min(std::max(std::nearbyint(-lo / scale), 0.f), 255.f);
  if (x.scalar_type() == at::kFloat)
    quantize(x.data_ptr<float>(), q.data_ptr<uint8_t>(), n, scale, zero);
  else
    quantize(x.data_ptr<c10::BFloat16>(), q.data_ptr<uint8_t>(), n, scale, zero);
  return {q, at::scalar_tensor(scale, x.options().dtype(at::kFloat)),
          at::scalar_tensor(static_cast<int64_t>(zero), x.options().dtype(at::kLong))};
}

}  // namespace

// The schema (fastldm::quantize_u8) is defined in quantize_u8_cpu.py; this is its CPU kernel.
TORCH_LIBRARY_IMPL(fastldm, CPU, m) { m.impl("quantize_u8", &quantize_u8); }
