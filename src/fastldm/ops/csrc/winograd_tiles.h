// What the Winograd transforms share (winograd_cpu.cpp, F(4×4); winograd_f2_cpu.cpp, F(2×2)): how an image is
// cut into output tiles, and the checks and bias handling of their output ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fastldm {

// B images of H × W in output tiles of size × size, P = B · nH · nW of them in (b, tile row, tile col) order;
// the last row and column of tiles may reach past the image.
struct Tiles {
  int64_t B, H, W, nH, nW;
  Tiles(int64_t B, int64_t H, int64_t W, int64_t size)
      : B(B), H(H), W(W), nH((H + size - 1) / size), nW((W + size - 1) / size) {}
  int64_t count() const { return B * nH * nW; }
};

// M (planes, P, K), checked to hold the tiles of `t`; `op` names the caller in the message.
inline void check_tiles(const at::Tensor& m, const Tiles& t, const char* op) {
  TORCH_CHECK(m.size(1) == t.count(), op, ": M has ", m.size(1), " tiles, a ", t.B, "x", t.H, "x", t.W,
              " image has ", t.count());
}

// The bias of K output channels, float32 or bfloat16 or none, as a contiguous float32 tensor (undefined for none).
inline at::Tensor bias_fp32(const std::optional<at::Tensor>& bias, int64_t K, const char* op) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K &&
                  (bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16),
              op, ": bias must be a (K,) float32 or bfloat16 tensor");
  return bias->to(at::kFloat).contiguous();
}

}  // namespace fastldm
