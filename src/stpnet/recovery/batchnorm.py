"""BatchNorm recalibration: re-estimate running statistics after the layers before them changed."""

from __future__ import annotations

import torch
from torch import nn

from ._calibration import check_images, check_images_for, forward_with_hooks, iterate_images, modes_restored

__all__ = ["recalibrate_batchnorm"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, *, batch_size: int = 128,
                          keep_function: bool = False) -> int:
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

    With ``keep_function=True`` the network's eval-mode function does not change: each BatchNorm's
    statistics are measured on what reaches it while the network computes what it computes now,
    and its affine weight and bias are rescaled to absorb the change
    (``weight' = weight * sqrt(var' + eps) / sqrt(var + eps)``, ``bias' = bias + weight * (mean' -
    mean) / sqrt(var + eps)``). Use it before fine-tuning a network fitted to the dense network's
    activations (:func:`stpnet.recovery.fit_to_activations`): the fit relies on the dense running
    statistics, which no longer describe the compressed layers' outputs, so in training mode, where
    BatchNorm normalizes with the batch's own statistics, the fitted function is lost at the first
    step; after this, training-mode batches compute nearly the fitted function (BENCHMARKS.md,
    "Keeping the accuracy of a trained network"). Here the BatchNorm weights and biases change too,
    and ``num_batches_tracked``
    does not.

    Parameters
    ----------
    model : nn.Module
    images : torch.Tensor
        Preprocessed float inputs ``N x C x ...`` as the model takes them (for images: normalized
        with the model's mean and std): a few hundred training images, best augmented as in
        training (:func:`stpnet.app.pipeline.calibration_images` with ``augment=True``), since the
        statistics being replaced were gathered on augmented batches.
    batch_size : int
        Forward passes take this many images at a time; each batch's statistics are averaged in.
    keep_function : bool, default False
        Also rescale each BatchNorm's affine weight and bias so that the network computes the
        same function in eval mode as before (to rounding), with statistics that describe its
        actual inputs. Every BatchNorm tracked must be affine.

    Returns
    -------
    int
        The number of BatchNorm layers recalibrated (0 if the model has none).

    Raises
    ------
    ValueError
        If ``images`` is not a non-empty floating tensor (or does not suit the model: integer
        inputs to a model without an embedding, a meta tensor), or ``batch_size`` < 2 (a BatchNorm
        needs more than one value per channel), or with ``keep_function`` a BatchNorm is not affine
        or sees fewer than two values per channel; or if the new statistics (or rescaled weights)
        are not finite (inputs too large for the model's dtype): the previous ones are then kept.
    """
    check_images(images)
    check_images_for(model, images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 (batch statistics need two samples), got {batch_size!r}")
    norms = [m for m in model.modules() if isinstance(m, _BATCHNORMS) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m, {name: getattr(m, name).clone() for name in _STATE if getattr(m, name, None) is not None})
             for m in norms]
    try:
        if keep_function:
            _restate(model, norms, images, batch_size)
        else:
            _reestimate(model, norms, images, batch_size)
        tracked = set(norms)
        bad = [name for name, m in model.named_modules() if m in tracked
               and not all(bool(torch.isfinite(getattr(m, n)).all()) for n in _STATE[:4]
                           if getattr(m, n, None) is not None)]
        if bad:
            raise ValueError(f"BatchNorm recalibration gave non-finite statistics in {len(bad)} layer(s) "
                             f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the images drive the "
                             f"activations beyond the range of {_dtype_of(model)} (preprocess them as in training, "
                             "e.g. stpnet.data.normalize); the previous statistics are kept")
    except BaseException:
        for m, state in saved:
            for name, value in state.items():
                getattr(m, name).copy_(value)
        raise
    return len(norms)


#: What recalibration may change in a BatchNorm: restored if it fails.
_STATE = ("running_mean", "running_var", "weight", "bias", "num_batches_tracked")


def _dtype_of(model: nn.Module) -> torch.dtype:
    param = next(model.parameters(), None)
    return param.dtype if param is not None else torch.float32


def _reestimate(model: nn.Module, norms: list[nn.Module], images: torch.Tensor, batch_size: int) -> None:
    """Reset each BatchNorm's running statistics and average them over ``images`` exactly."""
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


def _restate(model: nn.Module, norms: list[nn.Module], images: torch.Tensor, batch_size: int) -> None:
    """``keep_function``: measure each BatchNorm's input statistics in eval mode, then move its running
    statistics there and rescale its affine parameters so its eval-mode output is unchanged."""
    names = {m: n for n, m in model.named_modules()}
    plain = [names[m] for m in norms if not m.affine]
    if plain:
        raise ValueError(f"keep_function rescales each BatchNorm's affine weight and bias; these have none "
                         f"(affine=False): {plain}")
    # per channel: count, sum and sum of squares of (x - running_mean), in float64
    sums: dict[nn.Module, list] = {m: [0, 0.0, 0.0] for m in norms}

    def hook(module, inputs, output):
        x = inputs[0]
        x = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double() - module.running_mean.double()[:, None]
        acc = sums[module]
        acc[0] += x.shape[1]
        acc[1] = acc[1] + x.sum(1)
        acc[2] = acc[2] + (x * x).sum(1)

    forward_with_hooks(model, {m: hook for m in norms}, iterate_images(images, batch_size, model))
    for m in norms:
        n, shifted_sum, shifted_squares = sums[m]
        if n < 2:
            raise ValueError(f"BatchNorm {names[m]!r} saw {n} value(s) per channel; keep_function needs at least "
                             "two (more images, or larger inputs)")
        old_mean, old_var = m.running_mean.double(), m.running_var.double()
        shift = shifted_sum / n
        mean = old_mean + shift
        var = (shifted_squares / n - shift * shift).clamp_min(0) * (n / (n - 1))  # unbiased, as BatchNorm keeps it
        old_scale = torch.rsqrt(old_var + m.eps)
        weight = m.weight.double()
        m.bias.copy_(m.bias.double() + weight * old_scale * (mean - old_mean))
        m.weight.copy_(weight * old_scale * torch.sqrt(var + m.eps))
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
