"""One small ``torch.exp`` per floating dtype at import, before any parallel one.

Measured with torch 2.13's CPU wheel (MKL 2024.2, AVX-512 Xeon, 2 threads): the first
*multi-threaded* fp32 ``torch.exp`` of a process (any tensor above ATen's grain size, so it runs
on the OpenMP pool) came back from one worker thread with a relative error of 1.5e-4 instead of
6e-8 in about a third of fresh processes - half the elements wrong, silently. A second call, or
one small (single-threaded) call first, is exact. It looks like a race in MKL VML's lazy set-up
(``torch.exp`` on the CPU is MKL's ``vsExp``; ``MKL_CBWR=COMPATIBLE`` or
``MKL_ENABLE_INSTRUCTIONS=AVX2`` also hide it). The torch backend's probabilities are
``exp(s - lse)`` over whole chunks, so this one call keeps its fp32 results at fp32 accuracy.
``tests/test_mkl_warmup.py`` runs fresh processes to check it.
"""

from __future__ import annotations

import torch


def warm_up() -> None:
    for dtype in (torch.float32, torch.float64):
        torch.exp(torch.zeros(8, dtype=dtype))
