"""The kernel modules define their launch tables in two branches: one for the Triton interpreter
(fixed tiles) and one for the GPU (autotuned). The CPU tests only ever import the first, so a
name defined only there passes every CPU test and fails on the GPU at the first launch (it
happened: the LoRA launch tables were interpreter-only, a NameError on every GPU call). Import
each module both ways, in subprocesses, and require the same module-level names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

MODULES = ("flash.op", "flash.launch", "flash.tiles", "flash.kernels_common", "flash.kernels_fwd",
           "flash.kernels_bwd", "flash.kernels_dq", "flash.bwd_fused", "flash.decode",
           "linear.op", "linear.tiles", "linear.blocks", "linear.chunk_state", "linear.chunk_out",
           "linear.chunk_grad", "lora.op")

SCRIPT = f"""
import importlib, json
out = {{}}
for m in {MODULES!r}:
    mod = importlib.import_module("attnkit.kernels." + m)
    out[m] = sorted(n for n in vars(mod) if not n.startswith("__"))
print(json.dumps(out))
"""


def _names(interpret: bool) -> dict[str, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_interpreter_and_gpu_branches_define_the_same_names():
    cpu, gpu = _names(True), _names(False)
    for m in MODULES:
        assert set(cpu[m]) == set(gpu[m]), (
            f"attnkit.kernels.{m}: only under the interpreter: {sorted(set(cpu[m]) - set(gpu[m]))}; "
            f"only on the GPU: {sorted(set(gpu[m]) - set(cpu[m]))}"
        )
