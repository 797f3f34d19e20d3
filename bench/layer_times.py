"""Where a compressed network's inference time goes: each layer against the dense layer it replaces.

Compresses a network as ``bench/latency.py`` does (``stpnet.compress(dense, fmt, compression=X)``,
t = 2 for the semi-tensor formats; random weights), fuses it for the batch timed
(``stpnet.fuse(small, example=x)``) and times, on the input each layer receives in the dense
network, the dense layer and its replacement (alternating blocks, median; ``time_in_blocks`` of
``bench/latency.py``), then both whole networks. The difference between the whole network and the
sum of its layers is what both networks spend outside the replaced layers (BatchNorm, ReLU,
additions, the first convolution and the classifier). It prints each layer's form
(``FusedLayer.form`` and, for a sequential/ring chain, its grouped stage; ``rebuild`` for a layer
kept factorized) and, with ``--profile NAME``, the ``torch.profiler`` operator table of that fused
layer on its input.

Run (from the repository root; nothing else running):
    .venv/bin/python bench/layer_times.py --network resnet20 --format stt --batch 32
    .venv/bin/python bench/layer_times.py --network wrn-16-8 --format tr --batch 32 --profile layer1.0.conv2
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import stpnet
from stpnet.models import build_model
from stpnet.nn import FactorizedLayer
from stpnet.deploy.fused import FusedLayer, FusedSequential

from latency import FORMATS, NETWORKS, SEMI, time_in_blocks  # bench/ on sys.path


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each Conv/Linear of ``model`` receives on ``x``, by module name."""
    inputs: dict[str, torch.Tensor] = {}

    def remember(name):
        def hook(module, args, output):
            inputs.setdefault(name, args[0])
        return hook

    handles = [m.register_forward_hook(remember(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return inputs


def describe(module: nn.Module) -> str:
    if isinstance(module, FusedSequential) and module.form == "chain":
        return f"chain/{module.spatial_stage or 'rule'}"
    if isinstance(module, FusedLayer):
        return module.form
    if isinstance(module, FactorizedLayer):
        return module.forward_path
    return type(module).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="resnet20", choices=NETWORKS)
    parser.add_argument("--format", default="stt", choices=FORMATS)
    parser.add_argument("--factor", type=float, default=9)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--profile", metavar="NAME", help="print the operator table of this fused layer")
    parser.add_argument("--channels-last", action="store_true",
                        help="networks and input in channels_last (fused for a channels_last batch)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    dense = build_model(args.network).eval()
    small, _ = stpnet.compress(dense, args.format, compression=args.factor,
                               t=2 if args.format in SEMI else None)
    dense, small = dense.to(memory_format=layout), small.to(memory_format=layout)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=layout)
    fused = stpnet.fuse(small.eval(), example=x).eval()
    dense_layers, fused_layers = dict(dense.named_modules()), dict(fused.named_modules())
    total = {"dense": 0.0, "fused": 0.0}
    print(f"{args.network} {args.format} {args.factor:g}x batch {args.batch}, {args.threads} threads"
          f"{', channels_last' if args.channels_last else ''}; "
          "microseconds per call (median)")
    print(f"{'layer':<20} {'input':<16} {'dense':>9} {'fused':>9} {'ratio':>6}  form")
    for name, inp in layer_inputs(dense, x).items():
        replacement = fused_layers.get(name)
        if replacement is None or replacement is dense_layers[name] or not isinstance(
                replacement, (FusedLayer, FactorizedLayer)):
            continue
        seconds = time_in_blocks({"dense": dense_layers[name], "fused": replacement}, inp, args.repeats)
        for key in total:
            total[key] += seconds[key]
        print(f"{name:<20} {str(tuple(inp.shape[1:])):<16} {seconds['dense'] * 1e6:9.1f} "
              f"{seconds['fused'] * 1e6:9.1f} {seconds['fused'] / seconds['dense']:6.2f}  {describe(replacement)}")
    whole = time_in_blocks({"dense": dense, "fused": fused}, x, args.repeats)
    print(f"replaced layers: dense {total['dense'] * 1e3:.2f} ms, fused {total['fused'] * 1e3:.2f} ms "
          f"({total['fused'] / total['dense']:.2f})")
    print(f"whole network:   dense {whole['dense'] * 1e3:.2f} ms, fused {whole['fused'] * 1e3:.2f} ms "
          f"({whole['fused'] / whole['dense']:.2f}); outside the replaced layers: dense "
          f"{(whole['dense'] - total['dense']) * 1e3:.2f} ms, fused {(whole['fused'] - total['fused']) * 1e3:.2f} ms")
    if args.profile:
        layer = fused_layers[args.profile]
        inp = layer_inputs(dense, x)[args.profile]
        with torch.no_grad():
            layer(inp)
            with torch.profiler.profile() as prof:
                for _ in range(5):
                    layer(inp)
        print(f"{args.profile} ({describe(layer)}), 5 calls:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
