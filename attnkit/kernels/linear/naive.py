"""The float64 oracle of linear attention: the quadratic form, with an explicit ``N x N`` matrix.

Tests compare every backend against :func:`linear_attention_naive` in float64, and against the
same computation in the inputs' own dtype to set the error budget (flash-attention's rule,
``tests/harness.py``). It shares nothing with the backends but the definition: no chunks, no
running state, K/V expanded over GQA groups, masks applied to the score matrix.
"""

from __future__ import annotations

import torch

__all__ = ["linear_attention_naive", "hybrid_attention_naive"]


def linear_attention_naive(q, k, v, phi, *, causal=True, normalize=True, eps=1e-6, scale=1.0,
                           state=None, valid_keys=None, decay=None, dtype=torch.float64):
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

    ``decay`` (``[Hkv]`` or None; causal only): the state decays by ``gamma_h`` per token,
    ``S_i = gamma S_{i-1} + phi(k_i) v_i^T``, i.e. ``A_ij`` is weighted by ``gamma^(t_i - j)``
    (``t_i`` the token of query ``i``) and the initial state by ``gamma^(t_i + 1)``; padded keys
    add nothing but still count as tokens.
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
    # token of each query and the decay weights: gamma^(t_i - j) on A, gamma^(t_i + 1) on S0,
    # gamma^(Nk - 1 - j) on key j in the final state and gamma^Nk on S0 there
    t_q = torch.arange(nq, device=q.device, dtype=dtype) + (nk - nq)
    t_k = torch.arange(nk, device=q.device, dtype=dtype)
    if decay is not None:
        if not causal:
            raise ValueError("the oracle defines decay for causal attention only")
        g = decay.to(device=q.device, dtype=dtype)  # [Hkv]
        lg = torch.log(g)[:, None, None]
        gap = (t_q[:, None] - t_k[None, :]).clamp(min=0)  # masked entries: any finite value
        a = a * torch.exp(lg * gap).repeat_interleave(group, 0)[None]  # [1, Hq, Nq, Nk]
        w_state_q = torch.exp(lg[..., 0] * (t_q + 1)).repeat_interleave(group, 0)  # [Hq, Nq]
        w_key = torch.exp(lg[..., 0] * (nk - 1 - t_k))  # [Hkv, Nk]
        w_state = torch.exp(lg[:, 0, 0] * nk)  # [Hkv]
        fk_kept = fk_kept * w_key[None, :, :, None]
    num, den = a @ v.repeat_interleave(group, 1), a.sum(-1)
    s, z = fk_kept.transpose(-1, -2) @ v, fk_kept.sum(-2)
    if state is not None:
        s0, z0 = (t.to(dtype) for t in state)
        fq0 = fq if decay is None else fq * w_state_q[None, :, :, None]
        num = num + fq0 @ s0.repeat_interleave(group, 1)
        den = den + (fq0 * z0.repeat_interleave(group, 1)[:, :, None, :]).sum(-1)
        if decay is not None:
            s0, z0 = s0 * w_state[None, :, None, None], z0 * w_state[None, :, None]
        s, z = s + s0, z + z0
    o = num / (den[..., None] + eps) if normalize else num
    return o, s, z


def hybrid_attention_naive(q, k, v, phi, window, *, eps=1e-6, scale=1.0, softmax_scale=None,
                           state=None, valid_keys=None, decay=None, dtype=torch.float64):
    """The oracle of the sliding-window + linear hybrid, the literal formula (no max shift: in
    float64 it holds for scores below ~700).

    Query ``i`` (token ``t_i = L + i`` after the ``L`` window keys of ``state``) sees key ``j``
    of the concatenated keys ``[state window, k]`` through::

        w_ij = exp(softmax_scale * q_i . k_j)                     t_i - window < j <= t_i
        w_ij = gamma^(t_i - j) phi(q_i * scale) . phi(k_j)        j <= t_i - window
        o_i  = (sum_j w_ij v_j + gamma^(i+1) phi(q_i) S0) / (sum_j w_ij + gamma^(i+1) phi(q_i) . z0 + eps)

    ``state``: ``(s0 [B, Hkv, F, Dv], z0 [B, Hkv, F], kw [B, Hkv, L, Dk], vw [B, Hkv, L, Dv])`` or
    None; ``valid_keys [B, N]`` (True = attend) drops padded keys from both parts. Returns
    ``(o [B, Hq, N, Dv], s, z, k_win, v_win)``: the state after the last token, whose ``(s, z)``
    holds the keys that have left the window, decayed to the last token (``gamma^(T-1-j)``), and
    ``k_win``/``v_win`` the last ``min(window - 1, L + N)`` keys/values.
    """
    q, k, v = (t.to(dtype) for t in (q, k, v))
    B, Hq, N, Dk = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    sm = Dk ** -0.5 if softmax_scale is None else softmax_scale
    if state is not None:
        s0, z0, kw, vw = (t.to(dtype) for t in state)
        k, v = torch.cat([kw, k], 2), torch.cat([vw, v], 2)
    L = k.shape[2] - N
    keep = torch.ones(B, L + N, dtype=torch.bool, device=q.device)
    if valid_keys is not None:
        keep[:, L:] = valid_keys.to(q.device)
    t_q = torch.arange(N, device=q.device, dtype=dtype) + L
    t_k = torch.arange(L + N, device=q.device, dtype=dtype)
    gap = t_q[:, None] - t_k[None, :]  # [N, L + N]
    in_win = (gap >= 0) & (gap < window)
    in_lin = gap >= window
    fq, fk = phi(q * scale), phi(k)
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = keep[:, None, None, :]
    w_win = torch.exp(sm * q @ kr.transpose(-1, -2)) * (in_win & mask)
    w_lin = fq @ fk.repeat_interleave(group, 1).transpose(-1, -2) * (in_lin & mask)
    w_s0 = torch.ones(Hq, N, dtype=dtype, device=q.device)
    key_w = torch.ones(Hkv, L + N, dtype=dtype, device=q.device)
    s0_w = torch.ones(Hkv, dtype=dtype, device=q.device)
    if decay is not None:
        lg = torch.log(decay.to(device=q.device, dtype=dtype))
        w_lin = w_lin * torch.exp(lg[:, None, None] * gap.clamp(min=0)).repeat_interleave(group, 0)
        w_s0 = torch.exp(lg[:, None] * (t_q - L + 1)).repeat_interleave(group, 0)
        key_w = torch.exp(lg[:, None] * (L + N - 1 - t_k))
        s0_w = torch.exp(lg * N)
    w = w_win + w_lin
    num, den = w @ vr, w.sum(-1)
    out_from = max(0, L + N - (window - 1))  # keys before this have left the window at the end
    fk_out = fk * (keep[:, None, :, None] & (t_k < out_from)[None, None, :, None]) * key_w[None, :, :, None]
    s, z = fk_out.transpose(-1, -2) @ v, fk_out.sum(-2)
    if state is not None:
        fq0 = fq * w_s0[None, :, :, None]
        num = num + fq0 @ s0.repeat_interleave(group, 1)
        den = den + (fq0 * z0.repeat_interleave(group, 1)[:, :, None, :]).sum(-1)
        s, z = s + s0 * s0_w[None, :, None, None], z + z0 * s0_w[None, :, None]
    den = den + eps
    o = num / torch.where(den == 0, torch.ones_like(den), den)[..., None]
    return o, s, z, k[:, :, out_from:], v[:, :, out_from:]
