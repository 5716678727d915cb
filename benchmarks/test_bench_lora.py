"""Fused LoRA (functional and through PEFT) against unfused torch and PEFT's own layer."""

import pytest

from .conftest import points_for, run_benchmark


@pytest.mark.parametrize("point", points_for("lora"))
def test_lora(benchmark, point):
    run_benchmark(benchmark, point)
