"""Statistic priors of a frozen teacher, as context managers whose hooks are always removed.

>>> with teacher.statistics("batchnorm") as prior:
...     logits = teacher(images)
...     loss = ce + prior.loss()

A prior records what it needs during the teacher's forward pass and turns it into a
scalar with :meth:`StatisticsPrior.loss`. Hooks live only inside the ``with`` block.
"""

from __future__ import annotations

from typing import Callable, List, Mapping

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


def parse_prior_spec(kind) -> tuple[str, dict]:
    """``"name"``, ``"name(key=value, ...)"`` or a mapping ``{"name": ..., key: value}`` → (name, kwargs).
    Values are read as YAML scalars (numbers, booleans, strings)."""
    if isinstance(kind, Mapping):
        kw = {str(k): (dict(v) if isinstance(v, Mapping) else v) for k, v in kind.items()}
        if "name" not in kw:
            raise DfkdError(f"a prior given as a mapping needs a 'name' key, got {sorted(kw)}")
        return str(kw.pop("name")), kw
    kind = str(kind).strip()
    if "(" not in kind:
        return kind, {}
    if not kind.endswith(")"):
        raise DfkdError(f"cannot read the prior {kind!r}: expected name(key=value, ...)")
    import yaml

    name, _, body = kind[:-1].partition("(")
    kw = {}
    items, depth, cur = [], 0, ""
    for ch in body:  # split at top-level commas (values may be {...} / [...] YAML flow collections)
        depth += ch in "{[(" and 1 or (-1 if ch in "}])" else 0)
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    for item in filter(None, (x.strip() for x in items)):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise DfkdError(f"cannot read {item!r} in the prior {kind!r}: expected key=value")
        try:
            kw[key.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            raise DfkdError(f"cannot read the value of {key.strip()!r} in the prior {kind!r}") from None
    return name.strip(), kw


def _spec(name: str, kwargs: dict) -> str:
    return name if not kwargs else f"{name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"


def resolve_prior_name(model: nn.Module, kind="auto") -> str:
    """Pick the prior for ``model``: ``auto`` takes BatchNorm statistics where there are any. A prior with
    arguments (``"vit_free(bootstrap=1, heads=0.5)"`` or a mapping with ``name``) comes back as that
    string, which :func:`build_prior` reads."""
    name, kwargs = parse_prior_spec(kind)
    if name != "auto":
        try:
            PRIORS.get(name)(model, **kwargs)  # raises: unknown name (with close matches), or a prior that does not fit
        except TypeError as e:
            raise DfkdError(f"prior {name!r}: {e}") from None
        return _spec(name, kwargs)
    if batchnorm_layers(model):
        return "batchnorm"
    for name in PRIORS:
        if getattr(PRIORS.get(name), "fits", lambda m: False)(model):
            return name
    raise DfkdError(
        f"no statistics prior fits a {type(model).__name__} teacher (it has no BatchNorm layers); "
        f"known priors: {', '.join(PRIORS)}"
    )


def build_prior(model: nn.Module, kind="auto", **kwargs) -> StatisticsPrior:
    name, spec_kwargs = parse_prior_spec(resolve_prior_name(model, kind))
    return PRIORS.build(name, model=model, **{**spec_kwargs, **kwargs})


from dfkd import priors_vit as _priors_vit  # noqa: E402,F401  (registers the ViT priors: vit, vit_patch_entropy, vit_token_stats)
