"""The fused CPU path of the torch backend: bands run through PyTorch's CPU flash kernel.

``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout, is_causal, *,
attn_mask, scale) -> (o, lse)`` and its ``..._backward(do, q, k, v, o, lse, ...)`` are one
fused, tiled kernel each (no score matrix in memory, threads over batch x heads x query
blocks). What they take, checked on torch 2.13: fp32 / fp64 / bf16 / fp16 (LSE is fp32, fp64
for fp64), GQA natively (``Hq`` a multiple of ``Hkv``, K/V never expanded), any strides, an
additive mask in the query's dtype broadcast over ``[B, H, Nq, Nk]``. ``is_causal`` is
**top-left** aligned (query ``a`` sees keys ``0..a``); a fully masked row gives ``o = 0`` and
``lse = 0`` (not ``-inf``); zero query or key rows crash the process (SIGFPE), so no piece is
ever empty.

attnkit's band (``p - left <= j <= p + right`` with bottom-right ``p = i + Nk - Nq``) is cut into
*pieces*, each a (query rows, key range) rectangle the kernel runs in one of four modes:

* ``full`` - every row sees every key: no mask (the interior of a band, all of Dense);
* ``causal`` - the right edge: key offset ``o <= a``, the kernel's own top-left flag;
* ``flip`` - the left edge: ``o >= a``; rows and keys are reversed so it becomes top-left
  causal (a copy of ``c x D`` rows and keys, against ``c x c x D`` work saved);
* ``mask`` - anything else (sequence ends, narrow bands): a small additive mask built from the
  band's definition over that rectangle only.

Key padding is one more additive ``[B, 1, 1, L]`` mask on every piece; varlen runs each packed
sequence on its own. Pieces are merged by their LSE. The backward reruns the same plan and calls
the fused backward per piece with the *final* ``O`` and LSE (so each piece's probabilities and
``delta = rowsum(dO * O)`` are the global ones and the pieces' gradients simply add). A gradient
on the LSE (``dS += P * dLSE``) enters through one extra head-dim column: ``q, k`` padded with 0,
``v`` with 1, ``dO`` with ``dLSE`` and ``O`` with 0 add exactly ``dLSE`` to ``dP``.
Memory: ``O``, LSE, the fp32 gradient accumulators and one piece's mask - O(N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .spec import Band
from .torch_band import _segments

__all__ = ["FUSED_DTYPES", "fused_available", "attention_fused", "fused_tile"]

FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

#: Query rows per chunk of a bounded band. The CPU kernel picks 64-row query tiles from 192 rows
#: on (32 below): a chunk as wide as the band keeps the three edge pieces large.
_MAX_CHUNK, _MIN_BAND = 512, 32


def _ops():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_available(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the fused CPU kernel can serve this call (CPU tensor, a dtype it takes, GQA)."""
    return (q.device.type == "cpu" and q.dtype in FUSED_DTYPES and _ops() is not None
            and q.numel() > 0 and k.numel() > 0 and q.shape[1] % k.shape[1] == 0)


@dataclass
class _Piece:
    """Query rows ``[r0, r1)`` x keys ``[k0, k1)`` (absolute indices along N)."""

    r0: int
    r1: int
    k0: int
    k1: int
    mode: str  # "full" | "causal" | "flip" | "mask"
    band: torch.Tensor | None = None  # bool [c, L] for "mask"


def _rect(pattern: Band, qs: int, ks: int, c0: int, c1: int, lo: int, hi: int, nq: int, nk: int):
    """A ``mask``/``full`` piece for rows ``[c0, c1)`` x keys ``[lo, hi)`` of one sequence (keys
    clipped to it), or ``None`` when no pair of it is visible."""
    lo, hi = max(lo, 0), min(hi, nk)
    if hi <= lo or c1 <= c0:
        return None
    # the band's definition on this rectangle only (Band.visible would be N x N)
    pos = torch.arange(c0, c1)[:, None] + (nk - nq)
    j = torch.arange(lo, hi)[None, :]
    ok = torch.ones(c1 - c0, hi - lo, dtype=torch.bool)
    if pattern.left is not None:
        ok &= j >= pos - pattern.left
    if pattern.right is not None:
        ok &= j <= pos + pattern.right
    if not ok.any():
        return None
    if ok.all():
        return _Piece(qs + c0, qs + c1, ks + lo, ks + hi, "full")
    return _Piece(qs + c0, qs + c1, ks + lo, ks + hi, "mask", ok)


def _plan(pattern: Band, qs: int, nq: int, ks: int, nk: int):
    """Yield the pieces of one sequence (rows ``qs + [0, nq)``, keys ``ks + [0, nk)``)."""
    if nq == 0 or nk == 0:
        return
    shift, left, right = nk - nq, pattern.left, pattern.right
    if left is None:
        if right is None:
            yield _Piece(qs, qs + nq, ks, ks + nk, "full")
            return
        t = shift + right  # query i sees keys j <= i + t
        first = max(0, -t)  # rows before it see nothing
        if first >= nq:
            return
        if t > 0:
            yield _Piece(qs + first, qs + nq, ks, ks + min(t, nk), "full")
        if max(t, 0) < nk:
            yield _Piece(qs + first, qs + nq, ks + max(t, 0), ks + nk, "causal")
        return
    width = left + (right if right is not None else nk)
    if width < _MIN_BAND:  # narrow band: one masked rectangle per chunk
        c = 64
        for c0 in range(0, nq, c):
            c1 = min(c0 + c, nq)
            lo, hi = pattern.key_range(c0, c1, nq, nk)
            piece = _rect(pattern, qs, ks, c0, c1, lo, hi, nq, nk)
            if piece is not None:
                yield piece
        return
    c = min(_MAX_CHUNK, width)
    for c0 in range(0, nq, c):
        c1 = min(c0 + c, nq)
        n = c1 - c0
        a0 = c0 + shift - left  # row 0's first key; row a sees keys a0 + a ...
        # left edge [a0, a0 + n): visible iff offset >= row (n <= width keeps the right bound)
        if a0 >= 0 and a0 + n <= nk:
            yield _Piece(qs + c0, qs + c1, ks + a0, ks + a0 + n, "flip")
        else:
            piece = _rect(pattern, qs, ks, c0, c1, a0, a0 + n, nq, nk)
            if piece is not None:
                yield piece
        if right is None:
            piece = _rect(pattern, qs, ks, c0, c1, a0 + n, nk, nq, nk)
            if piece is not None:
                yield piece
            continue
        b0 = c0 + shift + right  # row 0's last key; row a sees keys ... b0 + a
        piece = _rect(pattern, qs, ks, c0, c1, a0 + n, b0, nq, nk)  # interior: full
        if piece is not None:
            yield piece
        if b0 >= 0 and b0 + n <= nk and b0 >= a0 + n:
            yield _Piece(qs + c0, qs + c1, ks + b0, ks + b0 + n, "causal")
        else:
            piece = _rect(pattern, qs, ks, c0, c1, max(b0, a0 + n), b0 + n, nq, nk)
            if piece is not None:
                yield piece


def _pieces(pattern, nq, nk, cu_q, cu_k):
    for qs, qe, ks, ke in _segments(nq, nk, cu_q, cu_k):
        yield from _plan(pattern, qs, qe - qs, ks, ke - ks)


def _inputs(p: _Piece, q, k, v, kpm):
    """``(q, k, v, is_causal, additive mask, row_ok [B or 1, c])`` of one piece, flipped for
    ``flip`` pieces. ``row_ok`` is ``None`` when every row sees a key."""
    qp, kp, vp = q[:, :, p.r0:p.r1], k[:, :, p.k0:p.k1], v[:, :, p.k0:p.k1]
    keys_ok = None if kpm is None else kpm[:, p.k0:p.k1]  # [B, L]
    band = p.band
    if p.mode == "flip":
        qp, kp, vp = qp.flip(2), kp.flip(2), vp.flip(2)
        keys_ok = None if keys_ok is None else keys_ok.flip(1)
    row_ok = None
    if band is not None:
        vis = band[None] if keys_ok is None else band[None] & keys_ok[:, None, :]
        row_ok = vis.any(-1)
    elif keys_ok is not None:
        if p.mode in ("causal", "flip"):  # row a sees keys 0..a (flip: after reversing)
            seen = keys_ok.cummax(1).values
            idx = torch.arange(p.r1 - p.r0).clamp(max=p.k1 - p.k0 - 1)
            row_ok = seen[:, idx]
        else:
            row_ok = keys_ok.any(1, keepdim=True).expand(-1, p.r1 - p.r0)
    mask = None
    if band is not None or keys_ok is not None:
        ok = band[None, None] if keys_ok is None else keys_ok[:, None, None, :]
        if band is not None and keys_ok is not None:
            ok = band[None, None] & ok
        mask = torch.zeros(ok.shape, dtype=q.dtype).masked_fill_(~ok, float("-inf"))
    return qp, kp, vp, p.mode in ("causal", "flip"), mask, row_ok


def _merge(acc_o, acc_lse, o, lse):
    """LSE-merge of a piece into the accumulators (all in the compute dtype), in place."""
    m = torch.maximum(acc_lse, lse)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(acc_lse - m_safe), torch.exp(lse - m_safe)
    tot = wa + wb
    acc_o.mul_((wa / torch.where(tot > 0, tot, 1))[..., None]).add_(
        o * (wb / torch.where(tot > 0, tot, 1))[..., None])
    acc_lse.copy_(torch.where(tot > 0, m_safe + torch.log(tot), m))


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, kpm, cu_q, cu_k):
        B, Hq, Nq, D = q.shape
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        fwd = _ops()
        pieces = list(_pieces(pattern, Nq, k.shape[2], cu_q, cu_k))
        single = len(pieces) == 1 and pieces[0].r1 - pieces[0].r0 == Nq
        acc_o = None if single else torch.zeros(B, Hq, Nq, D, dtype=cdt)
        acc_lse = torch.full((B, Hq, Nq), float("-inf"), dtype=cdt)
        out = None
        for p in pieces:
            qp, kp, vp, causal, mask, row_ok = _inputs(p, q, k, v, kpm)
            o, lse = fwd(qp, kp, vp, 0.0, causal, attn_mask=mask, scale=scale)
            if p.mode == "flip":
                o, lse = o.flip(2), lse.flip(2)
            if row_ok is not None:
                if p.mode == "flip":
                    row_ok = row_ok.flip(1)
                lse = lse.masked_fill(~row_ok[:, None, :], float("-inf"))
            if single:
                out = o if row_ok is None else o.masked_fill(~row_ok[:, None, :, None], 0)
                acc_lse.copy_(lse)
                continue
            _merge(acc_o[:, :, p.r0:p.r1], acc_lse[:, :, p.r0:p.r1], o.to(cdt), lse.to(cdt))
        o = (out if single else acc_o).to(q.dtype) if pieces else torch.zeros_like(q)
        ctx.save_for_backward(q, k, v, o, acc_lse, kpm, cu_q, cu_k)
        ctx.pattern, ctx.scale = pattern, scale
        ctx.set_materialize_grads(False)
        return o, acc_lse.float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, o, lse, kpm, cu_q, cu_k = ctx.saved_tensors
        D = q.shape[-1]
        q, k, v, o, do, lse_b = _backward_inputs(q, k, v, o, lse, do, dlse)
        bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        dq = torch.zeros(q.shape, dtype=lse.dtype)
        dk = torch.zeros(k.shape, dtype=lse.dtype)
        dv = torch.zeros(v.shape, dtype=lse.dtype)
        for p in _pieces(ctx.pattern, q.shape[2], k.shape[2], cu_q, cu_k):
            qp, kp, vp, causal, mask, _ = _inputs(p, q, k, v, kpm)
            rows = slice(p.r0, p.r1)
            dop, op, lp = do[:, :, rows], o[:, :, rows], lse_b[:, :, rows]
            if p.mode == "flip":
                dop, op, lp = dop.flip(2), op.flip(2), lp.flip(2)
            gq, gk, gv = bwd(dop, qp, kp, vp, op, lp, 0.0, causal, attn_mask=mask,
                             scale=ctx.scale)
            if p.mode == "flip":
                gq, gk, gv = gq.flip(2), gk.flip(2), gv.flip(2)
            dq[:, :, rows] += gq
            dk[:, :, p.k0:p.k1] += gk
            dv[:, :, p.k0:p.k1] += gv
        return (dq[..., :D].to(q.dtype), dk[..., :D].to(k.dtype), dv[..., :D].to(v.dtype),
                None, None, None, None, None)


def _backward_inputs(q, k, v, o, lse, do, dlse):
    """What the fused backward takes: ``(q, k, v, o, do, lse)``, with one extra head-dim column
    when an LSE gradient is present (module docstring) and LSE = +inf on rows that see no key
    (every probability ``exp(s - inf)`` is then 0: zero, finite gradients)."""
    if do is None:
        do = torch.zeros_like(o)
    do = do.to(q.dtype)
    if dlse is not None and bool((dlse != 0).any()):
        dl = torch.where(torch.isfinite(lse), dlse.to(lse.dtype), 0).to(q.dtype)
        q, k = F.pad(q, (0, 1)), F.pad(k, (0, 1))
        v = F.pad(v, (0, 1), value=1.0)
        do = torch.cat([do, dl[..., None]], -1)
        o = F.pad(o, (0, 1))
    lse_b = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
    return q, k, v, o, do, lse_b.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


class _Tile(torch.autograd.Function):
    """One fused call on gathered tiles (block-sparse rows); LSE differentiable too."""

    @staticmethod
    def forward(ctx, q, k, v, mask, row_ok, scale):
        o, lse = _ops()(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        lse = lse.masked_fill(~row_ok, float("-inf"))
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dlse):
        q0, k0, v0, o, lse, mask = ctx.saved_tensors
        D = q0.shape[-1]
        q, k, v, o, do, lse_b = _backward_inputs(q0, k0, v0, o, lse, do, dlse)
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse_b, 0.0, False, attn_mask=mask, scale=ctx.scale)
        return gq[..., :D], gk[..., :D], gv[..., :D], None, None, None


def fused_tile(q, k, v, ok: torch.Tensor, scale: float):
    """Attention of ``q [B, Hq, c, D]`` over gathered ``k``/``v [B, H', M, D]`` (``H'`` = Hq or
    Hkv) where bool ``ok`` (broadcast to ``[B, Hq, c, M]``) says which pairs are visible.
    Returns ``(o, lse [B, Hq, c])``; rows with no visible key give 0 and ``-inf``."""
    row_ok = ok.any(-1).expand(q.shape[0], q.shape[1], q.shape[2])
    mask = torch.zeros(ok.shape, dtype=q.dtype).masked_fill_(~ok, float("-inf"))
    return _Tile.apply(q, k, v, mask, row_ok, scale)


def attention_fused(q, k, v, pattern: Band, scale: float, key_padding_mask=None,
                    cu_seqlens_q=None, cu_seqlens_k=None):
    """Band attention on the fused CPU kernel: ``(o [B, Hq, Nq, D], lse [B, Hq, Nq] fp32)``.

    Same contract as :func:`attnkit.kernels.flash.torch_band.attention_torch` (``q [B, Hq, Nq,
    D]``, ``k``/``v [B, Hkv, Nk, D]``, ``key_padding_mask [B, Nk]`` True = attend,
    ``cu_seqlens_* [S + 1]`` with ``B == 1``); call only when :func:`fused_available`.
    """
    return _Fused.apply(q, k, v, pattern, scale, key_padding_mask, cu_seqlens_q, cu_seqlens_k)
