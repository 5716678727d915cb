"""attnkit's torch backend beside PyTorch's own CPU attention, side by side in one process.

    PYTHONPATH=. python benchmarks/cpu_vs_sdpa.py [--threads 2] [--repeats 5] [--quick]

Each row times attnkit and its SDPA baseline interleaved (a, b, a, b, ...), best of
``--repeats``, so load from other processes hits both alike; the ratio is SDPA time / attnkit
time (> 1: attnkit faster). Peak memory is the bench harness's CPU measurement
(:func:`attnkit.bench.memory.measure_peak`, RSS high-water mark above the inputs). fp32, B = 1,
H = 8, D = 64 (the issue's setting). The goals (benchmarks/NOTES.md) are checked here, never as
test assertions.
"""

from __future__ import annotations

import argparse
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
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for f, t in ((fa, ta), (fb, tb)):
            s = time.perf_counter()
            f()
            t.append(time.perf_counter() - s)
    return min(ta), min(tb)


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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.repeats}, fp32, "
          f"B=1 H={H} D={D}")
    print(f"{'row':44s} {'N':>5s} {'attnkit ms':>10s} {'sdpa ms':>9s} {'speed-up':>8s} "
          f"{'goal':>5s} {'attnkit MiB':>11s} {'sdpa MiB':>9s} {'mem ratio':>9s}")
    for label, pattern, causal, n, grad, goal in ROWS:
        n = n // 2 if args.quick else n
        fa, fb = _attnkit(pattern, n, grad), _sdpa(causal, n, grad)
        ta, tb = _best_interleaved(fa, fb, args.repeats)
        ma, mb = measure_peak(fa, "cpu"), measure_peak(fb, "cpu")
        ratio = tb / ta
        mark = "" if goal is None else ("ok" if ratio >= goal else "MISS")
        print(f"{label:44s} {n:5d} {ta * 1e3:10.1f} {tb * 1e3:9.1f} {ratio:7.2f}x "
              f"{'' if goal is None else f'{goal:.1f}x':>5s} {ma / 2**20:11.1f} {mb / 2**20:9.1f} "
              f"{(ma / mb if mb else float('nan')):8.2f}x {mark}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
