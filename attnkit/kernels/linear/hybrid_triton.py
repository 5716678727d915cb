"""The Triton path of the sliding-window + linear hybrid (``linear_attention(..., window=W)``),
composed from two kernels attnkit already has, with no kernel of its own.

Query ``i`` sits at token ``T = L + i`` of the extended sequence ``[window state (L tokens), the
call's N tokens]``; it attends the keys ``(T - W, T]`` with softmax weights and the keys
``<= T - W`` with linear weights ``gamma^(T - j) phi_i . phi_j`` (module docstring of
:mod:`.hybrid` for the definition). Both sums come from one launch each:

* **window part** — the flash kernel (``kernels/flash``) on the raw ``q`` against the extended
  raw keys and values under ``Band(W - 1, 0)`` (bottom-right aligned: query ``i`` at key position
  ``i + L``), with the key padding as its ``valid_keys``: ``o_w`` and ``lse`` (natural log);
* **linear part** — the chunked linear kernel (:mod:`.op`), causal and normalised, on the same
  queries' features against the extended keys' features **shifted W tokens later**: at index
  ``t`` it reads token ``L + t - W``, so its causal sum over ``t' <= t`` is exactly the keys
  ``<= T - W``. It returns its output ``o_l = num / (den + eps)`` and, differentiably, ``den``
  (``return_den``: the kernel's backward adds the denominator's own gradient to the one it
  already forms), so ``num = o_l (den + eps)`` with the values' own head dim: no extra column.
  The features are mapped here, outside the kernel, so that a shifted-in slot before the
  sequence and a padded key can be zero (a fused map would give ``phi(0) = 1``) and carry the
  ``gamma^W`` the shift leaves out; ``(s0, z0)`` enter as the kernel's initial state with its
  own ``gamma^(i + 1)``.

The two are merged per row as the torch path does, under ``m = max(lse, log den_lin)`` (detached:
the ratio does not depend on it), so no term overflows::

    o = (o_w e^(lse - m) + num_lin e^(-m)) / (e^(lse - m) + (den_lin + eps) e^(-m))

and a row that sees nothing gets ``o = 0``. Gradients flow through both kernels' backward
passes (the flash backward takes the LSE's gradient) and the merge's few elementwise ops.

Cost against a fused hybrid kernel (predicted, no GPU measurement yet): two launches instead of
one, the feature maps and the shift as ``O(B H N F)`` elementwise passes, and the merge's
``O(B H N Dv)``; the window part is what ``SlidingWindow(W - 1)`` costs alone, the linear part what
a pure linear call costs.

Packed sequences (``call.segments``, no state): the flash kernel's varlen path for the window,
and the linear kernel's for the rest, each sequence's keys shifted within it (a gather whose
slots before the sequence's start are zero features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

from ..flash.backends import run_attention
from ..flash.call import AttentionCall
from ..flash.spec import Band
from .feature_maps import FEATURE_MAPS
from .op import linear_attention_triton
from .torch_impl import compute_dtype

__all__ = ["hybrid_attention_triton"]

_TINY = 1e-30  # log() floor of an empty linear denominator (as the torch path)


def _features(call, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``phi(x * scale)`` in fp32 (built-in maps, as the kernels compute them), or ``x`` when
    the call's features are already mapped (``"identity"``: a callable map ran outside)."""
    x = x.to(compute_dtype(x.dtype))
    if call.feature == "identity":
        return x * scale if scale != 1.0 else x
    return FEATURE_MAPS[call.feature](x * scale if scale != 1.0 else x)


def _window(call, q, k, v, valid, cu=None, longest=None):
    """``(o_w, lse)`` of the window part: flash under ``Band(W - 1, 0)``."""
    wcall = AttentionCall(
        q=q, k=k, v=v, pattern=f"the hybrid's window (W={call.window})",
        spec=Band(call.window - 1, 0), scale=call.softmax_scale, valid_keys=valid,
        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
        return_lse=True,
    )
    return run_attention(wcall, "triton")


def _linear(call, fq, fk_sh, v_sh, s0=None, z0=None, cu=None, longest=None):
    """``(num [B, Hq, N, Dv] fp32, den + eps [B, Hq, N], s, z)`` of the linear part: the
    normalised kernel on mapped features (``identity``), its output times its denominator."""
    eps = call.eps
    eps_k = eps if eps > 0 else _TINY  # an empty row is 0 / eps_k = 0, never 0 / 0
    dt = call.q.dtype
    o_l, den, s, z = linear_attention_triton(
        fq.to(dt), fk_sh.to(dt), v_sh, s0, z0, "identity", True, True, eps_k, 1.0,
        decay=call.decay, cu_seqlens=cu, max_seqlen=longest, return_den=True)
    num = o_l.float() * (den + eps_k)[..., None]
    return num, den + eps, s, z


def _merge(o_w, lse, num_l, den_l) -> torch.Tensor:
    """The two parts under one normaliser, in fp32 (the torch path's stabiliser): ``o_w
    [B, Hq, N, Dv]`` and ``lse [B, Hq, N]`` of the window; ``num_l``, ``den_l`` (``eps``
    included) of the linear part."""
    with torch.no_grad():
        m = torch.maximum(lse, torch.log(den_l.clamp(min=_TINY)))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a = torch.exp(lse - m)  # lse = -inf (no window key): 0
    b = torch.exp(-m)
    den = a + den_l * b
    den = torch.where(den == 0, torch.ones_like(den), den)  # a row that sees nothing: o = 0
    return (o_w.float() * a[..., None] + num_l * b[..., None]) / den[..., None]


def _gamma_w(call, power: int, like: torch.Tensor) -> torch.Tensor | float:
    """``gamma^power`` per key/value head, shaped to multiply ``[B, Hkv, N, F]`` (1.0: none)."""
    if call.decay is None:
        return 1.0
    return (call.decay.to(torch.float64) ** power).to(like.dtype)[None, :, None, None]


def _packed(call) -> torch.Tensor:
    """``o [1, Hq, N, Dv]`` of a packed hybrid call (``call.segments``: host ``(start, end)``
    pairs along N; no state, no key padding)."""
    W, q, k, v = call.window, call.q, call.k, call.v
    cu = torch.tensor([0] + [b for _, b in call.segments], dtype=torch.int32, device=q.device)
    longest = max((b - a for a, b in call.segments), default=0)
    o_w, lse = _window(call, call.q_raw, call.k_raw, v, None, cu, longest)
    # token t of a sequence starting at a reads token t - W when t - W >= a, else zero features
    N = q.shape[2]
    lengths = torch.tensor([b - a for a, b in call.segments], device=q.device)
    starts = torch.repeat_interleave(cu[:-1].long(), lengths, output_size=N)
    src = torch.arange(N, device=q.device) - W
    inside = (src >= starts)[None, None, :, None]
    src = src.clamp(min=0)
    fk = _features(call, k)
    fk_sh = torch.where(inside, fk[:, :, src], 0.0) * _gamma_w(call, W, fk)
    num, den, _, _ = _linear(call, _features(call, q, call.scale), fk_sh, v[:, :, src],
                             cu=cu, longest=longest)
    return _merge(o_w, lse, num, den).to(v.dtype)


def hybrid_attention_triton(call):
    """Run a validated hybrid call (``call.window`` set) on Triton.

    Returns ``(o [B, Hq, N, Dv], s [B, Hkv, F, Dv], z [B, Hkv, F], k_win [B, Hkv, L', Dk],
    v_win [B, Hkv, L', Dv], valid_win [B, L'] or None)`` with ``L' = min(W - 1, L + N)``, the
    torch path's convention (:func:`.hybrid.hybrid_attention_torch`); packed calls
    ``(o, None, None)``.
    """
    if call.segments is not None:
        return _packed(call), None, None
    W = call.window
    q, k, v = call.q, call.k, call.v  # linear part: raw for fused maps, mapped for "identity"
    B, N = q.shape[0], q.shape[2]
    L = 0 if call.kw is None else call.kw.shape[2]
    E = L + N  # the extended sequence: raw keys/values for the window, linear keys
    k_ext, v_ext, kl_ext = call.k_raw, v, k
    if L:
        k_ext = torch.cat([call.kw.to(k_ext.dtype), k_ext], 2)
        v_ext = torch.cat([call.vw.to(v.dtype), v], 2)
        kl_ext = torch.cat([(call.fkw if call.fkw is not None else call.kw).to(k.dtype), k], 2)
    valid = None
    if call.valid_keys is not None or call.window_valid is not None:
        def ones(n):
            return torch.ones(B, n, dtype=torch.bool, device=q.device)
        vw_ = ones(L) if call.window_valid is None else call.window_valid.to(q.device, torch.bool)
        vk = ones(N) if call.valid_keys is None else call.valid_keys.to(q.device, torch.bool)
        valid = torch.cat([vw_, vk], 1)  # [B, E]

    o_w, lse = _window(call, call.q_raw, k_ext, v_ext, valid)

    fk = _features(call, kl_ext)  # [B, Hkv, E, F] fp32
    if valid is not None:
        fk = fk * valid[:, None, :, None]  # padded keys take no part in the linear state
    by = W - L  # >= 1: index t reads extended token L + t - W (zero features before token 0)
    fk_sh = nnf.pad(fk * _gamma_w(call, W, fk), (0, 0, by, 0))[:, :, :N]
    v_sh = nnf.pad(v_ext, (0, 0, by, 0))[:, :, :N]
    num, den, s, z = _linear(call, _features(call, q, call.scale), fk_sh, v_sh, call.s0, call.z0)
    o = _merge(o_w, lse, num, den).to(v.dtype)

    # the state after the last token: the kernel's holds the extended keys <= E - 1 - W; key
    # E - W leaves the window too (weight gamma^(W - 1) at the last token)
    e = E - W
    if e >= 0:
        g = _gamma_w(call, W - 1, fk)
        fk_e = fk[:, :, e] * (g if isinstance(g, float) else g[..., 0])  # [B, Hkv, F]
        s = s + fk_e[..., :, None] * v_ext[:, :, e, None, :].float()
        z = z + fk_e
    keep = min(W - 1, E)
    valid_win = None if valid is None else valid[:, E - keep:]
    return o, s, z, k_ext[:, :, E - keep:], v_ext[:, :, E - keep:], valid_win
