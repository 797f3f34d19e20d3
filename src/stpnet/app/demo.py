"""The demo jobs, on the embedded CIFAR-10 subset.

* :func:`run_compression_demo` (the default ``stpnet demo``): load the shipped trained ResNet-20
  and the shipped networks compressed from it (the end result of full-length training), then
  compress it about 9x in TT and STT, recover each (rank allocation, fitting to the dense
  activations, a short fine-tune with the dense network as teacher) and report the accuracy
  straight after compression and after recovery.
* :func:`run_demo` (``stpnet demo --from-scratch``): train ResNet-20 dense, TT and STT from scratch.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TextIO

import torch

from ..compress import compress, model_report
from ..formats import format_class
from ..model_spec import ModelSpec
from ..models import pretrained, pretrained_names
from .progress import ProgressBar

__all__ = ["run_demo", "run_compression_demo", "shipped_compressed", "DEMO_MODEL", "DEMO_PRETRAINED", "DEMO_FORMATS",
           "DEMO_FINE_TUNE_EPOCHS"]

#: The small ResNet of the demo (CIFAR ResNet-20, option A shortcuts).
DEMO_MODEL = "resnet20"
#: The shipped trained network the compression demo starts from.
DEMO_PRETRAINED = "resnet20-cifar10"
#: Distilled fine-tuning epochs of the compression demo on the embedded 5,000 training images.
DEMO_FINE_TUNE_EPOCHS = 2
#: Formats of the compression demo (t = 2 for the semi-tensor ones).
DEMO_FORMATS = ("tt", "stt")


def shipped_compressed() -> tuple[str, ...]:
    """The shipped networks compressed from :data:`DEMO_PRETRAINED` (for example
    ``'resnet20-cifar10-stt9x'``), the ones the compression demo shows first."""
    return tuple(n for n in pretrained_names() if n.startswith(DEMO_PRETRAINED + "-"))


def run_compression_demo(formats=DEMO_FORMATS, compression: float = 9.0, out_dir: str | Path = "stpnet-demo",
                         seed: int = 0, progress: TextIO | None = None, fine_tune_epochs: int = DEMO_FINE_TUNE_EPOCHS,
                         fit_steps: int = 40, calibration_size: int = 256, train_subset: int | None = None,
                         bn_keep_function: bool = True, distill_features: float = 0.0,
                         t_choices: tuple[int, ...] | None = None) -> tuple[list[dict], Path | None]:
    """Compress the shipped trained ResNet-20 in each format and recover its accuracy.

    For each format: compress to ``compression`` (whole model) with the uniform rule and measure
    the test accuracy straight away; then compress again with rank allocation (by weight error)
    and fit each residual block's factorized layers to the dense block's output (``fit_steps``
    L-BFGS iterations per block on ``calibration_size`` training images); then, with
    ``bn_keep_function``, move each BatchNorm's statistics to the fitted network's own (on
    augmented calibration images) keeping its function (:func:`stpnet.recovery.recalibrate_batchnorm`),
    and fine-tune ``fine_tune_epochs`` epochs on the embedded training images with the dense
    network as teacher (SGD lr 0.01, cosine, weight decay 5e-4, distillation alpha 0.9, T 4; block
    outputs matched with weight ``distill_features``). Accuracies are on the embedded 1,000-image
    test subset. The defaults keep the whole demo within about two minutes on two CPU cores.

    Parameters
    ----------
    formats : sequence of str
        Formats to compress to (t = 2 for the semi-tensor ones, or chosen per layer among
        ``t_choices``).
    compression : float
        Whole-model compression target.
    out_dir : path
        Receives one run folder per format and ``accuracy_by_stage.png`` (each network's accuracy
        at each stage, the dense accuracy as a line).
    progress : text stream, optional
        Where to report progress (None: silent).
    train_subset : int, optional
        Fine-tune on this many embedded training images (tests).

    Returns
    -------
    (rows, plot_path)
        One dict per network: format, params, compression, ``plain`` (accuracy straight after
        compression; the dense row has its own accuracy), ``recovered`` (after allocation and
        fitting, no epoch), ``accuracy`` (final), ``seconds`` (compression, recovery and fine-tuning). The
        dense row comes first, then each shipped compressed network (:func:`shipped_compressed`,
        named in ``format``, with its card's ``full_test_accuracy``), then the networks compressed
        here. The plot path is None if matplotlib is missing.
    """
    from ..compress import compress as compress_model
    from ..data import load_embedded_cifar10
    from .pipeline import calibration_images, train_spec
    from ..recovery import recalibrate_batchnorm, recover
    from ..train import TrainConfig, evaluate

    dense, card = pretrained(DEMO_PRETRAINED)
    data = load_embedded_cifar10().with_normalization(card.mean, card.std)
    if train_subset is not None:
        data = data.subset(train_subset, len(data.test_y), seed)
    cpu = torch.device("cpu")

    def accuracy(model) -> float:
        return evaluate(model, data.test_x, data.test_y, data.mean, data.std, device=cpu)["accuracy"]

    def say(text: str) -> None:
        if progress is not None:
            progress.write(text + "\n")
            progress.flush()

    dense_params = card.params
    rows = [{"format": "dense", "params": dense_params, "compression": 1.0, "plain": None,
             "recovered": None, "accuracy": accuracy(dense), "seconds": 0.0}]
    say(f"{DEMO_PRETRAINED}: {rows[0]['accuracy']:.2%} on the embedded test subset")
    for name in shipped_compressed():  # the end result of a full-length run, first
        start = time.perf_counter()
        shipped, shipped_card = pretrained(name)
        rows.append({"format": name, "params": shipped_card.params, "compression": dense_params / shipped_card.params,
                     "plain": None, "recovered": None, "accuracy": accuracy(shipped),
                     "full_test_accuracy": shipped_card.test_accuracy, "seconds": time.perf_counter() - start})
        say(f"{name} (shipped): {rows[-1]['accuracy']:.2%} on the embedded test subset, "
            f"{shipped_card.test_accuracy:.2%} on the full test set")
    calibration = calibration_images(data, calibration_size, seed)
    keep_function = bn_keep_function and fine_tune_epochs > 0
    # what training feeds BatchNorm: its statistics are moved to these (only before a fine-tune)
    augmented = calibration_images(data, calibration_size, seed, augment=True) if keep_function else None
    out_dir = Path(out_dir)
    for fmt in formats:
        t = 2 if format_class(fmt)[1] else None
        start = time.perf_counter()
        plain, _ = compress_model(dense, fmt, compression=compression, t=t)
        plain_accuracy = accuracy(plain)
        say(f"{fmt}: straight after compression {plain_accuracy:.2%}; recovering")
        choose_t = bool(t_choices) and t is not None  # each layer's t chosen with its ranks
        small, report = compress_model(dense, fmt, compression=compression, t=None if choose_t else t,
                                       allocation="weight", t_choices=t_choices if choose_t else None)
        if fit_steps > 0:
            report = report.with_recovery(recover(small, dense, calibration, fit_steps=fit_steps, fit_unit="block"))
        recovered = accuracy(small)
        say(f"{fmt}: after rank allocation and fitting {recovered:.2%}")
        spec = ModelSpec(DEMO_MODEL, 3, data.num_classes, fmt, report.t if choose_t else t, None, report.ranks)
        final = recovered
        if fine_tune_epochs > 0:
            if keep_function:
                recalibrate_batchnorm(small, augmented, keep_function=True)
            config = TrainConfig(epochs=fine_tune_epochs, batch_size=128, lr=0.01, weight_decay=5e-4,
                                 schedule="cosine", seed=seed, distill_alpha=0.9, distill_temperature=4.0,
                                 distill_features=distill_features)
            bar = ProgressBar(fine_tune_epochs, progress) if progress is not None else None
            for stale in ("checkpoint.pt", "metrics.jsonl"):  # a new compression: never resume an earlier run
                (out_dir / fmt / stale).unlink(missing_ok=True)
            small, history = train_spec(spec, data, config, out_dir / fmt, model=small, device="cpu",
                                        teacher=dense, on_step=bar.step if bar else None,
                                        on_epoch=bar.epoch if bar else None,
                                        extra_metadata={"source": DEMO_PRETRAINED})
            final = accuracy(small)
        rows.append({"format": fmt, "params": report.params, "compression": report.compression,
                     "plain": plain_accuracy, "recovered": recovered, "accuracy": final,
                     "seconds": time.perf_counter() - start})
    plot = None
    try:
        from .plot import plot_recovery_stages

        epochs = f"{fine_tune_epochs} distilled epoch{'s' * (fine_tune_epochs != 1)}"
        plot = plot_recovery_stages(
            [r for r in rows[1:] if "full_test_accuracy" not in r],
            {"plain": "straight after compression", "recovered": "after allocation + fit (no epoch)",
             "accuracy": f"after {epochs}"},
            out_dir / "accuracy_by_stage.png", dense_accuracy=rows[0]["accuracy"],
            title=f"trained {DEMO_MODEL} compressed ~{compression:g}x, embedded CIFAR-10 subset (JPEG q75)")
    except ImportError as exc:
        warnings.warn(str(exc))
    return rows, plot


def run_demo(epochs: int | None = None, rank: int = 8, out_dir: str | Path = "stpnet-demo", seed: int = 0,
             progress: TextIO | None = None, train_subset: int | None = None) -> tuple[list[dict], Path | None]:
    """Train ResNet-20 dense, TT (rank ``rank``) and STT (rank ``rank``, t = 2) on the embedded subset.

    Parameters
    ----------
    epochs : int, optional
        Epochs per model (default 5).
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
    from ..data import load_embedded_cifar10
    from .pipeline import train_spec
    from ..train import TrainConfig

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
