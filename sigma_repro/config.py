"""Config helpers the YAML files call: run identity and small arithmetic, as OmegaConf resolvers.

Registered on import of ``sigma_repro`` so that composing conf/ works from the app, tests and tools.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# The Hydra app's configs: conf/ at the top of a checkout (editable install, PYTHONPATH); inside the
# package in a wheel or `pip install .`, where pyproject.toml ships conf/ as sigma_repro/conf.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = _PACKAGED_CONF if _PACKAGED_CONF.is_dir() else Path(__file__).resolve().parent.parent / "conf"
_MAX_DIRNAME = 120


_NUMBER = re.compile(r"(?<=[=,])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?=,|$)")


def _canonical_number(match: re.Match) -> str:
    text = match.group(0)
    return text.lstrip("+") if text.lstrip("+-").isdigit() else repr(float(text))


def job_dir_name(experiment: str | None, override_dirname: str, seed: Any) -> str:
    """``<experiment>/<overrides>/seed=<seed>``: same command, same dir; long override lists get a hash.

    Numbers are written in one form (``optim.lr=1e-3`` and a sweep's ``0.001`` give the same dir).
    """
    canonical = _NUMBER.sub(_canonical_number, override_dirname)
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
