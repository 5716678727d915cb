"""Attention patterns: typed, immutable descriptions of which keys each query may see.

Positions are bottom-right aligned, as in flash-attention and transformers: with ``Nq`` queries and
``Nk`` keys, query ``i`` sits at key position ``i + (Nk - Nq)``. A band pattern is then two
optional offsets around that position:

    key j is visible to query i  iff  p - left <= j <= p + right,   p = i + Nk - Nq

``left = None`` / ``right = None`` mean "no limit on that side":

=====================  ============  =============
pattern                left          right
=====================  ============  =============
``Dense()``            None          None
``Causal()``           None          0
``SlidingWindow(l, r)``  l           r
=====================  ============  =============

Every pattern compiles to one kernel spec (:meth:`Pattern.compile`: a ``Band`` here, block lists
for :class:`~attnkit.BlockSparse`), which says which keys a block of queries touches and how many
(query, key) pairs it visits. The Triton kernels, the torch backend, the decode kernels, the
benchmarks' FLOP counts and the tests' oracle all consume that spec
(``attnkit/kernels/flash/spec.py``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..kernels.flash.spec import Band, KernelSpec

__all__ = ["Pattern", "BandPattern", "Dense", "Causal", "SlidingWindow", "as_pattern"]


class Pattern:
    """Base class of attention patterns: anything that compiles to a kernel spec.

    A pattern is a frozen dataclass whose :meth:`compile` returns the spec the kernels walk
    (:class:`~attnkit.kernels.flash.spec.Band` or
    :class:`~attnkit.kernels.flash.spec.BlockLists`). A subclass that does not say how it
    compiles is refused (``TypeError``) by :func:`attnkit.attention`, never run as Dense.
    """

    @property
    def kind(self) -> str:
        """A short name for logs, ids and autotuning keys: ``dense``, ``causal``, ``window``..."""
        return type(self).__name__.lower()

    def compile(self, nq: int, nk: int, device: torch.device | str = "cpu") -> KernelSpec:
        """The kernel spec of this pattern for ``nq`` queries and ``nk`` keys."""
        raise TypeError(
            f"{type(self).__name__} is a Pattern subclass attnkit cannot compile to a kernel spec: "
            "subclass Dense, Causal, SlidingWindow or BlockSparse (or build one with "
            "from_mask_fn), or implement compile(nq, nk, device) returning a Band or BlockLists"
        )

    def check_call(self, batch: int, q_heads: int, nq: int, nk: int, same_packing: bool) -> None:
        """Raise ``ValueError`` if the pattern cannot serve a call of this shape (``nq``/``nk``
        per sequence; ``same_packing``: queries and keys share one ``cu_seqlens``)."""

    def key_range(self, q_start: int, q_end: int, nq: int, nk: int) -> tuple[int, int]:
        """Keys ``[lo, hi)`` touched by queries ``[q_start, q_end)`` (may be empty)."""
        return self.compile(nq, nk).key_range(q_start, q_end, nq, nk)

    def visited_pairs(self, nq: int, nk: int) -> float:
        """Visible (query, key) pairs per (batch row, head); drives FLOP counts."""
        return self.compile(nq, nk).visited_pairs(nq, nk)


class BandPattern(Pattern):
    """A band around each query's aligned position (Dense, Causal, SlidingWindow)."""

    #: Visible keys to the left of a query's aligned position (``None`` = unbounded).
    left: int | None = None
    #: Visible keys to the right of a query's aligned position (``None`` = unbounded).
    right: int | None = None

    def compile(self, nq: int = 0, nk: int = 0, device: torch.device | str = "cpu") -> Band:
        return Band(self.left, self.right)


@dataclass(frozen=True)
class Dense(BandPattern):
    """Every query sees every key (the default)."""

    left = None
    right = None


@dataclass(frozen=True)
class Causal(BandPattern):
    """Query ``i`` sees keys ``j <= i + Nk - Nq`` (bottom-right aligned when ``Nq != Nk``)."""

    left = None
    right = 0


def _check_offset(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"SlidingWindow: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"SlidingWindow: {name} must be >= 0, got {value}")


@dataclass(frozen=True)
class SlidingWindow(BandPattern):
    """Query ``i`` sees keys ``p - left <= j <= p + right`` with ``p = i + Nk - Nq``.

    This is flash-attention's ``window_size=(left, right)``. ``SlidingWindow(w - 1, 0)`` is the
    causal window of ``w`` tokens that transformers' ``sliding_window = w`` means; ``left = 0``
    lets each query see only its own position. A window at least as wide as the sequence is the
    same as :class:`Causal` (``right = 0``) or :class:`Dense`.
    """

    left: int
    right: int = 0

    def __post_init__(self) -> None:
        _check_offset("left", self.left)
        _check_offset("right", self.right)
        object.__setattr__(self, "left", int(self.left))
        object.__setattr__(self, "right", int(self.right))

    @property
    def kind(self) -> str:
        return "window"


def as_pattern(pattern: object) -> Pattern:
    """Normalise the ``pattern`` argument: ``None`` means :class:`Dense`."""
    if pattern is None:
        return Dense()
    if isinstance(pattern, Pattern):
        return pattern
    raise TypeError(
        f"pattern must be an attnkit pattern (Dense(), Causal(), SlidingWindow(left, right)) or "
        f"None, got {type(pattern).__name__} {pattern!r}"
    )
