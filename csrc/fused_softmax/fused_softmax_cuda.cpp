// Torch glue for the CUDA fused softmax kernels (built only when setup.py finds a CUDA torch and nvcc).
#ifdef MEGALM_WITH_CUDA
#include <torch/extension.h>

#include "checks.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace megalm {

void launch_fused_softmax_forward(const void* x, const uint8_t* mask, void* y, int64_t rows, int heads, int sq,
                                  int sk, int mask_batch, float scale, int kind, bool bf16, cudaStream_t stream);
void launch_fused_softmax_backward(const void* dy, const void* y, void* dx, int64_t rows, int sq, int sk,
                                   float scale, int kind, bool bf16, cudaStream_t stream);

namespace {
void check_scores(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fused_softmax (CUDA): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 4, "fused_softmax: ", name, " must be [b, heads, sq, sk], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "fused_softmax (CUDA): ", name, " must be float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.size(3) <= 4096, "fused_softmax (CUDA): sk must be at most 4096, got ", t.size(3));
}
}  // namespace

torch::Tensor fused_softmax_forward_cuda(torch::Tensor x, c10::optional<torch::Tensor> mask, double scale,
                                         int64_t kind) {
  check_scores(x, "input");
  const c10::cuda::CUDAGuard guard(x.device());
  x = x.contiguous();
  const int64_t b = x.size(0), h = x.size(1), sq = x.size(2), sk = x.size(3);
  const auto [m, mask_batch] = checked_mask(mask, x, kind);
  auto y = torch::empty_like(x);
  launch_fused_softmax_forward(x.data_ptr(), kind == 1 ? reinterpret_cast<const uint8_t*>(m.data_ptr<bool>()) : nullptr,
                               y.data_ptr(), b * h * sq, static_cast<int>(h), static_cast<int>(sq),
                               static_cast<int>(sk), static_cast<int>(mask_batch), static_cast<float>(scale),
                               static_cast<int>(kind), x.scalar_type() == at::kBFloat16,
                               c10::cuda::getCurrentCUDAStream());
  return y;
}

torch::Tensor fused_softmax_backward_cuda(torch::Tensor dy, torch::Tensor y, double scale, int64_t kind) {
  check_scores(y, "output");
  check_backward_args(dy, y);
  const c10::cuda::CUDAGuard guard(y.device());
  dy = dy.contiguous();
  y = y.contiguous();
  auto dx = torch::empty_like(y);
  launch_fused_softmax_backward(dy.data_ptr(), y.data_ptr(), dx.data_ptr(), y.size(0) * y.size(1) * y.size(2),
                                static_cast<int>(y.size(2)), static_cast<int>(y.size(3)), static_cast<float>(scale),
                                static_cast<int>(kind), y.scalar_type() == at::kBFloat16,
                                c10::cuda::getCurrentCUDAStream());
  return dx;
}

void register_fused_softmax_cuda(pybind11::module_& m) {
  m.def("fused_softmax_forward_cuda", &fused_softmax_forward_cuda, "softmax(scale*x + mask), CUDA",
        py::arg("x"), py::arg("mask"), py::arg("scale"), py::arg("kind"));
  m.def("fused_softmax_backward_cuda", &fused_softmax_backward_cuda, "softmax backward from the output, CUDA",
        py::arg("dy"), py::arg("y"), py::arg("scale"), py::arg("kind"));
}

}  // namespace megalm
#endif  // MEGALM_WITH_CUDA
