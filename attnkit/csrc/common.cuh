// Shared device helpers of the attnkit CUDA kernels: dtype conversions, 16-byte vectors,
// cp.async and warp reductions.
//
// torch's extension builder compiles with -D__CUDA_NO_HALF_CONVERSIONS__ and friends, so every
// conversion here is an explicit intrinsic (never an implicit half <-> float cast); the CI compile
// test passes the same defines.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace attnkit {

// ---- scalar conversions ---------------------------------------------------------------------

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }

// ---- 16-byte vectors of 8 half-precision elements ------------------------------------------

// 8 x 16-bit elements = 16 bytes = one LDG.128 / LDS.128 / cp.async.
constexpr int kVec = 8;

struct __align__(16) Vec8 {
  uint4 raw;
};

// Unpack 8 fp16/bf16 elements held in a 16-byte vector into fp32.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[kVec]) {
  static_assert(sizeof(T) == 2, "unpack8 takes 16-bit element types");
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_float(e[i]);
}

// ---- cp.async (sm_80+): global -> shared without a register round trip ----------------------

// Copy 16 bytes; when `valid` is false nothing is read and the destination is zero-filled
// (src-size 0), so out-of-range rows never hold stale or NaN data.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(src_size));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- warp reductions -------------------------------------------------------------------------

// Reduce over groups of WIDTH consecutive lanes (WIDTH a power of two <= 32).
template <int WIDTH>
__device__ __forceinline__ float group_sum(float x) {
  static_assert(WIDTH >= 1 && WIDTH <= 32 && (WIDTH & (WIDTH - 1)) == 0, "WIDTH: power of two");
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <int WIDTH>
__device__ __forceinline__ float group_max(float x) {
  static_assert(WIDTH >= 1 && WIDTH <= 32 && (WIDTH & (WIDTH - 1)) == 0, "WIDTH: power of two");
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Number of SMs of the current device (cached per device; used to size split-KV grids).
inline int device_sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 108;
  if (dev < 64 && cache[dev] > 0) return cache[dev];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 108;
  if (dev < 64) cache[dev] = n;
  return n;
}

}  // namespace attnkit
