"""HAD: Heterogeneity-Aware Distillation (Zhang, Wang, Zhuang, Zhao, Li, Zhang, Song, Zhang: "HAD:
Heterogeneity-Aware Distillation for Lifelong Heterogeneous Learning", CVPR 2026; arXiv 2603.26192)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clbench.distill import balanced_loss, had_dense_loss
from clbench.strategy import StageContext, register
from clbench.teacher import SnapshotDistillation


@register("had")
class HAD(SnapshotDistillation):
    """Label the current images with the previous stage's frozen network for every earlier task; learn those labels.

    The paper (segmentation, depth, normals): each earlier discrete task is trained on the snapshot's hard labels
    (argmax) with (DB-HAD + SG-HAD) / 2: DB-HAD weights each pseudo-class's geometric-mean loss by softmax(−loss)
    (global prediction imbalance), SG-HAD averages the loss on the pixels where the Sobel magnitude of the loss map,
    min-max normalised, exceeds ``threshold`` (boundaries); λ = ``lam`` × their sum (the paper's code: 3, 0.9).
    Segmentation as in the paper, at head stride. Carried over here: classification takes DB-HAD over its per-image
    losses (an image has no edges); detection's objectness is a two-class dense map per anchor (DB + SG as for
    segmentation), its class logits at the cells the snapshot calls objects (objectness > 0.5) take DB-HAD over the
    snapshot's classes, and its box parameters there an L1 loss to the snapshot's (a continuous output, as the
    paper treats depth). A class-incremental task's earlier classes are labelled the same way, over those classes."""

    def __init__(self, *, lam: float = 3.0, threshold: float = 0.9) -> None:
        if lam < 0 or not 0 <= threshold < 1:
            raise ValueError("need lam >= 0 and 0 <= threshold < 1")
        self.lam, self.threshold = lam, threshold

    def loss_term(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        pairs = self.snapshot_pairs(ctx, images, outputs)
        if not pairs:
            return None
        return self.lam * torch.stack([self._term(t.kind, student.float(), teacher.float())
                                       for t, _, student, teacher in pairs]).sum()

    def _term(self, kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if kind == "seg":
            return had_dense_loss(F.log_softmax(student, 1), teacher.argmax(1), self.threshold)
        if kind == "cls":
            pseudo = teacher.argmax(1)
            return balanced_loss(F.nll_loss(F.log_softmax(student, 1), pseudo, reduction="none"), pseudo,
                                 student.shape[1])
        b, a, h, w, _ = student.shape   # detection (B, A, H, W, 5 + C)
        objects = teacher[..., 4] > 0   # σ(objectness) > 0.5
        objectness = torch.stack((F.logsigmoid(-student[..., 4]), F.logsigmoid(student[..., 4])), 2)   # (B, A, 2, H, W)
        term = had_dense_loss(objectness.reshape(b * a, 2, h, w), objects.long().reshape(b * a, h, w), self.threshold)
        if objects.any():
            pseudo = teacher[objects][:, 5:].argmax(1)
            classes = F.nll_loss(F.log_softmax(student[objects][:, 5:], 1), pseudo, reduction="none")
            term = term + balanced_loss(classes, pseudo, student.shape[-1] - 5)
            term = term + (student[objects][:, :4] - teacher[objects][:, :4]).abs().mean()
        return term
