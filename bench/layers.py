"""Benchmark factorized convolutions against the dense convolution they replace.

For each size (64->64 on 128x3x32x32-like batches, 256->256 on a batch of 32) it times forward +
backward of the dense 3x3 convolution and of every format at the ResNet-32 ranks (R = 14, t = 2
for the semi-tensor formats; TR/STR R = 10) on each forward path, reports the forward multiply-adds
from the layers' cost model and the peak memory (RSS growth of a fresh process), and compares
TensorLy-Torch's TT convolution at the same rank when it is installed.

Run:  .venv/bin/python bench/layers.py [--quick] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time

import torch

from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)

SIZES = [  # (name, channels, batch, spatial)
    ("64->64, batch 128, 32x32", 64, 128, 32),
    ("256->256, batch 32, 32x32", 256, 32, 32),
]
CONFIGS = [  # (label, format, layout, rank, t)
    ("Tucker R=14", "tucker", "tucker2", 14, 1),
    ("STTu R=14 t=2", "sttu", "tucker2", 14, 2),
    ("TT R=14 sequential", "tt", "sequential", 14, 1),
    ("STT R=14 t=2 sequential", "stt", "sequential", 14, 2),
    ("TT R=14 paired", "tt", "paired", 14, 1),
    ("STT R=14 t=2 paired", "stt", "paired", 14, 2),
    ("TR R=10", "tr", "ring", 10, 1),
    ("STR R=10 t=2", "str", "ring", 10, 2),
]


def build(spec: dict) -> torch.nn.Module:
    import stpnet

    c = spec["channels"]
    if spec["kind"] == "dense":
        return torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
    if spec["kind"] == "tltorch":
        import tltorch

        return tltorch.FactorizedConv(c, c, 3, order=2, padding=1, factorization="tt", rank=spec["rank"],
                                      implementation=spec["path"])
    return stpnet.nn.FactorizedConv2d(c, c, 3, padding=1, bias=False, format=spec["format"],
                                      layout=spec["layout"], rank=spec["rank"], t=spec["t"],
                                      forward_path=spec["path"])


def measure(spec: dict, queue) -> None:
    """Run in a fresh process: time fwd+bwd and record peak RSS growth."""
    torch.manual_seed(0)
    layer = build(spec)
    x = torch.randn(spec["batch"], spec["channels"], spec["spatial"], spec["spatial"], requires_grad=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    runs = spec["warmup"] + spec["repeats"]
    i = 0
    while i < runs:
        start = time.perf_counter()
        layer(x).sum().backward()
        elapsed = time.perf_counter() - start
        if i >= spec["warmup"]:
            times.append(elapsed)
        elif elapsed > 3.0:  # a very slow path: one more timed run is enough
            runs = i + 2
        x.grad = None
        layer.zero_grad(set_to_none=True)
        i += 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    out = {"time": statistics.median(times), "peak_mib": peak / 1024,
           "params": sum(p.numel() for p in layer.parameters())}
    if spec["kind"] == "stpnet":
        shape = tuple(x.shape)
        out["macs"] = layer.macs(shape)
        out["chosen"] = layer.choose_path(shape)
    elif spec["kind"] == "dense":
        out["macs"] = spec["batch"] * spec["channels"] ** 2 * 9 * spec["spatial"] ** 2
    queue.put(out)


def run(spec: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(spec, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {"error": f"exit code {proc.exitcode}"}
    return queue.get(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--output", help="also write the markdown table here")
    parser.add_argument("--json", help="write raw results as JSON here")
    args = parser.parse_args()
    repeats, warmup = (3, 1) if args.quick else (7, 2)
    try:
        import tltorch  # noqa: F401
        have_tltorch = True
    except ImportError:
        have_tltorch = False
    cpu = cpu_model()
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu}, "
              f"{platform.python_version()}; median of {repeats} fwd+bwd after {warmup} warm-up")
    print(header)
    lines = [header, ""]
    raw = []
    for size_name, c, batch, spatial in SIZES:
        common = {"channels": c, "batch": batch, "spatial": spatial, "repeats": repeats, "warmup": warmup}
        dense = run({**common, "kind": "dense"})
        rows = [("dense 3x3 conv", "-", dense)]
        for label, fmt, layout, rank, t in CONFIGS:
            results = {}
            for path in ("auto", "rebuild", "contract"):
                results[path] = run({**common, "kind": "stpnet", "format": fmt, "layout": layout,
                                     "rank": rank, "t": t, "path": path})
            rows.append((label, results["auto"]["chosen"], results))
        if have_tltorch:
            for impl in ("factorized", "reconstructed"):
                rows.append((f"TensorLy-Torch TT R=14 ({impl})", impl,
                             run({**common, "kind": "tltorch", "rank": 14, "path": impl})))
        title = f"### {size_name}"
        table = ["| layer | params | fwd MACs | auto path | fwd+bwd auto (ms) | vs dense | rebuild (ms) | "
                 "contract (ms) | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
        for label, chosen, res in rows:
            if "error" in res:
                table.append(f"| {label} | failed ({res['error']}) | | | | | | | |")
                continue
            if "auto" in res:
                auto, reb, con = res["auto"], res["rebuild"], res["contract"]
                table.append(f"| {label} | {auto['params']:,} | {auto['macs'] / 1e9:.3f} G | {chosen} | "
                             f"{auto['time'] * 1e3:.1f} | {dense['time'] / auto['time']:.2f}x | "
                             f"{reb['time'] * 1e3:.1f} | {con['time'] * 1e3:.1f} | {auto['peak_mib']:.0f} |")
            else:
                macs = f"{res['macs'] / 1e9:.3f} G" if "macs" in res else "-"
                table.append(f"| {label} | {res['params']:,} | {macs} | {chosen} | {res['time'] * 1e3:.1f} | "
                             f"{dense['time'] / res['time']:.2f}x | - | - | {res['peak_mib']:.0f} |")
            raw.append({"size": size_name, "layer": label, "result": res})
        print("\n" + title)
        print("\n".join(table))
        lines += [title, "", *table, ""]
    print("\n'vs dense' is dense time / layer time (above 1 is faster than dense).")
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
