"""How the flash backward gets dQ: fused into the dK/dV pass (atomics) or by its own kernel.

* **fused** (the default): every dK/dV program adds its ``dS @ K`` contribution to an fp32 dQ
  accumulator with ``tl.atomic_add`` (:func:`~.kernels_bwd._bwd_dkdv_kernel` with
  ``FUSE_DQ``), then one elementwise pass scales and casts it. 5 matmuls per (query tile, key
  block) pair instead of 7, as FlashAttention-2/3 do; the sums run in whatever order the
  programs reach the accumulator, so dQ can differ in the last bits from run to run (dK, dV and
  dsinks never do: each is written by one program).
* **deterministic**: dK/dV first, then the separate dQ kernel (:mod:`.kernels_dq`), which
  recomputes ``Q K^T`` and ``dO V^T``: slower, and bitwise identical on every run.

Block-sparse calls always take the deterministic kernels: the fused kernel's nested list walk
spills (measured 464 B at 32 x 128, 208 B at 16 x 128, sm_90 bf16 D = 128).

The deterministic mode is used when PyTorch was asked for determinism
(``torch.use_deterministic_algorithms(True)``, the switch PyTorch's own atomic-based kernels such
as ``index_add_`` on CUDA follow) or when ``ATTNKIT_DETERMINISTIC=1`` is set; it is read at each
backward call. The fused kernel's autotuner restores the accumulator after each benchmarked
config (``restore_value``), so tuning does not add into it.
"""

from __future__ import annotations

import os

import torch

from ..autotune import autotuned
from .kernels_bwd import _bwd_dkdv_kernel
from .tiles import _AUTOTUNE_KEY, _BWD_DKDV_TILES, INTERPRET, _configs, _prune

__all__ = ["ENV", "deterministic_backward"]

#: Set to ``1`` to force the deterministic backward (``0`` or unset: follow PyTorch's setting).
ENV = "ATTNKIT_DETERMINISTIC"


def deterministic_backward() -> bool:
    """True when the flash backward must be bitwise reproducible: PyTorch's
    ``torch.are_deterministic_algorithms_enabled()`` (``warn_only`` included) or
    ``ATTNKIT_DETERMINISTIC=1``."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV}={value!r}: accepted are '1' (deterministic backward), '0' or unset "
                         "(follow torch.are_deterministic_algorithms_enabled())")
    return value == "1" or torch.are_deterministic_algorithms_enabled()


def _sparse_small_first(prune):
    """``prune``, then for a block-sparse call the tiles of 64 or more query rows last: the nested
    list walk spills at 64 x 128 (measured 280 B, sm_90 bf16 D = 128, key mask), while the 16-row
    tile it was tuned with fits (72 B)."""

    def pruned(configs, named_args, **kwargs):
        kept = list(prune(configs, named_args, **kwargs))
        if kwargs.get("SPARSE", False):
            kept.sort(key=lambda c: c.kwargs["BLOCK_M"] >= 64)  # stable: list order otherwise
        return kept

    return pruned


def _make_bwd(kernel, tiles, restore_value=None):
    """``kernel`` under an autotuner like :func:`~.tiles._make`'s (same configs and prune, plus
    :func:`_sparse_small_first`); ``restore_value``: accumulators the kernel adds into, restored
    after each benchmarked config so that tuning does not add into them."""
    if INTERPRET:
        return kernel
    key = [k for k in _AUTOTUNE_KEY if k in kernel.arg_names]
    extra = {"restore_value": restore_value} if restore_value else {}
    return autotuned(kernel, _configs(tiles), key=key, prune=_sparse_small_first(_prune), **extra)


#: Tiles of the fused dK/dV/dQ kernel, as in :mod:`.tiles` ``(BLOCK_M, BLOCK_N, warps, stages, max
#: BLOCK_D)``. Measured (triton 3.9, bf16, D = 128): 32 x 128 w8/s1 0 spill on sm_90 for every
#: band case of the compile report (220-250 regs) and 96 B on sm_80 with a window and key mask;
#: w8/s2 (prefetched loads) 0-16 B on sm_90 but 144 B on sm_80, so it comes second, for the
#: autotuner. Their dQ product has M = 32 (mma.sync). 64 x 128 spills: w8/s1 64 B dense / 120 B
#: causal, w8/s2 296 / 232 B (the dQ tile and the atomics' operands do not fit beside the 128
#: registers of dK/dV accumulators with pointer loads).
_BWD_DKDVQ_TILES = [
    (32, 128, 8, 1, 128), (32, 128, 8, 2, 128), (64, 128, 8, 1, 128), (16, 128, 8, 2, 128),
    (32, 64, 4, 3, 128), (64, 64, 8, 3, 64), (64, 128, 8, 3, 64), (16, 32, 8, 2, 256),
    (16, 64, 4, 2, 256),
]

#: The dK/dV kernel that also accumulates dQ (launched with ``FUSE_DQ=True``).
_dkdv_fused = _make_bwd(_bwd_dkdv_kernel, _BWD_DKDVQ_TILES, restore_value=["DQ"])
#: The deterministic mode's dK/dV kernel (``FUSE_DQ=False``), on :mod:`.tiles`' list.
_dkdv_split = _make_bwd(_bwd_dkdv_kernel, _BWD_DKDV_TILES)
