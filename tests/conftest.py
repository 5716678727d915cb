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
