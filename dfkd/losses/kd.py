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


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Jensen–Shannon divergence between two softmax distributions, averaged over the batch."""
    p = F.softmax(logits_a.float() / temperature, dim=1)
    q = F.softmax(logits_b.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp_min(1e-12).log()
    return 0.5 * (
        F.kl_div(m, p, reduction="batchmean") + F.kl_div(m, q, reduction="batchmean")
    )
