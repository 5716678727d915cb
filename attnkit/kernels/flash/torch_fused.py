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
* ``mask`` - anything else (sequence ends): a small additive mask built from the band's
  definition over that rectangle only;
* ``stack`` - a bounded band (SlidingWindow): whole chunks inside the sequence (32 rows for
  the matmul executor, 64 for the fused kernel, half as many for narrower bands:
  ``torch_plan``), stacked on the batch axis, keys as overlapping strided windows (views, no
  copy), one shared ``[n, n + width]`` band (:func:`_plan_stacked`); the rows whose window
  starts at key 0 run on the causal flag. ``torch_stack`` runs these pieces: batched matmuls
  and an in-place softmax for fp32/fp64, the fused kernel for half types; stack rows belong to
  no other piece, so their outputs are written, never merged, and the backward adds the window
  gradients with strided adds. ``causal`` + ``flip`` + ``full`` per chunk was the first plan
  for windows; it is still what a band unbounded on the right (``Band(left, None)``) gets.

Key padding is one more additive ``[B, 1, 1, L]`` mask on every piece; varlen runs each packed
sequence on its own. Pieces are merged by their LSE. The backward reruns the same plan and calls
the fused backward per piece with the *final* ``O`` and LSE (so each piece's probabilities and
``delta = rowsum(dO * O)`` are the global ones and the pieces' gradients simply add). A gradient
on the LSE (``dS += P * dLSE``) enters through one extra head-dim column: ``q, k`` padded with 0,
``v`` with 1, ``dO`` with ``dLSE`` and ``O`` with 0 add exactly ``dLSE`` to ``dP``.
Memory: ``O``, LSE, the fp32 gradient accumulators, one call's output or gradients and one
piece's mask - O(N); at N = 4096, window 255 the measured peaks are SDPA-flash's within the
measurement's spread (forward and forward+backward, benchmarks/NOTES.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import Band
from .torch_plan import _MAX_BATCH_ROWS, STACK_CHUNK_FUSED, STACK_CHUNK_MATMUL, _pieces
from .torch_stack import MATMUL_DTYPES, stack_backward, stack_forward

__all__ = ["FUSED_DTYPES", "fused_available", "attention_fused", "fused_tile"]

FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _ops():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_available(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the fused CPU kernel can serve this call (CPU tensor, a dtype it takes, GQA)."""
    return (q.device.type == "cpu" and q.dtype in FUSED_DTYPES and _ops() is not None
            and q.numel() > 0 and k.numel() > 0 and q.shape[1] % k.shape[1] == 0)


def _batches(pieces):
    """Pieces stacked into one kernel call each: same mode and shape, no element mask, disjoint
    rows (one chunk's pieces never share a call). A window's chunks become ~3 calls instead of
    ~3 per chunk: measured on 2 cores, 34 calls of 255 rows ran at a third of the pair rate of
    one large call."""
    open_: dict = {}
    for p in pieces:
        if p.band is not None:  # element-masked and stack pieces: one call each
            yield [p]
            continue
        key = (p.mode, p.r1 - p.r0, p.k1 - p.k0)
        batch = open_.get(key)
        if batch and (batch[-1].r1 > p.r0 or len(batch) * key[1] >= _MAX_BATCH_ROWS):
            yield batch
            batch = None
        if not batch:
            batch = open_[key] = []
        batch.append(p)
    yield from (b for b in open_.values() if b)


def _index(batch, rows: bool) -> torch.Tensor:
    """Row (or key) positions of a batch's pieces, concatenated; reversed within flip pieces."""
    parts = [torch.arange(p.r0, p.r1) if rows else torch.arange(p.k0, p.k1) for p in batch]
    if batch[0].mode == "flip":
        parts = [t.flip(0) for t in parts]
    return torch.cat(parts)


def _stack(x: torch.Tensor, idx: torch.Tensor, m: int) -> torch.Tensor:
    """``x [B, H, N, ...]`` at positions ``idx [m * n]`` -> ``[B * m, H, n, ...]``: a view when
    ``B == 1`` and ``idx`` is one ascending run (adjacent chunks), else one gathered copy."""
    a = int(idx[0])
    run = idx.numel() > 0 and int(idx[-1]) - a + 1 == idx.numel() and bool(
        (idx[1:] > idx[:-1]).all()) if idx.numel() > 1 else True
    g = x[:, :, a:a + idx.numel()] if run else x.index_select(2, idx)
    B, H, n = g.shape[0], g.shape[1], g.shape[2] // m
    g = g.unflatten(2, (m, n)).transpose(1, 2)
    return g.reshape(B * m, H, n, *g.shape[4:])


def _unstack(y: torch.Tensor, B: int) -> torch.Tensor:
    """``[B * m, H, n, ...]`` -> ``[B, H, m * n, ...]`` (the inverse of :func:`_stack`)."""
    m = y.shape[0] // B
    y = y.view(B, m, *y.shape[1:]).transpose(1, 2)
    return y.reshape(B, y.shape[1], m * y.shape[3], *y.shape[4:])


def _inputs(batch, q, k, v, kpm):
    """``(q, k, v, is_causal, additive mask, row_ok [B * m, n] or None, rows, keys)`` of one
    stacked call. ``row_ok`` is ``None`` when every row sees a key."""
    p, m = batch[0], len(batch)
    rows, keys = _index(batch, True), _index(batch, False)
    whole = m == 1 and p.mode != "flip"
    take = (lambda x, i, a, b: x[:, :, a:b]) if whole else (lambda x, i, a, b: _stack(x, i, m))
    qp, kp, vp = take(q, rows, p.r0, p.r1), take(k, keys, p.k0, p.k1), take(v, keys, p.k0, p.k1)
    n, L = p.r1 - p.r0, p.k1 - p.k0
    keys_ok = None if kpm is None else kpm[:, keys].reshape(-1, L)  # [B * m, L]
    band, row_ok = p.band, None
    if band is not None:
        vis = band[None] if keys_ok is None else band[None] & keys_ok[:, None, :]
        row_ok = vis.any(-1)
    elif keys_ok is not None:
        if p.mode in ("causal", "flip"):  # row a sees keys 0..a (flip: after reversing)
            row_ok = keys_ok.cummax(1).values[:, torch.arange(n).clamp(max=L - 1)]
        else:
            row_ok = keys_ok.any(1, keepdim=True).expand(-1, n)
    mask = None
    if band is not None or keys_ok is not None:
        ok = band[None, None] if keys_ok is None else keys_ok[:, None, None, :]
        if band is not None and keys_ok is not None:
            ok = band[None, None] & ok
        mask = torch.zeros(ok.shape, dtype=q.dtype).masked_fill_(~ok, float("-inf"))
    return qp, kp, vp, p.mode in ("causal", "flip"), mask, row_ok, rows, keys


def _alloc(B: int, H: int, N: int, D: int, dtype):
    """Uninitialised ``(o [B, H, N, D], lse [B, H, N])``: every row is written by a piece or, at
    the end, zeroed / set to ``-inf`` (a zero fill would be one more pass over ``O``)."""
    return torch.empty(B, H, N, D, dtype=dtype), torch.empty(B, H, N, dtype=dtype)


def _merge(acc, part):
    """LSE-merge of two ``(o, lse)`` over the same rows (rows neither sees stay 0 / -inf)."""
    (oa, la), (ob, lb) = acc, part
    lse = torch.logaddexp(la, lb)
    safe = lse.masked_fill(torch.isinf(lse), 0)
    o = oa * torch.exp(la - safe)[..., None]
    return o.addcmul_(ob, torch.exp(lb - safe)[..., None]), lse


def _merge_(acc, part):
    """:func:`_merge` into ``acc``'s tensors in place (two passes over ``o``)."""
    (oa, la), (ob, lb) = acc, part
    lse = torch.logaddexp(la, lb)
    safe = lse.masked_fill(torch.isinf(lse), 0)
    oa.mul_(torch.exp(la - safe)[..., None]).addcmul_(ob, torch.exp(lb - safe)[..., None])
    la.copy_(lse)


def _whole(pattern: Band, nq: int, nk: int, kpm, cu_q) -> bool:
    """Whether the band is one unmasked kernel call: Dense, or Causal with ``Nq == Nk`` (the
    kernel's causal flag is top-left, attnkit's bottom-right: the same only then)."""
    return (kpm is None and cu_q is None and pattern.left is None and nq > 0 and nk > 0
            and (pattern.right is None or (pattern.right == 0 and nq == nk)))


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, kpm, cu_q, cu_k, need_lse):
        B, Hq, Nq, D = q.shape
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        fwd = _ops()
        ctx.pattern, ctx.scale = pattern, scale
        ctx.set_materialize_grads(False)
        if _whole(pattern, Nq, k.shape[2], kpm, cu_q):
            # Dense, or Causal with Nq == Nk: one kernel call, no plan (the planner's glue cost
            # 0.17 ms a call, measured at N = 512: 8 % of the kernel's time there)
            o, lse = fwd(q, k, v, 0.0, pattern.right is not None, scale=scale)
            ctx.save_for_backward(q, k, v, o, lse, kpm, cu_q, cu_k)
            return o, lse.float()
        acc, covered, cache = None, torch.zeros(Nq, dtype=torch.bool), {}
        # o and LSE are per row, so the backward may chunk stack rows its own way
        chunk = STACK_CHUNK_MATMUL if q.dtype in MATMUL_DTYPES else STACK_CHUNK_FUSED
        for batch in _batches(_pieces(pattern, Nq, k.shape[2], cu_q, cu_k, chunk)):
            if acc is None and batch[0].mode == "stack":
                acc = _alloc(B, Hq, Nq, D, cdt)
            if batch[0].mode == "stack":
                p, o, lse, po, pl = batch[0], None, None, None, None  # free earlier pieces
                stack_forward(p, q, k, v, kpm, scale, acc[0], acc[1], need_lse, cache)
                covered[p.r0:p.r1] = True
                continue
            qp, kp, vp, causal, mask, row_ok, rows, _ = _inputs(batch, q, k, v, kpm)
            o, lse = fwd(qp, kp, vp, 0.0, causal, attn_mask=mask, scale=scale)
            if row_ok is not None:  # the kernel gives o = 0 but lse = 0 there
                lse = lse.masked_fill(~row_ok[:, None, :], float("-inf"))
            if acc is None and len(rows) == Nq and len(batch) == 1 and batch[0].mode != "flip":
                acc = (o, lse.to(cdt))  # one piece over every row: no copy
                covered[:] = True
                continue
            if acc is None or acc[0].dtype != cdt:
                acc = _alloc(B, Hq, Nq, D, cdt) if acc is None else (acc[0].to(cdt), acc[1])
            if batch[0].mode == "flip":  # back to ascending rows within each piece
                o, lse = o.flip(2), lse.flip(2)
                rows = torch.cat([torch.arange(p.r0, p.r1) for p in batch])
            po, pl = _unstack(o, B).to(cdt), _unstack(lse, B).to(cdt)
            r0, r1 = int(rows[0]), int(rows[-1]) + 1
            span = r1 - r0 == len(rows)  # adjacent pieces: a slice, not a gather
            seen = covered[rows]
            if bool(seen.any()) and not bool(seen.all()):  # partly new rows: start them empty
                fresh = rows[~seen]
                acc[0][:, :, fresh] = 0
                acc[1][:, :, fresh] = float("-inf")
            elif not bool(seen.any()):  # first piece on these rows: a copy
                if span:
                    acc[0][:, :, r0:r1] = po
                    acc[1][:, :, r0:r1] = pl
                else:
                    acc[0].index_copy_(2, rows, po)
                    acc[1].index_copy_(2, rows, pl)
                covered[rows] = True
                continue
            if span:
                _merge_((acc[0][:, :, r0:r1], acc[1][:, :, r0:r1]), (po, pl))
            else:
                mo, ml = _merge((acc[0].index_select(2, rows), acc[1].index_select(2, rows)),
                                (po, pl))
                acc[0].index_copy_(2, rows, mo)
                acc[1].index_copy_(2, rows, ml)
            covered[rows] = True
        if acc is None:  # no query sees any key
            acc = (torch.zeros_like(q), torch.full((B, Hq, Nq), float("-inf"), dtype=cdt))
        elif not bool(covered.all()):  # rows no piece reached (allocated uninitialised)
            acc[0][:, :, ~covered] = 0
            acc[1][:, :, ~covered] = float("-inf")
        out, lse_all = acc[0].to(q.dtype), acc[1]
        ctx.save_for_backward(q, k, v, out, lse_all, kpm, cu_q, cu_k)
        return out, lse_all.float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, o, lse, kpm, cu_q, cu_k = ctx.saved_tensors
        B, D = q.shape[0], q.shape[-1]
        q, k, v, o, do, lse_b = _backward_inputs(q, k, v, o, lse, do, dlse)
        bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        if _whole(ctx.pattern, q.shape[2], k.shape[2], kpm, cu_q):
            gq, gk, gv = bwd(do, q, k, v, o, lse_b, 0.0, ctx.pattern.right is not None,
                             scale=ctx.scale)
            return gq[..., :D], gk[..., :D], gv[..., :D], None, None, None, None, None, None
        batches = list(_batches(_pieces(ctx.pattern, q.shape[2], k.shape[2], cu_q, cu_k)))
        p0 = batches[0][0] if batches else None
        if (len(batches) == 1 and len(batches[0]) == 1 and p0.mode not in ("flip", "stack")
                and p0.r1 - p0.r0 == q.shape[2] and p0.k1 - p0.k0 == k.shape[2]):
            # Dense, Causal with Nq <= Nk: the kernel's gradients are the answer
            qp, kp, vp, causal, mask, _, _, _ = _inputs(batches[0], q, k, v, kpm)
            gq, gk, gv = bwd(do, qp, kp, vp, o, lse_b, 0.0, causal, attn_mask=mask,
                             scale=ctx.scale)
            return gq[..., :D], gk[..., :D], gv[..., :D], None, None, None, None, None, None
        # fp32 accumulators (fp64 for fp64): pieces that share rows or keys add up here
        dq = torch.zeros(q.shape, dtype=lse.dtype)
        dk = torch.zeros(k.shape, dtype=lse.dtype)
        dv = torch.zeros(v.shape, dtype=lse.dtype)
        cache: dict = {}
        for batch in batches:
            if batch[0].mode == "stack":
                gq = gk = gv = None  # free an earlier piece's gradients
                stack_backward(batch[0], q, k, v, o, do, lse_b, kpm, ctx.scale, dq, dk, dv,
                               cache)
                continue
            qp, kp, vp, causal, mask, _, rows, keys = _inputs(batch, q, k, v, kpm)
            m = len(batch)
            gq, gk, gv = bwd(_stack(do, rows, m), qp, kp, vp, _stack(o, rows, m),
                             _stack(lse_b, rows, m), 0.0, causal, attn_mask=mask,
                             scale=ctx.scale)
            dq.index_add_(2, rows, _unstack(gq, B).to(dq.dtype))
            dk.index_add_(2, keys, _unstack(gk, B).to(dk.dtype))
            dv.index_add_(2, keys, _unstack(gv, B).to(dv.dtype))
        return (dq[..., :D].to(q.dtype), dk[..., :D].to(k.dtype), dv[..., :D].to(v.dtype),
                None, None, None, None, None, None)


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


def attention_fused(q, k, v, pattern: Band, scale: float, valid_keys=None,
                    cu_seqlens_q=None, cu_seqlens_k=None, need_lse: bool = True):
    """Band attention on the fused CPU kernel: ``(o [B, Hq, Nq, D], lse [B, Hq, Nq] fp32)``.

    Same contract as :func:`attnkit.kernels.flash.torch_band.attention_torch` (``q [B, Hq, Nq,
    D]``, ``k``/``v [B, Hkv, Nk, D]``, ``valid_keys [B, Nk]`` True = attend,
    ``cu_seqlens_* [S + 1]`` with ``B == 1``); call only when :func:`fused_available`. With
    ``need_lse=False`` (no gradient, no ``return_lse``) stack rows may return NaN in the LSE.
    """
    return _Fused.apply(q, k, v, pattern, scale, valid_keys, cu_seqlens_q, cu_seqlens_k,
                        need_lse)
