"""What every task family shares: optimizer and schedule from config, divergence handling,
loss-spike bookkeeping, per-step seeding for exact resume and training throughput.

A task wraps ``self.model`` (the nn.Module the reparam plugin and the diagnostics see) and never
reads files: data comes from a DataModule, the model from ``sigma_repro.models``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from time import perf_counter
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn

from sigma_repro.checkpointing import compute_environment, warn_on_new_compute
from sigma_repro.data.sampling import planned_optimizer_steps
from sigma_repro.optim import build_optimizer, build_scheduler


def count_loss_spikes(losses: list[float], *, window: int = 20, factor: float = 1.25, min_jump: float = 0.2) -> int:
    """Steps whose loss exceeds the median of the ``window`` steps before it by both a factor and
    ``min_jump`` nats: the factor alone would count noise once the loss is near zero."""
    spikes = 0
    for t in range(window, len(losses)):
        median = statistics.median(losses[t - window : t])
        spikes += losses[t] > max(factor * median, median + min_jump)
    return spikes


# Seed offset between DDP ranks in ``on_train_batch_start``: a prime above ``seed * 1_000_003 + step`` for
# every seed < 999_000 and step < 1_000_003, so no two such (seed, step, rank) share a seed.
RANK_SEED_STRIDE = 1_000_000_000_039


class StabilityTask(L.LightningModule):
    """Base LightningModule: subclasses implement ``compute_loss(batch, stage) -> (loss, logs)``
    and ``probe_inputs(n) -> (args, kwargs)`` (the fixed batch the diagnostics probe), and name
    their headline metric (``headline_metric``, e.g. "val/acc", and ``higher_is_better``): the
    run summary leads with it and ``sigma-repro compare`` plots it by default.

    Throughput: ``train/<unit>_per_s`` (``train/samples_per_s``, ``train/tokens_per_s``), the
    units of ``batch_size_units(batch)`` over the wall time since the previous training batch
    ended: data loading, the step, checkpoints, logging and probes included, validation not.
    """

    headline_metric: str
    higher_is_better: bool

    def __init__(
        self,
        model: nn.Module,
        *,
        optim: dict[str, Any],
        schedule: dict[str, Any],
        gamma_lr_mult: float = 1.0,
        gamma_weight_decay: bool = False,
        seed: int = 0,
        spike_window: int = 20,
        spike_factor: float = 1.25,
        spike_min_jump: float = 0.2,
    ) -> None:
        super().__init__()
        self.model = model
        # Plain dicts only: checkpoints must load with torch's weights_only=True.
        self.save_hyperparameters(ignore=["model"])
        self.train_losses: list[float] = []
        self.diverged_step: int | None = None
        self.last_val_step: int | None = None  # global step of the latest validation pass
        self._last_batch_end: float | None = None  # perf_counter() at the previous training batch's end

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        # The task itself, not only self.model: heads and losses with parameters that live on the task
        # (SSL projection heads, CTC layers) must train too. Every trainable parameter is in one group.
        optimizer = build_optimizer(
            self, hp.optim, gamma_lr_mult=hp.gamma_lr_mult, gamma_weight_decay=hp.gamma_weight_decay
        )
        rank_zero_info("sigma-repro: optimizer groups " + ", ".join(
            f"{g['name']} {len(g['params'])} tensors / {sum(p.numel() for p in g['params']):,} parameters"
            for g in optimizer.param_groups))
        # Not trainer.estimated_stepping_batches: it builds the train loader before a resumed run's
        # checkpoint is restored, and the loader then restarts its epoch (sigma_repro.data.sampling).
        scheduler = build_scheduler(optimizer, hp.schedule, planned_optimizer_steps(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout/drop-path randomness is a function of (seed, step, rank), so a run resumed from any
        # checkpoint draws exactly what the uninterrupted run drew, and each DDP rank draws its own
        # masks. Rank 0's seed is the single-process one, so one-device results do not change.
        torch.manual_seed(self.hparams.seed * 1_000_003 + self.global_step + self.global_rank * RANK_SEED_STRIDE)

    def training_step(self, batch: Any, batch_idx: int):
        loss, logs = self.compute_loss(batch, "train")
        # All ranks take the same branch: one rank skipping backward while the others all-reduce
        # gradients would hang DDP. A single-process strategy's reduce is the identity.
        nonfinite_ranks = self.trainer.strategy.reduce((~torch.isfinite(loss.detach())).float(), reduce_op="sum")
        if nonfinite_ranks > 0:
            # Divergence ends the run cleanly: no optimizer step, the trainer stops after this batch.
            self.diverged_step = self.global_step
            self.trainer.should_stop = True
            self.log("train/diverged", 1.0, on_step=True)
            if self.trainer.world_size == 1:
                return None
            # Lightning refuses a skipped step under DDP, and every rank must run the backward (it
            # all-reduces the gradients): a loss whose gradients are exactly zero, which
            # on_after_backward then drops, so the optimizer leaves every parameter as it was.
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        self.train_losses.append(loss.item())
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False)
        return loss

    def batch_size_units(self, batch: Any) -> tuple[int, str]:
        """(count, unit) of the work in one training batch of this rank, e.g. (4096, "tokens");
        default: the batch size in "samples" (Lightning's ``extract_batch_size``)."""
        return extract_batch_size(batch), "samples"

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Wall time between consecutive batch ends, read from the host clock only: no GPU sync. The
        # step already waited for its loss (train_losses), so queued work cannot pile up unmeasured.
        now = perf_counter()
        if self._last_batch_end is not None:
            count, unit = self.batch_size_units(batch)
            # every rank trains a batch of this size in the same interval (DDP steps in lockstep)
            self.log(f"train/{unit}_per_s", count * self.trainer.world_size / (now - self._last_batch_end),
                     on_step=True, on_epoch=False)
        self._last_batch_end = now

    def on_validation_start(self) -> None:
        self._last_batch_end = None  # the next interval would include validation

    def on_after_backward(self) -> None:
        if self.diverged_step == self.global_step:  # the diverged step's zero gradients (DDP only)
            self.zero_grad(set_to_none=True)  # optimizers skip parameters without a gradient

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, logs = self.compute_loss(batch, "val")
        self.log("val/loss", loss, on_epoch=True, prog_bar=False, sync_dist=True)  # every rank's share of val
        # sync_dist averages plain tensors over ranks, as val/loss; torchmetrics Metrics sync themselves
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, on_epoch=True, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self.last_val_step = self.global_step

    def gather_by_index(self, share: dict[int, Any]) -> dict[int, Any]:
        """Every rank's ``{index: value}`` merged (each DDP rank evaluated its share of a split); one process: ``share``."""
        if self.trainer.world_size == 1:
            return share
        shares: list[dict[int, Any]] = [{} for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather_object(shares, share)
        return {k: v for s in shares for k, v in s.items()}

    def compute_loss(self, batch: Any, stage: str) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def probe_inputs(self, n: int) -> tuple[tuple, dict]:
        raise NotImplementedError

    def final_evaluation(self, datamodule: Any, out: Path) -> dict[str, Any]:
        """What the family computes once on the final weights of a run that did not diverge, after
        the final validation: ``{"metrics": {name: float}, "evaluation": {JSON facts}}``, merged into
        the run summary's ``metrics`` and ``evaluation`` (e.g. translation: test BLEU with the beam,
        sacrebleu's signature; files it writes go to the run dir ``out``). Default: nothing."""
        return {}

    # -- run bookkeeping ------------------------------------------------------------------------
    def loss_spikes(self) -> int:
        return count_loss_spikes(
            self.train_losses,
            window=self.hparams.spike_window,
            factor=self.hparams.spike_factor,
            min_jump=self.hparams.spike_min_jump,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # world_size: the global batch and the data sharding depend on it, so a resume must match it.
        # cpu_threads, device: they change floating-point results, so a resume elsewhere is flagged.
        checkpoint["sigma_repro"] = {"train_losses": list(self.train_losses), "diverged_step": self.diverged_step,
                                     "world_size": self.trainer.world_size,
                                     **compute_environment(self.trainer.strategy.root_device)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("sigma_repro", {})
        self.train_losses = list(state.get("train_losses", []))
        self.diverged_step = state.get("diverged_step")
        if self.trainer.is_global_zero:
            warn_on_new_compute(state, compute_environment(self.trainer.strategy.root_device))
