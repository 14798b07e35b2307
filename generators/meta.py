"""Fast-DFKD-style meta generator (Fang et al., AAAI 2022), with NAYER-style label-embedding input (or,
with ``label_embedding: false``, Fast-DFKD's own: no label input, each image's class tied to its
learnable noise vector) and, optionally (``cr > 0``), CMI's contrastive diversity term (see
generators/adversarial.py).

The generator kept across rounds is a *meta initialisation*. Each round clones it, adapts the clone
for a few steps (``g_steps``) together with a fresh learnable latent ``z`` on the usual objective
(cross-entropy to sampled classes + the teacher's statistics prior − adversarial discrepancy
against the student), returns the adapted clone's images, and moves the meta generator toward the
adapted weights with a first-order Reptile step. Few steps per round suffice because the meta
initialisation already sits close to every round's solution; the Distiller's memory of past
batches supplies the diversity the student trains on.
"""

from __future__ import annotations

import copy
import torch
from torch import nn

from generators.adversarial import AdversarialGenerator
from generators.base import SYNTHESIZERS, SyntheticBatch


@SYNTHESIZERS.register("fast_meta")
class FastMetaGenerator(AdversarialGenerator):
    noise_carries_class = True  # the round's latent z is fixed (and learned) while the clone adapts

    def __init__(
        self,
        teacher,
        batch_size: int = 64,
        seed: int = 0,
        device="cpu",
        nz: int = 256,
        ngf: int = 64,
        conditional: bool = True,
        g_steps: int = 2,
        lr: float = 2e-3,
        lr_z: float = 0.01,
        meta_lr: float | None = None,
        prior: str = "auto",
        bn: float = 10.0,
        first_bn_multiplier: float = 1.0,
        ce: float = 1.0,
        ie: float = 0.0,
        adv: float = 1.0,
        adv_loss: str = "kl",
        adv_warmup: int = 0,
        jitter: int = 2,
        label_noise: float = 1.0,
        cr: float = 0.0,
        cr_temperature: float = 0.1,
        cr_bank: int = 4096,
        cr_dim: int = 128,
        adv_mask: bool = False,
        adv_clip: float | None = None,
        adv_gate: float = 0.0,
        train_every: int = 1,
        train_warmup: int = 0,
        view: str = "roll",
        label_embedding: bool = True,
        div: float = 0.0,
    ):
        super().__init__(teacher, batch_size, seed, device, nz=nz, ngf=ngf, conditional=conditional,
                         g_steps=g_steps, lr=lr, prior=prior, bn=bn, first_bn_multiplier=first_bn_multiplier,
                         ce=ce, ie=ie, adv=adv, adv_loss=adv_loss, jitter=jitter, cr=cr,
                         cr_temperature=cr_temperature, cr_bank=cr_bank, cr_dim=cr_dim, adv_mask=adv_mask,
                         adv_clip=adv_clip, adv_warmup=adv_warmup, adv_gate=adv_gate,
                         train_every=train_every, train_warmup=train_warmup, view=view,
                         label_embedding=label_embedding, div=div)
        self.lr, self.lr_z = float(lr), float(lr_z)
        self.meta_lr = float(meta_lr) if meta_lr is not None else self.lr * max(1, self.g_steps)
        # the meta optimiser replaces the plain generator optimiser of the parent
        self.opt = torch.optim.Adam(self.generator.parameters(), lr=self.meta_lr, betas=(0.5, 0.999))
        self.label_noise = float(label_noise)
        self.last_fast: nn.Module | None = None  # the last adapted clone: what sample-only rounds draw from

    def step(self, student: nn.Module | None = None) -> SyntheticBatch:
        if not self._trains_this_round():
            self.rounds += 1
            return self._sample_batch(self.last_fast if self.last_fast is not None else self.generator,
                                      self.label_noise)
        use_adv = self._adv_active(student)
        was_training = student.training if student is not None else False
        if student is not None:
            student.eval()
        fast = copy.deepcopy(self.generator).train()
        y = self.sample_labels(self.batch_size) if self.conditional else None
        # NAYER-style input: the label embedding (inside the generator) plus a learnable noisy latent
        z = (self.label_noise * self.randn(self.batch_size, self.nz)).requires_grad_(True)
        fast_params = list(fast.parameters())
        opt = torch.optim.Adam([{"params": fast_params}, {"params": [z], "lr": self.lr_z}],
                               lr=self.lr, betas=(0.5, 0.999))
        best_loss, best_x, parts = None, None, {}
        try:
            with self._prior_context() as prior:
                for _ in range(self.g_steps):
                    x = fast(z, y)
                    loss, parts = self._objective(x, y, prior, student, use_adv)
                    opt.zero_grad(set_to_none=True)
                    loss.backward(inputs=fast_params + [z] + self._head_params())
                    opt.step()
                    self._head_step()
                    # keep the lowest-loss batch on the device: no host sync inside the adaptation loop
                    value = loss.detach()
                    if best_x is None:
                        best_loss, best_x = value, x.detach()
                    else:
                        better = value < best_loss
                        best_loss = torch.where(better, value, best_loss)
                        best_x = torch.where(better, x.detach(), best_x)
        finally:
            if student is not None:
                student.train(was_training)
        # first-order Reptile: the meta generator moves toward the adapted weights
        self.opt.zero_grad(set_to_none=True)
        for p, q in zip(self.generator.parameters(), fast.parameters()):
            p.grad = (p.detach() - q.detach()).clone()
        self.opt.step()
        for b, fb in zip(self.generator.buffers(), fast.buffers()):
            b.copy_(fb)
        self.rounds += 1
        if self.train_every > 1:
            self.last_fast = fast
        return self._batch(best_x, y, parts)

    def state_dict(self):
        state = super().state_dict()
        if self.last_fast is not None:
            state["last_fast"] = copy.deepcopy(self.last_fast.state_dict())
        return state

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        if "last_fast" in state:
            self.last_fast = copy.deepcopy(self.generator)
            self.last_fast.load_state_dict(state["last_fast"])

