"""The score-mod benchmark kinds (Gemma-2-style soft-cap, gpt-oss-style sinks): attnkit and
FlexAttention build, agree with the float64 oracle, and a wrong baseline is caught, not timed."""

from __future__ import annotations

import pytest
import torch

from attnkit.bench import KINDS, Point, RunOptions, run_point
from attnkit.bench.kinds import attention as attention_kinds
from attnkit.bench.kinds import score_mods
from attnkit.bench.kinds.common import qkv
from attnkit.bench.registry import Unavailable

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# N = 192 is past gpt-oss's window of 128 keys; Gemma 2's 4096 is the model's own (causal here)
KINDS_ = ("gemma2-softcap", "gptoss-sinks")


def _point(kind, impl, mode="fwd", dtype="float32"):
    return Point(kind, impl, mode, 1, 2, 192, 16, dtype, "cpu")


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention eagerly on the CPU (compiling takes ~20 s per shape)."""
    monkeypatch.setenv("ATTNKIT_BENCH_FLEX_CPU", "1")
    monkeypatch.setattr(attention_kinds, "_compiled_flex", lambda: flex_attention)


@pytest.mark.parametrize("kind", KINDS_)
def test_attnkit_and_flex_compute_the_same_attention(kind, eager_flex):
    outs = {}
    for impl in ("attnkit", "flex"):
        torch.manual_seed(0)  # the same q, k, v for both (and the same sinks: a fixed seed)
        wl = KINDS[kind].impls[impl].build(_point(kind, impl), False)  # checks the oracle
        with torch.no_grad():
            outs[impl] = wl.fn()
    torch.testing.assert_close(outs["flex"], outs["attnkit"], atol=2e-5, rtol=1e-4)


def test_a_baseline_that_disagrees_with_the_oracle_is_an_error_row(monkeypatch):
    """flex without its score_mod (soft-cap dropped) must not be timed as if it were right."""
    monkeypatch.setenv("ATTNKIT_BENCH_FLEX_CPU", "1")

    def no_score_mod(q, k, v, score_mod=None, **kw):
        return flex_attention(q, k, v, **kw)

    monkeypatch.setattr(attention_kinds, "_compiled_flex", lambda: no_score_mod)
    # unit-variance D = 16 inputs rarely score past a cap of 50: scale them so the cap matters
    monkeypatch.setattr(score_mods, "qkv", lambda point, rg: [30 * t for t in qkv(point, rg)])
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="disagrees with the float64 oracle"):
        KINDS["gemma2-softcap"].impls["flex"].build(_point("gemma2-softcap", "flex"), False)
    # attnkit on the same scaled inputs passes the same check
    KINDS["gemma2-softcap"].impls["attnkit"].build(_point("gemma2-softcap", "attnkit"), False)


def test_cpu_flex_backward_and_default_cpu_flex_are_skipped_rows(monkeypatch):
    monkeypatch.delenv("ATTNKIT_BENCH_FLEX_CPU", raising=False)
    row = run_point(_point("gptoss-sinks", "flex"), RunOptions(cpu_budget_s=0.0, min_reps=1))
    assert row["status"] == "skipped" and "ATTNKIT_BENCH_FLEX_CPU" in row["reason"]
    monkeypatch.setenv("ATTNKIT_BENCH_FLEX_CPU", "1")
    with pytest.raises(Unavailable, match="no backward on the CPU"):
        KINDS["gptoss-sinks"].impls["flex"].build(_point("gptoss-sinks", "flex", "fwd+bwd"), True)


@pytest.mark.parametrize("kind", KINDS_)
def test_attnkit_row_runs_forward_and_backward(kind):
    row = run_point(_point(kind, "attnkit", "fwd+bwd"), RunOptions(cpu_budget_s=0.0, min_reps=1))
    assert row["status"] == "ok", row["reason"]
