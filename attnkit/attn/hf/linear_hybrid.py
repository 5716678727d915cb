"""The sliding-window + linear hybrid inside a Hugging Face model (``LinearAttention(window=W)``).

Every path runs :func:`attnkit.attn.linear.linear_attention`'s hybrid through the linear
dispatch (``"auto"``: Triton on CUDA, torch on the CPU), with the padding mask passed as key
validity: a padded key takes part in neither the softmax window nor the linear state.

* no cache / prefill: the parallel form over the new tokens;
* transformers' ``DynamicCache`` (``Nk > Nq``): the cached keys are run first to rebuild the
  state (``O(T)`` per step, a one-time warning points to :class:`LinearAttentionCache`);
* :class:`~attnkit.attn.hf.linear_cache.RecurrentStateLayer`: the new tokens run from the
  stored :class:`~attnkit.attn.linear.HybridAttentionState` (the linear state of the keys that
  left the window, and a ``W - 1``-slot window of the last keys/values with their validity):
  ``O(W + F * Dv)`` per head and step, a cache whose size does not depend on the tokens seen.
"""

from __future__ import annotations

import torch

from ...kernels.linear.backends import LinearAttentionCall, run_linear_attention
from ..linear import HybridAttentionState, _check_decay

__all__ = ["hybrid_attention", "pad_window"]


def _scale(spec) -> float:
    return 1.0 if spec.scale is None else float(spec.scale)


def hybrid_attention(q, k, v, kpm, spec, phi, scaling=None, state=None, window_valid=None,
                     segments=None):
    """``q [B, Hq, N, Dk]``, ``k``/``v [B, Hkv, N, D]`` (one N), ``kpm [B, N]`` (True = attend)
    or None; ``phi(spec, x)`` maps in fp32; ``scaling``: the softmax scale (``Dk ** -0.5`` when
    None); ``state`` a :class:`HybridAttentionState` with ``window_valid [B, L]`` or None;
    ``segments``: host ``(start, end)`` pairs of packed sequences (no state then).

    Returns ``(o [B, Hq, N, Dv], HybridAttentionState, valid [B, L'] or None)``."""
    fq, fk = phi(spec, q * _scale(spec)), phi(spec, k)
    sm = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    decay = spec.decay
    if isinstance(decay, tuple):
        decay = torch.tensor(decay, dtype=torch.float64)
    gamma = _check_decay(decay, q.shape[1], k.shape[1], q.device)
    s0 = z0 = kw = vw = fkw = None
    if state is not None:
        s0, z0, kw, vw = state
        fkw = phi(spec, kw).to(q.dtype)
    # features in q's dtype: the call holds one dtype (the torch path computes in fp32 anyway)
    call = LinearAttentionCall(
        fq.to(q.dtype), fk.to(q.dtype), v, s0, z0, "identity", True, True, spec.eps, 1.0, gamma,
        window=spec.window, softmax_scale=sm, q_raw=q, k_raw=k, kw=kw, vw=vw, fkw=fkw,
        valid_keys=kpm, window_valid=window_valid if state is not None else None,
        segments=segments)
    o, s, z, *win = run_linear_attention(call, "auto")
    if segments is not None:
        return o, None, None
    return o, HybridAttentionState(s, z, win[0], win[1]), win[2]


def pad_window(state: HybridAttentionState, valid, window: int):
    """The state with its window part laid out in exactly ``W - 1`` slots (fresh tensors: never a
    view of a longer prefill), the oldest padded on the left with invalid zeros; returns
    ``(state, valid [B, W - 1])``. A fixed layout keeps the cache's bytes the same at every
    step."""
    kw, vw = state.k, state.v
    B, H, L = kw.shape[:3]
    if valid is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=kw.device)
    slots = window - 1
    pad = slots - L
    if pad > 0:
        kw = torch.cat([kw.new_zeros(B, H, pad, kw.shape[-1]), kw], 2)
        vw = torch.cat([vw.new_zeros(B, H, pad, vw.shape[-1]), vw], 2)
        valid = torch.cat([valid.new_zeros(B, pad), valid], 1)
    return (HybridAttentionState(state.s, state.z, kw.clone(), vw.clone()), valid.clone())
