"""Knowledge distillation: the loss that lets a dense teacher network train its compressed student."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


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
