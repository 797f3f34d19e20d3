"""Training-step speed on this machine: memory layout (contiguous or channels_last) and precision
(float32 or bfloat16 autocast), for a dense network and the same network compressed ~9x.

One process, interleaved repeats (every format and setting is timed in every round, so drift and
other load affect all alike), median of the per-round medians; ratios are against the dense network
in the same setting. A step is forward, cross-entropy, backward and an SGD update (Nesterov, weight
decay) on random CIFAR-sized input, as in ``stpnet.train``.

Run (idle machine; writes nothing unless --json):
    .venv/bin/python bench/train_speed.py
    .venv/bin/python bench/train_speed.py --networks resnet20 resnet32 --formats dense stt tt --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from stpnet.compress import compress
from stpnet.models import build_model

from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)

SETTINGS = [("contiguous", "float32"), ("channels_last", "float32"), ("contiguous", "bf16"),
            ("channels_last", "bf16")]


def make(network: str, fmt: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(network)
    if fmt != "dense":
        model, _ = compress(model, fmt, compression=9.0, t=2 if fmt in ("sttu", "stt", "str") else None,
                            init="random", inplace=True)
    return model


def time_steps(model, layout: str, precision: str, batch: int, steps: int) -> float:
    """Median seconds of ``steps`` training steps after two warm-up steps."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=g)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=["resnet20"])
    parser.add_argument("--formats", nargs="+", default=["dense", "tucker", "tt", "stt", "str"])
    parser.add_argument("--settings", nargs="+", default=[f"{lay}/{prec}" for lay, prec in SETTINGS],
                        choices=[f"{lay}/{prec}" for lay, prec in SETTINGS], help="layout/precision pairs to time")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--torch-conv-backward", action="store_true",
                        help="baseline: torch's own input gradient in the factorized layers' k x k stages "
                             "(stpnet.functional.conv off), to measure what that kernel changes")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.torch_conv_backward:
        import stpnet.functional.conv as conv_kernel
        conv_kernel._input_grad_by_forward = lambda *_: False
    settings = [tuple(s.split("/")) for s in args.settings]
    print(f"# {cpu_model()}, {args.threads} threads, torch {torch.__version__}, batch {args.batch}"
          + (", torch's conv backward" if args.torch_conv_backward else ""))
    print("| network | format | " + " | ".join(f"{lay} {prec} (ms, x dense)" for lay, prec in settings) + " |")
    print("|---|---|" + "---|" * len(settings))
    results = []
    for network in args.networks:
        models = {fmt: make(network, fmt) for fmt in args.formats}
        rounds = {(fmt, s): [] for fmt in args.formats for s in settings}
        for _ in range(args.rounds):  # every format and setting in every round: drift affects all alike
            for fmt, model in models.items():
                for lay, prec in settings:
                    rounds[(fmt, (lay, prec))].append(time_steps(model, lay, prec, args.batch, args.steps))
        med = {key: statistics.median(v) for key, v in rounds.items()}
        for fmt in args.formats:
            cells = []
            for s in settings:
                ratio = f" ({med[(fmt, s)] / med[('dense', s)]:.2f}x)" if "dense" in models else ""
                cells.append(f"{med[(fmt, s)] * 1e3:.0f}{ratio}")
            print(f"| {network} | {fmt} | " + " | ".join(cells) + " |", flush=True)
            results.append({"network": network, "format": fmt, "batch": args.batch, "threads": args.threads,
                            "cpu": cpu_model(), "torch": torch.__version__,
                            "torch_conv_backward": args.torch_conv_backward,
                            "seconds": {f"{lay}/{prec}": med[(fmt, (lay, prec))] for lay, prec in settings}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
