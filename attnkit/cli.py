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


def info_lines() -> list[str]:
    """Versions, devices and which attention backends can run here (and why not)."""
    from . import __version__
    from .attn.backends import BACKENDS, interpreting
    from .attn.inputs import validate

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
    lines.append(f"backends for a bf16 attention call on {dev} (D = 128):")
    x = torch.empty(1, 1, 16, 128, device=dev, dtype=torch.bfloat16)
    call = validate(x, x, x, None, None, None, None, None, False)
    for name, backend in BACKENDS.items():
        reasons = backend.not_supported_reasons(call)
        lines.append(f"  {name:<8} {'usable' if not reasons else 'not usable: ' + '; '.join(reasons)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attnkit",
        description="Triton/CUDA kernels for long-context attention and fused LoRA fine-tuning.",
    )
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

    add_arguments(bench)
    add_finetune_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
        return 0
    if args.command == "bench":
        from .bench.command import run

        try:
            return run(args)
        except ValueError as e:
            bench.error(str(e))  # exits with status 2 and the usage line
    if args.command == "finetune":
        return run_finetune(args)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
