"""Compile the flash and decode kernels for sm_80 and sm_90 with Triton's own toolchain (no GPU)
at the first config each autotuner is offered, as captured from the public API
(:mod:`attnkit.kernels.compile_check`), and check: it fits shared memory; on sm_90 (the H100 we
tune for) it does not spill on the dense path; with a band or key mask, varlen, or on sm_80, it
spills at most a few words (the masks' index math adds live registers; measured with triton 3.9
at D = 128, bf16: dk/dv 88 B with a window and key mask, 80 B block-sparse); the block-sparse
path (list walk, runtime branch on partial blocks) is held to the same bound. On sm_90 the
bf16 D = 128 forward and both backward kernels must use Hopper's warpgroup MMA (HGMMA), as the
GPU review measured. This also catches a kernel that only works in the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.harness import run_json_script

SCRIPT = """
import json, warnings
warnings.filterwarnings("ignore")
from attnkit.kernels.compile_check import collect
out = []
for arch, ops, head_dim, names in CASES:
    for r in collect(arch, ops=ops, head_dims=(head_dim,), dtypes=("bf16",), first_only=True,
                     cases_filter=names):
        out.append(r)
print(json.dumps(out))
"""

# (arch, ops, head dim, workload case names: see compile_check/workload.py)
CASES = [
    (90, ("attention",), 128, ("dense+lse", "causal", "window+kpm", "sparse128+kpm", "window+softcap",
                               "window+sinks+alibi", "dense+lse det", "window+kpm det")),
    (90, ("attention",), 64, ("dense+lse", "sparse64", "sparse16")),
    (90, ("attention",), 256, ("dense+lse",)),
    (80, ("attention",), 128, ("dense+lse", "window+kpm")),
    (90, ("decode",), 64, None), (90, ("decode",), 128, None), (90, ("decode",), 256, None),
    (80, ("decode",), 64, None), (80, ("decode",), 128, None), (80, ("decode",), 256, None),
]
FLASH = ("flash.kernels_fwd:_fwd_kernel", "flash.kernels_bwd:_bwd_dkdv_kernel",
         "flash.kernels_dq:_bwd_dq_kernel", "flash.kernels_bwd:_bwd_preprocess")
#: Flags under which a flash kernel is on its dense path (HAS_DLSE: the lse is differentiated;
#: FUSE_DQ: dQ accumulated in the dK/dV kernel; USE_TMA: tensor-descriptor loads).
DENSE = {"HAS_DLSE", "FUSE_DQ", "USE_TMA"}


def _name(r):
    return (f"{r['kernel']} sm_{r['arch']} {r['case']} D={r['head_dim']} tile {r['tile']} "
            f"w{r['num_warps']} s{r['num_stages']} flags {r['flags']}: {r['registers']} regs, "
            f"{r['spill_bytes']} B stack, {r['shared_bytes']} B smem")


@pytest.fixture(scope="module")
def records():
    return run_json_script(SCRIPT.replace("CASES", repr(CASES)), timeout=1200)


def test_flash_kernels_compile_without_spills_for_sm80_and_sm90(records):
    flash = [r for r in records if r["op"] == "attention"]
    # every case launched each flash kernel, and only its first config was compiled
    for arch, _ops, head_dim, names in CASES:
        for name in names or ():
            seen = {r["kernel"] for r in flash
                    if (r["arch"], r["head_dim"], r["case"]) == (arch, head_dim, name)}
            # the default backward fuses dQ into dK/dV; "... det" runs the separate dQ kernel
            # (its forward is the plain case's, which the report files there)
            want = set(FLASH[1:3]) if name.endswith(" det") else set(FLASH[:2])
            assert seen >= want, f"sm_{arch} D={head_dim} {name}: only {sorted(seen)}"
    assert {r["kernel"] for r in flash} == set(FLASH)
    assert all(r["first"] for r in flash)
    bad = [_name(r) for r in flash if not r["fits"] or r["spill_bytes"] > (
        0 if r["arch"] == 90 and set(r["flags"]) <= DENSE else 128)]
    assert not bad, "spilling or oversized kernels:\n" + "\n".join(bad)


def test_flash_uses_wgmma_on_sm90(records):
    """bf16, D = 128, dense: the forward and both backward kernels issue HGMMA (wgmma); the
    deterministic backward's dK/dV loop runs 64 query rows per step (a 16-row tile makes both
    score-side products N = 16 wgmma from shared memory) with no spill; the fused dK/dV/dQ
    kernel's first tile does not spill either."""
    def dense(case):
        return {(r["kernel"], "FUSE_DQ" in r["flags"]): r for r in records
                if r["op"] == "attention" and r["arch"] == 90 and r["head_dim"] == 128
                and r["case"] == case}

    default, det = dense("dense+lse"), dense("dense+lse det")
    wanted = {"fwd": (default, (FLASH[0], False)), "dkdv+dq": (default, (FLASH[1], True)),
              "dkdv": (det, (FLASH[1], False)), "dq": (det, (FLASH[2], False))}
    for label, (recs, key) in wanted.items():
        assert key in recs, f"{label} not compiled: {sorted(recs)}"
        assert recs[key]["hgmma"] > 0, f"no HGMMA in {_name(recs[key])}"
        assert recs[key]["spill_bytes"] == 0, _name(recs[key])
    dkdv = det[(FLASH[1], False)]
    assert dkdv["block_m"] >= 64, _name(dkdv)


def test_fused_dkdv_offers_a_64_row_tile_first_on_sm90(records):
    """bf16, D = 128, sm_90: the default (fused dK/dV/dQ) kernel's first tile has 64 query rows
    (score products N = 64 instead of 32), loads q/dO through TMA and does not spill, dense and on
    the band cases; soft-capping keeps the 32-row tile (64 rows spill 136 B there). On sm_80 the
    same launch compiles without TMA (the kernel checks the target)."""
    fused = {r["case"]: r for r in records if r["kernel"] == FLASH[1] and "FUSE_DQ" in r["flags"]
             and r["arch"] == 90 and r["head_dim"] == 128}
    for case in ("dense+lse", "causal", "window+kpm", "window+sinks+alibi"):
        r = fused[case]
        assert r["block_m"] >= 64 and r["spill_bytes"] == 0 and r["tma_loads"] > 0, _name(r)
    assert fused["window+softcap"]["block_m"] == 32, _name(fused["window+softcap"])
    sm80 = [r for r in records if r["kernel"] == FLASH[1] and r["arch"] == 80]
    assert sm80 and all(r["tma_loads"] == 0 and r["hgmma"] == 0 for r in sm80), sm80


def test_decode_kernels_compile_without_spills(records):
    """The Triton split-KV decode and merge kernels at the tiles their launcher picks, for
    D in {64, 128, 256}, 4 rows (GQA group 4, one token) or 32 (group 8, 4 tokens) per KV head
    (measured: 27-140 registers at D = 128 on sm_90, no stack)."""
    decode = [r for r in records if r["op"] == "decode"]
    assert len(decode) == 3 * 2 * 2 * 2  # D, arch, (group, tokens), split + merge
    bad = [_name(r) for r in decode if r["spill_bytes"] or not r["fits"]]
    assert not bad, "spilling or oversized kernels:\n" + "\n".join(bad)


def test_compile_report_cli_filters_and_writes_json(tmp_path):
    """``compile-report`` through the parser its top-level CLI adds: the filters reach the
    records (one kernel, one head dim, one dtype, first configs only) and --json holds them."""
    import argparse

    from attnkit.kernels.compile_check.cli import add_compile_report_parser

    top = argparse.ArgumentParser(prog="attnkit")
    add_compile_report_parser(top.add_subparsers(dest="command"))
    out = tmp_path / "report.json"
    argv = ["--arch", "90", "--kernel", "_bwd_preprocess", "--head-dim", "64", "--dtype", "bf16",
            "--op", "attention", "--first-only", "--json", str(out)]
    args = top.parse_args(["compile-report", *argv])
    assert (args.arch, args.kernel, args.head_dim, args.first_only) == (
        90, ["_bwd_preprocess"], [64], True)
    assert args.func.__name__ == "run_compile_report"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys; from attnkit.kernels.compile_check.cli import main; "
            f"sys.exit(main({argv!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "_bwd_preprocess" in proc.stdout and "regs" in proc.stdout
    records = json.loads(out.read_text())
    assert records and {(r["kernel"], r["head_dim"], r["dtype"], r["first"]) for r in records} == {
        ("flash.kernels_bwd:_bwd_preprocess", 64, "bf16", True)}
    assert all(r["registers"] > 0 and r["arch"] == 90 for r in records)


def test_block_sparse_forward_loads_are_pipelined(records):
    """The block-sparse forward walks two flat loops (full tiles, then partial ones) with no
    runtime branch, so its K/V loads are asynchronous copies or TMA (the nested list walk it
    replaced compiled to plain loads: LDGSTS = 0, GPU review 2.5)."""
    sparse = [r for r in records if r["kernel"] == FLASH[0] and r["arch"] == 90
              and r["case"].startswith("sparse") and r["head_dim"] in (64, 128)]
    assert sparse, "no block-sparse forward compiled"
    bad = [_name(r) for r in sparse if r["cp_async"] + r["tma_loads"] == 0]
    assert not bad, "block-sparse forward without asynchronous loads:\n" + "\n".join(bad)


WIDE_SCRIPT = """
import json, warnings
warnings.filterwarnings("ignore")
import torch
import attnkit
from attnkit import Causal, Dense
from attnkit.kernels.compile_check.compile import compile_job, job_for
from attnkit.kernels.compile_check.workload import Case, capture_cases

def call(pattern):
    def run():
        q, k, v = (torch.empty(1, 2, 256, 128, dtype=torch.bfloat16) for _ in range(3))
        attnkit.attention(q, k, v, pattern, backend="triton")
    return run

rec = capture_cases([Case("attention", "dense256", 128, "bf16", call(Dense())),
                     Case("attention", "causal256", 128, "bf16", call(Causal()))])
assert not rec.problems, rec.problems
out = []
for launch in rec.launches:
    if launch.first and "_fwd_kernel" in launch.kernel:
        u = compile_job(job_for(launch, 90)).as_dict()
        out.append(dict(case=launch.case["case"], tile=launch.config, **u))
print(json.dumps(out))
"""


def test_flash_forward_offers_a_128x128_tile_first_at_bf16_d128():
    """Dense with whole 128-key tiles (the one-loop walk) and causal, bf16, D = 128: the first tile
    is 128 x 128 (the tutorial's Hopper tile; review 2.2a) and compiles for sm_90 without spills;
    the dense one-loop walk loads K/V through TMA descriptors."""
    got = {r["case"]: r for r in run_json_script(WIDE_SCRIPT, timeout=900)}
    assert set(got) == {"dense256", "causal256"}, got
    for case, r in got.items():
        assert (r["tile"]["BLOCK_M"], r["tile"]["BLOCK_N"]) == (128, 128), (case, r)
        assert r["spill_bytes"] == 0 and r["hgmma"] > 0, (case, r)
    # the one-loop dense walk loads K/V by TMA (measured: 6 UTMALDG, 196 registers)
    assert got["dense256"]["tma_loads"] > 0, got["dense256"]
