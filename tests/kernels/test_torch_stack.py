"""The stack executors of the torch backend (``torch_stack.py``) against the float64 oracle.

Each case runs twice: with the C++ band kernel (``csrc/band_cpu.cpp``; it takes fp32 without key
padding, the matmul executor the rest) and with the kernel turned off (the matmul executor,
fp32/fp64, must then serve every bounded band the planner stacks). The result buffers are
poisoned with NaN before they run, every case checks which executor ran, and the matmul cases
run with one slab and with a slab per chunk. Cases: GQA, key padding that hides whole windows (rows
that see nothing), narrow bands whose edge triangles overlap, anti-causal bands, ``Nq != Nk``,
``[B, N, H, D]`` memory, the LSE and its gradient, and the no-LSE forward (no grad, no
``return_lse``).
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import SlidingWindow
from attnkit.kernels import cpu_ext
from attnkit.kernels.flash import torch_fused, torch_stack
from attnkit.kernels.flash.naive import attention_naive
from tests.harness import assert_close_to_oracle, bnhd, cpu_qkv, max_err, padding_mask

# (id, B, Hq, Hkv, Nq, Nk, D, pattern, padded)
CASES = [
    ("window40-gqa", 1, 4, 2, 301, 301, 64, SlidingWindow(40), False),
    ("window33x9", 2, 2, 2, 210, 210, 32, SlidingWindow(33, 9), False),
    ("window3x2-narrow", 1, 2, 1, 90, 90, 16, SlidingWindow(3, 2), False),  # L < 2n
    ("window0x40-anticausal", 1, 2, 2, 150, 150, 64, SlidingWindow(0, 40), False),
    ("window50-nq<nk", 1, 2, 1, 130, 260, 48, SlidingWindow(50, 3), False),
    ("window40-padded", 3, 2, 1, 180, 180, 64, SlidingWindow(40), True),
]


_inputs = cpu_qkv


EXECUTORS = ["kernel", "matmul"]


@pytest.fixture(params=EXECUTORS)
def stack_runs(request, monkeypatch):
    """Poisons the fused path's result buffers and counts the pieces of the executor under test:
    ``kernel`` (the C++ band kernel; it serves fp32 without key padding, the matmul executor
    the rest) or ``matmul`` (the kernel turned off)."""
    runs = []
    real_alloc, real_mm, real_kernel = (torch_fused._alloc, torch_stack._matmul_forward,
                                        torch_stack._kernel_forward)

    def poisoned(*a, **kw):
        o, lse = real_alloc(*a, **kw)
        return o.fill_(float("nan")), lse.fill_(float("nan"))

    def counting(real, name):
        def run(*a, **kw):
            runs.append(name)
            return real(*a, **kw)
        return run

    if request.param == "kernel" and cpu_ext.available() is not None:
        pytest.skip(f"the CPU band kernel cannot be built here: {cpu_ext.available()}")
    if request.param == "matmul":
        monkeypatch.setattr(torch_stack, "_kernel", lambda *a, **kw: None)
    monkeypatch.setattr(torch_fused, "_alloc", poisoned)
    monkeypatch.setattr(torch_stack, "_matmul_forward", counting(real_mm, "matmul"))
    monkeypatch.setattr(torch_stack, "_kernel_forward", counting(real_kernel, "kernel"))
    return _Runs(runs, request.param)


class _Runs:
    """The executors that ran (one name per stack piece) and the one under test."""

    def __init__(self, runs: list, executor: str):
        self.log, self.executor = runs, executor

    def __bool__(self):
        return bool(self.log)

    def expect(self, dtype, padded: bool):
        """Assert that the executor this call should take ran, and only it."""
        kernel = self.executor == "kernel" and dtype == torch.float32 and not padded
        want = "kernel" if kernel else "matmul"
        assert self.log, "no stack executor ran"
        assert set(self.log) == {want}, f"expected the {want} executor, ran {sorted(set(self.log))}"


@pytest.mark.parametrize("slabs", ["one-slab", "slab-per-chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matmul_executor_matches_oracle(case, dtype, slabs, stack_runs, monkeypatch):
    if slabs == "slab-per-chunk":
        monkeypatch.setattr(torch_stack, "_SLAB_BYTES", 1)
    _, B, Hq, Hkv, Nq, Nk, D, pattern, padded = case
    q, k, v = _inputs(B, Hq, Hkv, Nq, Nk, D, dtype)
    kpm = padding_mask(B, Nk, "cpu") if padded else None
    if padded:
        kpm[0, 60:110] = False  # a gap wider than the window inside the stacked rows
    o, lse = attnkit.attention(q, k, v, pattern, valid_keys=kpm, backend="torch",
                               return_lse=True)
    stack_runs.expect(dtype, padded)
    ref_o, ref_lse = attention_naive(q, k, v, pattern, valid_keys=kpm)
    low_o, low_lse = attention_naive(q, k, v, pattern, valid_keys=kpm, dtype=dtype)
    assert torch.isfinite(o).all() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "empty rows must be -inf"
    if padded:
        assert torch.isneginf(lse[0, :, 100]).all(), "row 100 of batch 0 sees only padded keys"
        assert torch.equal(o[0, :, 100], torch.zeros_like(o[0, :, 100]))
    assert_close_to_oracle("o", o, ref_o, low_o, dtype, 2.0)
    assert max_err(lse, ref_lse) <= 1e-5

    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    dlse = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2))

    def loss(out, out_lse):
        finite = torch.isfinite(out_lse)
        return ((out.double() * do.double()).sum()
                + (torch.where(finite, out_lse.double(), 0.0) * dlse.double()).sum())

    grads = torch.autograd.grad(loss(o, lse), (q, k, v))
    ref = torch.autograd.grad(loss(ref_o, ref_lse), (q, k, v))
    low = torch.autograd.grad(loss(low_o, low_lse), (q, k, v))
    for name, g, rg, lg in zip("qkv", grads, ref, low, strict=True):
        assert torch.isfinite(g).all(), f"d{name} not finite"
        assert_close_to_oracle(f"d{name}", g, rg, lg, dtype, 3.0)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_without_lse_matches_oracle(case, stack_runs):
    """No gradient and no ``return_lse``: the executor skips the LSE; ``O`` is unchanged."""
    _, B, Hq, Hkv, Nq, Nk, D, pattern, padded = case
    q, k, v = (t.detach() for t in _inputs(B, Hq, Hkv, Nq, Nk, D, torch.float32))
    kpm = padding_mask(B, Nk, "cpu") if padded else None
    with torch.no_grad():
        o = attnkit.attention(q, k, v, pattern, valid_keys=kpm, backend="torch")
        o_lse, lse = attnkit.attention(q, k, v, pattern, valid_keys=kpm, backend="torch",
                                       return_lse=True)
    stack_runs.expect(torch.float32, padded)
    ref_o, ref_lse = attention_naive(q, k, v, pattern, valid_keys=kpm)
    low_o, _ = attention_naive(q, k, v, pattern, valid_keys=kpm, dtype=torch.float32)
    assert torch.isfinite(o).all()
    assert_close_to_oracle("o", o, ref_o, low_o, torch.float32, 2.0)
    assert max_err(o_lse, o) <= 1e-6
    assert not torch.isnan(lse).any() and max_err(lse, ref_lse) <= 1e-5, "asked-for LSE"


def test_bnhd_memory_and_large_scores(stack_runs):
    """``[B, N, H, D]`` memory read through its strides, and scores large enough that an
    unshifted exp would overflow fp32."""
    q, k, v = _inputs(2, 4, 2, 200, 200, 32, torch.float32, seed=5)
    q = bnhd((q * 40).detach()).requires_grad_()
    k, v = bnhd(k), bnhd(v)
    o, lse = attnkit.attention(q, k, v, SlidingWindow(60), backend="torch", return_lse=True)
    stack_runs.expect(torch.float32, False)
    assert float(lse.detach().max()) > 100, "the case must reach scores beyond fp32's exp range"
    ref_o, ref_lse = attention_naive(q, k, v, SlidingWindow(60))
    low_o, _ = attention_naive(q, k, v, SlidingWindow(60), dtype=torch.float32)
    assert_close_to_oracle("o", o, ref_o, low_o, torch.float32, 2.0)
    assert max_err(lse, ref_lse) <= 1e-4 * float(ref_lse.detach().abs().max())
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(6))
    grads = torch.autograd.grad(o, (q, k, v), do)
    ref = torch.autograd.grad(ref_o, (q, k, v), do.double())
    low = torch.autograd.grad(low_o, (q, k, v), do)
    for name, g, rg, lg in zip("qkv", grads, ref, low, strict=True):
        assert_close_to_oracle(f"d{name}", g, rg, lg, torch.float32, 3.0)


def test_half_types_keep_the_fused_kernel(stack_runs):
    q, k, v = _inputs(1, 2, 2, 200, 200, 64, torch.bfloat16)
    attnkit.attention(q, k, v, SlidingWindow(40), backend="torch")
    assert not stack_runs
