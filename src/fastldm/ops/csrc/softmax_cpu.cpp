// Row softmax for CPUs, in place: x[r, :] = softmax(x[r, :]) for a (rows, M) fp32 or bf16 tensor.
//
// Blocked attention (blocked_attention.py) normalises each block of bf16 scores between its two oneDNN
// GEMMs, and there torch's softmax was the largest part after the GEMMs themselves: 0.46 s of a 4.5 s SD
// 1.5 step at 512² on a 2-core AVX-512 machine, for 1.3 G scores (docs/benchmarks.md, "Results: the AVX-512
// bf16 box"). Per row this kernel makes three passes over data that is in the core's caches:
//   1. m = max_j x_j (bf16 widened to fp32);
//   2. p_j = 2^(c·x_j − c·m) with c = log2 e (one fused multiply-add and exp2_poly, vec_exp2.h: degree 5 for
//      fp32 rows, degree 3 for bf16 rows) into an fp32 row buffer, and their sum l;
//   3. x_j = p_j · (1 / l), rounded once to the row's dtype (on AVX-512 bf16 CPUs by vcvtne2ps2bf16).
// Each pass keeps two vectors in flight (a bf16 vector is two fp32 vectors), for two independent max and sum
// chains. The work is arithmetic, not memory (a block's rows are in the caches): with all three in place a
// (512, 4096) bf16 block took ~20 vector instructions per 16 scores. Rows are split over torch's intra-op
// threads. Precision: fp32 throughout, one rounding to the row's dtype; the sum is reassociated (lane-wise
// partial sums), so the result differs from torch's in the last bits.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <tuple>
#include <type_traits>

#include "vec_exp2.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kPair = 2 * kLanes;  // elements per step of the main loops

// Loads and stores of a row's elements as fp32 vectors: a pair of vectors (kPair elements), or the first n
// ≤ kLanes elements of one (the row's tail).
template <typename scalar_t>
struct Io;

template <>
struct Io<float> {
  static void load2(const float* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kLanes);
  }
  static void store2(float* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + kLanes);
  }
  static Vec load(const float* p, int64_t n) { return Vec::loadu(p, n); }
  static void store(float* p, const Vec& a, int64_t n) { a.store(p, n); }
};

template <>
struct Io<c10::BFloat16> {
  using BVec = at::vec::Vectorized<c10::BFloat16>;
  static_assert(BVec::size() == kPair, "a bf16 vector holds two fp32 vectors' elements");
  static void load2(const c10::BFloat16* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<c10::BFloat16>(BVec::loadu(p));
  }
  static void store2(c10::BFloat16* p, const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
    // one instruction for 32 values (ATen's portable rounding takes ~14); both round to nearest even
    _mm512_storeu_si512(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
#else
    at::vec::convert_from_float<c10::BFloat16>(a, b).store(p);
#endif
  }
  static Vec load(const c10::BFloat16* p, int64_t n) {
    return std::get<0>(at::vec::convert_to_float<c10::BFloat16>(BVec::loadu(p, n)));
  }
  static void store(c10::BFloat16* p, const Vec& a, int64_t n) {
    at::vec::convert_from_float<c10::BFloat16>(a, a).store(p, n);
  }
};

template <typename Op>
inline float reduce(const Vec& v, Op op) {
  float lanes[kLanes];
  v.store(lanes);
  return std::accumulate(lanes + 1, lanes + kLanes, lanes[0], op);
}

// One row of M elements, in place; p: an fp32 buffer of M elements.
template <typename scalar_t>
void softmax_row(scalar_t* x, int64_t M, float* p) {
  using io = Io<scalar_t>;
  constexpr int kDegree = std::is_same_v<scalar_t, float> ? 5 : 3;  // bf16 rows need 2^-9, fp32 rows 2^-23
  const int64_t main = M / kPair * kPair;
  const Vec neg_inf(-std::numeric_limits<float>::infinity());

  Vec m0 = neg_inf, m1 = neg_inf, a, b;
  for (int64_t j = 0; j < main; j += kPair) {
    io::load2(x + j, a, b);
    m0 = at::vec::maximum(m0, a);
    m1 = at::vec::maximum(m1, b);
  }
  for (int64_t j = main; j < M; j += kLanes) {
    const int64_t n = std::min(kLanes, M - j);
    m0 = at::vec::maximum(m0, Vec::set(neg_inf, io::load(x + j, n), n));
  }
  const float m = reduce(at::vec::maximum(m0, m1), [](float u, float w) { return std::max(u, w); });

  const Vec c(static_cast<float>(M_LOG2E)), shift(-m * static_cast<float>(M_LOG2E));
  Vec s0(0.f), s1(0.f);
  for (int64_t j = 0; j < main; j += kPair) {
    io::load2(x + j, a, b);
    a = fastldm::exp2_poly<kDegree>(at::vec::fmadd(a, c, shift));
    b = fastldm::exp2_poly<kDegree>(at::vec::fmadd(b, c, shift));
    a.store(p + j);
    b.store(p + j + kLanes);
    s0 = s0 + a;
    s1 = s1 + b;
  }
  for (int64_t j = main; j < M; j += kLanes) {
    const int64_t n = std::min(kLanes, M - j);
    a = Vec::set(Vec(0.f), fastldm::exp2_poly<kDegree>(at::vec::fmadd(io::load(x + j, n), c, shift)), n);
    a.store(p + j, n);
    s0 = s0 + a;
  }
  const Vec inv(1.f / reduce(s0 + s1, std::plus<float>()));

  for (int64_t j = 0; j < main; j += kPair)
    io::store2(x + j, Vec::loadu(p + j) * inv, Vec::loadu(p + j + kLanes) * inv);
  for (int64_t j = main; j < M; j += kLanes) {
    const int64_t n = std::min(kLanes, M - j);
    io::store(x + j, Vec::loadu(p + j, n) * inv, n);
  }
}

template <typename scalar_t>
void softmax_rows(scalar_t* x, int64_t rows, int64_t stride, int64_t M) {
  // at least ~32 K elements a task, so that a thread's start costs little against its rows
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / M);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> p(new float[M]);
    for (int64_t r = begin; r < end; ++r) softmax_row(x + r * stride, M, p.get());
  });
}

// x (rows, M), unit stride along M: softmax over M, in place; returns x.
at::Tensor& softmax_(at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "softmax_cpu_: x must be (rows, M), got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "softmax_cpu_: dtype must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "softmax_cpu_: x needs unit stride along its rows");
  const int64_t rows = x.size(0), M = x.size(1);
  if (rows == 0 || M == 0) return x;
  if (x.scalar_type() == at::kFloat)
    softmax_rows(x.data_ptr<float>(), rows, x.stride(0), M);
  else
    softmax_rows(x.data_ptr<c10::BFloat16>(), rows, x.stride(0), M);
  return x;
}

}  // namespace

// The schema (fastldm::softmax_cpu_) is defined in softmax_cpu.py; this is its CPU kernel.
TORCH_LIBRARY_IMPL(fastldm, CPU, m) { m.impl("softmax_cpu_", &softmax_); }
