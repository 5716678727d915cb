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

Every pattern can say which keys a contiguous block of queries touches (:meth:`key_range`) and how
many (query, key) pairs it visits (:meth:`visited_pairs`). The Triton kernel, the torch backend and
the benchmarks' FLOP counts all derive from that one idea.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

__all__ = ["Pattern", "Dense", "Causal", "SlidingWindow", "as_pattern"]


class Pattern:
    """Base class of attention patterns. Subclasses are frozen dataclasses."""

    #: Visible keys to the left of a query's aligned position (``None`` = unbounded).
    left: int | None = None
    #: Visible keys to the right of a query's aligned position (``None`` = unbounded).
    right: int | None = None

    @property
    def kind(self) -> str:
        """A short name for logs, ids and autotuning keys: ``dense``, ``causal`` or ``window``."""
        return type(self).__name__.lower()

    def key_range(self, q_start: int, q_end: int, nq: int, nk: int) -> tuple[int, int]:
        """Keys ``[lo, hi)`` touched by queries ``[q_start, q_end)`` (``q_end > q_start``).

        The range may be empty (``lo >= hi``) when every query in the block sees no key.
        """
        shift = nk - nq
        lo = 0 if self.left is None else max(q_start + shift - self.left, 0)
        hi = nk if self.right is None else min(q_end - 1 + shift + self.right + 1, nk)
        return lo, max(hi, lo)

    def visited_pairs(self, nq: int, nk: int) -> int:
        """Number of (query, key) pairs the pattern allows; drives FLOP counts."""
        total = 0
        shift = nk - nq
        for i in range(nq):  # closed form is easy to get wrong at the clipped edges
            p = i + shift
            lo = 0 if self.left is None else max(p - self.left, 0)
            hi = nk - 1 if self.right is None else min(p + self.right, nk - 1)
            total += max(hi - lo + 1, 0)
        return total

    def window(self) -> tuple[int, int]:
        """``(left, right)`` with ``-1`` for "unbounded": the encoding the kernels take."""
        return (-1 if self.left is None else self.left, -1 if self.right is None else self.right)


@dataclass(frozen=True)
class Dense(Pattern):
    """Every query sees every key (the default)."""

    left = None
    right = None


@dataclass(frozen=True)
class Causal(Pattern):
    """Query ``i`` sees keys ``j <= i + Nk - Nq`` (bottom-right aligned when ``Nq != Nk``)."""

    left = None
    right = 0


def _check_offset(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"SlidingWindow: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"SlidingWindow: {name} must be >= 0, got {value}")


@dataclass(frozen=True)
class SlidingWindow(Pattern):
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
