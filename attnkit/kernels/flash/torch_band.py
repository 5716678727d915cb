"""The torch backend: memory-efficient attention in plain PyTorch (the CPU path).

It computes exactly what the Triton flash kernel computes, chunk by chunk:

* forward: queries are processed ``chunk`` rows at a time; each chunk is scored only against the
  keys its pattern touches (:meth:`Pattern.key_range`), softmaxed in fp32 (fp64 for fp64 inputs),
  and only ``O`` and the log-sum-exp are kept;
* backward: a hand-written flash-style backward recomputes each chunk's probabilities from the
  saved LSE, so autograd never stores a score matrix.

Cost: time ``O(pairs * D)`` where ``pairs`` is the number of visited (query, key) pairs; extra
memory ``O(B * Hq * chunk * band)`` for one chunk's scores (``band`` = keys one chunk touches:
``Nk`` for dense/causal, ``chunk + window`` for a sliding window) plus ``O``, LSE and, in backward,
fp32 accumulators for dK/dV. Never ``N x N`` unless the pattern itself is dense and the chunk
budget allows a whole row block.
"""

from __future__ import annotations

import math
import os

import torch

from .spec import Band

__all__ = ["attention_torch", "default_chunk_size"]

#: Elements of one chunk's score matrix (fp32): 2^25 = 128 MiB. Measured on a 2-core CPU, chunks
#: of 128..512 rows run within 5% of each other, so the budget only bounds memory.
_SCORE_BUDGET = 1 << 25


def default_chunk_size(batch_heads: int, band: int) -> int:
    """Query rows per chunk so that one chunk's scores stay within the memory budget."""
    env = os.environ.get("ATTNKIT_TORCH_CHUNK")
    if env:
        return max(1, int(env))
    rows = _SCORE_BUDGET // max(1, batch_heads * max(band, 1))
    return int(min(512, max(16, 2 ** int(math.log2(max(rows, 1))))))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _band_mask(pattern: Band, c0: int, c1: int, lo: int, hi: int, nq: int, nk: int, device):
    """Bool ``[c1 - c0, hi - lo]``: which keys of ``[lo, hi)`` each query of ``[c0, c1)`` sees,
    or ``None`` when the whole rectangle is visible."""
    shift = nk - nq
    full_left = pattern.left is None or lo >= (c1 - 1) + shift - pattern.left
    full_right = pattern.right is None or hi - 1 <= c0 + shift + pattern.right
    if full_left and full_right:
        return None
    return pattern.block(c0, c1, lo, hi, nq, nk, device)


def _segments(n_q: int, n_k: int, cu_q: torch.Tensor | None, cu_k: torch.Tensor | None):
    """``(q_start, q_end, k_start, k_end)`` of each independent sequence along the N axis."""
    if cu_q is None:
        return [(0, n_q, 0, n_k)]
    bq, bk = cu_q.tolist(), cu_k.tolist()
    return [(bq[s], bq[s + 1], bk[s], bk[s + 1]) for s in range(len(bq) - 1)]


def _chunks(pattern: Band, nq: int, nk: int, bh: int):
    """Yield ``(c0, c1, lo, hi)`` query chunks with the key range each touches."""
    band = nk
    if pattern.left is not None and pattern.right is not None:
        band = min(nk, pattern.left + pattern.right + 1)
    chunk = default_chunk_size(bh, band)
    for c0 in range(0, nq, chunk):
        c1 = min(c0 + chunk, nq)
        lo, hi = pattern.key_range(c0, c1, nq, nk)
        yield c0, c1, lo, hi


def _scores(qc, kc, scale, pattern, c0, c1, lo, hi, nq, nk, kpm):
    """Masked scores ``[B, Hkv, G, c, L]`` of one chunk (``-inf`` where not visible)."""
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    band = _band_mask(pattern, c0, c1, lo, hi, nq, nk, s.device)
    if band is not None:
        s = s.masked_fill(~band, float("-inf"))
    if kpm is not None:
        s = s.masked_fill(~kpm[:, lo:hi][:, None, None, None, :], float("-inf"))
    return s


def _grouped(x: torch.Tensor, hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, Hq, n, D]`` -> ``[B, Hkv, G, n, D]`` in the compute dtype (GQA without expanding K/V)."""
    b, hq, n, d = x.shape
    return x.to(dtype).reshape(b, hkv, hq // hkv, n, d)


class _TorchAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, kpm, cu_q, cu_k):
        B, Hq, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        cdt = _compute_dtype(q.dtype)
        o = torch.zeros_like(q)
        # Kept in the compute dtype for the backward (fp64 inputs get fp64 probabilities there);
        # the returned LSE is float32 as on every backend.
        lse = torch.full((B, Hq, Nq), float("-inf"), dtype=cdt, device=q.device)
        for qs, qe, ks, ke in _segments(Nq, Nk, cu_q, cu_k):
            nq, nk = qe - qs, ke - ks
            seg_kpm = None if kpm is None else kpm[:, ks:ke]
            for c0, c1, lo, hi in _chunks(pattern, nq, nk, B * Hq):
                if hi <= lo:
                    continue  # no visible key: O stays 0, LSE stays -inf
                qc = _grouped(q[:, :, qs + c0 : qs + c1], Hkv, cdt)
                kc = k[:, :, ks + lo : ks + hi].to(cdt)[:, :, None]
                vc = v[:, :, ks + lo : ks + hi].to(cdt)[:, :, None]
                s = _scores(qc, kc, scale, pattern, c0, c1, lo, hi, nq, nk, seg_kpm)
                m = s.amax(-1, keepdim=True)
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked rows
                p = torch.exp(s - m)
                denom = p.sum(-1, keepdim=True)
                out = torch.matmul(p, vc) / torch.where(denom > 0, denom, torch.ones_like(denom))
                c_lse = torch.where(denom > 0, m + torch.log(denom), torch.full_like(m, -math.inf))
                o[:, :, qs + c0 : qs + c1] = out.reshape(B, Hq, c1 - c0, D).to(q.dtype)
                lse[:, :, qs + c0 : qs + c1] = c_lse.reshape(B, Hq, c1 - c0)
        ctx.save_for_backward(q, k, v, o, lse, kpm, cu_q, cu_k)
        ctx.pattern, ctx.scale = pattern, scale
        return o, lse.float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, o, lse, kpm, cu_q, cu_k = ctx.saved_tensors
        pattern, scale = ctx.pattern, ctx.scale
        B, Hq, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        cdt = _compute_dtype(q.dtype)
        if do is None:
            do = torch.zeros_like(o)
        # delta_i = sum_d dO * O; a gradient on LSE enters as dS += P * dLSE, i.e. delta -= dLSE.
        delta = (do.to(cdt) * o.to(cdt)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(cdt)
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
        dv = torch.zeros(v.shape, dtype=cdt, device=v.device)
        for qs, qe, ks, ke in _segments(Nq, Nk, cu_q, cu_k):
            nq, nk = qe - qs, ke - ks
            seg_kpm = None if kpm is None else kpm[:, ks:ke]
            for c0, c1, lo, hi in _chunks(pattern, nq, nk, B * Hq):
                if hi <= lo:
                    continue
                rows = slice(qs + c0, qs + c1)
                keys = slice(ks + lo, ks + hi)
                qc = _grouped(q[:, :, rows], Hkv, cdt)
                doc = _grouped(do[:, :, rows], Hkv, cdt)
                kc = k[:, :, keys].to(cdt)[:, :, None]
                vc = v[:, :, keys].to(cdt)[:, :, None]
                lse_c = lse[:, :, rows].to(cdt).reshape(B, Hkv, -1, c1 - c0, 1)
                lse_c = torch.where(torch.isfinite(lse_c), lse_c, torch.full_like(lse_c, math.inf))
                delta_c = delta[:, :, rows].reshape(B, Hkv, -1, c1 - c0, 1)
                s = _scores(qc, kc, scale, pattern, c0, c1, lo, hi, nq, nk, seg_kpm)
                p = torch.exp(s - lse_c)  # [B, Hkv, G, c, L]
                dp = torch.matmul(doc, vc.transpose(-1, -2))
                ds = p * (dp - delta_c)
                dv[:, :, keys] += torch.matmul(p.transpose(-1, -2), doc).sum(2)
                dk[:, :, keys] += torch.matmul(ds.transpose(-1, -2), qc).sum(2) * scale
                dq[:, :, rows] = (torch.matmul(ds, kc) * scale).reshape(B, Hq, c1 - c0, D).to(q.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Band,
    scale: float,
    valid_keys: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked attention in PyTorch. Returns ``(o [B, Hq, Nq, D], lse [B, Hq, Nq] fp32)``.

    ``q [B, Hq, Nq, D]``, ``k``/``v [B, Hkv, Nk, D]`` (any strides), ``valid_keys [B, Nk]``
    bool (True = attend), ``cu_seqlens_* [S + 1]`` int32 for packed sequences (``B == 1``).
    Rows that see no key give ``o = 0`` and ``lse = -inf``. Differentiable in ``q``, ``k``, ``v``
    (and through ``lse``); the backward recomputes probabilities chunk by chunk.
    """
    return _TorchAttention.apply(q, k, v, pattern, scale, valid_keys, cu_seqlens_q, cu_seqlens_k)
