"""Learning-without-Forgetting distillation (Li & Hoiem 2017) as pure functions of student/teacher outputs.

Every term is 0 when student = teacher and grows as they diverge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_per_position(student: torch.Tensor, teacher: torch.Tensor, temperature: float, dim: int) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) along ``dim``, one value per other position."""
    log_p_student = F.log_softmax(student / temperature, dim=dim)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=dim)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim)


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float, dim: int) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)) along ``dim``, averaged over the other positions
    (Li & Hoiem eq. 2 uses T = 2; the T² keeps gradients comparable across temperatures, Hinton et al.)."""
    return kl_per_position(student, teacher, temperature, dim).mean() * temperature ** 2


def bernoulli_kl(student_logit: torch.Tensor, teacher_logit: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(σ(teacher)) ‖ Bernoulli(σ(student))) per element: BCE against the soft target minus its entropy."""
    p = teacher_logit.sigmoid()
    return (F.binary_cross_entropy_with_logits(student_logit, p, reduction="none")
            - F.binary_cross_entropy_with_logits(teacher_logit, p, reduction="none"))


def distillation_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Distil one task's outputs. cls: KL over class logits; seg: per-pixel KL over channels;
    det (B, A, H, W, 5+C): objectness Bernoulli KL everywhere, and where the teacher sees an object
    (weighted by its objectness) box-parameter MSE and class-logit KL."""
    student, teacher = student.float(), teacher.float()
    if kind in ("cls", "seg"):  # class logits are dim 1 of (B, C) and of (B, C, H, W)
        return kl_logits(student, teacher, temperature, dim=1)
    weight = teacher[..., 4].sigmoid()
    objectness = bernoulli_kl(student[..., 4], teacher[..., 4]).mean()
    box = (((student[..., :4] - teacher[..., :4]) ** 2).sum(-1) * weight).sum() / weight.sum().clamp(min=1e-6)
    cls = (kl_per_position(student[..., 5:], teacher[..., 5:], temperature, -1) * weight).sum() / weight.sum().clamp(min=1e-6)
    return objectness + box + cls * temperature ** 2
