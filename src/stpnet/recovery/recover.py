"""The recovery step after :func:`stpnet.compress`: fit the factorized layers to the dense
network's activations, then recalibrate the BatchNorm statistics, on calibration inputs."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..discovery import attention_modules
from ..nn._replace import set_submodule
from ..nn.attention import UnpackedMultiheadAttention
from ._calibration import check_images, check_images_for
from .batchnorm import recalibrate_batchnorm
from .fit import UNITS, FitReport, LayerFit, fit_to_activations

__all__ = ["RecoveryReport", "recover", "check_recovery_options"]

BN_MODES = (False, True, "keep_function")


@dataclass(frozen=True)
class RecoveryReport:
    """What :func:`recover` did. :meth:`stpnet.CompressionReport.with_recovery` adds it to the
    compression's report.

    Attributes
    ----------
    fit : FitReport or None
        The data-aware fit's per-layer (or per-block) errors before and after; None without a fit.
    bn_recalibrated : bool or str
        The BatchNorm step: False, True (statistics re-estimated) or ``'keep_function'``
        (re-estimated, its weights rescaled to keep the function).
    """

    fit: FitReport | None
    bn_recalibrated: bool | str = False

    def to_dict(self) -> dict:
        """The report as plain JSON values."""
        return {"fit": self.fit.to_dict() if self.fit is not None else None, "bn_recalibrated": self.bn_recalibrated}


def check_recovery_options(fit_steps: object, fit_unit: object, recalibrate_bn: object) -> None:
    """ValueError saying what is valid for a bad ``fit_steps``, ``fit_unit`` or ``recalibrate_bn``."""
    if isinstance(fit_steps, bool) or not isinstance(fit_steps, int) or fit_steps < 0:
        raise ValueError(f"fit_steps must be an int >= 0, got {fit_steps!r}")
    if fit_unit not in UNITS:
        raise ValueError(f"fit_unit must be one of {UNITS}, got {fit_unit!r}")
    if not (isinstance(recalibrate_bn, bool) or recalibrate_bn == "keep_function"):
        raise ValueError(f"recalibrate_bn must be False, True or 'keep_function', got {recalibrate_bn!r}")


def recover(compressed: nn.Module, dense: nn.Module, calibration: torch.Tensor, *, fit_steps: int = 100,
            fit_unit: str = "block", recalibrate_bn: bool | str = False, bn_calibration: torch.Tensor | None = None,
            batch_size: int = 128, callback: Callable[[LayerFit], None] | None = None) -> RecoveryReport:
    """Recover the accuracy a compression lost, in place: fit, then BatchNorm.

    Parameters
    ----------
    compressed : nn.Module
        The model :func:`stpnet.compress` returned for ``dense`` (the same module names); modified
        in place.
    dense : nn.Module
        The dense model it was compressed from; not modified.
    calibration : torch.Tensor
        A few hundred preprocessed training inputs (no augmentation).
    fit_steps : int, default 100
        If > 0, refine every factorized layer for this many L-BFGS iterations to reproduce
        ``dense``'s activations on ``calibration``, in execution order
        (:func:`stpnet.recovery.fit_to_activations`). 0: no fit.
    fit_unit : {'block', 'layer'}
        What each fit matches: the output of each block (every residual block of a ResNet, its
        factorized layers together; the default), or each factorized layer's dense output
        (``unit`` of :func:`stpnet.recovery.fit_to_activations`). Block fitting keeps far more
        of a trained network's accuracy (``docs/accuracy.md``).
    recalibrate_bn : {False, True, 'keep_function'}
        After the fit, re-estimate the BatchNorm running statistics
        (:func:`stpnet.recovery.recalibrate_batchnorm`); ``'keep_function'`` also rescales every
        BatchNorm's weight and bias so the network computes the same function, now with
        statistics of its own activations (so that training-mode BatchNorm computes it too:
        before fine-tuning).
    bn_calibration : torch.Tensor, optional
        The inputs for the BatchNorm step (default ``calibration``); for ``'keep_function'``
        before a fine-tune, augmented images like those training will feed.
    batch_size : int
        Inputs per forward pass (memory), not a setting of the recovery.
    callback : callable, optional
        Called with each :class:`stpnet.recovery.LayerFit` as it completes (progress).

    Returns
    -------
    RecoveryReport
        Each fitted layer's (or block's) output error before and after its fit, and what was
        done to the BatchNorm layers.

    Raises
    ------
    ValueError
        For malformed calibration inputs, a bad option, ``bn_calibration`` without
        ``recalibrate_bn``, or a ``dense`` that is not the model ``compressed`` was made from.
    """
    check_recovery_options(fit_steps, fit_unit, recalibrate_bn)
    check_images(calibration, "calibration")
    check_images_for(compressed, calibration, "calibration")
    if bn_calibration is not None:
        if not recalibrate_bn:
            raise ValueError("bn_calibration gives the inputs of the BatchNorm step; it needs recalibrate_bn=True or "
                             "'keep_function' (with recalibrate_bn=False it would be ignored)")
        check_images(bn_calibration, "bn_calibration")
        check_images_for(compressed, bn_calibration, "bn_calibration")
    fit = None
    if fit_steps > 0:
        fit = fit_to_activations(compressed, _dense_like(compressed, dense), calibration, steps=fit_steps,
                                 unit=fit_unit, batch_size=batch_size, callback=callback)
    if recalibrate_bn:
        recalibrate_batchnorm(compressed, calibration if bn_calibration is None else bn_calibration,
                              batch_size=batch_size, keep_function=recalibrate_bn == "keep_function")
    return RecoveryReport(fit, recalibrate_bn)


def _dense_like(compressed: nn.Module, dense: nn.Module) -> nn.Module:
    """``dense`` with each ``nn.MultiheadAttention`` that ``compress`` rewrote in ``compressed`` as
    an :class:`stpnet.nn.UnpackedMultiheadAttention` rewritten the same way (on a copy), so that
    the projections have the same names in both; ``dense`` itself when there is none."""
    modules = dict(compressed.named_modules())
    names = [n for n in attention_modules(dense) if isinstance(modules.get(n), UnpackedMultiheadAttention)]
    if not names:
        return dense
    reference = copy.deepcopy(dense)
    for name in names:
        set_submodule(reference, name, UnpackedMultiheadAttention.from_torch(reference.get_submodule(name),
                                                                             packed=modules[name].packed))
    return reference
