"""The one error type for bad user input.

Raised before any compute; its message says what was expected, what was found and what to do.
The Hydra app prints it without a traceback.
"""


class ConfigError(ValueError):
    """User input (config, data path, option combination) that cannot work."""


class RunInterrupted(Exception):
    """A run stopped by a signal (SIGTERM, SIGUSR2, SIGINT) after saving a checkpoint: not a failure,
    and not finished. ``run()`` records status "interrupted" with the step; the same command resumes."""

    def __init__(self, signal_name: str, step: int) -> None:
        super().__init__(f"interrupted by {signal_name} at step {step}; a checkpoint was saved, "
                         f"the same command resumes from it")
        self.signal_name, self.step = signal_name, step
