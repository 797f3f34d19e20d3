"""BatchNorm recalibration on unaugmented against training-augmented calibration images.

Re-estimates the BatchNorm statistics (:func:`stpnet.recovery.recalibrate_batchnorm`) of the
shipped dense ResNet-20, of its plain STT 9x decomposition, and of the block-fitted STT 9x network
that ``bench/recover.py --recipe v3`` cached (``RECOVERED``), on 512 training images drawn with
:func:`stpnet.app.pipeline.calibration_images` (seed 0) without and with the trainer's augmentation
(``augment=True``: 4-pixel-padded random crop and flip), and prints the float32 accuracy of each
on the full CIFAR-10 (JPEG q75) test set, one JSON line per network and calibration.

Run (from the repository root; one thread):
    .venv/bin/python bench/bn_recalibration.py /root/stpnet-runs/recover/stt-9x-s0-v3/recovered.pt \
        >> results/recover/bn_recalibration.jsonl
"""

import copy
import json
import sys
from pathlib import Path

import torch

import stpnet
from stpnet.data import load_dataset, benchmark_data_path
from stpnet.model_spec import ModelSpec
from stpnet.app.pipeline import calibration_images, load_trained, normalized_like
from stpnet.recovery import recalibrate_batchnorm
from stpnet.train import evaluate

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
dense, _, state = load_trained("resnet20-cifar10")
dense.eval()
data = normalized_like(load_dataset(str(benchmark_data_path("cifar10-jpeg.tar.gz"))), state)


def accuracy(model) -> float:
    return evaluate(model.eval(), data.test_x, data.test_y, data.mean, data.std,
                    device=torch.device("cpu"))["accuracy"]


networks = {"dense": dense, "stt-9x-plain": stpnet.compress(dense, "stt", compression=9, t=2)[0]}
if len(sys.argv) > 1:
    saved = torch.load(sys.argv[1], weights_only=True)
    recovered = ModelSpec.from_dict(saved["spec"]).build()
    recovered.load_state_dict(saved["model"])
    networks["stt-9x-v3-recovered"] = recovered
for name, model in networks.items():
    row = {"network": name, "none": accuracy(model)}
    for augment in (False, True):
        recalibrated = copy.deepcopy(model)
        recalibrate_batchnorm(recalibrated, calibration_images(data, 512, 0, augment=augment))
        row["augmented" if augment else "unaugmented"] = accuracy(recalibrated)
    print(json.dumps(row), flush=True)
