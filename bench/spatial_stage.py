"""How the grouped k x k stage of the sequential / ring layouts should run on CPU (t > 1 or a ring).

The a * t groups of an STT / TR / STR layer share one k x k kernel. Two ways to run it:

- ``conv3d``: one 3-D convolution whose kernel has extent 1 along the group index, on the
  rank-space activations as they are (no copy);
- ``fold``: the groups moved into the batch (a copy in, a copy out) and one batched 2-D
  convolution (PyTorch sends a batch above 1 to oneDNN).

``stpnet.functional.contract.sequential_conv`` folds from ``LARGE_GROUPED_CONV`` rank-space input
elements on CPU (``auto``). This script times the fused networks (``stpnet.fuse``) with the
threshold forced to each choice and at its default, against dense, in one process (alternating
blocks, median; ``latency.time_in_blocks``).

``--micro`` times the stage alone instead (one thread; rank-space input (n, r, g, H, W), a
shared r x r 3x3 kernel): Conv3d, the folded conv2d, and im2col (``unfold``) + matmul.

Run (repository root; nothing else running):
    .venv/bin/python bench/spatial_stage.py
    .venv/bin/python bench/spatial_stage.py --micro
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import stpnet
import stpnet.functional.contract as contract
from stpnet.models import build_model

from _machine import cpu_model  # bench/_machine.py
from latency import time_in_blocks  # bench/latency.py

ROOT = Path(__file__).resolve().parents[1]
SEMI = {"sttu", "stt", "str"}
CHOICES = {"conv3d": 1 << 62, "fold": 0, "auto": contract.LARGE_GROUPED_CONV}


class _Threshold(torch.nn.Module):
    """Runs ``model`` with ``LARGE_GROUPED_CONV`` set to ``value`` (restored after each call)."""

    def __init__(self, model, value: int):
        super().__init__()
        self.model, self.value = model, value

    def forward(self, x):
        saved, contract.LARGE_GROUPED_CONV = contract.LARGE_GROUPED_CONV, self.value
        try:
            return self.model(x)
        finally:
            contract.LARGE_GROUPED_CONV = saved


def micro() -> None:
    import torch.nn.functional as F

    torch.set_num_threads(1)
    print("| batch | r | H | groups | conv3d us | fold us | unfold+mm us |\n|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for n in (1, 32):
            for r, H, g in [(7, 32, 2), (7, 16, 2), (7, 8, 2), (14, 8, 2), (6, 16, 4)]:
                z, S = torch.randn(n, r, g, H, H), torch.randn(r, r, 3, 3)
                folded = torch.randn(n * g, r, H, H)
                runs = {"conv3d": lambda: F.conv3d(z, S.unsqueeze(2), None, 1, (0, 1, 1)),
                        "fold": lambda: F.conv2d(folded, S, None, 1, 1),
                        "unfold": lambda: S.reshape(r, -1) @ F.unfold(folded, 3, padding=1)}
                us = time_in_blocks({k: (lambda _x, f=f: f()) for k, f in runs.items()}, z, 150)
                print(f"| {n} | {r} | {H} | {g} | " + " | ".join(f"{us[k] * 1e6:.0f}" for k in runs) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="*", default=["resnet20", "wrn-16-8"])
    parser.add_argument("--formats", nargs="*", default=["tt", "stt", "tr", "str"])
    parser.add_argument("--factor", type=float, default=9)
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "results" / "latency" / "spatial_stage.jsonl"))
    parser.add_argument("--micro", action="store_true", help="time the stage alone (one thread)")
    args = parser.parse_args()
    if args.micro:
        micro()
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print("| network | format | batch | dense ms | conv3d | fold | auto |\n|---|---|---|---|---|---|---|")
    for network in args.networks:
        torch.manual_seed(0)
        dense = build_model(network, 3, 10).eval()
        for fmt in args.formats:
            small, _ = stpnet.compress(dense, fmt, compression=args.factor, t=2 if fmt in SEMI else None)
            fused = stpnet.fuse(small.eval())
            for batch in args.batches:
                x = torch.randn(batch, 3, 32, 32)
                models = {"dense": dense, **{name: _Threshold(fused, v) for name, v in CHOICES.items()}}
                seconds = time_in_blocks(models, x, args.repeats)
                row = {"network": network, "format": fmt, "batch": batch, "factor": args.factor,
                       "threads": args.threads, "cpu": cpu_model(), "torch": torch.__version__,
                       **{f"{k}_s": v for k, v in seconds.items()}}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                ratios = " | ".join(f"{seconds[k] / seconds['dense']:.2f}" for k in CHOICES)
                print(f"| {network} | {fmt} | {batch} | {seconds['dense'] * 1e3:.2f} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
