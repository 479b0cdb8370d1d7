// Argument checks shared by the CPU and CUDA entry points of the fused softmax.
#pragma once
#include <torch/extension.h>

#include <utility>

namespace megalm {

// Validates kind and shape; for the padding variant returns the mask as a contiguous bool tensor on x's device and
// its batch size (1 = one mask for the whole batch). Other variants return an undefined tensor.
inline std::pair<torch::Tensor, int64_t> checked_mask(const c10::optional<torch::Tensor>& mask, const torch::Tensor& x,
                                                      int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "fused_softmax: kind must be 0, 1 or 2");
  const int64_t b = x.size(0), sq = x.size(2), sk = x.size(3);
  TORCH_CHECK(kind != 2 || sq == sk, "fused_softmax: the causal variant needs sq == sk, got ", sq, " and ", sk);
  if (kind != 1) return {torch::Tensor(), 1};
  TORCH_CHECK(mask.has_value(), "fused_softmax: the padding variant needs a mask");
  torch::Tensor m = mask->to(x.device(), at::kBool).contiguous();
  TORCH_CHECK(m.dim() == 4 && m.size(1) == 1 && m.size(2) == sq && m.size(3) == sk && (m.size(0) == 1 || m.size(0) == b),
              "fused_softmax: mask must be [b or 1, 1, sq, sk], got ", m.sizes());
  return {m, m.size(0)};
}

inline void check_backward_args(const torch::Tensor& dy, const torch::Tensor& y) {
  TORCH_CHECK(dy.sizes() == y.sizes() && dy.scalar_type() == y.scalar_type(),
              "fused_softmax backward: gradient and output differ in shape or dtype");
}

}  // namespace megalm
