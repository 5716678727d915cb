"""The benchmark registry: kinds of work, the implementations that do it, and one point of a sweep.

A :class:`Kind` is one op with fixed semantics ("causal attention", "fused LoRA"): it knows its
FLOPs and bytes. An :class:`Impl` is one way to compute it (attnkit, an SDPA backend,
FlexAttention, PEFT, ...): given a :class:`Point` it builds a :class:`Workload`, or raises
:class:`Unavailable` saying why it cannot run here. Adding a kind or a baseline is one
:func:`register_kind` / :func:`register_impl` call (see ``kinds/``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

__all__ = [
    "Point", "Workload", "Impl", "Kind", "Unavailable", "KINDS", "register_kind", "register_impl",
    "DTYPES",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Unavailable(Exception):
    """An implementation cannot run this point here; the message says why (row status "skipped")."""


@dataclass(frozen=True)
class Point:
    """One measurement: a kind, an implementation, a mode and the shapes.

    Attention kinds use ``batch, heads, n, d``; LoRA uses ``batch * n`` tokens of width
    ``hidden`` and ``rank`` (``d = 0``).
    """

    kind: str
    impl: str
    mode: str
    batch: int
    heads: int
    n: int
    d: int
    dtype: str
    device: str
    hidden: int = 0
    rank: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def series(self) -> tuple:
        """Everything but ``n``: the points of one line in a plot."""
        return (self.kind, self.impl, self.mode, self.batch, self.heads, self.d, self.dtype,
                self.device, self.hidden, self.rank)


@dataclass
class Workload:
    """A built call: ``fn()`` computes the forward and returns its output tensor; ``params`` are
    the tensors whose gradients backward computes (cleared between timed calls)."""

    fn: Callable[[], torch.Tensor]
    params: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class Impl:
    """One implementation of a kind. ``build(point, requires_grad)`` returns a :class:`Workload`
    with fresh inputs or raises :class:`Unavailable`. ``predict_bytes(point)`` is a rough upper
    bound on the memory one call needs, used only to refuse CPU points over the memory cap.
    ``tier`` orders a sweep: attnkit (0) first, then plain baselines (1), then those with a long
    set-up such as torch.compile (2), so a time budget cuts the least informative rows."""

    name: str
    build: Callable[[Point, bool], Workload]
    baseline: bool
    predict_bytes: Callable[[Point], float] | None = None
    tier: int = 1


@dataclass
class Kind:
    """One op. ``flops(point)`` / ``bytes(point)`` count the point's mode. ``expected_slope`` is
    the log-log slope of time against N the design predicts (2 for dense, 1 for banded/linear)."""

    name: str
    op: str
    description: str
    flops: Callable[[Point], float]
    bytes: Callable[[Point], float]
    expected_slope: float
    uses_head_dim: bool = True
    impls: dict[str, Impl] = field(default_factory=dict)


#: Registered kinds by name, in registration order (the order of tables and plots).
KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    if kind.name in KINDS:
        raise ValueError(f"benchmark kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def register_impl(kind_name: str, impl: Impl) -> Impl:
    if kind_name not in KINDS:
        raise ValueError(f"unknown benchmark kind {kind_name!r}; registered: {', '.join(KINDS)}")
    KINDS[kind_name].impls[impl.name] = impl
    return impl
