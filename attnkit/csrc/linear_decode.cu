// Linear-attention decode step for a batch of sequences in one launch.
//
// Per (b, kv head): S' = S + phi(k) v^T   [Dk, Dv] fp32,   z' = z + phi(k)   [Dk]
// and for each query head h of the group (G = Hq / Hkv of them):
//     o_h = phi(q_h * scale) S' / (phi(q_h * scale) . z' + eps)     (no division if !normalize)
//
// Grid: (Hkv, B), 128 threads. The step is bound by reading S and writing S' (8 * Dk * Dv bytes
// per head), so the block streams S once, row by row, with float4 loads:
//   thread = (column vector cv of 4 values of Dv, row slice sl): rows f = sl, sl + NSL, ...
// Each thread keeps G partial numerators for its 4 columns (query heads in chunks of kGChunk;
// chunks after the first re-read S' that the same thread wrote), and the slices are summed in
// shared memory. phi(k), phi(q * scale), v and z' are staged in shared memory first.
#include "attnkit_cuda.h"
#include "common.cuh"

#include <math.h>

namespace attnkit {
namespace {

constexpr int kThreads = 128;
constexpr int kGChunk = 8;  // query heads per pass over S'

__device__ __forceinline__ float feature(float x, FeatureMap f) {
  switch (f) {
    case FeatureMap::kElu1: return x > 0.f ? x + 1.f : expm1f(x) + 1.f;  // elu(x) + 1, as torch
    case FeatureMap::kRelu: return fmaxf(x, 0.f);
    default: return x;
  }
}

struct __align__(16) LinearSmem {
  float fk[kLinearMaxDk];             // phi(k)
  float z[kLinearMaxDk];              // z'
  float v[kLinearMaxDv];              // v (fp32)
  float fq[kGChunk][kLinearMaxDk];    // phi(q * scale) of the current chunk of query heads
  float red[kThreads * 4 * kGChunk];  // [NSL][kGChunk][NV * 4] partial numerators
  float den[kGChunk];
};
static_assert(sizeof(LinearSmem) <= 48 * 1024, "static shared memory limit");

template <typename T>
__global__ void __launch_bounds__(kThreads) linear_decode_kernel(const LinearDecodeParams p) {
  __shared__ LinearSmem sm;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int kvh = blockIdx.x, b = blockIdx.y;
  const int G = p.Hq / p.Hkv, Dk = p.Dk, Dv = p.Dv;
  const int NV = Dv / 4;                              // float4 columns (Dv % 4 == 0, NV <= 128)
  const int NSL = kThreads / NV;                      // row slices
  const int cv = tid % NV, sl = tid / NV;
  const bool active = sl < NSL;                       // threads past NSL * NV idle in the sweep

  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;
  const int64_t head = static_cast<int64_t>(b) * p.Hkv + kvh;
  const float* s_in = p.s_in + head * Dk * Dv;
  float* s_out = p.s_out + head * Dk * Dv;
  for (int f = tid; f < Dk; f += kThreads) {
    const float fk = feature(to_float(k[f]), p.feature);
    sm.fk[f] = fk;
    const float z = p.z_in[head * Dk + f] + fk;
    sm.z[f] = z;
    p.z_out[head * Dk + f] = z;
  }
  for (int d = tid; d < Dv; d += kThreads) sm.v[d] = to_float(v[d]);

  for (int g0 = 0; g0 < G; g0 += kGChunk) {
    const int ng = min(kGChunk, G - g0);
    __syncthreads();  // previous chunk's readers of fq / red / den are done
    for (int e = tid; e < ng * Dk; e += kThreads) {
      const int g = e / Dk, f = e % Dk;
      const int h = kvh * G + g0 + g;
      const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
      sm.fq[g][f] = feature(to_float(q[f]) * p.scale, p.feature);
    }
    __syncthreads();

    // Sweep S: rows f of this slice, columns [4 cv, 4 cv + 4).
    float num[kGChunk][4];
#pragma unroll
    for (int g = 0; g < kGChunk; ++g)
#pragma unroll
      for (int i = 0; i < 4; ++i) num[g][i] = 0.f;
    if (active) {
      const float4 v4 = *reinterpret_cast<const float4*>(&sm.v[cv * 4]);
      // Unrolled so that each thread has several 16-byte loads of S in flight (the step is
      // bound by memory latency x bytes in flight at ~5 blocks per SM).
#pragma unroll 4
      for (int f = sl; f < Dk; f += NSL) {
        float4 s;
        if (g0 == 0) {  // first chunk: S' = S + phi(k_f) v, written once
          s = reinterpret_cast<const float4*>(s_in + static_cast<int64_t>(f) * Dv)[cv];
          const float fk = sm.fk[f];
          s.x = fmaf(fk, v4.x, s.x);
          s.y = fmaf(fk, v4.y, s.y);
          s.z = fmaf(fk, v4.z, s.z);
          s.w = fmaf(fk, v4.w, s.w);
          reinterpret_cast<float4*>(s_out + static_cast<int64_t>(f) * Dv)[cv] = s;
        } else {  // later chunks: this thread's own writes of S'
          s = reinterpret_cast<const float4*>(s_out + static_cast<int64_t>(f) * Dv)[cv];
        }
#pragma unroll
        for (int g = 0; g < kGChunk; ++g) {
          if (g < ng) {
            const float fq = sm.fq[g][f];
            num[g][0] = fmaf(fq, s.x, num[g][0]);
            num[g][1] = fmaf(fq, s.y, num[g][1]);
            num[g][2] = fmaf(fq, s.z, num[g][2]);
            num[g][3] = fmaf(fq, s.w, num[g][3]);
          }
        }
      }
#pragma unroll
      for (int g = 0; g < kGChunk; ++g) {
        *reinterpret_cast<float4*>(&sm.red[(sl * kGChunk + g) * Dv + cv * 4]) =
            make_float4(num[g][0], num[g][1], num[g][2], num[g][3]);
      }
    }
    // Denominators phi(q_g) . z': warp w takes query heads g = w, w + 4, ...
    if (p.normalize) {
      for (int g = warp; g < ng; g += kThreads / 32) {
        float x = 0.f;
        for (int f = lane; f < Dk; f += 32) x = fmaf(sm.fq[g][f], sm.z[f], x);
        x = group_sum<32>(x);
        if (lane == 0) sm.den[g] = x + p.eps;
      }
    }
    __syncthreads();

    for (int e = tid; e < ng * Dv; e += kThreads) {
      const int g = e / Dv, d = e % Dv;
      float o = 0.f;
      for (int s = 0; s < NSL; ++s) o += sm.red[(s * kGChunk + g) * Dv + d];
      if (p.normalize) o /= sm.den[g];
      const int h = kvh * G + g0 + g;
      static_cast<T*>(p.o)[(static_cast<int64_t>(b) * p.Hq + h) * Dv + d] = from_float<T>(o);
    }
  }
}

}  // namespace

cudaError_t linear_decode_launch(const LinearDecodeParams& p, DType dtype, cudaStream_t stream) {
  if (p.B == 0 || p.Hkv == 0) return cudaSuccess;
  if (p.Hq % p.Hkv != 0 || p.Dk < 1 || p.Dk > kLinearMaxDk || p.Dv < 4 || p.Dv > kLinearMaxDv ||
      p.Dv % 4 != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.B > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(p.Hkv, p.B);
  switch (dtype) {
    case DType::kFloat16: linear_decode_kernel<__half><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::kBFloat16: linear_decode_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::kFloat32: linear_decode_kernel<float><<<grid, kThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace attnkit
