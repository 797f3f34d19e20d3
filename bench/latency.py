"""Inference latency of compressed networks against dense: factorized, fused, TensorLy-Torch, ONNX Runtime.

For each network (ResNet-20, ResNet-32, WRN-16-8; random weights: latency does not depend on
their values), each of the six formats (t = 2 for the semi-tensor ones) and each whole-model
factor (9x, 20x), it times in one process, forward only under ``no_grad``, ``--threads`` intra-op
threads:

- ``dense``: the network itself;
- ``factorized``: ``stpnet.compress(dense, fmt, compression=X)`` in eval mode (cost-model path
  choice per layer, merged cores cached);
- ``fused``: :func:`stpnet.fuse` of it (fixed chains of standard ops);
- ``fused_for_batch``: ``stpnet.fuse(small, example=x)`` for the batch timed: a layer whose path
  choice is 'rebuild' at that size stays factorized (rebuilt once in eval), the others are fused;
- ``tltorch``: TensorLy-Torch's ``FactorizedConv.from_conv`` on the same layers (Tucker and TT,
  ``implementation='factorized'``), at the per-layer parameter fraction that gives about the same
  whole-model compression, when tensorly-torch is installed (``pip install tensorly-torch``);
- ``onnx``: the dense and the fused network exported with ``torch.onnx.export`` and run by ONNX
  Runtime (CPU provider, the same thread count), with ``--onnx``;
- ``compiled``: with ``--compile``, the dense network, the fused network and the one fused for the
  batch, each through ``torch.compile`` (inductor, ``freezing`` on: weights folded as constants,
  BatchNorm folded into the convolution before it, elementwise ops fused; static shapes), as a
  deployment under torch.compile would run them; their ratios are to the compiled dense network;
- ``folded``: with ``--fold``, the dense network and the one fused for the batch with every
  BatchNorm folded into the convolution before it (:func:`stpnet.fold_batchnorm`; ``fuse(...,
  fold_batchnorm=True)``), as deployment tools do; their ratio is to the folded dense network
  (the report also gives the folded fused network over the unfolded dense one);
- ``dense_channels_last``: with ``--dense-channels-last`` (NCHW runs), the dense network in
  channels_last memory format, the input converted on each call: the dense baseline in the
  layout that runs it fastest on CPU here; the report gives fused for batch over it.

Models are timed in alternating blocks (3 rounds; in each, every model runs a warm-up and then
``--repeats / 3`` timed calls), and the median is reported as a ratio to dense from the same
rounds, so drifts of a shared machine hit all alike. Rows are appended to ``results/latency/runs.jsonl``; ``--report`` prints the table.

Run (from the repository root; nothing else running):
    .venv/bin/python bench/latency.py --onnx
    .venv/bin/python bench/latency.py --report
    .venv/bin/python bench/latency.py --report --last 3      # medians of the last 3 runs
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import stpnet
from stpnet.compress import eligible_layers
from stpnet.models import build_model

from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "latency"
FORMATS = ("tucker", "sttu", "tt", "stt", "tr", "str", "cp")
SEMI = {"sttu", "stt", "str"}
NETWORKS = ("resnet20", "resnet32", "wrn-16-8")


def time_in_blocks(models: dict[str, object], x: torch.Tensor, repeats: int, rounds: int = 3,
                   warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each callable on ``x``.

    Each round times every model in turn, in a block of ``repeats // rounds`` calls after
    ``warmup`` untimed ones: models alternate, so a drift of a shared machine hits all alike, while
    each block runs with its own kernels warm (alternating single calls make the dense network at
    batch 1 much slower, its oneDNN primitives evicted by the other models')."""
    per_block = max(1, repeats // rounds)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(rounds):
            for name, model in models.items():
                for _ in range(warmup):
                    model(x)
                for _ in range(per_block):
                    start = time.perf_counter()
                    model(x)
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def tltorch_version(dense: nn.Module, fmt: str, fraction: float) -> nn.Module | None:
    """The network with every Conv2d but the first replaced by TensorLy-Torch's factorized conv."""
    try:
        import tltorch
    except ImportError:
        return None
    model = copy.deepcopy(dense)
    for name in eligible_layers(model):
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Conv2d):
            continue
        new = tltorch.FactorizedConv.from_conv(layer, rank=fraction, factorization=fmt, implementation="factorized",
                                               decompose_weights=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model.eval()


def onnx_session(model: nn.Module, x: torch.Tensor, threads: int):
    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return lambda inp: session.run(None, {"x": inp.numpy()})


def compiled(model: nn.Module, x: torch.Tensor):
    """``model`` through ``torch.compile`` (inductor with ``freezing``, static shapes), compiled on
    ``x`` before it is timed."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True), torch.no_grad():
        run = torch.compile(model, dynamic=False)
        run(x)
    return run


def baseline(name: str) -> str:
    """The model a timing is divided by: the dense network run the same way."""
    for prefix in ("onnx", "compiled", "folded"):
        if name.startswith(prefix + "_"):
            return prefix + "_dense"
    return "dense"


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(args) -> None:
    torch.set_num_threads(args.threads)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "runs.jsonl"
    for net in args.networks:
        torch.manual_seed(0)
        dense = build_model(net).eval().to(memory_format=layout)
        dense_params = params(dense)
        for factor in args.factors:
            for fmt in args.formats:
                small, _ = stpnet.compress(dense, fmt, compression=factor, t=2 if fmt in SEMI else None)
                small = small.eval().to(memory_format=layout)
                fused = stpnet.fuse(small).eval()
                candidates = {"dense": dense, "factorized": small, "fused": fused}
                extra = {}
                if fmt in ("tucker", "tt"):
                    # tltorch's rank=float is the fraction of each layer's parameters to keep
                    tl = tltorch_version(dense, fmt, 1.0 / factor)
                    if tl is not None:
                        candidates["tltorch"] = tl
                        extra["tltorch_compression"] = dense_params / params(tl)
                for batch in args.batches:
                    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=layout)
                    models = dict(candidates)
                    # fused for this batch size: layers whose path choice is 'rebuild' at it stay factorized
                    models["fused_for_batch"] = stpnet.fuse(small, example=x).eval()
                    if args.onnx:
                        models["onnx_dense"] = onnx_session(dense, x, args.threads)
                        models["onnx_fused"] = onnx_session(fused, x, args.threads)
                    if args.dense_channels_last:
                        dense_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last)
                        models["dense_channels_last"] = (
                            lambda inp, m=dense_cl: m(inp.contiguous(memory_format=torch.channels_last)))
                    if args.fold:
                        models["folded_dense"] = stpnet.fold_batchnorm(dense)
                        models["folded_fused_for_batch"] = stpnet.fuse(small, example=x, fold_batchnorm=True).eval()
                    if args.compile:
                        torch._dynamo.reset()  # every row compiles afresh (no recompile limit, no reuse)
                        for name in ("dense", "fused", "fused_for_batch"):
                            models["compiled_" + name] = compiled(models[name], x)
                    seconds = time_in_blocks(models, x, args.repeats)
                    row = {"network": net, "format": fmt, "target": factor, "batch": batch,
                           "compression": dense_params / params(small), "fused_params": params(fused),
                           "params": params(small), "dense_params": dense_params, "seconds": seconds,
                           "ratio": {k: v / seconds[baseline(k)] for k, v in seconds.items()},
                           "threads": args.threads, "repeats": args.repeats, "channels_last": args.channels_last,
                           "compiled": "inductor, freezing" if args.compile else None, "folded": args.fold,
                           "cpu": cpu_model(), "torch": torch.__version__, **extra}
                    with log.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{net:>9} {fmt:>6} {factor:g}x b{batch:<3} " + "  ".join(
                        f"{k} {v:.2f}" for k, v in row["ratio"].items() if k != baseline(k)),
                        flush=True)


def report(path: Path, last: int = 1) -> str:
    """The table of the latest row of each configuration; with ``last`` > 1, each ratio is the
    median of the configuration's last ``last`` rows (repeated runs of a noisy machine)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    history: dict[tuple, list[dict]] = {}
    for r in rows:
        history.setdefault((r["network"], r["target"], r["batch"], r.get("channels_last", False), r["format"]),
                           []).append(r)
    latest = {}
    for key, runs in history.items():
        runs = runs[-last:]
        r = dict(runs[-1])
        r["ratio"] = {k: statistics.median(run["ratio"][k] for run in runs if k in run["ratio"])
                      for k in r["ratio"]}
        r["seconds"] = {k: statistics.median(run["seconds"][k] for run in runs if k in run["seconds"])
                        for k in r["seconds"]}
        latest[key] = r
    lines = ["time / dense (lower is better; < 1 is faster than dense); ONNX columns: / dense under ONNX Runtime"
             + (f"; median of the last {last} runs of each row" if last > 1 else ""),
             "", "| network | target | batch | memory | format | compression | dense ms | factorized | fused | "
             "fused for batch | tltorch | onnx fused | compiled: fused / for batch | "
             "BN folded: for batch / folded dense (/ dense) | for batch / dense channels_last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(latest, key=lambda k: (NETWORKS.index(k[0]) if k[0] in NETWORKS else 9, k[1], k[2], k[3],
                                             FORMATS.index(k[4]))):
        r = latest[key]
        ratio = r["ratio"]
        tl = f"{ratio['tltorch']:.2f} ({r['tltorch_compression']:.1f}x)" if "tltorch" in ratio else "-"
        onnx = f"{ratio['onnx_fused']:.2f}" if "onnx_fused" in ratio else "-"
        compiled_ratios = (f"{ratio['compiled_fused']:.2f} / {ratio['compiled_fused_for_batch']:.2f}"
                           if "compiled_fused" in ratio else "-")
        folded = "-"
        if "folded_fused_for_batch" in ratio:
            over_dense = r["seconds"]["folded_fused_for_batch"] / r["seconds"]["dense"]
            folded = f"{ratio['folded_fused_for_batch']:.2f} ({over_dense:.2f})"
        vs_cl = (f"{r['seconds']['fused_for_batch'] / r['seconds']['dense_channels_last']:.2f}"
                 if "dense_channels_last" in r["seconds"] else "-")
        lines.append(f"| {r['network']} | {r['target']:g}x | {r['batch']} | "
                     f"{'channels_last' if r.get('channels_last') else 'NCHW'} | {r['format']} | "
                     f"{r['compression']:.1f}x | "
                     f"{r['seconds']['dense'] * 1e3:.2f} | {ratio['factorized']:.2f} | {ratio['fused']:.2f} | "
                     f"{ratio.get('fused_for_batch', float('nan')):.2f} | {tl} | {onnx} | {compiled_ratios} | "
                     f"{folded} | {vs_cl} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="*", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--factors", nargs="*", type=float, default=[9, 20])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--channels-last", action="store_true",
                        help="run every model (dense included) on channels_last inputs and weights")
    parser.add_argument("--onnx", action="store_true", help="also time dense and fused under ONNX Runtime")
    parser.add_argument("--compile", action="store_true",
                        help="also time dense, fused and fused-for-batch through torch.compile (inductor, freezing)")
    parser.add_argument("--dense-channels-last", action="store_true",
                        help="also time the dense network in channels_last (input converted per call)")
    parser.add_argument("--fold", action="store_true",
                        help="also time the dense and the fused-for-batch networks with BatchNorm folded in")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--last", type=int, default=1,
                        help="with --report: the median of each row's last N runs (default 1: the latest)")
    args = parser.parse_args()
    if args.report:
        print(report(OUT / "runs.jsonl", args.last))
        return
    run(args)


if __name__ == "__main__":
    main()
