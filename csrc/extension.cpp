// megalm._C: one Python module for every compiled piece.
#include <torch/extension.h>

namespace megalm {
void register_helpers(pybind11::module_& m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megalm compiled helpers and kernels";
  megalm::register_helpers(m);
}
