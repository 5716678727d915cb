"""The ``@triton.jit`` helpers the fused LoRA kernels (``op.py``) share: the dot with its
interpreter upcast, the dropout keep mask, and a program's row block."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_dot", "_keep", "_block_rows"]


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
