"""Dense, causal and sliding-window attention (and any other registered attention kind) against
SDPA's backends, FlexAttention and flash-attn."""

import pytest

from .conftest import points_for, run_benchmark


@pytest.mark.parametrize("point", points_for("attention"))
def test_attention(benchmark, point):
    run_benchmark(benchmark, point)
