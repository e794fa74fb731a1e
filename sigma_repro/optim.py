"""Optimizers, parameter groups and learning-rate schedules shared by every task.

The optimizer itself comes from the ``optim/`` config (``_target_`` = a torch or timm optimizer class;
LARS and LAMB are timm's). This module decides which parameters decay and gives σReparam's γ its own
group, because the paper's recipes differ exactly there: γ can be driven to zero by Adam at a high
learning rate unless it gets a smaller learning rate or is kept out of weight decay.
``check_optim_config`` refuses an ``optim`` config that cannot build its optimizer; the app calls it
before any data is read (``sigma_repro.train.validate_config``).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import hydra.utils
import torch
from timm.optim import Lars
from torch import nn

from sigma_repro.errors import ConfigError
from sigma_repro.reparam import gamma_parameters


def parameter_groups(
    module: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    gamma_lr_mult: float = 1.0,
    gamma_weight_decay: bool = False,
) -> list[dict[str, Any]]:
    """Split every trainable parameter of ``module`` into decay / no-decay groups plus a γ group.

    ``module`` is what trains: a task passes itself, so heads and losses with parameters that live on
    the task (projection heads, CTC layers) train with the model. Matrices (ndim >= 2) decay; biases,
    norm scales and the tokens any submodule lists in ``no_weight_decay()`` (timm: pos_embed, cls_token)
    do not. σReparam's γ gets ``lr * gamma_lr_mult`` and decays only when ``gamma_weight_decay`` is set.
    Empty groups are dropped.
    """
    gamma_ids = {id(p) for p in gamma_parameters(module)}
    skip = {f"{prefix}.{name}" if prefix else name
            for prefix, sub in module.named_modules() if callable(getattr(sub, "no_weight_decay", None))
            for name in sub.no_weight_decay()}
    decay, no_decay, gamma = [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in gamma_ids:
            gamma.append(p)
        elif p.ndim < 2 or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        {
            "name": "gamma",
            "params": gamma,
            "lr": lr * gamma_lr_mult,
            "weight_decay": weight_decay if gamma_weight_decay else 0.0,
        },
    ]
    return [g for g in groups if g["params"]]


def check_optim_config(optim: Mapping[str, Any]) -> None:
    """The ``optim`` config can build its optimizer: ``_target_`` imports, every other key is an argument
    of it (the parameter groups are the app's), ``lr`` is a positive number and ``weight_decay`` (when
    set) a number >= 0. A zero learning rate is refused: such a run trains nothing. Raises ConfigError."""
    target = optim.get("_target_")
    try:
        optimizer_class = hydra.utils.get_class(target)
    except Exception as error:  # noqa: BLE001 - Hydra raises ImportError, ValueError or its own errors
        raise ConfigError(
            f"optim._target_ must name an optimizer class, e.g. torch.optim.AdamW; found {target!r}, which does "
            f"not import ({error}). Fix the name, or pick optim=<one of conf/optim>."
        ) from error
    signature = inspect.signature(optimizer_class)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        arguments = [name for name in signature.parameters if name != "params"]
        for key in optim:
            if key != "_target_" and key not in arguments:
                close = difflib.get_close_matches(key, arguments, n=1)
                raise ConfigError(
                    f"optim.{key} is not an argument of {target}; its arguments are {arguments}. "
                    f"{f'Did you mean optim.{close[0]}? ' if close else ''}Fix the name or drop optim.{key}."
                )
    _check_number(optim, "lr", zero_ok=False)
    if "weight_decay" in optim:
        _check_number(optim, "weight_decay", zero_ok=True)


def _check_number(optim: Mapping[str, Any], key: str, *, zero_ok: bool) -> None:
    value = optim.get(key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isfinite(number) and (number > 0 or (zero_ok and number == 0)):
        return
    why = " (a zero learning rate trains nothing)" if number == 0 else ""
    raise ConfigError(f"optim.{key} must be a number {'>=' if zero_ok else '>'} 0; found {value!r}{why}. "
                      f"Set e.g. optim.{key}={'0.05' if zero_ok else '1e-3'}.")


def build_optimizer(
    module: nn.Module,
    optim: dict[str, Any],
    *,
    gamma_lr_mult: float = 1.0,
    gamma_weight_decay: bool = False,
) -> torch.optim.Optimizer:
    """Instantiate the ``optim`` config (``_target_``, ``lr``, ``weight_decay``, ...) on ``module``'s groups,
    after ``check_optim_config``."""
    check_optim_config(optim)
    cfg = dict(optim)
    lr, weight_decay = float(cfg["lr"]), float(cfg.get("weight_decay", 0.0))
    groups = parameter_groups(
        module,
        lr=lr,
        weight_decay=weight_decay,
        gamma_lr_mult=gamma_lr_mult,
        gamma_weight_decay=gamma_weight_decay,
    )
    optimizer = hydra.utils.instantiate(cfg, params=groups, _convert_="all")
    if isinstance(optimizer, Lars):
        # LARS scales each matrix's step by its trust ratio. timm applies it only to groups with
        # weight decay unless always_adapt, which would make LARS without weight decay (the paper's
        # no-wd recipe) plain SGD; biases, norms and γ keep the plain step, as in LARS practice.
        for group in optimizer.param_groups:
            group["always_adapt"] = group["name"] == "decay"
    return optimizer


def _cosine(schedule: WarmupSchedule, step: int) -> float:
    progress = min(1.0, (step - schedule.warmup_steps) / max(1, schedule.total_steps - schedule.warmup_steps))
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _constant(schedule: WarmupSchedule, step: int) -> float:
    return 1.0


def _inverse_sqrt(schedule: WarmupSchedule, step: int) -> float:
    # fairseq's inverse_sqrt after warmup: peak * sqrt(warmup / n) at update n = step + 1. Without warmup
    # (ours: fairseq divides by warmup_updates=0) the peak at the first step, then peak * sqrt(1 / n).
    return math.sqrt(max(1, schedule.warmup_steps) / (step + 1))


@dataclass
class WarmupSchedule:
    """Learning-rate factor per optimizer step (``step`` = optimizer steps already taken, 0 for the
    first): linear warmup, then a decay from ``DECAYS``.

    ``warmup_steps=0`` is "no warmup", the setting the paper trains SGD/LARS ViTs under with
    σReparam. Warmup rises linearly to 1 at ``warmup_steps`` (step 0 already gets 1/warmup_steps so no
    step is wasted at lr 0). Then, by ``decay``:
    - ``cosine``: down to ``min_lr_ratio`` at ``total_steps``;
    - ``constant``: 1;
    - ``inverse_sqrt``: fairseq's inverse-square-root schedule (Admin's and DeepNorm's WMT recipes),
      sqrt(warmup_steps / n) at update n = step + 1. With the warmup above, the factor of step s is
      fairseq's after s + 1 updates: the same curve one update earlier, since fairseq spends its first
      update at lr 0. fairseq does not define ``warmup_steps=0`` (it divides by it); here it is ours:
      the peak at the first step, then sqrt(1 / (step + 1)) (the same as ``warmup_steps=1``).
      ``min_lr_ratio`` is not used.
    A plain dataclass of numbers, so LambdaLR's state_dict stays weights_only-loadable.
    """

    total_steps: int
    warmup_steps: int = 0
    decay: str = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ConfigError(f"schedule.decay must be one of {', '.join(map(repr, DECAYS))}, got {self.decay!r}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.warmup_steps >= self.total_steps:
            raise ConfigError(
                f"schedule.warmup_steps={self.warmup_steps} is not below the run's {self.total_steps} "
                f"optimizer steps: lower the warmup or train longer (trainer.max_steps / max_epochs)."
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return DECAYS[self.decay](self, step)


# schedule.decay: the factor at an optimizer step after warmup (``step >= warmup_steps``).
DECAYS: dict[str, Callable[[WarmupSchedule, int], float]] = {
    "cosine": _cosine,
    "constant": _constant,
    "inverse_sqrt": _inverse_sqrt,
}


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: dict[str, Any], total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR from the ``schedule`` config (warmup_steps, decay, min_lr_ratio)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(total_steps=total_steps, **schedule))
