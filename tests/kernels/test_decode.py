"""The split-KV decode kernel against the float64 oracle (forward only).

Every buffer the kernels write (partials and final outputs) is filled with NaN first
(``decode.POISON_OUTPUTS``), so an element a kernel forgets to write fails the comparison. The
tolerance is flash-attention's: at most twice the error of the same-dtype torch backend, plus a
small per-dtype slack.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import attnkit
from attnkit import Causal, Dense, SlidingWindow
from attnkit.kernels.flash.naive import attention_naive as attention_oracle
from tests.conftest import DEVICE, ON_GPU
from tests.harness import max_err

SLACK = {torch.float32: 2e-3 if ON_GPU else 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass
class Case:
    id: str
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    pattern: object
    dtype: torch.dtype = torch.float32
    padding: bool = False  # a left-padded, a right-padded and a fully padded row
    splits: int | None = None
    bnhd: bool = False  # [B, N, H, D] cache views


CASES = [
    Case("B2-H4-Nq1-Nk1-D64-causal", 2, 4, 4, 1, 1, 64, Causal()),
    Case("B2-H4kv2-Nq1-Nk17-D40-dense", 2, 4, 2, 1, 17, 40, Dense()),
    Case("B1-H8kv2-Nq1-Nk113-D80-causal-fp16", 1, 8, 2, 1, 113, 80, Causal(), torch.float16),
    Case("B1-H4kv1-Nq1-Nk257-D128-causal-bf16-mqa", 1, 4, 1, 1, 257, 128, Causal(), torch.bfloat16),
    Case("B2-H4kv2-Nq1-Nk113-D64-window16", 2, 4, 2, 1, 113, 64, SlidingWindow(16)),
    Case("B1-H2-Nq1-Nk50-D64-window0", 1, 2, 2, 1, 50, 64, SlidingWindow(0)),
    Case("B1-H2-Nq1-Nk50-D64-window300", 1, 2, 2, 1, 50, 64, SlidingWindow(300)),
    Case("B3-H4kv2-Nq1-Nk70-D64-causal-padded", 3, 4, 2, 1, 70, 64, Causal(), padding=True),
    Case("B3-H4kv2-Nq1-Nk70-D64-window9-padded-fp16", 3, 4, 2, 1, 70, 64, SlidingWindow(9),
         torch.float16, padding=True),
    Case("B2-H4kv2-Nq4-Nk90-D64-causal-spec", 2, 4, 2, 4, 90, 64, Causal()),
    Case("B2-H4kv2-Nq5-Nk90-D64-window6x2", 2, 4, 2, 5, 90, 64, SlidingWindow(6, 2)),
    Case("B1-H2-Nq3-Nk2-D64-causal-emptyrow", 1, 2, 2, 3, 2, 64, Causal()),
    Case("B1-H16kv2-Nq9-Nk40-D64-causal-rowtiles", 1, 16, 2, 9, 40, 64, Causal()),  # R = 72 > 64
    Case("B2-H4kv2-Nq1-Nk100-D64-causal-1split", 2, 4, 2, 1, 100, 64, Causal(), splits=1),
    Case("B2-H4kv2-Nq1-Nk40-D64-causal-20splits", 2, 4, 2, 1, 40, 64, Causal(), splits=20),
    Case("B2-H4kv2-Nq1-Nk60-D64-window8-bnhd", 2, 4, 2, 1, 60, 64, SlidingWindow(8), bnhd=True),
]


def _inputs(c: Case):
    if c.bnhd:
        q = torch.randn(c.B, c.Nq, c.Hq, c.D, device=DEVICE, dtype=c.dtype).transpose(1, 2)
        k = torch.randn(c.B, c.Nk, c.Hkv, c.D, device=DEVICE, dtype=c.dtype).transpose(1, 2)
        v = torch.randn(c.B, c.Nk, c.Hkv, c.D, device=DEVICE, dtype=c.dtype).transpose(1, 2)
    else:
        q = torch.randn(c.B, c.Hq, c.Nq, c.D, device=DEVICE, dtype=c.dtype)
        k = torch.randn(c.B, c.Hkv, c.Nk, c.D, device=DEVICE, dtype=c.dtype)
        v = torch.randn(c.B, c.Hkv, c.Nk, c.D, device=DEVICE, dtype=c.dtype)
    kpm = None
    if c.padding:
        kpm = torch.ones(c.B, c.Nk, dtype=torch.bool, device=DEVICE)
        kpm[0, : c.Nk // 3] = False  # left padding
        kpm[1, c.Nk - 5 :] = False  # right padding (keys the last query would see)
        kpm[2] = False  # nothing to attend: o = 0, lse = -inf
    return q, k, v, kpm


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_decode_matches_oracle(c: Case):
    from attnkit.kernels.flash.decode import decode_attention

    q, k, v, kpm = _inputs(c)
    scale = c.D**-0.5
    o, lse = decode_attention(q, k, v, c.pattern.compile(), scale, kpm, num_splits=c.splits)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert not o.isnan().any() and not lse.isnan().any(), "an output element was never written"
    ref_o, ref_lse = attention_oracle(q, k, v, c.pattern, scale, kpm)
    same_dtype = attnkit.attention(q, k, v, c.pattern, scale=scale, valid_keys=kpm,
                                   backend="torch")
    bound = 2 * max_err(same_dtype, ref_o) + SLACK[c.dtype]
    assert max_err(o, ref_o) <= bound
    assert max_err(lse, ref_lse) <= 1e-4 * (1 + float(ref_lse[torch.isfinite(ref_lse)].abs().max()
                                                        if torch.isfinite(ref_lse).any() else 0))
    if c.padding:
        assert (o[2] == 0).all() and torch.isneginf(lse[2]).all()


def test_decode_matches_flash_kernel():
    """Same numbers as the flash forward on the same call (both fp32 accumulators)."""
    from attnkit.kernels.flash.decode import decode_attention

    c = Case("x", 2, 4, 2, 2, 50, 64, SlidingWindow(11), padding=False)
    q, k, v, _ = _inputs(c)
    from attnkit.attn.inputs import validate
    from attnkit.kernels.flash.backends import TritonFlash

    o, lse = decode_attention(q, k, v, c.pattern.compile(), 0.3)
    o2, lse2 = TritonFlash().run(validate(q, k, v, c.pattern, 0.3, None, None, None, True))
    assert max_err(o, o2) <= 1e-5 and max_err(lse, lse2) <= 1e-5


def test_decode_backend_declares_what_it_cannot_run():
    from attnkit.attn.inputs import validate
    from attnkit.kernels.flash.backends import TritonDecode
    from attnkit.kernels.flash.decode import decode_attention

    q = torch.randn(1, 2, 1, 16, device=DEVICE, dtype=torch.float64)
    k = torch.randn(1, 2, 5, 16, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        reasons = TritonDecode().not_supported_reasons(validate(q, k, k, Causal(), None, None, None,
                                                                None, False))
    assert any("float64" in r for r in reasons)
    q32, k32 = q.float(), k.float()
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q32, k32, k32, Causal().compile(), 0.25, num_splits=0)
    sparse = attnkit.BlockSparse(torch.ones(1, 1, 1, dtype=torch.bool), 16)
    with pytest.raises(TypeError, match="takes a Band spec, got BlockLists"):
        decode_attention(q32, k32, k32, sparse.compile(1, 5), 0.25)
    with torch.no_grad():
        call = validate(q32, k32, k32, sparse, None, None, None, None, False)
    assert any("block_sparse patterns are not supported" in r
               for r in TritonDecode().not_supported_reasons(call))
