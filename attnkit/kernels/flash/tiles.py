"""Tile configurations and the autotuned flash kernels.

Under ``TRITON_INTERPRET`` (the CPU tests) the kernels run as they are, with one fixed tile; on a
GPU each runs under ``triton.autotune`` over its tile list, pruned per call by :func:`_prune`.
"""

from __future__ import annotations

import os

import torch
import triton

from ..autotune import autotuned
from .kernels_dq import _bwd_dq_kernel
from .kernels_fwd import _fwd_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------

# Predicates of a launch's flags (``f``: its constexprs, ``f["ELEM"]`` the operand size in bytes)
# for tiles that compile spill-free only on some paths (sm_90, triton 3.9, bf16 D = 128,
# `attnkit compile-report`; benchmarks/NOTES.md "Hopper forward / dQ"; D <= 64 has more room).


def _wide_ok(f) -> bool:
    """128x128 w8 s2: 255 regs, 0 B stack dense with whole key tiles (one loop) and causal; with a
    left edge, a key mask, a score mod, varlen (48 B) or a ragged dense tail (88 B) it spills."""
    if f["ELEM"] != 2 or f["VARLEN"] or f["HAS_LEFT"] or f["HAS_KPM"] or f["SPARSE"]:
        return False
    if f["HAS_SOFTCAP"] or f["HAS_ALIBI"]:
        return False
    return f["HAS_RIGHT"] or f["NK_ALIGN"] % 128 == 0


def _wide3_ok(f) -> bool:
    """128x128 w8 s3 (the tutorial's H100 tile): 254 regs, 0 B only on the one-loop dense path."""
    return _wide_ok(f) and not f["HAS_RIGHT"]


def _s3_spills(f) -> bool:
    """Where 128x64 w8 s3 spills and s2 does not, so s2 goes first: ALiBi with a window, 48 B
    (fwd) / 40 B (dQ), s2 222 / 249 regs; a left band edge without a key mask (a plain
    SlidingWindow, the hybrid's window part), 48 B fwd at 255 regs, s2 229 / 0 (with a key mask,
    or soft-capping, s3 is 252 / 0 and 255 / 0 and stays first)."""
    return f["HAS_ALIBI"] or (f["HAS_LEFT"] and not f["HAS_KPM"] and not f["SPARSE"]
                              and not f["HAS_SOFTCAP"])


def _tma_wide(f) -> bool:
    """The fused dK/dV/dQ kernel's 64 x 128 w8/s1 tile: 0 spill (sm_90a, bf16, D = 128) when q/dO
    load and dQ adds through TMA, except with soft-capping (136 B); with pointers 64-120 B
    (bwd_fused.py)."""
    return f["USE_TMA"] and not f["HAS_SOFTCAP"] and not f["SPARSE"]


# (BLOCK_M, BLOCK_N, num_warps, num_stages, largest BLOCK_D the tile is offered for[, predicate]).
# Chosen from Hopper compiles (`python -m attnkit.kernels.compile_check`): the first tile of each
# list compiles for sm_90 at its largest head dim with no register spill and within shared
# memory, which tests/kernels/test_compile_check.py asserts; the others are alternatives for the
# autotuner (some spill a little, which only costs speed). A predicate offers a tile only on the
# paths where it was measured not to spill. Timings: benchmarks/NOTES.md.
_FWD_TILES = [
    (128, 128, 8, 3, 128, _wide3_ok), (128, 128, 8, 2, 128, _wide_ok), (128, 64, 8, 2, 128, _s3_spills),
    (128, 64, 8, 3, 128), (128, 128, 8, 3, 64), (128, 128, 8, 2, 64), (128, 64, 8, 4, 64),
    (128, 64, 4, 3, 64), (64, 64, 4, 3, 128), (128, 32, 8, 3, 128), (64, 32, 8, 2, 256),
    (32, 32, 4, 2, 256),
]
_BWD_DKDV_TILES = [  # BLOCK_M is the inner (query) loop here, BLOCK_N the program's key block
    # The deterministic backward's dK/dV (no dQ): 64 x 128 w8/s1 compiles with 0 spill at bf16
    # D = 128 on sm_90 (248 regs dense, 32 B causal; 2 stages spill 144-184 B); with TMA q/dO
    # loads (bwd_fused.use_tma) 238-255 regs and 0 spill on every band case but soft-capping
    # (8 B). The fused dK/dV/dQ kernel has its own list (bwd_fused.py).
    # Block-sparse calls get the 64-row tiles last (bwd_fused._sparse_small_first): their list
    # walk spills 280 B at 64 x 128 w8/s1, 72 B at 16 x 128 w8/s2 (the first for them).
    (64, 128, 8, 1, 128), (16, 128, 8, 2, 128), (32, 128, 8, 2, 128), (32, 64, 4, 3, 128),
    (64, 64, 8, 3, 64), (64, 128, 8, 3, 64), (16, 32, 8, 2, 256), (16, 64, 4, 2, 256),
]
_BWD_DQ_TILES = [  # 128x128 spills 96-104 B in dQ even dense (measured): not offered at D = 128
    (128, 64, 8, 2, 128, _s3_spills), (128, 64, 8, 3, 128), (128, 128, 8, 3, 64), (64, 64, 4, 3, 128),
    (128, 32, 8, 3, 128), (32, 32, 4, 2, 256), (64, 32, 8, 2, 256),
]
# Offered only to block-sparse calls whose layout block size the larger tiles do not divide
# (16, 48, 80, ...): a tile must never straddle two layout blocks.
_SPARSE_SMALL_TILES = [(16, 16, 4, 2, 256), (32, 16, 4, 2, 256), (16, 32, 4, 2, 256)]
# Under TRITON_INTERPRET (CPU tests) one small tile, with BLOCK_M != BLOCK_N so that the tests
# exercise blocks that straddle the band's diagonal differently for rows and columns.
_INTERPRET_TILE = (32, 16, 4, 1)

_AUTOTUNE_KEY = [
    "HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "HAS_KPM", "VARLEN", "N_BUCKET", "PRECISION", "SPARSE", "BS",
    "HAS_SOFTCAP", "HAS_ALIBI", "HAS_SINKS", "NK_ALIGN", "USE_TMA",
]

#: The flags tile predicates read (absent ones count as off).
_PREDICATE_FLAGS = ("HAS_LEFT", "HAS_RIGHT", "HAS_KPM", "VARLEN", "SPARSE", "HAS_SOFTCAP", "HAS_ALIBI",
                    "USE_TMA")


def _prune(configs, named_args, **kwargs):
    """Offer each tile only up to its head dim (bigger head dims overflow registers/shared memory;
    fp32 operands take twice the shared memory, so they get the tiles of twice the head dim), only
    on the paths its predicate allows, and to a block-sparse call only tiles that divide its
    layout block size."""
    # the wider of the two head dims (values may have their own) decides the tile
    block_d = max(kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64)),
                  kwargs.get("BLOCK_DV", named_args.get("BLOCK_DV", 0)))
    q = named_args.get("Q", kwargs.get("Q"))
    elem = q.element_size() if q is not None else 2
    if elem == 4:
        block_d *= 2
    flags = {n: bool(kwargs.get(n, named_args.get(n, False))) for n in _PREDICATE_FLAGS}
    flags.update(ELEM=elem, NK_ALIGN=int(kwargs.get("NK_ALIGN", named_args.get("NK_ALIGN", 1))))
    bs = kwargs.get("BS", 0) if kwargs.get("SPARSE", False) else 0
    if bs:
        fitting = [c for c in configs
                   if bs % c.kwargs["BLOCK_M"] == 0 and bs % c.kwargs["BLOCK_N"] == 0]
    else:
        fitting = [c for c in configs if not c.sparse_only]
    keep, seen = [], set()
    for c in fitting:
        tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        if block_d <= c.max_block_d and (c.offer is None or c.offer(flags)) and tile not in seen:
            seen.add(tile)
            keep.append(c)
    # Past every tile's head-dim limit (fp32 at D = 256) the smallest fitting tile still runs.
    plain = [c for c in fitting if c.offer is None] or fitting
    return keep or [min(plain, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _configs(tiles) -> list:
    """Autotuner configs of a tile list (plus the sparse-only small tiles), carrying what
    :func:`_prune` reads: ``max_block_d``, ``offer`` (the predicate or None), ``sparse_only``."""
    configs = []
    for i, (bm, bn, w, s, max_d, *offer) in enumerate(tiles + _SPARSE_SMALL_TILES):
        config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        config.max_block_d = max_d
        config.offer = offer[0] if offer else None
        config.sparse_only = i >= len(tiles)
        configs.append(config)
    return configs


def _make(kernel, tiles):
    """The kernel under the autotuner (on a GPU) or as it is (the interpreter: one fixed tile)."""
    if INTERPRET:
        return kernel
    key = [k for k in _AUTOTUNE_KEY if k in kernel.arg_names]  # HAS_SINKS: forward only
    return autotuned(kernel, _configs(tiles), key=key, prune=_prune)


_fwd = _make(_fwd_kernel, _FWD_TILES)
_dq = _make(_bwd_dq_kernel, _BWD_DQ_TILES)


def _tile_meta(block_size: int) -> dict:
    """Explicit tiles under the interpreter (no autotuning there); a block-sparse layout's block
    size must be a multiple of both tile sides."""
    if not INTERPRET:
        return {}
    bm, bn = _INTERPRET_TILE[:2]
    if block_size:
        bm, bn = (bm if block_size % bm == 0 else 16), (bn if block_size % bn == 0 else 16)
    return {"BLOCK_M": bm, "BLOCK_N": bn}


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows PyTorch's matmul precision setting (TF32 unless "highest"), like torch.matmul."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _n_bucket(n: int) -> int:
    return min(max(triton.next_power_of_2(max(n, 1)), 64), 1 << 17)
