"""``attnkit compile-report``: compile every captured kernel config for an architecture, no GPU.

Wire it into a top-level parser with :func:`add_compile_report_parser` (it sets ``func``);
``python -m attnkit.kernels.compile_check`` runs it on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DESCRIPTION = ("Compile the Triton kernels, at every config their autotuners are offered for the "
               "public-API calls attnkit makes, for an NVIDIA architecture without a GPU, and "
               "report registers, spills, shared memory and SASS counts (HGMMA, HMMA, TMA "
               "loads, cp.async) per kernel, tile, head dim, dtype and flags.")


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--arch", type=int, default=90, choices=(80, 90),
                        help="compute capability to compile for (default 90, Hopper)")
    parser.add_argument("--json", metavar="FILE", help="also write the records to FILE")
    parser.add_argument("--kernel", action="append", metavar="NAME",
                        help="only kernels whose label contains NAME, e.g. _fwd_kernel or "
                             "lora.op (repeatable)")
    parser.add_argument("--head-dim", type=int, action="append", metavar="D",
                        help="only this head dim (the rank for LoRA; repeatable)")
    parser.add_argument("--dtype", action="append", choices=("bf16", "fp16", "fp32"),
                        help="only this dtype (repeatable; default bf16 and fp32)")
    parser.add_argument("--op", action="append",
                        choices=("attention", "decode", "linear_attention", "lora_linear",
                                 "lora_batched"),
                        help="only the calls of this op (repeatable)")
    parser.add_argument("--first-only", action="store_true",
                        help="only the first config each autotuner is offered (what "
                             "ATTNKIT_AUTOTUNE=0 runs): the fast path")
    parser.add_argument("--jobs", type=int, default=None,
                        help="compile processes (default: half the cores, 1 on <= 2 cores)")
    parser.set_defaults(func=run_compile_report)
    return parser


def add_compile_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``compile-report`` to an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser("compile-report", help=DESCRIPTION.split(",")[0],
                                   description=DESCRIPTION)
    return _configure(parser)


def run_compile_report(args: argparse.Namespace) -> int:
    """Run the report for parsed ``args``; prints the table, writes ``--json``. Returns 0."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile-report: unset TRITON_INTERPRET (the interpreter hides the launches and "
              "cannot compile)", file=sys.stderr)
        return 2
    from .report import collect, table

    records = collect(args.arch, ops=args.op, kernels=args.kernel, head_dims=args.head_dim,
                      dtypes=args.dtype, first_only=args.first_only, workers=args.jobs)
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"{len(records)} records written to {args.json}")
    return 0


def main(argv=None) -> int:
    parser = _configure(argparse.ArgumentParser(prog="python -m attnkit.kernels.compile_check",
                                                description=DESCRIPTION))
    args = parser.parse_args(argv)
    return args.func(args)
