"""DeepInversion / Adaptive DeepInversion (Yin et al., CVPR 2020): optimise pixels directly.

Each :meth:`DeepInversion.step` starts a fresh batch from noise and runs ``iterations``
Adam steps on

    CE(teacher(aug(x)), y) + bn · R_feature(x) + tv · TV(x) + l2 · ‖x‖₂  [− adi · JS(teacher, student)]

where ``R_feature`` is the teacher's statistics prior (BatchNorm statistics for CNN teachers),
``aug`` is random jitter and optional flip, and the ADI term (when ``adi > 0`` and a student
is given) pushes images to where student and teacher disagree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.augment import random_jitter
from dfkd.losses import js_divergence, l2_prior, tv_prior
from generators.base import SYNTHESIZERS, Synthesizer, SyntheticBatch


@SYNTHESIZERS.register("deepinversion")
class DeepInversion(Synthesizer):
    uses_student = True

    def __init__(
        self,
        teacher,
        batch_size: int = 64,
        seed: int = 0,
        device="cpu",
        iterations: int = 200,
        lr: float = 0.1,
        prior: str = "auto",
        bn: float = 1.0,
        first_bn_multiplier: float = 10.0,
        ce: float = 1.0,
        tv: float = 1e-4,
        l2: float = 1e-5,
        adi: float = 0.0,
        jitter: int = 2,
        flip: bool = True,
        init_std: float = 0.2,
    ):
        super().__init__(teacher, batch_size, seed, device)
        self.iterations = int(iterations)
        self.lr = float(lr)
        self.prior = prior
        self.w_bn, self.w_ce, self.w_tv, self.w_l2, self.w_adi = map(float, (bn, ce, tv, l2, adi))
        self.first_bn_multiplier = float(first_bn_multiplier)
        self.jitter = int(jitter)
        self.flip = bool(flip)
        self.init_std = float(init_std)
        # Fail at construction (not mid-run) when the prior does not fit the teacher.
        from dfkd.hooks import resolve_prior_name

        self.prior_name = resolve_prior_name(teacher.model, prior) if self.w_bn > 0 else None

    def _prior_kwargs(self) -> dict:
        return {"first_weight": self.first_bn_multiplier} if self.prior_name == "batchnorm" else {}

    def step(self, student: nn.Module | None = None) -> SyntheticBatch:
        labels = self.sample_labels(self.batch_size)
        x = (0.5 + self.init_std * self.randn(self.batch_size, *self.input_size)).clamp_(0, 1)
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.lr, betas=(0.5, 0.99))
        use_adi = self.w_adi > 0 and student is not None
        was_training = student.training if student is not None else False
        if use_adi:
            student.eval()
        stats: dict[str, float] = {}
        from contextlib import nullcontext

        ctx = self.teacher.statistics(self.prior_name, **self._prior_kwargs()) if self.prior_name else nullcontext()
        with ctx as prior:
            for it in range(self.iterations):
                opt.zero_grad(set_to_none=True)
                xa = random_jitter(x, self.jitter, self.cpu_rng)
                if self.flip and torch.rand((), generator=self.cpu_rng) < 0.5:
                    xa = xa.flip(3)
                logits = self.teacher(xa)
                loss_ce = F.cross_entropy(logits.float(), labels)
                loss = self.w_ce * loss_ce + self.w_tv * tv_prior(x) + self.w_l2 * l2_prior(x)
                loss_prior = prior.loss() if prior is not None else torch.zeros((), device=x.device)
                loss = loss + self.w_bn * loss_prior
                if use_adi:
                    loss = loss - self.w_adi * js_divergence(logits, student(xa))
                loss.backward(inputs=[x])  # never into the teacher's or student's grads
                opt.step()
                with torch.no_grad():
                    x.clamp_(0, 1)
            stats = {"syn/ce": float(loss_ce.detach()), "syn/prior": float(loss_prior.detach()),
                     "syn/loss": float(loss.detach())}
        if use_adi:
            student.train(was_training)
        x = x.detach()
        t = self.teacher_logits(x)
        stats["syn/teacher_acc"] = float((t.argmax(1) == labels).float().mean())
        return SyntheticBatch(images=x, labels=labels, teacher_logits=t, stats=stats)
