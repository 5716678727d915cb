"""Backends declare what they support; one dispatch rule for every op.

A backend is a class with **declared capabilities** (:class:`Backend`'s class attributes: the
kind of kernel, dtypes, head dims, autograd, query length, packing, the kernel specs it walks) and
a ``run(call)``. :meth:`Backend.not_supported_reasons` derives plain-English reasons from those
declarations for a validated call (empty = it can run the call); only what cannot be declared
(pointer alignment, building the CUDA extension) stays in :meth:`Backend.extra_reasons`.

Every op (attention, linear attention, LoRA) dispatches through :func:`select_backend` with its
own priority tuple, under one rule for ``"auto"``:

* take the first backend, in priority order, with no reasons;
* a Triton backend never takes CPU tensors under ``"auto"`` (the CPU interpreter is for tests and
  far slower than torch): only an explicit ``backend="triton"`` runs it there;
* when a CUDA tensor lands on the torch backend, say so once through :mod:`warnings`.

An explicit backend that cannot run the call raises one ``ValueError`` listing every reason.
``ATTNKIT_BACKEND``, when set, replaces ``"auto"`` (for an op that lacks the named backend it
keeps ``"auto"``).

What a call must offer (each op's call dataclass has these attributes; ``None`` = not
applicable): ``tensor`` (the main input: its device and dtype decide), ``head_dim``,
``needs_grad``, ``queries`` (query rows per sequence), ``packed`` (``cu_seqlens`` given),
``spec_kind`` (``"band"`` or ``"block_sparse"``), ``grid`` (``(sequences, heads)`` a kernel puts
on its grid's z and y axes).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

__all__ = [
    "Backend", "select_backend", "triton_available", "interpreting", "tensor_device_reason",
    "TRITON_DTYPES", "GRID_AXIS_MAX", "grid_reason", "dtype_names", "check_backend_name",
    "QueryCall", "DispatchPlan",
]


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once, at import (a path lookup; triton itself is not imported): torch 2.11's dynamo
# refuses to trace ``importlib.util.find_spec``, so a per-call lookup broke
# ``torch.compile(fullgraph=True)`` there.
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


def dtype_names(dtypes: tuple) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


class QueryCall:
    """Mixin for calls whose main tensor is ``q [B, H, N, D]``: the dispatch's ``tensor`` and
    ``head_dim`` (its last dim)."""

    @property
    def tensor(self) -> torch.Tensor:
        return self.q

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]


class Backend:
    """A way to compute an op: declared capabilities plus :meth:`run`.

    Subclasses set the class attributes below; ``None`` means "no limit". The reasons are derived
    in :meth:`not_supported_reasons`, in a fixed order, from these declarations only.
    """

    #: The name users pass as ``backend=``.
    name: str = ""
    #: ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"cuda"``
    #: (attnkit's CUDA C++ kernels: CUDA tensors, eager mode) or ``"torch"`` (any device).
    kind: str = "torch"
    #: Dtypes computed in; ``None`` = any floating dtype.
    dtypes: tuple | None = None
    #: Head dims (or ranks, for LoRA) accepted: an exact set, or an upper bound.
    head_dims: tuple | None = None
    max_head_dim: int | None = None
    #: What :attr:`max_head_dim` bounds, for the message ("head dim", "rank", ...).
    head_dim_name: str = "head dim"
    #: Whether calls that need gradients can run here.
    supports_grad: bool = True
    #: Most query rows per sequence (decode kernels); ``None`` = any.
    max_queries: int | None = None
    #: Whether packed sequences (``cu_seqlens``) are accepted.
    packed: bool = True
    #: Kernel spec kinds walked (``"band"``, ``"block_sparse"``); ``None`` = the op has no specs.
    spec_kinds: tuple | None = None
    #: Whether the kernel's grid puts (sequences, heads) on y/z (65535 each).
    grid_limited: bool = False
    #: Whether values may have their own head dim (``Dv != D``); :attr:`max_head_dim` bounds both.
    value_head_dims: bool = False
    #: Score modifications computed (``"softcap"``, ``"sinks"``, ``"alibi"``); a call that uses
    #: another one is refused with its name.
    score_mods: tuple = ()

    def device_reason(self, t: torch.Tensor) -> str | None:
        """Why this kind of kernel cannot take a tensor on ``t``'s device (``None``: it can)."""
        if self.kind == "triton":
            return triton_available() or tensor_device_reason(t)
        if self.kind == "cuda" and not t.is_cuda:
            return f"tensors are on {t.device}; the CUDA kernels need CUDA tensors"
        return None

    def special_reasons(self, call) -> list[str]:
        """Cheap reasons that cannot be declared as attributes (checked with the declared ones)."""
        return []

    def extra_reasons(self, call) -> list[str]:
        """Costly or untraceable checks (pointer alignment, building the CUDA extension): run
        only once every declared and special reason passed."""
        return []

    def not_supported_reasons(self, call) -> list[str]:
        reasons = self.declared_reasons(call) + self.special_reasons(call)
        if not reasons:
            reasons += self.extra_reasons(call)
        return reasons

    def declared_reasons(self, call) -> list[str]:
        """The reasons the class attributes give, in a fixed order."""
        return list(self._declared(call))

    def fits(self, call) -> bool:
        """``not self.not_supported_reasons(call)``, stopping at the first reason (the dispatch's
        hot path: a backend passed over needs no message)."""
        if type(self).not_supported_reasons is not Backend.not_supported_reasons:
            return not self.not_supported_reasons(call)  # a subclass's own rule
        for _ in self._declared(call):
            return False
        return not self.special_reasons(call) and not self.extra_reasons(call)

    def _declared(self, call):
        """:meth:`declared_reasons`, one at a time."""
        where = self.device_reason(call.tensor)
        if where:
            yield where
        yield from self._fixed_reasons(call)
        over = self._grid_reason(call)
        if over:
            yield over

    def _grid_reason(self, call) -> str | None:
        if not self.grid_limited:
            return None
        grid = getattr(call, "grid", None)
        if grid is None or (grid[0] <= GRID_AXIS_MAX and grid[1] <= GRID_AXIS_MAX):
            return None  # the common case, without the message's list
        return grid_reason(*grid)

    def _fixed_reasons(self, call):
        """The declared reasons that depend on nothing but the call's signature (its dtype, head
        dims, query count, packing, autograd need, spec kind, score modifications) and this
        class's attributes: the device (environment, the interpreter switch) and the grid limit
        (a module constant tests patch) are left out. :class:`DispatchPlan` relies on this split."""
        t = call.tensor
        if self.dtypes is not None and t.dtype not in self.dtypes:
            yield (f"dtype {t.dtype} is not supported ({dtype_names(self.dtypes)} are)")
        dim = getattr(call, "head_dim", None)
        if dim is not None and self.head_dims is not None and dim not in self.head_dims:
            yield (f"{self.head_dim_name} {dim} is not supported "
                   f"({', '.join(map(str, self.head_dims))} are)")
        if dim is not None and self.max_head_dim is not None and dim > self.max_head_dim:
            yield (f"{self.head_dim_name} {dim} is above the maximum of {self.max_head_dim}")
        dv = getattr(call, "value_dim", None)
        if dv is not None and dim is not None and dv != dim:
            if not self.value_head_dims:
                yield (f"values with their own head dim (Dv = {dv}, D = {dim}) are not "
                       f"supported by the {self.name!r} {type(self).__name__} backend")
            elif self.max_head_dim is not None and dv > self.max_head_dim:
                yield (f"value head dim {dv} is above the maximum of {self.max_head_dim}")
        if getattr(call, "packed", False) and not self.packed:
            yield (f"packed sequences (cu_seqlens) are not supported by the {self.name!r} "
                   "backend; pass a padded batch with a valid_keys mask")
        queries = getattr(call, "queries", None)
        if (queries is not None and self.max_queries is not None and queries > self.max_queries
                and not getattr(call, "packed", False)):
            yield (f"{queries} query tokens per sequence is not decoding (the {self.name!r} "
                   f"{type(self).__name__} backend takes at most {self.max_queries}; prefill "
                   "goes to a flash kernel)")
        if getattr(call, "needs_grad", False) and not self.supports_grad:
            yield (f"the {self.name!r} backend has no backward (inference only)")
        kind = getattr(call, "spec_kind", None)
        if kind is not None and self.spec_kinds is not None and kind not in self.spec_kinds:
            yield (f"{kind} patterns are not supported ({', '.join(self.spec_kinds)} are)")
        missing = [m for m in getattr(call, "score_mods", ()) if m not in self.score_mods]
        if missing:
            have = ", ".join(self.score_mods) or "none"
            yield (f"score modification(s) {', '.join(missing)} not supported by the "
                   f"{self.name!r} {type(self).__name__} backend (it has: {have})")

    def auto_reasons(self, call) -> list[str]:
        """Reasons to pass this backend over under ``"auto"``: the above, and for Triton, CPU
        tensors (the interpreter only runs when asked for by name)."""
        reasons = self.not_supported_reasons(call)
        if self.kind == "triton" and call.tensor.device.type == "cpu":
            reasons.append("CPU tensors go to the torch backend under 'auto' (ask for 'triton' "
                           "explicitly to run the kernels in the interpreter)")
        return reasons

    def run(self, call):  # pragma: no cover - interface
        raise NotImplementedError


_warned: set[tuple[str, str]] = set()


def check_backend_name(requested: object, backends: tuple[Backend, ...], what: str = "backend") -> str:
    """``requested`` if it is ``"auto"`` or one of ``backends``' names, else a ``TypeError`` /
    ``ValueError`` naming the accepted values (so a module can refuse a bad name when it is built,
    not at its first forward)."""
    if not isinstance(requested, str):
        raise TypeError(f"{what} must be a str, got {type(requested).__name__}")
    choices = ("auto", *dict.fromkeys(b.name for b in backends))
    if requested not in choices:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))}, got {requested!r}")
    return requested


def select_backend(call, requested: str, backends: tuple[Backend, ...], op: str) -> Backend:
    """Pick the backend for ``call`` among ``backends`` (in ``"auto"``'s priority order).

    ``requested`` is ``"auto"`` or a backend name (several backends may share a name, e.g. the
    Triton flash and Triton decode kernels are both ``"triton"``: the first that fits is taken).
    """
    requested = _resolve(requested, backends)
    # Backends passed over are asked only whether they fit (Backend.fits stops at the first
    # reason); the reasons themselves are gathered only for a message.
    if requested != "auto":
        named = [b for b in backends if b.name == requested]
        for backend in named:
            if backend.fits(call):
                return backend
        # Same-name entries go from special (decode shapes) to general: the last one's reasons
        # are the ones that matter to the caller.
        raise ValueError(
            f"the {requested!r} backend cannot run this {op} call: "
            + "; ".join(named[-1].not_supported_reasons(call))
        )
    for i, backend in enumerate(backends):
        if _fits_auto(backend, call):
            if backend.kind == "torch" and call.tensor.is_cuda:
                _warn_slow_path(op, backend, _rejected(backends[:i], call))
            return backend
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in _rejected(backends, call).items())
    raise ValueError(f"no attnkit backend can run this {op} call ({detail})")


def _resolve(requested: object, backends: tuple[Backend, ...]) -> str:
    """The backend name a request stands for (``ATTNKIT_BACKEND`` replaces ``"auto"``), or the
    ``TypeError`` / ``ValueError`` for a bad one."""
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a str, got {type(requested).__name__}")
    choices = _choices(backends)
    if requested == "auto":
        requested = os.environ.get("ATTNKIT_BACKEND", "auto") or "auto"
        if requested not in choices and requested in ("cuda", "triton", "torch"):
            # ATTNKIT_BACKEND is global; an op without that backend (linear attention has no
            # "cuda" for prefill) keeps its own "auto" rather than failing a call that named none.
            requested = "auto"
    if requested not in choices:
        raise ValueError(f"backend must be one of {', '.join(map(repr, choices))}, got {requested!r}")
    return requested


class DispatchPlan:
    """:func:`select_backend`'s choice for every call of one *signature*, replayed cheaply.

    A backend whose fixed reasons (:meth:`Backend._fixed_reasons`: dtype, head dims, queries,
    autograd, spec kind, score modifications, packing) refuse the signature can never take a
    call of it, so it is dropped once. The others stay in priority order and are asked per call
    only what can change between calls of one signature: the device check (the environment,
    ``TRITON_INTERPRET``, patched checks), the grid limit, and their special and extra reasons
    (pointer alignment, the CUDA extension). A backend with its own ``fits`` /
    ``not_supported_reasons`` / ``auto_reasons`` rule is asked in full. :meth:`select` gives the
    backend ``select_backend`` would pick, or ``None`` where the full dispatch must speak (an
    error, or the once-only warning for a CUDA tensor on the torch backend).

    ``requested`` is the resolved name (``ATTNKIT_BACKEND`` applied): the caller keys its cache
    on the environment variable for ``"auto"``."""

    __slots__ = ("candidates", "auto")

    def __init__(self, call, requested: str, backends: tuple[Backend, ...]):
        self.auto = auto = requested == "auto"
        cpu = call.tensor.device.type == "cpu"
        candidates = []
        for b in backends:
            if not auto and b.name != requested:
                continue
            cls = type(b)
            opaque = (cls.not_supported_reasons is not Backend.not_supported_reasons
                      or cls.fits is not Backend.fits or cls._declared is not Backend._declared
                      or cls.declared_reasons is not Backend.declared_reasons
                      or (auto and cls.auto_reasons is not Backend.auto_reasons))
            if opaque:
                candidates.append((b, True))
            elif auto and b.kind == "triton" and cpu:
                continue  # the interpreter only runs when asked for by name
            elif next(b._fixed_reasons(call), None) is None:
                candidates.append((b, False))
        self.candidates = tuple(candidates)

    def select(self, call) -> Backend | None:
        auto = self.auto
        for b, opaque in self.candidates:
            if opaque:
                ok = _fits_auto(b, call) if auto else b.fits(call)
            else:
                ok = (not b.device_reason(call.tensor) and not b._grid_reason(call)
                      and not b.special_reasons(call) and not b.extra_reasons(call))
            if ok:
                if auto and b.kind == "torch" and call.tensor.is_cuda:
                    return None  # select_backend warns (once)
                return b
        return None


_CHOICES: dict[tuple, tuple[str, ...]] = {}


def _choices(backends: tuple[Backend, ...]) -> tuple[str, ...]:
    """``("auto", *names)``, remembered per backends tuple (a plain dict, not ``lru_cache``: dynamo
    warns about tracing through the latter under ``torch.compile``)."""
    choices = _CHOICES.get(backends)
    if choices is None:
        choices = _CHOICES[backends] = ("auto", *dict.fromkeys(b.name for b in backends))
    return choices


def _fits_auto(backend: Backend, call) -> bool:
    """``not backend.auto_reasons(call)``, stopping at the first reason."""
    if type(backend).auto_reasons is not Backend.auto_reasons:
        return not backend.auto_reasons(call)  # a subclass's own rule
    if backend.kind == "triton" and call.tensor.device.type == "cpu":
        return False
    return backend.fits(call)


def _rejected(backends, call) -> dict[str, list[str]]:
    """Why each of ``backends`` was passed over under "auto", by name (for a message)."""
    rejected: dict[str, list[str]] = {}
    for backend in backends:
        seen = rejected.setdefault(backend.name, [])
        seen += [r for r in backend.auto_reasons(call) if r not in seen]
    return rejected


def _warn_slow_path(op: str, backend: Backend, rejected: dict[str, list[str]]) -> None:
    """A CUDA tensor on the torch backend: say once (per op and reason) why Triton was passed."""
    why = "; ".join(rejected.get("triton", [])) or "; ".join(
        f"{n}: {', '.join(r)}" for n, r in rejected.items())
    key = (op, why)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"attnkit.{op}: using the slower {backend.name!r} backend because the 'triton' backend "
        f"cannot run this call: {why}",
        stacklevel=4,
    )
