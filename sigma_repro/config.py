"""Config helpers the YAML files call: run identity and small arithmetic, as OmegaConf resolvers.

Registered on import of ``sigma_repro`` so that composing conf/ works from the app, tests and tools.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sigma_repro.errors import ConfigError

# The Hydra app's configs: conf/ at the top of a checkout (editable install, PYTHONPATH); inside the
# package in a wheel or `pip install .`, where pyproject.toml ships conf/ as sigma_repro/conf.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).resolve().parent.parent / "conf"
_MAX_DIRNAME = 120
CONFIG_PATH_ENV = "SIGMA_REPRO_CONFIG_PATH"


def user_config_dirs() -> list[Path]:
    """The config dirs a user adds to the app's (``SIGMA_REPRO_CONFIG_PATH``, ``os.pathsep``-separated):
    their own tasks, models, data, experiments and tables, composed as if they were in conf/."""
    dirs = [Path(d).expanduser() for d in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if d]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise ConfigError(f"{CONFIG_PATH_ENV} names config dirs that do not exist: {missing}; "
                         f"fix the path or unset {CONFIG_PATH_ENV}")
    return dirs


def _search_path() -> list[str]:
    """``hydra.searchpath`` from SIGMA_REPRO_CONFIG_PATH (``hydra.searchpath=[...]`` on the command line
    replaces it)."""
    return [f"file://{d.resolve()}" for d in user_config_dirs()]


OmegaConf.register_new_resolver("sr_config_path", _search_path, replace=True)


_NUMBER = re.compile(r"(?<=[=,])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?=,|$)")


def _canonical_number(match: re.Match) -> str:
    text = match.group(0)
    return text.lstrip("+") if text.lstrip("+-").isdigit() else repr(float(text))


# Hydra's override grammar reads true/false/null in any case; a sweep writes them back as True, False, null.
_BOOL_OR_NULL = re.compile(r"(?<=[=,])(?i:true|false|null)(?=,|$)")


def job_dir_name(experiment: str | None, override_dirname: str, seed: Any) -> str:
    """``<experiment>/<overrides>/seed=<seed>``: same command, same dir; long override lists get a hash.

    Numbers, booleans and null are written in one form: ``optim.lr=1e-3`` and a sweep's ``0.001`` give
    the same dir, as do ``trainer.deterministic=true`` and a sweep's ``True`` (lowercase, as typed on a
    command line: the run dirs of committed results have no booleans, so none of them moves). ``None``
    is left alone: Hydra reads it as the string "None", not as null.
    """
    canonical = _BOOL_OR_NULL.sub(lambda m: m.group(0).lower(), _NUMBER.sub(_canonical_number, override_dirname))
    overrides = re.sub(r"[^A-Za-z0-9_.,=+\-]", "_", canonical) or "default"
    if len(overrides) > _MAX_DIRNAME:
        digest = hashlib.sha1(canonical.encode()).hexdigest()[:10]
        overrides = f"{overrides[:_MAX_DIRNAME - 11]}~{digest}"
    return f"{experiment or 'default'}/{overrides}/seed={seed}"


OmegaConf.register_new_resolver("sr_job_dir", job_dir_name, replace=True)


def _mul(a: Any, b: Any) -> float:
    """${sr_mul:a,b} = a*b: a table's learning-rate grid is a multiplier on each cell's base rate."""
    return float(a) * float(b)


OmegaConf.register_new_resolver("sr_mul", _mul, replace=True)
