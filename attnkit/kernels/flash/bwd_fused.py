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

**TMA.** Both kernels are launched through :class:`_TmaLaunch`, which sets the kernel's
``USE_TMA`` per call (:func:`use_tma`): band walks with 2-byte, descriptor-addressable q and dO
(and a fused accumulator whose rows are 16-byte multiples) load q/dO through tensor descriptors
and add dQ with one TMA reduce per tile. That frees the registers the pointer loads and atomics
held: the fused 64 x 128 w8/s1 tile compiles with 0 spill (sm_90a, bf16, D = 128; 64 / 120 B
dense / causal with pointers), so it is offered first on that path (:mod:`.tiles`).
"""

from __future__ import annotations

import os

import torch

from ..autotune import autotuned
from .kernels_bwd import _bwd_dkdv_kernel
from .tiles import _AUTOTUNE_KEY, _BWD_DKDV_TILES, INTERPRET, _configs, _prune, _tma_wide
from .tma import ensure_allocator, tma_ok

__all__ = ["ENV", "deterministic_backward", "use_tma"]

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


def use_tma(kwargs: dict) -> bool:
    """Whether a dK/dV launch (its keyword arguments) takes the TMA path: not under the
    interpreter (it has no TMA reduce), not block-sparse (the list walk keeps pointer loads), q
    and dO descriptor-addressable (:func:`~.tma.tma_ok`: 2-byte elements, last stride 1, 16-byte
    aligned base and strides, ``ATTNKIT_TMA`` not 0) and, fused, the fp32 accumulator's rows a
    multiple of 16 bytes: ``D % 4 == 0``, since the launcher allocates it contiguous
    ``[B, Hq, Nq + 128, D]`` with ``torch.zeros``. Host cost: one :func:`~.tma.tma_ok` (measured
    ~6 us on the loaded 2-core CI machine; the forward pays the same for K/V)."""
    if INTERPRET or kwargs.get("SPARSE", False):
        return False
    dq = kwargs.get("DQ")
    if dq is not None and dq.shape[-1] % 4:
        return False
    return tma_ok(kwargs["Q"], kwargs["DO"])


class _TmaLaunch:
    """``kernel[grid](**kwargs)`` with ``USE_TMA`` added from :func:`use_tma` (and Triton's
    allocator installed for the device-side descriptors when it is on), and the same for
    ``kernel.run(grid=..., ...)``. The backward's launcher (``launch.py``) calls the kernels by
    keyword; ``use_tma`` is looked up at each call (a test may replace it)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda **kwargs: self.run(grid=grid, warmup=False, **kwargs)

    def run(self, **kwargs):
        """What ``kernel[grid](...)`` calls (``grid=``, ``warmup=`` among the keywords): the
        cached launch plan (``launch.FlashPlan``) launches through it."""
        tma = use_tma(kwargs)
        if tma:
            ensure_allocator()
        return self.kernel.run(USE_TMA=tma, **kwargs)

    def __getattr__(self, name):
        return getattr(self.kernel, name)


#: Tiles of the fused dK/dV/dQ kernel, as in :mod:`.tiles` ``(BLOCK_M, BLOCK_N, warps, stages, max
#: BLOCK_D[, predicate])``. Measured (triton 3.9, sm_90a, bf16, D = 128, regs / spill B):
#: * 64 x 128 w8/s1 with TMA (``_tma_wide``): dense 247 / 0, causal 254 / 0, window+kpm 254 / 0,
#:   varlen 246 / 0, window+sinks+alibi 255 / 0; soft-capping spills (136 B), so it is not offered
#:   there. With pointer loads it spills 64 B dense / 120 B causal (and w8/s2 296 / 232 B).
#: * 32 x 128 w8/s1: 0 spill on sm_90 for every band case (220-250 regs; 202-230 with TMA) and
#:   96 B on sm_80 with a window and key mask; w8/s2 (prefetched loads) 0-16 B on sm_90 but 144 B
#:   on sm_80, so it comes after. Their dQ product has M = 32 (mma.sync).
_BWD_DKDVQ_TILES = [
    (64, 128, 8, 1, 128, _tma_wide), (32, 128, 8, 1, 128), (32, 128, 8, 2, 128), (64, 128, 8, 1, 128),
    (16, 128, 8, 2, 128), (32, 64, 4, 3, 128), (64, 64, 8, 3, 64), (64, 128, 8, 3, 64),
    (16, 32, 8, 2, 256), (16, 64, 4, 2, 256),
]

#: The dK/dV kernel that also accumulates dQ (launched with ``FUSE_DQ=True``).
_dkdv_fused = _TmaLaunch(_make_bwd(_bwd_dkdv_kernel, _BWD_DKDVQ_TILES, restore_value=["DQ"]))
#: The deterministic mode's dK/dV kernel (``FUSE_DQ=False``), on :mod:`.tiles`' list.
_dkdv_split = _TmaLaunch(_make_bwd(_bwd_dkdv_kernel, _BWD_DKDV_TILES))
