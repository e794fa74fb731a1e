"""Model converters: the transform the ``reparam`` config group applies to a freshly built model.

The shape of torchtitan's model converters: a config-instantiated object whose ``convert(model)``
runs after the model is built (and any checkpoint surgery) and before the optimizer,
torch.compile and DDP. ``reparam=none`` is ``NoReparam``, ``reparam=sigma`` / ``sigma_stats`` are
``SigmaReparamConverter``; the app calls ``convert`` and reads ``optimizer_options()``, and knows
nothing else of either. Removing norm layers is not a converter's business: it is the model's
``norm`` setting (pre | post | none), read by the models, the W&B tags and the tables alike.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from sigma_repro.errors import ConfigError
from sigma_repro.reparam import apply_sigma_reparam

# The plugin's options a config may set; `remove_norms` is the model's `norm: none` in the app.
PLUGIN_OPTIONS = tuple(
    name for name, p in inspect.signature(apply_sigma_reparam).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "remove_norms"
)


class NoReparam:
    """``reparam=none``: the model as built; γ options do not exist."""

    def __init__(self, *, name: str = "none", **unexpected: Any) -> None:
        if unexpected:
            raise ConfigError(
                f"reparam=none takes no σReparam options, found {sorted(unexpected)}; "
                f"use reparam=sigma (or reparam=sigma_stats) to set them, or drop them")
        self.name = name

    def convert(self, model: nn.Module) -> nn.Module:
        return model

    def optimizer_options(self) -> dict[str, Any]:
        return {}


class SigmaReparamConverter:
    """``reparam=sigma``: ``apply_sigma_reparam(model, **plugin_options)`` (see sigma_repro.reparam),
    and γ's optimizer settings (``gamma_lr_mult``, ``gamma_weight_decay``) for the task."""

    def __init__(self, *, name: str = "sigma", gamma_lr_mult: float = 1.0, gamma_weight_decay: bool = False,
                 **plugin_options: Any) -> None:
        unknown = sorted(set(plugin_options) - set(PLUGIN_OPTIONS))
        if unknown:
            hint = (" (norm layers are the model's setting: model.norm=none)" if "remove_norms" in unknown else "")
            raise ConfigError(f"unknown σReparam option(s) {unknown}; the options are {list(PLUGIN_OPTIONS)}, "
                              f"gamma_lr_mult and gamma_weight_decay{hint}")
        if not gamma_lr_mult > 0:
            raise ConfigError(f"reparam.gamma_lr_mult must be a positive number (γ's lr = optim.lr × it), "
                              f"found {gamma_lr_mult!r}")
        self.name = name
        self.gamma_lr_mult, self.gamma_weight_decay = float(gamma_lr_mult), bool(gamma_weight_decay)
        self.plugin_options = plugin_options

    def convert(self, model: nn.Module) -> nn.Module:
        return apply_sigma_reparam(model, **self.plugin_options)

    def optimizer_options(self) -> dict[str, Any]:
        return {"gamma_lr_mult": self.gamma_lr_mult, "gamma_weight_decay": self.gamma_weight_decay}
