"""BatchNorm recalibration: re-estimate running statistics after the layers before them changed."""

from __future__ import annotations

import torch
from torch import nn

from ._calibration import check_images, iterate_images, modes_restored

__all__ = ["recalibrate_batchnorm"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, *, batch_size: int = 128) -> int:
    """Re-estimate the running mean and variance of every BatchNorm layer of ``model`` on ``images``.

    Compressing the convolutions before a BatchNorm changes the statistics of what it normalizes,
    while its running mean and variance still describe the dense network; re-estimating them on a
    few hundred training images recovers much of the accuracy lost (Li et al. 2016, "Revisiting
    batch normalization for practical domain adaptation"). The estimate is the exact average over
    all of ``images`` (cumulative moving average, ``momentum=None``), so the batch order does not
    matter up to rounding.

    Only BatchNorm buffers change (``running_mean``, ``running_var``, ``num_batches_tracked``):
    no parameter, and no other buffer. The model's train/eval mode and each BatchNorm's
    ``momentum`` are restored afterwards.

    Parameters
    ----------
    model : nn.Module
    images : torch.Tensor
        Preprocessed float inputs ``N x C x ...`` as the model takes them (for images: normalized
        with the model's mean and std): a few hundred training images, best augmented as in
        training (:func:`stpnet.pipeline.calibration_images` with ``augment=True``), since the
        statistics being replaced were gathered on augmented batches.
    batch_size : int
        Forward passes take this many images at a time; each batch's statistics are averaged in.

    Returns
    -------
    int
        The number of BatchNorm layers recalibrated (0 if the model has none).

    Raises
    ------
    ValueError
        If ``images`` is not a non-empty floating tensor, or ``batch_size`` < 2 (a BatchNorm needs
        more than one value per channel).
    """
    check_images(images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 (batch statistics need two samples), got {batch_size!r}")
    norms = [m for m in model.modules() if isinstance(m, _BATCHNORMS) and m.track_running_stats]
    if not norms:
        return 0
    momenta = {m: m.momentum for m in norms}
    try:
        with modes_restored(model):
            model.eval()
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over all batches
                m.train()
            for batch in iterate_images(images, batch_size, model):
                model(batch)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
    return len(norms)
