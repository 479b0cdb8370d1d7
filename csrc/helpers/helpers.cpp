// Dataset index helpers (Megatron's helpers.cpp semantics): the GPT sample index and the blending index.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace megalm {

// Row i holds (position in doc_idx, token offset) where sample i starts; a sample is seq_length + add_extra
// tokens and the next one starts at its last token(s). Empty documents are stepped over.
py::array_t<int64_t> build_sample_idx(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes,
                                      py::array_t<int32_t, py::array::c_style | py::array::forcecast> doc_idx,
                                      int64_t seq_length, int64_t num_epochs, int64_t tokens_per_epoch,
                                      int64_t add_extra_token) {
  if (seq_length <= 0) throw std::invalid_argument("build_sample_idx: seq_length must be positive");
  const int32_t* size_ptr = sizes.data();
  const int32_t* doc_ptr = doc_idx.data();
  const int64_t n_sizes = sizes.size();
  const int64_t n_docs = doc_idx.size();
  const int64_t num_samples = (num_epochs * tokens_per_epoch - add_extra_token) / seq_length;
  py::array_t<int64_t> out({num_samples + 1, static_cast<int64_t>(2)});
  int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    bool ids_ok = true;  // checked once up front, so the walk below needs no per-document test
    for (int64_t i = 0; i < n_docs; ++i) ids_ok &= doc_ptr[i] >= 0 && doc_ptr[i] < n_sizes;
    if (!ids_ok) throw std::out_of_range("build_sample_idx: document id outside sizes");
    int64_t doc_pos = 0, offset = 0;
    o[0] = 0;
    o[1] = 0;
    for (int64_t s = 1; s <= num_samples; ++s) {
      int64_t remaining = seq_length + add_extra_token;
      while (remaining != 0) {
        if (doc_pos >= n_docs) throw std::out_of_range("build_sample_idx: ran past the document index");
        const int32_t doc = doc_ptr[doc_pos];
        const int64_t doc_len = static_cast<int64_t>(size_ptr[doc]) - offset;
        remaining -= doc_len;
        if (remaining <= 0) {
          offset += remaining + doc_len - add_extra_token;
          remaining = 0;
        } else {
          if (doc_pos == n_docs - 1) {  // the data ran out: the last sample ends at the last token
            offset = size_ptr[doc] - add_extra_token;
            break;
          }
          ++doc_pos;
          offset = 0;
        }
      }
      o[2 * s] = doc_pos;
      o[2 * s + 1] = offset;
    }
  }
  return out;
}

// Output sample i goes to the dataset whose achieved count lags weight * i the most (first one on ties).
py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                                 int64_t size) {
  const int64_t n = weights.size();
  if (n < 1 || n > 32767) throw std::invalid_argument("build_blending_indices: need 1..32767 datasets");
  const double* w = weights.data();
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t* di = dataset_index.mutable_data();
  int64_t* dsi = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> current(n, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double at = std::max(static_cast<double>(i), 1.0);
      int64_t best = 0;
      double best_lag = w[0] * at - static_cast<double>(current[0]);
      for (int64_t d = 1; d < n; ++d) {
        const double lag = w[d] * at - static_cast<double>(current[d]);
        if (lag > best_lag) {
          best_lag = lag;
          best = d;
        }
      }
      di[i] = static_cast<int16_t>(best);
      dsi[i] = current[best];
      current[best] += 1;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

void register_helpers(py::module_& m) {
  m.def("build_sample_idx", &build_sample_idx, "GPT sample index [N+1, 2]", py::arg("sizes"), py::arg("doc_idx"),
        py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"), py::arg("add_extra_token") = 1);
  m.def("build_blending_indices", &build_blending_indices, "dataset and per-dataset sample index of each sample",
        py::arg("weights"), py::arg("size"));
}

}  // namespace megalm
