"""A test-only task family, built the way FAMILIES.md asks a new family to be built: a DataModule,
a model and a task here, configs in ``conf/`` beside this file (reached through Hydra's search
path), and no edit to the app, the tables, the diagnostics or the plugin.

The task: reverse a sequence of tokens. The model is an embedding, our shared ``TransformerEncoder``
(so the suite's ``norm`` setting, residual schemes, σReparam and every diagnostic apply) and a
linear head; the task owns one parameter of its own (a logit temperature), the kind of parameter
SSL heads and CTC layers have, which the optimizer must not miss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from sigma_repro.data.base import StabilityDataModule
from sigma_repro.data.sampling import ResumableDataLoader, ResumableSampler
from sigma_repro.errors import ConfigError
from sigma_repro.models.transformer import TransformerEncoder
from sigma_repro.tasks.base import StabilityTask


class ReversalData(StabilityDataModule):
    """Random token sequences (fixed by ``data_seed``) and their reversals; the run's seed orders them."""

    def __init__(self, *, vocab_size: int = 8, seq_len: int = 6, train_size: int = 512, val_size: int = 128,
                 batch_size: int = 32, num_workers: int = 0, data_seed: int = 1234, seed: int = 0):
        super().__init__()
        if not 1 <= batch_size <= train_size:
            raise ConfigError(f"data.batch_size must be between 1 and data.train_size={train_size}, "
                              f"found {batch_size}; set data.batch_size lower")
        g = torch.Generator().manual_seed(data_seed)
        tokens = torch.randint(0, vocab_size, (train_size + val_size, seq_len), generator=g)
        sets = TensorDataset(tokens, tokens.flip(-1))
        self.train_set = torch.utils.data.Subset(sets, range(train_size))
        self.val_set = torch.utils.data.Subset(sets, range(train_size, train_size + val_size))
        self.vocab_size, self.seq_len, self.batch_size, self.seed = vocab_size, seq_len, batch_size, seed
        self.num_workers = num_workers

    @property
    def model_kwargs(self) -> dict[str, int]:
        return {"vocab_size": self.vocab_size, "seq_len": self.seq_len}

    @property
    def task_kwargs(self) -> dict[str, int]:
        return {"vocab_size": self.vocab_size}

    def train_dataloader(self) -> ResumableDataLoader:
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(len(self.train_set), seed=self.seed, num_replicas=world_size, rank=rank)
        return ResumableDataLoader(_Unkeyed(self.train_set), sampler=sampler, batch_size=self.batch_size,
                                   drop_last=True, trainer=trainer, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def probe_batch(self, n: int) -> torch.Tensor:
        return torch.stack([self.val_set[i][0] for i in range(n)])


class _Unkeyed(torch.utils.data.Dataset):
    """The sampler yields (index, sample_seed) keys; this data has no random transform."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset[key[0]]


class Reverser(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab): embedding + positions, encoder stack, linear head."""

    def __init__(self, *, vocab_size: int, seq_len: int, dim: int = 32, depth: int = 2, num_heads: int = 2,
                 norm: str = "post"):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.encoder = TransformerEncoder(dim=dim, depth=depth, num_heads=num_heads, ffn_dim=2 * dim, norm=norm)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos))


class ReversalTask(StabilityTask):
    """Cross-entropy per token; ``val/token_acc``. ``temperature`` lives on the task, not the model."""

    headline_metric, higher_is_better = "val/token_acc", True

    def __init__(self, model: nn.Module, *, vocab_size: int, **kwargs: Any):
        super().__init__(model, **kwargs)
        self.save_hyperparameters(ignore=["model"])
        self.temperature = nn.Parameter(torch.ones(()))
        self.val_acc = MulticlassAccuracy(num_classes=vocab_size, average="micro")

    def compute_loss(self, batch: Any, stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        tokens, target = batch
        logits = self.model(tokens) * self.temperature  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        if stage == "val":
            self.val_acc.update(logits.flatten(0, 1), target.flatten())
            return loss, {"token_acc": self.val_acc}
        return loss, {"token_acc": (logits.argmax(-1) == target).float().mean()}

    def probe_inputs(self, n: int) -> tuple[tuple, dict]:
        return (self.trainer.datamodule.probe_batch(n).to(self.device),), {}
