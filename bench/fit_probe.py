"""Probe data-aware fitting settings on the shipped ResNet-20: accuracy with no gradient epoch.

Compresses ``resnet20-cifar10`` with :func:`stpnet.compress` (decomposition, the given rank
allocation, then ``fit_steps`` L-BFGS iterations per fitted unit, layer or block) on
``CALIB`` preprocessed training images (:func:`stpnet.app.pipeline.calibration_images`, seed 0), and
prints one JSON line: the float32 accuracy on the full CIFAR-10 (JPEG q75) test set, the
parameter count and the wall time. Used to choose bench/recover.py's recipes.

Run (from the repository root; one thread by default):
    .venv/bin/python bench/fit_probe.py FORMAT ALLOCATION UNIT STEPS CALIB [THREADS [T_CHOICES]] >> results/recover/probes.log
    e.g. .venv/bin/python bench/fit_probe.py stt weight block 100 512
         .venv/bin/python bench/fit_probe.py stt weight block 200 512 1 1,2,4   # t chosen per layer
"""

import json
import sys
import time
from pathlib import Path

import torch

import stpnet
from stpnet.data import load_dataset, benchmark_data_path
from stpnet.app.pipeline import calibration_images, load_trained, normalized_like
from stpnet.train import evaluate

ROOT = Path(__file__).resolve().parents[1]
fmt, allocation, unit, steps, n_calib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 1)
t_choices = tuple(int(v) for v in sys.argv[7].split(",")) if len(sys.argv) > 7 else None
dense, _, state = load_trained("resnet20-cifar10")
dense.eval()
data = normalized_like(load_dataset(str(benchmark_data_path("cifar10-jpeg.tar.gz"))), state)
start = time.perf_counter()
calibration = calibration_images(data, n_calib, 0)
small, report = stpnet.compress(dense, fmt, compression=9,
                                t=2 if fmt.startswith("st") and t_choices is None else None,
                                allocation=allocation, t_choices=t_choices, calibration=calibration)
if steps > 0:
    report = report.with_recovery(stpnet.recover(small, dense, calibration, fit_steps=steps, fit_unit=unit))
seconds = time.perf_counter() - start
acc = evaluate(small.eval(), data.test_x, data.test_y, data.mean, data.std, device=torch.device("cpu"))["accuracy"]
choice = "" if t_choices is None else "-t" + "".join(map(str, t_choices))
print(json.dumps({"tag": f"fit-{fmt}-9x-{allocation}{choice}-{unit}-{steps}-c{n_calib}", "test_accuracy": acc,
                  "params": report.params, "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                  "t": sorted({layer.t for layer in report.layers if layer.t is not None})}),
      flush=True)
