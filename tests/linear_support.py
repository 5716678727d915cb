"""What the linear-attention tests share (not a test module): a fixture and the error check.

The error check is ``tests/harness.py``'s rule (flash-attention's) plus, where they are
stricter, the bounds these tests held before the harness existed: the harness adds ``4 eps``
of the result's magnitude to ``k x`` the naive computation's error, and gives fp32 ``2e-5 k``
of the magnitude; on the CPU every old bound below is tighter than that, so both are asserted
(on a GPU the harness is the tighter one for fp32).
"""

from __future__ import annotations

import pytest
import torch

from tests import harness


@pytest.fixture
def fp32_highest():
    """Exact-equality tests compare two kernel runs, not kernel vs oracle: on a GPU make fp32
    dots full precision (the kernels follow torch's matmul precision) so TF32 noise stays out."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def assert_close_to_oracle(name: str, got, ref64, lowp, dtype, factor: float,
                           rel_floor: float) -> None:
    """``got`` within :func:`tests.harness.tolerance` of the float64 ``ref64`` (``lowp``: the
    same naive computation in ``dtype``; pass ``ref64`` for fp32/fp64, whose rule ignores it)
    and within this op's older, stricter bound ``max(factor * err(lowp), rel_floor * max(|ref|,
    0.1))`` (the 0.1 makes it absolute for tensors that are ~0 by construction, e.g. the
    gradient of q when N = 1). A NaN anywhere in ``got`` fails both."""
    harness.assert_close_to_oracle(name, got, ref64, lowp, dtype, factor)
    mag = float(ref64.detach().abs().max()) if ref64.numel() else 0.0
    bound = max(factor * harness.max_err(lowp, ref64), rel_floor * max(mag, 0.1))
    err = harness.max_err(got, ref64)
    assert err <= bound, f"{name}: error {err:.3g} > this op's bound {bound:.3g} (|ref| {mag:.3g})"
