"""Fashion-MNIST benchmark: LeNet-5 and a 1-channel ResNet-20, dense and in every format.

For each network it trains the dense model and Tucker/STTu, TT/STT and TR/STR at matched ranks
(the semi-tensor formats at t = 2, factorized layers initialised fresh), and reports test
accuracy, whole-model compression factor and epoch time on this CPU. Every configuration uses
the same protocol: SGD (Nesterov 0.9, weight decay 5e-4), lr 0.05 with a cosine schedule, batch
128, no augmentation, gradients clipped to global norm 5 (without clipping LeNet-5 with every
hidden layer in Tucker form diverges at this learning rate; see BENCHMARKS.md). Results append to a JSON
lines file, and finished configurations are skipped, so the script can be stopped and rerun.

Run:  .venv/bin/python bench/fashion_mnist.py --data "$STPNET_DATA_DIR/fashion-mnist" \
          [--epochs 3] [--train-subset N] [--results results/fashion_mnist.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stpnet.compress import compress, model_report
from stpnet.data import load_dataset, benchmark_data_path
from stpnet.model_spec import ModelSpec
from stpnet.app.pipeline import train_spec
from stpnet.train import TrainConfig, TrainingDivergedError

from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)

CONFIGS = [  # (format, t) at one rank per network
    ("dense", None), ("tucker", 1), ("sttu", 2), ("tt", 1), ("stt", 2), ("tr", 1), ("str", 2),
]
NETWORKS = {"lenet5": 4, "resnet20": 8}  # network -> rank of every factorized layer


def results_table(path: Path) -> str:
    """The markdown table of the results file: one row per network and format."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| network | format | rank | t | params | compression | test accuracy | epoch time (s) | x dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        dense = next(d for d in records if d["network"] == r["network"] and d["format"] == "dense")
        if r["test_accuracy"] is None:
            acc = speed = ratio = "diverged"
        else:
            acc, speed = f"{100 * r['test_accuracy']:.2f}%", f"{r['epoch_time']:.1f}"
            ratio = f"{r['epoch_time'] / dense['epoch_time']:.2f}"
        lines.append(f"| {r['network']} | {r['format']} | {r['rank'] or '-'} | {r['t'] or '-'} | {r['params']:,} | "
                     f"{r['compression']:.2f}x | {acc} | {speed} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(benchmark_data_path("fashion-mnist")))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--grad-clip", type=float, default=5.0, help="global gradient-norm clip; 0 = none")
    parser.add_argument("--formats", nargs="*", default=[f for f, _ in CONFIGS], help="formats to run")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--networks", nargs="*", default=list(NETWORKS))
    parser.add_argument("--results", default="results/fashion_mnist.jsonl")
    parser.add_argument("--runs", default="runs/fashion_mnist")
    parser.add_argument("--report", action="store_true", help="print the markdown table of the results")
    args = parser.parse_args()
    if args.report:
        print(results_table(Path(args.results)))
        return
    data = load_dataset(args.data)
    c, h, w = data.train_x.shape[1:]
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if results.exists():
        done = {(r["network"], r["format"]) for r in map(json.loads, results.read_text().splitlines())}
    cpu = cpu_model()
    for net in args.networks:
        rank = NETWORKS[net]
        dense_params = sum(p.numel() for p in ModelSpec(net, c, data.num_classes).build().parameters())
        for fmt, t in CONFIGS:
            if (net, fmt) in done or fmt not in args.formats:
                continue
            torch.manual_seed(0)
            spec = ModelSpec(net, c, data.num_classes)
            model = spec.build()
            if fmt != "dense":
                model, report = compress(model, fmt, rank=rank, t=t, init="random", inplace=True)
                spec = ModelSpec(net, c, data.num_classes, fmt, t, None, report.ranks)
            config = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.05, weight_decay=5e-4, schedule="cosine",
                                 augment=False, seed=0, train_subset=args.train_subset,
                                 grad_clip=args.grad_clip or None)
            start = time.perf_counter()
            try:
                model, history = train_spec(spec, data, config, Path(args.runs) / f"{net}-{fmt}", model=model,
                                            device="cpu")
                outcome = {"test_accuracy": history[-1]["test_accuracy"],
                           "epoch_time": sum(r["epoch_time"] for r in history) / len(history)}
            except TrainingDivergedError as exc:
                outcome = {"test_accuracy": None, "epoch_time": None, "diverged": str(exc)}
            report = model_report(model, (1, c, h, w), dense_params=dense_params)
            record = {"network": net, "format": fmt, "rank": None if fmt == "dense" else rank, "t": t,
                      "params": report.params, "compression": report.compression, **outcome,
                      "epochs": args.epochs, "config": config.to_dict(),
                      "train_samples": args.train_subset or len(data.train_y), "macs": report.macs,
                      "wall": time.perf_counter() - start, "cpu": cpu, "threads": torch.get_num_threads(),
                      "torch": torch.__version__}
            with open(results, "a") as f:
                f.write(json.dumps(record) + "\n")
            result = ("diverged" if record["test_accuracy"] is None else
                      f"acc {record['test_accuracy']:.4f} epoch {record['epoch_time']:.1f} s")
            print(f"{net:9s} {fmt:6s} params {report.params:>9,} ({report.compression:6.2f}x) {result}", flush=True)


if __name__ == "__main__":
    main()
