// 2^x on ATen's Vectorized<float>, for x ≤ 0: shared by the CPU kernels that exponentiate scores
// (flash_attention_cpu.cpp, softmax_cpu.cpp) and GEGLU's erf (geglu_cpu.cpp, exp(−x²)).
//
// 2^x = 2^n · p(x − n) with n = round(x) and p a minimax polynomial of 2^f on [−½, ½] (fitted for relative
// error by Lawson's reweighted least squares, coefficients rounded to fp32):
//   Degree 5: max relative error 2.3e-7 (≈ 2 ulp of fp32; torch's Sleef exp is 1 ulp, ATen's exp_u20 20 ulp),
//             for results kept in fp32;
//   Degree 3: 7.5e-5 (2^-13.7), for results rounded to bf16, whose rounding (up to 2^-9) it leaves unchanged
//             but for ties within 1/27 of an ulp; two fused multiply-adds fewer.
// The 2^n: AVX-512's scalef, else n added into the exponent field. Below −125 it returns 2^−125 (≈ 2e-38,
// a zero next to a row max's 1); −∞ gives that too, not NaN.
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace fastldm {

template <int Degree = 5>
inline at::vec::Vectorized<float> exp2_poly(at::vec::Vectorized<float> x) {
  static_assert(Degree == 3 || Degree == 5, "exp2_poly has polynomials of degree 3 and 5");
  using Vec = at::vec::Vectorized<float>;
  x = at::vec::clamp_min(x, Vec(-125.f));
  const Vec n = x.round();
  const Vec f = x - n;  // in [−½, ½]
  Vec p;
  if constexpr (Degree == 5) {
    p = Vec(1.3276471e-3f);
    p = at::vec::fmadd(p, f, Vec(9.6755419e-3f));
    p = at::vec::fmadd(p, f, Vec(5.5507131e-2f));
    p = at::vec::fmadd(p, f, Vec(2.4022120e-1f));
    p = at::vec::fmadd(p, f, Vec(6.9314694e-1f));
    p = at::vec::fmadd(p, f, Vec(1.0000001f));
  } else {
    p = Vec(5.51713221e-2f);
    p = at::vec::fmadd(p, f, Vec(2.42610544e-1f));
    p = at::vec::fmadd(p, f, Vec(6.93260968e-1f));
    p = at::vec::fmadd(p, f, Vec(9.99928117e-1f));
  }
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);  // p · 2^n in one instruction
#else
  using IVec = at::vec::Vectorized<int32_t>;
  const IVec shift = at::vec::convert_to_int_of_same_size(n) << IVec(23);  // n into the exponent field
  return at::vec::cast<float>(at::vec::cast<int32_t>(p) + shift);
#endif
}

}  // namespace fastldm
