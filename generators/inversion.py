"""DeepInversion / Adaptive DeepInversion (Yin et al., CVPR 2020): optimise pixels directly.

Each :meth:`DeepInversion.step` starts a fresh batch from noise and runs ``iterations``
Adam steps on

    CE(teacher(aug(x)), y) + bn · R_feature(x) + tv · TV(x) + l2 · ‖x‖₂  [− adi · JS(teacher, student)]

where ``R_feature`` is the teacher's statistics prior (BatchNorm statistics for CNN teachers),
``aug`` is random jitter and optional flip, and the ADI term (when ``adi > 0`` and a student
is given) pushes images to where student and teacher disagree.

Where the optimisation happens is a choice (``space``): ``pixel`` optimises [0, 1] pixels started
at 0.5 + ``init_std``·N(0, 1); ``normalized`` optimises the teacher's normalised input (the tensor the
teacher's first layer sees) started at ``init_std``·N(0, 1), as NVIDIA's CIFAR-10 recipe does.
``clamp`` keeps the variable inside the valid pixel range after every step (the returned images are
always clamped to [0, 1]). ``tv_kind`` is ``l1`` (mean absolute neighbour difference) or ``norm``
(sum of the L2 norms of four neighbour differences, the reference recipe's form).

Two image priors against high-frequency "fooling" patterns (both off by default): ``downsample`` f > 1
optimises an (H/f, W/f) variable that is upsampled bilinearly to the teacher's size (no detail finer
than f pixels can appear), and ``crop_scale`` s < 1 shows the teacher a random resized crop of every
image at every step (area in [s, 1], aspect ratio in [3/4, 4/3], one crop per image), so an image must
keep its class under rescaling and shifts, not only at one pixel alignment. ``spectrum_decay`` d > 0
(pixel space only) optimises the image's 2-D Fourier coefficients scaled by 1/f^d instead of its pixels (the
feature-visualisation parametrisation of Olah et al. 2017): the start is 1/f^d ("pink") noise, as natural
images have, and Adam's per-coefficient steps move low frequencies as much as high ones in pixel terms.
``saturation`` s < 1 (RGB, pixel space) scales every pixel's colour away from its grey level by s
(``x_c = L + s·(x_c − L)``, L the channel mean): natural images' colour channels are strongly correlated.

``init``: ``noise`` (above) or ``dead_leaves`` — start from procedural occlusion images
(:func:`generators.procedural.dead_leaves`), which already have natural edge and colour statistics, so
fewer iterations are needed to reach class-true, statistics-matching images.

``sparse_keep`` < 1 (timm ViT teachers) is sparse inversion after SMI: the patches the teacher attends to
least are dropped from its tokens at the iterations ``sparse_at`` (fractions of the run), down to that
fraction, which makes later iterations cheaper (:mod:`dfkd.sparse_vit`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.augment import random_jitter
from dfkd.errors import DfkdError
from dfkd.losses import js_divergence, l2_prior, tv_prior
from dfkd.losses.priors import tv_norm_prior
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
        space: str = "pixel",
        clamp: bool = True,
        tv_kind: str = "l1",
        betas: tuple = (0.5, 0.99),
        downsample: int = 1,
        crop_scale: float = 1.0,
        sparse_keep: float = 1.0,
        sparse_at: tuple = (0.2, 0.4, 0.6),
        spectrum_decay: float = 0.0,
        saturation: float = 1.0,
        init: str = "noise",
    ):
        super().__init__(teacher, batch_size, seed, device)
        if init not in ("noise", "dead_leaves"):
            raise DfkdError(f"deepinversion init must be 'noise' or 'dead_leaves', got {init!r}")
        if init != "noise" and (float(spectrum_decay) > 0 or int(downsample) != 1):
            raise DfkdError("deepinversion init=dead_leaves needs spectrum_decay=0 and downsample=1")
        self.init = init
        if space not in ("pixel", "normalized"):
            raise DfkdError(f"deepinversion space must be 'pixel' or 'normalized', got {space!r}")
        if tv_kind not in ("l1", "norm"):
            raise DfkdError(f"deepinversion tv_kind must be 'l1' or 'norm', got {tv_kind!r}")
        self.iterations = int(iterations)
        self.lr = float(lr)
        self.prior = prior
        self.w_bn, self.w_ce, self.w_tv, self.w_l2, self.w_adi = map(float, (bn, ce, tv, l2, adi))
        self.first_bn_multiplier = float(first_bn_multiplier)
        self.jitter = int(jitter)
        self.flip = bool(flip)
        self.init_std = float(init_std)
        self.space, self.clamp, self.tv_kind = space, bool(clamp), tv_kind
        self.betas = tuple(float(b) for b in betas)
        self.downsample = int(downsample)
        self.crop_scale = float(crop_scale)
        h, w = self.input_size[-2:]
        if self.downsample < 1 or h % self.downsample or w % self.downsample:
            raise DfkdError(f"deepinversion downsample must be a positive divisor of the image size {h}x{w}, "
                            f"got {downsample!r}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise DfkdError(f"deepinversion crop_scale must be in (0, 1], got {crop_scale!r}")
        self.saturation = float(saturation)
        if not 0.0 <= self.saturation <= 1.0 or (self.saturation < 1 and (space != "pixel" or self.input_size[0] != 3)):
            raise DfkdError(f"deepinversion saturation must be in [0, 1] and < 1 only for RGB in space=pixel, "
                            f"got {saturation!r}")
        self.spectrum_decay = float(spectrum_decay)
        self._spectrum_scale = None
        if self.spectrum_decay < 0 or (self.spectrum_decay > 0 and space != "pixel"):
            raise DfkdError(f"deepinversion spectrum_decay must be >= 0 and needs space=pixel, got {spectrum_decay!r}")
        if self.spectrum_decay > 0:
            lh, lw = h // self.downsample, w // self.downsample
            f = torch.sqrt(torch.fft.fftfreq(lh)[:, None] ** 2 + torch.fft.rfftfreq(lw)[None, :] ** 2)
            scale = 1.0 / f.clamp_min(1.0 / max(lh, lw)) ** self.spectrum_decay
            g = torch.Generator().manual_seed(0)  # unit pixel std for a unit-variance spectrum
            probe = torch.fft.irfft2(torch.complex(torch.randn(256, *f.shape, generator=g),
                                                   torch.randn(256, *f.shape, generator=g)) * scale,
                                     s=(lh, lw), norm="ortho")
            self._spectrum_scale = (scale / probe.std()).to(self.device)
        # Fail at construction (not mid-run) when the prior does not fit the teacher.
        from dfkd.hooks import resolve_prior_name

        self.prior_name = resolve_prior_name(teacher.model, prior) if self.w_bn > 0 else None
        self.sparse = None
        if float(sparse_keep) < 1.0:
            from dfkd.sparse_vit import SparseInversion

            self.sparse = SparseInversion(teacher.model, float(sparse_keep), tuple(sparse_at), self.iterations,
                                          self.prior_name)

    def _prior_kwargs(self) -> dict:
        return {"first_weight": self.first_bn_multiplier} if self.prior_name == "batchnorm" else {}

    # -- the optimisation variable and its pixels ------------------------------------------------
    def _scale(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.teacher.mean.to(v.device, v.dtype)
        std = self.teacher.std.to(v.device, v.dtype)
        return mean, std

    def _init(self) -> torch.Tensor:
        c, h, w = self.input_size
        if self._spectrum_scale is not None:  # real and imaginary parts of the scaled spectrum
            return self.init_std * self.randn(self.batch_size, c, *self._spectrum_scale.shape, 2)
        if self.init == "dead_leaves":
            from generators.procedural import dead_leaves

            v = dead_leaves(self.batch_size, c, (h, w), self.rng, device=self.device)
            if self.space == "normalized":
                mean, std = self._scale(v)
                v = (v - mean) / std
            return v
        z = self.randn(self.batch_size, c, h // self.downsample, w // self.downsample)
        if self.space == "normalized":
            v = self.init_std * z
        else:
            v = 0.5 + self.init_std * z
        if self.clamp:
            self._clamp_(v)
        return v

    def _up(self, v: torch.Tensor) -> torch.Tensor:
        """The variable at the teacher's input size (bilinear upsampling when ``downsample`` > 1; pixels of
        the spectrum when ``spectrum_decay`` > 0)."""
        if self._spectrum_scale is not None:
            lh, lw = self.input_size[-2] // self.downsample, self.input_size[-1] // self.downsample
            v = 0.5 + torch.fft.irfft2(torch.view_as_complex(v.contiguous()) * self._spectrum_scale, s=(lh, lw),
                                       norm="ortho")
        if self.saturation < 1.0:
            grey = v.mean(dim=1, keepdim=True)
            v = grey + self.saturation * (v - grey)
        if self.downsample == 1:
            return v
        return F.interpolate(v, size=tuple(self.input_size[-2:]), mode="bilinear", align_corners=False)

    def _random_resized_crop(self, x: torch.Tensor) -> torch.Tensor:
        """One random resized crop per image (area in [crop_scale, 1], aspect in [3/4, 4/3]), resampled
        bilinearly to the same size; differentiable in ``x``."""
        b = x.shape[0]
        g = self.cpu_rng
        area = self.crop_scale + (1 - self.crop_scale) * torch.rand(b, generator=g)
        log_r = (torch.rand(b, generator=g) * 2 - 1) * math.log(4 / 3)
        sx = (area * log_r.exp()).sqrt().clamp(max=1.0)
        sy = (area / log_r.exp()).sqrt().clamp(max=1.0)
        tx = (torch.rand(b, generator=g) * 2 - 1) * (1 - sx)
        ty = (torch.rand(b, generator=g) * 2 - 1) * (1 - sy)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _pixels(self, v: torch.Tensor) -> torch.Tensor:
        v = self._up(v)
        if self._spectrum_scale is not None:
            return v.clamp(0, 1)
        if self.space == "normalized":
            mean, std = self._scale(v)
            return v * std + mean
        return v

    @torch.no_grad()
    def _clamp_(self, v: torch.Tensor) -> None:
        if self._spectrum_scale is not None:
            return  # a spectrum has no range to keep; the pixels are clamped
        if self.space == "normalized":
            mean, std = self._scale(v)
            v.copy_(torch.maximum(torch.minimum(v, (1 - mean) / std), -mean / std))
        else:
            v.clamp_(0, 1)

    def step(self, student: nn.Module | None = None) -> SyntheticBatch:
        labels = self.sample_labels(self.batch_size)
        v = self._init().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=self.lr, betas=self.betas)
        use_adi = self.w_adi > 0 and student is not None
        was_training = student.training if student is not None else False
        if use_adi:
            student.eval()
        tv_fn = tv_norm_prior if self.tv_kind == "norm" else tv_prior
        stats: dict[str, float] = {}
        ctx = self.teacher.statistics(self.prior_name, **self._prior_kwargs()) if self.prior_name else nullcontext()
        try:
            with ctx as prior:
                mask = None if self.sparse is None else self.sparse.new_mask(v)
                for it in range(self.iterations):
                    opt.zero_grad(set_to_none=True)
                    x = self._pixels(v)
                    if mask is not None:  # sparse inversion: the keep mask is augmented with the image
                        if it in self.sparse.drops:
                            mask = self.sparse.drop(self.teacher, x.detach(), mask, it)
                            if prior is not None:
                                prior.reset()  # forget what the scoring forward recorded
                        x = torch.cat([x, mask], dim=1)
                    # jitter and flip commute with the per-pixel map from the variable to pixels
                    xa = random_jitter(x, self.jitter, self.cpu_rng)
                    if self.flip and torch.rand((), generator=self.cpu_rng) < 0.5:
                        xa = xa.flip(3)
                    if self.crop_scale < 1.0:
                        xa = self._random_resized_crop(xa)
                    if mask is not None:
                        c = self.input_size[0]
                        xa, ma = xa[:, :c], xa[:, c:]
                        with self.sparse.tokens(ma, self.sparse.kept(mask)):
                            logits = self.teacher(xa)
                    else:
                        logits = self.teacher(xa)
                    loss_ce = F.cross_entropy(logits.float(), labels)
                    loss = self.w_ce * loss_ce
                    if self.w_tv:
                        loss = loss + self.w_tv * tv_fn(self._up(v))
                    if self.w_l2:
                        # the norm of the variable around its centre (0.5 in pixels, 0 when normalised)
                        c0 = self._up(v) if self._spectrum_scale is not None else v
                        loss = loss + self.w_l2 * (l2_prior(c0) if self.space == "pixel" else l2_prior(v + 0.5))
                    loss_prior = prior.loss() if prior is not None else torch.zeros((), device=v.device)
                    loss = loss + self.w_bn * loss_prior
                    if use_adi:
                        loss = loss - self.w_adi * js_divergence(logits, student(xa))
                    loss.backward(inputs=[v])  # never into the teacher's or student's grads
                    opt.step()
                    if self.clamp:
                        self._clamp_(v)
                if self.iterations:
                    stats = {"syn/ce": float(loss_ce.detach()), "syn/prior": float(loss_prior.detach()),
                             "syn/loss": float(loss.detach())}
        finally:
            if use_adi:
                student.train(was_training)
        x = self._pixels(v.detach()).clamp(0, 1)
        t = self.teacher_logits(x)
        stats.update(self.class_stats(t, labels))
        return SyntheticBatch(images=x, labels=labels, teacher_logits=t, stats=stats)
