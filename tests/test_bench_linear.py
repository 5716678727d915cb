"""The hybrid and decode benchmark kinds (``attnkit/bench/kinds/linear.py``): every point builds
and runs on the CPU, and the decode rows' ``bytes`` (the cache a step reads) is the real cache."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.bench.kinds.linear import decode_cache_bytes
from attnkit.bench.registry import KINDS, Point
from attnkit.bench.runner import RunOptions, run_point


def test_hybrid_point_runs():
    p = Point("hybrid", "attnkit", "fwd+bwd", 1, 2, 70, 16, "float32", "cpu")
    row = run_point(p, RunOptions(cpu_budget_s=0.0, min_reps=1))
    assert row["status"] == "ok", row["reason"]
    assert math.isfinite(row["time_ms"]) and row["flops"] > 0


@pytest.mark.parametrize("impl", ["softmax", "linear", "hybrid"])
def test_decode_points_run_and_count_the_cache(impl):
    pytest.importorskip("transformers")
    p = Point("decode", impl, "fwd", 2, 2, 140, 8, "float32", "cpu")
    wl = KINDS["decode"].impls[impl].build(p, False)
    with torch.no_grad():
        first, second = wl.fn(), wl.fn()
    if impl == "softmax":  # the KV cache is cropped back: each step decodes after T tokens
        assert torch.equal(first, second)
    if impl == "linear":  # one through the runner (its row and bytes)
        row = run_point(p, RunOptions(cpu_budget_s=0.0, min_reps=1))
        assert row["status"] == "ok", row["reason"]
        assert row["bytes"] == decode_cache_bytes(p)
    layers = wl.cache.layers
    if impl == "softmax":
        held = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    else:
        held = wl.cache.nbytes
    assert held == decode_cache_bytes(p)
    # the KV cache holds T tokens, the state does not depend on T
    if impl != "softmax":
        assert decode_cache_bytes(p) == decode_cache_bytes(Point("decode", impl, "fwd", 2, 2, 999, 8,
                                                                 "float32", "cpu"))


def test_decode_refuses_backward():
    row = run_point(Point("decode", "linear", "fwd+bwd", 1, 2, 16, 8, "float32", "cpu"),
                    RunOptions(cpu_budget_s=0.0, min_reps=1))
    assert row["status"] == "skipped" and "inference only" in row["reason"]
