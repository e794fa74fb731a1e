"""Training data whose order and augmentation are a pure function of (seed, epoch), resumable mid-epoch.

A killed run resumed from a checkpoint must see exactly the batches the uninterrupted run would
have seen, so nothing here reads the global RNGs or depends on the number of loader workers:

- ``ResumableSampler`` draws epoch ``e``'s permutation of the training set, and one seed per sample,
  from ``torch.Generator().manual_seed(seed * 1_000_003 + e)``, takes this rank's shard and yields
  ``(index, sample_seed)`` keys.
- ``SeededView`` wraps a dataset whose transform is random: it fetches a batch of keys with the
  global torch / ``random`` / numpy RNGs (the ones torchvision and timm transforms draw from) seeded
  from the batch's first sample seed, and puts those RNGs back as they were afterwards.
- ``ResumableDataLoader`` counts the batches it has handed to the training loop in the current
  epoch and gives Lightning ``state_dict()`` / ``load_state_dict()``.

How a mid-epoch resume is exact under Lightning 2.6 (``loops/fit_loop.py``,
``loops/training_epoch_loop.py``):

1. On save, Lightning stores the train loader's ``state_dict()`` (``{"epoch", "batches_done"}``) in
   the checkpoint. ``batches_done`` is counted in the main process as batches leave the loader, so
   worker processes fetching indices ahead do not change it; and Lightning's data fetcher does not
   fetch ahead from a loader with a length. So it equals the number of batches trained on in that
   epoch, the batch index Lightning resumes at (``epoch_loop.batch_progress.current.ready``).
2. On resume, Lightning calls ``load_state_dict()`` before it first iterates the loader. When the
   next pass starts, the loader takes its epoch from ``trainer.current_epoch`` (not from
   Lightning's ``set_epoch`` value, see ``ResumableDataLoader``); if that is the saved epoch, the
   sampler leaves out its first ``batches_done * batch_size`` keys, whole batches, and otherwise
   (the checkpoint was taken at the saved epoch's end) the new epoch starts at its first batch.
3. ``ResumableDataLoader.__iter__`` is lazy: the epoch is read, the order drawn and the workers
   started only when the first batch is asked for, after Lightning has moved to the new epoch.

Nothing may build the train loader through Lightning before the checkpoint is restored: Lightning
2.6 gives the loader its saved state only when it builds the loader after the restore (issue
Lightning-AI/pytorch-lightning#20550), and ``trainer.estimated_stepping_batches`` in
``configure_optimizers`` builds it before, unless ``max_epochs=-1``. Tasks count their schedule's
steps with ``planned_optimizer_steps`` instead, which asks the DataModule for a loader of its own.

Without ``load_state_dict`` (a fresh run, or Lightning resuming an epoch-based run from a finished
epoch) the loader is an ordinary shuffled, drop-last loader over epoch ``trainer.current_epoch``.
Any DataModule can use the same three pieces for its training data::

    sampler = ResumableSampler(len(dataset), seed=seed, num_replicas=trainer.world_size, rank=trainer.global_rank)
    ResumableDataLoader(SeededView(dataset), sampler=sampler, batch_size=b, drop_last=True, trainer=trainer)
"""

import contextlib
import math
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

if TYPE_CHECKING:
    import lightning.pytorch as pl


class ResumableSampler(DistributedSampler):
    """This rank's ``(index, sample_seed)`` keys for one epoch, from ``(seed, epoch)`` alone.

    ``set_epoch`` picks the epoch; iteration leaves out the epoch's first ``start`` keys (a
    ``ResumableDataLoader`` sets it when it resumes an epoch). It subclasses ``DistributedSampler``
    so that Lightning under DDP keeps it instead of wrapping it in a sampler of its own; the tail of
    the permutation that does not divide evenly among the ``num_replicas`` ranks is dropped.
    """

    def __init__(self, dataset_size: int, *, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(
            range(dataset_size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.start = 0

    def epoch_keys(self) -> list[tuple[int, int]]:
        """This rank's whole key sequence for the current epoch (ignores ``start``)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)
        sample_seeds = torch.randint(2**62, (len(self.dataset),), generator=generator)
        shard = slice(self.rank, self.total_size, self.num_replicas)
        return list(zip(order[shard].tolist(), sample_seeds[shard].tolist()))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.epoch_keys()[self.start :])


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed the global torch (CPU), ``random`` and numpy RNGs; restore their states on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class SeededView(Dataset):
    """``dataset`` read with ``(index, sample_seed)`` keys from a ``ResumableSampler``.

    A batch's random transforms draw from global RNGs seeded by the batch's first sample seed, so a
    batch is the same whichever process loads it and whatever ran before it. One seeding per batch
    rather than per sample, because seeding and restoring the three RNGs takes about 0.1 ms, several
    times as long as reading one in-memory image.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        with seeded_global_rngs(keys[0][1]):
            return [self.dataset[index] for index, _ in keys]


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ``ResumableSampler`` (with ``batch_size``) whose position Lightning checkpoints.

    ``state_dict()`` is ``{"epoch": e, "batches_done": k}``: k batches of epoch e have been handed
    out. After ``load_state_dict()``, the next pass resumes at batch k if it is a pass over epoch e,
    and starts at batch 0 otherwise (the checkpoint was taken when epoch e had ended).

    With ``trainer`` (a Lightning Trainer) each pass runs epoch ``trainer.current_epoch``, read when
    the pass starts, whatever the sampler's ``set_epoch`` was last told: Lightning 2.6 calls
    ``set_epoch`` with ``fit_loop.epoch_progress.current.processed``, which stays one ahead of
    ``trainer.current_epoch`` after a resume from a checkpoint saved in ``on_train_epoch_end``
    (Lightning replays the end of the saved epoch as an epoch without batches), and would give the
    resumed run another epoch's order than the uninterrupted run's. Without ``trainer`` the epoch is
    the sampler's, set with ``sampler.set_epoch``.
    """

    def __init__(self, *args: Any, trainer: "pl.Trainer | None" = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.trainer = trainer
        self._epoch, self._batches_done = self.sampler.epoch, 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        return self._counted_batches()  # a generator: nothing runs until the first batch is asked for

    def _counted_batches(self) -> Iterator[Any]:
        if self.trainer is not None:
            self.sampler.set_epoch(self.trainer.current_epoch)
        resume, self._resume = self._resume, None
        resumes = resume is not None and resume["epoch"] == self.sampler.epoch
        self._epoch, self._batches_done = self.sampler.epoch, resume["batches_done"] if resumes else 0
        self.sampler.start = self._batches_done * self.batch_size
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch, self._batches_done = state["epoch"], state["batches_done"]
        self._resume = dict(state)


def planned_optimizer_steps(trainer: "pl.Trainer") -> int:
    """The optimizer steps ``trainer.fit`` will take, as ``trainer.estimated_stepping_batches`` counts
    them (max_steps, max_epochs, limit_train_batches, accumulate_grad_batches), without building the
    train loader through Lightning's fit loop (see the module docstring): the length of an epoch
    comes from a loader of the DataModule's own, which is only measured, never iterated."""
    if trainer.max_epochs == -1:  # step-based: max_steps is set (the app refuses both at -1)
        return trainer.max_steps
    if trainer.datamodule is None:
        raise TypeError("planned_optimizer_steps needs trainer.fit(..., datamodule=...): the schedule's length "
                        "comes from the DataModule's train_dataloader(); pass the data as a DataModule")
    batches = len(trainer.datamodule.train_dataloader())
    limit = trainer.limit_train_batches
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
    return steps if trainer.max_steps == -1 else min(steps, trainer.max_steps)


class EpochPrefixSampler(ResumableSampler):
    """A ``ResumableSampler`` whose epoch is the first ``per_epoch`` keys of its permutation of the
    whole set (each rank: its shard's first ``per_epoch // num_replicas``), so a large set is seen a
    fresh random part at a time, each part a function of ``(seed, epoch)`` (the LM's
    ``blocks_per_epoch``, the SSL views' ``images_per_epoch``)."""

    def __init__(self, dataset_size: int, *, per_epoch: int, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset_size, seed=seed, num_replicas=num_replicas, rank=rank)
        self.num_samples = min(self.num_samples, per_epoch // num_replicas)  # DistributedSampler's len

    def epoch_keys(self) -> list[tuple[int, int]]:
        return super().epoch_keys()[: self.num_samples]
