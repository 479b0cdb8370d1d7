// Fused scale + mask + softmax on CUDA, forward and backward, fp16 and bf16 with fp32 accumulation.
// Same contract as fused_softmax_cpu.cpp (kind 0 unmasked, 1 padding mask filled with -10000 and fully masked
// rows zero, 2 causal). One warp per row; each thread keeps its ELEMS values of the row in registers and the
// row's max and sums come from warp shuffles. Torch-free, so nvcc can compile-check it on any machine.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace megalm {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, int ELEMS>
__global__ void softmax_forward(const T* __restrict__ x, const uint8_t* __restrict__ mask, T* __restrict__ y,
                                int64_t rows, int heads, int sq, int sk, int mask_batch, float scale, int kind) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarp;
  const int q = static_cast<int>(row % sq);
  const int n = kind == 2 ? q + 1 : sk;
  const T* in = x + row * sk;
  T* out = y + row * sk;
  const uint8_t* m = nullptr;
  if (kind == 1) m = mask + ((mask_batch > 1 ? row / (static_cast<int64_t>(heads) * sq) : 0) * sq + q) * sk;
  float v[ELEMS];
  float mx = -INFINITY;
  int unmasked = 0;
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    const int col = lane + i * kWarp;
    float val = -INFINITY;
    if (col < n) {
      if (m != nullptr && m[col]) {
        val = -10000.0f;
      } else {
        val = to_float(in[col]) * scale;
        unmasked = 1;
      }
    }
    v[i] = val;
    mx = fmaxf(mx, val);
  }
  mx = warp_max(mx);
  const bool all_masked = kind == 1 && __ballot_sync(0xffffffffu, unmasked) == 0u;
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    const int col = lane + i * kWarp;
    v[i] = col < n ? __expf(v[i] - mx) : 0.0f;
    sum += v[i];
  }
  sum = warp_sum(sum);
  const float inv = all_masked ? 0.0f : 1.0f / sum;
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    const int col = lane + i * kWarp;
    if (col < sk) out[col] = from_float<T>(v[i] * inv);
  }
}

template <typename T, int ELEMS>
__global__ void softmax_backward(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                                 int64_t rows, int sq, int sk, float scale, int kind) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarp;
  const int n = kind == 2 ? static_cast<int>(row % sq) + 1 : sk;
  float g[ELEMS], p[ELEMS];
  float dot = 0.0f;
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    const int col = lane + i * kWarp;
    g[i] = col < n ? to_float(dy[row * sk + col]) : 0.0f;
    p[i] = col < n ? to_float(y[row * sk + col]) : 0.0f;
    dot += g[i] * p[i];
  }
  dot = warp_sum(dot);
#pragma unroll
  for (int i = 0; i < ELEMS; ++i) {
    const int col = lane + i * kWarp;
    if (col < sk) dx[row * sk + col] = from_float<T>(scale * p[i] * (g[i] - dot));
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Calls f(std::integral_constant<int, ELEMS>) with the smallest ELEMS (values per lane) that covers sk.
template <typename F>
void dispatch_elems(int sk, F&& f) {
  if (sk <= 32) f(std::integral_constant<int, 1>{});
  else if (sk <= 64) f(std::integral_constant<int, 2>{});
  else if (sk <= 128) f(std::integral_constant<int, 4>{});
  else if (sk <= 256) f(std::integral_constant<int, 8>{});
  else if (sk <= 512) f(std::integral_constant<int, 16>{});
  else if (sk <= 1024) f(std::integral_constant<int, 32>{});
  else if (sk <= 2048) f(std::integral_constant<int, 64>{});
  else if (sk <= 4096) f(std::integral_constant<int, 128>{});
  else throw std::invalid_argument("fused softmax (CUDA): sk must be at most 4096");
}

dim3 grid_for(int64_t rows) {
  return dim3(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
}

template <typename T>
void forward_typed(const void* x, const uint8_t* mask, void* y, int64_t rows, int heads, int sq, int sk,
                   int mask_batch, float scale, int kind, cudaStream_t stream) {
  dispatch_elems(sk, [&](auto elems) {
    softmax_forward<T, decltype(elems)::value><<<grid_for(rows), kWarp * kWarpsPerBlock, 0, stream>>>(
        static_cast<const T*>(x), mask, static_cast<T*>(y), rows, heads, sq, sk, mask_batch, scale, kind);
  });
  check(cudaGetLastError(), "fused softmax forward launch");
}

template <typename T>
void backward_typed(const void* dy, const void* y, void* dx, int64_t rows, int sq, int sk, float scale, int kind,
                    cudaStream_t stream) {
  dispatch_elems(sk, [&](auto elems) {
    softmax_backward<T, decltype(elems)::value><<<grid_for(rows), kWarp * kWarpsPerBlock, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(y), static_cast<T*>(dx), rows, sq, sk, scale, kind);
  });
  check(cudaGetLastError(), "fused softmax backward launch");
}

}  // namespace

void launch_fused_softmax_forward(const void* x, const uint8_t* mask, void* y, int64_t rows, int heads, int sq,
                                  int sk, int mask_batch, float scale, int kind, bool bf16, cudaStream_t stream) {
  if (bf16) forward_typed<__nv_bfloat16>(x, mask, y, rows, heads, sq, sk, mask_batch, scale, kind, stream);
  else forward_typed<__half>(x, mask, y, rows, heads, sq, sk, mask_batch, scale, kind, stream);
}

void launch_fused_softmax_backward(const void* dy, const void* y, void* dx, int64_t rows, int sq, int sk,
                                   float scale, int kind, bool bf16, cudaStream_t stream) {
  if (bf16) backward_typed<__nv_bfloat16>(dy, y, dx, rows, sq, sk, scale, kind, stream);
  else backward_typed<__half>(dy, y, dx, rows, sq, sk, scale, kind, stream);
}

}  // namespace megalm
