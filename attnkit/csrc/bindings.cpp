// The one torch binding of the attnkit CUDA kernels: checks tensors, allocates outputs and calls
// the launchers of attnkit_cuda.h on the current stream. Registers torch.ops.attnkit_cuda.*
// (a namespace of its own: attnkit::* holds the Python-defined Triton ops). The fake (meta)
// implementations that torch.compile traces with live in attnkit/kernels/cuda_ext.py.
//
// Python validates arguments first (clear ValueError/TypeError); the checks here guard the
// kernels' memory-safety assumptions when an op is called directly.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <tuple>

#include "attnkit_cuda.h"

namespace {

using at::Tensor;

attnkit::DType to_dtype(const Tensor& t, bool allow_fp32, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return attnkit::DType::kFloat16;
    case at::kBFloat16: return attnkit::DType::kBFloat16;
    case at::kFloat:
      if (allow_fp32) return attnkit::DType::kFloat32;
      [[fallthrough]];
    default:
      TORCH_CHECK_TYPE(false, name, " has dtype ", t.scalar_type(), "; float16 or bfloat16",
                       allow_fp32 ? " or float32" : "", " is accepted");
  }
  return attnkit::DType::kFloat16;  // unreachable
}

void check_cuda(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == ref.device(), name, " must be on ", ref.device(),
                    ", got ", t.device());
}

// Unit stride on the last dim (copy if not: used for small inputs only).
Tensor unit_last(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

int clamp_window(int64_t w) { return w < 0 ? -1 : static_cast<int>(std::min<int64_t>(w, 1 << 30)); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "attnkit_cuda::", op, " failed to launch: ", cudaGetErrorString(err));
}

// ---- decode attention -------------------------------------------------------------------------

std::tuple<Tensor, Tensor> decode_attention(const Tensor& q_in, const Tensor& k, const Tensor& v,
                                            const std::optional<Tensor>& seqlens_k,
                                            const std::optional<Tensor>& key_padding_mask,
                                            double scale, int64_t window_left, int64_t window_right,
                                            int64_t num_splits) {
  TORCH_CHECK_VALUE(q_in.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "decode_attention: q [B, Hq, Nq, D], k and v [B, Hkv, Nk, D] must be 4-D");
  TORCH_CHECK_VALUE(q_in.is_cuda(), "decode_attention: q must be a CUDA tensor, got ", q_in.device());
  check_cuda(k, q_in, "k");
  check_cuda(v, q_in, "v");
  const auto dtype = to_dtype(q_in, false, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q_in.scalar_type() && v.scalar_type() == q_in.scalar_type(),
                   "decode_attention: q, k, v must share one dtype");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Nq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D,
                    "decode_attention: k and v must be [B, Hkv, Nk, D] with q's B and D");
  TORCH_CHECK_VALUE(D == 64 || D == 128 || D == 256, "decode_attention: head dim ", D,
                    " is not supported (64, 128, 256 are)");
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "decode_attention: Hq (", Hq,
                    ") must be a multiple of Hkv (", Hkv, ")");
  for (const Tensor* t : {&k, &v}) {
    TORCH_CHECK_VALUE(t->stride(3) == 1 && t->stride(0) % 8 == 0 && t->stride(1) % 8 == 0 &&
                          t->stride(2) % 8 == 0 && aligned16(*t),
                      "decode_attention: k and v need a unit stride on D, other strides that are "
                      "multiples of 8 elements and 16-byte aligned data (16-byte loads)");
  }
  TORCH_CHECK_VALUE(Nk < (int64_t{1} << 30) && B * Hq * Nq < std::numeric_limits<int32_t>::max(),
                    "decode_attention: sizes too large");
  TORCH_CHECK_VALUE(!(seqlens_k.has_value() && key_padding_mask.has_value()),
                    "decode_attention: pass seqlens_k or key_padding_mask, not both");
  c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = unit_last(q_in);

  attnkit::DecodeParams p{};
  Tensor seq, kpm;
  if (seqlens_k.has_value()) {
    check_cuda(*seqlens_k, q, "seqlens_k");
    TORCH_CHECK_VALUE(seqlens_k->dim() == 1 && seqlens_k->size(0) == B, "seqlens_k must be [B]");
    seq = seqlens_k->to(at::kInt).contiguous();
    p.seqlens_k = seq.data_ptr<int32_t>();
  }
  if (key_padding_mask.has_value()) {
    check_cuda(*key_padding_mask, q, "key_padding_mask");
    TORCH_CHECK_VALUE(key_padding_mask->dim() == 2 && key_padding_mask->size(0) == B &&
                          key_padding_mask->size(1) == Nk,
                      "key_padding_mask must be [B, Nk]");
    TORCH_CHECK_TYPE(key_padding_mask->scalar_type() == at::kBool, "key_padding_mask must be bool");
    kpm = key_padding_mask->view(at::kByte);
    p.kpm = kpm.data_ptr<uint8_t>();
    p.m_sb = kpm.stride(0);
    p.m_sn = kpm.stride(1);
  }
  Tensor o = at::empty({B, Hq, Nq, D}, q.options());
  Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_sn = q.stride(2);
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_sn = k.stride(2);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_sn = v.stride(2);
  p.B = static_cast<int>(B); p.Hq = static_cast<int>(Hq); p.Hkv = static_cast<int>(Hkv);
  p.Nq = static_cast<int>(Nq); p.Nk = static_cast<int>(Nk); p.D = static_cast<int>(D);
  p.scale = static_cast<float>(scale);
  p.window_left = clamp_window(window_left);
  p.window_right = clamp_window(window_right);
  if (o.numel() == 0) return {o, lse};
  p.num_splits = attnkit::decode_attention_num_splits(p, dtype, static_cast<int>(std::max<int64_t>(num_splits, 0)));
  Tensor o_ws, lse_ws;
  if (p.num_splits > 1) {
    o_ws = at::empty({B, Hq, Nq, p.num_splits, D}, q.options().dtype(at::kFloat));
    lse_ws = at::empty({B, Hq, Nq, p.num_splits}, q.options().dtype(at::kFloat));
    p.o_ws = o_ws.data_ptr<float>();
    p.lse_ws = lse_ws.data_ptr<float>();
  }
  check_launch(attnkit::decode_attention_launch(p, dtype, c10::cuda::getCurrentCUDAStream()),
               "decode_attention");
  return {o, lse};
}

// ---- linear-attention decode step ---------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> linear_decode_step(const Tensor& q_in, const Tensor& k_in,
                                                      const Tensor& v_in, const Tensor& s_in,
                                                      const Tensor& z_in, int64_t feature_map,
                                                      bool normalize, double eps, double scale) {
  TORCH_CHECK_VALUE(q_in.dim() == 3 && k_in.dim() == 3 && v_in.dim() == 3,
                    "linear_decode_step: q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv] must be 3-D");
  TORCH_CHECK_VALUE(q_in.is_cuda(), "linear_decode_step: q must be a CUDA tensor");
  for (const Tensor* t : {&k_in, &v_in, &s_in, &z_in}) check_cuda(*t, q_in, "k, v, s, z");
  const auto dtype = to_dtype(q_in, true, "q");
  TORCH_CHECK_TYPE(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
                   "linear_decode_step: q, k, v must share one dtype");
  TORCH_CHECK_TYPE(s_in.scalar_type() == at::kFloat && z_in.scalar_type() == at::kFloat,
                   "linear_decode_step: the state (s, z) must be float32");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Dk = q_in.size(2);
  const int64_t Hkv = k_in.size(1), Dv = v_in.size(2);
  TORCH_CHECK_VALUE(k_in.size(0) == B && v_in.size(0) == B && v_in.size(1) == Hkv && k_in.size(2) == Dk,
                    "linear_decode_step: inconsistent q/k/v shapes");
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "linear_decode_step: Hq must be a multiple of Hkv");
  TORCH_CHECK_VALUE(Dk >= 1 && Dk <= attnkit::kLinearMaxDk && Dv >= 4 && Dv <= attnkit::kLinearMaxDv &&
                        Dv % 4 == 0,
                    "linear_decode_step: needs Dk <= ", attnkit::kLinearMaxDk, " and Dv <= ",
                    attnkit::kLinearMaxDv, " with Dv % 4 == 0, got Dk ", Dk, ", Dv ", Dv);
  TORCH_CHECK_VALUE(s_in.dim() == 4 && s_in.size(0) == B && s_in.size(1) == Hkv && s_in.size(2) == Dk &&
                        s_in.size(3) == Dv,
                    "linear_decode_step: s must be [B, Hkv, Dk, Dv]");
  TORCH_CHECK_VALUE(z_in.dim() == 3 && z_in.size(0) == B && z_in.size(1) == Hkv && z_in.size(2) == Dk,
                    "linear_decode_step: z must be [B, Hkv, Dk]");
  TORCH_CHECK_VALUE(feature_map >= 0 && feature_map <= 2, "feature_map code must be 0, 1 or 2");
  c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  Tensor s = s_in.contiguous();
  if (!aligned16(s)) s = s.clone();  // float4 rows
  const Tensor z = z_in.contiguous();
  Tensor s_out = at::empty_like(s, at::MemoryFormat::Contiguous);
  Tensor z_out = at::empty_like(z, at::MemoryFormat::Contiguous);
  Tensor o = at::empty({B, Hq, Dv}, q.options());
  if (B == 0) return {o, s_out, z_out};
  attnkit::LinearDecodeParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  p.s_in = s.data_ptr<float>(); p.z_in = z.data_ptr<float>();
  p.s_out = s_out.data_ptr<float>(); p.z_out = z_out.data_ptr<float>();
  p.o = o.data_ptr();
  p.q_sb = q.stride(0); p.q_sh = q.stride(1);
  p.k_sb = k.stride(0); p.k_sh = k.stride(1);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1);
  p.B = static_cast<int>(B); p.Hq = static_cast<int>(Hq); p.Hkv = static_cast<int>(Hkv);
  p.Dk = static_cast<int>(Dk); p.Dv = static_cast<int>(Dv);
  p.feature = static_cast<attnkit::FeatureMap>(feature_map);
  p.normalize = normalize;
  p.eps = static_cast<float>(eps);
  p.scale = static_cast<float>(scale);
  check_launch(attnkit::linear_decode_launch(p, dtype, c10::cuda::getCurrentCUDAStream()),
               "linear_decode_step");
  return {o, s_out, z_out};
}

// ---- multi-adapter LoRA ---------------------------------------------------------------------------

Tensor lora_shrink(const Tensor& x_in, const Tensor& a_in, const Tensor& scalings, const Tensor& index) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 && a_in.dim() == 3, "lora_shrink: x [T, in], lora_a [n, r, in]");
  TORCH_CHECK_VALUE(x_in.is_cuda(), "lora_shrink: x must be a CUDA tensor");
  for (const Tensor* t : {&a_in, &scalings, &index}) check_cuda(*t, x_in, "lora_a, scalings, index");
  const auto dtype = to_dtype(x_in, false, "x");
  TORCH_CHECK_TYPE(a_in.scalar_type() == x_in.scalar_type(), "lora_shrink: lora_a must have x's dtype");
  const int64_t T = x_in.size(0), in = x_in.size(1), n = a_in.size(0), r = a_in.size(1);
  TORCH_CHECK_VALUE(a_in.size(2) == in, "lora_shrink: lora_a must be [n, r, ", in, "]");
  TORCH_CHECK_VALUE(r >= 1 && r <= attnkit::kLoraMaxRank, "lora_shrink: rank ", r, " outside [1, ",
                    attnkit::kLoraMaxRank, "]");
  TORCH_CHECK_VALUE(scalings.numel() == n && index.numel() == T, "lora_shrink: scalings [n], index [T]");
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = unit_last(x_in), a = unit_last(a_in);
  const Tensor s = scalings.to(at::kFloat).contiguous();
  const Tensor idx = index.to(at::kLong).contiguous();
  Tensor u = at::empty({T, r}, x.options().dtype(at::kFloat));
  attnkit::LoraShrinkParams p{};
  p.x = x.data_ptr(); p.a = a.data_ptr(); p.scalings = s.data_ptr<float>();
  p.index = idx.data_ptr<int64_t>(); p.u = u.data_ptr<float>();
  p.x_st = x.stride(0); p.a_sn = a.stride(0); p.a_sr = a.stride(1);
  p.T = static_cast<int>(T); p.in = static_cast<int>(in); p.r = static_cast<int>(r);
  check_launch(attnkit::lora_shrink_launch(p, dtype, c10::cuda::getCurrentCUDAStream()), "lora_shrink");
  return u;
}

Tensor lora_expand(const Tensor& base_in, const Tensor& b_in, const Tensor& u_in, const Tensor& index) {
  TORCH_CHECK_VALUE(base_in.dim() == 2 && b_in.dim() == 3 && u_in.dim() == 2,
                    "lora_expand: base [T, out], lora_b [n, out, r], u [T, r]");
  TORCH_CHECK_VALUE(base_in.is_cuda(), "lora_expand: base must be a CUDA tensor");
  for (const Tensor* t : {&b_in, &u_in, &index}) check_cuda(*t, base_in, "lora_b, u, index");
  const auto dtype = to_dtype(base_in, false, "base");
  TORCH_CHECK_TYPE(b_in.scalar_type() == base_in.scalar_type(), "lora_expand: lora_b must have base's dtype");
  const int64_t T = base_in.size(0), out = base_in.size(1), r = b_in.size(2);
  TORCH_CHECK_VALUE(b_in.size(1) == out && u_in.size(0) == T && u_in.size(1) == r,
                    "lora_expand: inconsistent shapes");
  TORCH_CHECK_VALUE(r >= 1 && r <= attnkit::kLoraMaxRank, "lora_expand: rank ", r, " outside [1, ",
                    attnkit::kLoraMaxRank, "]");
  TORCH_CHECK_VALUE(index.numel() == T, "lora_expand: index must be [T]");
  c10::cuda::CUDAGuard guard(base_in.device());
  const Tensor base = base_in.contiguous(), b = unit_last(b_in);
  const Tensor u = u_in.to(at::kFloat).contiguous();
  const Tensor idx = index.to(at::kLong).contiguous();
  Tensor y = at::empty_like(base, at::MemoryFormat::Contiguous);
  attnkit::LoraExpandParams p{};
  p.base = base.data_ptr(); p.b = b.data_ptr(); p.u = u.data_ptr<float>();
  p.index = idx.data_ptr<int64_t>(); p.y = y.data_ptr();
  p.b_sn = b.stride(0); p.b_so = b.stride(1);
  p.T = static_cast<int>(T); p.out = static_cast<int>(out); p.r = static_cast<int>(r);
  check_launch(attnkit::lora_expand_launch(p, dtype, c10::cuda::getCurrentCUDAStream()), "lora_expand");
  return y;
}

}  // namespace

TORCH_LIBRARY(attnkit_cuda, m) {
  // torch.compile finds the fake implementations by importing this module.
  m.set_python_module("attnkit.kernels.cuda_ext");
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? seqlens_k, Tensor? key_padding_mask, "
      "float scale, int window_left, int window_right, int num_splits) -> (Tensor, Tensor)");
  m.def(
      "linear_decode_step(Tensor q, Tensor k, Tensor v, Tensor s, Tensor z, int feature_map, "
      "bool normalize, float eps, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("lora_shrink(Tensor x, Tensor lora_a, Tensor scalings, Tensor index) -> Tensor");
  m.def("lora_expand(Tensor base, Tensor lora_b, Tensor u, Tensor index) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnkit_cuda, CUDA, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("linear_decode_step", &linear_decode_step);
  m.impl("lora_shrink", &lora_shrink);
  m.impl("lora_expand", &lora_expand);
}
