"""Test session set-up: run Triton kernels under the interpreter when there is no CUDA device.

This must happen before anything imports triton, which reads TRITON_INTERPRET when kernels are
decorated; pytest imports conftest.py first.
"""

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_call_plans():
    """``attnkit.attention`` caches a launch plan per call signature; tests that patch module
    globals the plan baked in (an interpreter tile, a backend's rule) start from an empty cache.
    (tests/attn/test_call_plans.py checks the cache itself.)"""
    from attnkit.attn import functional

    functional._PLANS.clear()
    yield
    functional._PLANS.clear()


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    """Every Triton kernel output buffer is filled with NaN before its kernel runs, so an element
    a kernel forgets to write fails the comparison instead of passing on stale memory."""
    import importlib

    for name in ("flash.launch", "flash.decode", "linear.op", "lora.op"):
        module = importlib.import_module(f"attnkit.kernels.{name}")
        monkeypatch.setattr(module, "POISON_OUTPUTS", True)


def pytest_sessionstart(session):
    """Under the interpreter, run one loop over a runtime bound first. triton 3.6's interpreter
    converts scalars with ``int()`` of a 1-element array, which NumPy >= 2.4 refuses (measured:
    184 interpreter tests failed with "only 0-dimensional arrays can be converted"; triton 3.9
    is fixed). One clear message beats a hundred tracebacks."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return

    @triton.jit
    def _probe(X, n):
        for i in range(0, n, 1):
            tl.store(X + i, i)

    x = torch.zeros(2, dtype=torch.int32)
    try:
        _probe[(1,)](x, 2)
    except Exception as exc:  # an InterpreterError wrapping the TypeError
        import numpy

        raise pytest.UsageError(
            f"the Triton interpreter of triton {triton.__version__} cannot run with numpy "
            f"{numpy.__version__} ({exc}); install numpy<2.4 or a newer triton "
            "(3.9 is tested) to run the CPU tests"
        ) from exc
