"""Train or eval mode for one pass, undone afterwards: probes and profiling leave a model as they found it.

``model.eval()`` / ``model.train()`` alone would lose the mix of modes a training loop may have set
(a frozen, eval-mode backbone inside a training model), so every module's own flag is saved and
restored, also on error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def module_mode(model: nn.Module, *, training: bool) -> Iterator[nn.Module]:
    """``model`` in train (``training=True``) or eval mode inside the context."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.train(training)
        yield model
    finally:
        for m, was_training in modes.items():
            m.training = was_training


def eval_mode(model: nn.Module):
    """``module_mode(model, training=False)``: the probes' mode (no dropout, no power steps)."""
    return module_mode(model, training=False)
