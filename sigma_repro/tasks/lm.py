"""Causal language modelling (the LM tables): next-token cross-entropy, perplexity, bits per byte."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.text import Perplexity

from sigma_repro.errors import ConfigError
from sigma_repro.tasks.base import StabilityTask


class LanguageModelTask(StabilityTask):
    """``model(inputs (B, T)) -> logits (B, T, V)``, batches ``(inputs, targets)`` with targets the
    inputs shifted left by one token. Logs ``train/loss``, ``train/tokens_per_s``, ``val/loss``,
    ``val/ppl`` (torchmetrics: exp of the mean NLL over every validation token) and, when the data
    knows its ``bytes_per_token`` (UTF-8 bytes per token on the validation split), ``val/bits_per_byte``.
    """

    headline_metric, higher_is_better = "val/ppl", False

    def __init__(self, model: nn.Module, *, bytes_per_token: float | None = None, **kwargs: Any):
        if bytes_per_token is not None and not (isinstance(bytes_per_token, (int, float)) and bytes_per_token > 0):
            raise ConfigError(f"bytes_per_token must be a positive number (UTF-8 bytes per token of the validation "
                              f"split) or None where bits per byte has no meaning, found {bytes_per_token!r}")
        super().__init__(model, **kwargs)
        self.save_hyperparameters(ignore=["model"])
        self.val_ppl = Perplexity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def compute_loss(self, batch: Any, stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs, targets = batch
        logits = self.model(inputs).float()  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # mean NLL per token, in nats
        if stage != "val":
            return loss, {}
        self.val_ppl.update(logits, targets)
        logs: dict[str, Any] = {"ppl": self.val_ppl}
        if self.hparams.bytes_per_token is not None:
            # Bits per byte compares models whatever their tokenizer: the loss is nats per token;
            # / ln 2 makes it bits per token; / (bytes per token) spreads them over the text's UTF-8
            # bytes. Linear in the loss, so the epoch mean of this is val/loss's mean, converted.
            logs["bits_per_byte"] = loss / math.log(2) / self.hparams.bytes_per_token
        return loss, logs

    def batch_size_units(self, batch: Any) -> tuple[int, str]:
        inputs, _ = batch
        return inputs.numel(), "tokens"

    def probe_inputs(self, n: int) -> tuple[tuple, dict]:
        return (self.trainer.datamodule.probe_batch(n).to(self.device),), {}
