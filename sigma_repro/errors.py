"""The one error type for bad user input.

Raised before any compute; its message says what was expected, what was found and what to do.
The Hydra app prints it without a traceback.
"""


class ConfigError(ValueError):
    """User input (config, data path, option combination) that cannot work."""
