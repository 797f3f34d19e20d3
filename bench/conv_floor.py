"""The time floor of narrow convolutions on this CPU: how fast a 3-op chain of library convolutions
can run on ResNet-20's 16-channel layers.

A factorized layer's chain runs a k x k convolution in a rank space of a few channels on the full
feature map. This script times plain 3x3 convolutions (stride 1, padding 1, no bias) of the given
batch and map size over a set of (in, out, groups) widths, in NCHW and channels_last, forward
under ``no_grad``, and prints microseconds per call and multiply-adds per second, next to the
dense layer's width (the first row). Each row is the best of 5 blocks of 20 calls after a
warm-up; rows go to ``results/latency/conv_floor.jsonl``.

``--passes`` times the other single passes of a fused layer on the (batch, channels, size, size)
map of ``--channels``: the 1x1 mix to and from ``--rank`` channels (the batched product
``stpnet.functional.contract._mix``), a copy, eval BatchNorm, and a folded BatchNorm as
``addcmul`` and as ``mul_`` + ``add_`` in place (on a fresh copy; the copy's time is given).

Run (repository root; nothing else running):
    .venv/bin/python bench/conv_floor.py                       # ResNet-20 layer1: batch 32, 32x32
    .venv/bin/python bench/conv_floor.py --batch 32 --size 16 --widths 32,32,1 12,12,1 6,6,1
    .venv/bin/python bench/conv_floor.py --passes --channels 16 --rank 6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "latency" / "conv_floor.jsonl"
# the dense 16-channel layer, then STT 9x's rank spaces (r = 3, two groups: as 6 channels, as
# 3 channels with the groups in the batch, as two groups) and its merged forms
DEFAULT_WIDTHS = ("16,16,1", "6,6,1", "3,3,1,2", "6,6,2", "8,8,1", "16,6,1", "6,16,1")


def best_us(fn, calls: int = 20, blocks: int = 5) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def time_passes(batch: int, channels: int, size: int, rank: int) -> dict[str, float]:
    """Microseconds of each single pass (see the module docstring)."""
    from stpnet.functional.contract import _mix

    y = torch.randn(batch, channels, size, size)
    flat = y.reshape(batch, channels, -1)
    low = torch.randn(batch, rank, size * size)
    down, up = torch.randn(rank, channels), torch.randn(channels, rank)
    scale, shift = torch.rand(channels) + 0.5, torch.randn(channels)
    mean, var = torch.zeros(channels), torch.ones(channels)
    s4, b4 = scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1)
    return {
        f"mix {channels}->{rank}": best_us(lambda: _mix(down, flat)),
        f"mix {rank}->{channels}": best_us(lambda: _mix(up, low)),
        "copy": best_us(lambda: y.clone()),
        "batchnorm (eval)": best_us(lambda: F.batch_norm(y, mean, var, scale, shift, False, 0.1, 1e-5)),
        "addcmul (broadcast)": best_us(lambda: torch.addcmul(b4, y, s4)),
        "copy + mul_ + add_": best_us(lambda: y.clone().mul_(s4).add_(b4)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="feature map side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--widths", nargs="*", default=list(DEFAULT_WIDTHS),
                        help="in,out,groups[,batch multiple] per convolution (the batch multiple puts "
                             "groups in the batch)")
    parser.add_argument("--passes", action="store_true", help="time the single passes instead")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--rank", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    if args.passes:
        with torch.no_grad():
            for batch in (args.batch, 1):
                times = time_passes(batch, args.channels, args.size, args.rank)
                print(f"batch {batch}, {args.channels} channels of {args.size}x{args.size}, {args.threads} threads: "
                      + ", ".join(f"{k} {v:.0f} us" for k, v in times.items()), flush=True)
                with OUT.open("a") as f:
                    f.write(json.dumps({"passes": times, "batch": batch, "channels": args.channels, "size": args.size,
                                        "threads": args.threads, "cpu": cpu_model(),
                                        "torch": torch.__version__}) + "\n")
        return
    print(f"3x3 convolutions, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads ({cpu_model()})")
    print(f"{'in,out,groups,xbatch':>22} {'MMAC':>8} {'NCHW us':>9} {'GMAC/s':>7} {'NHWC us':>9} {'GMAC/s':>7}")
    with torch.no_grad():
        for spec in args.widths:
            c_in, c_out, groups, *rest = (int(v) for v in spec.split(","))
            n = args.batch * (rest[0] if rest else 1)
            x = torch.randn(n, c_in, args.size, args.size)
            W = torch.randn(c_out, c_in // groups, 3, 3)
            times = {}
            for layout in ("nchw", "nhwc"):
                fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
                xs, Ws = x.contiguous(memory_format=fmt), W.contiguous(memory_format=fmt)
                times[layout] = best_us(lambda: F.conv2d(xs, Ws, None, 1, 1, 1, groups))
            macs = n * args.size ** 2 * c_out * (c_in // groups) * 9
            print(f"{spec:>22} {macs / 1e6:8.1f} {times['nchw']:9.0f} {macs / times['nchw'] / 1e3:7.1f} "
                  f"{times['nhwc']:9.0f} {macs / times['nhwc'] / 1e3:7.1f}", flush=True)
            with OUT.open("a") as f:
                f.write(json.dumps({"widths": spec, "batch": args.batch, "size": args.size, "threads": args.threads,
                                    "macs": macs, "us": times, "cpu": cpu_model(),
                                    "torch": torch.__version__}) + "\n")


if __name__ == "__main__":
    main()
