"""Checks on user input that need no data and no model: run before anything is read, built or launched.

``sigma_repro.train.validate_config`` calls the ``check_*`` functions on the composed config; each
raises ``ConfigError`` whose message says what was expected, what was found and what to do. The
runs dir is checked earlier, by the Hydra callback ``RunsDirCheck`` (conf/train.yaml,
``hydra.callbacks``): Hydra creates the job dir before the app's code runs. Checks that need the
data (the training set's size, unreadable files) live in the DataModules; the optimizer's arguments
are checked by ``sigma_repro.optim.check_optim_config``.
"""

from __future__ import annotations

import netrc
import os
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sigma_repro.errors import ConfigError

MAX_SEED = 2**32 - 1  # numpy's seed range; Lightning's seed_everything seeds numpy too


def check_required_values(cfg: DictConfig, choices: dict[str, Any]) -> None:
    """Every ``???`` in the composed config has been given a value (``choices``: Hydra's group choices)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        groups = sorted({key.split(".")[0] for key in missing} & set(choices))
        chosen = ", ".join(f"{g}={choices[g]} (conf/{g}/{choices[g]}.yaml)" for g in groups)
        raise ConfigError(
            f"{', '.join(missing)} must be set and {'has' if len(missing) == 1 else 'have'} no value"
            f"{f' in {chosen}' if chosen else ''}, whose comments say what is expected. "
            f"Set {'it' if len(missing) == 1 else 'them'} on the command line, e.g. {missing[0]}=<value>."
        )


def check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(
            f"seed must be a whole number from 0 to {MAX_SEED} (numpy's seed range); found {seed!r}. "
            f"Pick one in that range, e.g. seed=1."
        )


def check_batch_size(data_cfg: DictConfig) -> None:
    """``data.batch_size``, where the data config has one, is a whole number >= 1 (the upper bound,
    the training set's size, is checked by the DataModule once it has read the data)."""
    size = data_cfg.get("batch_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(
            f"data.batch_size must be a whole number from 1 to the training set's size (images per device "
            f"and step); found {size!r}. Set it in that range, e.g. data.batch_size=128."
        )


def check_trainer(trainer_cfg: DictConfig) -> None:
    """``trainer.precision`` is one Lightning knows, ``trainer.accelerator`` exists on this machine,
    and ``trainer.devices`` asks for no more devices than it has (a CPU run with devices=N starts N
    processes, each a full copy of the run: capped at the number of CPU cores)."""
    _check_precision(trainer_cfg.get("precision", "32-true"))
    kind = _accelerator_kind(trainer_cfg.get("accelerator", "auto"))
    _check_device_count(trainer_cfg.get("devices", "auto"), kind)


def _check_precision(precision: Any) -> None:
    from lightning.fabric.connector import _PRECISION_INPUT  # the values Lightning's Trainer accepts

    allowed = [value for literal in typing.get_args(_PRECISION_INPUT) for value in typing.get_args(literal)]
    if precision not in allowed:
        raise ConfigError(
            f"trainer.precision must be one of {allowed}; found {precision!r}. Use 32-true on CPUs, "
            f"bf16-mixed on recent GPUs."
        )


def _accelerator_kind(accelerator: Any) -> str:
    """The device kind ``trainer.accelerator`` selects on this machine: cpu, cuda, mps or tpu."""
    import torch
    from lightning.pytorch.accelerators import AcceleratorRegistry

    available = {name: entry["accelerator"].is_available() for name, entry in AcceleratorRegistry.items()}
    if accelerator == "auto":
        return next((name for name in ("cuda", "mps") if available.get(name)), "cpu")
    if accelerator == "gpu":
        kind = next((name for name in ("cuda", "mps") if available.get(name)), None)
    elif accelerator in available:
        kind = accelerator if available[accelerator] else None
    else:
        raise ConfigError(
            f"trainer.accelerator must be auto, gpu or one of {sorted(available)}; found {accelerator!r}. "
            f"Use trainer.accelerator=auto to take the GPU when there is one."
        )
    if kind is None:
        cuda = (f"CUDA {torch.version.cuda}, torch.cuda.is_available() is False" if torch.version.cuda
                else f"torch {torch.__version__} is built without CUDA")
        raise ConfigError(
            f"trainer.accelerator={accelerator} asks for a device this machine does not have ({cuda}); "
            f"available here: {sorted(name for name, ok in available.items() if ok)}. "
            f"Use trainer.accelerator=cpu (or auto), or run on a machine with a GPU."
        )
    return kind


def _check_device_count(devices: Any, kind: str) -> None:
    """``trainer.devices``: on CPU a process count (or auto); on CUDA a count, -1 or auto (all of
    them), or device ids as a list or "0,1"."""
    import torch

    if devices == "auto" or kind not in ("cpu", "cuda"):
        return
    if kind == "cpu":
        have, count = os.cpu_count() or 1, _as_count(devices)
        if count is None or not 1 <= count <= have:
            raise ConfigError(
                f"trainer.devices on CPU is a number of processes, each a full copy of the run: a whole number "
                f"from 1 to {have} (this machine's CPU cores), or auto; found {devices!r}. Lower "
                f"trainer.devices (one process already uses every core through its threads)."
            )
        return
    have = torch.cuda.device_count()
    if OmegaConf.is_list(devices) or (isinstance(devices, str) and "," in devices):
        ids = list(devices) if OmegaConf.is_list(devices) else devices.split(",")
        bad = [i for i in ids if _as_count(i) is None or _as_count(i) >= have]
        if bad or not ids:
            raise ConfigError(
                f"trainer.devices={devices} must name GPU ids from 0 to {have - 1} (this machine has {have} CUDA "
                f"GPUs); found ids {bad or 'none'} that do not exist. Name existing ids, or give a count."
            )
    elif devices not in (-1, "-1") and not 1 <= (_as_count(devices) or 0) <= have:
        raise ConfigError(
            f"trainer.devices must be a count from 1 to {have} (this machine's CUDA GPUs), -1 or auto (all of "
            f"them), or a list of GPU ids; found {devices!r}. Lower trainer.devices, or run on a machine with "
            f"more GPUs."
        )


def _as_count(value: Any) -> int | None:
    """``value`` as a whole number >= 0 (an int or a string of digits), else None."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def check_wandb(logger_cfg: DictConfig) -> None:
    """An online W&B logger needs credentials: without them wandb.init asks for a key on a terminal
    and fails (or waits) elsewhere. Looked for as wandb does: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE,
    or a .netrc entry for the W&B host (what ``wandb login`` writes)."""
    wb = logger_cfg.get("wandb", {})
    if not wb.get("enabled"):
        return
    mode = os.environ.get("WANDB_MODE") or wb.get("mode", "offline")  # the app lets the environment win
    modes = ("online", "offline", "disabled", "dryrun", "run", "shared")
    if mode not in modes:
        raise ConfigError(f"WANDB_MODE (or logger.wandb.mode) must be one of {list(modes)}; found {mode!r}. "
                          f"Use offline (the default: `wandb sync` uploads later).")
    if mode in ("offline", "disabled", "dryrun") or _wandb_credentials():
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    raise ConfigError(
        f"W&B mode {mode!r} needs credentials for {host}, and none were found (no WANDB_API_KEY, no "
        f"WANDB_IDENTITY_TOKEN_FILE, no .netrc entry for {host}). Log in with `wandb login` (or set "
        f"WANDB_API_KEY), or log offline (WANDB_MODE=offline; `wandb sync` uploads later), or use "
        f"logger=csv."
    )


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_runs_dir(job_dir: str | Path, key: str, value: Any) -> None:
    """The job dir ``job_dir`` can be created and takes files; ``key=value`` is the setting that put it there."""
    path = Path(job_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
        found = (f"{existing} is a file, not a directory" if not existing.is_dir() else
                 f"{error.strerror or type(error).__name__} ({error.filename or job_dir})")
        also = " (or set SIGMA_REPRO_RUNS)" if key == "paths.runs_dir" else ""
        raise ConfigError(
            f"{key}={value} must be a writable directory (the run's files go to {job_dir}); found {found}. "
            f"Point {key} at a writable directory{also}."
        ) from error


class RunsDirCheck(Callback):
    """Hydra callback: the dir a run (``hydra.run.dir``) or a sweep (``hydra.sweep.dir``) writes to
    is checked before Hydra creates it, which it would do with a raw traceback on failure. The
    message goes to stderr and the process exits 1: Hydra prints any exception from here with its
    traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # the job dir reads ${hydra:...}, as in run_job
        overridden = any(o.startswith(f"{key}=") for o in config.hydra.overrides.hydra)
        setting = (key, OmegaConf.select(config, key)) if overridden else ("paths.runs_dir", config.paths.runs_dir)
        try:
            check_runs_dir(OmegaConf.select(config, key), *setting)
        except ConfigError as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"sigma-repro: {error}", file=sys.stderr, flush=True)
            sys.exit(1)
