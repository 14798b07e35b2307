"""Logit distillation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton et al.: T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float = 1.0,
                  reduction: str = "batchmean") -> torch.Tensor:
    """Jensen–Shannon divergence between two softmax distributions (classes on the last axis for
    ``reduction="none"``, which returns one value per row; dim 1 and averaged over the batch otherwise)."""
    dim = -1 if reduction == "none" else 1
    p = F.softmax(logits_a.float() / temperature, dim=dim)
    q = F.softmax(logits_b.float() / temperature, dim=dim)
    m = (0.5 * (p + q)).clamp_min(1e-12).log()
    if reduction == "none":
        kl_pm = (p * (p.clamp_min(1e-12).log() - m)).sum(dim)
        kl_qm = (q * (q.clamp_min(1e-12).log() - m)).sum(dim)
        return 0.5 * (kl_pm + kl_qm)
    return 0.5 * (
        F.kl_div(m, p, reduction="batchmean") + F.kl_div(m, q, reduction="batchmean")
    )
