"""Test-only pieces injected into real runs through Hydra overrides."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """SIGKILLs the training process once ``trainer.global_step`` reaches ``step``: a real hard kill at
    a deterministic point. It runs before the checkpoint callback of that step, so the last checkpoint
    is the one before ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
