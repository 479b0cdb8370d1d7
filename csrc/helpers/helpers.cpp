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
    // Lengths in walk order first, every id checked on the way: the gather's loads are independent of each
    // other, so their cache misses overlap; the walk below then reads one array front to back.
    bool ids_ok = n_sizes > 0 || n_docs == 0;
    std::vector<int32_t> lens(ids_ok ? n_docs : 0);
    for (int64_t i = 0; ids_ok && i < n_docs; ++i) {
      const int32_t doc = doc_ptr[i];
      const bool ok = doc >= 0 && doc < n_sizes;
      ids_ok &= ok;
      lens[i] = size_ptr[ok ? doc : 0];
    }
    if (!ids_ok) throw std::out_of_range("build_sample_idx: document id outside sizes");
    int64_t doc_pos = 0, offset = 0;
    o[0] = 0;
    o[1] = 0;
    for (int64_t s = 1; s <= num_samples; ++s) {
      int64_t remaining = seq_length + add_extra_token;
      while (remaining != 0) {
        if (doc_pos >= n_docs) throw std::out_of_range("build_sample_idx: ran past the document index");
        const int64_t doc_len = static_cast<int64_t>(lens[doc_pos]) - offset;
        remaining -= doc_len;
        if (remaining <= 0) {
          offset += remaining + doc_len - add_extra_token;
          remaining = 0;
        } else {
          if (doc_pos == n_docs - 1) {  // the data ran out: the last sample ends at the last token
            offset = lens[doc_pos] - add_extra_token;
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
// Counts are kept as doubles (exact below 2^53) so every lag is the same double expression Megatron computes;
// with the dataset count a compile-time constant the counts stay in registers and the choice is branch-free
// (the chosen dataset follows no pattern a branch predictor could learn).
template <int N>
void blend_fixed(const double* w, int64_t size, int16_t* di, int64_t* dsi) {
  double weight[N], count[N];
  for (int d = 0; d < N; ++d) {
    weight[d] = w[d];
    count[d] = 0.0;
  }
  for (int64_t i = 0; i < size; ++i) {
    const double at = std::max(static_cast<double>(i), 1.0);
    int best = 0;
    double best_lag = weight[0] * at - count[0], chosen = count[0];
    for (int d = 1; d < N; ++d) {
      const double lag = weight[d] * at - count[d];
      const bool more = lag > best_lag;
      best_lag = more ? lag : best_lag;
      chosen = more ? count[d] : chosen;
      best = more ? d : best;
    }
    di[i] = static_cast<int16_t>(best);
    dsi[i] = static_cast<int64_t>(chosen);
    for (int d = 0; d < N; ++d) count[d] += (d == best) ? 1.0 : 0.0;
  }
}

void blend_any(const double* w, int64_t n, int64_t size, int16_t* di, int64_t* dsi) {
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

py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                                 int64_t size) {
  const int64_t n = weights.size();
  if (n < 1 || n > 32767) throw std::invalid_argument("build_blending_indices: need 1..32767 datasets");
  if (size < 0) throw std::invalid_argument("build_blending_indices: size must be >= 0");
  const double* w = weights.data();
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t* di = dataset_index.mutable_data();
  int64_t* dsi = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    switch (n) {
      case 1: blend_fixed<1>(w, size, di, dsi); break;
      case 2: blend_fixed<2>(w, size, di, dsi); break;
      case 3: blend_fixed<3>(w, size, di, dsi); break;
      case 4: blend_fixed<4>(w, size, di, dsi); break;
      case 5: blend_fixed<5>(w, size, di, dsi); break;
      case 6: blend_fixed<6>(w, size, di, dsi); break;
      case 7: blend_fixed<7>(w, size, di, dsi); break;
      case 8: blend_fixed<8>(w, size, di, dsi); break;
      default: blend_any(w, n, size, di, dsi);
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
