"""Tiles of the chunked linear-attention kernels: chunk, blocks, warps and the autotune wrapping.

Plain Python (no ``@triton.jit``; triton is imported only to wrap a kernel, so the backends can
read :data:`MAX_DIM` where triton is not installed): the chunk every kernel of a call shares, the
blocks of the split dims, the ``(num_warps, num_stages)`` each kernel is offered on a GPU, the
small tiles of the CPU interpreter, and the launch-time numerics switches (:func:`precision`,
:func:`upcast`).
"""

from __future__ import annotations

import torch

from ..autotune import first_only_if_asked
from ..dispatch import interpreting

__all__ = [
    "INTERPRET", "MAX_DIM", "CHUNK", "INTERPRET_BT", "INTERPRET_BLOCK", "TUNED", "pow2", "chunk",
    "split_block", "scan_block", "blocks", "autotuned", "precision", "upcast", "launch_strides",
    "launch_sizes", "launch_flags", "dense_state",
]

#: Read once, at import: Triton decides compiled vs interpreted when the kernels are decorated.
INTERPRET = interpreting()
#: The output and dv kernels hold all of F in one tile and dq/dk all of Dv: both are capped here.
MAX_DIM = 256

#: Tokens per chunk on a GPU: every kernel's row tile, so its products are M = 64 wgmma on sm_90
#: (64 x 128 bf16 operands at D = 128). One chunk size serves all the kernels of a call (it sets
#: the per-chunk state buffers), so it is fixed here, not tuned.
CHUNK = 64
# Under the interpreter: chunk 16 so that N = 17 or 100 spans several chunks, and 16-wide blocks
# so that F or Dv = 24..40 exercises the split over feature/value blocks.
INTERPRET_BT = 16
INTERPRET_BLOCK = 16
#: The scan kernel's flat block (numbers of a head's state per program) and chunks per step, on
#: a GPU / interpreted (4 chunks per step there, so N = 100 at chunk 16 (7 chunks) walks 2 steps, the last
#: one partial). 16 chunks per step: 16 sequential loads at N = 16k instead of 256.
SCAN_BLOCK, INTERPRET_SCAN_BLOCK = 128, 64
SCAN_CHUNKS, INTERPRET_SCAN_CHUNKS = 16, 4

# (num_warps, num_stages) offered to each autotuned kernel, the first the primary (what
# ATTNKIT_AUTOTUNE=0 runs and the compile tests hold to no spills). Blocks are derived from the
# dims (:data:`_BLOCKS`), not searched. Measured with ``attnkit compile-report --arch 90 --op
# linear_attention --first-only`` (bf16, causal, D = 128, registers / stack bytes, all wgmma):
# state 77/0, out 226/0, dq 206/0 at 4 warps; dk 128/0 and dv 181/0 at 8 warps (at 4 warps
# their decay + GQA variants spilled 8-32 B: the query-head loop keeps more tiles live).
TUNED = {
    "state": [(4, 2), (8, 2), (4, 3)],
    "out": [(4, 2), (8, 2), (8, 3)],
    "dq": [(4, 2), (8, 2), (8, 3)],
    "dk": [(8, 2), (4, 2), (8, 3)],
    "dv": [(8, 2), (4, 2), (8, 3)],
}
#: What a tuned config depends on (the autotuner benchmarks once per distinct key).
AUTOTUNE_KEY = ["F", "DV", "FEATURE", "NORMALIZE", "HAS_DECAY", "PRECISION", "GROUP", "VARLEN"]


def pow2(n: int) -> int:
    """The padded tile width of a dim of ``n``: a power of two, at least 16 (``tl.dot``'s)."""
    return max(16, 1 << (n - 1).bit_length())  # triton.next_power_of_2, floored at 16


def chunk() -> int:
    """The chunk (row tile) of a launch."""
    return INTERPRET_BT if INTERPRET else CHUNK


def split_block(width: int, held: int) -> int:
    """The block of a dim of ``width`` that a kernel splits over programs while it holds all of
    a dim of ``held`` (padded): 64, or 32 when the held dim is 256 (register budget), never more
    than the padded width; the interpreter's 16."""
    if INTERPRET:
        return min(pow2(width), INTERPRET_BLOCK)
    return min(pow2(width), 64 if pow2(held) <= 128 else 32)


def scan_block() -> tuple[int, int]:
    """``(BLOCK, BC)`` of the scan: numbers per program, chunks per step."""
    return (INTERPRET_SCAN_BLOCK, INTERPRET_SCAN_CHUNKS) if INTERPRET else (SCAN_BLOCK,
                                                                           SCAN_CHUNKS)


#: The blocks ``(BK, BV)`` each kernel is offered at ``(F, DV)``, the primary first: the split
#: dim's :func:`split_block`, the held dim padded whole; ``state`` splits both (its ``[BK, BV]``
#: local state is all it holds). dk also gets ``BK = 64`` at ``DV = 128`` as a second choice:
#: at 64 it spills on sm_80 (mma.sync keeps its operands in registers: 392 B at 4 warps, 336 B at
#: 8), at 32 on neither (sm_90: 160 registers, HGMMA), but recomputes its ``[BT, BT]`` scores
#: over ``DV`` for twice as many feature blocks; the autotuner picks.
_BLOCKS = {
    "state": lambda F, DV: [(split_block(F, 16), split_block(DV, 16))],
    "out": lambda F, DV: [(pow2(F), split_block(DV, F))],
    "dq": lambda F, DV: [(split_block(F, DV), pow2(DV))],
    "dk": lambda F, DV: list(dict.fromkeys([(min(split_block(F, DV), 32 if pow2(DV) >= 128
                                                 else 64), pow2(DV)),
                                            (split_block(F, DV), pow2(DV))])),
    "dv": lambda F, DV: [(pow2(F), split_block(DV, F))],
}
_WIDTHS = (16, 32, 64, 128, 256)


def blocks(which: str, F: int, DV: int) -> dict:
    """``{"BK", "BV", "BT"}``: the primary blocks of kernel ``which`` at ``(F, DV)`` (what the
    interpreter runs)."""
    bk, bv = _BLOCKS[which](F, DV)[0]
    return dict(BK=bk, BV=bv, BT=chunk())


def _pruner(which: str):
    """An ``early_config_prune`` keeping the configs whose blocks :data:`_BLOCKS` offers at the
    launch's ``F``/``DV``, in that order (Triton passes positional arguments as ``named_args``
    and keyword ones as ``kwargs``; the launchers pass everything by keyword)."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        offered = _BLOCKS[which](args["F"], args["DV"])
        kept = [(offered.index((c.kwargs["BK"], c.kwargs["BV"])), i, c)
                for i, c in enumerate(configs) if (c.kwargs["BK"], c.kwargs["BV"]) in offered]
        return [c for _, _, c in sorted(kept, key=lambda t: t[:2])]

    return prune


def autotuned(kernel, which: str):
    """``(kernel to launch, meta)`` for ``which`` (a key of :data:`TUNED`): on a GPU the kernel
    under ``triton.autotune`` over every block pair x its ``(num_warps, num_stages)``, pruned to
    the blocks offered at the launch's dims, so the compile report shows them (``meta`` ``None``:
    the configs set them; the grid reads them); under the interpreter the kernel itself and
    ``meta = blocks`` (the launcher passes them)."""
    if INTERPRET:
        return kernel, blocks
    import triton

    configs = [triton.Config(dict(BK=bk, BV=bv, BT=CHUNK), num_warps=w, num_stages=st)
               for bk in _WIDTHS for bv in _WIDTHS for w, st in TUNED[which]]
    keys = [k for k in AUTOTUNE_KEY if k in kernel.arg_names]
    prune = first_only_if_asked(_pruner(which))
    tuned = triton.autotune(configs, key=keys, prune_configs_by={"early_config_prune": prune})
    return tuned(kernel), None


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


# The launchers' keyword arguments (op.py), shared by the kernels.


def launch_strides(prefix: str, t: torch.Tensor) -> dict:
    """``{prefix + "b": ..., "h", "n", "d"}``: the strides of a ``[B, H, N, D]`` tensor under the
    kernels' parameter names (``sqb, sqh, sqn, sqd`` for ``"sq"``)."""
    axes = "bhnd"
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
