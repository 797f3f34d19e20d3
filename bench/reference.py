"""Train the reference networks shipped with stpnet from scratch, and export them into the package.

Each network is trained by the ``stpnet train`` command line in RECIPES (the same command a user
types; the script calls the CLI's entry point in this process), resumably in its run directory.
``--export`` then evaluates the final checkpoint on the full CIFAR-10 (JPEG q75) test set, writes
``src/stpnet/models/weights/<name>.pt`` and ``<name>.json`` (the model card with the SHA-256 and
the command), and copies the per-epoch metrics log to ``results/reference/<name>.jsonl``.

Run (from the repository root):
    .venv/bin/python bench/reference.py resnet20-cifar10             # train (resumes)
    .venv/bin/python bench/reference.py resnet20-cifar10 --export    # evaluate, write weights + card
    .venv/bin/python bench/reference.py --list                       # the recipes as CLI lines
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import torch

from stpnet.app.cli import main as stpnet_main
from stpnet.data import load_dataset, benchmark_data_path
from stpnet.models.pretrained import write_pretrained
from stpnet.app.pipeline import load_trained
from stpnet.train import evaluate, load_checkpoint

from _machine import cpu_model  # bench/_machine.py (scripts run from bench/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]
DATA = str(benchmark_data_path("cifar10-jpeg.tar.gz"))
DATA_NAME = "CIFAR-10 (JPEG q75): 50,000 training and 10,000 test images"

#: name -> the ``stpnet train`` arguments (without --data and --run-dir). bf16 autocast and
#: channels_last halve the step time on this CPU (AMX); SGD Nesterov, cosine, wd 5e-4, batch 128.
RECIPES = {
    "resnet20-cifar10": ["--model", "resnet20", "--epochs", "100", "--lr", "0.1", "--batch-size", "128",
                         "--weight-decay", "5e-4", "--schedule", "cosine", "--warmup-epochs", "1",
                         "--amp", "bf16", "--seed", "0"],
    "resnet32-cifar10": ["--model", "resnet32", "--epochs", "200", "--lr", "0.1", "--batch-size", "128",
                         "--weight-decay", "5e-4", "--schedule", "cosine", "--warmup-epochs", "1",
                         "--amp", "bf16", "--seed", "0"],
}


def command(name: str, run_dir: Path) -> list[str]:
    return ["train", *RECIPES[name], "--data", DATA, "--run-dir", str(run_dir)]


def train(name: str, run_dir: Path) -> int:
    args = command(name, run_dir) + ["--quiet"]
    print("stpnet " + shlex.join(args), flush=True)
    return stpnet_main(args)


def export(name: str, run_dir: Path, out_dir: Path) -> None:
    checkpoint = run_dir / "checkpoint.pt"
    state = load_checkpoint(checkpoint)
    epochs = int(RECIPES[name][RECIPES[name].index("--epochs") + 1])
    if state["epoch"] < epochs:
        sys.exit(f"{checkpoint} has {state['epoch']} of {epochs} epochs; finish training first")
    model, spec, _ = load_trained(checkpoint)
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    data = load_dataset(str(ROOT / DATA))
    pre = state["metadata"].get("preprocessing", {"mean": list(data.mean), "std": list(data.std)})
    # the shipped network is evaluated in float32, as users will run it
    result = evaluate(model, data.test_x, data.test_y, pre["mean"], pre["std"], batch_size=500,
                      device=torch.device("cpu"))
    history = state["history"]
    wall = sum(r["epoch_time"] + r["eval_time"] for r in history)
    card = write_pretrained(model, {
        "name": name, "architecture": spec.name, "in_channels": spec.in_channels,
        "num_classes": spec.num_classes, "input_size": list(data.test_x.shape[2:]), "classes": list(data.classes),
        "data": DATA_NAME, "mean": pre["mean"], "std": pre["std"], "test_accuracy": result["accuracy"],
        "test_samples": len(data.test_y),
        "training": {"command": "stpnet " + shlex.join(command(name, Path(f"runs/reference/{spec.name}"))),
                     "config": state["config"], "epochs": state["epoch"],
                     "last_epoch_test_accuracy_bf16": history[-1]["test_accuracy"],
                     "wall_seconds": round(wall, 1), "threads": torch.get_num_threads(),
                     "hardware": cpu_model(), "torch": torch.__version__},
    }, out_dir)
    results = ROOT / "results" / "reference"
    results.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "metrics.jsonl", results / f"{name}.jsonl")
    (results / f"{name}.card.json").write_text(json.dumps(card.to_dict(), indent=1) + "\n")
    print(json.dumps({"name": name, "test_accuracy": card.test_accuracy, "params": card.params,
                      "sha256": card.sha256, "wall_seconds": round(wall, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", choices=sorted(RECIPES))
    parser.add_argument("--run-dir", help="default runs/reference/<architecture>")
    parser.add_argument("--export", action="store_true", help="evaluate and write the weights and card")
    parser.add_argument("--out-dir", default=str(ROOT / "src" / "stpnet" / "models" / "weights"))
    parser.add_argument("--list", action="store_true", help="print each recipe as a CLI line")
    args = parser.parse_args()
    os.chdir(ROOT)  # the recipes name the data relative to the repository root
    if args.list or args.name is None:
        for name in RECIPES:
            print(f"{name}: stpnet " + shlex.join(command(name, Path(f"runs/reference/{name.split('-')[0]}"))))
        return
    run_dir = Path(args.run_dir or ROOT / "runs" / "reference" / args.name.split("-")[0])
    if args.export:
        export(args.name, run_dir, Path(args.out_dir))
    else:
        sys.exit(train(args.name, run_dir))


if __name__ == "__main__":
    main()
