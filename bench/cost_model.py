"""How good is the analytic path choice? Time both forward paths of every factorized convolution
and compare with what the cost model picks.

For ResNet-20 and WRN-16-8 (random weights: time does not depend on values), compressed with
``stpnet.compress(dense, fmt, compression=X)`` in all seven formats (t = 2 for the semi-tensor
ones) at X = 9 and 20, each distinct convolution (by channels, stride, kernel) is run on its own
input from a forward pass at batch 1 and 32, in inference (eval mode, no gradients: the rebuilt
weight and merged cores cached), forced to ``rebuild`` and to ``contract`` (median of repeated
calls). For each, the ratio of the time of the path the cost model picks to the faster path's
time is reported: 1.00 is a perfect choice.

``--fit`` searches the CPU constants of :mod:`stpnet.nn.cost` (``WIDE``, ``MEMORY_WEIGHT``,
``OP_COST``, ``GROUP_PENALTY``) on a grid for the fewest layers chosen more than 10% slower than
the faster path, then the lowest mean ratio; the library's constants were set from it.

Run (from the repository root; nothing else running; the timings take minutes):
    .venv/bin/python bench/cost_model.py                 # time, save, report the current model
    .venv/bin/python bench/cost_model.py --report --fit  # from the saved timings
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

import stpnet
import stpnet.nn.cost as cost
import stpnet.nn.layouts as layouts
from stpnet.nn import FactorizedConv2d
from stpnet.models import build_model

from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "speed" / "cost_model.jsonl"
FORMATS = ("tucker", "sttu", "tt", "stt", "tr", "str", "cp")
SEMI = {"sttu", "stt", "str"}


def median_us(run, repeats: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def compressed(network: str, fmt: str, factor: float) -> torch.nn.Module:
    torch.manual_seed(0)
    dense = build_model(network).eval()
    small, _ = stpnet.compress(dense, fmt, compression=factor, t=2 if fmt in SEMI else None)
    return small.eval()


def distinct_layers(model: torch.nn.Module, batch: int) -> list[tuple[FactorizedConv2d, torch.Tensor]]:
    """Each distinct factorized convolution with its input from one forward pass."""
    inputs: dict[int, tuple[FactorizedConv2d, torch.Tensor]] = {}

    def hook(module, args, output):
        inputs.setdefault(id(module), (module, args[0]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, FactorizedConv2d)]
    with torch.no_grad():
        model(torch.randn(batch, 3, 32, 32))
    for h in handles:
        h.remove()
    seen, out = set(), []
    for layer, x in inputs.values():
        key = (layer.in_channels, layer.out_channels, layer.stride[0], layer.kernel_size[0])
        if key not in seen:
            seen.add(key)
            out.append((layer, x))
    return out


def measure(args) -> None:
    torch.set_num_threads(args.threads)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w") as f:
        for network, fmt, factor in itertools.product(args.networks, FORMATS, args.factors):
            model = compressed(network, fmt, factor)
            for batch in args.batches:
                for layer, x in distinct_layers(model, batch):
                    repeats = 40 if batch == 1 else (10 if network == "resnet20" else 4)
                    times = {}
                    with torch.no_grad():
                        for path in ("rebuild", "contract"):
                            layer.forward_path = path
                            times[path] = median_us(lambda: layer(x), repeats)
                    layer.forward_path = "auto"
                    row = {"network": network, "format": fmt, "factor": factor, "batch": batch,
                           "layer": [layer.in_channels, layer.out_channels, layer.stride[0], layer.kernel_size[0]],
                           "input_shape": list(x.shape), "us": times, "threads": args.threads, "cpu": cpu_model(),
                           "torch": torch.__version__}
                    f.write(json.dumps(row) + "\n")
                    print(network, fmt, f"{factor:g}x", f"b{batch}", row["layer"],
                          " ".join(f"{k} {v:.0f}us" for k, v in times.items()), flush=True)


def load_rows() -> list[dict]:
    return [json.loads(line) for line in OUT.read_text().splitlines() if line.strip()]


def layer_costs(rows: list[dict]) -> list[tuple[dict, FactorizedConv2d]]:
    """Each row with a layer of its geometry and ranks, rebuilt (costs depend on shapes only)."""
    layers: dict[tuple, FactorizedConv2d] = {}
    for network, fmt, factor in {(r["network"], r["format"], r["factor"]) for r in rows}:
        for m in compressed(network, fmt, factor).modules():
            if isinstance(m, FactorizedConv2d):
                key = (network, fmt, factor, m.in_channels, m.out_channels, m.stride[0], m.kernel_size[0])
                layers.setdefault(key, m)
    return [(r, layers[(r["network"], r["format"], r["factor"], *r["layer"])]) for r in rows]


def ratios(pairs: list[tuple[dict, FactorizedConv2d]]) -> list[tuple[float, dict]]:
    """(time of the chosen path / time of the faster path, row), sorted."""
    out = []
    for row, layer in pairs:
        layer.__dict__.pop("_path_choices", None)
        choice = layer.choose_path(row["input_shape"], "cpu", inference=True)
        out.append((row["us"][choice] / min(row["us"].values()), row))
    return sorted(out, key=lambda item: item[0])


def summary(values: list[tuple[float, dict]]) -> str:
    r = [v for v, _ in values]
    return (f"{len(r)} layer timings: chosen/best mean {statistics.fmean(r):.3f}, worst {max(r):.2f}, "
            f"{sum(v > 1.1 for v in r)} over 1.10, {sum(v > 1.25 for v in r)} over 1.25")


def fit(pairs) -> None:
    best = None
    saved = (cost.WIDE, dict(cost.MEMORY_WEIGHT), dict(cost.OP_COST), cost.GROUP_PENALTY)
    try:
        for wide, memory, op, group in itertools.product([8, 12, 16, 24, 32], [4, 8, 16, 32, 64],
                                                         [0.0, 2e5, 5e5, 1e6, 2e6], [0.0, 0.1, 0.2, 0.3, 0.5, 1.0]):
            cost.WIDE, cost.MEMORY_WEIGHT["cpu"], cost.OP_COST["cpu"] = wide, memory, op
            cost.GROUP_PENALTY = layouts.GROUP_PENALTY = group
            values = [v for v, _ in ratios(pairs)]
            score = (sum(v > 1.1 for v in values), statistics.fmean(values))
            if best is None or score < best[0]:
                best = (score, (wide, memory, op, group), max(values))
    finally:
        cost.WIDE, cost.GROUP_PENALTY = saved[0], saved[3]
        layouts.GROUP_PENALTY = saved[3]
        cost.MEMORY_WEIGHT.update(saved[1])
        cost.OP_COST.update(saved[2])
    (over, mean), (wide, memory, op, group), worst = best
    print(f"best fit: WIDE={wide} MEMORY_WEIGHT[cpu]={memory} OP_COST[cpu]={op:g} GROUP_PENALTY={group}: "
          f"{over} over 1.10, mean {mean:.3f}, worst {worst:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="*", default=["resnet20", "wrn-16-8"])
    parser.add_argument("--factors", nargs="*", type=float, default=[9, 20])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="use the saved timings")
    parser.add_argument("--fit", action="store_true", help="also search the CPU constants")
    args = parser.parse_args()
    if not args.report:
        measure(args)
    pairs = layer_costs(load_rows())
    values = ratios(pairs)
    print("current cost model:", summary(values))
    for value, row in values[-8:]:
        print(f"  {value:.2f}  {row['network']} {row['format']} {row['factor']:g}x b{row['batch']} {row['layer']} "
              + " ".join(f"{k} {v:.0f}us" for k, v in row["us"].items()))
    if args.fit:
        fit(pairs)


if __name__ == "__main__":
    main()
