"""attnkit's torch backend beside PyTorch's own CPU attention, side by side in one process.

    PYTHONPATH=. python benchmarks/cpu_vs_sdpa.py [--threads 2] [--repeats 5] [--quick]

Each row times attnkit and its SDPA baseline interleaved (a, b, a, b, ...), best of
``--repeats``, so load from other processes hits both alike; the ratio is SDPA time / attnkit
time (> 1: attnkit faster). "noise" is the larger of the two sides' second-best / best - 1: a
ratio short of its goal by less than that is marked ``~`` (not distinguishable from the goal in
this run), not ``ok``. Peak memory is the bench harness's CPU measurement
(:func:`attnkit.bench.memory.measure_peak`, RSS high-water mark above the inputs), taken for
each row in a fresh interpreter: in one process the rows before it moved a row's reading by up
to 1.3 MiB (the allocator's state), more than the differences being measured. fp32, B = 1,
H = 8, D = 64 (the issue's setting). The goals (benchmarks/NOTES.md) are checked here, never as
test assertions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import attnkit
from attnkit import Causal, Dense, SlidingWindow
from attnkit.bench.memory import measure_peak

H, D = 8, 64


def _inputs(n: int, grad: bool):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, n, D, generator=g).requires_grad_(grad) for _ in range(3)]


def _attnkit(pattern, n, grad):
    q, k, v = _inputs(n, grad)
    do = torch.randn(1, H, n, D)

    def fn():
        o = attnkit.attention(q, k, v, pattern, backend="torch")
        if grad:
            return torch.autograd.grad(o, (q, k, v), do)
        return o
    return fn


def _sdpa(causal, n, grad):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _inputs(n, grad)
    do = torch.randn(1, H, n, D)

    def fn():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if grad:
            return torch.autograd.grad(o, (q, k, v), do)
        return o
    return fn


def _best_interleaved(fa, fb, repeats):
    """``(best a, best b, noise)``: noise is the larger second-best / best - 1."""
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(max(2, repeats)):
        for f, t in ((fa, ta), (fb, tb)):
            s = time.perf_counter()
            f()
            t.append(time.perf_counter() - s)
    noise = max(sorted(t)[1] / min(t) - 1 for t in (ta, tb))
    return min(ta), min(tb), noise


def _memory(row: int, quick: bool) -> tuple[float, float]:
    """Peak MiB of attnkit and SDPA for ``ROWS[row]``, measured in a fresh interpreter."""
    args = [sys.executable, __file__, "--memory-row", str(row)] + (["--quick"] if quick else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    a, b = out.stdout.split()[-2:]
    return float(a), float(b)


def _memory_row(row: int, quick: bool) -> int:
    _, pattern, causal, n, grad, _ = ROWS[row]
    n = n // 2 if quick else n
    fa, fb = _attnkit(pattern, n, grad), _sdpa(causal, n, grad)
    fa(), fb()  # lazily grown library buffers are not the call's memory
    print(measure_peak(fa, "cpu") / 2**20, measure_peak(fb, "cpu") / 2**20)
    return 0


ROWS = [  # (label, attnkit pattern, SDPA causal?, N, fwd+bwd?, goal on the SDPA/attnkit ratio)
    ("Dense fwd", Dense(), False, 4096, False, 1.0),
    ("Causal fwd", Causal(), True, 4096, False, 1.0),
    ("Dense fwd+bwd", Dense(), False, 2048, True, 0.9),
    ("Causal fwd+bwd", Causal(), True, 2048, True, 0.9),
    ("SlidingWindow(255) fwd vs SDPA causal", SlidingWindow(255), True, 4096, False, 5.0),
    ("SlidingWindow(255) fwd+bwd vs SDPA causal", SlidingWindow(255), True, 4096, True, None),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="N halved (a smoke run)")
    ap.add_argument("--memory-row", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_row is not None:
        return _memory_row(args.memory_row, args.quick)
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.repeats}, fp32, "
          f"B=1 H={H} D={D}")
    print(f"{'row':44s} {'N':>5s} {'attnkit ms':>10s} {'sdpa ms':>9s} {'speed-up':>8s} "
          f"{'noise':>6s} {'goal':>5s} {'attnkit MiB':>11s} {'sdpa MiB':>9s} {'mem ratio':>9s}")
    for i, (label, pattern, causal, n, grad, goal) in enumerate(ROWS):
        n = n // 2 if args.quick else n
        fa, fb = _attnkit(pattern, n, grad), _sdpa(causal, n, grad)
        ta, tb, noise = _best_interleaved(fa, fb, args.repeats)
        del fa, fb
        ma, mb = _memory(i, args.quick)
        ratio = tb / ta
        mark = ""
        if goal is not None:
            mark = "ok" if ratio >= goal else ("~" if ratio * (1 + noise) >= goal else "MISS")
        print(f"{label:44s} {n:5d} {ta * 1e3:10.1f} {tb * 1e3:9.1f} {ratio:7.2f}x "
              f"{noise * 100:5.1f}% {'' if goal is None else f'{goal:.1f}x':>5s} {ma:11.1f} "
              f"{mb:9.1f} {(ma / mb if mb else float('nan')):8.2f}x {mark}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
