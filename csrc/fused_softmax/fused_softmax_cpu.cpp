// Fused scale + mask + softmax on CPU, forward and backward, fp32 and bf16 (fp32 accumulation).
//
// y = softmax(scale * x + mask) over the last dimension of [b, h, sq, sk] scores:
//   kind 0 unmasked, kind 1 padding mask (True = masked, filled with -10000; fully masked rows give zeros),
//   kind 2 causal (sq == sk; entries above the diagonal are -inf and are never computed).
// Backward from the saved output: dx = scale * y * (dy - sum(dy * y)).
// Each row is done in one pass through a small float buffer, so the tensor is read once and written once.
#include <torch/extension.h>

#include "checks.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace megalm {
namespace {

constexpr float kPaddingFill = -10000.0f;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEGALM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MEGALM_CLONES
#endif

// exp for x <= 0 (inputs are shifted by the row max); Cephes polynomial, ~1 ulp; branch-free float and int
// arithmetic (rounding by the 1.5 * 2^23 trick, no libm call) so that, with -fno-trapping-math, the compiler
// vectorises the loops that call it.
static inline float exp_nonpositive(float x) {
  const float xc = x > -87.0f ? x : -87.0f;
  const float r = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest integer
  const float f = xc - r * 0.693359375f + r * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
  float two_r;
  std::memcpy(&two_r, &bits, sizeof(float));
  return p * two_r * static_cast<float>(x >= -87.0f);
}

// Reductions keep 8 partial results so the compiler can vectorise them without reassociating floats itself.
constexpr int kLanes = 8;

MEGALM_CLONES static float row_max(const float* v, int64_t n) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -INFINITY;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = v[j + l] > acc[l] ? v[j + l] : acc[l];
  float m = -INFINITY;
  for (int l = 0; l < kLanes; ++l) m = acc[l] > m ? acc[l] : m;
  for (; j < n; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

MEGALM_CLONES static float row_sum(const float* v, int64_t n) {
  float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += v[j + l];
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < n; ++j) s += v[j];
  return s;
}

MEGALM_CLONES static float exp_shift_sum(float* v, int64_t n, float shift) {
  for (int64_t j = 0; j < n; ++j) v[j] = exp_nonpositive(v[j] - shift);
  return row_sum(v, n);
}

MEGALM_CLONES static float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// dx = scale * y * (dy - s), all float
MEGALM_CLONES static void softmax_grad(const float* g, const float* p, float* out, int64_t n, float s, float scale) {
  for (int64_t j = 0; j < n; ++j) out[j] = scale * p[j] * (g[j] - s);
}

MEGALM_CLONES static void scale_inplace(float* v, int64_t n, float mul) {
  for (int64_t j = 0; j < n; ++j) v[j] *= mul;
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
void load_scaled(const T* in, float* buf, int64_t n, float scale) {
  for (int64_t j = 0; j < n; ++j) buf[j] = to_float(in[j]) * scale;
}

template <typename T>
void store(const float* buf, T* out, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(out, buf, n * sizeof(float));
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(buf[j]);
  }
}

template <typename T>
void forward_rows(const T* x, const bool* mask, T* y, int64_t rows, int64_t heads, int64_t sq, int64_t sk,
                  int64_t mask_batch, float scale, int kind) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(sk);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t q = r % sq;
      const T* in = x + r * sk;
      T* out = y + r * sk;
      const int64_t n = kind == 2 ? q + 1 : sk;  // causal rows see columns 0..q
      load_scaled(in, buf.data(), n, scale);
      if (kind == 1) {
        const int64_t b = mask_batch > 1 ? r / (heads * sq) : 0;
        const bool* m = mask + (b * sq + q) * sk;
        bool all_masked = true;
        for (int64_t j = 0; j < sk; ++j) {
          if (m[j]) buf[j] = kPaddingFill;
          all_masked &= m[j];
        }
        if (all_masked) {
          for (int64_t j = 0; j < sk; ++j) out[j] = static_cast<T>(0.0f);
          continue;
        }
      }
      const float mx = row_max(buf.data(), n);
      const float sum = exp_shift_sum(buf.data(), n, mx);
      scale_inplace(buf.data(), n, 1.0f / sum);
      store(buf.data(), out, n);
      for (int64_t j = n; j < sk; ++j) out[j] = static_cast<T>(0.0f);
    }
  });
}

template <typename T>
void backward_rows(const T* dy, const T* y, T* dx, int64_t rows, int64_t sq, int64_t sk, float scale, int kind) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> g(sk), p(sk), d(sk);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = kind == 2 ? r % sq + 1 : sk;
      load_scaled(dy + r * sk, g.data(), n, 1.0f);
      load_scaled(y + r * sk, p.data(), n, 1.0f);
      const float s = dot(g.data(), p.data(), n);
      T* out = dx + r * sk;
      softmax_grad(g.data(), p.data(), d.data(), n, s, scale);
      store(d.data(), out, n);
      for (int64_t j = n; j < sk; ++j) out[j] = static_cast<T>(0.0f);
    }
  });
}

void check_scores(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fused_softmax (CPU): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4, "fused_softmax: ", name, " must be [b, heads, sq, sk], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "fused_softmax (CPU): ", name, " must be float32 or bfloat16, got ", t.scalar_type());
}

}  // namespace

// kind: 0 unmasked, 1 padding mask ([b or 1, 1, sq, sk] bool), 2 causal
torch::Tensor fused_softmax_forward_cpu(torch::Tensor x, c10::optional<torch::Tensor> mask, double scale, int64_t kind) {
  check_scores(x, "input");
  x = x.contiguous();
  const int64_t b = x.size(0), h = x.size(1), sq = x.size(2), sk = x.size(3);
  const auto [m, mask_batch] = checked_mask(mask, x, kind);
  auto y = torch::empty_like(x);
  const int64_t rows = b * h * sq;
  const bool* mp = kind == 1 ? m.data_ptr<bool>() : nullptr;
  if (x.scalar_type() == at::kFloat) {
    forward_rows<float>(x.data_ptr<float>(), mp, y.data_ptr<float>(), rows, h, sq, sk, mask_batch,
                        static_cast<float>(scale), static_cast<int>(kind));
  } else {
    forward_rows<at::BFloat16>(x.data_ptr<at::BFloat16>(), mp, y.data_ptr<at::BFloat16>(), rows, h, sq, sk,
                               mask_batch, static_cast<float>(scale), static_cast<int>(kind));
  }
  return y;
}

torch::Tensor fused_softmax_backward_cpu(torch::Tensor dy, torch::Tensor y, double scale, int64_t kind) {
  check_scores(y, "output");
  check_backward_args(dy, y);
  dy = dy.contiguous();
  y = y.contiguous();
  auto dx = torch::empty_like(y);
  const int64_t rows = y.size(0) * y.size(1) * y.size(2), sq = y.size(2), sk = y.size(3);
  if (y.scalar_type() == at::kFloat) {
    backward_rows<float>(dy.data_ptr<float>(), y.data_ptr<float>(), dx.data_ptr<float>(), rows, sq, sk,
                         static_cast<float>(scale), static_cast<int>(kind));
  } else {
    backward_rows<at::BFloat16>(dy.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(),
                                dx.data_ptr<at::BFloat16>(), rows, sq, sk, static_cast<float>(scale),
                                static_cast<int>(kind));
  }
  return dx;
}

void register_fused_softmax_cpu(pybind11::module_& m) {
  m.def("fused_softmax_forward_cpu", &fused_softmax_forward_cpu, "softmax(scale*x + mask), CPU",
        py::arg("x"), py::arg("mask"), py::arg("scale"), py::arg("kind"));
  m.def("fused_softmax_backward_cpu", &fused_softmax_backward_cpu, "softmax backward from the output, CPU",
        py::arg("dy"), py::arg("y"), py::arg("scale"), py::arg("kind"));
}

}  // namespace megalm
