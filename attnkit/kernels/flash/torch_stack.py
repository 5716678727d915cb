"""Stack pieces of the fused CPU path: a bounded band's whole chunks, stacked on the batch axis.

A ``stack`` piece (``torch_plan._plan_stacked``) is ``m`` chunks of ``n`` query rows, chunk ``i``
over its own ``L = n + width`` keys starting ``i * n`` after ``p.k0``; row ``a`` of every chunk
sees key offsets ``[a, a + width]`` (``p.band``, bool ``[n, L]``, shared by all chunks). K/V are
read as overlapping strided windows ``[m, L, D]`` (views, never copied). No other piece shares a
stack piece's rows, so its outputs are written, never merged.

Three executors, by dtype:

* **kernel** (fp32 forward without key padding): the C++ band kernel (``csrc/band_cpu.cpp``,
  built on first use by :mod:`..cpu_ext`). Per head and chunk: one sgemm for the scores, the
  softmax in cache (edge masks on the first and last ``n`` keys only), one sgemm for ``P V``.
  Measured side by side at N = 4096, width 255, 8 heads, 2 threads (benchmarks/NOTES.md): the
  whole forward 9.5-10.1 ms against 11.4-11.6 on the matmul executor and 66 for SDPA causal.
  Where it cannot be built (no compiler, no MKL), a warning says so once and the matmul
  executor runs.
* **matmul** (fp32 where the kernel does not serve, fp64): per head and per slab of chunks,
  ``S^T = scale * K Q^T`` (one batched GEMM), the two ``n x n`` edge triangles set to ``-inf``
  are all visible), softmax over the keys in place, ``O = P V`` (one batched GEMM). Measured
  side by side at N = 4096, width 255, fp32, 2 threads (benchmarks/NOTES.md): 15-16 ms against
  19-24 ms for the fused kernel on the same chunks (which tiles them in 32-row blocks), against
  72-88 ms for SDPA causal. When the LSE is needed (training, ``return_lse``) the softmax is
  split into ``amax``, ``sub``, ``exp``, ``sum`` and ``O`` is divided after the GEMM (+2 ms
  there); otherwise the LSE rows are NaN ("not computed", never read).
* **fused** (bf16, fp16, and every backward): PyTorch's CPU flash kernel on
  ``_FWD_STACK_ROWS`` / ``_BWD_STACK_ROWS`` rows per call with one shared additive mask; it keeps
  ``P`` in fp32 where a bf16 GEMM chain would not. A matmul backward was built and measured
  (benchmarks/NOTES.md): a query-major pass for dQ and a key-major pass for dK/dV (so no
  overlapping windows to add) is 7 GEMMs where the fused kernel does 5, and it ran no faster
  (62 against 58-65 ms at N = 4096, width 255) with 5 MiB more peak memory, so it was dropped.

The score buffer of a slab is at most ``_SLAB_BYTES`` (``[S, L, n]``), the memory this path adds
beyond ``O`` and the LSE.
"""

from __future__ import annotations

import contextlib

import torch

from .. import cpu_ext
from .torch_plan import _Piece

__all__ = ["MATMUL_DTYPES", "stack_forward", "stack_backward"]

#: dtypes the matmul executor serves (bf16/fp16 take the fused kernel: module docstring).
MATMUL_DTYPES = (torch.float32, torch.float64)
#: Rows of one fused-kernel forward call of a stack piece: bounds the call's output copy.
_FWD_STACK_ROWS = 512
#: Rows of one fused-kernel backward call: the kernel's dK/dV of a call hold ``L / n`` times
#: its keys.
_BWD_STACK_ROWS = 256
#: Score-buffer budget of one matmul slab. Measured (fp32, n = 32, L = 287, 8 heads, 2
#: threads): 12 / 24 / 40 / 60 chunks per slab ran the N = 4096 forward's stack in 17.2 / 15.0 /
#: 13.5 / 13.2 ms (each op is a parallel region: fewer, larger ops win; on 1 thread all four
#: were within 9 %). 2 MiB gives 40-chunk slabs there (1.5 MiB of scores) and a peak at
#: SDPA-flash's; 3 MiB (60 chunks) was 0.3 MiB over it.
_SLAB_BYTES = 2 << 20


@contextlib.contextmanager
def _serial():
    """Run the glue between kernel calls (copies, window adds) on the calling thread only.
    Measured on the 2-core machine under load: a 4 MiB copy took 0.17 ms at best but 10 ms at
    the median on 2 threads (each parallel region waits for a descheduled worker), 0.33 ms on
    one; the kernel calls keep every thread. (Global, like every torch thread setting: another
    Python thread running torch ops meanwhile would run them on one thread too.)"""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _fused_op():
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _windows(x: torch.Tensor, b: int, p: _Piece, n: int, L: int) -> torch.Tensor:
    """Batch row ``b`` of ``x [B, H, N, D]``: the ``m`` overlapping key windows of a stack piece,
    ``[m, H, L, D]`` (chunk ``i`` starts ``i * n`` after ``p.k0``); a strided view, no copy."""
    m = (p.r1 - p.r0) // n
    sb, sh, sn, sd = x.stride()
    return x.as_strided((m, x.shape[1], L, x.shape[3]), (n * sn, sh, sn, sd),
                        x.storage_offset() + b * sb + p.k0 * sn)


def _chunks_of(x: torch.Tensor, b: int, p: _Piece, n: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of batch row ``b`` of ``x [B, H, N, ...]`` as ``[m, H, n, ...]``."""
    y = x[b, :, p.r0:p.r1]
    return y.unflatten(1, ((p.r1 - p.r0) // n, n)).transpose(0, 1)


def _sub_pieces(p: _Piece, rows: int):
    """``p`` as consecutive stack pieces of at most ``rows`` rows (whole chunks)."""
    n, L = p.band.shape
    per = max(1, rows // n)
    m_all = (p.r1 - p.r0) // n
    for a in range(0, m_all, per):
        mm = min(per, m_all - a)
        yield _Piece(p.r0 + a * n, p.r0 + (a + mm) * n, p.k0 + a * n,
                     p.k0 + a * n + L + (mm - 1) * n, "stack", p.band)


def _key_windows(kpm: torch.Tensor, b: int, p: _Piece, n: int, L: int) -> torch.Tensor:
    """Bool ``[m, L]``: which keys of each chunk's window batch row ``b`` of ``kpm`` keeps."""
    m = (p.r1 - p.r0) // n
    return kpm.as_strided((m, L), (n * kpm.stride(1), kpm.stride(1)),
                          kpm.storage_offset() + b * kpm.stride(0) + p.k0 * kpm.stride(1))


def _stack_mask(p: _Piece, b: int, kpm, dtype, n: int, L: int, cache: dict):
    """Additive mask of a fused-kernel call for batch row ``b``: ``[1, 1, n, L]`` (band only,
    built once per call and dtype) or ``[m, 1, n, L]`` with key padding; and ``row_ok [m, n]``
    (``None``: every row sees a key)."""
    band = p.band
    if kpm is None:
        key = ("full", id(band), dtype)
        if key not in cache:
            cache[key] = torch.zeros((1, 1, n, L), dtype=dtype).masked_fill_(~band, float("-inf"))
        return cache[key], None
    ok = band[None, None] & _key_windows(kpm, b, p, n, L)[:, None, None, :]
    row_ok = ok[:, 0].any(-1)
    return torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, float("-inf")), row_ok


def _edges(band: torch.Tensor, dtype, cache: dict):
    """``(left, right)`` additive ``[n, n]`` masks of the band's first and last ``n`` keys,
    transposed (key by row; ``-inf`` where a pair is hidden), or ``None`` unless row ``a`` sees
    exactly key offsets ``[a, a + L - n]`` (what a ``Band`` stacks). Where ``L < 2n`` the two
    blocks overlap and add up right."""
    key = ("edges", id(band), dtype)
    if key not in cache:
        n, L = band.shape
        a, j = torch.arange(n)[:, None], torch.arange(L)[None, :]
        if not torch.equal(band, (j >= a) & (j <= a + L - n)):
            cache[key] = None
        else:
            inf = float("-inf")  # transposed, as the scores are kept (_Scores)
            cache[key] = (torch.zeros(n, n, dtype=dtype).masked_fill_(~band[:, :n].T, inf),
                          torch.zeros(n, n, dtype=dtype).masked_fill_(~band[:, L - n:].T, inf))
    return cache[key]


def _matmul_serves(p: _Piece, q: torch.Tensor, cache: dict) -> bool:
    return q.dtype in MATMUL_DTYPES and _edges(p.band, q.dtype, cache) is not None


def _slabs(p: _Piece, elsize: int):
    """``p`` in slabs of equal size whose scores fit ``_SLAB_BYTES`` (a last slab of a few
    chunks would cost its ops' fixed price for little work)."""
    n, L = p.band.shape
    m_all = (p.r1 - p.r0) // n
    per = max(1, _SLAB_BYTES // (n * L * elsize))
    count = -(-m_all // per)
    return _sub_pieces(p, n * -(-m_all // count))


class _Slab:
    """One slab of a stack piece for batch row ``b``: its chunk rows ``[m, H, n, D]`` and key
    windows ``[m, Hkv, L, D]`` as views (one head is then a ``select``: the per-head loop runs
    a few dozen ops per slab, so their Python cost shows), and its key-padding state."""

    def __init__(self, p: _Piece, b: int, kpm):
        self.p, self.b = p, b
        self.n, self.L = p.band.shape
        self.m = (p.r1 - p.r0) // self.n
        self.win_ok = self.row_ok = None
        if kpm is not None:
            self.win_ok = _key_windows(kpm, b, p, self.n, self.L)  # [m, L]
            row_ok = (p.band[None] & self.win_ok[:, None, :]).any(-1)  # [m, n]
            self.row_ok = None if bool(row_ok.all()) else row_ok

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return _chunks_of(x, self.b, self.p, self.n)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return _windows(x, self.b, self.p, self.n, self.L)


class _Scores:
    """The slab's masked, scaled scores of one head, **transposed**: ``[m, L, n]`` (keys by
    query rows) in a reused buffer. ``K Q^T`` has ``L`` rows where ``Q K^T`` has ``n``, and MKL's
    GEMM ran it 21 % faster (L = 287, n = 32, D = 64); the softmax over dim 1 costs 20 % more
    than over the last dim, and the whole forward ran 5 % faster (13.8 against 14.5 ms at
    N = 4096, interleaved with SDPA)."""

    def __init__(self, buf: torch.Tensor, sl: _Slab, edges, scale: float):
        self.s = buf[:sl.m]
        self.left, self.right = self.s[:, :sl.n], self.s[:, sl.L - sl.n:]
        self.edges, self.scale, self.sl = edges, scale, sl
        self.hidden = None if sl.win_ok is None else ~sl.win_ok[:, :, None]
        self.dead = None if sl.row_ok is None else ~sl.row_ok[:, None, :]  # rows seeing nothing

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``q [m, n, D]``, ``k [m, L, D]`` -> the scores ``[m, L, n]`` (the buffer)."""
        s = self.s
        torch.baddbmm(s, k, q.transpose(1, 2), beta=0, alpha=self.scale, out=s)
        self.left.add_(self.edges[0])
        self.right.add_(self.edges[1])
        if self.hidden is not None:
            s.masked_fill_(self.hidden, float("-inf"))
        return s

    def probabilities(self) -> torch.Tensor:
        """Softmax over the keys in place; rows that see no key (key padding) become 0."""
        torch.ops.aten._softmax.out(self.s, 1, False, out=self.s)
        if self.dead is not None:
            self.s.masked_fill_(self.dead, 0.0)
        return self.s


def _matmul_forward(p: _Piece, q, k, v, kpm, scale, out, lse_out, need_lse: bool, cache: dict):
    edges = _edges(p.band, q.dtype, cache)
    group = q.shape[1] // k.shape[1]
    n, L = p.band.shape
    buf = None
    for slab in _slabs(p, q.element_size()):
        m = (slab.r1 - slab.r0) // n
        if buf is None:
            buf = torch.empty(m, L, n, dtype=q.dtype)
        for b in range(q.shape[0]):
            sl = _Slab(slab, b, kpm)
            scores = _Scores(buf, sl, edges, scale)
            qs, ks, vs, os_ = sl.rows(q), sl.keys(k), sl.keys(v), sl.rows(out)
            lse_rows = lse_out[b, :, slab.r0:slab.r1].unflatten(1, (m, n)) if need_lse else None
            for h in range(q.shape[1]):
                s = scores(qs[:, h], ks[:, h // group])
                o = os_[:, h]
                if not need_lse:
                    torch.bmm(scores.probabilities().transpose(1, 2), vs[:, h // group], out=o)
                    continue
                mx = s.amax(1, keepdim=True)  # [m, 1, n]
                if scores.dead is not None:
                    mx.masked_fill_(scores.dead, 0.0)  # exp(-inf - 0) = 0 there
                total = s.sub_(mx).exp_().sum(1, keepdim=True)
                torch.bmm(s.transpose(1, 2), vs[:, h // group], out=o)
                if scores.dead is None:
                    o.div_(total.transpose(1, 2))
                else:  # 0 / tiny = 0
                    o.div_(total.transpose(1, 2).clamp_min(torch.finfo(total.dtype).tiny))
                # rows that see nothing: log 0 = -inf
                torch.add(mx, total.log_(), out=lse_rows[h].unsqueeze(1))
    if not need_lse:
        lse_out[:, :, p.r0:p.r1] = float("nan")


def _fused_forward(p: _Piece, q, k, v, kpm, scale, out, lse_out, cache: dict):
    n, L = p.band.shape
    for sub in _sub_pieces(p, _FWD_STACK_ROWS):
        m = (sub.r1 - sub.r0) // n
        for b in range(q.shape[0]):
            mask, row_ok = _stack_mask(sub, b, kpm, q.dtype, n, L, cache)
            o, lse = _fused_op()(_chunks_of(q, b, sub, n), _windows(k, b, sub, n, L),
                                 _windows(v, b, sub, n, L), 0.0, False, attn_mask=mask,
                                 scale=scale)
            with _serial():
                if row_ok is not None:
                    lse = lse.masked_fill(~row_ok[:, None, :], float("-inf"))
                out[b, :, sub.r0:sub.r1].unflatten(1, (m, n)).copy_(o.transpose(0, 1))
                lse_out[b, :, sub.r0:sub.r1].unflatten(1, (m, n)).copy_(lse.transpose(0, 1))
            del o, lse  # before the next call allocates its own: one call's output alive at a time


def _kernel(p: _Piece, q, k, v, kpm, cache: dict):
    """The C++ band kernel (:mod:`..cpu_ext`) when it serves this piece, else ``None``: fp32,
    no key padding, unit stride on D, the exact band structure, ``n`` a multiple of 16."""
    n = p.band.shape[0]
    if (q.dtype != torch.float32 or kpm is not None or n % 16
            or any(x.stride(-1) != 1 for x in (q, k, v))
            or _edges(p.band, q.dtype, cache) is None):
        return None
    return cpu_ext.module()


def _kernel_forward(ext, p: _Piece, q, k, v, scale, out, lse_out, need_lse: bool):
    n, L = p.band.shape
    m = (p.r1 - p.r0) // n
    for b in range(q.shape[0]):
        ext.band_forward(q[b], k[b], v[b], out[b], lse_out[b] if need_lse else None,
                         r0=p.r0, k0=p.k0, m=m, n=n, width=L - n, scale=scale)
    if not need_lse:
        lse_out[:, :, p.r0:p.r1] = float("nan")


def stack_forward(p: _Piece, q, k, v, kpm, scale, out, lse_out, need_lse: bool, cache: dict):
    """A stack piece's rows of ``out [B, Hq, N, D]`` and ``lse_out [B, Hq, N]`` (``q``'s dtype,
    fp32 for half types), written in place. ``k``/``v [B, Hkv, N, D]``, ``kpm [B, N]`` bool or
    ``None``. Without ``need_lse`` the kernel and matmul executors leave NaN in the LSE rows."""
    ext = _kernel(p, q, k, v, kpm, cache)
    if ext is not None:
        _kernel_forward(ext, p, q, k, v, scale, out, lse_out, need_lse)
    elif _matmul_serves(p, q, cache):
        _matmul_forward(p, q, k, v, kpm, scale, out, lse_out, need_lse, cache)
    else:
        _fused_forward(p, q, k, v, kpm, scale, out, lse_out, cache)


def add_windows(acc: torch.Tensor, g: torch.Tensor, k0: int, n: int):
    """``acc [H, N, D] += g [m, H, L, D]`` where window ``i`` covers keys ``k0 + i * n + [0, L)``:
    one strided add per ``n`` keys of the window (the windows of one slice are disjoint), not an
    ``index_add_`` over ``m * L`` gathered rows."""
    m, L = g.shape[0], g.shape[2]
    sh, sn, sd = acc.stride()
    for s0 in range(0, L, n):
        w = min(n, L - s0)
        view = acc.as_strided((m, acc.shape[0], w, acc.shape[2]), (n * sn, sh, sn, sd),
                              acc.storage_offset() + (k0 + s0) * sn)
        view.add_(g[:, :, s0:s0 + w])


def _fused_backward(p: _Piece, q, k, v, o, do, lse_b, kpm, scale, dq, dk, dv, cache: dict):
    n, L = p.band.shape
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    for sub in _sub_pieces(p, _BWD_STACK_ROWS):
        m = (sub.r1 - sub.r0) // n
        for b in range(q.shape[0]):
            mask, _ = _stack_mask(sub, b, kpm, q.dtype, n, L, cache)
            gq, gk, gv = bwd(_chunks_of(do, b, sub, n), _chunks_of(q, b, sub, n),
                             _windows(k, b, sub, n, L), _windows(v, b, sub, n, L),
                             _chunks_of(o, b, sub, n), _chunks_of(lse_b, b, sub, n), 0.0, False,
                             attn_mask=mask, scale=scale)
            with _serial():
                dq[b, :, sub.r0:sub.r1].unflatten(1, (m, n)).add_(gq.transpose(0, 1))
                add_windows(dk[b], gk, sub.k0, n)
                add_windows(dv[b], gv, sub.k0, n)
            del gq, gk, gv  # one call's gradients alive at a time


def stack_backward(p: _Piece, q, k, v, o, do, lse_b, kpm, scale, dq, dk, dv, cache: dict):
    """Adds a stack piece's gradients into ``dq``/``dk``/``dv`` (fp32 / fp64 accumulators;
    overlapping key windows accumulate through :func:`add_windows`). ``o``/``lse_b`` are the
    final output and LSE (``+inf`` on rows that see nothing), ``do`` the output gradient, all
    with the LSE-gradient column of ``torch_fused._backward_inputs`` when there is one."""
    _fused_backward(p, q, k, v, o, do, lse_b, kpm, scale, dq, dk, dv, cache)
