"""How the grouped k x k stage of the sequential / ring layouts should run on CPU (t > 1 or a ring).

The a * t groups of an STT / TR / STR layer share one k x k kernel. Three ways to run it
(``stpnet.functional.contract.GROUPED_STAGES``):

- ``depth``: one 3-D convolution whose kernel has extent 1 along the group index, on the
  rank-space activations as they are (no copy);
- ``fold``: the groups moved into the batch (a copy in, a copy out) and one batched 2-D
  convolution;
- ``stacked``: the groups stacked along the height, each with its own padding rows (a copy in),
  one plain 2-D convolution, a strided view out (height stride 1 only).

``auto`` is the default rule (``contract.grouped_stage``). This script times the fused networks
(``stpnet.fuse``) with every fused layer's ``spatial_stage`` set to each form, against dense, in
one process (alternating blocks, median; ``latency.time_in_blocks``).

``--micro`` times the stage alone instead (one thread; rank-space input (n, r, g, H, W), a
shared r x r 3x3 kernel): each form, and im2col (``unfold``) + matmul. ``--micro-train`` times
forward + backward (input and kernel gradients) of each form alone at batch 128, ``--threads``
threads, with ``stpnet.functional.conv``'s input gradient (as the training path runs them) and,
for the depth form, torch's own (``depth_torch``); ``--micro-train --forward`` times forward only.

Run (repository root; nothing else running):
    .venv/bin/python bench/spatial_stage.py
    .venv/bin/python bench/spatial_stage.py --micro
    .venv/bin/python bench/spatial_stage.py --micro-train
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import stpnet
import stpnet.functional.contract as contract
from stpnet.models import build_model
from stpnet.deploy.fused import FusedSequential

from _machine import cpu_model  # bench/_machine.py
from latency import time_in_blocks  # bench/latency.py

ROOT = Path(__file__).resolve().parents[1]
SEMI = {"sttu", "stt", "str"}
CHOICES = ("depth", "fold", "stacked", "auto")


def with_stage(fused: torch.nn.Module, stage: str) -> torch.nn.Module:
    """A copy of the fused network whose sequential/ring layers all run ``stage`` (None: the rule)."""
    model = copy.deepcopy(fused)
    for module in model.modules():
        if isinstance(module, FusedSequential):
            module.spatial_stage = None if stage == "auto" else stage
    return model


def micro() -> None:
    import torch.nn.functional as F

    torch.set_num_threads(1)
    print("| batch | r | H | groups | depth us | fold us | stacked us | unfold+mm us | rule |\n"
          "|---|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for n in (1, 32):
            for r, H, g in [(3, 32, 2), (7, 32, 2), (7, 16, 2), (7, 8, 2), (15, 8, 2), (3, 32, 4), (6, 16, 4),
                            (14, 8, 4), (28, 32, 2), (56, 16, 2)]:
                z, S = torch.randn(n, r, g, H, H), torch.randn(r, r, 3, 3)
                folded = torch.randn(n * g, r, H, H)
                runs = {stage: (lambda stage=stage: contract.grouped_shared_conv(z, S, (1, 1), (1, 1), (1, 1), stage))
                        for stage in contract.GROUPED_STAGES}
                runs["unfold"] = lambda: S.reshape(r, -1) @ F.unfold(folded, 3, padding=1)
                us = time_in_blocks({k: (lambda _x, f=f: f()) for k, f in runs.items()}, z, 150)
                rule = contract.grouped_stage(n, (H, H), (1, 1))
                print(f"| {n} | {r} | {H} | {g} | " + " | ".join(f"{us[k] * 1e6:.0f}" for k in runs) + f" | {rule} |",
                      flush=True)


def micro_train(threads: int, forward_only: bool) -> None:
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    n = 128
    stages = [s for s in contract.GROUPED_STAGES if s != "stacked"]  # stacked: batch 1, inference
    names = stages + ([] if forward_only else ["depth_torch"])
    print(f"batch {n}, {threads} threads, " + ("forward only" if forward_only else "forward + backward"))
    print("| r | H | groups | r*g | " + " | ".join(f"{k} ms" for k in names) + " | block/depth | rule |\n"
          + "|---|---|---|---|" + "---|" * len(names) + "---|---|")
    for r, H, g in [(3, 32, 2), (2, 32, 4), (3, 32, 4), (4, 16, 2), (6, 16, 2), (8, 16, 2), (12, 8, 2)]:
        z = torch.randn(n, r, g, H, H, requires_grad=not forward_only)
        S = torch.randn(r, r, 3, 3, requires_grad=not forward_only)
        grad = torch.randn(n, r, g, H, H)

        def run(stage):
            if stage == "depth_torch":
                return lambda: F.conv3d(z, S.unsqueeze(2), None, 1, (0, 1, 1)).backward(grad)
            if forward_only:
                return lambda: contract.grouped_shared_conv(z, S, (1, 1), (1, 1), (1, 1), stage)
            return lambda: contract.grouped_shared_conv(z, S, (1, 1), (1, 1), (1, 1), stage).backward(grad)

        sec = {}
        with torch.set_grad_enabled(not forward_only):
            for _ in range(3):  # rounds: every form in each, so drift hits all alike
                for k in names:
                    f = run(k)
                    f()
                    for _ in range(5):
                        start = time.perf_counter()
                        f()
                        sec.setdefault(k, []).append(time.perf_counter() - start)
        sec = {k: statistics.median(v) for k, v in sec.items()}
        rule = contract.grouped_stage(n, (H, H), (1, 1), "cpu", r * g, needs_grad=not forward_only)
        print(f"| {r} | {H} | {g} | {r * g} | " + " | ".join(f"{sec[k] * 1e3:.2f}" for k in names)
              + f" | {sec['block'] / sec['depth']:.2f} | {rule} |", flush=True)


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
    parser.add_argument("--micro-train", action="store_true",
                        help="time each form's forward + backward alone at batch 128 (--threads)")
    parser.add_argument("--forward", action="store_true", help="with --micro-train: forward only")
    args = parser.parse_args()
    if args.micro:
        micro()
        return
    if args.micro_train:
        micro_train(args.threads, args.forward)
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print("| network | format | batch | dense ms | " + " | ".join(CHOICES) + " |\n|---|---|---|---|"
          + "---|" * len(CHOICES))
    for network in args.networks:
        torch.manual_seed(0)
        dense = build_model(network, 3, 10).eval()
        for fmt in args.formats:
            small, _ = stpnet.compress(dense, fmt, compression=args.factor, t=2 if fmt in SEMI else None)
            fused = stpnet.fuse(small.eval())
            for batch in args.batches:
                x = torch.randn(batch, 3, 32, 32)
                models = {"dense": dense, **{stage: with_stage(fused, stage) for stage in CHOICES}}
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
