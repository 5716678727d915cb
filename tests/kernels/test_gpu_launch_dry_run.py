"""A dry run of the GPU launch paths, on the CPU.

The CPU tests run the kernels under ``TRITON_INTERPRET=1``, which takes the launchers' interpreter
branches (fixed tiles, no autotuner). The GPU branches (autotuned kernels, their prune functions,
grid lambdas, the arguments each launch passes) would otherwise first run on a GPU. Here, in a
subprocess with the interpreter off, the compile report's capture
(:mod:`attnkit.kernels.compile_check.capture`) drives the public API on CPU tensors and intercepts
every ``kernel[grid](...)`` launch instead of compiling it: for autotuned kernels Triton's own
``prune_configs`` runs (our prune functions, called the way Triton calls them), and for every
config left the launch must name each kernel parameter exactly once, pass no meta-parameter the
config also sets, and give a grid within CUDA's limits. Nothing is computed; only the launch
plumbing is checked. The same capture feeds the compile tests, so this list of kernels is also
what they can see.
"""

from __future__ import annotations

import pytest

from tests.harness import run_json_script

SCRIPT = r"""
import json, warnings
warnings.filterwarnings("ignore")
from attnkit.kernels.compile_check.compile import job_for, triton_job
from attnkit.kernels.compile_check.workload import capture_cases, cases

rec = capture_cases(cases() + cases(ops=("grid",)), keep_raw=True)
mismatched, compared = [], 0
for launch in rec.launches:  # our signature rules against Triton's own launcher binder
    try:
        ours, theirs = job_for(launch, 90), triton_job(launch, 90)
    except NotImplementedError:
        break
    compared += 1
    if ours != theirs:
        mismatched.append(f"{launch.kernel} {launch.case}: ours {ours} != triton {theirs}")
print(json.dumps({"problems": rec.problems, "launches": sorted({l.kernel for l in rec.launches}),
                  "firsts": sum(l.first for l in rec.launches), "total": len(rec.launches),
                  "compared": compared, "mismatched": mismatched[:5]}))
"""

#: Every kernel the launchers own; "[tuned]": launched through its autotuner.
KERNELS = (
    "flash.kernels_fwd:_fwd_kernel[tuned]", "flash.kernels_bwd:_bwd_dkdv_kernel[tuned]",
    "flash.kernels_dq:_bwd_dq_kernel[tuned]", "flash.kernels_bwd:_bwd_preprocess",
    "flash.decode:_decode_split_kernel", "flash.decode:_decode_merge_kernel",
    "linear.chunk_state:_chunk_state_kernel[tuned]", "linear.chunk_state:_state_scan_kernel",
    "linear.chunk_out:_chunk_out_kernel[tuned]", "linear.chunk_grad:_bwd_prep_kernel",
    "linear.chunk_grad:_chunk_dq_kernel[tuned]", "linear.chunk_grad:_chunk_dk_kernel[tuned]",
    "linear.chunk_grad:_chunk_dv_kernel[tuned]", "lora.op:_fused_kernel[tuned]",
    "lora.op:_shrink_kernel[tuned]", "lora.op:_wgrad_kernel[tuned]", "lora.op:_fused_kernel",
    "lora.op:_shrink_kernel",
)


@pytest.fixture(scope="module")
def dry_run():
    return run_json_script(SCRIPT, timeout=600)


def test_gpu_launch_paths_pass_every_parameter_once(dry_run):
    assert not dry_run["problems"], "\n".join(dry_run["problems"])


def test_capture_sees_every_kernel(dry_run):
    launched = set(dry_run["launches"])
    for kernel in KERNELS:
        assert kernel in launched, f"{kernel} was never launched: {sorted(launched)}"
    # autotuned launches offer several configs; only one per launch is the first
    assert 0 < dry_run["firsts"] < dry_run["total"]


def test_signatures_match_tritons_own_launcher(dry_run):
    """The compile report types each argument itself (it runs where Triton's launcher cannot);
    on a Triton whose binder it can call (3.9), every captured launch must get the same
    signature, constexprs and divisibility marks as Triton's own launcher would give it."""
    if not dry_run["compared"]:
        pytest.skip("this triton's launcher binder cannot be called from outside")
    assert dry_run["compared"] == dry_run["total"]
    assert not dry_run["mismatched"], "\n".join(dry_run["mismatched"])
