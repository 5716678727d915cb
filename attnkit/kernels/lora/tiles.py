"""Tiles, autotuning and launch geometry of the fused LoRA kernels (``op.py``).

Everything here is plain Python (no ``@triton.jit``): which tiles each kernel is offered, how
the autotuner prunes them, the one place that decides between the interpreter's fixed tile and
the GPU's autotuned ones (:func:`autotuned`), the per-dtype kernel flags, and the launch
geometry (token buckets, rank tiles, weight-gradient splits, the multi-adapter block table).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import triton

from ..autotune import first_only_if_asked

__all__ = ["INTERPRET", "Tuning", "FUSED", "SHRINK", "WGRAD", "autotuned", "kernel_flags", "block_table",
           "max_blocks"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Fused GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the usual H100/A100 GEMM shapes
# (128x128 and 128x64 with K 32/64). Not yet measured by us on a GPU (benchmarks/NOTES.md).
# 128x256 (last, so ATTNKIT_AUTOTUNE=0 keeps 128x128): ahead-of-time sm_90 bf16/fp16 compiles
# take 188 (fwd) / 178 (dx) registers at r = 16, 213 / 193 at r = 64, no spill, 144 KiB shared
# memory; sm_80 240 / 252, no spill. fp32 (shared memory) and dropout prune it.
_FUSED_TILES = [
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4), (128, 64, 32, 4, 4), (64, 64, 64, 4, 3), (64, 64, 32, 4, 4),
    (128, 256, 64, 8, 3),
]
#: ``EVEN_K`` of the fused kernel: ``K1`` a multiple of this, which every offered BLOCK_K
#: (and the interpreter's 16, and the batched 64) divides, whatever tile the autotuner picks.
EVEN_K_MULTIPLE = 64
assert all(EVEN_K_MULTIPLE % k == 0 for _, _, k, _, _ in _FUSED_TILES)
#: ``PREFETCH_K2``: ranks up to this (one BLOCK_K2 step) load the expand's operands before the
#: base loop; at 32 they are [BM, 32] + [32, BN] bf16, 32 more registers a thread at 128x256.
PREFETCH_MAX_K2 = 32
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
_BATCHED_FUSED = (dict(_INTERPRET_FUSED) if INTERPRET else
                  dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3))
_BATCHED_SHRINK = (dict(_INTERPRET_SHRINK) if INTERPRET else
                   dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3))


def _fits_smem(bm, bn, bk, stages, elem):
    return (bm + bn) * bk * elem * max(stages - 1, 1) <= 160 * 1024


def _prune_fused(configs, named_args, **kwargs):
    # The launchers pass every argument by keyword, and Triton hands positional ones in
    # ``named_args`` and keyword ones in ``kwargs``: read both.
    args = {**named_args, **kwargs}
    elem = args["X1"].element_size()
    dropout = args.get("DROPOUT", False)
    keep = [c for c in configs if _fits_smem(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                             c.kwargs["BLOCK_K"], c.num_stages, elem)
            and (not dropout or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= _DROPOUT_MAX_TILE)]
    return keep or configs[-1:]


def _prune_wgrad(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    m, n = args["M"], args["N"]
    elem = args["X"].element_size()
    keep = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))
        and c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(n))
        and _fits_smem(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_T"],
                       c.num_stages, elem)
    ]
    return keep or configs[:1]


@dataclass(frozen=True)
class Tuning:
    """How one kernel is tuned: GPU ``configs`` keyed by ``key`` and pruned by ``prune``
    (``None``: keep all), or, under the interpreter, the one fixed tile ``interpret``."""

    configs: list = field(repr=False)
    key: list[str]
    prune: Callable | None
    interpret: dict


FUSED = Tuning(
    [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w,
                   num_stages=s) for m, n, k, w, s in _FUSED_TILES],
    ["T_BUCKET", "N", "K1", "K2", "DROPOUT", "HAS_BIAS"], _prune_fused, _INTERPRET_FUSED,
)
SHRINK = Tuning(
    [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s)
     for m, k, w, s in _SHRINK_TILES],
    ["T_BUCKET", "K", "R", "DROPOUT"], None, _INTERPRET_SHRINK,
)
WGRAD = Tuning(
    [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_T": t}, num_warps=w, num_stages=s)
     for m, n, t, w, s in _WGRAD_TILES],
    ["T_BUCKET", "M", "N", "DROPOUT"], _prune_wgrad, _INTERPRET_WGRAD,
)


def autotuned(kernel, tuning: Tuning) -> tuple[object, dict]:
    """``(launchable, meta)``: the kernel wrapped in Triton's autotuner on a GPU (``meta`` empty:
    the autotuner picks the tiles), the bare kernel and its fixed tile under the interpreter,
    which has no autotuner worth running. The one ``if INTERPRET`` of the autotuned launches, so
    that both branches always define the same names."""
    if INTERPRET:
        return kernel, dict(tuning.interpret)
    prune = {"early_config_prune": first_only_if_asked(tuning.prune)}
    return triton.autotune(tuning.configs, key=tuning.key, prune_configs_by=prune)(kernel), {}


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows PyTorch's matmul precision (TF32 unless "highest"), like torch.matmul."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def kernel_flags(dtype: torch.dtype) -> dict:
    """``PRECISION``/``UPCAST`` of ``_dot`` for operands of ``dtype`` (``UPCAST``: bf16 under
    the interpreter, which has no bf16 dot)."""
    return dict(PRECISION=_precision(dtype), UPCAST=INTERPRET and dtype == torch.bfloat16)


def _bucket(t: int) -> int:
    """Token-count bucket for the autotune key: training batches vary T, tiles need not."""
    return min(max(triton.next_power_of_2(max(t, 1)), 256), 1 << 16)


def _block_k2(r: int) -> int:
    """K tile of the fused GEMM's rank loop."""
    return min(max(16, triton.next_power_of_2(r)), 64)


def _block_r(r: int) -> int:
    """Rank tile of the shrink's output."""
    return min(max(16, triton.next_power_of_2(r)), 64)


def _n_splits(T: int, M: int, N: int) -> tuple[int, int]:
    """(splits, rows per split) of the weight gradients' T reduction: enough programs to fill
    the GPU."""
    if INTERPRET:
        rows = 16  # several splits already at T = 17
    else:  # pragma: no cover - GPU only
        tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
        want = max(1, min(triton.cdiv(2 * 132, tiles), triton.cdiv(T, 512), 64))
        rows = triton.cdiv(triton.cdiv(T, want), 64) * 64
    return triton.cdiv(T, rows), rows


def max_blocks(T: int, n_adapters: int, block_m: int) -> int:
    """Upper bound on :func:`block_table`'s block count, from shapes alone (no host sync): each of
    the ``n_adapters + 1`` groups adds at most one partial block to the ``T // block_m`` full ones,
    and no block is empty, so there are never more blocks than rows."""
    return min(T, T // block_m + n_adapters + 1)


def block_table(index: torch.Tensor, n_adapters: int, block_m: int):
    """Group rows by adapter into blocks of at most ``block_m`` rows of one adapter, on
    ``index``'s device with torch ops only: no host sync and no host-to-device copy.

    ``index [T]`` int in ``[-1, n_adapters)``; a value outside that range is grouped with ``-1``
    (the base layer alone), so a bad index (which the caller flags, ``lora_batched``) can never
    make a kernel read outside the adapter stacks. Returns ``(row_idx [T], blk_row0 [NB],
    blk_len [NB], blk_adapter [NB])`` int32 with ``NB = max_blocks(T, n_adapters, block_m)``: the
    grid size has to be known on the host before the group sizes are, so the table is padded.
    The real blocks come first, in adapter order (-1 first), each group's rows in their original
    order; the padding blocks have length 0 and adapter -1 (their programs exit at once).
    """
    T = index.shape[0]
    G = n_adapters + 1  # groups: slot 0 is adapter -1
    dev = index.device
    index = index.long()
    slot = torch.where((index >= -1) & (index < n_adapters), index + 1, 0)  # [T] in [0, G)
    order = torch.argsort(slot, stable=True)
    # scatter_add_, not bincount: CUDA's bincount reads the input's max on the host
    counts = torch.zeros(G, dtype=torch.int64, device=dev).scatter_add_(0, slot, torch.ones_like(slot))
    row_start = torch.cumsum(counts, 0) - counts  # [G] first sorted row of each group
    nblk = (counts + block_m - 1) // block_m  # [G]
    blk_end = torch.cumsum(nblk, 0)  # [G] one past each group's last block
    j = torch.arange(max_blocks(T, n_adapters, block_m), dtype=torch.int64, device=dev)
    g = torch.searchsorted(blk_end, j, right=True)  # group of block j (G: padding)
    real = g < G
    g = g.clamp(max=G - 1)
    local = j - (blk_end[g] - nblk[g])  # block number inside its group
    row0 = row_start[g] + local * block_m
    blen = torch.where(real, (counts[g] - local * block_m).clamp(0, block_m), 0)
    badapter = torch.where(real, g - 1, -1)
    i32 = lambda t: t.to(torch.int32)
    return i32(order), i32(torch.where(real, row0, 0)), i32(blen), i32(badapter)
