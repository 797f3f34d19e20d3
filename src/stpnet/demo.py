"""The demo job: train a small ResNet dense, TT and STT on the embedded CIFAR-10 subset."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TextIO

import torch

from .compress import compress, model_report
from .model_spec import ModelSpec
from .progress import ProgressBar

__all__ = ["run_demo", "DEMO_MODEL"]

#: The small ResNet of the demo (CIFAR ResNet-20, option A shortcuts).
DEMO_MODEL = "resnet20"


def run_demo(epochs: int | None = None, rank: int = 8, out_dir: str | Path = "stpnet-demo", seed: int = 0,
             progress: TextIO | None = None, train_subset: int | None = None) -> tuple[list[dict], Path | None]:
    """Train ResNet-20 dense, TT (rank ``rank``) and STT (rank ``rank``, t = 2) on the embedded subset.

    Parameters
    ----------
    epochs : int, optional
        Epochs per model (default 5: the three runs take about 4 minutes on 2 CPU cores).
    rank : int
        The rank of both TT and STT (sequential layout; factorized layers start fresh).
    out_dir : path
        Receives ``accuracy_vs_compression.png`` and one run folder per model.
    progress : text stream, optional
        Where to draw progress bars (None: silent).

    Returns
    -------
    (rows, plot_path)
        One dict per model (format, params, compression, accuracy, train_seconds) and the PNG path
        (None if matplotlib is missing).
    """
    from .data import load_embedded_cifar10
    from .pipeline import train_spec
    from .train import TrainConfig

    data = load_embedded_cifar10()
    if train_subset is not None:
        data = data.subset(train_subset, len(data.test_y), seed)
    c, h, w = data.train_x.shape[1:]
    base = ModelSpec(DEMO_MODEL, c, data.num_classes)
    dense_params = sum(p.numel() for p in base.build().parameters())
    epochs = 5 if epochs is None else epochs
    out_dir = Path(out_dir)
    rows = []
    for fmt, t in (("dense", None), ("tt", 1), ("stt", 2)):
        torch.manual_seed(seed)
        model = base.build()
        spec = base
        if fmt != "dense":
            model, report = compress(model, fmt, rank=rank, t=t, init="random", inplace=True)
            spec = ModelSpec(DEMO_MODEL, c, data.num_classes, fmt, t, None, report.ranks)
        config = TrainConfig(epochs=epochs, batch_size=128, lr=0.1, weight_decay=5e-4, schedule="cosine",
                             seed=seed, warmup_epochs=1)
        bar = None
        if progress is not None:
            bar = ProgressBar(epochs, progress)
            progress.write(f"training {DEMO_MODEL} {fmt}" + (f" rank {rank}, t={t}" if t else "") + "\n")
        start = time.perf_counter()
        model, history = train_spec(spec, data, config, out_dir / fmt, model=model, device="cpu",
                                    on_step=bar.step if bar else None, on_epoch=bar.epoch if bar else None)
        seconds = sum(r["epoch_time"] for r in history) if history else time.perf_counter() - start
        report = model_report(model, (1, c, h, w), dense_params=dense_params)
        rows.append({"format": fmt, "params": report.params, "compression": report.compression,
                     "accuracy": history[-1]["test_accuracy"], "train_seconds": seconds,
                     "macs": report.macs})
    plot = None
    try:
        from .plot import plot_accuracy_vs_compression

        plot = plot_accuracy_vs_compression(
            [dict(r, label=f"{r['format']}") for r in rows], out_dir / "accuracy_vs_compression.png",
            title=f"{DEMO_MODEL} on the embedded CIFAR-10 subset (JPEG q75), {epochs} epochs, rank {rank}")
    except ImportError as exc:
        warnings.warn(str(exc))
    return rows, plot
