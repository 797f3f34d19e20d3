"""Knowledge distillation: the losses that let a dense teacher network train its compressed student."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss", "feature_distillation_loss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                      alpha: float, temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy mixed with the KL divergence to a teacher's temperature-softened predictions.

    ``(1 - alpha) * CE(student, targets) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
    averaged over the batch (Hinton, Vinyals and Dean 2015, "Distilling the knowledge in a neural
    network"). The ``T^2`` factor keeps the soft term's gradients on the scale of the hard term's
    as ``T`` changes. The teacher's logits are treated as constants.

    Parameters
    ----------
    student_logits, teacher_logits : torch.Tensor
        ``(N, K)`` logits over the same ``K`` classes.
    targets : torch.Tensor
        ``(N,)`` class indices.
    alpha : float
        Weight of the distillation term, in [0, 1] (0: plain cross-entropy).
    temperature : float
        Softening temperature ``T`` > 0.
    label_smoothing : float
        Passed to the cross-entropy term.

    Returns
    -------
    torch.Tensor
        The scalar loss (float32 or wider).

    Raises
    ------
    ValueError
        If the logits' shapes differ (for example a teacher with another number of classes), or
        ``alpha`` / ``temperature`` are out of range.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(f"student and teacher logits must both be (N, classes); got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)} (does the teacher predict the same classes?)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student = student_logits.float()
    hard = F.cross_entropy(student, targets, label_smoothing=label_smoothing)
    if alpha == 0.0:
        return hard
    soft_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    soft_student = F.log_softmax(student / temperature, dim=1)
    kl = F.kl_div(soft_student, soft_teacher, reduction="batchmean", log_target=True)
    return (1.0 - alpha) * hard + alpha * temperature**2 * kl


def feature_distillation_loss(student_features: Sequence[torch.Tensor],
                              teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean relative squared error between matched intermediate outputs of a student and its teacher.

    ``mean_i ||s_i - t_i||^2 / ||t_i||^2`` over the feature pairs ``(s_i, t_i)``, each norm taken
    over the whole batch: every matched point weighs the same whatever its scale. This is the
    hint loss of FitNets (Romero et al. 2015, "FitNets: hints for thin deep nets") without a
    regressor, which a compressed network of the teacher's own architecture does not need; a
    block-wise match of this kind lets each compressed block learn its dense block's function
    instead of only the final logits. The teacher's features are treated as constants.

    Parameters
    ----------
    student_features, teacher_features : sequence of torch.Tensor
        Equally long, each pair of the same shape.

    Returns
    -------
    torch.Tensor
        The scalar loss (float32 or wider).

    Raises
    ------
    ValueError
        If the sequences are empty or differ in length, or a pair differs in shape.
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(f"need the same positive number of student and teacher features, got "
                         f"{len(student_features)} and {len(teacher_features)}")
    total = 0.0
    for i, (s, t) in enumerate(zip(student_features, teacher_features)):
        if s.shape != t.shape:
            raise ValueError(f"feature {i}: the student's output has shape {tuple(s.shape)} but the teacher's "
                             f"{tuple(t.shape)}; match points whose outputs have the same shape")
        t = t.detach().float()
        total = total + (s.float() - t).square().sum() / t.square().sum().clamp_min(1e-12)
    return total / len(student_features)
