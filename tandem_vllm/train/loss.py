"""Training losses as pure functions of tensors. Shapes: logits (B, T, V), labels/mask (B, T)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
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


# ---- a target pass's top-k teacher and drafters with a draft vocabulary ------------------------------
@dataclass(frozen=True)
class TopK:
    """The target's K most likely next tokens per position (``target_pass``), most likely first."""

    ids: Tensor  # (B, T, K) target token ids
    logp: Tensor  # (B, T, K) their log-probabilities under the whole vocabulary

    def __getitem__(self, index: Any) -> TopK:
        return TopK(self.ids[index], self.logp[index])


Teacher = Tensor | TopK  # the target's logits (B, T, V), or a target pass's top-k


def head_ids(ids: Tensor, t2d: Tensor | None) -> tuple[Tensor, Tensor]:
    """Target token ids -> the student's head rows and whether the head has one (``t2d`` (V,), -1 = none)."""
    if t2d is None:
        return ids, torch.ones_like(ids, dtype=torch.bool)
    rows = t2d[ids]
    return rows.clamp_min(0), rows >= 0


def teacher_argmax(teacher: Teacher) -> Tensor:
    return teacher.ids[..., 0] if isinstance(teacher, TopK) else teacher.argmax(-1)


def _teacher_on_head(teacher: Teacher, t2d: Tensor | None, draft_ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher as (head rows (..., K'), probabilities renormalised over what the head can say, valid)."""
    if isinstance(teacher, TopK):
        rows, valid = head_ids(teacher.ids, t2d)
        logp = teacher.logp.float().masked_fill(~valid, float("-inf"))
    else:
        logits = teacher.float() if draft_ids is None else teacher.float()[..., draft_ids]
        rows = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
        valid, logp = torch.ones_like(rows, dtype=torch.bool), logits
    p = torch.softmax(logp, -1).nan_to_num(0.0)  # a position whose top-k the head lacks entirely: all zero
    return rows, p, valid


def head_soft_ce(student_logits: Tensor, teacher: Teacher, mask: Tensor, t2d: Tensor | None = None,
                 draft_ids: Tensor | None = None) -> Tensor:
    """H(teacher, student) with the student's logits over its head rows (B, T, N), the teacher restricted to
    those rows and renormalised (a top-k teacher: over its K tokens)."""
    rows, p, _ = _teacher_on_head(teacher, t2d, draft_ids)
    log_q = F.log_softmax(student_logits.float(), -1).gather(-1, rows)
    return _masked_mean(-(p * log_q).sum(-1), mask)


def head_ce(student_logits: Tensor, labels: Tensor, mask: Tensor, t2d: Tensor | None = None) -> Tensor:
    """Cross-entropy to the next tokens the head can say (labels outside a draft vocabulary are skipped)."""
    rows, valid = head_ids(labels, t2d)
    return ce_loss(student_logits, rows, mask * valid)


def head_distil(student_logits: Tensor, teacher: Teacher, labels: Tensor, mask: Tensor, t2d: Tensor | None = None,
                draft_ids: Tensor | None = None) -> Tensor:
    """Tandem-Distil stage 2 for any head: 0.5 CE + 0.5 soft CE to the teacher."""
    return 0.5 * head_ce(student_logits, labels, mask, t2d) + 0.5 * head_soft_ce(student_logits, teacher, mask, t2d, draft_ids)


def head_tv(student_logits: Tensor, teacher: Teacher, vocab_size: int, draft_ids: Tensor | None = None) -> Tensor:
    """Per-token TV distance (B, T) between the student (probability 0 outside its head) and the teacher;
    with a top-k teacher, over its K tokens plus the rest of the vocabulary as one outcome (a lower bound)."""
    q = F.softmax(student_logits.float(), -1)
    if draft_ids is not None:
        q = q.new_zeros(*q.shape[:-1], vocab_size).index_copy(-1, draft_ids, q)
    if isinstance(teacher, TopK):
        p = teacher.logp.float().exp()  # (B, T, K)
        qk = q.gather(-1, teacher.ids)
        return 0.5 * ((p - qk).abs().sum(-1) + (qk.sum(-1) - p.sum(-1)).abs())
    return 0.5 * (q - F.softmax(teacher.float(), -1)).abs().sum(-1)
