"""Eval mode for a probe, undone afterwards: diagnostics must leave the model as they found it.

``model.eval()`` alone would lose the mix of modes a training loop may have set (a frozen,
eval-mode backbone inside a training model), so every module's own flag is saved and restored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the context; each module's train/eval flag restored on exit,
    also on error."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, training in modes.items():
            m.training = training
