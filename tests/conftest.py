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
def _poison_kernel_outputs(monkeypatch):
    """Every Triton kernel output buffer is filled with NaN before its kernel runs, so an element
    a kernel forgets to write fails the comparison instead of passing on stale memory."""
    import importlib

    for name in ("flash", "decode", "linear", "lora"):
        module = importlib.import_module(f"attnkit.kernels.{name}")
        monkeypatch.setattr(module, "POISON_OUTPUTS", True)
