"""The one test harness: how a kernel's error is judged, and how inputs are made.

Tolerance (flash-attention's rule, used by every op's tests): a backend's error against the
float64 oracle may be at most ``factor`` x the error of the same naive computation done in the
inputs' own dtype (``factor`` 2 for outputs, 3 for gradients), plus a few ulps of the result's
magnitude; fp32 (TF32 off) gets a tight relative bound instead.
"""

from __future__ import annotations

import torch

#: The factors of the rule: outputs, gradients.
K_OUT, K_GRAD = 2.0, 3.0


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference, treating matching infinities as equal (LSE = -inf rows)."""
    a, b = a.detach().double(), b.detach().double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(same_inf, torch.zeros_like(a), (a - b).abs())
    return float(d.max()) if d.numel() else 0.0


def tolerance(dtype, lowp_err: float, ref_mag: float, factor: float) -> float:
    """At most ``factor`` x the error of the naive computation in the same dtype (``lowp_err``,
    both measured against float64), plus a few ulps of the result's magnitude; fp32 (TF32 off)
    gets a tight bound relative to the result's magnitude."""
    if dtype in (torch.float32, torch.float64):
        return 2e-5 * max(1.0, ref_mag) * factor
    eps = torch.finfo(dtype).eps
    return factor * lowp_err + 4 * eps * max(1.0, ref_mag)


def assert_close_to_oracle(name: str, got, ref64, lowp, dtype, factor: float) -> None:
    """``got`` within :func:`tolerance` of the float64 ``ref64``, given the same-dtype ``lowp``."""
    tol = tolerance(dtype, max_err(lowp, ref64), float(ref64.detach().abs().max()) if ref64.numel()
                    else 0.0, factor)
    err = max_err(got, ref64)
    assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g}"


def bnhd(x: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, N, D]`` tensor re-laid as ``[B, N, H, D]`` memory viewed as ``[B, H, N, D]``
    (what models pass: the kernels must read the strides, not assume a layout)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2).detach().requires_grad_(x.requires_grad)


def cpu_qkv(B: int, Hq: int, Hkv: int, Nq: int, Nk: int, D: int, dtype, seed: int = 0):
    """Seeded ``q [B, Hq, Nq, D]``, ``k``/``v [B, Hkv, Nk, D]`` on the CPU, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, n: torch.randn(B, h, n, D, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return mk(Hq, Nq), mk(Hkv, Nk), mk(Hkv, Nk)


def padding_mask(B: int, N: int, device) -> torch.Tensor:
    """``valid_keys [B, N]``: row 0 right-padded, row 1 left-padded, row 2 fully padded (a row that
    sees no key must give zeros, never NaN), the rest full."""
    m = torch.ones(B, N, dtype=torch.bool, device=device)
    if B > 0:
        m[0, N - N // 3:] = False
    if B > 1:
        m[1, : N // 4] = False
    if B > 2:
        m[2] = False
    return m


def run_json_script(code: str, timeout: float):
    """Run ``code`` in a fresh interpreter with ``TRITON_INTERPRET`` unset (real launches, compiles
    for a GPU target, nothing run) and return the JSON its last stdout line prints. Skips the
    test where this triton cannot target a GPU without one (``GPUTarget`` missing)."""
    import json
    import os
    import subprocess
    import sys

    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
    if proc.returncode != 0 and "GPUTarget" in proc.stderr:
        pytest.skip(f"this triton cannot compile ahead of time without a GPU: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
