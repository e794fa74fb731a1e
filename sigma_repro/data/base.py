"""What the training app needs from every DataModule, whatever the family.

The app never knows the shape of a family's data: a DataModule publishes the constructor arguments
its data fixes for the model (``model_kwargs``: image size and classes, vocabulary size, feature
dimension...) and for the task (``task_kwargs``), and the app passes them on unread. A new family
adds a DataModule, a model and a task, and touches no line of ``sigma_repro/train.py``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np


class StabilityDataModule(pl.LightningDataModule):
    """Base of every DataModule the app instantiates (``data=<name>``).

    Subclasses read and check their files in the constructor (a ``ConfigError`` before any compute),
    and implement ``model_kwargs``, ``task_kwargs`` and ``probe_batch(n)`` (the fixed batch the
    diagnostics probe, in whatever form the family's task turns into model inputs); ``describe()``
    adds facts about the data to the run summary.
    """

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments the data fixes for the model config's ``_target_``."""
        raise NotImplementedError

    @property
    def task_kwargs(self) -> dict[str, Any]:
        """Keyword arguments the data fixes for the task config's ``_target_``."""
        raise NotImplementedError

    def probe_batch(self, n: int) -> Any:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the run summary records about the data under ``data`` (JSON values): the facts a
        reader needs to know two runs saw the same data (corpus size and hash, interpreter version
        of an embedded corpus, tokenizer). Default: nothing beyond the config."""
        return {}


# --- helpers every family's option checks and validation subsets share ----------------------------


def is_whole(value: Any) -> bool:
    """True for an int that is not a bool (a YAML ``true`` must not pass as a count of 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def evenly_spaced(count: int, keep: int | None) -> np.ndarray:
    """``keep`` of ``range(count)`` (all when null or more), evenly spaced, first and last included."""
    if keep is None or keep >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, keep).round().astype(np.int64))
