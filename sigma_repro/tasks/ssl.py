"""Self-supervised ViTs (the paper's SimCLR runs): contrastive pretraining, kNN and linear-probe evaluation.

The model is a backbone without classifier, ``model(images (B, C, H, W)) -> features (B, D)``, its pooled
pre-head features (timm's ViT built with ``num_classes=0``, as the views DataModule asks:
``sigma_repro.data.views``); ``D`` is its ``num_features``. Training batches are lists of augmented
views ``[(B, C, H, W), ...]`` without labels; validation batches are plain ``(images, labels)``.

What is logged:
- ``train/loss``: NT-Xent (lightly's ``NTXentLoss``) of the two views' projections;
- ``train/samples_per_s``: training images per second (each seen as two views);
- ``val/knn_acc``: at every validation, the weighted kNN accuracy of the validation images against the
  training split's features (``knn_predict``), features from the backbone in eval mode under no_grad;
- ``val/linear_acc`` (the headline, with ``linear_probe``): at the end (``final_evaluation``, on the
  final weights), the accuracy of a logistic regression fitted on the frozen features of the training
  split (``linear_probe_accuracy``). Without ``linear_probe``, ``val/knn_acc`` is the headline.
Labels are read by the two evaluations only.

What is shared with other self-supervised methods (DINO) is in ``SelfSupervisedTask``: the evaluations,
the probe batch, the checks of the data; a method adds its heads and its ``compute_loss``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from sigma_repro.data.base import is_whole
from sigma_repro.errors import ConfigError
from sigma_repro.tasks.base import StabilityTask


# -- the evaluations, on frozen features --------------------------------------------------------
@torch.no_grad()
def extract_features(backbone: nn.Module, batches: Iterable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,)) of ``(images, labels)`` batches, the backbone in eval mode
    under no_grad (its mode restored after): no gradient reaches it, and eval mode leaves dropout off
    and σReparam's power iteration still (nothing in the backbone changes)."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for images, batch_labels in batches:
            features.append(backbone(images.to(device)).float())
            labels.append(batch_labels.to(device))
    finally:
        backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


def knn_predict(features: torch.Tensor, bank_features: torch.Tensor, bank_labels: torch.Tensor, *,
                num_classes: int, k: int, temperature: float) -> torch.Tensor:
    """Predicted labels (B,) of ``features`` (B, D) by a weighted vote of their ``k`` nearest neighbours in
    ``bank_features`` (N, D) (labels ``bank_labels`` (N,)), as in InstDisc (Wu et al., 2018) and DINO's
    ``eval_knn``: cosine similarity s to every bank feature, the k most similar neighbours each vote for
    their label with weight exp(s / temperature), the label with the largest total wins (ties: the
    smallest label). ``k`` larger than the bank means the whole bank."""
    features = F.normalize(features.float(), dim=1)
    bank = F.normalize(bank_features.float(), dim=1)
    similarity, neighbours = (features @ bank.T).topk(min(k, len(bank)), dim=1)  # (B, k) each
    votes = torch.zeros(len(features), num_classes, device=features.device)
    votes.scatter_add_(1, bank_labels[neighbours], (similarity / temperature).exp())  # (B, classes)
    return votes.argmax(dim=1)


def linear_probe_accuracy(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], *,
                          c: float, max_iter: int) -> dict[str, Any]:
    """Accuracy on ``val`` of a multinomial logistic regression (scikit-learn, L-BFGS, L2 strength 1/``c``)
    fitted on ``train``, features standardised with the training mean and std. (features, labels) pairs
    of torch tensors; only numpy copies reach scikit-learn. Returns ``{"accuracy", "iterations",
    "converged"}``; non-finite features (a blown-up backbone) give accuracy NaN, not an error."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x_train, y_train), (x_val, y_val) = ((x.double().cpu().numpy(), y.cpu().numpy()) for x, y in (train, val))
    if not (np.isfinite(x_train).all() and np.isfinite(x_val).all()):
        return {"accuracy": float("nan"), "iterations": 0, "converged": False}
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(x_train, y_train)
    return {"accuracy": float(probe.score(x_val, y_val)),
            "iterations": int(probe[-1].n_iter_.max()),
            "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught)}


# -- what every self-supervised method shares -------------------------------------------------
class SelfSupervisedTask(StabilityTask):
    """A backbone trained without labels, evaluated with them: kNN at every validation, a linear probe at
    the end (see the module docstring). Subclasses build their heads and implement ``compute_loss`` for
    training batches (lists of views).

    num_classes: from the data (``task_kwargs``), for the evaluations.
    knn_k, knn_temperature: neighbours and temperature of the kNN vote (DINO's 20 and 0.07).
    linear_probe: fit the probe at the end (``val/linear_acc``, the headline); false: ``val/knn_acc`` is.
    linear_probe_c, linear_probe_max_iter: scikit-learn's C (inverse L2 strength) and L-BFGS iterations.
    """

    higher_is_better = True

    def __init__(self, model: nn.Module, *, num_classes: int, knn_k: int = 20, knn_temperature: float = 0.07,
                 linear_probe: bool = True, linear_probe_c: float = 1.0, linear_probe_max_iter: int = 1000,
                 **kwargs: Any):
        for key, value in (("num_classes", num_classes), ("knn_k", knn_k), ("linear_probe_max_iter",
                                                                            linear_probe_max_iter)):
            if not (is_whole(value) and value >= 1):
                raise ConfigError(f"task.{key} must be a whole number >= 1, found {value!r}")
        for key, value in (("knn_temperature", knn_temperature), ("linear_probe_c", linear_probe_c)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"task.{key} must be a positive number, found {value!r}")
        if not isinstance(linear_probe, bool):
            raise ConfigError(f"task.linear_probe must be true or false, found {linear_probe!r}")
        if not is_whole(getattr(model, "num_features", None)):
            raise ConfigError(f"the backbone {type(model).__name__} has no num_features (the size of its pooled "
                              f"features, as timm models have); a self-supervised task needs it to size its heads")
        super().__init__(model, **kwargs)
        self.save_hyperparameters(ignore=["model"])
        self.headline_metric = "val/linear_acc" if linear_probe else "val/knn_acc"
        self.val_knn_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None  # training features, labels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if not callable(getattr(datamodule, "plain_train_dataloader", None)):
            raise ConfigError(
                f"a self-supervised task trains on augmented views and evaluates against the unaugmented "
                f"training split: it needs a views DataModule (data=digits_views, fashion_mnist_views, "
                f"cifar10_views: sigma_repro.data.views); found {type(datamodule).__name__}")

    def features(self, batches: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        """``extract_features`` of the backbone the evaluations read, in the trainer's precision."""
        with self.trainer.precision_plugin.forward_context():
            return extract_features(self.model, batches, self.device)

    # -- kNN at every validation ---------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._bank = self.features(self.trainer.datamodule.plain_train_dataloader())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        bank_features, bank_labels = self._bank
        predictions = knn_predict(self.model(images), bank_features, bank_labels, num_classes=self.hparams.num_classes,
                                  k=self.hparams.knn_k, temperature=self.hparams.knn_temperature)
        self.val_knn_acc.update(predictions, labels)
        self.log("val/knn_acc", self.val_knn_acc, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._bank = None

    def probe_inputs(self, n: int) -> tuple[tuple, dict]:
        images, _ = self.trainer.datamodule.probe_batch(n)
        return (images.to(self.device),), {}

    # -- the linear probe (called by the app on the final weights) -------------------------------
    def final_evaluation(self, datamodule: Any, out: Path) -> dict[str, Any]:
        """With ``linear_probe``: ``{"metrics": {"val/linear_acc"}, "evaluation": {...}}`` (see
        ``linear_probe_accuracy``); every rank fits the same probe on the same features."""
        if not self.hparams.linear_probe:
            return {}
        train = self.features(datamodule.plain_train_dataloader())
        val = self.features(datamodule.val_dataloader())
        result = linear_probe_accuracy(train, val, c=self.hparams.linear_probe_c,
                                       max_iter=self.hparams.linear_probe_max_iter)
        return {
            "metrics": {"val/linear_acc": result["accuracy"]},
            "evaluation": {
                "linear_probe": "scikit-learn LogisticRegression (multinomial, L-BFGS) on standardised frozen "
                                "backbone features, fitted on the unaugmented training split",
                "linear_probe_c": self.hparams.linear_probe_c, "linear_probe_iterations": result["iterations"],
                "linear_probe_converged": result["converged"],
                "linear_probe_train_images": len(train[1]), "linear_probe_val_images": len(val[1]),
            },
        }


# -- SimCLR -----------------------------------------------------------------------------------
class SimCLRTask(SelfSupervisedTask):
    """SimCLR (Chen et al., 2020): the two views of each image go through the backbone and lightly's
    ``SimCLRProjectionHead`` (Linear-BN-ReLU ... Linear-BN) in one batch, and lightly's ``NTXentLoss``
    pulls each view's projection towards its partner's and away from the other 2B - 2.

    temperature: NT-Xent's τ.
    projection_hidden_dim, projection_dim, projection_layers, projection_batch_norm: the head's sizes
        (lightly's hidden_dim, output_dim, num_layers, batch_norm); its input is the backbone's
        ``num_features``.
    gather_distributed: under DDP, every rank's projections are the negatives of every other's
        (lightly's ``gather_distributed``; one process: no effect).
    The rest: ``SelfSupervisedTask``.

    σReparam: the converter of the ``reparam`` group is applied by the app to ``self.model``, the backbone,
    before the task exists; the projection head is built here and is not reparameterised. Every
    linear layer of the head feeds a scale-free output (BatchNorm after each with ``projection_batch_norm``,
    and NT-Xent L2-normalises the projections), so a spectral norm there bounds nothing the loss sees; the
    paper's claim concerns the backbone's attention, which the diagnostics read.
    """

    def __init__(self, model: nn.Module, *, temperature: float = 0.2, projection_hidden_dim: int = 256,
                 projection_dim: int = 64, projection_layers: int = 2, projection_batch_norm: bool = True,
                 gather_distributed: bool = True, **kwargs: Any):
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"task.temperature must be a positive number (NT-Xent's τ), found {temperature!r}")
        for key, value, smallest in (("projection_hidden_dim", projection_hidden_dim, 1),
                                     ("projection_dim", projection_dim, 1), ("projection_layers", projection_layers, 2)):
            if not (is_whole(value) and value >= smallest):
                raise ConfigError(f"task.{key} must be a whole number >= {smallest}, found {value!r}")
        super().__init__(model, **kwargs)
        self.save_hyperparameters(ignore=["model"])
        self.projection_head = SimCLRProjectionHead(
            input_dim=model.num_features, hidden_dim=projection_hidden_dim, output_dim=projection_dim,
            num_layers=projection_layers, batch_norm=projection_batch_norm)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)

    def compute_loss(self, batch: Any, stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        views = batch  # [(B, C, H, W), (B, C, H, W)]: the two views of B images
        if len(views) != 2:
            raise ConfigError(f"SimCLR takes two views of each image; the data gives {len(views)} "
                              f"(use data=*_views with SimCLR's view transforms)")
        projections = self.projection_head(self.model(torch.cat(views))).float()  # (2B, projection_dim)
        z0, z1 = projections.chunk(2)
        return self.criterion(z0, z1), {}
