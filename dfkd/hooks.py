"""Statistic priors of a frozen teacher, as context managers whose hooks are always removed.

>>> with teacher.statistics("batchnorm") as prior:
...     logits = teacher(images)
...     loss = ce + prior.loss()

A prior records what it needs during the teacher's forward pass and turns it into a
scalar with :meth:`StatisticsPrior.loss`. Hooks live only inside the ``with`` block.
"""

from __future__ import annotations

from typing import Callable, List

import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.registry import Registry


class StatisticsPrior:
    """Base class: subclasses add hooks in :meth:`_attach` and fill ``self._terms``."""

    name = "prior"

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._terms: List[torch.Tensor] = []

    def _attach(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self) -> "StatisticsPrior":
        self._terms = []
        try:
            self._attach()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        self._terms = []

    @property
    def terms(self) -> List[torch.Tensor]:
        return list(self._terms)

    def loss(self, reset: bool = True) -> torch.Tensor:
        """Sum of the terms recorded since the last reset (zero when none were recorded)."""
        if not self._terms:
            raise RuntimeError(f"{self.name} prior recorded nothing: run the teacher inside the 'with' block")
        out = torch.stack([t.float() for t in self._terms]).sum()
        if reset:
            self._terms = []
        return out


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        and m.running_mean is not None
    ]


class BatchNormPrior(StatisticsPrior):
    """DeepInversion's feature-statistics prior (Yin et al. 2020).

    For every BatchNorm layer l: ‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂, with μ_l, σ²_l the
    per-channel mean and (biased) variance of the layer's input over batch and space and
    μ̂_l, σ̂²_l its running statistics. The first layer's term is multiplied by ``first_weight``.
    """

    name = "batchnorm"

    def __init__(self, model: nn.Module, first_weight: float = 1.0):
        super().__init__(model)
        self.first_weight = float(first_weight)
        self.layers = batchnorm_layers(model)
        if not self.layers:
            raise DfkdError(
                "the teacher has no BatchNorm layers with running statistics, so the 'batchnorm' prior "
                "(DeepInversion) cannot be used; choose a prior that fits the teacher (e.g. prior=auto)"
            )

    def _hook(self, index: int) -> Callable:
        weight = self.first_weight if index == 0 else 1.0

        def hook(module: nn.modules.batchnorm._BatchNorm, inputs, output) -> None:
            x = inputs[0]
            dims = [0] + list(range(2, x.dim()))
            xf = x.float()
            mean = xf.mean(dim=dims)
            var = xf.var(dim=dims, unbiased=False)
            term = torch.linalg.vector_norm(mean - module.running_mean.float()) + torch.linalg.vector_norm(
                var - module.running_var.float()
            )
            self._terms.append(weight * term)

        return hook

    def _attach(self) -> None:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._hook(i)))


PRIORS: Registry[StatisticsPrior] = Registry("statistics prior")
PRIORS.register("batchnorm")(BatchNormPrior)


def resolve_prior_name(model: nn.Module, kind: str = "auto") -> str:
    """Pick the prior for ``model``: ``auto`` takes BatchNorm statistics where there are any."""
    if kind != "auto":
        PRIORS.get(kind)(model)  # raises: unknown name (with close matches), or a prior that does not fit
        return kind
    if batchnorm_layers(model):
        return "batchnorm"
    for name in PRIORS:
        if getattr(PRIORS.get(name), "fits", lambda m: False)(model):
            return name
    raise DfkdError(
        f"no statistics prior fits a {type(model).__name__} teacher (it has no BatchNorm layers); "
        f"known priors: {', '.join(PRIORS)}"
    )


def build_prior(model: nn.Module, kind: str = "auto", **kwargs) -> StatisticsPrior:
    return PRIORS.build(resolve_prior_name(model, kind), model=model, **kwargs)


from dfkd import priors_vit as _priors_vit  # noqa: E402,F401  (registers the ViT priors: vit, vit_patch_entropy, vit_token_stats)
