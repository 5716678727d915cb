"""Backends declare what they support; dispatch takes the first that fits.

Each backend answers :meth:`Backend.not_supported_reasons` for a validated call with a list of
plain-English reasons (empty = it can run the call). ``backend="auto"`` walks :data:`PRIORITY` and
takes the first backend with no reasons; an explicit backend that cannot run the call raises one
``ValueError`` listing every reason. The ``ATTNKIT_BACKEND`` environment variable, when set,
replaces ``"auto"``.

If ``"auto"`` lands on a slower backend than the device would normally get (a CUDA tensor on the
torch backend), it says so once through :mod:`warnings`.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

from .inputs import AttentionCall

__all__ = [
    "Backend", "BACKENDS", "PRIORITY", "select_backend", "triton_available", "interpreting",
    "tensor_device_reason", "interpreter_reasons", "triton_reasons", "TRITON_DTYPES",
    "GRID_AXIS_MAX", "grid_reason",
]


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once, at import (a path lookup, triton itself is not imported): torch 2.11's dynamo
# refuses to trace ``importlib.util.find_spec``, so calling it per call broke
# ``torch.compile(fullgraph=True)`` around ``attnkit.attention`` there (found by running the
# suite on torch 2.11; torch 2.13 traced it).
_TRITON_MISSING = (
    "triton is not installed (it ships for Linux: pip install triton)"
    if importlib.util.find_spec("triton") is None else None
)


def triton_available() -> str | None:
    """``None`` if Triton can be used here, else the reason it cannot."""
    return _TRITON_MISSING


def tensor_device_reason(t: torch.Tensor) -> str | None:
    """Why a Triton kernel cannot take a tensor on this device, or ``None`` if it can."""
    if t.is_cuda:
        return None
    if t.device.type == "cpu" and interpreting():
        return None
    return (
        f"tensors are on {t.device}; Triton kernels need CUDA tensors "
        "(or TRITON_INTERPRET=1 to run them slowly on the CPU)"
    )


#: What every Triton kernel in attnkit computes in.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: CUDA caps a grid's y and z extents at 65535; the flash and linear-attention kernels put the
#: heads on y and the batch rows (or packed sequences) on z.
GRID_AXIS_MAX = 65535


def grid_reason(sequences: int, heads: int) -> str | None:
    """Why the kernels' grid cannot hold ``sequences`` x ``heads`` (``None``: it can)."""
    over = [f"{n} {what}" for n, what in ((sequences, "sequences"), (heads, "heads"))
            if n > GRID_AXIS_MAX]
    if not over:
        return None
    return (f"{' and '.join(over)} is above CUDA's grid limit of {GRID_AXIS_MAX} per axis; "
            "split the batch")


def triton_reasons(t: torch.Tensor, dtypes: tuple = TRITON_DTYPES) -> list[str]:
    """Why a Triton kernel cannot take ``t``: triton missing, the device, the dtype."""
    reasons = []
    missing = triton_available()
    if missing:
        reasons.append(missing)
    where = tensor_device_reason(t)
    if where:
        reasons.append(where)
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        reasons.append(f"dtype {t.dtype} is not supported ({names} are)")
    return reasons


def interpreter_reasons(t: torch.Tensor) -> list[str]:
    """``"auto"`` never sends CPU tensors to the (slow) Triton interpreter; only an explicit
    ``backend="triton"`` does."""
    if t.device.type == "cpu":
        return ["CPU tensors go to the torch backend under 'auto' (ask for 'triton' explicitly "
                "to run the kernels in the interpreter)"]
    return []


class Backend:
    """A way to compute an op. Subclasses set :attr:`name` and implement the two methods."""

    name: str = ""

    def not_supported_reasons(self, call) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def auto_reasons(self, call) -> list[str]:
        """Reasons to pass this backend over under ``"auto"`` (a superset of the above)."""
        return self.not_supported_reasons(call)

    def run(self, call):  # pragma: no cover - interface
        raise NotImplementedError


#: Largest query length that takes the split-KV decode kernel (no-grad calls): below it a flash
#: query tile would be mostly padding, and one sequence could not fill the GPU.
DECODE_MAX_NQ = 16


class TritonBackend(Backend):
    """The Triton flash kernel family (``attnkit/kernels/flash.py``), and the split-KV decode
    kernel (``attnkit/kernels/decode.py``) for short no-grad queries."""

    name = "triton"
    dtypes = TRITON_DTYPES
    max_head_dim = 256

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = triton_reasons(call.q, self.dtypes)
        if call.head_dim > self.max_head_dim:
            reasons.append(f"head dim {call.head_dim} is above the maximum of {self.max_head_dim}")
        cu = call.cu_seqlens_q
        grid = grid_reason(call.q.shape[0] if cu is None else cu.numel() - 1, call.q.shape[1])
        if grid and self._decodes(call):
            grid = None  # the decode kernel puts (batch, KV head) on the grid's x axis
        if grid:
            reasons.append(grid)
        return reasons

    @staticmethod
    def _decodes(call: AttentionCall) -> bool:
        """Whether :meth:`run` sends this call to the split-KV decode kernel."""
        if call.q.shape[2] > DECODE_MAX_NQ or call.cu_seqlens_q is not None or call.needs_grad:
            return False
        from ..kernels.decode import decode_not_supported_reasons

        return not decode_not_supported_reasons(call.q, call.k, call.pattern)

    def auto_reasons(self, call: AttentionCall) -> list[str]:
        return self.not_supported_reasons(call) + interpreter_reasons(call.q)

    def run(self, call: AttentionCall):
        if self._decodes(call):
            from ..kernels.decode import decode_attention

            return decode_attention(call.q, call.k, call.v, call.pattern, call.scale,
                                    call.valid_keys)
        from ..kernels.flash import flash_attention

        return flash_attention(
            call.q, call.k, call.v, call.pattern, call.scale, call.valid_keys,
            call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q, call.max_seqlen_k,
        )


class TorchBackend(Backend):
    """Chunked pure-PyTorch attention (``attnkit/kernels/reference.py``): any device, any D."""

    name = "torch"

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        return []

    def run(self, call: AttentionCall):
        from ..kernels.reference import attention_torch
        from .block_sparse import BlockSparse

        if isinstance(call.pattern, BlockSparse):
            from ..kernels.block_sparse_reference import block_sparse_attention_torch

            varlen = call.cu_seqlens_q is not None
            nq = call.max_seqlen_q if varlen else call.q.shape[2]
            nk = call.max_seqlen_k if varlen else call.k.shape[2]
            return block_sparse_attention_torch(
                call.q, call.k, call.v, call.pattern.compile(nq, nk, call.q.device), call.scale,
                call.valid_keys, call.cu_seqlens_q, call.cu_seqlens_k,
            )
        return attention_torch(
            call.q, call.k, call.v, call.pattern, call.scale, call.valid_keys,
            call.cu_seqlens_q, call.cu_seqlens_k,
        )


_warned: set[tuple[str, str]] = set()


def select_backend(
    call,
    requested: str,
    backends: dict[str, Backend] | None = None,
    priority: tuple[str, ...] | None = None,
    op: str = "attention",
    prefers: Callable[[object], str | None] | None = None,
) -> Backend:
    """Pick the backend for ``call``.

    ``requested`` is ``"auto"`` or a backend name. ``prefers(call)`` names the backend the device
    would normally get (default: ``"triton"`` for CUDA tensors); when ``"auto"`` picks another one
    it warns once per (op, reason).
    """
    backends = BACKENDS if backends is None else backends
    priority = PRIORITY if priority is None else priority
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a str, got {type(requested).__name__}")
    choices = ("auto", *backends)
    if requested == "auto":
        requested = os.environ.get("ATTNKIT_BACKEND", "auto") or "auto"
        if requested not in choices and requested in ("cuda", "triton", "torch"):
            # ATTNKIT_BACKEND is global; an op without that backend (linear attention has no
            # "cuda") keeps its own "auto" rather than failing a call that never named one.
            requested = "auto"
    if requested not in choices:
        raise ValueError(f"backend must be one of {', '.join(map(repr, choices))}, got {requested!r}")
    if requested != "auto":
        backend = backends[requested]
        reasons = backend.not_supported_reasons(call)
        if reasons:
            raise ValueError(
                f"the {requested!r} backend cannot run this {op} call: " + "; ".join(reasons)
            )
        return backend
    rejected = {}
    for name in priority:
        reasons = backends[name].auto_reasons(call)
        if not reasons:
            expected = prefers(call) if prefers else _default_preference(call)
            if expected and expected != name and expected in rejected:
                key = (op, "; ".join(rejected[expected]))
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(
                        f"attnkit.{op}: using the slower {name!r} backend because the "
                        f"{expected!r} backend cannot run this call: {key[1]}",
                        stacklevel=3,
                    )
            return backends[name]
        rejected[name] = reasons
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected.items())
    raise ValueError(f"no attnkit backend can run this {op} call ({detail})")


def _default_preference(call) -> str | None:
    q = getattr(call, "q", None)
    return "triton" if isinstance(q, torch.Tensor) and q.is_cuda else None


from .cuda_backend import CudaDecodeBackend  # noqa: E402 - it subclasses Backend, defined above

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (CudaDecodeBackend(), TritonBackend(), TorchBackend())
}
#: The order ``"auto"`` tries backends in; "cuda" takes only decode-shaped GPU calls.
PRIORITY: tuple[str, ...] = ("cuda", "triton", "torch")
