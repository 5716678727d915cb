// Multi-adapter LoRA for decode batches (batched gather matrix-vector, "BGMV"): every row t of
// the batch uses its own adapter i = index[t] (-1 = none).
//
//   shrink: u[t, :] = scalings[i] * A[i] x[t]     A [n, r, in]   -> u [T, r] fp32
//   expand: y[t, :] = base[t, :] + B[i] u[t, :]   B [n, out, r]  -> y [T, out], x's dtype
//
// With base = x W^T + bias from cuBLAS this is attnkit.lora_batched. Both kernels are
// matrix-vector products, so they are bound by reading the adapters' weights; the gather by
// index is free (each row reads only its adapter).
//
// shrink grid: (T, ceil(r / 4)), 128 threads; warp w computes u[t, 4 * blockIdx.y + w]: lanes
//   stride over `in` with 16-byte loads of x and A, then a warp reduction.
// expand grid: (T, ceil(out / 128)), 128 threads; thread = one output feature o, a dot product of
//   length r between B[i, o, :] (16-byte loads) and u[t, :] (shared memory).
#include "attnkit_cuda.h"
#include "common.cuh"

namespace attnkit {
namespace {

constexpr int kThreads = 128;
constexpr int kRanksPerBlock = kThreads / 32;

// VEC: `in` % 8 == 0 and 16-byte aligned rows, so 16-byte loads are legal.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) lora_shrink_kernel(const LoraShrinkParams p) {
  const int t = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int rr = blockIdx.y * kRanksPerBlock + (threadIdx.x >> 5);
  if (rr >= p.r) return;  // warp-uniform; no block-wide barrier follows
  const int64_t i = p.index[t];
  float* u = p.u + static_cast<int64_t>(t) * p.r + rr;
  if (i < 0) {
    if (lane == 0) *u = 0.f;
    return;
  }
  const T* x = static_cast<const T*>(p.x) + t * p.x_st;
  const T* a = static_cast<const T*>(p.a) + i * p.a_sn + rr * p.a_sr;
  float acc = 0.f;
  if (VEC) {
    for (int c = lane * kVec; c < p.in; c += 32 * kVec) {
      float xf[kVec], af[kVec];
      unpack8<T>(*reinterpret_cast<const uint4*>(x + c), xf);
      unpack8<T>(__ldg(reinterpret_cast<const uint4*>(a + c)), af);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc = fmaf(xf[e], af[e], acc);
    }
  } else {
    for (int c = lane; c < p.in; c += 32) acc = fmaf(to_float(x[c]), to_float(a[c]), acc);
  }
  acc = group_sum<32>(acc);
  if (lane == 0) *u = acc * p.scalings[i];
}

// VEC: r % 8 == 0 and 16-byte aligned rows of B.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) lora_expand_kernel(const LoraExpandParams p) {
  __shared__ float us[kLoraMaxRank];
  const int t = blockIdx.x;
  const int o = blockIdx.y * kThreads + threadIdx.x;
  const int64_t i = p.index[t];  // same for the whole block
  const int64_t yo = static_cast<int64_t>(t) * p.out + o;
  const T* base = static_cast<const T*>(p.base);
  T* y = static_cast<T*>(p.y);
  if (i < 0) {  // base layer only
    if (o < p.out) y[yo] = base[yo];
    return;
  }
  for (int c = threadIdx.x; c < p.r; c += kThreads) us[c] = p.u[static_cast<int64_t>(t) * p.r + c];
  __syncthreads();
  if (o >= p.out) return;
  const T* brow = static_cast<const T*>(p.b) + i * p.b_sn + o * p.b_so;
  float acc = 0.f;
  if (VEC) {
    for (int c = 0; c < p.r; c += kVec) {
      float bf[kVec];
      unpack8<T>(__ldg(reinterpret_cast<const uint4*>(brow + c)), bf);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc = fmaf(bf[e], us[c + e], acc);
    }
  } else {
    for (int c = 0; c < p.r; ++c) acc = fmaf(to_float(brow[c]), us[c], acc);
  }
  y[yo] = from_float<T>(to_float(base[yo]) + acc);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T>
cudaError_t shrink(const LoraShrinkParams& p, cudaStream_t stream) {
  const dim3 grid(p.T, (p.r + kRanksPerBlock - 1) / kRanksPerBlock);
  const bool vec = p.in % kVec == 0 && p.x_st % kVec == 0 && p.a_sn % kVec == 0 &&
                   p.a_sr % kVec == 0 && aligned16(p.x) && aligned16(p.a);
  if (vec) {
    lora_shrink_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    lora_shrink_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t expand(const LoraExpandParams& p, cudaStream_t stream) {
  const dim3 grid(p.T, (p.out + kThreads - 1) / kThreads);
  const bool vec = p.r % kVec == 0 && p.b_sn % kVec == 0 && p.b_so % kVec == 0 && aligned16(p.b);
  if (vec) {
    lora_expand_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    lora_expand_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t lora_shrink_launch(const LoraShrinkParams& p, DType dtype, cudaStream_t stream) {
  if (p.T == 0 || p.r == 0) return cudaSuccess;
  if (p.r > kLoraMaxRank || p.in < 1) return cudaErrorInvalidValue;
  if (static_cast<unsigned>(p.T) > 0x7fffffffu || (p.r + kRanksPerBlock - 1) / kRanksPerBlock > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  switch (dtype) {
    case DType::kFloat16: return shrink<__half>(p, stream);
    case DType::kBFloat16: return shrink<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t lora_expand_launch(const LoraExpandParams& p, DType dtype, cudaStream_t stream) {
  if (p.T == 0 || p.out == 0) return cudaSuccess;
  if (p.r < 1 || p.r > kLoraMaxRank) return cudaErrorInvalidValue;
  if ((p.out + kThreads - 1) / kThreads > 65535) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DType::kFloat16: return expand<__half>(p, stream);
    case DType::kBFloat16: return expand<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace attnkit
