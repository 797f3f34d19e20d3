"""What a fitted network computes when fine-tuning starts: BatchNorm in training mode.

A network fitted to the dense activations (``bench/recover.py``'s ``recovered`` step) relies on
the dense network's BatchNorm running statistics. Fine-tuning runs BatchNorm in training mode,
which normalizes each batch with its own statistics, so the function being fine-tuned is not the
fitted one. This script loads a cached ``recovered.pt`` (spec + weights) and prints, as JSON lines,
the test accuracy on the full CIFAR-10 (JPEG q75) test set (float32, batches of 128 drawn in one
fixed random order: the stored test set is grouped by class, and a batch of one class has
statistics no training batch has):

- ``eval``: BatchNorm in eval mode (running statistics), what ``recovered`` reports;
- ``train_bn``: BatchNorm in training mode (batch statistics), what the first fine-tuning step sees;

each for the dense network (the reference: batch statistics of 128 test images against the
running ones), the network as fitted (``stale``) and after
``recalibrate_batchnorm(..., keep_function=True)`` on 512 augmented training images (``keep``).

``--early STEPS LRS`` also runs ``STEPS`` distilled SGD steps (Nesterov, momentum 0.9, weight
decay 5e-4, batch 128 with the trainer's augmentation, alpha 0.9, T 4, float32) from the ``keep``
network for each learning-rate spec in the comma-separated ``LRS`` and prints the test accuracy on
2,000 test images after them: ``0.01`` constant, ``0.01w150`` linear warm-up over 150 steps,
``0.01c`` cosine from 0.01 to 0 over the steps; prefixed ``adamw:`` (``adamw:0.001c``), AdamW
(betas 0.9, 0.999; the same weight decay, decoupled) instead of SGD. A cheap look at how much of
the fitted start the first steps keep.

Run (from the repository root; one thread):
    .venv/bin/python bench/bn_train_mode.py /root/stpnet-runs/recover/stt-20x-s0-v4/recovered.pt
    .venv/bin/python bench/bn_train_mode.py RECOVERED_PT --early 300 0.01c,0.02c,0.04c
    .venv/bin/python bench/bn_train_mode.py RECOVERED_PT --early 300 0.01c,adamw:0.001c
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

from stpnet.data import load_dataset, normalize, training_augment, benchmark_data_path
from stpnet.model_spec import ModelSpec
from stpnet.app.pipeline import calibration_images, load_trained, normalized_like
from stpnet.recovery import recalibrate_batchnorm
from stpnet.train import distillation_loss

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def accuracy(model: nn.Module, data, *, train_bn: bool, n: int | None = None) -> float:
    """Test accuracy; with ``train_bn`` every BatchNorm normalizes with the batch's statistics (on a
    copy, so the running statistics of ``model`` stay as they are)."""
    model = copy.deepcopy(model).eval()
    if train_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    order = torch.randperm(len(data.test_y), generator=torch.Generator().manual_seed(0))
    order = order if n is None else order[:n]
    correct = 0
    for start in range(0, len(order), 128):
        idx = order[start:start + 128]
        correct += int((model(normalize(data.test_x[idx], data.mean, data.std)).argmax(1) == data.test_y[idx]).sum())
    return correct / len(order)


def early_steps(model, dense, data, steps: int, spec: str) -> float:
    """Accuracy on 2,000 test images after ``steps`` distilled steps under the learning-rate ``spec``
    (SGD, or AdamW with the ``adamw:`` prefix)."""
    optimizer, _, spec = spec.rpartition(":")
    if optimizer not in ("", "adamw"):
        raise ValueError(f"unknown optimizer {optimizer!r} in the learning-rate spec; valid: 'adamw:' or none (SGD)")
    if "w" in spec:
        peak, warmup, cosine = float(spec.split("w")[0]), int(spec.split("w")[1]), False
    else:
        peak, warmup, cosine = float(spec.rstrip("c")), 0, spec.endswith("c")
    model = copy.deepcopy(model).train()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=5e-4)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        lr = peak * 0.5 * (1 + math.cos(math.pi * step / steps)) if cosine else peak * min(1.0, (step + 1) / max(warmup, 1))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(data.train_y), (128,), generator=g)
        x = normalize(training_augment(data.train_x[idx], generator=g), data.mean, data.std)
        with torch.no_grad():
            teacher = dense(x)
        loss = distillation_loss(model(x), teacher, data.train_y[idx], alpha=0.9, temperature=4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return accuracy(model, data, train_bn=False, n=2000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recovered", help="a recovered.pt cached by bench/recover.py")
    parser.add_argument("--early", nargs=2, metavar=("STEPS", "LRS"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    dense, _, state = load_trained("resnet20-cifar10")
    dense.eval()
    data = normalized_like(load_dataset(str(benchmark_data_path("cifar10-jpeg.tar.gz"))), state)
    saved = torch.load(args.recovered, weights_only=True)
    fitted = ModelSpec.from_dict(saved["spec"]).build()
    fitted.load_state_dict(saved["model"])
    kept = copy.deepcopy(fitted)
    recalibrate_batchnorm(kept, calibration_images(data, 512, 0, augment=True), keep_function=True)
    for name, model in (("dense", dense), ("stale", fitted), ("keep", kept)):
        print(json.dumps({"recovered": args.recovered, "bn": name, "eval": accuracy(model, data, train_bn=False),
                          "train_bn": accuracy(model, data, train_bn=True)}), flush=True)
    if args.early:
        steps = int(args.early[0])
        for spec in args.early[1].split(","):
            print(json.dumps({"recovered": args.recovered, "bn": "keep", "steps": steps, "lr": spec,
                              "test_accuracy_2000": early_steps(kept, dense, data, steps, spec)}), flush=True)


if __name__ == "__main__":
    main()
