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
// a loop length (40, 80 and 160 need no padding), and K and V need no packing beyond an fp32 copy of each
// head's rows. Both GEMMs use one register tile: 4 rows × 3 vectors of queries (12
// accumulators: 24 queries with AVX2, 48 with AVX-512), fp32 fused multiply-adds.
//
// The exponential is base 2: p = 2^(c·s − c·m) with c = log2(e)/√D, the scale and the max taken in one
// fused multiply-add, and 2^x from vec_exp2.h (degree 5: max relative error 2.3e-7 in fp32).
//
// Qᵀ is packed and the output unpacked with ATen's 8 × 8 vectorised transposes. bf16 inputs are converted
// to fp32 as they are packed (Qᵀ once per query block, K and V once per head per thread); all arithmetic
// is fp32 and the output is rounded once. Limits: CPU, fp32 or bf16, q k v of one dtype, unit stride along D
// (checked here), no mask, and no backward (flash_attention_cpu.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Unroll.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>

#include "vec_exp2.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int kRows = 4;                    // register tile: kRows rows × kVecs vectors of queries
constexpr int kVecs = 3;
constexpr int64_t kPanel = kVecs * kLanes;  // queries per register tile

// The tiles' loops over rows and vectors are unrolled at compile time (c10::ForcedUnroll) and the tiles are
// never inlined, so their accumulator arrays live in registers for every tile shape (inlined into the task
// loop, GCC 12 kept the edge tiles' accumulators on the stack).

// GEMM 1 tile: sᵀ[r][i] = Σ_d k[r][d] · qᵀ[d][i] for R keys r and C vectors of queries i; the tile's
// rows are folded into those queries' block max.
template <int R, int C>
C10_NOINLINE void score_tile(const float* k, int64_t ks, const float* qt, int64_t ldq, int64_t depth, float* st,
                       int64_t lds, float* bmax) {
  Vec acc[R][C];
  c10::ForcedUnroll<R>{}([&](auto r) { c10::ForcedUnroll<C>{}([&](auto c) { acc[r][c] = Vec(0.f); }); });
  for (int64_t d = 0; d < depth; ++d) {
    Vec b[C];
    c10::ForcedUnroll<C>{}([&](auto c) { b[c] = Vec::loadu(qt + d * ldq + c * kLanes); });
    c10::ForcedUnroll<R>{}([&](auto r) {
      const Vec a(k[r * ks + d]);
      c10::ForcedUnroll<C>{}([&](auto c) { acc[r][c] = at::vec::fmadd(a, b[c], acc[r][c]); });
    });
  }
  c10::ForcedUnroll<C>{}([&](auto c) {
    Vec m = Vec::loadu(bmax + c * kLanes);
    c10::ForcedUnroll<R>{}([&](auto r) {
      acc[r][c].store(st + r * lds + c * kLanes);
      m = at::vec::clamp_min(acc[r][c], m);
    });
    m.store(bmax + c * kLanes);
  });
}

// GEMM 2 tile: oᵀ[r][i] = alpha[i] · oᵀ[r][i] + Σ_j v[j][r] · pᵀ[j][i] for R head dims r and C vectors of
// queries i (the online softmax's rescale is folded into loading the accumulators).
template <int R, int C>
C10_NOINLINE void value_tile(const float* v, int64_t vs, const float* pt, int64_t ldp, int64_t keys, float* ot,
                       int64_t ldo, const float* alpha) {
  Vec acc[R][C];
  c10::ForcedUnroll<C>{}([&](auto c) {
    const Vec a = Vec::loadu(alpha + c * kLanes);
    c10::ForcedUnroll<R>{}([&](auto r) { acc[r][c] = Vec::loadu(ot + r * ldo + c * kLanes) * a; });
  });
  for (int64_t j = 0; j < keys; ++j) {
    Vec b[C];
    c10::ForcedUnroll<C>{}([&](auto c) { b[c] = Vec::loadu(pt + j * ldp + c * kLanes); });
    c10::ForcedUnroll<R>{}([&](auto r) {
      const Vec a(v[j * vs + r]);
      c10::ForcedUnroll<C>{}([&](auto c) { acc[r][c] = at::vec::fmadd(a, b[c], acc[r][c]); });
    });
  }
  c10::ForcedUnroll<R>{}([&](auto r) {
    c10::ForcedUnroll<C>{}([&](auto c) { acc[r][c].store(ot + r * ldo + c * kLanes); });
  });
}

// Calls f(R, C) as std::integral_constants, R = min(rows, kRows) and C = min(vecs, kVecs), so that edge
// tiles (the last keys, head dims or queries) get their own smaller register tile.
template <int R, typename F>
inline void with_vecs(int64_t vecs, F&& f) {
  using Rc = std::integral_constant<int, R>;
  if (vecs >= 3) f(Rc(), std::integral_constant<int, 3>());
  else if (vecs == 2) f(Rc(), std::integral_constant<int, 2>());
  else f(Rc(), std::integral_constant<int, 1>());
}
template <typename F>
inline void with_tile(int64_t rows, int64_t vecs, F&& f) {
  if (rows >= 4) with_vecs<4>(vecs, f);
  else if (rows == 3) with_vecs<3>(vecs, f);
  else if (rows == 2) with_vecs<2>(vecs, f);
  else with_vecs<1>(vecs, f);
}
static_assert(kRows == 4 && kVecs == 3, "with_tile dispatches up to 4 rows × 3 vectors");

// dst (rows × D) = `rows` rows of D values `stride` apart, as fp32.
template <typename scalar_t>
inline void to_float(const scalar_t* src, int64_t stride, int64_t rows, int64_t D, float* dst) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t d = 0; d < D; ++d) dst[j * D + d] = static_cast<float>(src[j * stride + d]);
}

// `rows` rows of D values, `stride` apart, as fp32: fp32 in place (returns src, sets stride_out = stride),
// bf16 converted into buf (rows × D, stride_out = D).
template <typename scalar_t>
inline const float* as_float(const scalar_t* src, int64_t stride, int64_t rows, int64_t D, float* buf,
                             int64_t& stride_out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    stride_out = stride;
    return src;
  } else {
    to_float(src, stride, rows, D, buf);
    stride_out = D;
    return buf;
  }
}

// dst[c][r] = src[r][c] for r < rows, c < cols: ATen's vectorised 8 × 8 transposes, scalar edges.
inline void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8)
      at::vec::transpose_mxn<float, 8, 8>(src + r * lds + c, lds, dst + c * ldd + r, ldd);
    for (; c < cols; ++c)
      for (int64_t i = r; i < r + 8; ++i) dst[c * ldd + i] = src[i * lds + c];
  }
  for (; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

struct Shape {
  int64_t B, H, N, M, D, bq, bk;  // bq: queries per block (a multiple of kLanes), bk: keys per block
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
  const Vec c(static_cast<float>(M_LOG2E / std::sqrt(static_cast<double>(D))));  // scores to base-2 logits
  const Vec minus_c = Vec(0.f) - c;
  const int64_t q_blocks = (N + bq - 1) / bq;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // Work is handed out from a shared counter rather than in fixed shares, so a thread that the OS preempts
  // (a shared machine) leaves its work to the others instead of holding up the call. A unit of work is a
  // run of `per` query blocks of one head, as long as there are ~8 units per thread: each unit copies its
  // head's K and V once (see below), and short runs would copy them over and over.
  const int64_t heads = s.B * H, threads = at::get_num_threads();
  const int64_t per = std::clamp<int64_t>(q_blocks * heads / (8 * threads), 1, q_blocks);
  const int64_t head_units = (q_blocks + per - 1) / per, units = heads * head_units;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(units, threads), 1, [&](int64_t, int64_t) {
    // Per-thread scratch, uninitialised: qᵀ and oᵀ (D × bq), sᵀ/pᵀ (bk × bq), per-query m, l, block max,
    // alpha, rows of q or out in fp32 (bq × D), and fp32 copies of the K and V of the head the thread is on
    // (M × D each). Read in place from the UNet's (B, M, H, D) memory, a head's rows are strided over the
    // other heads' (20 % slower at 4096 tokens and 8 heads, one thread); they are copied here rather than by
    // a separate ATen op, since each extra parallel region costs a wait for the slowest thread (10s of ms
    // on a shared machine).
    std::unique_ptr<float[]> buf(new float[3 * D * bq + bk * bq + 4 * bq + 2 * M * D]);
    float* qt = buf.get();
    float* ot = qt + D * bq;
    float* st = ot + D * bq;
    float* m = st + bk * bq;
    float* l = m + bq;
    float* bmax = l + bq;
    float* alpha = bmax + bq;
    float* rows = alpha + bq;
    float* kf = rows + bq * D;
    float* vf = kf + M * D;
    int64_t kv_head = -1;

    for (int64_t unit = next++; unit < units; unit = next++) {
      const int64_t b = unit / head_units / H, h = unit / head_units % H, first = unit % head_units * per;
      if (b * H + h != kv_head) {
        to_float(k.head(b, h), k.n, M, D, kf);
        to_float(v.head(b, h), v.n, M, D, vf);
        kv_head = b * H + h;
      }
      for (int64_t i0 = first * bq; i0 < std::min(first + per, q_blocks) * bq; i0 += bq) {
        const int64_t nq = std::min(bq, N - i0);
        const int64_t cols = (nq + kLanes - 1) / kLanes * kLanes;  // queries computed: nq, padded to a vector
        const scalar_t* qh = q.head(b, h) + i0 * q.n;

        // qᵀ[d][i] = q[i][d]; queries nq..cols are zeros (computed, never stored)
        int64_t qs;
        const float* qf = as_float(qh, q.n, nq, D, rows, qs);
        transpose(qf, qs, nq, D, qt, bq);
        for (int64_t d = 0; d < D; ++d) std::fill(qt + d * bq + nq, qt + d * bq + cols, 0.f);
        for (int64_t d = 0; d < D; ++d) std::fill(ot + d * bq, ot + d * bq + cols, 0.f);
        std::fill(m, m + cols, neg_inf);
        std::fill(l, l + cols, 0.f);

        for (int64_t j0 = 0; j0 < M; j0 += bk) {
          const int64_t nk = std::min(bk, M - j0);
          const float* kb = kf + j0 * D;  // (nk, D)
          const float* vb = vf + j0 * D;  // (nk, D)

          // GEMM 1: sᵀ = K qᵀ (nk × cols), with each query's block max
          std::fill(bmax, bmax + cols, neg_inf);
          for (int64_t p = 0; p < cols; p += kPanel)
            for (int64_t j = 0; j < nk; j += kRows)
              with_tile(nk - j, (cols - p) / kLanes, [&](auto R, auto C) {
                score_tile<R, C>(kb + j * D, D, qt + p, bq, D, st + j * bq + p, bq, bmax + p);
              });

          // online softmax, c = log2(e)/√D: m' = max(m, block max), alpha = 2^(c·(m − m')),
          // pᵀ = 2^(c·(sᵀ − m')), l = alpha·l + Σ_j pᵀ
          for (int64_t i = 0; i < cols; i += kLanes) {
            const Vec m_old = Vec::loadu(m + i);
            const Vec m_new = at::vec::clamp_min(Vec::loadu(bmax + i), m_old);
            const Vec a = fastldm::exp2_poly((m_old - m_new) * c);
            const Vec shift = m_new * minus_c;
            Vec sum(0.f);
            for (int64_t j = 0; j < nk; ++j) {
              const Vec pj = fastldm::exp2_poly(at::vec::fmadd(Vec::loadu(st + j * bq + i), c, shift));
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
              with_tile(D - d, (cols - p) / kLanes, [&](auto R, auto C) {
                value_tile<R, C>(vb + d, D, st + p, bq, nk, ot + d * bq + p, bq, alpha + p);
              });
        }

        // out[b, i0 + i, h, :] = oᵀ[:, i] / l[i]
        transpose(ot, bq, D, nq, rows, D);
        for (int64_t i = 0; i < nq; ++i) {
          const float inv = 1.f / l[i];
          scalar_t* o = out + ((b * N + i0 + i) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(rows[i * D + d] * inv);
        }
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
  // queries per block: block_q rounded up to whole register tiles, no more than N needs (whole vectors)
  const int64_t bq = std::max<int64_t>(kLanes, std::min((block_q + kPanel - 1) / kPanel * kPanel,
                                                        (N + kLanes - 1) / kLanes * kLanes));
  // keys per block: M split into ⌊M / block_k⌋ equal blocks (so 77 keys are one block of 77, not 64 + 13)
  const int64_t key_blocks = std::max<int64_t>(1, M / block_k);
  const Shape shape{B, H, N, M, D, bq, (M + key_blocks - 1) / key_blocks};
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
