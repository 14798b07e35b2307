"""Reference points every benchmark reports: Gaussian noise (the floor) and real images (the ceiling)."""

from __future__ import annotations

import torch
from torch import nn

from dfkd.data import ArrayDataset
from generators.base import SYNTHESIZERS, Synthesizer, SyntheticBatch


@SYNTHESIZERS.register("noise")
class NoiseSynthesizer(Synthesizer):
    """Images of i.i.d. Gaussian pixels, N(mean, std²) clamped to [0, 1]: the noise-KD floor."""

    def __init__(self, teacher, batch_size: int = 64, seed: int = 0, device="cpu",
                 mean: float = 0.5, std: float = 0.25):
        super().__init__(teacher, batch_size, seed, device)
        self.mean, self.std = float(mean), float(std)

    def step(self, student: nn.Module | None = None) -> SyntheticBatch:
        x = (self.mean + self.std * self.randn(self.batch_size, *self.input_size)).clamp_(0, 1)
        return SyntheticBatch(images=x, teacher_logits=self.teacher_logits(x))


@SYNTHESIZERS.register("real")
class RealDataSynthesizer(Synthesizer):
    """Batches of real training images: the real-data-KD ceiling (labels are not used for training)."""

    needs_real_data = True

    def __init__(self, teacher, dataset: ArrayDataset | None = None, batch_size: int = 64, seed: int = 0,
                 device="cpu"):
        super().__init__(teacher, batch_size, seed, device)
        if dataset is None:
            from dfkd.errors import DfkdError

            raise DfkdError("the 'real' synthesizer needs a dataset with a train split")
        self.dataset = dataset

    def step(self, student: nn.Module | None = None) -> SyntheticBatch:
        idx = torch.randint(len(self.dataset), (self.batch_size,), generator=self.cpu_rng)
        x, y = self.dataset.take(idx)
        x = x.to(self.device)
        return SyntheticBatch(images=x, labels=y.to(self.device), teacher_logits=self.teacher_logits(x))
