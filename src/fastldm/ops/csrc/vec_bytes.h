// Two int32 vectors of ATen's Vectorized<int32_t>, their values already within a byte type's range, stored as
// 2·lanes bytes in order: int8 attention's probability levels (int8_attention_cpu.cpp) and the int8 layers'
// quantized activations (quantize_u8_cpu.cpp). A scalar narrowing loop took as long as the rest of either kernel.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace fastldm {

template <typename byte_t>  // int8_t (values in −128..127) or uint8_t (0..255)
inline void store_bytes(byte_t* p, const at::vec::Vectorized<int32_t>& a, const at::vec::Vectorized<int32_t>& b) {
  static_assert(std::is_same_v<byte_t, int8_t> || std::is_same_v<byte_t, uint8_t>, "bytes are int8 or uint8");
  constexpr int64_t lanes = at::vec::Vectorized<int32_t>::size();
#if defined(CPU_CAPABILITY_AVX512)
  // vpmovdb keeps each lane's low byte: exact for values in range, either signedness
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(a));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + lanes), _mm512_cvtepi32_epi8(b));
#elif defined(CPU_CAPABILITY_AVX2)
  // packs work within 128-bit lanes: a0-3 b0-3 | a4-7 b4-7 as 16 bits, reordered to a0-7 | b0-7, then to bytes
  // (a0-7 a0-7 | b0-7 b0-7), whose low 8 bytes of each lane are the 16 values in order
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
  const __m256i bytes = _mm256_permute4x64_epi64(
      std::is_same_v<byte_t, int8_t> ? _mm256_packs_epi16(w, w) : _mm256_packus_epi16(w, w), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(bytes));
#else
  int32_t v[2 * lanes];
  a.store(v);
  b.store(v + lanes);
  for (int64_t t = 0; t < 2 * lanes; ++t) p[t] = static_cast<byte_t>(v[t]);
#endif
}

}  // namespace fastldm
