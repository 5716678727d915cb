"""The torch path of the sliding-window + linear hybrid (``linear_attention(..., window=W)``).

Query ``t`` sees keys ``(t - W, t]`` through softmax weights ``exp(c q_t . k_j)`` and the keys
``<= t - W`` through linear weights ``gamma^(t - j) phi(q_t) . phi(k_j)``, under one normaliser.
The keys are walked in query chunks of ``chunk`` tokens: a chunk's keys are the ``chunk + W - 1``
tokens of its windows (a ``[chunk, chunk + W - 1]`` score tile, where the window keys get the
softmax weight and the older ones the linear weight) plus a running linear state of every key
before them, so what autograd saves is linear in N.

Stability: ``exp(s)`` can overflow where ``phi . phi`` cannot. Each row is scaled by ``exp(-m)``
with ``m = max(max_window s, log(linear denominator))`` (detached: the ratio does not depend on
it), so every term is at most 1 and the largest is 1; the linear terms times ``exp(-m)`` may
underflow to 0, which is harmless (they are added). A row with no visible key (its own key
padded) gets ``o = 0``, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

from .torch_impl import DEFAULT_CHUNK, compute_dtype

__all__ = ["hybrid_attention_torch"]

_TINY = 1e-30  # log() floor for an empty linear denominator (m then follows the window scores)


def _pow(lg, x):
    """``gamma^x`` for ``log gamma [Hkv]`` and exponents ``x >= 0`` (any shape ``[...]``):
    ``[Hkv, ...]``; ``None`` (no decay) gives ``None``."""
    return None if lg is None else torch.exp(lg.reshape(-1, *([1] * x.dim())) * x)


def hybrid_attention_torch(q, k, v, fq, fk, window: int, softmax_scale: float, *, s0=None,
                           z0=None, kw=None, vw=None, fkw=None, valid_keys=None, window_valid=None,
                           eps: float = 1e-6, decay=None, chunk: int = DEFAULT_CHUNK,
                           out_dtype=None):
    """The hybrid on raw ``q``/``k`` (softmax part) and mapped ``fq``/``fk`` (linear part).

    Args:
        q: ``[B, Hq, N, Dk]``; k: ``[B, Hkv, N, Dk]``; v: ``[B, Hkv, N, Dv]``; ``Hq % Hkv == 0``.
        fq: ``[B, Hq, N, F]`` = ``phi(q * scale)``; fk: ``[B, Hkv, N, F]`` = ``phi(k)``.
        window: ``W >= 1``; softmax_scale: ``c`` in ``exp(c q . k)``.
        s0, z0: linear state ``[B, Hkv, F, Dv]``, ``[B, Hkv, F]`` of the keys that had left the
            window, decayed to the token before ``q``'s first (or None).
        kw, vw, fkw: the ``L <= W - 1`` keys/values (and mapped keys) before ``q``'s first token,
            ``[B, Hkv, L, Dk/Dv/F]`` (or None: ``L = 0``).
        valid_keys: ``[B, N]`` bool (True = attend) or None; window_valid: ``[B, L]`` or None.
        decay: ``[Hkv]`` gamma or None: the linear weight of key ``j`` for query ``t`` is
            ``gamma^(t - j)``; the softmax weights are not decayed.

    Returns:
        ``(o [B, Hq, N, Dv], s, z, k_win, v_win, valid_win)``: the linear state of the keys that
        have left the window after the last token (decayed to it), the last ``min(W - 1, L + N)``
        keys/values, and their validity ``[B, L']`` (None when no mask was given).
    """
    out_dtype = out_dtype or v.dtype
    cdt = compute_dtype(v.dtype)
    B, Hq, N, Dk = q.shape
    Hkv, Dv, F = k.shape[1], v.shape[-1], fk.shape[-1]
    G = Hq // Hkv
    L = 0 if kw is None else kw.shape[2]
    masked = valid_keys is not None or window_valid is not None
    K, V, FK = (t.to(cdt) for t in (k, v, fk))
    if L:
        K = torch.cat([kw.to(cdt), K], 2)
        V = torch.cat([vw.to(cdt), V], 2)
        FK = torch.cat([fkw.to(cdt), FK], 2)
    valid = None
    if masked:
        vk = torch.ones(B, N, dtype=torch.bool, device=q.device) if valid_keys is None else valid_keys
        vw_ = torch.ones(B, L, dtype=torch.bool, device=q.device) if window_valid is None else window_valid
        valid = torch.cat([vw_.to(q.device, torch.bool), vk.to(q.device, torch.bool)], 1)  # [B, L+N]
        FK = FK * valid[:, None, :, None].to(cdt)  # padded keys add nothing to the linear state
    Q = q.to(cdt).reshape(B, Hkv, G, N, Dk) * softmax_scale
    FQ = fq.to(cdt).reshape(B, Hkv, G, N, F)
    lg = None if decay is None else torch.log(decay.to(device=q.device, dtype=cdt))

    run_s = Q.new_zeros((B, Hkv, F, Dv))  # keys [0, front) of the ext sequence, decayed to front-1
    run_z = Q.new_zeros((B, Hkv, F))
    front = 0
    outs = []
    # Each chunk's keys are a tile of C + W - 1 tokens: taken from the sequence padded by W - 1 - L
    # on the left (and to whole chunks on the right) by unfold + unbind, not by slicing per chunk:
    # a slice's backward writes its gradient into a zero tensor of the whole input (O(N) per
    # chunk, O(N^2 / C) in all); unbind's stacks once.
    n_chunks = -(-N // chunk)
    size, pad_l = chunk + window - 1, window - 1 - L
    pad_r = n_chunks * chunk - N

    def tiles(x):  # [B, Hkv, L + N, D] -> n_chunks x [B, Hkv, 1, D, size] (keys last)
        x = nnf.pad(x, (0, 0, pad_l, pad_r))
        return [t[:, :, None] for t in x.unfold(2, size, chunk).unbind(2)]

    if n_chunks:
        ok = torch.ones(B, L + N, dtype=torch.bool, device=q.device) if valid is None else valid
        ok_tiles = nnf.pad(ok, (pad_l, pad_r)).unfold(1, size, chunk).unbind(1)  # pads: invalid
        k_tiles, v_tiles, fk_tiles = tiles(K), tiles(V), tiles(FK)
    pieces = zip(Q.split(chunk, -2), FQ.split(chunk, -2), strict=True)
    for i, (qc, fqc) in enumerate(pieces):
        c0 = i * chunk
        c1 = c0 + qc.shape[-2]
        a = L + c0 - window + 1  # the tile's first key (ext position; < 0: left padding)
        t = torch.arange(L + c0, L + c1, device=q.device, dtype=cdt)
        j = torch.arange(a, a + size, device=q.device, dtype=cdt)
        gap = t[:, None] - j[None, :]  # [C, size]
        win = (gap >= 0) & (gap < window) & ok_tiles[i][:, None, None, None, :]  # [B, 1, 1, C, size]
        lin = (gap >= window).to(cdt)
        klt, fklt = k_tiles[i], fk_tiles[i]  # [B, Hkv, 1, D, size]
        vl = v_tiles[i].transpose(-1, -2)  # [B, Hkv, 1, size, Dv]
        # linear part: old keys of the tile, the running state (gamma^(t - front + 1)) and s0
        wl = fqc @ fklt * lin
        if lg is not None:
            wl = wl * _pow(lg, gap.clamp(min=0))[None, :, None]
        fq_run, fq_0 = fqc, fqc
        if lg is not None:
            fq_run = fqc * _pow(lg, t - (front - 1))[None, :, None, :, None]
            fq_0 = fqc * _pow(lg, t - (L - 1))[None, :, None, :, None]
        lnum = wl @ vl + fq_run @ run_s[:, :, None]
        lden = wl.sum(-1) + (fq_run @ run_z[:, :, None, :, None]).squeeze(-1)
        if s0 is not None:
            lnum = lnum + fq_0 @ s0.to(cdt)[:, :, None]
            lden = lden + (fq_0 @ z0.to(cdt)[:, :, None, :, None]).squeeze(-1)
        # softmax part, scaled by exp(-m) together with the linear part
        sc = (qc @ klt).masked_fill(~win, float("-inf"))
        with torch.no_grad():
            m = torch.maximum(sc.amax(-1), torch.log(lden.clamp(min=_TINY)))
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(sc - m[..., None])
        scale_lin = torch.exp(-m)
        num = p @ vl + scale_lin[..., None] * lnum
        den = p.sum(-1) + scale_lin * (lden + eps)
        den = torch.where(den == 0, torch.ones_like(den), den)  # a row that sees nothing: o = 0
        outs.append(num / den[..., None])
        # advance the running state to the next chunk's first window key: keys [front, nxt),
        # tile positions [front - a, nxt - a)
        nxt = max(0, L + c1 - window + 1)
        if nxt > front:
            fk_in = fklt[:, :, 0, :, front - a:nxt - a].transpose(-1, -2)  # [B, Hkv, n, F]
            v_in = vl[:, :, 0, front - a:nxt - a]
            if lg is not None:
                ages = torch.arange(nxt - 1 - front, -1, -1, device=q.device, dtype=cdt)
                fk_in = fk_in * _pow(lg, ages)[None, :, :, None]
                g = _pow(lg, torch.tensor(float(nxt - front), device=q.device, dtype=cdt))
                run_s, run_z = run_s * g[None, :, None, None], run_z * g[None, :, None]
            run_s = run_s + fk_in.transpose(-1, -2) @ v_in
            run_z = run_z + fk_in.sum(-2)
            front = nxt
    o = torch.cat(outs, -2) if outs else Q.new_zeros((B, Hkv, G, N, Dv))
    o = o.reshape(B, Hq, N, Dv).to(out_dtype)
    # the keys [front, L + N) stay in the window (the walk left front at L + N - (W - 1))
    front_end = front
    s, z = run_s, run_z
    if lg is not None:
        g = _pow(lg, torch.tensor(float(L + N - front), device=q.device, dtype=cdt))
        s, z = s * g[None, :, None, None], z * g[None, :, None]
    if s0 is not None:
        g0 = 1.0 if lg is None else _pow(lg, torch.tensor(float(N), device=q.device, dtype=cdt))
        g0s = g0 if lg is None else g0[None, :, None, None]
        g0z = g0 if lg is None else g0[None, :, None]
        s, z = s + s0.to(cdt) * g0s, z + z0.to(cdt) * g0z
    kwin, vwin = K[:, :, front_end:], V[:, :, front_end:]
    vwin_valid = None if valid is None else valid[:, front_end:]
    return o, s, z, kwin.to(k.dtype), vwin.to(v.dtype), vwin_valid
