"""Patterns: their definitions, key ranges and pair counts against brute force."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnkit import Causal, Dense, SlidingWindow
from attnkit.kernels.flash.naive import visible_mask

PATTERNS = [Dense(), Causal(), SlidingWindow(0), SlidingWindow(3), SlidingWindow(4, 2),
            SlidingWindow(0, 5), SlidingWindow(100, 100)]
SIZES = [(1, 1), (9, 9), (7, 20), (20, 7), (33, 33)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize(("nq", "nk"), SIZES, ids=lambda s: str(s))
def test_key_range_is_tight_and_covers_every_visible_key(pattern, nq, nk):
    mask = visible_mask(pattern, nq, nk)[0]
    for start in range(nq):
        for end in range(start + 1, min(nq, start + 6) + 1):
            lo, hi = pattern.key_range(start, end, nq, nk)
            cols = mask[start:end].any(0).nonzero().flatten().tolist()
            if not cols:
                assert lo >= hi
            else:
                assert (lo, hi) == (cols[0], cols[-1] + 1)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize(("nq", "nk"), SIZES, ids=lambda s: str(s))
def test_visited_pairs_counts_the_mask(pattern, nq, nk):
    assert pattern.visited_pairs(nq, nk) == int(visible_mask(pattern, nq, nk).sum())


def test_definitions():
    # causal, bottom-right aligned: with 2 queries and 5 keys, query 0 sits at key 3
    assert visible_mask(Causal(), 2, 5)[0].tolist() == [[True] * 4 + [False], [True] * 5]
    # flash-attention's window_size=(left, right)
    assert visible_mask(SlidingWindow(1, 1), 4, 4)[0].int().tolist() == [
        [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    assert SlidingWindow(5).right == 0
    from attnkit.kernels.flash.spec import Band

    assert (Dense().compile(), Causal().compile(), SlidingWindow(3, 2).compile()) == (
        Band(None, None), Band(None, 0), Band(3, 2))


def test_patterns_are_immutable_values():
    w = SlidingWindow(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.left = 5
    assert SlidingWindow(4, 0) == w and hash(SlidingWindow(4, 0)) == hash(w)
    assert Causal() == Causal() and Causal() != Dense()
    assert {Dense(), Dense(), Causal()} == {Dense(), Causal()}
    assert (Dense().kind, Causal().kind, w.kind) == ("dense", "causal", "window")


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
def test_an_unknown_pattern_subclass_is_refused_on_every_backend_never_run_as_dense(backend):
    """A Pattern subclass that does not say how it compiles used to read as Dense (``left =
    right = None``) on every band consumer. Now validation refuses it before any backend runs."""
    import attnkit
    from attnkit import Pattern

    @dataclasses.dataclass(frozen=True)
    class EveryOtherKey(Pattern):
        pass

    q = torch.randn(1, 2, 9, 16)
    with pytest.raises(TypeError, match=r"EveryOtherKey is a Pattern subclass attnkit cannot "
                                        r"compile to a kernel spec.*Band or BlockLists"):
        attnkit.attention(q, q, q, EveryOtherKey(), backend=backend)

    class NotASpec(Pattern):  # compiles, but to something no kernel walks
        def compile(self, nq, nk, device="cpu"):
            return (nq, nk)

    with pytest.raises(TypeError, match=r"compiled to tuple, which is not a kernel spec"):
        attnkit.attention(q, q, q, NotASpec(), backend=backend)
