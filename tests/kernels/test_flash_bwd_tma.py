"""The dK/dV kernel's TMA path (``USE_TMA``: q/dO through tensor descriptors, the fused dQ through
one TMA reduce-add per tile) and its pre-Hopper fallback, against the float64 oracle.

On a GPU the launcher turns the path on for bf16/fp16 descriptor-addressable tensors
(:func:`attnkit.kernels.flash.bwd_fused.use_tma`); under the interpreter it is off, so here it is
forced on. Triton's interpreter runs descriptor loads but has no descriptor reduce: the stand-in
below adds the tile into the rows the descriptor addresses, clipped to its shape as TMA clips
(programs run one at a time there, so a load-add-store is the reduction). Each case runs:

* ``tma``: the TMA code (the interpreter counts as a TMA target), 32- and 64-row query tiles;
* ``no-tma-target``: what a ``USE_TMA`` launch compiles to for sm_80 (pointer loads; a 64-row
  tile walks as two 32-row steps).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

from attnkit.kernels.flash import bwd_fused, kernels_bwd, tiles
from tests.kernels.test_flash_bwd_modes import CASES, check_against_oracle

BAND_CASES = [c for c in CASES if c[7] != "sparse"]  # block-sparse never takes TMA


@pytest.fixture
def reduces(monkeypatch):
    """Force ``USE_TMA`` on (block-sparse excepted, as on a GPU) and stand in for the TMA
    reduce-add; yields the list of reduced tiles' shapes."""
    seen = []

    def create_descriptor_reduce(self, kind, desc, value, indices):
        assert kind == interpreter._ir.DESCRIPTOR_REDUCE_KIND.ADD
        ptrs, mask = desc.materialize_pointers(indices)
        zero = interpreter.TensorHandle(np.zeros_like(value.data), value.dtype.scalar)
        old = self.create_masked_load(ptrs, mask, zero, cache_policy=None, is_volatile=False)
        seen.append(value.data.shape)
        self.create_masked_store(ptrs, interpreter.TensorHandle(old.data + value.data, old.dtype.scalar),
                                 mask, None)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_descriptor_reduce",
                        create_descriptor_reduce, raising=False)
    monkeypatch.setattr(bwd_fused, "use_tma", lambda kwargs: not kwargs.get("SPARSE", False))
    return seen


@pytest.mark.parametrize("block_m", [32, 64])
@pytest.mark.parametrize("target", ["tma", "no-tma-target"])
@pytest.mark.parametrize("mode", ["fused", "deterministic"])
@pytest.mark.parametrize("case", BAND_CASES, ids=[c[0] for c in BAND_CASES])
def test_tma_path_matches_the_oracle(case, mode, target, block_m, reduces, monkeypatch):
    monkeypatch.setattr(kernels_bwd, "INTERPRET_HAS_TMA", target == "tma")
    monkeypatch.setattr(tiles, "_INTERPRET_TILE", (block_m, 16, 4, 1))
    if mode == "deterministic":
        monkeypatch.setenv(bwd_fused.ENV, "1")
    else:
        monkeypatch.delenv(bwd_fused.ENV, raising=False)
    check_against_oracle(case, mode)
    # the fused TMA code reduced whole [1, BLOCK_M, D] tiles; nothing else did
    if mode == "fused" and target == "tma":
        assert reduces and {s[:2] for s in reduces} == {(1, block_m)}, reduces
    else:
        assert not reduces, reduces


def _tensor(shape, dtype=torch.bfloat16, **kw):
    return torch.empty(shape, dtype=dtype, **kw)


def test_use_tma_decides_from_layout_and_path(monkeypatch):
    """Outside the interpreter: TMA for band walks on 2-byte tensors whose rows and base are
    16-byte aligned, with an fp32 accumulator of 16-byte rows; never block-sparse."""
    monkeypatch.setattr(bwd_fused, "INTERPRET", False)
    monkeypatch.delenv("ATTNKIT_TMA", raising=False)
    q, do = _tensor((2, 4, 33, 64)), _tensor((2, 4, 33, 64))
    acc = torch.zeros(2, 4, 33 + 128, 64)
    assert bwd_fused.use_tma(dict(Q=q, DO=do, DQ=acc, SPARSE=False))
    assert bwd_fused.use_tma(dict(Q=q, DO=do, DQ=None, SPARSE=False))  # deterministic: no acc
    assert not bwd_fused.use_tma(dict(Q=q, DO=do, DQ=acc, SPARSE=True))
    assert not bwd_fused.use_tma(dict(Q=q.float(), DO=do.float(), DQ=acc, SPARSE=False))
    odd = _tensor((2, 4, 33, 68))[..., :60]  # rows of 136 B: not 16-byte multiples
    assert not bwd_fused.use_tma(dict(Q=odd, DO=odd, DQ=None, SPARSE=False))
    acc_odd = torch.zeros(2, 4, 33 + 128, 6)  # D = 6: 24-byte fp32 rows
    q6 = _tensor((2, 4, 33, 8))
    assert not bwd_fused.use_tma(dict(Q=q6, DO=q6, DQ=acc_odd, SPARSE=False))
    monkeypatch.setenv("ATTNKIT_TMA", "0")
    assert not bwd_fused.use_tma(dict(Q=q, DO=do, DQ=acc, SPARSE=False))


def test_use_tma_is_off_under_the_interpreter():
    q = _tensor((1, 2, 16, 64))
    assert bwd_fused.INTERPRET
    assert not bwd_fused.use_tma(dict(Q=q, DO=q, DQ=None, SPARSE=False))
