"""Errors raised before any communication (one process, no process group needed)."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.distributed import context_parallel_attention


def _qkv(n=8):
    return torch.randn(1, 2, n, 4), torch.randn(1, 1, n, 4), torch.randn(1, 1, n, 4)


def test_bad_layout_and_shapes_name_the_argument():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="layout must be one of .*'zig'"):
        context_parallel_attention(q, k, v, attnkit.Causal(), layout="zig")
    with pytest.raises(ValueError, match="q must be a 4-D tensor"):
        context_parallel_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        context_parallel_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="must share B, the shard length and D"):
        context_parallel_attention(q[:, :, :4], k, v)
    with pytest.raises(ValueError, match="valid_keys must be a bool"):
        context_parallel_attention(q, k, v, valid_keys=torch.ones(1, 8))


def test_no_process_group():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        context_parallel_attention(q, k, v, attnkit.Causal())


def test_hf_attention_rejects_a_cache_and_dense_masks():
    pytest.importorskip("transformers")
    from attnkit.distributed import hf

    q, k, v = _qkv()
    with pytest.raises(ValueError, match="KV cache"):
        hf.cp_attention_forward(torch.nn.Module(), q[:, :, :1], k, v, None)
    with pytest.raises(ValueError, match="only a 2-D"):
        hf.cp_attention_forward(torch.nn.Module(), q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="soft-capping"):
        hf.cp_attention_forward(torch.nn.Module(), q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match="layout must be one of"):
        hf.configure(layout="ring")
