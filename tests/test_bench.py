"""The benchmark harness (attnkit/bench): FLOP counts, rows for OOM and failures, slope fits,
peak-memory measurement, speed-ups. No timing assertions: only what the harness computes."""

from __future__ import annotations

import importlib.machinery
import math
import sys
import time
import types

import pytest
import torch

from attnkit import Causal, Dense, SlidingWindow
from attnkit.bench import KINDS, Impl, Kind, Point, RunOptions, Unavailable, Workload, fit_loglog_slope
from attnkit.bench.flops import attention_bytes, attention_flops, linear_attention_flops, lora_flops
from attnkit.bench.memory import measure_peak
from attnkit.bench.report import series_slopes
from attnkit.bench.runner import classify_error, run_point, run_points
from attnkit.bench.sweep import add_speedups, build_points, quick_grid

# ------------------------------------------------------------------------------ FLOP counts


def test_dense_and_causal_flops_follow_flash_attention():
    # B=2, H=3, N=128, D=64: 4 * 2 * 3 * 128 * 128 * 64
    assert attention_flops(2, 3, 128, 128, 64, Dense()) == 25_165_824
    assert attention_flops(2, 3, 128, 128, 64, None) == 25_165_824
    assert attention_flops(2, 3, 128, 128, 64, Causal()) == 12_582_912  # halved, not N(N+1)/2
    assert attention_flops(2, 3, 128, 128, 64, Dense(), "bwd") == 62_914_560  # x 2.5
    assert attention_flops(2, 3, 128, 128, 64, Dense(), "fwd+bwd") == 88_080_384  # x 3.5


def test_window_flops_count_visited_pairs():
    # N = 8, SlidingWindow(3): query i sees min(i, 3) + 1 keys -> 1 + 2 + 3 + 4 * 5 = 26 pairs
    assert attention_flops(1, 1, 8, 8, 16, SlidingWindow(3)) == 4 * 26 * 16
    assert attention_flops(2, 4, 8, 8, 16, SlidingWindow(3), "fwd+bwd") == 4 * 2 * 4 * 26 * 16 * 3.5
    # two-sided window of 1: 2 + 3 * 6 + 2 = 22 pairs
    assert attention_flops(1, 1, 8, 8, 1, SlidingWindow(1, 1)) == 4 * 22


def test_block_sparse_flops_count_visited_pairs_per_head():
    import attnkit

    if not hasattr(attnkit, "BlockSparse"):
        pytest.skip("attnkit.BlockSparse is not available")
    # N = 64, blocks of 16 -> 4 x 4 blocks; head 0: the diagonal (4 blocks = 1024 pairs),
    # head 1: everything (4096 pairs). FLOPs = 4 * D * (pairs of head 0 + pairs of head 1).
    layout = torch.stack([torch.eye(4, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool)])
    pattern = attnkit.BlockSparse(layout, 16)
    assert attention_flops(1, 2, 64, 64, 8, pattern) == 4 * 8 * (1024 + 4096)
    one_head = attnkit.BlockSparse(torch.eye(4, dtype=torch.bool)[None], 16)
    assert attention_flops(3, 2, 64, 64, 8, one_head, "bwd") == 4 * 3 * 2 * 1024 * 8 * 2.5


def test_linear_and_lora_flops():
    assert linear_attention_flops(2, 3, 100, 16, 32) == 4 * 2 * 3 * 100 * 16 * 32
    assert linear_attention_flops(1, 1, 10, 4, 4, "bwd") == 4 * 10 * 16 * 2.5
    # 10 tokens, in 8, out 6, rank 2: fwd 2*10*(48 + 16 + 12); bwd 2*10*(48 + 2*2*(8 + 6))
    assert lora_flops(10, 8, 6, 2) == 1520
    assert lora_flops(10, 8, 6, 2, "bwd") == 2080
    assert lora_flops(10, 8, 6, 2, "fwd+bwd") == 3600


def test_bytes_and_bad_mode():
    # fwd: q, k, v, o in bf16 (2 bytes) + fp32 LSE
    assert attention_bytes(1, 2, 16, 8, 2) == 4 * 2 * 16 * 8 * 2 + 2 * 16 * 4
    with pytest.raises(ValueError, match="mode must be one of"):
        attention_flops(1, 1, 1, 1, 1, None, "backward")


def test_registered_kinds_count_their_pattern():
    p = Point("window", "attnkit", "fwd", 1, 2, 4096, 64, "float32", "cpu")
    window = SlidingWindow(127)  # the CPU grid's window: 128 keys
    assert KINDS["window"].flops(p) == 4 * 2 * window.visited_pairs(4096, 4096) * 64
    causal = Point("causal", "attnkit", "fwd+bwd", 1, 2, 256, 64, "float32", "cpu")
    assert KINDS["causal"].flops(causal) == 4 * 2 * 256 * 256 / 2 * 64 * 3.5
    lora = Point("lora", "attnkit", "fwd", 2, 0, 64, 0, "float32", "cpu", hidden=32, rank=4)
    assert KINDS["lora"].flops(lora) == lora_flops(128, 32, 32, 4)


# ---------------------------------------------------------------------------------- slopes


def test_slope_fit_on_synthetic_data():
    ns = [256, 512, 1024, 2048, 4096]
    assert fit_loglog_slope(ns, [3e-6 * n**2 for n in ns]) == pytest.approx(2.0)
    assert fit_loglog_slope(ns, [0.5 * n for n in ns]) == pytest.approx(1.0)
    # a flat (overhead-bound) start is left out: only the upper half of N is fitted
    flat_then_quadratic = [5.0, 5.0, 1024**2 / 1e5, 2048**2 / 1e5, 4096**2 / 1e5]
    assert fit_loglog_slope(ns, flat_then_quadratic) == pytest.approx(2.0)
    assert fit_loglog_slope(ns, flat_then_quadratic, upper_half=False) < 1.8
    assert fit_loglog_slope([512], [1.0]) is None
    assert fit_loglog_slope([512, 1024], [1.0, 2.0]) is None  # two points are no slope
    assert fit_loglog_slope([256, 512, 1024], [1.0, 2.0, 4.0]) == pytest.approx(1.0)
    # the upper half keeps at least three points: 4 measured N -> the top three
    assert fit_loglog_slope([128, 256, 512, 1024], [9.0, 1.0, 2.0, 4.0]) == pytest.approx(1.0)
    assert fit_loglog_slope([512, 1024], [1.0, 0.0]) is None  # unusable zero


def test_series_slopes_group_lines():
    rows = [{"kind": "dense", "impl": "x", "mode": "fwd", "d": 64, "dtype": "float32", "status": "ok",
             "n": n, "time_ms": n**2 / 1e3, "peak_mem_bytes": n * 100} for n in (128, 256, 512, 1024)]
    rows.append({**rows[0], "status": "oom", "n": 4096, "time_ms": None})
    (s,) = series_slopes(rows)
    assert s["points"] == 4
    assert s["time_slope"] == pytest.approx(2.0) and s["memory_slope"] == pytest.approx(1.0)


# -------------------------------------------------------------------- rows: oom, skip, error


@pytest.fixture
def fake_kind():
    """A registered kind whose implementations fail in chosen ways (removed afterwards)."""

    def build_ok(point, requires_grad):
        x = torch.randn(point.n, 8, requires_grad=requires_grad)
        return Workload(lambda: (x * 2).sum(-1), [x])

    def build_oom(point, requires_grad):
        if point.n >= 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return build_ok(point, requires_grad)

    def build_missing(point, requires_grad):
        raise Unavailable("fakelib is not installed")

    def build_broken(point, requires_grad):
        raise ValueError("a genuine bug")

    def build_big(point, requires_grad):  # N MiB in, N MiB out, N MiB of gradient
        x = torch.randn(point.n * 2**20 // 4, requires_grad=requires_grad)
        return Workload(lambda: x * 2, [x])

    kind = Kind("fake", "fake", "test kind", lambda p: 10.0 * p.n, lambda p: 4.0 * p.n, 1.0)
    for name, build, baseline in (("ok", build_ok, False), ("oom", build_oom, True),
                                  ("missing", build_missing, True), ("broken", build_broken, True)):
        kind.impls[name] = Impl(name, build, baseline, predict_bytes=lambda p: 1e6 * p.n)
    kind.impls["big"] = Impl("big", build_big, False)
    kind.impls["compiled"] = Impl("compiled", build_ok, True, tier=2)
    KINDS["fake"] = kind
    yield kind
    del KINDS["fake"]


def _pt(impl, n, mode="fwd+bwd"):
    return Point("fake", impl, mode, 1, 1, n, 8, "float32", "cpu")


def test_ok_row_has_time_flops_and_memory(fake_kind):
    row = run_point(_pt("ok", 32), RunOptions(cpu_budget_s=0.01))
    assert row["status"] == "ok", row["reason"]
    assert row["time_ms"] > 0 and row["flops"] == 320 and row["tflops"] > 0 and row["gbps"] > 0
    assert row["baseline"] is False
    # a few hundred bytes of work: a whole-process figure (or garbage) would be far larger
    assert isinstance(row["peak_mem_bytes"], int) and row["peak_mem_bytes"] < 16 * 2**20


def test_fwd_bwd_peak_memory_includes_the_gradients(fake_kind):
    # x * 2 on 32 MiB: the output (32 MiB) and x's gradient (32 MiB) are both alive at the end of
    # the call. The warm-up call's gradient must not count as "in use before" the measured call.
    mib = 2**20
    for mode in ("fwd+bwd", "bwd"):
        row = run_point(_pt("big", 32, mode), RunOptions(cpu_budget_s=0.0, min_reps=1))
        assert row["status"] == "ok", row["reason"]
        assert row["peak_mem_bytes"] >= 30 * mib, (mode, row["peak_mem_bytes"] / mib)
    assert row["peak_mem_bytes"] < 100 * mib
    fwd_bwd = run_point(_pt("big", 32), RunOptions(cpu_budget_s=0.0, min_reps=1))
    assert fwd_bwd["peak_mem_bytes"] >= 56 * mib, fwd_bwd["peak_mem_bytes"] / mib  # output + gradient


def test_gpu_timer_gets_a_call_without_synchronize(fake_kind, monkeypatch):
    """do_bench records its end event after the call returns: a synchronize inside the timed call
    would add the host's wake-up to every sample. The warm-up and memory calls do synchronize."""
    from attnkit.bench import runner
    from attnkit.bench.timing import Timing

    syncs: list[str] = []
    monkeypatch.setattr(runner, "_sync", syncs.append)
    monkeypatch.setattr(runner, "measure_peak", lambda fn, device, setup=None, **_: (setup(), fn(), 0)[2])
    timed_syncs = []

    def fake_time_fn(fn, device, **_):
        before = len(syncs)
        fn()
        timed_syncs.append(len(syncs) - before)
        return Timing(1.0, 1.0, 1.0, -1)

    monkeypatch.setattr(runner, "time_fn", fake_time_fn)
    for mode in ("fwd", "bwd", "fwd+bwd"):
        syncs.clear()
        row = run_point(Point("fake", "ok", mode, 1, 1, 32, 8, "float32", "cuda:0"))
        assert row["status"] == "ok", row["reason"]
        assert timed_syncs[-1] == 0, mode
        assert syncs == ["cuda:0", "cuda:0"], mode  # the warm-up call and the measured call


def test_compiled_baselines_are_skipped_near_the_deadline(fake_kind):
    opts = RunOptions(deadline=time.time() + 30, compile_reserve_s=60, cpu_budget_s=0.01)
    rows = list(run_points([_pt("ok", 8), _pt("compiled", 8)], opts))
    assert [r["status"] for r in rows] == ["ok", "skipped"]
    assert "compiles first" in rows[1]["reason"]
    opts = RunOptions(deadline=time.time() + 300, compile_reserve_s=60, cpu_budget_s=0.01)
    assert [r["status"] for r in run_points([_pt("compiled", 8)], opts)] == ["ok"]


def test_oom_is_a_row_and_stops_the_line(fake_kind):
    rows = list(run_points([_pt("oom", 32), _pt("oom", 64), _pt("oom", 128)], RunOptions(cpu_budget_s=0.01)))
    assert [r["status"] for r in rows] == ["ok", "oom", "oom"]
    assert "out of memory" in rows[1]["reason"].lower()
    assert rows[2]["reason"] == "out of memory already at N = 64"


def test_cpu_memory_cap_records_oom_without_running(fake_kind):
    row = run_point(_pt("ok", 4096), RunOptions(mem_cap_bytes=1e9))  # predicted 4.1 GB
    assert row["status"] == "oom" and "memory cap" in row["reason"] and row["time_ms"] is None


def test_unavailable_and_errors_are_rows(fake_kind):
    skipped = run_point(_pt("missing", 32))
    assert (skipped["status"], skipped["reason"]) == ("skipped", "fakelib is not installed")
    broken = run_point(_pt("broken", 32))
    assert broken["status"] == "error" and "a genuine bug" in broken["reason"]


def test_time_budget_and_slow_lines_skip(fake_kind):
    rows = list(run_points([_pt("ok", 8), _pt("ok", 16)], RunOptions(deadline=0.0)))
    assert {r["status"] for r in rows} == {"skipped"} and "time budget" in rows[0]["reason"]
    rows = list(run_points([_pt("ok", 8), _pt("ok", 16)], RunOptions(slow_s=0.0, cpu_budget_s=0.01)))
    assert [r["status"] for r in rows] == ["ok", "skipped"] and "N = 8 already took" in rows[1]["reason"]


def test_classify_error():
    assert classify_error(MemoryError())[0] == "oom"
    assert classify_error(RuntimeError("No available kernel. Aborting execution."))[0] == "skipped"
    assert classify_error(NotImplementedError("no backward on CPU"))[0] == "skipped"
    assert classify_error(KeyError("x"))[0] == "error"


def test_speedup_against_the_best_baseline():
    base = {"kind": "dense", "mode": "fwd", "batch": 1, "heads": 1, "n": 8, "d": 8, "dtype": "f",
            "hidden": 0, "rank": 0}
    rows = add_speedups([
        {**base, "impl": "a", "baseline": False, "status": "ok", "time_ms": 2.0},
        {**base, "impl": "b", "baseline": True, "status": "ok", "time_ms": 3.0},
        {**base, "impl": "c", "baseline": True, "status": "ok", "time_ms": 5.0},
        {**base, "impl": "d", "baseline": True, "status": "oom", "time_ms": None},
        {**base, "n": 16, "impl": "a", "baseline": False, "status": "ok", "time_ms": 2.0},
    ])
    assert rows[0]["speedup"] == pytest.approx(1.5) and rows[0]["best_baseline"] == "b"
    assert rows[4]["speedup"] is None  # no baseline ran at N = 16


# ------------------------------------------------------------------------------ measurement


def test_cpu_peak_memory_is_measured():
    mib = 2**20

    def allocate():
        x = torch.ones(64 * mib // 4)  # 64 MiB, touched
        return x.sum()

    peak = measure_peak(allocate, "cpu")
    assert 56 * mib < peak < 200 * mib
    assert measure_peak(lambda: None, "cpu") < 16 * mib


def test_every_builtin_cpu_point_builds_and_runs():
    """One tiny forward+backward point of each attnkit implementation (and SDPA's math backend
    with the pattern's explicit mask) on the CPU."""
    grid = quick_grid("cpu")
    names = ("dense", "causal", "window", "bigbird", "longformer", "linear", "lora")
    kinds = [k for k in names if k in KINDS]
    for kind in kinds:
        impls = [i for i in KINDS[kind].impls if i.startswith("attnkit") or i == "sdpa-math"]
        lora = kind == "lora"
        for impl in impls:
            mode = "fwd" if impl == "sdpa-math" else "fwd+bwd"
            p = Point(kind, impl, mode, 1, 0 if lora else 2, 64, 0 if lora else 16, grid.dtype, "cpu",
                      hidden=32 if lora else 0, rank=4 if lora else 0)
            row = run_point(p, RunOptions(cpu_budget_s=0.0, min_reps=1))
            assert row["status"] == "ok", (kind, impl, row["reason"])
            assert math.isfinite(row["time_ms"])


def test_quick_grid_points_are_ordered_by_n_within_a_line():
    points = build_points(quick_grid("cpu"))
    lines: dict = {}
    for p in points:
        lines.setdefault(p.series, []).append(p.n)
    assert all(ns == sorted(ns) for ns in lines.values())
    assert {p.kind for p in points} >= {"dense", "causal", "window", "linear", "lora"}


# --------------------------------------------------- the baselines compute the same attention


def _fake_flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
    """flash-attn's documented semantics ([B, N, H, D]; query i sees keys
    [i - window_size[0], i + window_size[1]], -1 = unbounded; causal: j <= i), in fp32."""
    n = q.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    ok = torch.ones(n, n, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if window_size[0] >= 0:
        ok &= j >= i - window_size[0]
    if window_size[1] >= 0:
        ok &= j <= i + window_size[1]
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ok).transpose(1, 2)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kind", ["dense", "causal", "window", "bigbird", "longformer"])
def test_baselines_compute_the_same_attention_as_attnkit(kind, monkeypatch):
    """Each baseline is given the same pattern as attnkit (SDPA's dense mask, FlexAttention's
    mask_mod, flash-attn's causal/window_size), so the comparison is like for like. N = 256 is
    past the CPU window (128 keys) and spans 8 sparse blocks of 32."""
    from attnkit.attn.functional import attention
    from attnkit.bench.kinds import attention as kinds

    if kind not in KINDS:
        pytest.skip(f"kind {kind} is not registered (block-sparse attention unavailable)")

    def run(impl, dtype="float32"):
        torch.manual_seed(0)
        wl = KINDS[kind].impls[impl].build(Point(kind, impl, "fwd", 1, 2, 256, 16, dtype, "cpu"), False)
        with torch.no_grad():
            return wl.fn().float(), wl.params

    ref, _ = run("attnkit")
    sdpa, _ = run("sdpa-math")
    torch.testing.assert_close(sdpa, ref, atol=2e-5, rtol=1e-4)

    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        pass
    else:  # eagerly (compiling takes ~20 s per shape on the CPU): the same block mask
        monkeypatch.setenv("ATTNKIT_BENCH_FLEX_CPU", "1")
        monkeypatch.setattr(kinds, "_compiled_flex", lambda: flex_attention)
        flex, _ = run("flex")
        torch.testing.assert_close(flex, ref, atol=2e-5, rtol=1e-4)

    if kind in ("dense", "causal", "window"):  # flash-attn takes these three
        pattern_fn = KINDS[kind].impls["flash-attn"].build.args[0]
        pattern = pattern_fn(Point(kind, "attnkit", "fwd", 1, 2, 256, 16, "float32", "cpu"))
        fake = types.ModuleType("flash_attn")
        fake.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
        fake.flash_attn_func = _fake_flash_attn_func
        monkeypatch.setitem(sys.modules, "flash_attn", fake)
        monkeypatch.setattr(kinds, "_on_cuda", lambda point: True)  # the GPU code path, CPU tensors
        monkeypatch.setitem(kinds.WINDOW, "cuda", kinds.WINDOW["cpu"])
        flash, (q, k, v) = run("flash-attn", "bfloat16")
        expected = attention(*(t.float().transpose(1, 2) for t in (q, k, v)), pattern,
                             backend="torch").transpose(1, 2)
        torch.testing.assert_close(flash, expected, atol=2e-5, rtol=1e-4)


def test_a_baseline_that_does_not_import_is_skipped_with_the_reason(monkeypatch):
    """A flash-attn wheel built against another torch raises at import: a skipped row saying so,
    not an error (pytest benchmarks/ re-raises errors)."""
    from attnkit.bench.kinds import attention as kinds

    monkeypatch.setattr(kinds.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    monkeypatch.setattr(kinds, "_on_cuda", lambda point: True)
    point = Point("causal", "flash-attn", "fwd", 1, 2, 64, 16, "bfloat16", "cpu")
    with pytest.raises(Unavailable, match="flash-attn is installed but does not import"):
        KINDS["causal"].impls["flash-attn"].build(point, False)


def test_peft_baseline_adapters_run_in_the_points_dtype():
    """PEFT would make its adapters fp32 on a bf16 base (autocast_adapter_dtype); the other LoRA
    rows run bf16 adapters, so the PEFT row must too."""
    pytest.importorskip("peft")
    from attnkit.bench.kinds import lora as kinds

    model = kinds._peft_model(Point("lora", "peft", "fwd", 1, 0, 16, 0, "bfloat16", "cpu", 64, 8))
    dtypes = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes and set(dtypes.values()) == {torch.bfloat16}, dtypes


def test_an_unknown_block_sparse_layout_is_refused_not_run_as_another():
    """The sparse kinds are built by name from one table; a name not in it raises (it used to fall
    through to Longformer silently)."""
    from attnkit.bench.kinds import SPARSE_BUILDERS, sparse_pattern

    assert set(SPARSE_BUILDERS) >= {"bigbird", "longformer"}
    with pytest.raises(ValueError, match=r"unknown block-sparse layout 'bigbrid'.*bigbird"):
        sparse_pattern("bigbrid", 256, "cpu")
    with pytest.raises(ValueError, match="unknown device type 'tpu'"):
        sparse_pattern("bigbird", 256, "tpu")


def test_kinds_are_split_per_op():
    """attention, linear and LoRA kinds live in their own modules and register on import."""
    from attnkit.bench import kinds

    for name, module in (("dense", kinds.attention), ("linear", kinds.linear),
                         ("lora", kinds.lora)):
        assert name in KINDS
        assert KINDS[name].impls["attnkit"].build.__module__ == module.__name__ or \
            getattr(KINDS[name].impls["attnkit"].build, "func", None).__module__ == module.__name__


def test_table_puts_baselines_beside_attnkit_with_time_and_memory_ratios():
    from attnkit.bench.report import format_table, skipped_baselines, table_rows

    base = {"kind": "dense", "mode": "fwd", "d": 64, "hidden": 0, "rank": 0, "dtype": "float32",
            "n": 1024, "tflops": 1.0, "reason": None}
    rows = [{**base, "impl": "attnkit", "baseline": False, "status": "ok", "time_ms": 2.0,
             "peak_mem_bytes": 4 * 2**20, "speedup": 1.5, "best_baseline": "sdpa-flash"},
            {**base, "impl": "sdpa-flash", "baseline": True, "status": "ok", "time_ms": 3.0,
             "peak_mem_bytes": 4 * 2**20, "speedup": None, "best_baseline": None},
            {**base, "impl": "sdpa-math", "baseline": True, "status": "ok", "time_ms": 8.0,
             "peak_mem_bytes": 64 * 2**20, "speedup": None, "best_baseline": None},
            {**base, "impl": "flex", "baseline": True, "status": "skipped", "time_ms": None,
             "peak_mem_bytes": None, "speedup": None, "best_baseline": None,
             "reason": "FlexAttention on the CPU compiles for ~20 s per shape"}]
    cells = table_rows(rows)
    assert [c[1].strip() for c in cells] == ["attnkit", "sdpa-flash", "sdpa-math"]
    ours, flash, math_ = cells
    assert ours[8:11] == ["1.50x", "1.00x", "vs sdpa-flash"]  # speed-up, mem ratio vs fastest
    assert flash[8:10] == ["1.50x", "1.00x"] and math_[8:10] == ["4.00x", "16.00x"]
    assert "mem ratio" in format_table(rows).splitlines()[0]
    assert skipped_baselines(rows) == ["flex: FlexAttention on the CPU compiles for ~20 s per shape "
                                       "(1 point)"]
