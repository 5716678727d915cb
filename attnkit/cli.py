"""The ``attnkit`` command line (also ``python -m attnkit``)."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

__all__ = ["main", "info_lines"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _backend_lines(title: str, backends, call) -> list[str]:
    lines = [title]
    for backend in backends:
        reasons = backend.not_supported_reasons(call)
        label = f"{backend.name} ({type(backend).__name__})"
        lines.append(f"  {label:<30} {'usable' if not reasons else 'not usable: ' + '; '.join(reasons)}")
    return lines


def info_lines() -> list[str]:
    """Versions, devices and, for every op, which backends can run here (and why not)."""
    from . import __version__
    from .attn.inputs import validate
    from .kernels.dispatch import interpreting
    from .kernels.flash.backends import BACKENDS as ATTENTION
    from .kernels.linear.backends import BACKENDS as LINEAR
    from .kernels.linear.backends import LinearAttentionCall
    from .kernels.lora.backends import BACKENDS as LORA
    from .kernels.lora.backends import LoRACall

    lines = [
        f"attnkit      {__version__}",
        f"python       {platform.python_version()} ({sys.platform})",
        f"torch        {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
    ]
    for dist in ("triton", "einops", "transformers", "peft", "pytest-benchmark"):
        lines.append(f"{dist:<12} {_version(dist)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"device       cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, "
                f"sm_{p.major}{p.minor}"
            )
        dev = "cuda"
    else:
        lines.append("device       cpu only (no CUDA device visible)")
        dev = "cpu"
    if interpreting():
        lines.append("note         TRITON_INTERPRET=1: Triton kernels run on the CPU (slowly)")
    x = torch.empty(1, 1, 128, 128, device=dev, dtype=torch.bfloat16)
    lines += _backend_lines(f"attention backends for a bf16 prefill call on {dev} (N = 128, D = 128):",
                            ATTENTION, validate(x, x, x, None, None, None, None, None, False))
    x1 = x[:, :, :1]
    lines += _backend_lines(f"attention backends for a bf16 decode step on {dev} (Nq = 1, Nk = 128):",
                            ATTENTION, validate(x1, x, x, None, None, None, None, None, False))
    lines += _backend_lines(
        f"linear_attention backends for a bf16 call on {dev} (F = Dv = 128):", LINEAR,
        LinearAttentionCall(x, x, x, None, None, "elu1", True, True, 1e-6, 1.0))
    t = torch.empty(8, 4096, device=dev, dtype=torch.bfloat16)
    lines += _backend_lines(f"lora_linear backends for a bf16 call on {dev} (r = 16):", LORA,
                            LoRACall(t, 16, False, False))
    lines += _backend_lines(f"lora_batched backends for a bf16 decode batch on {dev} (r = 16):", LORA,
                            LoRACall(t, 16, False, True))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attnkit",
        description="Triton/CUDA kernels for long-context attention and fused LoRA fine-tuning.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"attnkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.add_parser("info", help="versions, devices and which backends are usable here (and why not)")
    bench = sub.add_parser(
        "bench", help="sweep N for each attention kind and LoRA against SDPA/Flex/PEFT baselines",
        description="Time and peak memory of every attention kind and fused LoRA over a sweep of "
                    "sequence lengths, against the baselines installed here; writes results.json, "
                    "results.csv, summary.txt and log-log plots to --out.",
    )
    from .bench.command import add_arguments
    from .finetune.cli import add_finetune_parser, run_finetune
    from .kernels.compile_check.cli import add_compile_report_parser

    add_arguments(bench)
    add_finetune_parser(sub)
    add_compile_report_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
        return 0
    if args.command == "bench":
        from .bench.command import run

        try:
            return run(args)
        except ValueError as e:  # a bad argument: one line naming it, exit status 2
            print(f"attnkit bench: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    if args.command == "finetune":
        return run_finetune(args)
    if args.command == "compile-report":
        return args.func(args)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
