"""Compile the linear-attention and fused-LoRA kernels for sm_80 and sm_90 with Triton's own
toolchain (no GPU needed), at the first config each autotuner is offered, as captured from the
public API (:mod:`attnkit.kernels.compile_check`): linear attention bf16 at D = 128 and 64
(causal, elu1, normalised; the chunk kernels: local states, the scan, outputs; the backward's
prepass, dq, the state gradients, their reverse scan, dk, dv), LoRA in = out = 4096 at r = 16
(bf16 and fp32) and r = 64 (bf16, with dropout), every kernel (shrink, fused GEMM forward and dx,
both weight gradients, the multi-adapter pair).

Asserted: every launch compiles and fits shared memory; on sm_90 (the H100 we tune for) none
spills, and every linear-attention kernel with a matmul runs it on wgmma (HGMMA) at D = 128,
forward and backward. On sm_80 the linear-attention tiles, chosen for sm_90, spill a little
(measured with triton 3.9: up to 120 B of stack, the output kernel at D = 128; the LoRA kernels
none), so there the bound is 128 B, as for the flash kernels. With dropout, every config the fused dx GEMM
is offered (not only the first) must not spill on sm_90: its prune drops the larger tiles, which
spill 576-688 B per thread (``lora/op.py``). One subprocess, ~45 compiles.

fp32 is compiled at TF32 (``torch.set_float32_matmul_precision("high")``), as before. At
PyTorch's default ("highest": IEEE fp32 dots) the sm_90 fused GEMM spills (measured with triton
3.9: 32 B for the dx GEMM at 128x128x64 w8, 24 B for the multi-adapter one): not asserted here.
"""

from __future__ import annotations

import pytest

from tests.harness import run_json_script

SCRIPT = """
import json, warnings
warnings.filterwarnings("ignore")
from attnkit.kernels.compile_check import collect
out = []
for arch in (90, 80):
    out += collect(arch, ops=("linear_attention",), head_dims=(128, 64), dtypes=("bf16",),
                   first_only=True, cases_filter={"causal"})
for dtype, r, dropout, arch in LORA_SETS:
    names = {"dropout" if dropout else "no dropout", "3 adapters"}
    if dtype == "fp32":
        names = {n + " tf32" for n in names}
    out += collect(arch, ops=("lora_linear", "lora_batched"), head_dims=(r,), dtypes=(dtype,),
                   first_only=True, cases_filter=names)
dx = collect(90, ops=("lora_linear",), head_dims=(64,), dtypes=("bf16",), cases_filter={"dropout"},
             kernels=("lora.op:_fused_kernel",), flags={"DROPOUT", "EVEN_K"})  # the case has K % 64 == 0
print(json.dumps(dict(first=out, dropout_dx=dx)))
"""

#: (dtype, rank, dropout, arch); fp32 at TF32 (torch.set_float32_matmul_precision("high"))
LORA = [("bf16", 16, False, 90), ("bf16", 16, True, 80), ("fp32", 16, False, 90),
        ("bf16", 64, True, 90)]
#: Every LoRA kernel, as (kernel, launched through its autotuner): shrink, fused GEMM (forward
#: and dx), weight gradients; the multi-adapter shrink and fused GEMM at fixed tiles.
LORA_KERNELS = {("lora.op:_shrink_kernel", True), ("lora.op:_fused_kernel", True),
                ("lora.op:_wgrad_kernel", True), ("lora.op:_shrink_kernel", False),
                ("lora.op:_fused_kernel", False)}


def _name(r):
    return (f"{r['kernel']} sm_{r['arch']} {r['op']} {r['case']} D/r={r['head_dim']} "
            f"{r['dtype']} tile {r['tile']} w{r['num_warps']} s{r['num_stages']} flags "
            f"{r['flags']}: {r['registers']} regs, {r['spill_bytes']} B stack, "
            f"{r['shared_bytes']} B smem")


@pytest.fixture(scope="module")
def records():
    return run_json_script(SCRIPT.replace("LORA_SETS", repr(LORA)), timeout=1200)


def test_linear_and_lora_kernels_compile_without_spills(records):
    first = records["first"]
    linear = [r for r in first if r["op"] == "linear_attention"]
    assert len(linear) == 2 * 2 * 9, "\n".join(map(_name, linear))  # arch, D, launches
    for dtype, rank, _dropout, arch in LORA:
        seen = {(r["kernel"], r["tuned"]) for r in first if r["op"].startswith("lora")
                and (r["dtype"], r["head_dim"], r["arch"]) == (dtype, rank, arch)}
        assert seen == LORA_KERNELS, f"{dtype} r={rank} sm_{arch}: {sorted(seen)}"
    # one compile may serve two launches (dB and dA of the weight gradient when no dropout
    # tells them apart are the same binary), so at least 7 and at most 8 per LoRA set
    n_lora = len(first) - len(linear)
    assert 7 * len(LORA) <= n_lora <= 8 * len(LORA), "\n".join(map(_name, first))
    assert all(r["first"] for r in first)
    bad = [_name(r) for r in first
           if not r["fits"] or r["spill_bytes"] > (0 if r["arch"] == 90 else 128)]
    assert not bad, "spilling or oversized kernels:\n" + "\n".join(bad)


#: The linear-attention kernels with matmuls (the scan and the backward's prepass have none).
LINEAR_MMA = {"linear.chunk_state:_chunk_state_kernel", "linear.chunk_out:_chunk_out_kernel",
              "linear.chunk_grad:_chunk_dq_kernel", "linear.chunk_grad:_chunk_dk_kernel",
              "linear.chunk_grad:_chunk_dv_kernel"}


def test_linear_kernels_use_wgmma_on_sm90(records):
    """bf16, D = 128, sm_90: the forward (states, outputs) and the backward (state gradients,
    dq, dk, dv) all take M = 64 tiles, so every product is a wgmma."""
    linear = [r for r in records["first"] if r["op"] == "linear_attention" and r["arch"] == 90
              and r["head_dim"] == 128]
    kernels = {r["kernel"] for r in linear}
    assert LINEAR_MMA <= kernels, sorted(kernels)
    backward_state = [r for r in linear if "BACKWARD" in r["flags"]]
    assert backward_state, "\n".join(map(_name, linear))
    no_wgmma = [_name(r) for r in linear if r["kernel"] in LINEAR_MMA
                and (r["hgmma"] == 0 or r["hmma"] > 0)]
    assert not no_wgmma, "linear kernels without wgmma:\n" + "\n".join(no_wgmma)


def test_dropout_dx_gemm_is_only_offered_tiles_that_do_not_spill(records):
    dx = records["dropout_dx"]
    assert dx and sum(r["first"] for r in dx) == 1, "\n".join(map(_name, dx))
    bad = [_name(r) for r in dx if r["spill_bytes"] or not r["fits"]]
    assert not bad, "spilling dropout dx tiles offered:\n" + "\n".join(bad)
