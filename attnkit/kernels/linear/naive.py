"""The float64 oracle of linear attention: the quadratic form, with an explicit ``N x N`` matrix.

Tests compare every backend against :func:`linear_attention_naive` in float64, and against the
same computation in the inputs' own dtype to set the error budget (flash-attention's rule,
``tests/harness.py``). It shares nothing with the backends but the definition: no chunks, no
running state, K/V expanded over GQA groups, masks applied to the score matrix.
"""

from __future__ import annotations

import torch

__all__ = ["linear_attention_naive"]


def linear_attention_naive(q, k, v, phi, *, causal=True, normalize=True, eps=1e-6, scale=1.0,
                           state=None, valid_keys=None, dtype=torch.float64):
    """``(o [B, Hq, Nq, Dv], s [B, Hkv, F, Dv], z [B, Hkv, F])`` in ``dtype``, differentiable,
    through the score matrix ``A_ij = phi(q_i * scale) . phi(k_j)`` ``[B, Hq, Nq, Nk]``::

        o_i = (sum_j A_ij v_j + phi(q_i) S0) / (sum_j A_ij + phi(q_i) . z0 + eps)

    over the keys ``j`` query ``i`` sees: all of them, or with ``causal`` those up to its own
    position, queries aligned to the end of the keys (query ``i`` is token ``Nk - Nq + i``, as
    in a decode step after a prefix); ``valid_keys [B, Nk]`` (True = attend) drops padded keys
    from the sums and from the returned state. ``normalize=False``: the numerator alone.

    ``q [B, Hq, Nq, Dk]``, ``k [B, Hkv, Nk, Dk]``, ``v [B, Hkv, Nk, Dv]``, ``Hq % Hkv == 0``;
    ``state`` ``(s0 [B, Hkv, F, Dv], z0 [B, Hkv, F])`` or None. ``phi`` is applied to ``dtype``
    tensors and must accept them (a module: pass a float64 copy). With a low-precision ``dtype``
    this is the naive computation whose error sets the tolerance.
    """
    q, k, v = (t.to(dtype) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    fq, fk = phi(q * scale), phi(k)
    nq, nk = q.shape[2], k.shape[2]
    visible = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.arange(nk, device=q.device)[None, :] <= (
            torch.arange(nq, device=q.device)[:, None] + (nk - nq))
    visible = visible[None, None]  # [1, 1, Nq, Nk]
    if valid_keys is not None:
        keep = valid_keys.to(q.device)
        visible = visible & keep[:, None, None, :]
        fk_kept = fk * keep[:, None, :, None].to(dtype)  # padded keys add nothing to the state
    else:
        fk_kept = fk
    a = fq @ fk.repeat_interleave(group, 1).transpose(-1, -2)  # [B, Hq, Nq, Nk]
    a = a * visible
    num, den = a @ v.repeat_interleave(group, 1), a.sum(-1)
    s, z = fk_kept.transpose(-1, -2) @ v, fk_kept.sum(-2)
    if state is not None:
        s0, z0 = (t.to(dtype) for t in state)
        num = num + fq @ s0.repeat_interleave(group, 1)
        den = den + (fq * z0.repeat_interleave(group, 1)[:, :, None, :]).sum(-1)
        s, z = s + s0, z + z0
    o = num / (den[..., None] + eps) if normalize else num
    return o, s, z
