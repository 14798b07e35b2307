"""A synthesizer that replays a stored synthetic dataset (``dfkd-synthesize`` output) in shuffled epochs.

    dfkd-distill synthesizer=stored synthesizer.path=DATASET distill.teacher_logits=stored  # no teacher needed
    dfkd-distill synthesizer=stored synthesizer.path=DATASET                                # re-query the teacher

    dfkd-distill task=detection teacher=detector teacher.checkpoint=DET.safetensors \
        synthesizer=stored synthesizer.path=DATASET                                         # a detection dataset

With a teacher, the dataset's manifest must name the same teacher (weights hash, normalisation). A
detection dataset (``dfkd-synthesize task=detection``) gives its images with the boxes stored beside
them as the batch's ``targets``; the distillation loop takes the teacher's pseudo-boxes on its own
augmented copies, as it does for every detection source.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from dfkd.data.store import SyntheticStore, to_float
from dfkd.errors import DfkdError
from generators.base import SYNTHESIZERS, Synthesizer, SyntheticBatch


@SYNTHESIZERS.register("stored")
class StoredSynthesizer(Synthesizer):
    """Batches of a stored dataset: images, the labels they were made for, the stored teacher logits.

    ``logits``: ``stored`` returns the logits kept with the images; ``teacher`` queries the given
    teacher on the images instead.
    """

    needs_real_data = False
    tasks = ("classification", "detection")  # what the dataset holds decides (its manifest's task)

    @classmethod
    def check_settings(cls, settings: dict) -> None:
        """Cheap checks of the settings, run before the teacher is built (which may mean training it)."""
        from generators.diffusion import check_model_path

        p = check_model_path(settings.get("path"), "stored", "DATASET (a dfkd-synthesize folder)")
        SyntheticStore(p, verify=False)  # reads manifest.json only: a folder that is no dataset fails here
        logits = settings.get("logits", "stored")
        if logits not in ("stored", "teacher"):
            raise DfkdError(f"synthesizer.logits must be 'stored' or 'teacher', got {logits!r}")

    def __init__(self, teacher=None, path: Optional[str] = None, batch_size: int = 64, seed: int = 0,
                 device="cpu", logits: str = "stored", verify: bool = True):
        self.check_settings({"path": path, "logits": logits})
        self.store = SyntheticStore(path, verify=verify)
        self.task = self.store.task
        if teacher is not None:
            self.store.check_teacher(teacher)
        elif self.task == "detection":
            raise DfkdError(f"dataset {self.store.root} holds detection data (boxes, no logits): distil from it with "
                            "dfkd-distill task=detection teacher=detector teacher.checkpoint=DET")
        elif logits == "teacher":
            raise DfkdError("synthesizer.logits=teacher needs a teacher")
        self.teacher = teacher
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.num_classes = self.store.num_classes
        self.input_size = self.store.input_size
        self.rng = torch.Generator(device=self.device).manual_seed(int(seed))
        self.cpu_rng = torch.Generator().manual_seed(int(seed) + 1)
        self._label_queue = torch.empty(0, dtype=torch.long)
        self.logits_from = logits
        t = self.store.load_all()
        self.images = t["images"]
        if self.task == "detection":
            self.targets = self.store.targets(data=t)
            self.labels = self.stored_logits = None
        else:
            self.labels, self.stored_logits = t["labels"], t["logits"]
        self.order = torch.randperm(len(self.images), generator=self.cpu_rng)
        self.pos = 0
        self.epoch = 0

    def _next_index(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            if self.pos >= len(self.order):
                self.order = torch.randperm(len(self.images), generator=self.cpu_rng)
                self.pos = 0
                self.epoch += 1
            take = self.order[self.pos:self.pos + n]
            self.pos += len(take)
            n -= len(take)
            out.append(take)
        return torch.cat(out)

    def step(self, student: nn.Module | None = None) -> SyntheticBatch:
        idx = self._next_index(self.batch_size)
        x = to_float(self.images[idx]).to(self.device)
        if self.task == "detection":
            targets = [{k: v.to(self.device) for k, v in self.targets[int(j)].items()} for j in idx]
            return SyntheticBatch(images=x, targets=targets, stats={"stored_epoch": float(self.epoch)})
        if self.logits_from == "teacher":
            t = self.teacher_logits(x)
        else:
            t = self.stored_logits[idx].float().to(self.device)
        return SyntheticBatch(images=x, labels=self.labels[idx].to(self.device), teacher_logits=t,
                              stats={"stored_epoch": float(self.epoch)})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "order": self.order.clone(), "pos": torch.tensor(self.pos),
                "epoch": torch.tensor(self.epoch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if len(state["order"]) != len(self.images):
            raise DfkdError("the checkpoint's stored-dataset state does not fit this dataset (another size)")
        self.order = state["order"].clone()
        self.pos = int(state["pos"])
        self.epoch = int(state["epoch"])
