// megalm._C: one Python module for every compiled piece.
#include <torch/extension.h>

namespace megalm {
void register_helpers(pybind11::module_& m);
void register_fused_softmax_cpu(pybind11::module_& m);
#ifdef MEGALM_WITH_CUDA
void register_fused_softmax_cuda(pybind11::module_& m);
#endif
}  // namespace megalm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megalm compiled helpers and kernels";
  megalm::register_helpers(m);
  megalm::register_fused_softmax_cpu(m);
#ifdef MEGALM_WITH_CUDA
  megalm::register_fused_softmax_cuda(m);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
