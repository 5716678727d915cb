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
scaling is taken as 0). The adapter selects ``M``/``M2`` through ``stride_ma`` and its scaling from
``SCALES``.

Base offsets are int64 (``T * in`` may pass 2**31); offsets inside a tile stay int32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..autotune import first_only_if_asked

__all__ = ["lora_linear_triton", "lora_batched_triton", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b``. ``UPCAST`` (CPU interpreter + bf16 only) multiplies in fp32 because the
    interpreter has no bf16 dot; the operands keep the bf16 rounding the GPU would see."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _keep(seed, rows, cols, n_cols, p, OFF64: tl.constexpr):
    """Dropout keep mask ``[len(rows), len(cols)]`` of x (see the module docstring)."""
    if OFF64:
        offs = rows.to(tl.int64)[:, None] * n_cols + cols.to(tl.int64)[None, :]
    else:
        offs = rows[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offs) >= p


@triton.jit
def _block_rows(pid_m, T, ROW_IDX, BLK_ROW0, BLK_LEN, BLK_ADAPTER,
                BATCHED: tl.constexpr, BLOCK_M: tl.constexpr):
    """(rows [BLOCK_M] int32, row mask, adapter) of row block ``pid_m``."""
    offs = tl.arange(0, BLOCK_M)
    if BATCHED:
        row0 = tl.load(BLK_ROW0 + pid_m)
        n = tl.load(BLK_LEN + pid_m)
        rmask = offs < n
        rows = tl.load(ROW_IDX + row0 + offs, mask=rmask, other=0)
        adapter = tl.load(BLK_ADAPTER + pid_m)
    else:
        rows = pid_m * BLOCK_M + offs
        rmask = rows < T
        adapter = pid_m * 0
    return rows, rmask, adapter


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
    BLOCK_K2: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``OUT[T, N] = X1[T, K1] @ M1[K1, N] + mask? * (X2[T, K2] @ M2[K2, N]) (+ BIAS[N])``."""
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
    rows, rmask, adapter = _block_rows(pid_m, T, ROW_IDX, BLK_ROW0, BLK_LEN, BLK_ADAPTER,
                                       BATCHED, BLOCK_M)
    if BATCHED:
        M2 += tl.maximum(adapter, 0).to(tl.int64) * stride_m2a
    rows64 = rows.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x1_rows = X1 + rows64[:, None] * stride_x1t
    # int64 offsets into the weight: in * out passes 2^31 for large heads (256k vocab x 8k)
    m1_cols = M1 + offs_n.to(tl.int64)[None, :] * stride_m1n
    for k0 in range(0, K1, BLOCK_K):  # the base GEMM's K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K1
        a = tl.load(x1_rows + offs_k[None, :] * stride_x1k, mask=rmask[:, None] & k_mask[None, :],
                    other=0.0)  # [BM, BK]
        b = tl.load(m1_cols + offs_k.to(tl.int64)[:, None] * stride_m1k,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BK, BN]
        acc = _dot(a, b, acc, PRECISION, UPCAST)

    # ... continued over the rank: the LoRA expand in the same output tile
    if DROPOUT:
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc2 = acc
    x2_rows = X2 + rows64[:, None] * stride_x2t
    for k0 in range(0, K2, BLOCK_K2):
        offs_k = k0 + tl.arange(0, BLOCK_K2)
        k_mask = offs_k < K2
        a = tl.load(x2_rows + offs_k[None, :] * stride_x2k, mask=rmask[:, None] & k_mask[None, :],
                    other=0.0)  # [BM, BK2]
        b = tl.load(M2 + offs_k[:, None] * stride_m2k + offs_n[None, :] * stride_m2n,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BK2, BN]
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
# Tile configurations
# --------------------------------------------------------------------------------------------

# Fused GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the usual H100/A100 GEMM shapes
# (128x128 and 128x64 with K 32/64). Not yet measured by us on a GPU (benchmarks/NOTES.md).
_FUSED_TILES = [
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4), (128, 64, 32, 4, 4), (64, 64, 64, 4, 3), (64, 64, 32, 4, 4),
]
# With dropout (the dx GEMM) the epilogue regenerates the keep mask (Philox) over the whole tile
# next to two fp32 accumulators: ahead-of-time sm_90 compiles (python -m
# attnkit.kernels.compile_check --module lora --dropout --all-tiles) spill 576-688 B per thread
# at 128x128/128x64/64x128 (4.6 KB at 128x128 with 4 warps); 64x64 takes 216 registers, no spill.
_DROPOUT_MAX_TILE = 64 * 64
# Shrink (BLOCK_M, BLOCK_K, warps, stages): memory-bound on x, so long K tiles; BLOCK_R from r.
_SHRINK_TILES = [(64, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4), (32, 128, 4, 4)]
# Weight grads (BLOCK_M, BLOCK_N, BLOCK_T, warps, stages); pruned to the output's shape.
_WGRAD_TILES = [
    (bm, bn, bt, 4, 3) for bm in (16, 32, 64, 128) for bn in (16, 32, 64, 128) for bt in (32, 64)
]
# Under TRITON_INTERPRET (CPU tests) one small tile, so that in=40 / out=24 / T=17 already span
# several row, column and K blocks with partial edges.
_INTERPRET_FUSED = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
_INTERPRET_SHRINK = dict(BLOCK_M=16, BLOCK_K=16)
_INTERPRET_WGRAD = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_T=16)
# The batched path builds its row-block table for one BLOCK_M, so it is not autotuned.
_BATCHED_FUSED = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
_BATCHED_SHRINK = dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3)
if INTERPRET:
    _BATCHED_FUSED = dict(_INTERPRET_FUSED)
    _BATCHED_SHRINK = dict(_INTERPRET_SHRINK)


def _fits_smem(bm, bn, bk, stages, elem):
    return (bm + bn) * bk * elem * max(stages - 1, 1) <= 160 * 1024


def _prune_fused(configs, named_args, **kwargs):
    elem = named_args["X1"].element_size()
    dropout = kwargs.get("DROPOUT", named_args.get("DROPOUT", False))
    keep = [c for c in configs if _fits_smem(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                             c.kwargs["BLOCK_K"], c.num_stages, elem)
            and (not dropout or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= _DROPOUT_MAX_TILE)]
    return keep or configs[-1:]


def _prune_wgrad(configs, named_args, **kwargs):
    m, n = named_args["M"], named_args["N"]
    elem = named_args["X"].element_size()
    keep = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))
        and c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(n))
        and _fits_smem(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_T"],
                       c.num_stages, elem)
    ]
    return keep or configs[:1]


def _tuned(kernel, configs, key, prune):
    return triton.autotune(configs, key=key,
                           prune_configs_by={"early_config_prune": first_only_if_asked(prune)})(kernel)


if INTERPRET:
    _fused_tuned, _shrink_tuned, _wgrad_tuned = _fused_kernel, _shrink_kernel, _wgrad_kernel
    _FUSED_META, _SHRINK_META, _WGRAD_META = _INTERPRET_FUSED, _INTERPRET_SHRINK, _INTERPRET_WGRAD
else:  # pragma: no cover - GPU only
    # The autotuner picks the tiles; nothing extra to pass (tests/kernels/test_gpu_module_names.py
    # checks that both branches define the same names).
    _FUSED_META, _SHRINK_META, _WGRAD_META = {}, {}, {}
    _fused_tuned = _tuned(
        _fused_kernel,
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w,
                       num_stages=s) for m, n, k, w, s in _FUSED_TILES],
        ["T_BUCKET", "N", "K1", "K2", "DROPOUT", "HAS_BIAS"], _prune_fused,
    )
    _shrink_tuned = _tuned(
        _shrink_kernel,
        [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s)
         for m, k, w, s in _SHRINK_TILES],
        ["T_BUCKET", "K", "R", "DROPOUT"], None,
    )
    _wgrad_tuned = _tuned(
        _wgrad_kernel,
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_T": t}, num_warps=w, num_stages=s)
         for m, n, t, w, s in _WGRAD_TILES],
        ["T_BUCKET", "M", "N", "DROPOUT"], _prune_wgrad,
    )


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows PyTorch's matmul precision (TF32 unless "highest"), like torch.matmul."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _flags(dtype: torch.dtype) -> dict:
    return dict(PRECISION=_precision(dtype), UPCAST=INTERPRET and dtype == torch.bfloat16)


def _bucket(t: int) -> int:
    """Token-count bucket for the autotune key: training batches vary T, tiles need not."""
    return min(max(triton.next_power_of_2(max(t, 1)), 256), 1 << 16)


def _block_k2(r: int) -> int:
    return min(max(16, triton.next_power_of_2(r)), 64)


def _block_r(r: int) -> int:
    return min(max(16, triton.next_power_of_2(r)), 64)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


#: Tests set this to fill every kernel output with NaN before the kernel runs (see flash.py).
POISON_OUTPUTS = False


def _alloc(shape, device, dtype) -> torch.Tensor:
    """Every kernel output is allocated here, poisoned with NaN under the tests."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def _shrink(x, m, scale, p=0.0, seed=None, table=None, scales=None, stride_ma=0):
    """``scale * drop?(x [T, K]) @ m [K, R]`` -> ``[T, R]`` in x's dtype.

    ``table`` (batched): ``(row_idx, blk_row0, blk_len, blk_adapter)``; then ``m`` is
    ``[n, K, R]`` addressed through ``stride_ma`` and ``scales [n]`` replaces ``scale``.
    """
    T, K = x.shape
    R = m.shape[-1]
    out = _alloc((T, R), x.device, x.dtype)
    if T == 0:
        return out
    dropout = p > 0.0
    block_r = _block_r(R)
    common = dict(DROPOUT=dropout, OFF64=T * K >= 2**31, BATCHED=table is not None,
                  BLOCK_R=block_r, **_flags(x.dtype))
    sm_k, sm_r = m.stride(-2), m.stride(-1)
    if table is None:
        args = (x, m, out, seed if dropout else x, x, x, x, x, x,
                T, K, R, float(scale), float(p), _bucket(T),
                x.stride(0), x.stride(1), sm_k, sm_r, 0, out.stride(0), out.stride(1))
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), triton.cdiv(R, block_r))
        _shrink_tuned[grid](*args, **common, **_SHRINK_META)
    else:
        row_idx, row0, blen, badapter = table
        args = (x, m, out, x, scales, row_idx, row0, blen, badapter,
                T, K, R, 0.0, 0.0, _bucket(T),
                x.stride(0), x.stride(1), sm_k, sm_r, stride_ma, out.stride(0), out.stride(1))
        _shrink_kernel[(blen.numel(), triton.cdiv(R, block_r))](*args, **common, **_BATCHED_SHRINK)
    return out


def _fused(x1, m1, x2, m2, bias, p=0.0, seed=None, table=None, stride_m2a=0):
    """``x1 [T, K1] @ m1 [K1, N] + mask? * (x2 [T, K2] @ m2 [K2, N]) / (1-p) (+ bias)``."""
    T, K1 = x1.shape
    N = m1.shape[1]
    K2 = x2.shape[1]
    out = _alloc((T, N), x1.device, x1.dtype)
    if T == 0:
        return out
    dropout = p > 0.0
    dummy = x1
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads BIAS + n (a strided view would be misread)
    sm2k, sm2n = m2.stride(-2), m2.stride(-1)
    common = dict(HAS_BIAS=bias is not None, DROPOUT=dropout, OFF64=T * N >= 2**31,
                  BATCHED=table is not None, BLOCK_K2=_block_k2(K2), **_flags(x1.dtype))
    row_idx, row0, blen, badapter = table if table is not None else (dummy,) * 4
    args = (x1, m1, x2, m2, bias if bias is not None else dummy, out,
            seed if dropout else dummy, row_idx, row0, blen, badapter,
            T, N, K1, K2, float(p), 1.0 / (1.0 - p), _bucket(T),
            x1.stride(0), x1.stride(1), m1.stride(0), m1.stride(1),
            x2.stride(0), x2.stride(1), sm2k, sm2n, stride_m2a, out.stride(0), out.stride(1))
    if table is None:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _fused_tuned[grid](*args, **common, **_FUSED_META)
    else:
        grid = (blen.numel(), triton.cdiv(N, _BATCHED_FUSED["BLOCK_N"]))
        _fused_kernel[grid](*args, **common, **_BATCHED_FUSED)
    return out


def _n_splits(T: int, M: int, N: int) -> tuple[int, int]:
    """(splits, rows per split) of the T reduction: enough programs to fill the GPU."""
    if INTERPRET:
        rows = 16  # several splits already at T = 17
    else:  # pragma: no cover - GPU only
        tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
        want = max(1, min(triton.cdiv(2 * 132, tiles), triton.cdiv(T, 512), 64))
        rows = triton.cdiv(triton.cdiv(T, want), 64) * 64
    return triton.cdiv(T, rows), rows


def _wgrad(x, y, out_dtype, scale=1.0, p=0.0, seed=None):
    """``scale * x [T, M]^T @ drop?(y [T, N])`` -> ``[M, N]`` in ``out_dtype`` (fp32 partials)."""
    T, M = x.shape
    N = y.shape[1]
    if T == 0:
        return torch.zeros((M, N), device=x.device, dtype=out_dtype)
    splits, rows = _n_splits(T, M, N)
    part = _alloc((splits, M, N), x.device, torch.float32)
    dropout = p > 0.0
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)
    _wgrad_tuned[grid](
        x, y, part, seed if dropout else x, T, M, N, rows, float(p), _bucket(T),
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), *part.stride(),
        DROPOUT=dropout, OFF64=T * N >= 2**31, **_flags(x.dtype), **_WGRAD_META,
    )
    total = part[0] if splits == 1 else part.sum(0)
    if scale != 1.0:
        total = total * scale
    return total.to(out_dtype)


# --------------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("attnkit::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
    lora_b: torch.Tensor, scaling: float, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LoRA forward on ``x [T, in]``: ``(y [T, out], su [T, r])``, ``su = s drop(x) A^T``.

    Dropout applies when ``seed`` (a one-element int64 tensor) is given and ``dropout_p > 0``.
    """
    p = dropout_p if seed is not None else 0.0
    su = _shrink(x, lora_a.t(), scaling / (1.0 - p), p, seed)  # [T, in] @ [in, r]
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
    p = dropout_p if seed is not None else 0.0
    gs = _shrink(dy, lora_b, scaling)  # s * dy B: [T, out] @ [out, r] -> [T, r]
    if need_dx:
        dx = _fused(dy, weight, gs, lora_a, None, p, seed)  # [dy | gs] @ [W ; A] -> [T, in]
    else:
        dx = dy.new_empty((0,))
    db = _wgrad(dy, su, lora_b.dtype)  # dy^T su: [out, T] @ [T, r]
    da = _wgrad(gs, x, lora_a.dtype, 1.0 / (1.0 - p), p, seed)  # gs^T drop(x): [r, T] @ [T, in]
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
    """``y [T, out] = x W^T + bias + s drop(x) A^T B^T`` for ``x [T, in]`` (validated inputs)."""
    y, _ = torch.ops.attnkit.lora_linear_fwd(
        x, weight, bias, lora_a, lora_b, float(scaling), float(dropout_p), seed
    )
    return y


# --------------------------------------------------------------------------------------------
# Multi-adapter batches (inference)
# --------------------------------------------------------------------------------------------


def _block_table(index: torch.Tensor, n_adapters: int, block_m: int):
    """Group rows by adapter into blocks of at most ``block_m`` rows of one adapter.

    Returns ``(row_idx [T] int32, blk_row0, blk_len, blk_adapter)`` (int32 per block); adapter
    ``-1`` (no adapter) is a group of its own. One host sync (the group sizes), as Punica's SGMV.
    """
    order = torch.argsort(index, stable=True).to(torch.int32)
    counts = torch.bincount(index.long() + 1, minlength=n_adapters + 1).tolist()
    row0, blen, badapter = [], [], []
    start = 0
    for slot, count in enumerate(counts):
        for off in range(0, count, block_m):
            row0.append(start + off)
            blen.append(min(block_m, count - off))
            badapter.append(slot - 1)
        start += count
    mk = lambda v: torch.tensor(v, dtype=torch.int32, device=index.device)
    return order, mk(row0), mk(blen), mk(badapter)


def lora_batched_triton(x, weight, bias, lora_as, lora_bs, scalings, index):
    """Each row its own adapter: ``y[t] = W x[t] + bias + s[i] B[i] A[i] x[t]``, ``i = index[t]``.

    ``x [T, in]``, ``weight [out, in]``, ``lora_as [n, r, in]``, ``lora_bs [n, out, r]``,
    ``scalings [n]`` fp32, ``index [T]`` int (``-1``: base layer only). Inference only.
    """
    T = x.shape[0]
    if T == 0:
        return x.new_empty((0, weight.shape[0]))
    table = _block_table(index, lora_as.shape[0], _BATCHED_FUSED["BLOCK_M"])
    m_a = lora_as.transpose(1, 2)  # [n, in, r]
    su = _shrink(x, m_a, 1.0, table=table, scales=scalings, stride_ma=m_a.stride(0))
    m_b = lora_bs.transpose(1, 2)  # [n, r, out]
    return _fused(x, weight.t(), su, m_b, bias, table=table, stride_m2a=m_b.stride(0))
