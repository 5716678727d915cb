"""Compile one captured launch for ``sm_<arch>`` and read what the cubin says.

The signature is built from the launch's argument values the way Triton's launcher specialises
them (``JITFunction.run`` -> ``native_specialize_impl`` on triton 3.9):

* a tensor -> ``"*<dtype>"`` (``"*bf16"``, ``"*fp32"``, ``"*i32"``, ``"*u8"``...), marked
  ``tt.divisibility = 16`` when its address is 16-byte aligned;
* a Python int -> a constexpr when it is 1, else ``"i32"`` (``"i64"`` outside int32), marked
  ``tt.divisibility = 16`` when divisible by 16 (unless the parameter is ``do_not_specialize``);
* a float -> ``"fp32"``; a bool -> ``"u1"`` (``"i1"`` before triton 3.5); ``None`` -> constexpr;
* ``tl.constexpr`` parameters -> their values.

Then ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options=...)`` (Triton's
bundled ptxas; no GPU), and from the cubin: registers and stack (spill) bytes from
``cuobjdump -res-usage``, shared memory from the compile metadata, and SASS instruction counts
from ``cuobjdump -sass``: ``HGMMA`` (Hopper warpgroup MMA, wgmma), ``HMMA`` (mma.sync),
``UTMALDG`` (TMA loads), ``LDGSTS`` (cp.async). ASTSource's ``constexprs``/``attrs`` are keyed by
``(parameter index,)`` tuples, the format triton 3.3+ (3.6 and 3.9 included) takes.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

from .capture import Launch, Pointer

#: Largest dynamic shared memory per block (bytes): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
#: SASS opcodes counted, by report field.
SASS_OPS = {"hgmma": "HGMMA", "hmma": "HMMA", "tma_loads": "UTMALDG", "cp_async": "LDGSTS"}


@dataclass(frozen=True)
class Job:
    """What one compile needs, picklable: the kernel by module and name, Triton's signature,
    constexprs and attributes keyed by parameter index, and the compile options."""

    module: str
    name: str
    signature: tuple  # ((param name, type), ...)
    constexprs: tuple  # ((index, value), ...)
    divisible: tuple  # indices marked tt.divisibility = 16
    num_warps: int
    num_stages: int
    arch: int


@dataclass
class Usage:
    """What the cubin of one job says."""

    registers: int
    spill_bytes: int
    shared_bytes: int
    hgmma: int
    hmma: int
    tma_loads: int
    cp_async: int

    def as_dict(self) -> dict:
        return asdict(self)


@functools.cache
def _bool_type() -> str:
    try:
        from triton.runtime.jit import mangle_type

        return mangle_type(True)
    except (ImportError, TypeError):  # older Triton: no mangle_type(arg) helper
        return "i1"


def job_for(launch: Launch, arch: int) -> Job:
    """The compile job of ``launch`` for ``sm_<arch>``; a value Triton could not pass raises
    ``TypeError`` naming the kernel, the parameter and the value."""
    fn = launch.fn
    sig, consts, divisible = [], [], []
    for i, p in enumerate(fn.params):
        if p.name not in launch.args:
            raise TypeError(f"{launch.kernel}: no value for parameter {p.name!r}")
        value = launch.args[p.name]
        specialise = not p.do_not_specialize
        if p.is_constexpr or value is None:
            sig.append((p.name, "constexpr"))
            consts.append((i, value))
        elif isinstance(value, Pointer):
            sig.append((p.name, f"*{value.dtype}"))
            if value.aligned and specialise and not p.do_not_specialize_on_alignment:
                divisible.append(i)
        elif isinstance(value, bool):
            sig.append((p.name, _bool_type()))
        elif isinstance(value, int):
            if value == 1 and specialise:
                sig.append((p.name, "constexpr"))
                consts.append((i, 1))
                continue
            sig.append((p.name, "i32" if -(2**31) <= value < 2**31 else "i64"))
            if value % 16 == 0 and specialise:
                divisible.append(i)
        elif isinstance(value, float):
            sig.append((p.name, "fp32"))
        else:
            raise TypeError(f"{launch.kernel}: cannot type argument {p.name}={value!r} "
                            "(accepted: tensors, int, float, bool, None, constexprs)")
    return Job(fn.fn.__module__, fn.fn.__name__, tuple(sig), tuple(consts), tuple(divisible),
               launch.num_warps, launch.num_stages, arch)


def triton_job(launch: Launch, arch: int) -> Job:
    """The job Triton's own launcher would compile for ``launch`` (its binder and
    ``_pack_args``, triton 3.9), to check :func:`job_for` against; needs a launch captured with
    ``keep_raw``. Raises ``NotImplementedError`` on a Triton without these internals."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as exc:
        raise NotImplementedError(f"this triton has no launcher binder: {exc}") from exc
    fn = launch.fn
    if launch.raw is None or not hasattr(fn, "_pack_args"):
        raise NotImplementedError("needs a launch captured with keep_raw and JITFunction._pack_args")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args, kwargs = launch.raw
    kwargs = {k: v for k, v in kwargs.items() if k != "debug"}
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                    options)
    return Job(fn.fn.__module__, fn.fn.__name__, tuple(signature.items()),
               tuple(sorted((k[0], v) for k, v in constexprs.items())),
               tuple(sorted(k[0] for k, a in attrs.items() if ["tt.divisibility", 16] in a)),
               launch.num_warps, launch.num_stages, arch)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def read_cubin(cubin: bytes) -> tuple[int, int, dict]:
    """``(registers, stack bytes, SASS counts by report field)`` of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", res), re.search(r"STACK:(\d+)", res)
    # one instruction per line: "/*0470*/  HGMMA.64x128x16.F32.BF16 gdesc[UR4], ... ;"
    opcodes = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)", sass, re.M)
    counts = {field: sum(op == code for op in opcodes) for field, code in SASS_OPS.items()}
    return int(regs.group(1)), int(stack.group(1)), counts


def compile_job(job: Job) -> Usage:
    """Compile ``job`` with Triton's own toolchain (no GPU) and read its cubin."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .capture import _unwrap

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compiling needs TRITON_INTERPRET unset (the interpreter is active)")
    fn = _unwrap(getattr(importlib.import_module(job.module), job.name))
    src = ASTSource(fn=fn, signature=dict(job.signature),
                    constexprs={(i,): v for i, v in job.constexprs},
                    attrs={(i,): [["tt.divisibility", 16]] for i in job.divisible})
    compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                              options=dict(num_warps=job.num_warps, num_stages=job.num_stages))
    regs, stack, counts = read_cubin(compiled.asm["cubin"])
    return Usage(regs, stack, compiled.metadata.shared, **counts)
