"""Training losses as pure functions of tensors. Shapes: logits (B, T, V), labels/mask (B, T)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def _masked_mean(per_tok: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(per_tok.dtype)
    return (per_tok * mask).sum() / mask.sum().clamp_min(1)


def ce_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy to the ground-truth next tokens (Tandem-CE)."""
    per_tok = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return _masked_mean(per_tok.view_as(labels), mask)


def soft_ce(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft cross-entropy H(teacher, student) = KL(teacher || student) + H(teacher), scaled by t^2."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.softmax(teacher_logits.float() / t, dim=-1)
    return _masked_mean(-(p * log_q).sum(-1), mask) * t * t


def distil_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Tandem-Distil stage 2: 0.5 * CE(ground truth) + 0.5 * soft CE(target logits)."""
    return 0.5 * ce_loss(student_logits, labels, mask) + 0.5 * soft_ce(student_logits, teacher_logits, mask)


def tv_distance(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-token total-variation distance 0.5 * |p - q|_1, (B, T)."""
    p = F.softmax(student_logits.float(), -1)
    q = F.softmax(teacher_logits.float(), -1)
    return 0.5 * (p - q).abs().sum(-1)
