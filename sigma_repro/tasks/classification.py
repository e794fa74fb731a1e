"""Image classification (the paper's supervised ViT tables): cross-entropy, accuracy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from sigma_repro.tasks.base import StabilityTask


class ClassificationTask(StabilityTask):
    """``model(images) -> logits``; logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``."""

    headline_metric, higher_is_better = "val/acc", True

    def __init__(self, model: nn.Module, *, num_classes: int, label_smoothing: float = 0.0, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.save_hyperparameters(ignore=["model"])
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def compute_loss(self, batch: Any, stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        images, labels = batch
        logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.hparams.label_smoothing)
        if stage == "val":
            self.val_acc.update(logits, labels)
            return loss, {"acc": self.val_acc}
        return loss, {"acc": (logits.argmax(-1) == labels).float().mean()}

    def probe_inputs(self, n: int) -> tuple[tuple, dict]:
        images, _ = self.trainer.datamodule.probe_batch(n)
        return (images.to(self.device),), {}
