"""Probe one fine-tuning setting on a recovered network that bench/recover.py cached.

Fine-tunes the cached ``recovered.pt`` of a configuration (spec + weights) for ``EPOCHS`` epochs
with distillation from the shipped dense ResNet-20 (alpha 0.9, T 4; block-wise feature distillation
of weight ``FEAT`` when given, :func:`stpnet.train.feature_distillation_loss` at every residual
block), SGD Nesterov cosine from ``LR``, weight decay ``WD``, batch 128, bf16 autocast, ``THREADS``
threads (default 1), and prints one JSON line per
epoch and the final float32 test accuracy (full CIFAR-10 (JPEG q75) test set). Used to try
learning rate and weight decay before changing bench/recover.py's recipes.

Run (from the repository root):
    .venv/bin/python bench/recover_probe.py RECOVERED_PT LR EPOCHS TAG [WD [FEAT [THREADS]]] >> results/recover/probes.log
"""

import json
import sys
from pathlib import Path

import torch

from stpnet.data import load_dataset, benchmark_data_path
from stpnet.model_spec import ModelSpec
from stpnet.app.pipeline import load_trained, normalized_like, train_spec
from stpnet.train import TrainConfig, evaluate

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(int(sys.argv[7]) if len(sys.argv) > 7 else 1)
dense, _, state = load_trained("resnet20-cifar10")
dense.eval()
data = normalized_like(load_dataset(str(benchmark_data_path("cifar10-jpeg.tar.gz"))), state)
src, lr, epochs, tag = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
wd = float(sys.argv[5]) if len(sys.argv) > 5 else 5e-4
feat = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
saved = torch.load(src, weights_only=True)
spec = ModelSpec.from_dict(saved["spec"])
small = spec.build()
small.load_state_dict(saved["model"])
cfg = TrainConfig(epochs=epochs, batch_size=128, lr=lr, weight_decay=wd, schedule="cosine", seed=0, amp="bf16",
                  distill_alpha=0.9, distill_temperature=4.0, distill_features=feat)


def on_epoch(r):
    print(json.dumps({"tag": tag, **{k: r[k] for k in ("epoch", "test_accuracy", "epoch_time")}}), flush=True)


small, hist = train_spec(spec, data, cfg, Path(src).parent / "probes" / tag, model=small, teacher=dense,
                         on_epoch=on_epoch, device=torch.device("cpu"))
acc = evaluate(small.float().eval(), data.test_x, data.test_y, data.mean, data.std, device=torch.device("cpu"))["accuracy"]
print(json.dumps({"tag": tag, "final_fp32": acc}), flush=True)
