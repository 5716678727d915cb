"""A dry run of the GPU launch paths, on the CPU.

The CPU tests run the kernels under ``TRITON_INTERPRET=1``, which takes the launchers' interpreter
branches (fixed tiles, no autotuner). The GPU branches (autotuned kernels, their prune functions,
grid lambdas, the arguments each launch passes) would otherwise first run on a GPU. Here, in a
subprocess with the interpreter off, every ``kernel[grid](...)`` launch is intercepted instead of
compiled: for autotuned kernels Triton's own ``prune_configs`` runs (our prune functions, called
the way Triton calls them), and for every config left the launch must name each kernel parameter
exactly once, pass no meta-parameter the config also sets, and give a grid within CUDA's limits.
Nothing is computed, so the launchers see garbage outputs; only the launch plumbing is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import json
import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion",
                  "launch_cooperative_grid", "launch_pdl"}
problems, launches = [], []


def check(fn, name, args, kwargs, grid, config_kwargs):
    names = list(fn.arg_names)
    given = names[:len(args)]
    if len(args) > len(names):
        problems.append(f"{name}: {len(args)} positional arguments for {len(names)} parameters")
    meta = [k for k in kwargs if k not in LAUNCH_OPTIONS]
    twice = (set(given) & set(meta)) | (set(given) & set(config_kwargs)) | (set(meta) & set(config_kwargs))
    if twice:
        problems.append(f"{name}: given twice: {sorted(twice)}")
    unknown = [k for k in (*meta, *config_kwargs) if k not in names]
    if unknown:
        problems.append(f"{name}: not kernel parameters: {sorted(unknown)}")
    covered = set(given) | set(meta) | set(config_kwargs)
    missing = [p.name for p in fn.params if p.name not in covered and not p.has_default]
    if missing:
        problems.append(f"{name}: parameters never given: {missing}")
    full = {**dict(zip(names, args)), **kwargs, **config_kwargs}
    g = tuple(grid(full) if callable(grid) else grid)
    if not g or len(g) > 3 or any(int(d) < 0 for d in g):
        problems.append(f"{name}: bad grid {g}")
    g = tuple(int(d) for d in g) + (1,) * (3 - len(g))
    if g[0] >= 2**31 or g[1] > 65535 or g[2] > 65535:
        problems.append(f"{name}: grid {g} is over CUDA's limits")
    launches.append(name)


def label(jit):  # "op.module:kernel" (flash and linear attention both have a _fwd_kernel)
    return ".".join(jit.fn.__module__.split(".")[-2:]) + ":" + jit.fn.__name__


def jit_run(self, *args, grid, warmup, **kwargs):
    check(self, label(self), args, kwargs, grid, {})


def tuned_run(self, *args, **kwargs):
    grid = kwargs.pop("grid")
    kwargs.pop("warmup", None)
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs)  # Triton's own call of our early_config_prune
    if not configs:
        problems.append(f"{label(self.fn)}: every config pruned")
    for c in configs:
        opts = {"num_warps": c.num_warps, "num_stages": c.num_stages}
        check(self.fn, label(self.fn) + "[tuned]", args, {**kwargs, **opts}, grid, c.kwargs)


JITFunction.run = jit_run
Autotuner.run = tuned_run

from attnkit import BlockSparse, Causal, Dense, SlidingWindow
from attnkit.attn.inputs import validate
from attnkit.kernels.flash import decode
from attnkit.kernels.flash import op as flash
from attnkit.kernels.linear import op as linear
from attnkit.kernels.lora import op as lora


def flash_call(q, k, v, pattern, scale, kpm=None, cu_q=None, cu_k=None, max_q=None, max_k=None):
    call = validate(q, k, v, pattern, scale, kpm, cu_q, (max_q, max_k) if cu_q is not None else None,
                    True)
    return flash.flash_attention(call)


def grad_inputs(*shapes, dtype=torch.bfloat16):
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


sparse = BlockSparse(torch.ones(1, 1, 3, 3, dtype=torch.bool).tril(), 128, causal=True)
for dtype in (torch.bfloat16, torch.float32):
    for D in (64, 128, 256):
        for pattern in (Dense(), Causal(), SlidingWindow(100), sparse):
            q, k, v = grad_inputs((2, 4, 300, D), (2, 2, 300, D), (2, 2, 300, D), dtype=dtype)
            kpm = torch.ones(2, 300, dtype=torch.bool)
            kpm[1, 250:] = False
            o, lse = flash_call(q, k, v, pattern, D ** -0.5, kpm)
            torch.autograd.grad((o.float().sum(), lse.sum()), (q, k, v), allow_unused=True)
    q, k, v = grad_inputs((1, 4, 300, 128), (1, 2, 300, 128), (1, 2, 300, 128), dtype=dtype)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    o, _ = flash_call(q, k, v, Causal(), 0.1, None, cu, cu, 200, 200)
    torch.autograd.grad(o.float().sum(), (q, k, v))
    # more (batch, head) pairs than one grid axis holds: heads go on y, batch rows on z
    q, k, v = grad_inputs(*[(33000, 2, 2, 16)] * 3, dtype=dtype)
    o, _ = flash_call(q, k, v, Causal(), 0.25)
    torch.autograd.grad(o.float().sum(), (q, k, v))
    fq, fk, lv = grad_inputs(*[(33000, 2, 2, 16)] * 3, dtype=dtype)
    o, _, _ = linear.linear_attention_triton(fq, fk, lv, None, None, "elu1", True, True, 1e-6, 1.0)
    torch.autograd.grad(o.float().sum(), (fq, fk, lv))
    with torch.no_grad():
        q = torch.randn(3, 8, 1, 128, dtype=dtype)
        kv = torch.randn(3, 2, 500, 128, dtype=dtype)
        decode.decode_attention(q, kv, kv, SlidingWindow(300).compile(), 0.1, None)
    for F, Dv in ((128, 128), (64, 64), (256, 32)):
        fq, fk, lv = grad_inputs((2, 4, 300, F), (2, 2, 300, F), (2, 2, 300, Dv), dtype=dtype)
        for causal in (True, False):
            o, st, zt = linear.linear_attention_triton(fq, fk, lv, None, None, "elu1", causal, True,
                                                       1e-6, 1.0)
            torch.autograd.grad((o.float().sum(), st.sum()), (fq, fk, lv), allow_unused=True)
    for r, p in ((16, 0.0), (64, 0.1)):
        x = torch.randn(300, 512, dtype=dtype, requires_grad=True)
        w = torch.randn(384, 512, dtype=dtype, requires_grad=True)
        b = torch.randn(384, dtype=dtype)
        a = torch.randn(r, 512, dtype=dtype, requires_grad=True)
        bb = torch.randn(384, r, dtype=dtype, requires_grad=True)
        y = lora.lora_linear_triton(x, w, b, a, bb, 0.5, p, torch.tensor([7]) if p else None)
        torch.autograd.grad(y.float().sum(), (x, w, a, bb))
    with torch.no_grad():
        x = torch.randn(40, 512, dtype=dtype)
        lora.lora_batched_triton(x, torch.randn(384, 512, dtype=dtype), None,
                                 torch.randn(3, 16, 512, dtype=dtype), torch.randn(3, 384, 16, dtype=dtype),
                                 torch.ones(3), torch.randint(-1, 3, (40,)))
print(json.dumps({"problems": problems, "launches": sorted(set(launches))}))
'''


def test_gpu_launch_paths_pass_every_parameter_once():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    if proc.returncode != 0 and "GPUTarget" in proc.stderr:
        pytest.skip(f"this triton cannot be imported without a GPU: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["problems"], "\n".join(result["problems"])
    launched = set(result["launches"])
    for kernel in ("flash.kernels_fwd:_fwd_kernel[tuned]", "flash.kernels_bwd:_bwd_dkdv_kernel[tuned]",
                   "flash.kernels_bwd:_bwd_dq_kernel[tuned]", "flash.kernels_bwd:_bwd_preprocess",
                   "flash.decode:_decode_split_kernel", "flash.decode:_decode_merge_kernel",
                   "linear.op:_fwd_kernel[tuned]", "linear.op:_bwd_dq_kernel[tuned]",
                   "linear.op:_bwd_dkdv_kernel[tuned]", "lora.op:_fused_kernel[tuned]",
                   "lora.op:_shrink_kernel[tuned]", "lora.op:_wgrad_kernel[tuned]", "lora.op:_fused_kernel",
                   "lora.op:_shrink_kernel"):
        assert kernel in launched, f"{kernel} was never launched: {sorted(launched)}"
