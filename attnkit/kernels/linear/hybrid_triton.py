"""The Triton path of the sliding-window + linear hybrid (``linear_attention(..., window=W)``),
composed from two kernels attnkit already has, with no kernel of its own.

Query ``i`` sits at token ``T = L + i`` of the extended sequence ``[window state (L tokens), the
call's N tokens]``; it attends the keys ``(T - W, T]`` with softmax weights and the keys
``<= T - W`` with linear weights ``gamma^(T - j) phi_i . phi_j`` (module docstring of
:mod:`.hybrid` for the definition). Both sums come from one launch each:

* **window part** — the flash kernel (``kernels/flash``) on the raw ``q`` against the extended
  raw keys and values under ``Band(W - 1, 0)`` (bottom-right aligned: query ``i`` at key position
  ``i + L``), with the key padding as its ``valid_keys``: ``o_w`` and ``lse`` (natural log);
* **linear part** — the chunked linear kernel (:mod:`.op`), causal, ``normalize=False``, on the
  same queries against the extended keys **shifted W tokens later**: at index ``t`` it reads key
  ``L + t - W``, so its causal sum over ``t' <= t`` is exactly the keys ``<= T - W``. Its values
  are ``[v, 1]`` times the key's validity (and ``gamma^W``, the weight the shift leaves out), so
  the last output column is the linear denominator, a shifted-in slot before the sequence (value
  row 0) adds nothing whatever its feature map gives a zero key, and the initial state enters as
  ``[s0, z0]`` with the kernel's own ``gamma^(i + 1)``.

The two are merged per row as the torch path does, under ``m = max(lse, log den_lin)`` (detached:
the ratio does not depend on it), so no term overflows::

    o = (o_w e^(lse - m) + num_lin e^(-m)) / (e^(lse - m) + (den_lin + eps) e^(-m))

and a row that sees nothing gets ``o = 0``. Gradients flow through both kernels' backward
passes (the flash backward takes the LSE's gradient) and the merge's few elementwise ops.

Cost against the torch path: two launches and ``O(B H N D)`` of elementwise work; the values gain
one column (``Dv + 1``, one more value block of the linear kernel when ``Dv`` is a multiple of its
block), and the shift copies k and v once.

Packed sequences (``call.segments``, no state): the flash kernel's varlen path for the window,
and the linear kernel's for the rest, each sequence's keys shifted within it (a gather whose
slots before the sequence's start carry value row 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

from ..flash.backends import run_attention
from ..flash.call import AttentionCall
from ..flash.spec import Band
from .feature_maps import FEATURE_MAPS
from .op import linear_attention_triton

__all__ = ["hybrid_attention_triton"]

_TINY = 1e-30  # log() floor of an empty linear denominator (as the torch path)


def _shift(x: torch.Tensor, by: int) -> torch.Tensor:
    """``[B, H, E, D]`` -> ``[B, H, E + by, D]``: row ``t`` holds row ``t - by`` of ``x`` (zeros
    for ``t < by``); the caller keeps the first N rows."""
    return nnf.pad(x, (0, 0, by, 0))


def _merge(o_w, lse, lin, eps: float) -> torch.Tensor:
    """The two parts under one normaliser, in fp32 (the torch path's stabiliser): ``o_w
    [B, Hq, N, Dv]`` and ``lse [B, Hq, N]`` of the window, ``lin [B, Hq, N, Dv + 1]`` the linear
    numerator and (last column) denominator."""
    num_l = lin[..., :-1].float()
    den_l = lin[..., -1].float() + eps
    with torch.no_grad():
        m = torch.maximum(lse, torch.log(den_l.clamp(min=_TINY)))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a = torch.exp(lse - m)  # lse = -inf (no window key): 0
    b = torch.exp(-m)
    den = a + den_l * b
    den = torch.where(den == 0, torch.ones_like(den), den)  # a row that sees nothing: o = 0
    return (o_w.float() * a[..., None] + num_l * b[..., None]) / den[..., None]


def _packed(call) -> torch.Tensor:
    """``o [1, Hq, N, Dv]`` of a packed hybrid call (``call.segments``: host ``(start, end)``
    pairs along N; no state, no key padding)."""
    W, q, k, v = call.window, call.q, call.k, call.v
    bounds = [0] + [b for _, b in call.segments]
    cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    longest = max((b - a for a, b in call.segments), default=0)
    wcall = AttentionCall(
        q=call.q_raw, k=call.k_raw, v=v, pattern=f"the hybrid's window (W={W})",
        spec=Band(W - 1, 0), scale=call.softmax_scale, valid_keys=None, cu_seqlens_q=cu,
        cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, return_lse=True,
    )
    o_w, lse = run_attention(wcall, "triton")
    # token t of a sequence starting at a reads token t - W when t - W >= a, else value row 0
    N = q.shape[2]
    lengths = torch.tensor([b - a for a, b in call.segments], device=q.device)
    starts = torch.repeat_interleave(cu[:-1].long(), lengths, output_size=N)
    src = torch.arange(N, device=q.device) - W
    inside = src >= starts
    src = src.clamp(min=0)
    ind = inside[None, None, :, None].to(v.dtype)
    v_aug = torch.cat([v[:, :, src] * ind, ind.expand(*v.shape[:3], 1)], -1)
    if call.decay is not None:
        v_aug = v_aug * (call.decay.to(torch.float64) ** W).to(v.dtype)[None, :, None, None]
    lin, _, _ = linear_attention_triton(q, k[:, :, src], v_aug, None, None, call.feature, True,
                                        False, call.eps, call.scale, decay=call.decay,
                                        cu_seqlens=cu, max_seqlen=longest)
    return _merge(o_w, lse, lin, call.eps).to(v.dtype)


def hybrid_attention_triton(call):
    """Run a validated hybrid call (``call.window`` set) on Triton.

    Returns ``(o [B, Hq, N, Dv], s [B, Hkv, F, Dv], z [B, Hkv, F], k_win [B, Hkv, L', Dk],
    v_win [B, Hkv, L', Dv], valid_win [B, L'] or None)`` with ``L' = min(W - 1, L + N)``, the
    torch path's convention (:func:`.hybrid.hybrid_attention_torch`); packed calls
    ``(o, None, None)``.
    """
    if call.segments is not None:
        return _packed(call), None, None
    W, eps = call.window, call.eps
    q, k, v = call.q, call.k, call.v  # linear part: raw for fused maps, mapped for "identity"
    qr, kr = call.q_raw, call.k_raw  # window part: raw
    B, Hq, N, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    L = 0 if call.kw is None else call.kw.shape[2]
    # the extended sequence (E = L + N tokens): raw keys/values for the window, linear keys
    k_ext, v_ext, kl_ext = kr, v, k
    if L:
        k_ext = torch.cat([call.kw.to(kr.dtype), kr], 2)
        v_ext = torch.cat([call.vw.to(v.dtype), v], 2)
        kl_ext = torch.cat([(call.fkw if call.fkw is not None else call.kw).to(k.dtype), k], 2)
    valid = None
    if call.valid_keys is not None or call.window_valid is not None:
        def ones(n):
            return torch.ones(B, n, dtype=torch.bool, device=q.device)
        vw_ = ones(L) if call.window_valid is None else call.window_valid.to(q.device, torch.bool)
        vk = ones(N) if call.valid_keys is None else call.valid_keys.to(q.device, torch.bool)
        valid = torch.cat([vw_, vk], 1)  # [B, E]

    # window part: flash under Band(W - 1, 0) over the E keys (query i at position i + L)
    wcall = AttentionCall(
        q=qr, k=k_ext, v=v_ext, pattern=f"the hybrid's window (W={W})", spec=Band(W - 1, 0),
        scale=call.softmax_scale, valid_keys=valid, cu_seqlens_q=None, cu_seqlens_k=None,
        max_seqlen_q=None, max_seqlen_k=None, return_lse=True,
    )
    o_w, lse = run_attention(wcall, "triton")

    # linear part: values [v, 1] x validity (x gamma^W), keys and values shifted W tokens later
    gW = None if call.decay is None else call.decay.to(torch.float64) ** W  # [Hkv]
    ind = torch.ones_like(v_ext[..., :1]) if valid is None else valid[:, None, :, None].to(v.dtype).expand(
        B, Hkv, L + N, 1)
    v_aug = torch.cat([v_ext if valid is None else v_ext * ind, ind], -1)  # [B, Hkv, E, Dv + 1]
    v_lin = v_aug if gW is None else v_aug * gW.to(v.dtype)[None, :, None, None]
    by = W - L  # >= 1: index t reads extended token L + t - W
    k_sh = _shift(kl_ext, by)[:, :, :N]
    v_sh = _shift(v_lin, by)[:, :, :N]
    s0 = z0 = None
    if call.s0 is not None:
        s0 = torch.cat([call.s0.float(), call.z0.float()[..., None]], -1).contiguous()
        z0 = call.z0.float().contiguous()  # unused with normalize=False, passed for the schema
    lin, s_aug, _ = linear_attention_triton(q, k_sh, v_sh, s0, z0, call.feature, True, False,
                                            eps, call.scale, decay=call.decay)

    o = _merge(o_w, lse, lin, eps).to(v.dtype)

    # the state after the last token: the kernel's holds the extended keys <= E - 1 - W; key
    # E - W leaves the window too (weight gamma^(W - 1) at the last token)
    s, z = s_aug[..., :Dv], s_aug[..., Dv]
    e = L + N - W
    if e >= 0:
        fk_e = kl_ext[:, :, e].float()  # [B, Hkv, F]
        if call.feature != "identity":
            fk_e = FEATURE_MAPS[call.feature](fk_e)
        v_e = v_aug[:, :, e].float()  # [B, Hkv, Dv + 1], validity applied
        if call.decay is not None:
            v_e = v_e * (call.decay.to(torch.float64) ** (W - 1)).float()[None, :, None]
        s = s + fk_e[..., :, None] * v_e[..., None, :Dv]
        z = z + fk_e * v_e[..., Dv:]
    keep = min(W - 1, L + N)
    k_win, v_win = k_ext[:, :, L + N - keep:], v_ext[:, :, L + N - keep:]
    valid_win = None if valid is None else valid[:, L + N - keep:]
    return o, s, z, k_win, v_win, valid_win
