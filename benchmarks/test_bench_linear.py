"""Causal linear attention (elu+1) against the chunked torch form, the O(N^2) form and fla."""

import pytest

from .conftest import points_for, run_benchmark


@pytest.mark.parametrize("point", points_for("linear_attention"))
def test_linear_attention(benchmark, point):
    run_benchmark(benchmark, point)
