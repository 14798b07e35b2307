"""Student losses for ViT students: DeiT distillation token, manifold distillation, feature KD.

One module, :class:`ViTDistillLoss`, combines the terms by weights from the config (one student
forward, one teacher forward, block outputs read through removable hooks)::

    kd       · T²·KL(teacher ‖ class head)        (+ hard · CE(class head, teacher arg-max))
    deit     · distillation-token head vs teacher:  hard: CE(dist head, teacher arg-max)
                                                    soft: T²·KL(teacher ‖ dist head)
    manifold · Σ_pairs manifold relations (dfkd.losses.manifold, Hao et al. 2022)
    feature  · Σ_pairs MSE(LN(proj(student tokens)), LN(teacher tokens))   (learned projections)

DeiT (Touvron et al. 2021) students are timm's distilled ViTs (``deit_tiny_distilled_patch16_224``
with a small ``img_size``/``patch_size``/``embed_dim``): the loss switches them to distilled training,
so in train mode they return both heads; in eval mode timm averages the two heads, which is what the
evaluator sees. The registered names ``deit``, ``manifold``, ``feature`` are the same loss with other
default weights; ``vit`` lets a config set every weight. The loss is an ``nn.Module``: the
Distiller calls :meth:`setup` with the models and optimises its parameters (the projections).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.errors import DfkdError
from dfkd.losses.feature import FeatureKD, layer_pairs, match_grid
from dfkd.losses.kd import kd_loss
from dfkd.losses.manifold import manifold_terms
from dfkd.losses.student import STUDENT_LOSSES, StudentLoss
from dfkd.priors_vit import capture_blocks, num_prefix_tokens, vit_blocks


def _inner(model: nn.Module) -> nn.Module:
    """The bare network inside a (DistributedDataParallel and) Teacher/Normalized wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return getattr(model, "model", model)


def _width(model: nn.Module) -> int:
    blocks = vit_blocks(model)
    norm = getattr(blocks[0], "norm1", None)
    if norm is not None and hasattr(norm, "normalized_shape"):
        return int(norm.normalized_shape[0])
    return int(getattr(model, "embed_dim"))


class ViTDistillLoss(nn.Module, StudentLoss):
    defaults = dict(kd=1.0, deit=0.0, manifold=0.0, feature=0.0)

    def __init__(self, kd: Optional[float] = None, deit: Optional[float] = None,
                 manifold: Optional[float] = None, feature: Optional[float] = None,
                 temperature: float = 4.0, hard: float = 0.0, distillation: str = "hard",
                 layers: Optional[Sequence[Sequence[int]]] = None, manifold_patch: float = 4.0,
                 manifold_sample: float = 0.1, manifold_rand: float = 0.2, num_random: int = 192,
                 project: str = "auto"):
        super().__init__()
        given = dict(kd=kd, deit=deit, manifold=manifold, feature=feature)
        w = {k: float(self.defaults[k] if v is None else v) for k, v in given.items()}
        if any(v < 0 for v in w.values()):
            raise DfkdError(f"loss weights must be ≥ 0, got {w}")
        self.w_kd, self.w_deit, self.w_manifold, self.w_feature = w["kd"], w["deit"], w["manifold"], w["feature"]
        if distillation not in ("hard", "soft"):
            raise DfkdError(f"loss.distillation must be 'hard' or 'soft', got {distillation!r}")
        self.distillation = distillation
        self.temperature, self.hard = float(temperature), float(hard)
        self.layers = [list(p) for p in layers] if layers is not None else None
        self.mf = dict(patch=float(manifold_patch), sample=float(manifold_sample), rand=float(manifold_rand))
        self.num_random = int(num_random)
        self.features = FeatureKD(project)
        self.pairs: Optional[list[tuple[int, int]]] = None

    @property
    def needs_tokens(self) -> bool:
        return self.w_manifold > 0 or self.w_feature > 0

    # -- setup: layer pairs and projections (before the optimizer is built) --------------------
    def setup(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        s = _inner(student)
        if self.w_deit > 0 and not hasattr(s, "set_distilled_training"):
            raise DfkdError(f"loss deit > 0 needs a student with a distillation token (a timm distilled ViT, "
                            f"e.g. deit_tiny_distilled_patch16_224); got {type(s).__name__}")
        if not self.needs_tokens:
            self.pairs = []
            return
        if teacher is None:
            raise DfkdError("the manifold / feature loss terms need the teacher (distill.teacher_logits=live)")
        t = _inner(teacher)
        bs, bt = vit_blocks(s), vit_blocks(t)
        if not bs or not bt:
            which = "student" if not bs else "teacher"
            raise DfkdError(f"the manifold / feature loss terms need ViT blocks in both models; the {which} "
                            f"({type(s if not bs else t).__name__}) has none")
        self.pairs = layer_pairs(len(bs), len(bt), self.layers)
        if self.w_feature > 0:
            dev = next(s.parameters()).device
            self.features.setup(self.pairs, _width(s), _width(t))
            self.features.to(dev)

    # -- the loss ---------------------------------------------------------------------------
    def forward(self, student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                teacher_logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
        if self.pairs is None:
            self.setup(student, teacher)
        s_net = _inner(student)
        if self.w_deit > 0:
            s_net.set_distilled_training(True)
        s_idx = sorted({p[0] for p in self.pairs})
        t_idx = sorted({p[1] for p in self.pairs})
        feats_t: dict[int, torch.Tensor] = {}
        if teacher_logits is None or self.needs_tokens:
            with torch.no_grad(), ExitStack() as stack:
                cap = stack.enter_context(capture_blocks(_inner(teacher), t_idx)) if self.needs_tokens else {}
                t_out = teacher(images)
                feats_t = dict(cap)
            if teacher_logits is None:
                teacher_logits = t_out
        with ExitStack() as stack:
            feats_s = stack.enter_context(capture_blocks(s_net, s_idx)) if self.needs_tokens else {}
            out = student(images)
            feats_s = dict(feats_s)
        if isinstance(out, (tuple, list)):
            cls_logits, dist_logits = out[0], out[1]
        else:
            if self.w_deit > 0:
                raise DfkdError("the student returned one head in train mode; the deit term needs both heads")
            cls_logits, dist_logits = out, None
        stats: dict[str, float] = {}
        t_logits = teacher_logits.float()
        total = torch.zeros((), device=images.device)
        if self.w_kd > 0:
            l_kd = kd_loss(cls_logits, t_logits, self.temperature)
            if self.hard > 0:
                l_kd = l_kd + self.hard * F.cross_entropy(cls_logits.float(), t_logits.argmax(1))
            total = total + self.w_kd * l_kd
            stats["loss/kd"] = float(l_kd.detach())
        if self.w_deit > 0:
            if self.distillation == "hard":
                l_d = F.cross_entropy(dist_logits.float(), t_logits.argmax(1))
            else:
                l_d = kd_loss(dist_logits, t_logits, self.temperature)
            total = total + self.w_deit * l_d
            stats["loss/deit"] = float(l_d.detach())
        if self.needs_tokens:
            ps, pt = num_prefix_tokens(s_net), num_prefix_tokens(_inner(teacher))
            fs = {i: f[:, ps:] for i, f in feats_s.items()}
            ft = {i: f[:, pt:] for i, f in feats_t.items()}
            if self.w_manifold > 0:
                l_m = torch.zeros((), device=images.device)
                for s, t in self.pairs:
                    a, b = match_grid(fs[s], ft[t])
                    terms = manifold_terms(a, b, self.num_random)
                    l_m = l_m + sum(self.mf[k] * v for k, v in terms.items())
                total = total + self.w_manifold * l_m
                stats["loss/manifold"] = float(l_m.detach())
            if self.w_feature > 0:
                l_f = self.features(self.pairs, fs, ft)
                total = total + self.w_feature * l_f
                stats["loss/feature"] = float(l_f.detach())
        return total, stats

    __call__ = nn.Module.__call__


@STUDENT_LOSSES.register("vit")
class ViTLoss(ViTDistillLoss):
    """Every ViT term, each weight from the config (default: logit KD only)."""


@STUDENT_LOSSES.register("deit")
class DeiTLoss(ViTDistillLoss):
    """DeiT: half soft KD on the class head, half hard distillation on the distillation-token head."""

    defaults = dict(kd=0.5, deit=0.5, manifold=0.0, feature=0.0)


@STUDENT_LOSSES.register("manifold")
class ManifoldLoss(ViTDistillLoss):
    """Logit KD plus manifold distillation on paired blocks."""

    defaults = dict(kd=1.0, deit=0.0, manifold=1.0, feature=0.0)


@STUDENT_LOSSES.register("feature")
class FeatureLoss(ViTDistillLoss):
    """Logit KD plus token regression through learned projections."""

    defaults = dict(kd=1.0, deit=0.0, manifold=0.0, feature=1.0)
