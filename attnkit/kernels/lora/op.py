"""Fused LoRA in Triton: kernels, launchers and the ``torch.library`` ops around them.

``torch.ops.attnkit.lora_linear_fwd``/``lora_linear_bwd`` are custom ops with fake (meta)
implementations and a registered autograd formula, so ``torch.compile`` traces through
:func:`lora_linear_triton` without a graph break (the kernels stay opaque to Inductor).

Notation: ``T`` tokens (rows), ``in``/``out`` features, rank ``r``, scaling ``s``, dropout ``p``.

* :func:`_shrink_kernel` ``OUT[T, R] = scale * drop?(X[T, K]) @ M[K, R]``. Forward: ``X = x``,
  ``M = A^T`` and ``scale = s / (1 - p)`` gives ``su = s * drop(x) A^T``; backward: ``X = dy``,
  ``M = B`` gives ``gs = s * dy B``.
* :func:`_fused_kernel` ``OUT[T, N] = X1 @ M1 + mask? * (X2 @ M2) (+ bias)``: ONE output tile,
  whose K loop runs over ``K1`` (the base GEMM) and then over ``K2 = r`` (the LoRA expand), so the
  low-rank term costs ``r / K1`` extra FLOPs and no extra pass over the output. Forward:
  ``[x | su] @ [W | B]^T``; backward: ``dx = [dy | gs] @ [W ; A]`` where, with dropout, the LoRA
  half keeps its own accumulator and is multiplied by ``mask / (1 - p)`` in the epilogue.
* :func:`_wgrad_kernel` ``OUT[S, M, N] = X^T @ drop?(Y)`` reduced over rows, split over ``S``
  row chunks (partials summed by the launcher; deterministic, no atomics). ``dB = dy^T su`` and
  ``dA = gs^T drop(x) / (1 - p)``.

Dropout mask (the one definition every kernel regenerates, so no dropped copy of x is stored):
element ``(t, k)`` of ``x [T, in]`` is kept iff ``tl.rand(seed, t * in + k) >= p``, the offset
being int32 when ``T * in < 2**31`` and int64 otherwise (``OFF64``).

``BATCHED`` (multi-adapter inference, :func:`attnkit.finetune.lora_batched`): rows are visited
through a block table built by the launcher: program ``m`` handles the ``BLK_LEN[m]`` rows
``ROW_IDX[BLK_ROW0[m] : ...]`` which all use adapter ``BLK_ADAPTER[m]`` (``-1``: no adapter, its
scaling is taken as 0). The table is built on the device and padded to a block count known from the
shapes (no host sync); a padding block has ``BLK_LEN`` 0 and its program returns at once. The
adapter selects ``M``/``M2`` through ``stride_ma`` and its scaling from
``SCALES``.

Base offsets are int64 (``T * in`` may pass 2**31); offsets inside a tile stay int32.

Launches pass every argument by keyword. An absent input is passed as ``None`` (no bias, no
dropout seed, no block table) and its constexpr flag (``HAS_BIAS``, ``DROPOUT``, ``BATCHED``) is
derived from that in the launcher; the kernels never touch a ``None`` pointer. Tiles, autotuning
and launch geometry live in ``tiles.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .jit_helpers import _block_rows, _dot, _keep
from .tiles import (
    _BATCHED_FUSED,
    _BATCHED_SHRINK,
    FUSED,
    INTERPRET,
    SHRINK,
    WGRAD,
    _block_k2,
    _block_r,
    _bucket,
    _n_splits,
    autotuned,
    block_table,
    kernel_flags,
)

__all__ = ["lora_linear_triton", "lora_batched_triton", "INTERPRET"]

# Re-exported: compile_check and tests/kernels/test_compile_check_linear_lora.py read the fused
# tile list and its prune (with the launch geometry above) through this module.
_FUSED_TILES, _prune_fused = tiles._FUSED_TILES, tiles._prune_fused


@triton.jit
def _shrink_kernel(
    X, M, OUT, SEED, SCALES, ROW_IDX, BLK_ROW0, BLK_LEN, BLK_ADAPTER,
    T, K, R, scale, p, T_BUCKET,
    stride_xt, stride_xk, stride_mk, stride_mr, stride_ma, stride_ot, stride_or,
    DROPOUT: tl.constexpr, OFF64: tl.constexpr, BATCHED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``OUT[T, R] = scale * drop?(X[T, K]) @ M[K, R]`` (module docstring)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    # nested, not ``and``: BLK_LEN is None unless BATCHED, so the load must not be traced then
    if BATCHED:  # noqa: SIM102
        if tl.load(BLK_LEN + pid_m) == 0:  # a padding block of the table: nothing to do
            return
    rows, rmask, adapter = _block_rows(pid_m, T, ROW_IDX, BLK_ROW0, BLK_LEN, BLK_ADAPTER,
                                       BATCHED, BLOCK_M)
    if BATCHED:
        a_id = tl.maximum(adapter, 0)
        M += a_id.to(tl.int64) * stride_ma
        scale = tl.where(adapter < 0, 0.0, tl.load(SCALES + a_id).to(tl.float32))
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xt
    if DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=rmask[:, None] & k_mask[None, :],
                     other=0.0)  # [BM, BK]
        if DROPOUT:
            xt = tl.where(_keep(seed, rows, offs_k, K, p, OFF64), xt, 0.0).to(xt.dtype)
        mt = tl.load(M + offs_k[:, None] * stride_mk + offs_r[None, :] * stride_mr,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)  # [BK, BR]
        acc = _dot(xt, mt, acc, PRECISION, UPCAST)  # [BM, BK] @ [BK, BR] -> [BM, BR]
    acc = acc * scale
    out = OUT + rows.to(tl.int64)[:, None] * stride_ot + offs_r[None, :] * stride_or
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=rmask[:, None] & r_mask[None, :])


@triton.jit
def _fused_kernel(
    X1, M1, X2, M2, BIAS, OUT, SEED, ROW_IDX, BLK_ROW0, BLK_LEN, BLK_ADAPTER,
    T, N, K1, K2, p, inv_keep, T_BUCKET,
    stride_x1t, stride_x1k, stride_m1k, stride_m1n,
    stride_x2t, stride_x2k, stride_m2k, stride_m2n, stride_m2a,
    stride_ot, stride_on,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, OFF64: tl.constexpr, BATCHED: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_K2: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH_K2: tl.constexpr,
):
    """``OUT[T, N] = X1[T, K1] @ M1[K1, N] + mask? * (X2[T, K2] @ M2[K2, N]) (+ BIAS[N])``.

    Loads read clamped rows (row 0 past the edge; a batched table already gives row 0 for its
    padding) so that they need no row predicate; columns keep theirs. ``EVEN_K`` (``K1`` a
    multiple of every offered ``BLOCK_K``) drops the K predicate too. ``PREFETCH_K2`` (the whole
    rank in one ``BLOCK_K2`` step) loads the expand's operands before the base loop, so the
    expand does not wait for a fresh load after the pipeline drains."""
    if BATCHED:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    else:
        # grouped ordering: GROUP_M row blocks share each M1 column panel while it sits in L2
        pid = tl.program_id(0)
        n_pid_m = tl.cdiv(T, BLOCK_M)
        n_pid_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * n_pid_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(n_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
    if BATCHED:  # noqa: SIM102 (as in _shrink_kernel)
        if tl.load(BLK_LEN + pid_m) == 0:  # a padding block (the grid is sized before the table)
            return
    rows, rmask, adapter = _block_rows(pid_m, T, ROW_IDX, BLK_ROW0, BLK_LEN, BLK_ADAPTER,
                                       BATCHED, BLOCK_M)
    if BATCHED:
        M2 += tl.maximum(adapter, 0).to(tl.int64) * stride_m2a
    rows64 = rows.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # clamped rows for the loads (rows past the edge are computed, never stored). Columns stay
    # masked: clamping them with tl.where hides their contiguity from the compiler, and the dx
    # GEMM (M1 = W, contiguous along N) then lost its cp.async staging (measured on sm_90: 96 ->
    # 64 KiB shared memory, 118 -> 172 registers at 128x128 r 64, spills at 128x256)
    rows_ld = tl.where(rmask, rows64, 0)
    cols_ld = offs_n.to(tl.int64)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x1_rows = X1 + rows_ld[:, None] * stride_x1t
    # int64 offsets into the weight: in * out passes 2^31 for large heads (256k vocab x 8k)
    m1_cols = M1 + cols_ld[None, :] * stride_m1n
    x2_rows = X2 + rows_ld[:, None] * stride_x2t
    m2_cols = M2 + cols_ld[None, :] * stride_m2n
    if PREFETCH_K2:  # the expand's operands, in flight while the base loop runs
        offs_k2 = tl.arange(0, BLOCK_K2)
        k2_mask = offs_k2 < K2
        a2 = tl.load(x2_rows + offs_k2[None, :] * stride_x2k, mask=k2_mask[None, :], other=0.0)
        b2 = tl.load(m2_cols + offs_k2[:, None] * stride_m2k, mask=k2_mask[:, None] & n_mask[None, :],
                     other=0.0)
    for k0 in range(0, K1, BLOCK_K):  # the base GEMM's K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            a = tl.load(x1_rows + offs_k[None, :] * stride_x1k)  # [BM, BK]
            b = tl.load(m1_cols + offs_k.to(tl.int64)[:, None] * stride_m1k, mask=n_mask[None, :],
                        other=0.0)  # [BK, BN]
        else:
            k_mask = offs_k < K1
            a = tl.load(x1_rows + offs_k[None, :] * stride_x1k, mask=k_mask[None, :], other=0.0)
            b = tl.load(m1_cols + offs_k.to(tl.int64)[:, None] * stride_m1k,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION, UPCAST)

    # ... continued over the rank: the LoRA expand in the same output tile
    if DROPOUT:
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc2 = acc
    if PREFETCH_K2:
        acc2 = _dot(a2, b2, acc2, PRECISION, UPCAST)
    else:
        for k0 in range(0, K2, BLOCK_K2):
            offs_k = k0 + tl.arange(0, BLOCK_K2)
            k_mask = offs_k < K2
            a = tl.load(x2_rows + offs_k[None, :] * stride_x2k, mask=k_mask[None, :],
                        other=0.0)  # [BM, BK2]
            b = tl.load(m2_cols + offs_k[:, None] * stride_m2k, mask=k_mask[:, None] & n_mask[None, :],
                        other=0.0)  # [BK2, BN]
            acc2 = _dot(a, b, acc2, PRECISION, UPCAST)
    if DROPOUT:
        # dx of the dropout input: the LoRA half only flows through kept elements, scaled 1/(1-p)
        keep = _keep(tl.load(SEED), rows, offs_n, N, p, OFF64)
        acc = acc + tl.where(keep, acc2 * inv_keep, 0.0)
    else:
        acc = acc2

    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = OUT + rows64[:, None] * stride_ot + offs_n[None, :] * stride_on
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=rmask[:, None] & n_mask[None, :])


@triton.jit
def _wgrad_kernel(
    X, Y, OUT, SEED, T, M, N, rows_per_split, p, T_BUCKET,
    stride_xt, stride_xm, stride_yt, stride_yn, stride_os, stride_om, stride_on,
    DROPOUT: tl.constexpr, OFF64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """``OUT[s, M, N] = X[t, M]^T @ drop?(Y[t, N])`` over the rows ``t`` of split ``s``."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_pid_n
    pid_n = pid % n_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    t_start = pid_s * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    if DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < t_end
        offs_t64 = offs_t.to(tl.int64)
        xt = tl.load(X + offs_t64[None, :] * stride_xt + offs_m[:, None] * stride_xm,
                     mask=m_mask[:, None] & t_mask[None, :], other=0.0)  # [BM, BT] = X^T tile
        yt = tl.load(Y + offs_t64[:, None] * stride_yt + offs_n[None, :] * stride_yn,
                     mask=t_mask[:, None] & n_mask[None, :], other=0.0)  # [BT, BN]
        if DROPOUT:
            yt = tl.where(_keep(seed, offs_t, offs_n, N, p, OFF64), yt, 0.0).to(yt.dtype)
        acc = _dot(xt, yt, acc, PRECISION, UPCAST)  # [BM, BT] @ [BT, BN] -> [BM, BN]
    out = OUT + pid_s.to(tl.int64) * stride_os
    out += offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

_shrink_tuned, _SHRINK_META = autotuned(_shrink_kernel, SHRINK)
_fused_tuned, _FUSED_META = autotuned(_fused_kernel, FUSED)
_wgrad_tuned, _WGRAD_META = autotuned(_wgrad_kernel, WGRAD)

#: Tests set this to fill every kernel output with NaN before the kernel runs, so that an element
#: a kernel forgets to write shows up as NaN instead of as stale memory that happens to look right.
POISON_OUTPUTS = False


def _alloc(shape, device, dtype) -> torch.Tensor:
    """Every kernel output is allocated here, poisoned with NaN under the tests."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def _table_args(table) -> dict:
    """The block-table pointers of a batched launch (``None`` each when not batched)."""
    row_idx, row0, blen, badapter = table if table is not None else (None,) * 4
    return dict(ROW_IDX=row_idx, BLK_ROW0=row0, BLK_LEN=blen, BLK_ADAPTER=badapter)


def _shrink(x, m, scale, seed=None, p=0.0, table=None, scales=None):
    """``scale * drop?(x [T, K]) @ m [K, R]`` -> ``[T, R]`` in x's dtype.

    Dropout applies when ``seed`` (a one-element int64 tensor) is given. ``table`` (batched):
    the :func:`~.tiles.block_table` of the rows; then ``m`` is ``[n, K, R]`` and ``scales [n]``
    fp32 replaces ``scale``.
    """
    T, K = x.shape
    R = m.shape[-1]
    out = _alloc((T, R), x.device, x.dtype)
    if T == 0:
        return out
    block_r = _block_r(R)
    batched = table is not None
    args = dict(
        X=x, M=m, OUT=out, SEED=seed, SCALES=scales, **_table_args(table),
        T=T, K=K, R=R, scale=float(scale), p=float(p), T_BUCKET=_bucket(T),
        stride_xt=x.stride(0), stride_xk=x.stride(1), stride_mk=m.stride(-2),
        stride_mr=m.stride(-1), stride_ma=m.stride(0) if batched else 0,
        stride_ot=out.stride(0), stride_or=out.stride(1),
        DROPOUT=seed is not None, OFF64=T * K >= 2**31, BATCHED=batched, BLOCK_R=block_r,
        **kernel_flags(x.dtype),
    )
    if batched:
        grid = (table[2].numel(), triton.cdiv(R, block_r))
        _shrink_kernel[grid](**args, **_BATCHED_SHRINK)
    else:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), triton.cdiv(R, block_r))
        _shrink_tuned[grid](**args, **_SHRINK_META)
    return out


def _fused(x1, m1, x2, m2, bias, seed=None, p=0.0, table=None):
    """``x1 [T, K1] @ m1 [K1, N] + mask? * (x2 [T, K2] @ m2 [K2, N]) / (1-p) (+ bias [N])``.

    Dropout (the dx GEMM) applies when ``seed`` is given; with ``table`` (batched), ``m2`` is
    ``[n, K2, N]``, one per adapter.
    """
    T, K1 = x1.shape
    N = m1.shape[1]
    K2 = x2.shape[1]
    out = _alloc((T, N), x1.device, x1.dtype)
    if T == 0:
        return out
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads BIAS + n (a strided view would be misread)
    batched = table is not None
    args = dict(
        X1=x1, M1=m1, X2=x2, M2=m2, BIAS=bias, OUT=out, SEED=seed, **_table_args(table),
        T=T, N=N, K1=K1, K2=K2, p=float(p), inv_keep=1.0 / (1.0 - p), T_BUCKET=_bucket(T),
        stride_x1t=x1.stride(0), stride_x1k=x1.stride(1),
        stride_m1k=m1.stride(0), stride_m1n=m1.stride(1),
        stride_x2t=x2.stride(0), stride_x2k=x2.stride(1),
        stride_m2k=m2.stride(-2), stride_m2n=m2.stride(-1),
        stride_m2a=m2.stride(0) if batched else 0,
        stride_ot=out.stride(0), stride_on=out.stride(1),
        HAS_BIAS=bias is not None, DROPOUT=seed is not None, OFF64=T * N >= 2**31,
        BATCHED=batched, BLOCK_K2=_block_k2(K2), EVEN_K=K1 % tiles.EVEN_K_MULTIPLE == 0,
        PREFETCH_K2=K2 <= _block_k2(K2) <= tiles.PREFETCH_MAX_K2, **kernel_flags(x1.dtype),
    )
    if batched:
        grid = (table[2].numel(), triton.cdiv(N, _BATCHED_FUSED["BLOCK_N"]))
        _fused_kernel[grid](**args, **_BATCHED_FUSED)
    else:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _fused_tuned[grid](**args, **_FUSED_META)
    return out


def _wgrad(x, y, out_dtype, scale=1.0, seed=None, p=0.0):
    """``scale * x [T, M]^T @ drop?(y [T, N])`` -> ``[M, N]`` in ``out_dtype`` (fp32 partials);
    dropout on ``y`` when ``seed`` is given."""
    T, M = x.shape
    N = y.shape[1]
    if T == 0:
        return torch.zeros((M, N), device=x.device, dtype=out_dtype)
    splits, rows = _n_splits(T, M, N)
    part = _alloc((splits, M, N), x.device, torch.float32)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)
    _wgrad_tuned[grid](
        X=x, Y=y, OUT=part, SEED=seed, T=T, M=M, N=N, rows_per_split=rows, p=float(p),
        T_BUCKET=_bucket(T), stride_xt=x.stride(0), stride_xm=x.stride(1),
        stride_yt=y.stride(0), stride_yn=y.stride(1), stride_os=part.stride(0),
        stride_om=part.stride(1), stride_on=part.stride(2),
        DROPOUT=seed is not None, OFF64=T * N >= 2**31, **kernel_flags(x.dtype), **_WGRAD_META,
    )
    total = part[0] if splits == 1 else part.sum(0)
    if scale != 1.0:
        total = total * scale
    return total.to(out_dtype)


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------


def _dropout_seed(seed, dropout_p):
    """The seed tensor when dropout applies (``seed`` given and ``p > 0``), else ``None``."""
    return seed if seed is not None and dropout_p > 0.0 else None


@torch.library.custom_op("attnkit::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
    lora_b: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LoRA forward on ``x [T, in]``: ``(y [T, out], su [T, r])``, ``su = s drop(x) A^T``.

    Dropout applies when ``seed`` (a one-element int64 tensor) is given and ``dropout_p > 0``.
    """
    seed = _dropout_seed(seed, dropout_p)
    p = dropout_p if seed is not None else 0.0
    su = _shrink(x, lora_a.t(), scaling / (1.0 - p), seed, p)  # [T, in] @ [in, r]
    y = _fused(x, weight.t(), su, lora_b.t(), bias)  # [x | su] @ [W | B]^T -> [T, out]
    return y, su


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@torch.library.custom_op("attnkit::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
    lora_b: torch.Tensor, su: torch.Tensor, scaling: float, dropout_p: float,
    seed: torch.Tensor | None, need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused LoRA backward: ``(dx [T, in] (empty if not need_dx), dA [r, in], dB [out, r])``."""
    seed = _dropout_seed(seed, dropout_p)
    p = dropout_p if seed is not None else 0.0
    gs = _shrink(dy, lora_b, scaling)  # s * dy B: [T, out] @ [out, r] -> [T, r]
    if need_dx:
        dx = _fused(dy, weight, gs, lora_a, None, seed, p)  # [dy | gs] @ [W ; A] -> [T, in]
    else:
        dx = dy.new_empty((0,))
    db = _wgrad(dy, su, lora_b.dtype)  # dy^T su: [out, T] @ [T, r]
    da = _wgrad(gs, x, lora_a.dtype, 1.0 / (1.0 - p), seed, p)  # gs^T drop(x): [r, T] @ [T, in]
    return dx, da, db


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, su, scaling, dropout_p, seed, need_dx):
    dx = torch.empty_like(x) if need_dx else dy.new_empty((0,))
    return dx, torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], seed)
    ctx.scaling, ctx.dropout_p, ctx.has_bias = scaling, dropout_p, bias is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dsu):
    x, weight, lora_a, lora_b, su, seed = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if dy is None:
        return (None,) * 8
    dx, da, db = torch.ops.attnkit.lora_linear_bwd(
        dy, x, weight, lora_a, lora_b, su, ctx.scaling, ctx.dropout_p, seed, bool(need_x)
    )
    # Only when a user trains the base layer: plain GEMMs, cuBLAS does them best.
    dw = dy.t().mm(x) if need_w else None
    dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_b and ctx.has_bias else None
    return (dx if need_x else None), dw, dbias, da, db, None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, seed=None):
    """``y [T, out] = x W^T + bias + s drop(x) A^T B^T`` for ``x [T, in]`` (validated inputs).

    ``weight [out, in]``, ``bias [out] | None``, ``lora_a [r, in]``, ``lora_b [out, r]``;
    ``seed``: one-element int64 tensor on x's device, or ``None`` (no dropout).
    """
    y, _ = torch.ops.attnkit.lora_linear_fwd(
        x, weight, bias, lora_a, lora_b, float(scaling), float(dropout_p), seed
    )
    return y


# --------------------------------------------------------------------------------------------
# Multi-adapter batches (inference)
# --------------------------------------------------------------------------------------------


def lora_batched_triton(x, weight, bias, lora_as, lora_bs, scalings, index):
    """Each row its own adapter: ``y[t] = W x[t] + bias + s[i] B[i] A[i] x[t]``, ``i = index[t]``.

    ``x [T, in]``, ``weight [out, in]``, ``lora_as [n, r, in]``, ``lora_bs [n, out, r]``,
    ``scalings [n]`` fp32, ``index [T]`` int (``-1``: base layer only). Inference only. No host
    sync: the block table is built on the device and the grid sized from the shapes alone.
    """
    T = x.shape[0]
    if T == 0:
        return x.new_empty((0, weight.shape[0]))
    table = block_table(index, lora_as.shape[0], _BATCHED_FUSED["BLOCK_M"])
    su = _shrink(x, lora_as.transpose(1, 2), 1.0, table=table, scales=scalings)  # A^T: [n, in, r]
    return _fused(x, weight.t(), su, lora_bs.transpose(1, 2), bias, table=table)  # B^T: [n, r, out]
