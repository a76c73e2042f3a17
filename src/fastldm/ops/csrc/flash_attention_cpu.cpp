// Flash attention for CPUs: softmax(q kᵀ / √D) v without ever writing the N × M scores.
//
// FlashAttention-2 (Dao 2023, "FlashAttention-2", Alg. 1) on CPU cores: a task owns one block of queries of
// one (batch, head) and sweeps the keys in blocks, keeping each query's running score max m and running
// sum l (the online softmax of Milakov & Gimelshein 2018) and rescaling its output accumulator by
// 2^(m_old − m_new) whenever the max grows. Tasks run in parallel over (batch · head × query blocks).
//
// Everything is computed transposed, with the queries along the SIMD lanes:
//   Sᵀ (keys × queries) = K · Qᵀ   GEMM 1: broadcast k[j][d], load qᵀ[d][queries]
//   Oᵀ (D × queries)   += Vᵀ · Pᵀ  GEMM 2: broadcast v[j][d], load pᵀ[j][queries]
// so the softmax's max and sum over keys are lane-wise (no horizontal reductions), the head dim is only
// a loop length (40, 80 and 160 need no padding), and fp32 K and V are read in place, straight from the
// (B, M, H, D) memory the projections wrote. Both GEMMs use one register tile: 4 rows × 3 vectors of
// queries (12 accumulators: 24 queries with AVX2, 48 with AVX-512), fp32 fused multiply-adds.
//
// The exponential is base 2: log2(e)/√D is folded into the packed Qᵀ, so the scores are already in
// base-2 units, and 2^x = 2^n · p(x − n) with n = round(x) and p a degree-5 minimax polynomial of 2^f
// on [−½, ½] (fitted by Lawson's reweighted least squares): max relative error 2.3e-7 in fp32 (≈ 2 ulp;
// torch's Sleef exp is 1 ulp, ATen's exp_u20 20 ulp).
//
// bf16 inputs are converted to fp32 as they are packed (Qᵀ once per query block, K and V rows once per
// key block); all arithmetic is fp32 and the output is rounded once. Limits: CPU, fp32 or bf16, q k v of
// one dtype, unit stride along D (checked here), no mask, and no backward (flash_attention_cpu.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int64_t kLanes = Vec::size();
constexpr int kRows = 4;                    // register tile: kRows rows × kVecs vectors of queries
constexpr int kVecs = 3;
constexpr int64_t kPanel = kVecs * kLanes;  // queries per register tile

// 2^x, for the x ≤ 0 of a softmax; below −125 it returns 2^−125 (≈ 2e-38, a zero next to the row max's 1).
inline Vec exp2_poly(Vec x) {
  x = at::vec::clamp_min(x, Vec(-125.f));
  const Vec n = x.round();
  const Vec f = x - n;  // in [−½, ½]
  Vec p(1.3276471e-3f);
  p = at::vec::fmadd(p, f, Vec(9.6755419e-3f));
  p = at::vec::fmadd(p, f, Vec(5.5507131e-2f));
  p = at::vec::fmadd(p, f, Vec(2.4022120e-1f));
  p = at::vec::fmadd(p, f, Vec(6.9314694e-1f));
  p = at::vec::fmadd(p, f, Vec(1.0000001f));
  const IVec shift = at::vec::convert_to_int_of_same_size(n) << IVec(23);  // n into the exponent field
  return at::vec::cast<float>(at::vec::cast<int32_t>(p) + shift);
}

// GEMM 1 tile: sᵀ[r][i] = Σ_d k[r][d] · qᵀ[d][i] for R keys r and one panel of queries i; the tile's
// rows are folded into the panel's block max.
template <int R>
inline void score_tile(const float* k, int64_t ks, const float* qt, int64_t ldq, int64_t depth, float* st,
                       int64_t lds, float* bmax) {
  Vec acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kVecs; ++c) acc[r][c] = Vec(0.f);
  for (int64_t d = 0; d < depth; ++d) {
    Vec b[kVecs];
    for (int c = 0; c < kVecs; ++c) b[c] = Vec::loadu(qt + d * ldq + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const Vec a(k[r * ks + d]);
      for (int c = 0; c < kVecs; ++c) acc[r][c] = at::vec::fmadd(a, b[c], acc[r][c]);
    }
  }
  for (int c = 0; c < kVecs; ++c) {
    Vec m = Vec::loadu(bmax + c * kLanes);
    for (int r = 0; r < R; ++r) {
      acc[r][c].store(st + r * lds + c * kLanes);
      m = at::vec::clamp_min(acc[r][c], m);
    }
    m.store(bmax + c * kLanes);
  }
}

// GEMM 2 tile: oᵀ[r][i] = alpha[i] · oᵀ[r][i] + Σ_j v[j][r] · pᵀ[j][i] for R head dims r and one panel of
// queries i (the online softmax's rescale is folded into loading the accumulators).
template <int R>
inline void value_tile(const float* v, int64_t vs, const float* pt, int64_t ldp, int64_t keys, float* ot,
                       int64_t ldo, const float* alpha) {
  Vec acc[R][kVecs];
  for (int c = 0; c < kVecs; ++c) {
    const Vec a = Vec::loadu(alpha + c * kLanes);
    for (int r = 0; r < R; ++r) acc[r][c] = Vec::loadu(ot + r * ldo + c * kLanes) * a;
  }
  for (int64_t j = 0; j < keys; ++j) {
    Vec b[kVecs];
    for (int c = 0; c < kVecs; ++c) b[c] = Vec::loadu(pt + j * ldp + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const Vec a(v[j * vs + r]);
      for (int c = 0; c < kVecs; ++c) acc[r][c] = at::vec::fmadd(a, b[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kVecs; ++c) acc[r][c].store(ot + r * ldo + c * kLanes);
}

// Calls f(std::integral_constant<int, R>) with R = rows (1 ≤ rows ≤ kRows), so tails get their own tile.
template <typename F>
inline void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 4: f(std::integral_constant<int, 4>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    default: f(std::integral_constant<int, 1>()); break;
  }
}
static_assert(kRows == 4, "with_rows dispatches 1..4 rows");

// `rows` rows of D values, `stride` apart, as fp32: fp32 in place (returns src, sets stride_out =
// stride), bf16 converted into buf (rows × D, stride_out = D).
template <typename scalar_t>
inline const float* as_float(const scalar_t* src, int64_t stride, int64_t rows, int64_t D, float* buf,
                             int64_t& stride_out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    stride_out = stride;
    return src;
  } else {
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t d = 0; d < D; ++d) buf[j * D + d] = static_cast<float>(src[j * stride + d]);
    stride_out = D;
    return buf;
  }
}

struct Shape {
  int64_t B, H, N, M, D, bq, bk;  // bq: queries per block (a multiple of kPanel), bk: keys per block
};

// A (B, H, tokens, D) tensor's data and strides, read once (a Tensor's accessors are not free in a loop).
template <typename scalar_t>
struct View {
  const scalar_t* data;
  int64_t b, h, n;
  explicit View(const at::Tensor& t)
      : data(t.data_ptr<scalar_t>()), b(t.stride(0)), h(t.stride(1)), n(t.stride(2)) {}
  const scalar_t* head(int64_t bi, int64_t hi) const { return data + bi * b + hi * h; }
};

template <typename scalar_t>
void flash(const View<scalar_t> q, const View<scalar_t> k, const View<scalar_t> v, scalar_t* out,
           const Shape s) {
  const int64_t H = s.H, N = s.N, M = s.M, D = s.D, bq = s.bq, bk = s.bk;
  const float scale = static_cast<float>(M_LOG2E / std::sqrt(static_cast<double>(D)));
  const int64_t q_blocks = (N + bq - 1) / bq;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // Tasks are handed out one at a time from a shared counter rather than in fixed halves, so a thread that
  // the OS preempts (a shared machine) leaves its work to the others instead of holding up the call.
  const int64_t tasks = s.B * H * q_blocks;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    // Per-thread scratch: qᵀ and oᵀ (D × bq), sᵀ/pᵀ (bk × bq), per-query m, l, block max, alpha, and
    // fp32 copies of a key block of bf16 k and v (bk × D).
    std::vector<float> buf(2 * D * bq + bk * bq + 4 * bq + 2 * bk * D);
    float* qt = buf.data();
    float* ot = qt + D * bq;
    float* st = ot + D * bq;
    float* m = st + bk * bq;
    float* l = m + bq;
    float* bmax = l + bq;
    float* alpha = bmax + bq;
    float* kf = alpha + bq;
    float* vf = kf + bk * D;

    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t b = task / (H * q_blocks), h = task / q_blocks % H, i0 = task % q_blocks * bq;
      const int64_t nq = std::min(bq, N - i0);
      const int64_t cols = (nq + kPanel - 1) / kPanel * kPanel;  // queries computed: nq, padded to a panel
      const scalar_t* qh = q.head(b, h) + i0 * q.n;
      const scalar_t* kh = k.head(b, h);
      const scalar_t* vh = v.head(b, h);

      // qᵀ[d][i] = q[i][d] · log2(e)/√D; queries past N are zeros (computed, never stored)
      std::fill(qt, qt + D * bq, 0.f);
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t d = 0; d < D; ++d) qt[d * bq + i] = static_cast<float>(qh[i * q.n + d]) * scale;
      std::fill(ot, ot + D * bq, 0.f);
      std::fill(m, m + bq, neg_inf);
      std::fill(l, l + bq, 0.f);

      for (int64_t j0 = 0; j0 < M; j0 += bk) {
        const int64_t nk = std::min(bk, M - j0);
        int64_t ks, vs;
        const float* kb = as_float(kh + j0 * k.n, k.n, nk, D, kf, ks);
        const float* vb = as_float(vh + j0 * v.n, v.n, nk, D, vf, vs);

        // GEMM 1: sᵀ = K qᵀ (nk × cols), with each query's block max
        std::fill(bmax, bmax + bq, neg_inf);
        for (int64_t p = 0; p < cols; p += kPanel)
          for (int64_t j = 0; j < nk; j += kRows)
            with_rows(std::min<int64_t>(kRows, nk - j), [&](auto rows) {
              score_tile<decltype(rows)::value>(kb + j * ks, ks, qt + p, bq, D, st + j * bq + p, bq, bmax + p);
            });

        // online softmax: m' = max(m, block max), alpha = 2^(m − m'), pᵀ = 2^(sᵀ − m'), l = alpha·l + Σ_j pᵀ
        for (int64_t i = 0; i < cols; i += kLanes) {
          const Vec m_old = Vec::loadu(m + i);
          const Vec m_new = at::vec::clamp_min(Vec::loadu(bmax + i), m_old);
          const Vec a = exp2_poly(m_old - m_new);
          Vec sum(0.f);
          for (int64_t j = 0; j < nk; ++j) {
            const Vec pj = exp2_poly(Vec::loadu(st + j * bq + i) - m_new);
            pj.store(st + j * bq + i);
            sum = sum + pj;
          }
          m_new.store(m + i);
          a.store(alpha + i);
          at::vec::fmadd(a, Vec::loadu(l + i), sum).store(l + i);
        }

        // GEMM 2: oᵀ = alpha · oᵀ + Vᵀ pᵀ (D × cols)
        for (int64_t p = 0; p < cols; p += kPanel)
          for (int64_t d = 0; d < D; d += kRows)
            with_rows(std::min<int64_t>(kRows, D - d), [&](auto rows) {
              value_tile<decltype(rows)::value>(vb + d, vs, st + p, bq, nk, ot + d * bq + p, bq, alpha + p);
            });
      }

      // out[b, i0 + i, h, :] = oᵀ[:, i] / l[i]
      for (int64_t i = 0; i < nq; ++i) {
        const float inv = 1.f / l[i];
        scalar_t* o = out + ((b * N + i0 + i) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(ot[d * bq + i] * inv);
      }
    }
  });
}

// q (B, H, N, D), k and v (B, H, M, D), any strides with unit stride along D -> (B, N, H, D) contiguous.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t block_q,
                     int64_t block_k) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "flash_attention_cpu: q, k, v must be (B, H, N, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "flash_attention_cpu: q, k, v must have one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "flash_attention_cpu: dtype must be float32 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "flash_attention_cpu: q, k, v need unit stride along the head dim");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(),
              "flash_attention_cpu: k and v must be (B, H, M, D) with q's B, H, D");
  TORCH_CHECK(M > 0 && block_q > 0 && block_k > 0, "flash_attention_cpu: needs keys and positive block sizes");
  // queries per block: block_q rounded up to whole register tiles, no more than N needs
  const int64_t panels = std::max<int64_t>(1, std::min((block_q + kPanel - 1) / kPanel, (N + kPanel - 1) / kPanel));
  // keys per block: M split into ⌊M / block_k⌋ equal blocks (so 77 keys are one block of 77, not 64 + 13)
  const int64_t key_blocks = std::max<int64_t>(1, M / block_k);
  const Shape shape{B, H, N, M, D, panels * kPanel, (M + key_blocks - 1) / key_blocks};
  at::Tensor out = at::empty({B, N, H, D}, q.options());
  if (N == 0) return out;
  if (q.scalar_type() == at::kFloat)
    flash<float>(View<float>(q), View<float>(k), View<float>(v), out.data_ptr<float>(), shape);
  else
    flash<c10::BFloat16>(View<c10::BFloat16>(q), View<c10::BFloat16>(k), View<c10::BFloat16>(v),
                         out.data_ptr<c10::BFloat16>(), shape);
  return out;
}

}  // namespace

// The schema (fastldm::flash_attention_cpu) is defined in flash_attention_cpu.py; this is its CPU kernel.
TORCH_LIBRARY_IMPL(fastldm, CPU, m) { m.impl("flash_attention_cpu", &attention); }
