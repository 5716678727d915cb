"""CI check of the CUDA sources without a GPU: every ``attnkit/csrc/*.cu`` compiles with the
machine's ``nvcc`` for sm_80 and sm_90, and no kernel spills registers (``-Xptxas -v``).

The flags mirror :mod:`attnkit.kernels.cuda_ext` (torch's ``-D__CUDA_NO_HALF_*`` defines
included, so implicit half conversions fail here as they would in the real build). The six
compilations run two at a time (~1 min of CPU in all); skipped, with the reason, without ``nvcc``.
The torch binding (``bindings.cpp``) gets a host-compiler syntax check against torch's headers.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from attnkit.kernels import cuda_ext

ARCHS = (80, 90)
CU_FILES = sorted(p.name for p in cuda_ext.source_dir().glob("*.cu"))
TORCH_NVCC_DEFINES = (  # torch.utils.cpp_extension.COMMON_NVCC_FLAGS
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)
_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")

NVCC = cuda_ext.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no nvcc found (CUDA_HOME, PATH, /usr/local/cuda/bin)")


def _compile(name: str, arch: int, out_dir: Path) -> tuple[int, str]:
    cmd = [
        NVCC, "-c", "-std=c++17", *cuda_ext.NVCC_FLAGS, *TORCH_NVCC_DEFINES,
        f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
        "-I", str(cuda_ext.source_dir()), str(cuda_ext.source_dir() / name),
        "-o", str(out_dir / f"{name}.sm{arch}.o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def parse_ptxas(log: str) -> list[dict]:
    """One dict per kernel: name, arch, registers, spill stores/loads (bytes)."""
    kernels: list[dict] = []
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            kernels.append({"kernel": m.group(1), "arch": m.group(2), "regs": None, "spill": None})
            continue
        if not kernels:
            continue
        m = _SPILL.search(line)
        if m:
            kernels[-1]["spill"] = (int(m.group(1)), int(m.group(2)))
        m = _REGS.search(line)
        if m:
            kernels[-1]["regs"] = int(m.group(1))
    return kernels


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """Compile every (file, arch) once, two processes at a time (CI runners share 2 cores)."""
    out = tmp_path_factory.mktemp("nvcc")
    jobs = [(name, arch) for name in CU_FILES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda job: _compile(*job, out), jobs)
        return dict(zip(jobs, results, strict=True))


def test_sources_present():
    assert {"decode_attention.cu", "linear_decode.cu", "lora_bgmv.cu"} <= set(CU_FILES)
    for name in (*cuda_ext.SOURCES, *cuda_ext.HEADERS):
        assert (cuda_ext.source_dir() / name).is_file(), name


def test_parse_ptxas():
    log = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads\n"
        "ptxas info    : Used 80 registers, used 1 barriers\n"
    )
    assert parse_ptxas(log) == [{"kernel": "_Z3fooPf", "arch": "sm_90", "regs": 80, "spill": (4, 8)}]


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("name", CU_FILES)
def test_compiles_without_spills(builds, name, arch):
    rc, log = builds[(name, arch)]
    assert rc == 0, f"nvcc failed on {name} for sm_{arch}:\n{log[-4000:]}"
    kernels = parse_ptxas(log)
    assert kernels, f"ptxas reported no kernels for {name}:\n{log[-2000:]}"
    spilled = [k for k in kernels if k["spill"] is None or k["spill"] != (0, 0)]
    summary = "\n".join(f"{k['kernel']}: {k['regs']} regs, spill {k['spill']}" for k in kernels)
    assert not spilled, f"register spills in {name} (sm_{arch}):\n{summary}"
    assert all(k["regs"] is not None and k["regs"] <= 255 for k in kernels), summary


def test_binding_syntax(tmp_path):
    """``bindings.cpp`` against the installed torch headers (host compiler, syntax only)."""
    import torch.utils.cpp_extension as ce

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None or NVCC is None:
        pytest.skip("needs a host C++ compiler and a CUDA toolkit (for cuda_runtime_api.h)")
    root = cuda_ext.cuda_home()
    cuda_inc = Path(root or Path(NVCC).resolve().parent.parent) / "include"
    if not (cuda_inc / "cuda_runtime_api.h").is_file():
        pytest.skip(f"no CUDA headers at {cuda_inc}")
    # CPU builds of torch ship c10/cuda headers without the generated cmake macros header.
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [str(p) for p in ce.include_paths()]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror=return-type"]  # torch's standard
    for inc in (*includes, str(cuda_inc)):
        cmd += ["-isystem", inc]
    cmd += ["-isystem", str(tmp_path), "-I", str(cuda_ext.source_dir()),
            str(cuda_ext.source_dir() / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
