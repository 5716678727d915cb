"""Compile Triton kernels for an NVIDIA architecture without a GPU and report their resources.

Triton compiles to a cubin with its own bundled toolchain, so a CPU-only machine can check that
every kernel variant still compiles for sm_80/sm_90, how many registers it takes, whether it
spills (a stack frame) and how much shared memory it needs. The specialisations mirror a real
launch: unit strides, 16-byte aligned pointers and strides.

    python -m attnkit.kernels.compile_check --arch 90 --head-dim 128          # flash
    python -m attnkit.kernels.compile_check --module linear --head-dim 64
    python -m attnkit.kernels.compile_check --module lora --dtype fp32 --rank 64 --all-tiles

Any ``@triton.jit`` kernel can be compiled with :func:`compile_launch`, given the arguments a
launch would pass (pointers as type strings such as ``"*bf16"``, Python ints and floats for
scalars): it applies Triton's own specialisation (an int equal to 1 becomes a constant, one
divisible by 16 is marked so, pointers are 16-byte aligned). :func:`linear_variants` and
:func:`lora_variants` list the launches of ``linear.py`` and ``lora.py`` at the configs their
autotuners are offered.

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

from .flash import kernels_bwd, kernels_fwd

#: Largest dynamic shared memory per block (bytes): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}

_UNIT_STRIDES = ("sqd", "skd", "svd", "sod", "sdd", "sdkd", "sdvd", "sdqd", "sln", "smn")
_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_POINTERS = {"LSE", "DELTA", "DLSE"}
_I32_POINTERS = {"KV_LO", "KV_HI", "CU_Q", "CU_K", "KV_NUM", "KV_IDX", "KV_PART", "Q_NUM", "Q_IDX",
                 "Q_PART"}


KERNELS = {
    "fwd": kernels_fwd._fwd_kernel,
    "dkdv": kernels_bwd._bwd_dkdv_kernel,
    "dq": kernels_bwd._bwd_dq_kernel,
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
        elif name in ("KPM", "PMASK"):
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


def _compile(fn, sig: dict, constexprs: dict, attrs: dict, arch: int, num_warps: int,
             num_stages: int) -> tuple[int, int, int]:
    """Compile ``fn`` for ``sm_<arch>``: ``(registers, stack bytes, shared bytes)``."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter is active)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index = {name: i for i, name in enumerate(fn.arg_names)}
    src = ASTSource(fn=fn, signature=sig, constexprs={(index[k],): v for k, v in constexprs.items()},
                    attrs={(index[n],): a for n, a in attrs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    regs, stack = _res_usage(compiled.asm["cubin"])
    return regs, stack, compiled.metadata.shared


def compile_kernel(kernel: str, tile: tuple, head_dim: int, arch: int = 90, dtype: str = "bf16",
                   window: bool = False, key_mask: bool = False,
                   sparse_block: int = 0) -> Usage:
    """Compile one flash kernel variant for ``sm_<arch>`` and return its resource usage
    (``sparse_block``: the block-sparse path with that layout block size)."""
    fn = KERNELS[kernel]
    bm, bn, warps, stages = tile[:4]
    constexprs = dict(
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_LEFT=window,
        HAS_RIGHT=window, HAS_KPM=key_mask, VARLEN=False, PRECISION="tf32", UPCAST=False,
        BLOCK_M=bm, BLOCK_N=bn, SPARSE=sparse_block > 0, BS=sparse_block or 16,
    )
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    for name in _UNIT_STRIDES:
        if name in fn.arg_names:
            constexprs[name] = 1  # what Triton's specialisation does for a stride of 1
    sig = _signature(fn, dtype, constexprs)
    attrs = {
        n: [["tt.divisibility", 16]]
        for n, t in sig.items() if t.startswith("*") or (t == "i32" and n.startswith("s"))
    }
    regs, stack, shared = _compile(fn, sig, constexprs, attrs, arch, warps, stages)
    config = f"D={head_dim} tile {bm}x{bn} w{warps} s{stages}"
    if sparse_block:
        config += f" bs={sparse_block}"
    return Usage(kernel, arch, config, regs, stack, shared)


def first_tiles(head_dim: int, sparse_block: int = 0) -> dict[str, tuple]:
    """The first tile each kernel's autotuner is offered at ``head_dim`` (the one that must not
    spill); with ``sparse_block``, the first one dividing that layout block size."""
    from .flash.op import _BWD_DKDV_TILES, _BWD_DQ_TILES, _FWD_TILES, _SPARSE_SMALL_TILES

    block_d = max(16, triton.next_power_of_2(head_dim))
    lists = {"fwd": _FWD_TILES, "dkdv": _BWD_DKDV_TILES, "dq": _BWD_DQ_TILES}

    def offered(t):
        if sparse_block:
            return sparse_block % t[0] == 0 and sparse_block % t[1] == 0 and block_d <= t[4]
        return block_d <= t[4]

    extra = _SPARSE_SMALL_TILES if sparse_block else []
    return {k: next(t for t in tiles + extra if offered(t)) for k, tiles in lists.items()}


# --------------------------------------------------------------------------------------------
# Any kernel, given the arguments of a launch
# --------------------------------------------------------------------------------------------


@dataclass
class Usage:
    """Resources of one compiled kernel (``config``: its tiles, e.g. ``"BT=64 BV=32 w8 s2"``)."""

    kernel: str
    arch: int
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SHARED_LIMIT.get(self.arch, SHARED_LIMIT[80])

    def __str__(self) -> str:
        return (
            f"{self.kernel:<22} sm_{self.arch} {self.config:<36}: {self.registers} regs, "
            f"{self.spill_bytes} B stack, {self.shared_bytes / 1024:.0f} KiB smem"
            f"{'' if self.fits else ' (over the limit)'}"
        )


@dataclass
class Launch:
    """One kernel launch to compile: ``args`` maps every non-constexpr parameter to what a launch
    passes (``"*bf16"``-style strings for pointers, Python ints/floats/bools for scalars)."""

    name: str
    fn: object  # a JITFunction or an Autotuner around one
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    primary: bool = False  # the first config the autotuner is offered (or the only one)

    @property
    def config(self) -> str:
        tiles = " ".join(f"{k}={v}" for k, v in self.constexprs.items()
                         if k.startswith("B") and isinstance(v, int) and not isinstance(v, bool))
        return f"{tiles} w{self.num_warps} s{self.num_stages}"


def _jit_fn(fn):
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):  # unwrap Autotuner / Heuristics
        fn = fn.fn
    return fn


def compile_launch(launch: Launch, arch: int = 90) -> Usage:
    """Compile ``launch`` for ``sm_<arch>`` with Triton's launch-time specialisation."""
    fn = _jit_fn(launch.fn)
    constexprs = dict(launch.constexprs)
    sig, attrs = {}, {}
    missing = [n for n in fn.arg_names if n not in constexprs and n not in launch.args]
    if missing:
        raise TypeError(f"{launch.name}: no value for {missing}")
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        value = launch.args[name]
        if isinstance(value, str):
            sig[name] = value
            if value.startswith("*"):
                attrs[name] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                constexprs[name] = 1
                sig[name] = "constexpr"
            else:
                sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[name] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: cannot type argument {name}={value!r}")
    regs, stack, shared = _compile(fn, sig, constexprs, attrs, arch, launch.num_warps,
                                   launch.num_stages)
    return Usage(launch.name, arch, launch.config, regs, stack, shared)


def _bhnd(prefix: str, B: int, H: int, N: int, D: int) -> dict:
    """Strides of a contiguous ``[B, H, N, D]`` tensor named like the kernels' (``sqb`` ...)."""
    return {f"{prefix}b": H * N * D, f"{prefix}h": N * D, f"{prefix}n": D, f"{prefix}d": 1}


def linear_variants(head_dim: int = 128, dtype: str = "bf16", all_tiles: bool = False,
                    causal: bool = True, feature: str = "elu1", seq: int = 4096) -> list[Launch]:
    """The launches of ``linear.py`` (forward, dq, dk/dv) at ``F = Dv = head_dim`` for B = 2,
    H = 16: the first config each autotuner is offered, or every one with ``all_tiles``."""
    from .linear import op as lk

    B, H, N, F, Dv = 2, 16, seq, head_dim, head_dim
    ptr, f32 = f"*{dtype}", "*fp32"
    flags = dict(FEATURE=lk.FEATURES[feature], CAUSAL=causal, NORMALIZE=True, PRECISION="tf32",
                 UPCAST=False)
    sizes = dict(scale=0.1, eps=1e-6, HQ=H, HKV=H, GROUP=1, N=N, F=F, DV=Dv)
    qkvo = {**_bhnd("sq", B, H, N, F), **_bhnd("sk", B, H, N, F), **_bhnd("sv", B, H, N, Dv),
            **_bhnd("so", B, H, N, Dv)}
    out = []

    def add(name, fn, args, tiles, names, extra):
        offered = tiles if all_tiles else tiles[:1]
        for i, t in enumerate(offered):
            ce = {**flags, **extra, **dict(zip(names, t, strict=False))}
            out.append(Launch(name, fn, {**args, **sizes, **qkvo}, ce, t[len(names)],
                              t[len(names) + 1], primary=i == 0))

    add("linear_fwd", lk._fwd_kernel,
        dict(Q=ptr, K=ptr, V=ptr, OUT=ptr, DEN=f32, S0=f32, Z0=f32, ST=f32, ZT=f32, LG=f32),
        lk._fwd_tiles(F, Dv), ("BT", "BV"), dict(HAS_S0=False, HAS_DECAY=False, BK=lk._pow2(F)))
    bv = lk._pow2(Dv)
    add("linear_bwd_dq", lk._bwd_dq_kernel,
        dict(Q=ptr, K=ptr, V=ptr, OUT=ptr, DO=ptr, DEN=f32, S0=f32, Z0=f32, DQ=ptr, LG=f32,
             **_bhnd("sdo", B, H, N, Dv), **_bhnd("sdq", B, H, N, F)),
        lk._bwd_tiles(lk._DQ_TILES, Dv), ("BT",),
        dict(HAS_S0=False, HAS_DECAY=False, BK=lk._dq_bk(F, Dv), BV=bv))
    bk = lk._dkdv_bk(F, Dv)
    planes = -(-F // bk)
    dv = _bhnd("sdv", B, H, N, Dv)
    add("linear_bwd_dkdv", lk._bwd_dkdv_kernel,
        dict(Q=ptr, K=ptr, V=ptr, OUT=ptr, DO=ptr, DEN=f32, DST=f32, DZT=f32, DK=ptr,
             DV_=ptr if planes == 1 else f32, DS0=f32, DZ0=f32, LG=f32, sdvk=B * H * N * Dv,
             sdvb=dv["sdvb"], sdvh=dv["sdvh"], sdvn=dv["sdvn"], sdvd=1,
             **_bhnd("sdo", B, H, N, Dv), **_bhnd("sdk", B, H, N, F)),
        lk._bwd_tiles(lk._DKDV_TILES, Dv), ("BT",),
        dict(HAS_DST=False, WRITE_DS0=False, HAS_DECAY=False, BK=bk, BV=bv))
    return out


def decode_variants(head_dim: int = 128, dtype: str = "bf16", group: int = 4,
                    nq: int = 1) -> list[Launch]:
    """The split-KV decode launches (``decode.py``) for ``group`` query heads per KV head and
    ``nq`` new tokens, with the tiles its launcher picks on a GPU (B = 8, Hkv = 8, 32k cache)."""
    from .flash import decode as dk

    B, Hkv, Nk, D = 8, 8, 32768, head_dim
    Hq, rows = Hkv * group, group * nq
    block_d, block_r, block_n, warps = dk._tiles(D, rows)
    ptr = f"*{dtype}"
    split = Launch(
        "decode_split", dk._decode_split_kernel,
        dict(Q=ptr, K=ptr, V=ptr, KPM="*u8", KV_LO="*i32", KV_HI="*i32", OP="*fp32", LP="*fp32",
             sm_scale=0.1, **_bhnd("sq", B, Hq, nq, D), **_bhnd("sk", B, Hkv, Nk, D),
             **_bhnd("sv", B, Hkv, Nk, D), smb=Nk, smn=1, HKV=Hkv, GROUP=group, NQ=nq, NK=Nk,
             R=rows, NSPLIT=8, WIN_L=0, WIN_R=0),
        dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=block_n, HAS_LEFT=False,
             HAS_RIGHT=True, HAS_KPM=True, PRECISION="tf32", UPCAST=False),
        warps, 3, primary=True)
    merge = Launch(
        "decode_merge", dk._decode_merge_kernel,
        dict(OP="*fp32", LP="*fp32", O=ptr, LSE="*fp32", **_bhnd("so", B, Hq, nq, D),
             slb=Hq * nq, slh=nq, sln=1, HKV=Hkv, GROUP=group, NQ=nq, R=rows, NSPLIT=8),
        dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=8), warps, 3, primary=True)
    return [split, merge]


class _Elem:
    """Stands in for a tensor argument of an ``early_config_prune`` (only its element size)."""

    def __init__(self, dtype: str):
        self._size = {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]

    def element_size(self) -> int:
        return self._size


def _offered(tuner, named_args: dict, **kwargs) -> list:
    """The configs ``tuner`` is offered (after its ``early_config_prune``), in order."""
    configs = tuner.configs
    if tuner.early_config_prune:
        configs = tuner.early_config_prune(configs, named_args, **kwargs)
    return configs


def lora_variants(dtype: str = "bf16", rank: int = 16, in_features: int = 4096,
                  out_features: int = 4096, tokens: int = 8192, dropout: bool = False,
                  all_tiles: bool = False) -> list[Launch]:
    """The launches of ``lora.py`` for one LoRA linear layer (forward: shrink + fused GEMM;
    backward: shrink, fused dx GEMM, two weight-gradient reductions; multi-adapter batches) at
    the first config each autotuner is offered, or every one with ``all_tiles``."""
    from .lora import op as lo

    if lo.INTERPRET:
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter is active)")
    T, IN, OUT, r = tokens, in_features, out_features, rank
    ptr, i32p = f"*{dtype}", "*i32"
    flags = dict(PRECISION="tf32", UPCAST=False)
    out = []

    def add(name, fn, args, configs, extra, fixed=None):
        if fixed is not None:  # not autotuned
            meta = dict(fixed)
            w, s = meta.pop("num_warps"), meta.pop("num_stages")
            out.append(Launch(name, fn, args, {**flags, **extra, **meta}, w, s, primary=True))
            return
        for i, c in enumerate(configs if all_tiles else configs[:1]):
            out.append(Launch(name, fn, args, {**flags, **extra, **c.kwargs}, c.num_warps,
                              c.num_stages, primary=i == 0))

    table = dict(ROW_IDX=i32p, BLK_ROW0=i32p, BLK_LEN=i32p, BLK_ADAPTER=i32p)
    bucket = lo._bucket(T)

    def shrink(name, K, strides, drop, batched=False):
        args = dict(X=ptr, M=ptr, OUT=ptr, SEED="*i64", SCALES="*fp32", **table, T=T, K=K, R=r,
                    scale=0.5, p=0.1, T_BUCKET=bucket, **strides, stride_ot=r, stride_or=1)
        extra = dict(DROPOUT=drop, OFF64=T * K >= 2**31, BATCHED=batched, BLOCK_R=lo._block_r(r))
        add(name, lo._shrink_kernel if batched else lo._shrink_tuned, args,
            lo._shrink_tuned.configs, extra, lo._BATCHED_SHRINK if batched else None)

    # forward: su = s drop(x) A^T (M = A^T: strides (1, in)); backward: gs = s dy B (M = B)
    shrink("lora_shrink_fwd", IN, dict(stride_xt=IN, stride_xk=1, stride_mk=1, stride_mr=IN,
                                        stride_ma=0), dropout)
    shrink("lora_shrink_bwd", OUT, dict(stride_xt=OUT, stride_xk=1, stride_mk=r, stride_mr=1,
                                         stride_ma=0), False)
    shrink("lora_shrink_batched", IN, dict(stride_xt=IN, stride_xk=1, stride_mk=1, stride_mr=IN,
                                            stride_ma=r * IN), False, batched=True)

    def fused(name, N, K1, strides, drop, bias, batched=False):
        args = dict(X1=ptr, M1=ptr, X2=ptr, M2=ptr, BIAS=ptr, OUT=ptr, SEED="*i64", **table,
                    T=T, N=N, K1=K1, K2=r, p=0.1, inv_keep=1.0 / 0.9, T_BUCKET=bucket,
                    **strides, stride_ot=N, stride_on=1)
        extra = dict(HAS_BIAS=bias, DROPOUT=drop, OFF64=T * N >= 2**31, BATCHED=batched,
                     BLOCK_K2=lo._block_k2(r))
        configs = _offered(lo._fused_tuned, dict(X1=_Elem(dtype), T=T, N=N, K1=K1, K2=r),
                           DROPOUT=drop)
        add(name, lo._fused_kernel if batched else lo._fused_tuned, args, configs, extra,
            lo._BATCHED_FUSED if batched else None)

    # forward: [x | su] @ [W^T ; B^T]; backward: dx = [dy | gs] @ [W ; A]
    fwd_strides = dict(stride_x1t=IN, stride_x1k=1, stride_m1k=1, stride_m1n=IN, stride_x2t=r,
                       stride_x2k=1, stride_m2k=1, stride_m2n=r)
    fused("lora_fused_fwd", OUT, IN, dict(fwd_strides, stride_m2a=0), False, True)
    fused("lora_fused_dx", IN, OUT, dict(stride_x1t=OUT, stride_x1k=1, stride_m1k=IN,
                                         stride_m1n=1, stride_x2t=r, stride_x2k=1,
                                         stride_m2k=IN, stride_m2n=1, stride_m2a=0), dropout,
          False)
    fused("lora_fused_batched", OUT, IN, dict(fwd_strides, stride_m2a=OUT * r), False, True,
          batched=True)

    def wgrad(name, M, N, drop):
        splits, rows = lo._n_splits(T, M, N)
        args = dict(X=ptr, Y=ptr, OUT="*fp32", SEED="*i64", T=T, M=M, N=N, rows_per_split=rows,
                    p=0.1, T_BUCKET=bucket, stride_xt=M, stride_xm=1, stride_yt=N, stride_yn=1,
                    stride_os=M * N, stride_om=N, stride_on=1)
        extra = dict(DROPOUT=drop, OFF64=T * N >= 2**31)
        configs = _offered(lo._wgrad_tuned, dict(X=_Elem(dtype), M=M, N=N))
        add(name, lo._wgrad_tuned, args, configs, extra)

    wgrad("lora_wgrad_dB", OUT, r, False)  # dy^T su: [out, T] @ [T, r]
    wgrad("lora_wgrad_dA", r, IN, dropout)  # gs^T drop(x): [r, T] @ [T, in]
    return out


def main(argv=None) -> int:
    from .flash.op import _BWD_DKDV_TILES, _BWD_DQ_TILES, _FWD_TILES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--all-tiles", action="store_true", help="every tile, not only the first")
    parser.add_argument("--module", choices=("flash", "linear", "lora"), default="flash")
    parser.add_argument("--dtype", default="bf16", help="linear/lora: bf16, fp16 or fp32")
    parser.add_argument("--rank", type=int, default=16, help="lora: the LoRA rank")
    parser.add_argument("--dropout", action="store_true", help="lora: the dropout variants")
    args = parser.parse_args(argv)
    if args.module != "flash":
        if args.module == "linear":
            launches = linear_variants(args.head_dim, args.dtype, args.all_tiles)
        else:
            launches = lora_variants(args.dtype, args.rank, dropout=args.dropout,
                                     all_tiles=args.all_tiles)
        for launch in launches:
            print(compile_launch(launch, args.arch), flush=True)
        return 0
    lists = {"fwd": _FWD_TILES, "dkdv": _BWD_DKDV_TILES, "dq": _BWD_DQ_TILES}
    block_d = max(16, triton.next_power_of_2(args.head_dim))
    for kernel, tiles in lists.items():
        offered = [t for t in tiles if block_d <= t[4]]
        for tile in offered if args.all_tiles else offered[:1]:
            print(compile_kernel(kernel, tile, args.head_dim, args.arch), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
