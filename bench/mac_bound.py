"""How fast can a compressed network be, counted in multiply-adds? A bound for the latency targets.

For each network, whole-model factor and format (compressed as ``bench/latency.py`` does:
``stpnet.compress(dense, fmt, compression=X)``, t = 2 for the semi-tensor formats), this counts
the forward multiply-adds of an inference call at the given batch:

- ``contract``: every factorized layer on its contraction chain (the merged cores cached, as in
  eval mode: ``PathCost.macs - PathCost.once``);
- ``best``: every layer on the cheaper of its chain and the dense op on the rebuilt weight;

each divided by the dense network's multiply-adds (convolutions and linear layers; BatchNorm, ReLU
and additions are the same in both networks and left out, which only makes the ratios smaller
than a time ratio could be).

A network whose ``best`` ratio is above a latency target cannot meet it with these forms unless
its small ops run more multiply-adds per second than the dense network's wide convolutions, which
no measurement here has shown (``bench/latency.py``: narrow ops run 2-8x fewer per second). Rows
go to ``results/latency/mac_bound.jsonl``; the table is printed.

Run (from the repository root):
    .venv/bin/python bench/mac_bound.py
    .venv/bin/python bench/mac_bound.py --networks wrn-16-8 --factors 9 --batches 32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import stpnet
from stpnet.models import build_model
from stpnet.nn.base import FactorizedLayer
from stpnet.nn.cost import dense_layer_macs

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "latency"
FORMATS = ("tucker", "sttu", "tt", "stt", "tr", "str", "cp")
SEMI = {"sttu", "stt", "str"}


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Each Conv/Linear (dense or factorized) that ``x`` reaches, with its input shape."""
    shapes: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
    handles = []

    def remember(name: str):
        def hook(module, args, output) -> None:
            shapes.setdefault(name, (module, tuple(args[0].shape)))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (FactorizedLayer, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            handles.append(module.register_forward_hook(remember(name)))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def count(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-adds of ``model`` on ``x``: dense (every layer as the dense op), contract (the
    factorized layers on their chains, cached work left out) and best (each layer's cheaper)."""
    totals = {"dense": 0, "contract": 0, "best": 0}
    for module, shape in layer_inputs(model, x).values():
        dense = dense_layer_macs(module, shape)
        totals["dense"] += dense
        if isinstance(module, FactorizedLayer):
            cost = module.path_costs(shape)["contract"]
            chain = cost.macs - cost.once
            totals["contract"] += chain
            totals["best"] += min(chain, dense)
        else:
            totals["contract"] += dense
            totals["best"] += dense
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=["resnet20", "wrn-16-8"])
    parser.add_argument("--factors", nargs="+", type=float, default=[9.0, 20.0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print("| network | factor | batch | format | compression | dense MMACs | contract / dense | best / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for net in args.networks:
        torch.manual_seed(0)
        dense = build_model(net).eval()
        dense_params = sum(p.numel() for p in dense.parameters())
        for factor in args.factors:
            for fmt in args.formats:
                small, _ = stpnet.compress(dense, fmt, compression=factor, t=2 if fmt in SEMI else None)
                params = sum(p.numel() for p in small.parameters())
                for batch in args.batches:
                    x = torch.zeros(batch, 3, 32, 32)
                    reference = count(dense, x)["dense"]
                    totals = count(small, x)
                    row = {"network": net, "factor": factor, "batch": batch, "format": fmt,
                           "compression": dense_params / params, "dense_macs": reference,
                           "contract_ratio": totals["contract"] / reference, "best_ratio": totals["best"] / reference}
                    with (OUT / "mac_bound.jsonl").open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"| {net} | {factor:g}x | {batch} | {fmt} | {row['compression']:.1f}x | "
                          f"{reference / 1e6:,.1f} | {row['contract_ratio']:.2f} | {row['best_ratio']:.2f} |",
                          flush=True)


if __name__ == "__main__":
    main()
