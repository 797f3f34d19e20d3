"""Recovering the accuracy of a compressed network: rank allocation under a parameter budget
(an option of :func:`stpnet.compress`), data-aware fitting of the factorized layers to the dense
network's activations, and BatchNorm recalibration (the step after it, :func:`recover`);
fine-tuning with the dense network as teacher is :func:`stpnet.train.distillation_loss` through
the trainer."""

from .allocate import RankAllocation, allocate_ranks
from .batchnorm import recalibrate_batchnorm
from .fit import FitReport, LayerFit, activation_errors, factorized_layer_order, fit_to_activations
from .recover import RecoveryReport, recover

__all__ = ["allocate_ranks", "RankAllocation", "recalibrate_batchnorm", "fit_to_activations", "activation_errors",
           "factorized_layer_order", "FitReport", "LayerFit", "recover", "RecoveryReport"]
