"""Generator networks trained against the student (DAFL, DFAD, Fast-DFKD family).

Each :meth:`AdversarialGenerator.step` runs ``g_steps`` updates of the generator on

    ce · CE(teacher(x), y) + bn · R_feature(x) + ie · (−H(mean teacher softmax)) − adv · D(student(x), teacher(x))
    [+ cr · L_contrastive(x)]

then returns a batch from the updated generator. ``y`` are sampled classes when the generator
is conditional (label-embedding input), otherwise the teacher's own arg-max (DAFL's one-hot
loss). ``D`` is KL (Fast-DFKD), L1 on logits (DFAD) or the Jensen–Shannon divergence (bounded by
log 2). The Distiller then trains the student on these images (and a memory of past ones), which
closes the adversarial loop.

The adversarial term is kept from taking over (a freshly initialised student makes an unbounded KL
run to −10⁵ and the generator stops making the requested classes):

- ``adv_mask``: only images on which student and teacher already agree (arg-max) count toward it,
  as in CMI / Fast-DFKD; images the student gets wrong are already hard;
- ``adv_clip``: each image's divergence is clipped at this value (``null``: no clip);
- ``adv_warmup``: rounds with the cross-entropy and statistics prior alone;
- ``adv_gate``: the adversarial term is on only while the running requested-class agreement of the
  generator's own batches (teacher arg-max on the jittered images, EMA over steps) is at least
  this value, so the statistics prior and the cross-entropy stay in charge until images are class-true.

``label_embedding: false`` with ``conditional: true`` gives the generator no label input (Fast-DFKD): each
image's class is assigned to its noise vector, so the generator (and, in ``fast_meta``, the learnable
noise) must make the noise decide the class; sample-only rounds then cannot ask for a class.

``div > 0`` adds a diversity term at no extra cost: the mean cosine similarity of the teacher's
penultimate features (from the same forward pass) over pairs of images made for the same class, so
images of one class must differ where the teacher looks, not only in their pixels.

The teacher sees each image through ``view``: ``roll`` shifts the whole batch by up to ``jitter`` px
(DeepInversion); ``crop_flip`` crops each image at its own random shift of up to ``jitter`` px from
the reflect-padded image and flips half of them (Fast-DFKD's synthesis view).

Cheap rounds (``train_every > 1``): after ``train_warmup`` rounds in which the generator trains every
round, it trains only on every ``train_every``-th round; the rounds between only sample a fresh batch
from it (one generator forward and one teacher forward for the logits, no backward), so most of the
compute goes to the student's KD steps on new images.

``cr > 0`` adds CMI's contrastive diversity term (Fang et al., IJCAI 2021): the teacher's
penultimate features of two views of each image (the jittered image and a random resized crop)
pass through a small projection head trained along; an InfoNCE loss makes each image's two views
agree while its embedding differs from the other images of the batch and from a bank of
embeddings of earlier batches, so new images keep moving away from what was already made.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.augment import random_crop_flip, random_jitter
from dfkd.errors import DfkdError
from dfkd.hooks import resolve_prior_name
from dfkd.losses import js_divergence
from generators.base import SYNTHESIZERS, Synthesizer, SyntheticBatch
from generators.nets import Generator


@SYNTHESIZERS.register("adversarial")
class AdversarialGenerator(Synthesizer):
    uses_student = True
    #: whether each image keeps its noise vector while the generator adapts to its class (label_embedding: false)
    noise_carries_class = False

    def __init__(
        self,
        teacher,
        batch_size: int = 64,
        seed: int = 0,
        device="cpu",
        nz: int = 100,
        ngf: int = 64,
        conditional: bool = True,
        g_steps: int = 5,
        lr: float = 1e-3,
        prior: str = "auto",
        bn: float = 1.0,
        first_bn_multiplier: float = 1.0,
        ce: float = 1.0,
        ie: float = 0.0,
        adv: float = 1.0,
        adv_loss: str = "kl",
        jitter: int = 1,
        cr: float = 0.0,
        cr_temperature: float = 0.1,
        cr_bank: int = 4096,
        cr_dim: int = 128,
        adv_mask: bool = False,
        adv_clip: float | None = None,
        adv_warmup: int = 0,
        adv_gate: float = 0.0,
        train_every: int = 1,
        train_warmup: int = 0,
        view: str = "roll",
        label_embedding: bool = True,
        div: float = 0.0,
    ):
        super().__init__(teacher, batch_size, seed, device)
        if not label_embedding and not self.noise_carries_class:
            raise DfkdError(f"label_embedding: false needs a synthesizer that keeps each image's noise vector while it "
                            f"adapts to the image's class (fast_meta); {type(self).__name__} draws fresh noise every step")
        if not label_embedding and int(train_every) > 1:
            raise DfkdError("train_every > 1 samples new images by class, which needs label_embedding: true")
        if view not in ("roll", "crop_flip"):
            raise DfkdError(f"view must be 'roll' or 'crop_flip', got {view!r}")
        self.view = view
        if int(train_every) < 1 or int(train_warmup) < 0:
            raise DfkdError(f"train_every must be >= 1 and train_warmup >= 0, got {train_every!r}, {train_warmup!r}")
        self.train_every, self.train_warmup = int(train_every), int(train_warmup)
        c, h, w = self.input_size
        if h != w:
            raise DfkdError(f"the adversarial generator makes square images; the teacher takes {h}×{w}")
        if adv_loss not in ("kl", "l1", "js"):
            raise DfkdError(f"adv_loss must be 'kl', 'l1' or 'js', got {adv_loss!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            embed = self.num_classes if conditional and label_embedding else None
            self.generator = Generator(nz, ngf, h, c, embed).to(self.device)
        self.conditional = bool(conditional)
        self.nz, self.g_steps = int(nz), int(g_steps)
        self.opt = torch.optim.Adam(self.generator.parameters(), lr=float(lr), betas=(0.5, 0.999))
        self.w_bn, self.w_ce, self.w_ie, self.w_adv = map(float, (bn, ce, ie, adv))
        self.first_bn_multiplier = float(first_bn_multiplier)
        self.adv_loss = adv_loss
        self.adv_mask = bool(adv_mask)
        self.adv_clip = float(adv_clip) if adv_clip is not None else None
        self.adv_warmup = int(adv_warmup)
        self.adv_gate = float(adv_gate)
        self.rounds = 0
        self.agreement_ema: float | None = None  # running requested-class agreement of the g-steps
        self.jitter = int(jitter)
        self.prior_name = resolve_prior_name(teacher.model, prior) if self.w_bn > 0 else None
        self.w_cr, self.cr_temperature = float(cr), float(cr_temperature)
        self.cr_bank_size = int(cr_bank)
        self.cr_head = None
        self.w_div = float(div)
        if self.w_cr > 0 or self.w_div > 0:
            self._feat_layer = self._penultimate()
        if self.w_cr > 0:
            self._setup_contrastive(int(cr_dim))

    def _penultimate(self) -> nn.Module:
        linears = [m for m in self.teacher.model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise DfkdError("the contrastive (cr > 0) and diversity (div > 0) terms read the teacher's penultimate "
                            "features, i.e. the input of its last nn.Linear; this teacher has none")
        return linears[-1]

    @staticmethod
    def _same_class_similarity(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cosine similarity of the teacher's penultimate features over pairs of different images made
        for the same class (the diversity term minimises it; no extra teacher pass)."""
        f = F.normalize(f.flatten(1).float(), dim=1)
        same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool, device=y.device)
        if not bool(same.any()):
            return torch.zeros((), device=f.device)
        return (f @ f.t())[same].mean()

    # -- CMI contrastive term --------------------------------------------------------------
    def _setup_contrastive(self, dim: int) -> None:
        feat_dim = self._feat_layer.in_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.rng.initial_seed() + 7)
            self.cr_head = nn.Sequential(nn.Linear(feat_dim, 256), nn.ReLU(), nn.Linear(256, dim)).to(self.device)
        self.cr_opt = torch.optim.Adam(self.cr_head.parameters(), lr=1e-3)
        self.cr_bank = torch.empty(0, dim, device=self.device)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        """A random resized crop (25–100 % of the area) and flip per image, from the synthesizer's own RNG."""
        from torchvision.ops import roi_align

        n, _, h, w = x.shape
        g = self.cpu_rng
        area = 0.25 + 0.75 * torch.rand(n, generator=g)
        side = area.sqrt()
        cw, ch = side * w, side * h
        x0 = torch.rand(n, generator=g) * (w - cw)
        y0 = torch.rand(n, generator=g) * (h - ch)
        boxes = torch.stack([torch.arange(n, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1).to(x.device)
        out = roi_align(x, boxes.to(x.dtype), output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
        flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
        return torch.where(flip[:, None, None, None], out.flip(3), out)

    def _features(self, x: torch.Tensor, prior) -> torch.Tensor:
        box: list[torch.Tensor] = []
        handle = self._feat_layer.register_forward_pre_hook(lambda m, inp: box.append(inp[0]))
        try:
            self.teacher(x)
        finally:
            handle.remove()
        if prior is not None:
            prior.reset()  # this view's statistics are not part of the prior term
        return box[0].flatten(1).float()

    def _contrastive(self, f1: torch.Tensor, xa: torch.Tensor, prior) -> torch.Tensor:
        """InfoNCE between the features ``f1`` of ``xa`` and those of a random resized crop of it."""
        f2 = self._features(self._crop(xa), prior)
        z1 = F.normalize(self.cr_head(f1), dim=1)
        z2 = F.normalize(self.cr_head(f2), dim=1)
        keys = torch.cat([z2, self.cr_bank.detach()])
        logits = z1 @ keys.t() / self.cr_temperature
        loss = F.cross_entropy(logits, torch.arange(len(z1), device=z1.device))
        with torch.no_grad():
            self.cr_bank = torch.cat([z2.detach(), self.cr_bank])[: self.cr_bank_size]
        return loss

    def _head_step(self) -> None:
        if self.cr_head is not None:
            self.cr_opt.step()
            self.cr_opt.zero_grad(set_to_none=True)

    def _head_params(self) -> list:
        return list(self.cr_head.parameters()) if self.cr_head is not None else []

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, **({"cr_head": self.cr_head} if self.cr_head is not None else {})}

    def _discrepancy(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Student–teacher discrepancy per the ``adv_*`` settings: per image, optionally clipped and
        restricted to images where both pick the same class, averaged over the batch."""
        s, t = s.float(), t.float()
        if self.adv_loss == "l1":
            per = (s - t).abs().mean(1)
        elif self.adv_loss == "js":
            per = js_divergence(s, t, reduction="none")
        else:
            per = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1)
        if self.adv_clip is not None:
            per = per.clamp(max=self.adv_clip)
        if self.adv_mask:
            per = per * (s.argmax(1) == t.argmax(1)).float()
        return per.mean()

    def _trains_this_round(self) -> bool:
        """Whether this round takes generator steps (else it only samples; see ``train_every``)."""
        r = self.rounds
        return r < self.train_warmup or (r - self.train_warmup) % self.train_every == 0

    @torch.no_grad()
    def _sample_batch(self, generator: nn.Module, z_scale: float = 1.0) -> SyntheticBatch:
        """A batch from ``generator`` as it stands (train mode: BatchNorm uses batch statistics)."""
        generator.train()
        z = z_scale * self.randn(self.batch_size, self.nz)
        y = self.sample_labels(self.batch_size) if self.conditional else None
        return self._batch(generator(z, y), y, {"syn/trained": torch.tensor(0.0)})

    def _adv_active(self, student: nn.Module | None) -> bool:
        """Whether this round uses the adversarial term (weight, student, warm-up, agreement gate)."""
        if self.w_adv <= 0 or student is None or self.rounds < self.adv_warmup:
            return False
        if self.adv_gate > 0 and self.conditional:
            return self.agreement_ema is not None and self.agreement_ema >= self.adv_gate
        return True

    def _track_agreement(self, t: torch.Tensor, y: torch.Tensor | None) -> None:
        if y is None:
            return
        acc = float((t.detach().argmax(1) == y).float().mean())
        self.agreement_ema = acc if self.agreement_ema is None else 0.7 * self.agreement_ema + 0.3 * acc

    def _prior_context(self):
        kwargs = {"first_weight": self.first_bn_multiplier} if self.prior_name == "batchnorm" else {}
        return self.teacher.statistics(self.prior_name, **kwargs) if self.prior_name else nullcontext()

    def _objective(self, x: torch.Tensor, y: torch.Tensor | None, prior, student: nn.Module | None,
                   use_adv: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator's loss on images ``x`` aimed at classes ``y`` (None: the teacher's arg-max)."""
        xa = (random_crop_flip(x, self.jitter, self.cpu_rng) if self.view == "crop_flip"
              else random_jitter(x, self.jitter, self.cpu_rng))
        feats: list[torch.Tensor] = []
        handle = (self._feat_layer.register_forward_pre_hook(lambda m, inp: feats.append(inp[0]))
                  if self.w_cr > 0 or self.w_div > 0 else None)
        try:
            t = self.teacher(xa).float()
        finally:
            if handle is not None:
                handle.remove()
        target = y if y is not None else t.argmax(1)
        loss_ce = F.cross_entropy(t, target)
        if self.adv_gate > 0:
            self._track_agreement(t, y)
        loss_prior = prior.loss() if prior is not None else torch.zeros((), device=x.device)
        loss = self.w_ce * loss_ce + self.w_bn * loss_prior
        if self.w_ie > 0:
            p_mean = F.softmax(t, dim=1).mean(0)
            loss = loss + self.w_ie * (p_mean * p_mean.clamp_min(1e-8).log()).sum()
        loss_adv = torch.zeros((), device=x.device)
        if use_adv:
            loss_adv = -self._discrepancy(student(xa), t)
            loss = loss + self.w_adv * loss_adv
        parts = {"syn/ce": loss_ce, "syn/prior": loss_prior, "syn/adv": loss_adv,
                 "syn/adv_on": torch.tensor(float(use_adv)), "syn/trained": torch.tensor(1.0)}
        if self.w_div > 0:
            loss_div = self._same_class_similarity(feats[0], target)
            loss = loss + self.w_div * loss_div
            parts["syn/div"] = loss_div
        if self.w_cr > 0:
            loss_cr = self._contrastive(feats[0].flatten(1).float(), xa, prior)
            loss = loss + self.w_cr * loss_cr
            parts["syn/cr"] = loss_cr
        return loss, parts

    def _batch(self, x: torch.Tensor, y: torch.Tensor | None, parts: dict[str, torch.Tensor]) -> SyntheticBatch:
        x = x.detach()
        t = self.teacher_logits(x)
        labels = y if y is not None else t.argmax(1)
        stats = {k: float(v.detach()) for k, v in parts.items()}
        stats.update(self.class_stats(t, labels))
        stats.update(self.class_spread(x, labels))
        return SyntheticBatch(images=x, labels=labels, teacher_logits=t, stats=stats)

    def step(self, student: nn.Module | None = None) -> SyntheticBatch:
        if not self._trains_this_round():
            self.rounds += 1
            return self._sample_batch(self.generator)
        was_training = student.training if student is not None else False
        if student is not None:
            student.eval()
        self.generator.train()
        params = list(self.generator.parameters())
        try:
            with self._prior_context() as prior:
                for _ in range(self.g_steps):
                    use_adv = self._adv_active(student)
                    z = self.randn(self.batch_size, self.nz)
                    y = self.sample_labels(self.batch_size) if self.conditional else None
                    loss, parts = self._objective(self.generator(z, y), y, prior, student, use_adv)
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward(inputs=params + self._head_params())
                    self.opt.step()
                    self._head_step()
        finally:
            if student is not None:
                student.train(was_training)
        self.rounds += 1
        with torch.no_grad():  # same (train) mode as the steps above: BatchNorm uses batch statistics
            z = self.randn(self.batch_size, self.nz)
            y = self.sample_labels(self.batch_size) if self.conditional else None
            x = self.generator(z, y)
        return self._batch(x, y, parts)

    def state_dict(self) -> dict[str, Any]:
        # a snapshot, not views of the live tensors (they keep changing in place)
        extra = {}
        if self.cr_head is not None:
            extra = {"cr_head": self.cr_head.state_dict(), "cr_opt": self.cr_opt.state_dict(), "cr_bank": self.cr_bank}
        return copy.deepcopy({**super().state_dict(), "generator": self.generator.state_dict(),
                              "opt": self.opt.state_dict(), "rounds": self.rounds,
                              "agreement_ema": self.agreement_ema, **extra})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.opt.load_state_dict(state["opt"])
        self.rounds = int(state.get("rounds", 0))
        self.agreement_ema = state.get("agreement_ema")
        if self.cr_head is not None and "cr_head" in state:
            self.cr_head.load_state_dict(state["cr_head"])
            self.cr_opt.load_state_dict(state["cr_opt"])
            self.cr_bank = state["cr_bank"].to(self.device).clone()
