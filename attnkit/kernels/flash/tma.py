"""When the flash forward may load K/V through TMA tensor descriptors, and Triton's allocator.

``tl.make_tensor_descriptor`` (triton >= 3.4; 3.6 on the GPU machine, 3.9 here) builds the
descriptor inside the kernel; on sm_90 it is written to a global scratch buffer that Triton
allocates at launch through ``triton.set_allocator`` (a context variable: per thread). The
forward's launcher calls :func:`ensure_allocator` before a TMA launch, which installs a torch
allocator only when none is set, so a user's own allocator is kept.

TMA needs every non-last stride and the base address 16-byte aligned and the last stride 1;
:func:`tma_ok` checks that per call (a view that breaks it takes the pointer loads, which are
the same computation). ``ATTNKIT_TMA=0`` turns TMA off.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # private (where Triton keeps the per-thread allocator); absent -> no TMA
    from triton.runtime import _allocation
except ImportError:  # pragma: no cover - old triton
    _allocation = None

AVAILABLE = (hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
             and _allocation is not None and hasattr(_allocation, "_allocator"))


def _torch_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _unset(current) -> bool:
    null_type = getattr(_allocation, "NullAllocator", None)
    return current is getattr(_allocation, "_NULL_ALLOCATOR", object()) or (
        null_type is not None and isinstance(current, null_type))


def ensure_allocator() -> None:
    """Install a torch allocator for Triton's launch-time scratch if this thread has none (a
    user's own allocator is kept)."""
    if _unset(_allocation._allocator.get()):
        triton.set_allocator(_torch_alloc)


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether TMA descriptors can address every tensor (``[B, H, N, D]``): 2-byte elements,
    last stride 1, other strides and the base 16-byte aligned. (The device is not checked: the
    Triton forward runs on CUDA tensors, and the compile report's CPU stand-ins must see the
    launch a GPU would make.)"""
    if not AVAILABLE or os.environ.get("ATTNKIT_TMA", "1").strip() == "0":
        return False
    for t in tensors:
        es = t.element_size()
        if es != 2 or t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((s * es) % 16 for s in t.stride()[:-1]):
            return False
    return True
