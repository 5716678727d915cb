"""The CPU extension's loader (``kernels/cpu_ext.py``) and the band kernel's own contract.

The kernel's results against the float64 oracle are in ``test_torch_stack.py`` (every case runs
on it); here: a failed build falls back to the matmul executor with one warning, the
``ATTNKIT_DISABLE_CPU_EXT`` switch, thread counts that split the tasks unevenly, and the
kernel's input checks.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import attnkit
from attnkit import SlidingWindow
from attnkit.kernels import cpu_ext
from attnkit.kernels.flash import torch_stack
from attnkit.kernels.flash.naive import attention_naive
from tests.harness import assert_close_to_oracle, cpu_qkv


@pytest.fixture
def fresh_state():
    """A process-wide loader state of its own (restored afterwards)."""
    saved = dict(cpu_ext._state)
    cpu_ext._reset_for_tests()
    yield
    cpu_ext._state.clear()
    cpu_ext._state.update(saved)


@pytest.fixture
def ran(monkeypatch):
    """The stack executors that ran, one name per piece."""
    names: list = []

    def spy(real, name):
        def run(*a, **kw):
            names.append(name)
            return real(*a, **kw)
        return run

    monkeypatch.setattr(torch_stack, "_kernel_forward", spy(torch_stack._kernel_forward, "kernel"))
    monkeypatch.setattr(torch_stack, "_matmul_forward", spy(torch_stack._matmul_forward, "matmul"))
    return names


def test_failed_build_warns_once_and_falls_back(fresh_state, ran, monkeypatch):
    def broken(verbose=False):
        raise RuntimeError("g++: fatal error: no input files")

    monkeypatch.setattr(cpu_ext, "build", broken)
    monkeypatch.setattr(cpu_ext, "unavailable_reason", lambda: None)
    q, k, v = (t.detach() for t in cpu_qkv(1, 2, 2, 200, 200, 32, torch.float32))
    with pytest.warns(UserWarning, match="CPU band kernel is not used.*no input files"):
        o = attnkit.attention(q, k, v, SlidingWindow(40), backend="torch")
    assert ran and set(ran) == {"matmul"}
    ref, _ = attention_naive(q, k, v, SlidingWindow(40))
    low, _ = attention_naive(q, k, v, SlidingWindow(40), dtype=torch.float32)
    assert_close_to_oracle("o", o, ref, low, torch.float32, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the second call is silent
        attnkit.attention(q, k, v, SlidingWindow(40), backend="torch")
    assert "no input files" in cpu_ext.available()


def test_disable_switch_is_silent(fresh_state, ran, monkeypatch):
    monkeypatch.setenv(cpu_ext.DISABLE_ENV, "1")
    assert cpu_ext.module() is None
    assert cpu_ext.DISABLE_ENV in cpu_ext.unavailable_reason()
    q, k, v = (t.detach() for t in cpu_qkv(1, 2, 2, 200, 200, 32, torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnkit.attention(q, k, v, SlidingWindow(40), backend="torch")
    assert set(ran) == {"matmul"}


needs_kernel = pytest.mark.skipif(cpu_ext.unavailable_reason() is not None,
                                  reason=f"no CPU extension here: {cpu_ext.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_rows_and_lse_for_any_thread_split(threads):
    """7 chunks x 3 heads over 1-3 threads (uneven splits); rows outside ``[r0, r0 + m n)``
    untouched; GQA (3 query heads on 1 key head); ``D`` not a multiple of the vector width."""
    ext = cpu_ext.module()
    assert ext is not None, cpu_ext.available()
    g = torch.Generator().manual_seed(3)
    H, N, D, n, width, r0, k0, m = 3, 300, 40, 16, 37, 41, 4, 7
    q = torch.randn(H, N, D, generator=g)
    k, v = torch.randn(1, N, D, generator=g), torch.randn(1, N, D, generator=g)
    out = torch.full((H, N, D), float("nan"))
    lse = torch.full((H, N), float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ext.band_forward(q, k, v, out, lse, r0=r0, k0=k0, m=m, n=n, width=width, scale=0.3)
    finally:
        torch.set_num_threads(before)
    rows = torch.arange(r0, r0 + m * n)
    first = k0 + (rows - r0)  # row r sees keys [first, first + width]
    j = torch.arange(N)
    vis = (j[None] >= first[:, None]) & (j[None] <= first[:, None] + width)
    s = (q[:, rows].double() @ k[0].double().T) * 0.3
    s = s.masked_fill(~vis, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref_o = torch.softmax(s, -1) @ v[0].double()
    assert torch.allclose(out[:, rows].double(), ref_o, atol=2e-6, rtol=0)
    assert torch.allclose(lse[:, rows].double(), ref_lse, atol=2e-6, rtol=0)
    outside = torch.ones(N, dtype=torch.bool)
    outside[rows] = False
    assert torch.isnan(out[:, outside]).all() and torch.isnan(lse[:, outside]).all()


@needs_kernel
def test_kernel_checks_its_inputs():
    ext = cpu_ext.module()
    q = torch.randn(2, 64, 32)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="float32"):
        ext.band_forward(q.double(), q, q, out, None, r0=0, k0=0, m=1, n=16, width=8, scale=1.0)
    with pytest.raises(RuntimeError, match="unit stride"):
        ext.band_forward(q.transpose(1, 2), q, q, out, None, r0=0, k0=0, m=1, n=16, width=8,
                         scale=1.0)
    with pytest.raises(RuntimeError, match="keys out of range"):
        ext.band_forward(q, q, q, out, None, r0=0, k0=0, m=4, n=16, width=8, scale=1.0)
    with pytest.raises(RuntimeError, match="bad chunking"):
        ext.band_forward(q, q, q, out, None, r0=0, k0=0, m=1, n=12, width=8, scale=1.0)
