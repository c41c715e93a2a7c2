"""Distillation as pure functions of student/teacher tensors: Learning without Forgetting's output terms
(Li & Hoiem 2017) and PLOP's pooled local feature distillation (Douillard et al. 2021).

Every term is 0 when student = teacher and grows as they diverge.
"""

from __future__ import annotations

from typing import Sequence

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


def pooled_embedding(feature: torch.Tensor, scale: int) -> torch.Tensor:
    """PLOP's Local POD embedding of a (B, C, H, W) map at one scale: the map is cut into scale × scale regions;
    each region's squared activations (PODNet) are averaged over its width and over its height; the
    concatenation is L2-normalised per image. Regions a small map cannot fill are skipped."""
    squared = feature.float() ** 2
    parts = [pooled for band in squared.tensor_split(scale, dim=2) for region in band.tensor_split(scale, dim=3)
             if region.numel() for pooled in (region.mean(3).flatten(1), region.mean(2).flatten(1))]
    return F.normalize(torch.cat(parts, dim=1), dim=1)


def pod_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], scales: Sequence[int]) -> torch.Tensor:
    """PLOP eq. 2-3: per layer, the L2 distance between student and teacher Local POD embeddings (all scales
    concatenated), averaged over images, then over layers."""
    distances = []
    for s, t in zip(student, teacher, strict=True):
        embed_s = torch.cat([pooled_embedding(s, k) for k in scales], dim=1)
        embed_t = torch.cat([pooled_embedding(t, k) for k in scales], dim=1)
        distances.append((embed_s - embed_t).norm(dim=1).mean())
    return torch.stack(distances).mean()


def unbiased_cross_entropy(logits: torch.Tensor, masks: torch.Tensor, old: Sequence[int]) -> torch.Tensor:
    """MiB's unbiased cross-entropy (Cermelli et al., CVPR 2020, eq. 4): a pixel labelled background (0) may be any
    old class, so its probability is that of background or any old class, log Σ_{k ∈ old ∪ {0}} p_k; other pixels
    their class's log-probability. ``logits`` (B, C, H, W) already at the masks' (B, H, W) size; 255 ignored."""
    logits = logits.float()
    total = torch.logsumexp(logits, dim=1, keepdim=True)
    background = torch.logsumexp(logits[:, sorted({0, *old})], dim=1, keepdim=True)
    log_probs = torch.cat((background, logits[:, 1:]), dim=1) - total
    return F.nll_loss(log_probs, masks.long(), ignore_index=255)


def unbiased_distillation(student: torch.Tensor, teacher: torch.Tensor, old: Sequence[int]) -> torch.Tensor:
    """MiB's unbiased knowledge distillation (eq. 5): the teacher's softmax over the old classes (background among
    them) against the student's log-probabilities over every class, where the student's background is background or
    any new class, log Σ_{k ∉ old \\ {0}} q_k; summed over the old classes, divided by their number, averaged over
    positions, negated. ``student`` (B, C, H, W) over every class seen so far, ``teacher`` its (B, C, H, W) too."""
    student, teacher = student.float(), teacher.float()
    old = sorted({0, *old})
    rest = [c for c in range(student.shape[1]) if c not in old or c == 0]
    total = torch.logsumexp(student, dim=1, keepdim=True)
    log_q = torch.cat((torch.logsumexp(student[:, rest], dim=1, keepdim=True), student[:, old[1:]]), dim=1) - total
    p = F.softmax(teacher[:, old], dim=1)
    return -((p * log_q).sum(1) / len(old)).mean()


def sobel_magnitude(maps: torch.Tensor) -> torch.Tensor:
    """The Sobel gradient magnitude of (N, H, W) maps (zero padding), (N, H, W)."""
    maps = maps.float()
    kx = maps.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    grads = F.conv2d(maps.unsqueeze(1), torch.stack((kx, kx.t())).unsqueeze(1), padding=1)
    return grads.pow(2).sum(1).sqrt()


def edge_mask(loss_map: torch.Tensor, threshold: float) -> torch.Tensor:
    """HAD's saliency mask (SG-HAD): the Sobel magnitude of a (N, H, W) per-pixel loss map, min-max normalised per
    map, above ``threshold``: the pixels where the loss changes most, object boundaries."""
    edges = sobel_magnitude(loss_map.detach()).flatten(1)
    low, high = edges.min(1, keepdim=True).values, edges.max(1, keepdim=True).values
    return ((edges - low) / (high - low) > threshold).view_as(loss_map)


def _geometric_mean(values: torch.Tensor) -> torch.Tensor:
    values = values[values > 0]
    return values.log().mean().exp() if values.numel() else values.new_zeros(())


def balanced_loss(loss: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """HAD's distribution-balanced term (DB-HAD): per pseudo-label class, the geometric mean of its positive
    per-element losses; the classes weighted by softmax(−class loss) (no gradient through the weights) so that
    classes already fitted count less; the weighted losses averaged over all ``num_classes`` (absent ones 0)."""
    per_class = torch.stack([_geometric_mean(loss[labels == c]) for c in range(num_classes)])
    weights = torch.softmax(-per_class.detach(), dim=0)
    return (per_class * weights).mean()


def had_dense_loss(log_probs: torch.Tensor, pseudo: torch.Tensor, threshold: float) -> torch.Tensor:
    """HAD for a discrete dense output: per-pixel NLL of the student's log-probabilities (N, C, H, W) against the
    teacher's hard labels (N, H, W); (DB-HAD + the mean of the loss on SG-HAD's edge pixels) / 2."""
    loss = F.nll_loss(log_probs, pseudo, reduction="none")
    edges = (loss * edge_mask(loss, threshold)).mean()
    return (balanced_loss(loss, pseudo, log_probs.shape[1]) + edges) / 2
