"""Compile the flash kernels for an NVIDIA architecture without a GPU and report their resources.

Triton compiles to a cubin with its own bundled toolchain, so a CPU-only machine can check that
every kernel variant still compiles for sm_80/sm_90, how many registers it takes, whether it
spills (a stack frame) and how much shared memory it needs. The specialisations mirror a real
launch: unit head-dim strides, 16-byte aligned pointers and strides.

    python -m attnkit.kernels.compile_check --arch 90 --head-dim 128

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces compiled kernels).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton

from . import flash_triton as kt

#: Largest dynamic shared memory per block (bytes): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}

_UNIT_STRIDES = ("sqd", "skd", "svd", "sod", "sdd", "sdkd", "sdvd", "sdqd", "sln", "smn")
_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_POINTERS = {"LSE", "DELTA", "DLSE"}
_I32_POINTERS = {"KV_LO", "KV_HI", "CU_Q", "CU_K"}


@dataclass
class Resources:
    kernel: str
    arch: int
    tile: tuple
    head_dim: int
    registers: int
    spill_bytes: int
    shared_bytes: int

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SHARED_LIMIT.get(self.arch, SHARED_LIMIT[80])

    def __str__(self) -> str:
        bm, bn, w, s = self.tile[:4]
        return (
            f"{self.kernel:<6} sm_{self.arch} D={self.head_dim:<3} tile {bm}x{bn} w{w} s{s}: "
            f"{self.registers} regs, {self.spill_bytes} B stack, {self.shared_bytes / 1024:.0f} KiB smem"
            f"{'' if self.fits else ' (over the limit)'}"
        )


KERNELS = {
    "fwd": kt._fwd_kernel,
    "dkdv": kt._bwd_dkdv_kernel,
    "dq": kt._bwd_dq_kernel,
}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTERS:
            sig[name] = f"*{dtype}"
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name == "KPM":
            sig[name] = "*u8"
        elif name in _I32_POINTERS:
            sig[name] = "*i32"
        elif name == "sm_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _res_usage(cubin: bytes) -> tuple[int, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return int(regs.group(1)), int(stack.group(1))


def compile_kernel(kernel: str, tile: tuple, head_dim: int, arch: int = 90, dtype: str = "bf16",
                   window: bool = False, key_mask: bool = False) -> Resources:
    """Compile one kernel variant for ``sm_<arch>`` and return its resource usage."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter is active)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = KERNELS[kernel]
    bm, bn, warps, stages = tile[:4]
    constexprs = dict(
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_LEFT=window,
        HAS_RIGHT=window, HAS_KPM=key_mask, VARLEN=False, PRECISION="tf32", UPCAST=False,
        BLOCK_M=bm, BLOCK_N=bn,
    )
    for name in _UNIT_STRIDES:
        if name in fn.arg_names:
            constexprs[name] = 1  # what Triton's specialisation does for a stride of 1
    sig = _signature(fn, dtype, constexprs)
    index = {name: i for i, name in enumerate(fn.arg_names)}
    attrs = {
        (index[n],): [["tt.divisibility", 16]]
        for n, t in sig.items() if t.startswith("*") or (t == "i32" and n.startswith("s"))
    }
    src = ASTSource(fn=fn, signature=sig, constexprs={(index[k],): v for k, v in constexprs.items()},
                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    regs, stack = _res_usage(compiled.asm["cubin"])
    return Resources(kernel, arch, tuple(tile), head_dim, regs, stack, compiled.metadata.shared)


def first_tiles(head_dim: int) -> dict[str, tuple]:
    """The first tile each kernel's autotuner is offered at ``head_dim`` (the one that must not
    spill)."""
    from .flash import _BWD_DKDV_TILES, _BWD_DQ_TILES, _FWD_TILES

    block_d = max(16, triton.next_power_of_2(head_dim))
    lists = {"fwd": _FWD_TILES, "dkdv": _BWD_DKDV_TILES, "dq": _BWD_DQ_TILES}
    return {k: next(t for t in tiles if block_d <= t[4]) for k, tiles in lists.items()}


def main(argv=None) -> int:
    from .flash import _BWD_DKDV_TILES, _BWD_DQ_TILES, _FWD_TILES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--all-tiles", action="store_true", help="every tile, not only the first")
    args = parser.parse_args(argv)
    lists = {"fwd": _FWD_TILES, "dkdv": _BWD_DKDV_TILES, "dq": _BWD_DQ_TILES}
    block_d = max(16, triton.next_power_of_2(args.head_dim))
    for kernel, tiles in lists.items():
        offered = [t for t in tiles if block_d <= t[4]]
        for tile in offered if args.all_tiles else offered[:1]:
            print(compile_kernel(kernel, tile, args.head_dim, args.arch), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
