"""Context-parallel attention: every rank holds a shard of the sequence, keys/values travel
point-to-point to the ranks whose queries see them, and partial results merge by log-sum-exp.

Schedule (see :class:`~attnkit.distributed.planner.Plan`): rank ``r`` computes its own shard's
pairs first, then walks rounds ``k = 1 .. world - 1``; in round ``k`` it may send its keys/values
to ``r + k`` and receive from ``r - k`` (mod ``world``), but only where the pattern needs them.
This is a point-to-point schedule rather than a blind ring: a shard no query of a rank touches is
never sent to it, and a round with nothing to do costs nothing (a narrow window exchanges with
neighbours only; causal contiguous rank ``r`` receives only from ranks ``< r``). The transfer of
round ``k + 1`` is posted before round ``k`` is computed, so communication overlaps compute and at
most two remote shards are held at a time.

Backward is a hand-written :class:`torch.autograd.Function`: the same walk re-fetches the remote
keys/values (instead of keeping every one alive from the forward), recomputes each pair's partial
output and LSE with :func:`attnkit.attention`, and pushes the merged output's gradient into it
(``do_i = w_i do``, ``dlse_i = w_i (rowsum(do * (o_i - o)) + dlse)``, ``w_i = exp(lse_i - lse)``).
Gradients of remote keys/values go back to their owner in the next round's batch, in fp32 (fp64
for fp64 inputs), and are summed there. Only the rows of a shard that the receiver's pairs touch
travel (``Plan.ranges``): a 128-token window over shards of 1024 moves 128 rows, not 1024.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import Pattern, attention  # attnkit's public API only
from .comm import P2PBatch, check_backend, group_info
from .planner import Plan, check_layout, plan, take_rows

__all__ = ["context_parallel_attention", "merge_partial", "attend_pair"]

_KV, _MASK, _GRAD = 0, 1, 2


def _tag(round_: int, kind: int) -> int:
    return 4 * round_ + kind


def attend_pair(q, k, v, pattern, scale, valid_keys, backend):
    """One partial :func:`attnkit.attention` call: ``(o [B, Hq, nq, D], lse [B, Hq, nq] fp32)``.

    The only place that names attnkit's key mask argument (``valid_keys``: ``[B, nk]`` bool,
    True = attend)."""
    return attention(q, k, v, pattern, scale=scale, valid_keys=valid_keys, backend=backend,
                     return_lse=True)


def merge_partial(o_acc, lse_acc, o_i, lse_i) -> None:
    """In place: merge a partial ``(o_i, lse_i)`` into the running ``(o_acc, lse_acc)``.

    ``lse = logaddexp(lse_acc, lse_i)``, ``o = exp(lse_acc - lse) o_acc + exp(lse_i - lse) o_i``;
    a row where both are ``-inf`` stays ``o = 0, lse = -inf`` (the shifted exponent is taken
    against 0 there, so no ``-inf - -inf`` NaN appears)."""
    new = torch.logaddexp(lse_acc, lse_i.to(lse_acc.dtype))
    ref = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    w_acc = torch.exp(lse_acc - ref)[..., None]
    w_i = torch.exp(lse_i.to(lse_acc.dtype) - ref)[..., None]
    o_acc.mul_(w_acc).add_(w_i * o_i.to(o_acc.dtype))
    lse_acc.copy_(new)


@dataclass
class _Call:
    plan: Plan
    rank: int
    group: object
    scale: float
    backend: str
    acc: torch.dtype  # accumulation dtype: fp32, or fp64 for fp64 inputs


def _walk(call: _Call, payload, mask, compute, grad_into=None):
    """Walk this rank's schedule. ``compute(src, kv [2, B, Hkv, rows, D], mask [B, rows] or None)``
    runs for the local shard, then for each received slice in round order. In the backward
    (``grad_into``, the ``[2, B, Hkv, n, D]`` gradient of our own keys/values) it returns the
    gradient of a received slice, which is sent back to its owner; the gradients other ranks send
    back for slices of our shard are added into ``grad_into``.
    """
    rank, world = call.rank, call.plan.world
    rounds, ranges = call.plan.rounds[rank], call.plan.ranges
    fetched: dict[int, tuple] = {}
    grads_out: dict[int, torch.Tensor] = {}
    posted: list[tuple[P2PBatch, list]] = []

    def absorb(upto: int) -> None:
        for batch, bufs in posted[:upto]:
            batch.wait()
            for g, pieces in bufs:
                offset = 0
                for lo, hi in pieces:  # the slices of our shard the peer received, concatenated
                    grad_into[:, :, :, lo:hi] += g[:, :, :, offset:offset + hi - lo]
                    offset += hi - lo
            bufs.clear()

    def post(step: int) -> None:
        # Step ``step`` posts round ``step + 1``'s keys/values and round ``step - 1``'s gradients.
        sends, recvs, grad_bufs = [], [], []
        nxt = step + 1
        if nxt in rounds:
            to, frm = rounds[nxt]
            if to is not None:  # only the rows of our shard that ``to`` needs
                sends.append((take_rows(payload, ranges[to][rank], 3), to, _tag(nxt, _KV)))
                if mask is not None:
                    sends.append((take_rows(mask, ranges[to][rank], 1), to, _tag(nxt, _MASK)))
            if frm is not None:
                rows = sum(hi - lo for lo, hi in ranges[rank][frm])
                kv = payload.new_empty((*payload.shape[:3], rows, payload.shape[4]))
                m = mask.new_empty((mask.shape[0], rows)) if mask is not None else None
                recvs.append((kv, frm, _tag(nxt, _KV)))
                if m is not None:
                    recvs.append((m, frm, _tag(nxt, _MASK)))
                fetched[nxt] = (len(posted), kv, m)
        prev = step - 1
        if grad_into is not None and prev in rounds:
            to, frm = rounds[prev]
            if frm is not None:
                sends.append((grads_out.pop(prev), frm, _tag(prev, _GRAD)))
            if to is not None:
                pieces = ranges[to][rank]
                rows = sum(hi - lo for lo, hi in pieces)
                g = grad_into.new_empty((*grad_into.shape[:3], rows, grad_into.shape[4]))
                recvs.append((g, to, _tag(prev, _GRAD)))
                grad_bufs.append((g, pieces))
        posted.append((P2PBatch(call.group, sends, recvs), grad_bufs))

    post(0)
    compute(rank, payload, mask)
    for step in range(1, world):
        post(step)
        if step in fetched:
            index, kv, m = fetched.pop(step)
            absorb(index + 1)  # waits for this round's batch (and everything posted before it)
            g = compute(rounds[step][1], kv, m)
            if grad_into is not None:
                grads_out[step] = g.contiguous()
    if grad_into is not None:
        post(world)
    absorb(len(posted))


def _by_src(call: _Call) -> dict[int, list]:
    out: dict[int, list] = {}
    for p in call.plan.pairs[call.rank]:
        out.setdefault(p.src, []).append(p)
    return out


def _valid_cols(m, k0, k1):
    return None if m is None else m[:, k0:k1].to(torch.bool)


def _forward(call: _Call, q, k, v, valid):
    payload = torch.stack((k, v)).contiguous()
    mask = None if valid is None else valid.to(torch.uint8).contiguous()
    o = torch.zeros(q.shape, dtype=call.acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=call.acc, device=q.device)
    by_src = _by_src(call)

    def compute(src, kv, m):
        for p in by_src.get(src, ()):
            (q0, q1), (k0, k1) = p.q_rows, p.k_cols
            o_i, lse_i = attend_pair(q[:, :, q0:q1], kv[0, :, :, k0:k1], kv[1, :, :, k0:k1], p.pattern,
                                     call.scale, _valid_cols(m, k0, k1), call.backend)
            merge_partial(o[:, :, q0:q1], lse[:, :, q0:q1], o_i, lse_i)

    _walk(call, payload, mask, compute)
    return o, lse


def _backward(call: _Call, q, k, v, valid, o, lse, do, dlse):
    acc = call.acc
    payload = torch.stack((k, v)).contiguous()
    mask = None if valid is None else valid.to(torch.uint8).contiguous()
    do = do.to(acc)
    dlse = torch.zeros_like(lse) if dlse is None else dlse.to(acc)
    ref = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    do_dot_o = (do * o.to(acc)).sum(-1)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv_local = torch.zeros(payload.shape, dtype=acc, device=q.device)
    by_src = _by_src(call)

    def compute(src, kv, m):
        dkv = dkv_local if src == call.rank else torch.zeros(kv.shape, dtype=acc, device=q.device)
        for p in by_src.get(src, ()):
            (q0, q1), (k0, k1) = p.q_rows, p.k_cols
            qi = q[:, :, q0:q1].detach().requires_grad_()
            ki = kv[0, :, :, k0:k1].detach().requires_grad_()
            vi = kv[1, :, :, k0:k1].detach().requires_grad_()
            with torch.enable_grad():
                o_i, lse_i = attend_pair(qi, ki, vi, p.pattern, call.scale, _valid_cols(m, k0, k1),
                                         call.backend)
            # exp(lse_i - lse) is this pair's share of each row; 0 where the row sees nothing.
            w = torch.exp(lse_i.detach().to(acc) - ref[:, :, q0:q1])
            d_o = do[:, :, q0:q1]
            g_o = (w[..., None] * d_o).to(o_i.dtype)
            g_lse = w * ((d_o * o_i.detach().to(acc)).sum(-1) - do_dot_o[:, :, q0:q1] + dlse[:, :, q0:q1])
            grads = torch.autograd.grad((o_i, lse_i), (qi, ki, vi), (g_o, g_lse.to(lse_i.dtype)),
                                        allow_unused=True)  # a backend may cut a fully masked input
            for dst, grad in ((dq[:, :, q0:q1], grads[0]), (dkv[0, :, :, k0:k1], grads[1]),
                              (dkv[1, :, :, k0:k1], grads[2])):
                if grad is not None:
                    dst += grad
        return dkv

    _walk(call, payload, mask, compute, grad_into=dkv_local)
    return dq.to(q.dtype), dkv_local[0].to(k.dtype), dkv_local[1].to(v.dtype)


class _ContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, valid, call):
        o, lse = _forward(call, q, k, v, valid)
        out = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, valid, out, lse)
        ctx.call = call
        return out, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, valid, out, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(out)
        dq, dk, dv = _backward(ctx.call, q, k, v, valid, out, lse, do, dlse)
        return dq, dk, dv, None, None


def _check_inputs(q, k, v, valid):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, N / world, D], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, the shard length and D: every rank "
            "passes the same rows of the sequence for queries, keys and values"
        )
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != (k.shape[0], k.shape[2])):
        raise ValueError(f"valid_keys must be a bool [B, N / world] = {[k.shape[0], k.shape[2]]} mask of "
                         f"this rank's keys, got {valid.dtype} {tuple(valid.shape)}")


def _check_same_shards(group, q, k, valid) -> None:
    """Every rank must hold shards of one shape, and all or none pass ``valid_keys`` (a receiver
    expects a mask message exactly when the sender has one): one tiny all-reduce (max of x and
    of -x). It is also the group's first collective, which NCCL wants before batched P2P."""
    mine = torch.tensor([*q.shape, *k.shape, valid is not None], dtype=torch.int64, device=q.device)
    both = torch.cat((mine, -mine))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    hi, lo = both[: mine.numel()], -both[mine.numel():]
    if hi[-1] != lo[-1]:
        raise ValueError("valid_keys: some ranks pass a key mask and others do not; pass it on every "
                         "rank (all True where nothing is padded) or on none")
    if not torch.equal(hi, lo):
        raise ValueError(
            f"q/k: the ranks hold shards of different shapes (per-dimension min {lo[:-1].tolist()} vs max "
            f"{hi[:-1].tolist()} over [q shape, k shape]); every rank must pass N / world = "
            "equal-length shards"
        )


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    group=None,
    layout: str = "contiguous",
    scale: float | None = None,
    valid_keys: torch.Tensor | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """:func:`attnkit.attention` over a sequence sharded across the ranks of ``group``.

    Every rank of ``group`` calls this with its own shard (see :func:`~attnkit.distributed.shard`)
    and gets the output rows of that shard; gradients flow to its ``q``, ``k`` and ``v``.

    Args:
        q: ``[B, Hq, N / world, D]``: this rank's queries.
        k, v: ``[B, Hkv, N / world, D]``: this rank's keys and values (``Hq % Hkv == 0``: GQA).
        pattern: ``Dense()`` (default), ``Causal()``, ``SlidingWindow(left, right)`` or
            ``BlockSparse`` built for the whole sequence (``[.., N / bs, N / bs]`` blocks; the
            block size must divide the chunk length). Positions are global: query and key ``i``
            are the same token.
        group: the process group (``None`` = default): nccl for CUDA tensors, gloo for CPU ones.
        layout: ``"contiguous"`` (rank ``r`` holds tokens ``[r n, (r + 1) n)``) or ``"zigzag"``
            (``2 * world`` chunks, rank ``r`` holds chunks ``r`` and ``2 world - 1 - r``).
        scale: multiplies ``q k^T``; defaults to ``D ** -0.5``.
        valid_keys: ``[B, N / world]`` bool, True = attend: the padding of this rank's keys. Give
            it on every rank or on none.
        backend: passed to :func:`attnkit.attention` for every partial call.
        return_lse: also return ``lse [B, Hq, N / world]`` (fp32; fp64 for fp64 inputs).

    Returns:
        ``o [B, Hq, N / world, D]`` (and ``lse``). A row that sees no key gets ``o = 0`` and
        ``lse = -inf``.
    """
    layout = check_layout(layout)
    _check_inputs(q, k, v, valid_keys)
    rank, world = group_info(group)
    check_backend(group, q.device)
    _check_same_shards(group, q, k, valid_keys)
    the_plan = plan(pattern, q.shape[2] * world, world, layout)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    call = _Call(the_plan, rank, group, float(scale) if scale is not None else q.shape[-1] ** -0.5,
                 backend, acc)
    o, lse = _ContextParallel.apply(q, k, v, valid_keys, call)
    return (o, lse) if return_lse else o
