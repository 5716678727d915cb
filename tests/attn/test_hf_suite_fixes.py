"""Fixes found by running transformers' own model tests with attnkit standing in for "sdpa"
(scripts/hf_model_tests.py), each reproduced small."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import attnkit.attn.hf as akhf  # noqa: E402
from attnkit.attn.hf import interface  # noqa: E402


def test_torch_compile_on_the_cpu_runs_attnkit_outside_the_graph():
    """transformers' compile tests (GPT-2's test_generate_compile_model_forward_fullgraph and
    friends) traced into the CPU torch backend and failed on a data-dependent guard; now the call
    graph-breaks with a one-time warning and gives the eager numbers, and fullgraph=True fails
    with the reason instead of a guard error deep in attnkit."""
    def one_call(q, k, v):
        return interface._softmax_attention(q, k, v, akhf.model_pattern(True, None, None), None,
                                            None, None)

    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    want = one_call(q, k, v)
    torch._dynamo.reset()
    akhf._warned.discard("cpu-compile")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = torch.compile(one_call, backend="eager")(q, k, v)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert any("outside the graph" in str(w.message) for w in seen)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="torch.compile cannot trace"):
        torch.compile(one_call, backend="eager", fullgraph=True)(q, k, v)
    torch._dynamo.reset()
