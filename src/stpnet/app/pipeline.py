"""End-to-end steps shared by the CLI, the demo and the benchmarks: train a zoo model (dense or
compressed), compress a trained checkpoint, load one back, and time inference."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..compress import CompressionReport, compress
from ..data import ImageDataset, normalize, training_augment
from ..model_spec import ModelSpec
from ..models import pretrained, pretrained_names
from ..recovery import recover
from ..train import CheckpointError, TrainConfig, Trainer, load_checkpoint

__all__ = ["train_spec", "load_trained", "normalized_like", "calibration_images", "compress_trained",
           "inference_latency"]


def train_spec(spec: ModelSpec, data: ImageDataset, config: TrainConfig, run_dir=None, *, model: nn.Module | None = None,
               device=None, on_step: Callable | None = None, on_epoch: Callable | None = None,
               extra_metadata: dict | None = None, teacher: nn.Module | None = None) -> tuple[nn.Module, list[dict]]:
    """Build ``spec`` (or take ``model``, whose architecture ``spec`` describes) and train it.

    The checkpoint's metadata records the spec, so :func:`load_trained` can rebuild the model.
    ``teacher`` distils into the model when ``config.distill_alpha > 0``.
    """
    torch.manual_seed(config.seed)
    model = spec.build() if model is None else model
    metadata = {"spec": spec.to_dict(), **(extra_metadata or {})}
    trainer = Trainer(model, data, config, run_dir, device=device, metadata=metadata, on_step=on_step,
                      on_epoch=on_epoch, teacher=teacher)
    return model, trainer.fit()


def load_trained(path: str | Path, device="cpu") -> tuple[nn.Module, ModelSpec, dict]:
    """Rebuild and load the model of a checkpoint written by :func:`train_spec`, or a shipped network.

    Parameters
    ----------
    path : path or str
        A ``checkpoint.pt``, or the name of a shipped network (:func:`stpnet.models.pretrained_names`,
        e.g. ``'resnet20-cifar10'``) when no file of that name exists.

    Returns
    -------
    (model, spec, state)
        ``state`` is the checkpoint dict; for a shipped network it holds ``'card'`` (the
        :class:`~stpnet.models.ModelCard` as a dict) and ``'metadata'`` with the spec.

    Raises
    ------
    CheckpointError
        If the file is not an stpnet checkpoint, holds no model spec, or does not fit it.
    """
    if not Path(path).exists():
        if str(path) in pretrained_names():
            model, card = pretrained(str(path), device=device)
            plan = card.compression or {}
            spec = ModelSpec(card.architecture, card.in_channels, card.num_classes, plan.get("format", "dense"),
                             plan.get("t"), plan.get("layout"), {k: tuple(v) for k, v in plan.get("ranks", {}).items()})
            metadata = {"spec": spec.to_dict(), "source": card.name,
                        "preprocessing": {"mean": list(card.mean), "std": list(card.std)}}
            return model, spec, {"card": card.to_dict(), "metadata": metadata}
        raise CheckpointError(f"checkpoint {path} does not exist, and it is not the name of a shipped network "
                              f"({', '.join(pretrained_names()) or 'none shipped'})")
    state = load_checkpoint(path, map_location=device)
    meta = state.get("metadata", {})
    if "spec" not in meta:
        raise CheckpointError(f"{path} has no model spec in its metadata; it was not written by stpnet train")
    spec = ModelSpec.from_dict(meta["spec"])
    model = spec.build()
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match its model spec: {str(exc).splitlines()[0]}") from None
    return model.to(device), spec, state


def normalized_like(data: ImageDataset, state: dict) -> ImageDataset:
    """``data`` preprocessed as the model of checkpoint ``state`` was trained (its recorded mean and
    std); unchanged for checkpoints that record none."""
    pre = state.get("metadata", {}).get("preprocessing")
    if not pre:
        return data
    return data.with_normalization(pre["mean"], pre["std"])


def calibration_images(data: ImageDataset, n: int, seed: int = 0, *, augment: bool = False) -> torch.Tensor:
    """``n`` training images drawn at random (fixed by ``seed``), preprocessed with ``data``'s mean
    and std: the calibration batch of the recovery steps.

    Without augmentation by default (what the fits match). ``augment=True`` applies the training
    augmentation of :class:`stpnet.train.Trainer` (:func:`stpnet.data.training_augment`, seeded by
    ``seed``) for BatchNorm recalibration, whose statistics should describe what the
    network was trained on: re-estimated on unaugmented images they cost a trained network
    accuracy, on augmented ones next to none (BENCHMARKS.md, "Keeping the accuracy of a trained
    network")."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"the calibration batch needs an int >= 2 images, got {n!r}")
    n = min(n, len(data.train_y))
    idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    images = data.train_x[idx]
    if augment:
        gen = torch.Generator().manual_seed(seed + 1)
        images = training_augment(images, generator=gen)
    return normalize(images, data.mean, data.std)


def compress_trained(model: nn.Module, spec: ModelSpec, format: str, *, rank=None, compression=None, t=None,
                     layout=None, n_iter: int = 0, input_shape: Sequence[int] | None = None,
                     allocation: str = "uniform", calibration: torch.Tensor | None = None, fit_steps: int = 0,
                     fit_unit: str = "block", recalibrate_bn: bool | str = False,
                     bn_calibration: torch.Tensor | None = None,
                     t_choices: Sequence[int] | None = None) -> tuple[nn.Module, ModelSpec, CompressionReport]:
    """Compress a trained dense zoo model through the decompositions (:func:`stpnet.compress`),
    then recover it on ``calibration`` when ``fit_steps`` or ``recalibrate_bn`` ask for it
    (:func:`stpnet.recover`, its ``bn_calibration`` too); return it, its spec and the report of
    both. With ``t_choices`` the spec records each layer's t."""
    if spec.format != "dense":
        raise ValueError(f"the model is already compressed ({spec.format}); compress a dense checkpoint")
    if (fit_steps or recalibrate_bn) and calibration is None:
        raise ValueError("fit_steps and recalibrate_bn need calibration inputs (calibration=a few hundred "
                         "preprocessed training images)")
    small, report = compress(model, format, rank=rank, compression=compression, t=t, layout=layout, init="decompose",
                             n_iter=n_iter, input_shape=input_shape, allocation=allocation, calibration=calibration,
                             t_choices=t_choices)
    if fit_steps or recalibrate_bn:
        report = report.with_recovery(recover(small, model, calibration, fit_steps=fit_steps, fit_unit=fit_unit,
                                              recalibrate_bn=recalibrate_bn, bn_calibration=bn_calibration))
    new_spec = ModelSpec(spec.name, spec.in_channels, spec.num_classes, format,
                         t if t_choices is None else report.t, layout, report.ranks)
    return small, new_spec, report


@torch.no_grad()
def inference_latency(model: nn.Module, input_shape: Sequence[int], *, repeats: int = 10, warmup: int = 2,
                      device=None) -> float:
    """Median seconds of one eval-mode forward pass on random input of ``input_shape``."""
    param = next(model.parameters())
    device = device or param.device
    was_training = model.training
    model.eval()
    x = torch.randn(*input_shape, device=device, dtype=param.dtype)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    model.train(was_training)
    return statistics.median(times)
