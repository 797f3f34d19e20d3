"""The ``stpnet`` command line: a thin layer over the library."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import decomposition_demo, smooth_field_tensor

    X = smooth_field_tensor(size=args.size, order=args.order, noise=args.noise, seed=args.seed)
    rows = decomposition_demo(X, rank=args.rank, t=args.t)
    shape = "x".join(map(str, X.shape))
    print(f"Decomposing a {shape} smooth field 1/|x| with {args.noise:.0%} noise "
          f"({X.numel():,} entries), rank {args.rank}, t = {args.t} for the semi-tensor formats\n")
    header = f"{'format':<7} {'rank':<18} {'t':>2} {'params':>8} {'compression':>12} {'rel. error':>11} {'time (s)':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        rank = ",".join(map(str, r.rank))
        print(f"{r.format:<7} {rank:<18} {r.t:>2} {r.params:>8,} {r.compression:>11.1f}x "
              f"{r.rel_error:>11.2e} {r.seconds:>9.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stpnet",
        description="Compress tensors and networks with semi-tensor product decompositions.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="decompose a test tensor in all six formats and print a table",
                          description="Decompose a smooth test tensor in all six formats "
                                      "(tucker, sttu, tt, stt, tr, str) and print parameters, "
                                      "compression, relative error and time.")
    demo.add_argument("--size", type=int, default=16, help="mode size (default 16)")
    demo.add_argument("--order", type=int, default=4, help="tensor order (default 4)")
    demo.add_argument("--rank", type=int, default=6, help="rank for every format (default 6)")
    demo.add_argument("--t", type=int, default=2, help="STP factor of the semi-tensor formats (default 2)")
    demo.add_argument("--noise", type=float, default=0.01, help="relative noise level (default 0.01)")
    demo.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stpnet`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, MemoryError) as exc:
        print(f"stpnet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
