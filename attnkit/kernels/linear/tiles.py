"""Tiles of the linear-attention kernels: the tables, their selection and the autotune wrapping.

Plain Python (no ``@triton.jit``; triton is imported only to wrap a kernel, so the backends can
read :data:`MAX_DIM` where triton is not installed): which ``(BT, BV, num_warps, num_stages)`` a
launch is offered on a GPU, the single small tile of the CPU interpreter, the feature blocks of
the backward, and the launch-time numerics switches (:func:`precision`, :func:`upcast`).
"""

from __future__ import annotations

import torch

from ..autotune import first_only_if_asked
from ..dispatch import interpreting

__all__ = [
    "INTERPRET", "MAX_DIM", "FWD_TILES", "DQ_TILES", "DKDV_TILES", "INTERPRET_BLOCK", "pow2",
    "fwd_tiles", "bwd_tiles", "dq_block", "dkdv_block", "feature_block", "autotuned", "precision",
    "upcast", "launch_strides", "launch_sizes", "launch_flags", "dense_state",
]

#: Read once, at import: Triton decides compiled vs interpreted when the kernels are decorated.
INTERPRET = interpreting()
#: The forward holds all of F in one tile and the backward all of Dv: both are capped here.
MAX_DIM = 256

# Tiles by size class: each entry ends with the largest padded width it is meant for (``BK`` =
# pow2(F) in the forward, ``BV`` = pow2(Dv) in the backward); a launch is offered the entries of
# the smallest class that holds it, in order, so the first entry is the primary config. Chosen
# from ahead-of-time sm_90 compiles (``python -m attnkit.kernels.compile_check --module linear``,
# bf16, numbers in the comments: registers / stack bytes): the fp32 state, the fp32 feature tiles
# and the chunk products are all register-resident, so the wide tiles of the first version
# (chunk 64 x value block 64 at 4 warps, backward chunk 64) spilled 360 B (forward) to 1.9 KB
# (dk/dv) per thread at D = 128. Not yet timed on a GPU (benchmarks/NOTES.md).
# Forward (BT, BV, num_warps, num_stages, class of BK).
FWD_TILES = [
    # F <= 64: 240/0, 208/0, 215/0, 252/0
    (64, 64, 4, 2, 64), (64, 64, 8, 2, 64), (64, 32, 4, 2, 64), (32, 64, 4, 2, 64),
    (64, 128, 8, 2, 64),
    # F = 128: 235/0, 237/0, 242/0, 250/0 (64x64 at 4 warps: 360 B of stack)
    (64, 32, 8, 2, 128), (64, 32, 8, 1, 128), (16, 64, 8, 2, 128), (64, 16, 4, 2, 128),
    # F = 256: all spill a little (smallest: 32 B at 16x16)
    (16, 16, 8, 2, 256), (16, 32, 8, 2, 256), (32, 16, 8, 2, 256),
]
# dq (BT, num_warps, num_stages, class of BV); feature block :func:`dq_block`.
DQ_TILES = [
    (32, 4, 2, 64), (32, 8, 2, 64), (64, 8, 2, 64), (16, 8, 2, 64),  # 189/0 132/0 250/0 126/0
    (32, 8, 2, 128), (16, 8, 2, 128),  # 171/0 134/0 (chunk 64: 144 B of stack)
    (16, 8, 2, 256), (32, 8, 2, 256),  # 200 B, 408 B of stack
]
# dk/dv (BT, num_warps, num_stages, class of BV); feature block :func:`dkdv_block`. The reverse
# walk holds dS [BK, BV], the dk and dv accumulators and four chunk products at once, so it takes
# chunk 16 and a narrower feature block as Dv grows (chunk 64 at BK 64 spilled 1.9 KB at D = 128).
DKDV_TILES = [
    (16, 8, 1, 64), (16, 8, 2, 64), (16, 4, 2, 64),  # BK 64: 214/0 216/0 254/0
    (16, 8, 2, 128), (16, 8, 1, 128), (16, 4, 1, 128),  # BK 32: 232/0 220/0 254/0
    (16, 8, 1, 256), (16, 8, 2, 256),  # BK 16: 8 B, 24 B of stack
]
# Under the interpreter one small tile: chunk 16 so that N = 17 or 100 spans several chunks, and
# 16-wide blocks so that F or Dv = 24 or 32 exercises the split over value/feature blocks.
INTERPRET_BT = 16
INTERPRET_BLOCK = 16
#: What a tuned config depends on (the autotuner benchmarks once per distinct key).
AUTOTUNE_KEY = ["F", "DV", "FEATURE", "CAUSAL", "NORMALIZE", "PRECISION", "GROUP"]


def pow2(n: int) -> int:
    """The padded tile width of a dim of ``n``: a power of two, at least 16 (``tl.dot``'s)."""
    return max(16, 1 << (n - 1).bit_length())  # triton.next_power_of_2, floored at 16


def _size_class(width: int, tiles) -> int:
    """The smallest class (last field of a tile) that holds ``width`` (the largest if none)."""
    classes = sorted({t[-1] for t in tiles})
    return next((c for c in classes if width <= c), classes[-1])


def fwd_tiles(F: int, Dv: int) -> list[tuple]:
    """Forward tiles offered at ``(F, Dv)``: the class of ``BK = pow2(F)``, ``BV <= pow2(Dv)``."""
    cls = _size_class(pow2(F), FWD_TILES)
    tiles = [t for t in FWD_TILES if t[-1] == cls]
    return [t for t in tiles if t[1] <= pow2(Dv)] or tiles[-1:]


def bwd_tiles(tiles, Dv: int) -> list[tuple]:
    """Backward tiles (``DQ_TILES`` or ``DKDV_TILES``) offered at ``Dv`` (class of pow2(Dv))."""
    cls = _size_class(pow2(Dv), tiles)
    return [t for t in tiles if t[-1] == cls]


def dq_block(F: int, Dv: int) -> int:
    """dq's feature block ``BK`` on a GPU (F above it is split over programs)."""
    return min(pow2(F), 64 if pow2(Dv) <= 128 else 32)


def dkdv_block(F: int, Dv: int) -> int:
    """dk/dv's feature block ``BK`` on a GPU; with more than one block dv sums fp32 partials."""
    bv = pow2(Dv)
    return min(pow2(F), 64 if bv <= 64 else 32 if bv <= 128 else 16)


def feature_block(rule, F: int, Dv: int) -> int:
    """The ``BK`` a backward launch takes: ``rule`` (:func:`dq_block` or :func:`dkdv_block`) on a
    GPU, the interpreter's 16 (or less) on the CPU so that F = 24..40 spans several blocks."""
    return min(pow2(F), INTERPRET_BLOCK) if INTERPRET else rule(F, Dv)


def _config_tile(c) -> tuple:
    return tuple(c.kwargs[k] for k in ("BT", "BV") if k in c.kwargs) + (c.num_warps, c.num_stages)


def _pruner(offered):
    """An ``early_config_prune`` keeping the configs whose tile ``offered(args)`` lists. Triton
    passes the positional arguments as ``named_args`` and the keyword ones as ``kwargs``; the
    launchers pass everything by keyword, so both are read."""

    def prune(configs, named_args, **kwargs):
        keep = {t[:-1] for t in offered({**named_args, **kwargs})}
        return [c for c in configs if _config_tile(c) in keep] or configs[-1:]

    return prune


_OFFERED = {
    "fwd": (FWD_TILES, ("BT", "BV"), lambda a: fwd_tiles(a["F"], a["DV"])),
    "dq": (DQ_TILES, ("BT",), lambda a: bwd_tiles(DQ_TILES, a["DV"])),
    "dkdv": (DKDV_TILES, ("BT",), lambda a: bwd_tiles(DKDV_TILES, a["DV"])),
}


def autotuned(kernel, which: str):
    """``(kernel to launch, its tile meta-parameters)`` for ``which`` in ``"fwd"``, ``"dq"``,
    ``"dkdv"``: on a GPU the kernel under ``triton.autotune`` over its table (no meta: the configs
    set them); under the interpreter the kernel itself with the one small tile."""
    import triton

    tiles, names, offered = _OFFERED[which]
    if INTERPRET:
        small = (INTERPRET_BT, INTERPRET_BLOCK)[: len(names)]
        return kernel, dict(zip(names, small, strict=True))
    configs = [
        triton.Config(dict(zip(names, t[: len(names)], strict=True)), num_warps=t[len(names)],
                      num_stages=t[len(names) + 1])
        for t in dict.fromkeys(t[:-1] for t in tiles)
    ]
    prune = first_only_if_asked(_pruner(offered))
    tuned = triton.autotune(configs, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune})
    return tuned(kernel), {}


def precision(dtype: torch.dtype) -> str:
    """The ``PRECISION`` of fp32 dots: fp32 follows PyTorch's matmul precision (TF32 unless
    "highest"), like torch.matmul; the interpreter always multiplies exactly."""
    if INTERPRET or (dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"):
        return "ieee"
    return "tf32"


def upcast(dtype: torch.dtype) -> bool:
    """The ``UPCAST`` flag: the CPU interpreter's bf16 dot is wrong, so bf16 dots multiply the
    (bf16-rounded) operands in fp32 there."""
    return INTERPRET and dtype == torch.bfloat16


# The launchers' keyword arguments (op.py), shared by the three kernels.


def launch_strides(prefix: str, t: torch.Tensor) -> dict:
    """``{prefix + "b": ..., "h", "n", "d"}``: the strides of a ``[B, H, N, D]`` tensor under the
    kernels' parameter names (``sqb, sqh, sqn, sqd`` for ``"sq"``); a 5-d dv buffer adds "k"."""
    axes = "bhnd" if t.dim() == 4 else "kbhnd"
    return {prefix + a: s for a, s in zip(axes, t.stride(), strict=True)}


def launch_sizes(q, k, v) -> dict:
    """The size arguments every kernel takes."""
    B, Hq, N, F = q.shape
    Hkv = k.shape[1]
    return dict(HQ=Hq, HKV=Hkv, GROUP=Hq // Hkv, N=N, F=F, DV=v.shape[3])


def launch_flags(q, feature, causal, normalize) -> dict:
    return dict(FEATURE=feature, CAUSAL=causal, NORMALIZE=normalize,
                PRECISION=precision(q.dtype), UPCAST=upcast(q.dtype))


def dense_state(s0, z0):
    """The kernels index a state as a dense ``[B, HKV, F, DV]`` block (``None`` stays None)."""
    return (None, None) if s0 is None else (s0.contiguous(), z0.contiguous())
