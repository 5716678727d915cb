// Host-side interface of the attnkit CUDA kernels: plain structs of pointers and sizes, so the
// kernels (*.cu) compile with nothing but nvcc and the torch binding (bindings.cpp) is the only
// file that includes torch. Every launcher returns the CUDA error of its launch.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace attnkit {

// Element type of the inputs (float32 only where a launcher says so).
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// ---- decode attention (decode_attention.cu) ---------------------------------------------------
//
// o[b, h, i] = softmax_j(scale * q[b, h, i] . k[b, h / G, j]) v[b, h / G, j] over the keys j this
// query sees: 0 <= j < len_b, inside the window around its position p = i + shift_b, and not
// padded (key_padding_mask). G = Hq / Hkv. With seqlens_k, len_b = seqlens_k[b] and
// shift_b = len_b - Nq (each sequence bottom-right aligned to its own length, as a KV cache
// is); without it len_b = Nk and shift_b = Nk - Nq. window_left/right: -1 = unbounded.
struct DecodeParams {
  const void* q;  // [B, Hq, Nq, D], strides q_s*, unit stride on D
  const void* k;  // [B, Hkv, Nk, D], 16-byte aligned, strides multiples of 8 elements
  const void* v;  // same layout rules as k
  void* o;        // [B, Hq, Nq, D] contiguous, q's dtype
  float* lse;     // [B, Hq, Nq] contiguous, natural log; -inf for a query that sees no key
  float* o_ws;    // [B, Hq, Nq, S, D] fp32 partial outputs (S = num_splits > 1 only)
  float* lse_ws;  // [B, Hq, Nq, S] fp32 partial log-sum-exps, base-2 (S > 1 only)
  const int32_t* seqlens_k;  // [B] or nullptr
  const uint8_t* kpm;        // [B, Nk] (True = attend) or nullptr
  int64_t q_sb, q_sh, q_sn;
  int64_t k_sb, k_sh, k_sn;
  int64_t v_sb, v_sh, v_sn;
  int64_t m_sb, m_sn;
  int B, Hq, Hkv, Nq, Nk, D;
  float scale;
  int window_left, window_right;
  int num_splits;  // S >= 1, from decode_attention_num_splits
};

// Split count for this call (requested > 0 is honoured, clamped to the supported maximum).
int decode_attention_num_splits(const DecodeParams& p, DType dtype, int requested);
cudaError_t decode_attention_launch(const DecodeParams& p, DType dtype, cudaStream_t stream);

// ---- linear-attention decode step (linear_decode.cu) ------------------------------------------
//
// Per (b, kv head): S' = S + phi(k) v^T, z' = z + phi(k); for each query head of the group
// o = phi(q * scale) S' / (phi(q * scale) . z' + eps)  (no denominator when !normalize).
enum class FeatureMap : int { kIdentity = 0, kElu1 = 1, kRelu = 2 };

struct LinearDecodeParams {
  const void* q;  // [B, Hq, Dk], unit stride on Dk
  const void* k;  // [B, Hkv, Dk]
  const void* v;  // [B, Hkv, Dv]
  const float* s_in;  // [B, Hkv, Dk, Dv] contiguous, 16-byte aligned
  const float* z_in;  // [B, Hkv, Dk] contiguous
  float* s_out;       // like s_in (may not alias it)
  float* z_out;       // like z_in
  void* o;            // [B, Hq, Dv] contiguous, q's dtype
  int64_t q_sb, q_sh, k_sb, k_sh, v_sb, v_sh;
  int B, Hq, Hkv, Dk, Dv;
  FeatureMap feature;
  bool normalize;
  float eps, scale;
};

constexpr int kLinearMaxDk = 512;
constexpr int kLinearMaxDv = 512;  // and Dv % 4 == 0
// dtype: float16, bfloat16 or float32.
cudaError_t linear_decode_launch(const LinearDecodeParams& p, DType dtype, cudaStream_t stream);

// ---- multi-adapter LoRA, BGMV shrink / expand (lora_bgmv.cu) ----------------------------------
//
// shrink: u[t, :] = scalings[i] * A[i] x[t]        (fp32; zeros when i = index[t] = -1)
// expand: y[t, :] = base[t, :] + B[i] u[t, :]      (y = base when i = -1)
struct LoraShrinkParams {
  const void* x;          // [T, in], unit stride on in
  const void* a;          // [n, r, in], unit stride on in
  const float* scalings;  // [n]
  const int64_t* index;   // [T], values in [-1, n)
  float* u;               // [T, r] contiguous
  int64_t x_st, a_sn, a_sr;
  int T, in, r;
};

struct LoraExpandParams {
  const void* base;   // [T, out] contiguous
  const void* b;      // [n, out, r], unit stride on r
  const float* u;     // [T, r] contiguous
  const int64_t* index;
  void* y;            // [T, out] contiguous
  int64_t b_sn, b_so;
  int T, out, r;
};

constexpr int kLoraMaxRank = 512;
cudaError_t lora_shrink_launch(const LoraShrinkParams& p, DType dtype, cudaStream_t stream);
cudaError_t lora_expand_launch(const LoraExpandParams& p, DType dtype, cudaStream_t stream);

}  // namespace attnkit
