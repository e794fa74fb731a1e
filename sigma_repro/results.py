"""`sigma-repro table <table>`: finished runs -> the paper's table, as Markdown and CSV with provenance.

Where the data comes from:
- ``conf/table/<table>.yaml`` says which runs the table expects: its cells
  (``hydra.sweeper.params.experiment``), every other key it sweeps (e.g. ``lr_scale`` over
  ``lr_grid``) and the seeds. ``--seeds`` / ``--lr-grid`` replace the table's swept ``seed`` / ``lr_scale``
  when the sweep was run with other ones.
- every ``summary.json`` under the runs dir (written by ``sigma-repro-train``, see sigma_repro/train.py)
  says what a run was (experiment, config-group choices such as scale, command-line overrides,
  resolved config) and how it ended.

Where it goes: ``<out>/<table>/<scale>.md`` and ``.csv``, one row per cell and value of each swept key:
the conditions the runs used (from their resolved configs), the metric's mean ± std over finished
seeds, and every expected seed accounted for as finished, diverged, failed, running, interrupted,
incomplete or missing. Nothing is dropped silently: runs of a cell with extra overrides (``trainer.max_steps=2``)
get rows of their own, runs at the other scale are counted in the header.

A table whose ``report:`` declares ``view: lr_stability`` (one that sweeps a learning-rate grid) is
also shown one row per cell: the largest learning rate that trained stably (mean over seeds), the
loss at each lr and where attention entropy collapsed (definitions: ``LrStabilityView``), first in
``<scale>.md``, in ``<scale>_lr_stability.csv``, and drawn in ``<scale>_loss_vs_lr.png``. One that
declares ``view: depth`` (cells at several depths) shows its metrics against depth, one line per scheme
(``DepthView``), first in ``<scale>.md``, in ``<scale>_depth.csv`` and drawn in ``<scale>_vs_depth.png``.
``report.entropy_groups`` adds one minimum-attention-entropy column per kind of attention layer
(encoder self-, decoder self-, cross-attention), matched by name.

``--records DIR`` keeps the table alive past its run dirs (a purged scratch disk, a fresh machine): every
ended run's summary.json is copied there (alone: no checkpoints or curves; absolute paths made relative, see
``record_summary``), and runs recorded there but gone from the runs dir are read back from it. Commit
``results/<table>/records`` beside the table and a later session adds seeds to the same table.

The run-reading helpers here (``find_runs``, ``runs_root``, ``metric_curve``) also serve
``sigma-repro compare``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from sigma_repro import provenance
from sigma_repro.config import CONF_DIR, user_config_dirs
from sigma_repro.errors import ConfigError
from sigma_repro.run_state import launch_gone

PAPER_REFERENCE = Path(__file__).resolve().parent.parent / "results" / "paper_reference.yaml"
RUN_STATES = ("finished", "diverged", "failed", "running", "interrupted", "incomplete")  # what a run dir can say
STATES = (*RUN_STATES, "missing")  # ... and an expected seed without a run dir
NOT_DONE = ("running", "interrupted", "incomplete", "missing")  # the seeds still to run (or to finish)
# A run that says "running" but has written nothing for this long is taken to be dead (killed hard,
# or waiting for a requeue): the CSV logger and checkpoints write at least every few minutes. On the
# host that ran it, a run whose process is gone is known dead at once (run_state.launch_gone).
STALE_AFTER_MIN = 30.0


# -- reading runs ---------------------------------------------------------------------------------
def runs_root(arg: str | None) -> Path:
    """The runs dir the app writes to: the argument, else $SIGMA_REPRO_RUNS, else ``runs``."""
    return Path(arg or os.environ.get("SIGMA_REPRO_RUNS") or "runs")


@lru_cache(maxsize=1)
def _non_identity_keys() -> frozenset[str]:
    """Override keys that do not change what a run computes: the app keeps them out of the run dir
    (conf/train.yaml, hydra.job.config.override_dirname.exclude_keys), so they never split a row."""
    train = OmegaConf.load(CONF_DIR / "train.yaml")
    return frozenset(train.hydra.job.config.override_dirname.exclude_keys)


def _identity_overrides(items: list[str]) -> dict[str, str]:
    """``key=value`` overrides (``+key``/``~key`` forms too) that select what a run computes."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key not in _non_identity_keys():
            out[key] = value
    return out


def _split_override_dirname(name: str) -> list[str]:
    """Hydra's ``override_dirname`` back into ``key=value`` items (it joins them with commas; a comma
    inside a value, as in a list, has no ``=`` after it)."""
    items: list[str] = []
    for part in ([] if name == "default" else name.split(",")):
        if "=" in part or not items:
            items.append(part)
        else:
            items[-1] += "," + part
    return items


@dataclass
class Run:
    """One run dir: its summary and what selects it (cell, scale, seed, identity overrides)."""

    dir: Path
    summary: dict[str, Any]
    experiment: str
    scale: str
    seed: int
    overrides: dict[str, str]

    @property
    def config(self) -> dict[str, Any]:
        return self.summary.get("config", {})

    def value(self, key: str) -> Any:
        """The run's value of a sweepable key: as overridden, else as resolved in its config."""
        if key in self.overrides:
            return self.overrides[key]
        node: Any = self.config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def state(self, now: float, stale_after_min: float = STALE_AFTER_MIN) -> str:
        """finished | diverged | failed | running | interrupted | incomplete (says running, but its
        process is gone from this host, or nothing was written lately)."""
        status = self.summary.get("status")
        written = [s for s in RUN_STATES if s != "incomplete"]
        if status not in written:
            raise ConfigError(f"{self.dir / 'summary.json'}: status {status!r} is not one of {', '.join(written)}; "
                              f"was it written by sigma-repro-train?")
        if status == "running" and (launch_gone(self.summary)
                                    or now - _last_write(self.dir) > stale_after_min * 60):
            return "incomplete"
        return status


def _last_write(run_dir: Path) -> float:
    return max(p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file())


def read_run(path: Path, root: Path) -> Run:
    """The run whose summary.json is ``path``. A summary without the run's identity (the "running"
    stub written before this app version recorded it there) has its cell, overrides and
    seed read back from the run dir's name, ``<root>/<experiment>/<override_dirname>/seed=<seed>``."""
    summary = json.loads(path.read_text())
    run_dir = path.parent
    if "experiment" in summary:
        experiment = summary["experiment"]
        overrides = _identity_overrides(summary.get("overrides", []))
        scale = summary.get("choices", {}).get("scale") or "full"
        seed = summary["seed"] if "seed" in summary else summary["config"]["seed"]
    else:
        parts = run_dir.relative_to(root).parts  # ValueError (reported as unreadable) outside root
        if len(parts) < 3 or not parts[-1].startswith("seed="):
            raise ValueError(f"a summary without identity, not at {root}/<experiment>/<overrides>/seed=<n>")
        experiment = "/".join(parts[:-2])
        overrides = _identity_overrides(_split_override_dirname(parts[-2]))
        scale = overrides.get("scale", "full")
        seed = int(parts[-1].removeprefix("seed="))
    overrides.pop("scale", None)  # a filter, not a row: scale=null composes the paper's (full) sizes
    return Run(run_dir, summary, experiment, scale, seed, overrides)


def find_runs(where: Path, root: Path | None = None) -> tuple[list[Run], list[str]]:
    """Every run under ``where`` (identity read relative to the runs ``root``, default ``where``),
    and a note for each summary.json that could not be read."""
    runs, unreadable = [], []
    for path in sorted(where.rglob("summary.json")):
        try:
            runs.append(read_run(path, root or where))
        except (OSError, ValueError, KeyError) as err:
            unreadable.append(f"{path}: {err}")
    return runs, unreadable


RECORDED = ("finished", "diverged", "failed")


def record_summary(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A run's summary as a record to commit: the same keys, with the paths this machine put in it made
    relative: the working dir's prefix dropped, the data cache written ``$SIGMA_REPRO_DATA``, the
    command's program by its name only; ``run_dir`` where the run lived, relative to the working dir."""
    from sigma_repro.data.tokenizers import data_cache_dir

    prefixes = [(f"{data_cache_dir().resolve()}", "$SIGMA_REPRO_DATA"), (f"{Path.cwd().resolve()}{os.sep}", "")]
    prefixes.sort(key=lambda pair: -len(pair[0]))  # the longer (more specific) first: a cache inside the working dir

    def relative(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: relative(value) for key, value in node.items()}
        if isinstance(node, list):
            return [relative(value) for value in node]
        if isinstance(node, str):
            for prefix, replacement in prefixes:
                node = node.replace(prefix, replacement)
        return node

    record = relative(summary)
    program, _, rest = str(record.get("command", "")).partition(" ")
    record["command"] = " ".join(filter(None, [Path(program).name, rest]))
    record["run_dir"] = os.path.relpath(run_dir.resolve(), Path.cwd().resolve())
    return record


def keep_records(runs: list[Run], records: Path, root: Path) -> list[Run]:
    """``runs`` (of the runs dir ``root``) with the ended ones recorded under ``records`` (same relative
    layout, summary.json only, rewritten when it changed), plus the runs recorded there whose run dir
    holds no run any more: a run dir that still exists always wins over its record."""
    if records.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"--records {records} is inside the runs dir {root}: its records would be read as runs. "
                          f"Keep them outside it, e.g. results/<table>/records.")
    for run in runs:
        if run.summary.get("status") in RECORDED:
            path = records / run.dir.relative_to(root) / "summary.json"
            text = json.dumps(record_summary(run.summary, run.dir), indent=1, sort_keys=True) + "\n"
            if not path.is_file() or path.read_text() != text:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    live = {_identity(run) for run in runs}
    recorded, _ = find_runs(records)
    return runs + [run for run in recorded if _identity(run) not in live]


def _identity(run: Run) -> tuple:
    return run.experiment, run.scale, run.seed, tuple(sorted(run.overrides.items()))


# Log keys renamed to one name per concept; runs logged before the rename are read under the new name.
LEGACY_KEY_PREFIXES = {"diag/attention_entropy": "diag/attn_entropy", "diag/attention_logit_norm": "diag/logit_norm"}


def _legacy_key(metric: str) -> str | None:
    for new, old in LEGACY_KEY_PREFIXES.items():
        if metric.startswith(new):
            return old + metric[len(new):]
    return None


def metric_curve(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric as logged in the run's metrics.csv (under its pre-rename key
    for older runs); empty if it was never logged."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        if metric not in (reader.fieldnames or []) and _legacy_key(metric) in (reader.fieldnames or []):
            metric = _legacy_key(metric)
        rows = [r for r in reader if r.get(metric)]
    return [int(float(r["step"])) for r in rows], [float(r[metric]) for r in rows]


# -- the table's expected runs --------------------------------------------------------------------
def table_names() -> list[str]:
    return sorted(table_files())


def table_files() -> dict[str, Path]:
    """Every table config, ``conf/table/<name>.yaml`` in the app's configs and in the user's
    (SIGMA_REPRO_CONFIG_PATH); the app's win on a name clash, as in Hydra's search path."""
    files: dict[str, Path] = {}
    for root in [CONF_DIR, *user_config_dirs()]:
        for path in sorted((root / "table").glob("*.yaml")):
            files.setdefault(path.stem, path)
    return files


def _values(raw: Any) -> list[str]:
    """A sweep value (``0,1,2`` or one scalar) as a list of canonical strings."""
    return [_canon(v) for v in str(raw).split(",")]


def _canon(value: Any) -> str:
    """One spelling per value, so ``lr_scale=1``, ``1.0`` and the grid's ``1`` meet in one row."""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


@dataclass
class Metric:
    """A summary metric a table reports, and which way is better."""

    name: str
    higher_is_better: bool


@dataclass
class TableSpec:
    """What a table expects (cells in row order, other swept keys with their values, seeds) and what
    it reports (its ``report:`` block: metrics, the first being the headline, condition columns and
    entropy groups)."""

    name: str
    cells: list[str]
    axes: dict[str, list[str]]
    seeds: list[int]
    metrics: list[Metric]
    columns: list[str]
    view: LrStabilityView | DepthView | None = None  # report.view: a second view of the same runs (below)
    # report.entropy_groups: column name -> fnmatch pattern of attention layer names (summary.json
    # attention_entropy.layers); each group's minimum attention entropy gets a column
    entropy_groups: dict[str, str] = field(default_factory=dict)


def _run_norm(run: Run) -> str:
    # model.norm (pre | post | none); runs from before that setting said no-norm as reparam.remove_norms
    norm = run.config["model"].get("norm")
    return norm or ("none" if run.config["reparam"].get("remove_norms") else "pre")


# Condition columns a table may list in its report (name -> the value a run's config gives it).
CONDITIONS: dict[str, Callable[[Run], Any]] = {
    "optimizer": lambda r: r.summary.get("choices", {}).get("optim"),
    "lr": lambda r: f"{r.config['optim']['lr']:.3g}",
    "warmup": lambda r: "warmup" if r.config["schedule"]["warmup_steps"] > 0 else "no-warmup",
    "weight_decay": lambda r: f"{r.config['optim'].get('weight_decay', 0.0):g}",
    "norm": _run_norm,
    "reparam": lambda r: r.config["reparam"]["name"],
    "depth": lambda r: r.config["model"].get("depth"),
    "scheme": lambda r: r.config["model"].get("scheme"),   # residual scheme: standard | admin | deepnorm | scaled ...
    "model": lambda r: r.summary.get("choices", {}).get("model"),
    # the model's class: at scale=proxy every cell's model choice reads "proxy"
    "arch": lambda r: str(r.config["model"].get("_target_", "")).rsplit(".", 1)[-1] or None,
}


def _report(name: str, report: dict[str, Any] | None) -> tuple[list[Metric], list[str]]:
    """The table's ``report:`` block: ``metrics`` ([{name, higher_is_better}], headline first) and
    ``columns`` (names in CONDITIONS)."""
    where = f"conf/table/{name}.yaml"
    if not report or not report.get("metrics"):
        raise ConfigError(f"{where} has no report.metrics; add e.g. `report: {{metrics: [{{name: val/acc, "
                          f"higher_is_better: true}}], columns: [optimizer, reparam]}}`")
    metrics = []
    for m in report["metrics"]:
        if not isinstance(m, dict) or not isinstance(m.get("higher_is_better"), bool) or not m.get("name"):
            raise ConfigError(f"{where}: each report.metrics entry needs a name and higher_is_better "
                              f"(true/false), found {m!r}")
        metrics.append(Metric(m["name"], m["higher_is_better"]))
    columns = list(report.get("columns") or [])
    unknown = [c for c in columns if c not in CONDITIONS]
    if unknown:
        raise ConfigError(f"{where}: report.columns {unknown} are not known conditions; "
                          f"choose from {sorted(CONDITIONS)}")
    return metrics, columns


def _entropy_groups(name: str, report: dict[str, Any] | None) -> dict[str, str]:
    """The table's ``report.entropy_groups``: {column name: fnmatch pattern of attention layer names}."""
    groups = (report or {}).get("entropy_groups") or {}
    ok = isinstance(groups, dict) and all(isinstance(k, str) and k and isinstance(v, str) and v
                                          for k, v in groups.items())
    if not ok:
        raise ConfigError(f"conf/table/{name}.yaml: report.entropy_groups must map a column name to an fnmatch "
                          f"pattern of attention layer names, e.g. `entropy_groups: {{enc_self: "
                          f"\"*encoder.layers.*.self_attn*\"}}`; found {groups!r}")
    return dict(groups)


SCALES = ("proxy", "full")


@dataclass
class LrStabilityView:
    """``report: {view: lr_stability, lr_stability: {...}}``: for a table that sweeps a learning-rate
    grid, one row per cell (at each value of any other swept key): the largest learning rate that
    trained stably, the loss at each lr and where attention entropy collapsed. The thresholds are
    per scale (the loss of a byte-level proxy and of a word-level full run are not comparable).

    Per run (``lr_outcome``, ``collapse_step``):
    - *stable*: status finished and the final ``loss`` (a summary metric, e.g. val/loss) finite and
      below ``stable_loss_below[scale]``; a run that finished at or above it (one that plateaued at
      the uniform-prediction loss) is *unstable*; a *diverged* run (a non-finite training loss
      stopped it) is unstable too. Failed, running, interrupted, incomplete and missing runs say
      nothing about stability: they are counted as not known.
    - *entropy collapsed*: its minimum attention entropy (min over layers and probes of each layer's
      mean over heads, query positions and probe examples; summary.json ``attention_entropy.min``)
      below ``collapse_entropy_below[scale]`` nats; its *collapse step* is the first probe step at
      which ``diag/attention_entropy/min`` in its metrics.csv is below that threshold.

    Per row (``lr_row_record``), over the seeds that ended at least one run:
    - *max stable lr*: per seed the largest lr (optim.lr) at which its run was stable; the mean over
      the seeds that have one; flagged where a seed was stable at the top of the grid (the grid does
      not reach its limit) or unstable at a lower lr too;
    - *divergence lr*: per seed the smallest lr above its max stable lr at which its run was unstable
      (for a seed stable nowhere: its smallest unstable lr); the mean over the seeds that have one;
    - *entropy collapse lr*: the smallest lr at which the mean over finished and diverged seeds of the
      run's minimum attention entropy is below the collapse threshold;
    - *entropy collapsed in unstable runs*: how many of the unstable runs collapsed; how many of the
      diverged ones had a collapse step at or before their divergence step, and the mean number of steps
      between the two.
    """

    lr_axis: str
    loss: str
    stable_loss_below: dict[str, float]
    collapse_entropy_below: dict[str, float]

    def thresholds(self, scale: str, table: str) -> tuple[float, float]:
        """(stable-loss threshold, collapse-entropy threshold) at ``scale``."""
        missing = [key for key in ("stable_loss_below", "collapse_entropy_below") if scale not in getattr(self, key)]
        if missing:
            raise ConfigError(f"conf/table/{table}.yaml: report.lr_stability.{missing[0]} has no value for "
                              f"scale={scale}; add `{scale}: <number>` to it")
        return self.stable_loss_below[scale], self.collapse_entropy_below[scale]

    def every_row_title(self) -> str:
        return f"## Every row: each cell at each {self.lr_axis}"

    def write(self, out_dir: Path, rows: list[Row], spec: TableSpec, scale: str, paper: dict[str, Any], now: float,
              stale_after_min: float) -> tuple[list[str], list[Path]]:
        lines, csv_path, png_path = write_lr_stability(out_dir, rows, spec, scale, paper, now, stale_after_min)
        return lines, [csv_path, png_path]


def _per_scale(where: str, key: str, raw: Any) -> dict[str, float]:
    ok = isinstance(raw, dict) and raw and all(
        k in SCALES and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for k, v in raw.items())
    if not ok:
        raise ConfigError(f"{where}: report.lr_stability.{key} needs a positive number per scale "
                          f"({' and/or '.join(SCALES)}), e.g. `{key}: {{proxy: 2.5, full: 5.0}}`; found {raw!r}")
    return {k: float(v) for k, v in raw.items()}


def _lr_stability_view(where: str, report: dict[str, Any], axes: dict[str, list[str]]) -> LrStabilityView:
    block = report.get("lr_stability")
    example = ("`lr_stability: {lr_axis: lr_scale, loss: val/loss, stable_loss_below: {proxy: 2.5}, "
               "collapse_entropy_below: {proxy: 0.3}}`")
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: report.view lr_stability needs a report.lr_stability block, e.g. {example}")
    known = {"lr_axis", "loss", "stable_loss_below", "collapse_entropy_below"}
    if set(block) - known:
        raise ConfigError(f"{where}: report.lr_stability has unknown keys {sorted(set(block) - known)}; "
                          f"its keys are {sorted(known)}")
    lr_axis = block.get("lr_axis", "lr_scale")
    if lr_axis not in axes:
        swept = ", ".join(axes) or "nothing besides experiment and seed"
        raise ConfigError(f"{where}: view lr_stability reads the learning-rate grid from the swept key {lr_axis!r}, "
                          f"but the table sweeps {swept}; add e.g. `{lr_axis}: 0.25,0.5,1,2,4,8` to "
                          f"hydra.sweeper.params, or name the swept key in report.lr_stability.lr_axis")
    if not isinstance(block.get("loss"), str) or not block["loss"]:
        raise ConfigError(f"{where}: report.lr_stability.loss must name the summary metric a run's stability is "
                          f"judged by, e.g. `loss: val/loss`; found {block.get('loss')!r}")
    return LrStabilityView(lr_axis, block["loss"], _per_scale(where, "stable_loss_below", block.get("stable_loss_below")),
                           _per_scale(where, "collapse_entropy_below", block.get("collapse_entropy_below")))


def _depth_view(where: str, report: dict[str, Any], axes: dict[str, list[str]]) -> DepthView:
    block = report.get("depth") or {}
    example = "`depth: {x: model.depth, series_part: -1, metrics: [val/bleu, val/nll]}`"
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: report.depth must be a block, e.g. {example}; found {block!r}")
    known = {"x", "series_part", "metrics"}
    if set(block) - known:
        raise ConfigError(f"{where}: report.depth has unknown keys {sorted(set(block) - known)}; "
                          f"its keys are {sorted(known)}")
    declared = {m["name"]: m["higher_is_better"] for m in report.get("metrics") or []
                if isinstance(m, dict) and "name" in m}
    names = block.get("metrics") or list(declared)[:1]
    if not isinstance(names, list) or not names or any(n not in declared for n in names):
        raise ConfigError(f"{where}: report.depth.metrics must list metrics of report.metrics ({sorted(declared)}), "
                          f"e.g. {example}; found {block.get('metrics')!r}")
    x, part = block.get("x", "model.depth"), block.get("series_part", -1)
    if not isinstance(x, str) or not x:
        raise ConfigError(f"{where}: report.depth.x must name the config key whose value is a cell's depth, e.g. "
                          f"`x: model.depth`; found {x!r}")
    if not isinstance(part, int) or isinstance(part, bool):
        raise ConfigError(f"{where}: report.depth.series_part must be an index into a cell's name split at '/' "
                          f"(-1: the last part, mt_depth/18L-18L/admin -> admin); found {part!r}")
    return DepthView(x, part, [Metric(n, bool(declared[n])) for n in names])


# report.view: how else a table can show its runs (name -> parser of its report.<name> block)
VIEWS: dict[str, Callable[[str, dict[str, Any], dict[str, list[str]]], Any]] = {
    "lr_stability": _lr_stability_view,
    "depth": _depth_view,
}


def _view(name: str, report: dict[str, Any] | None, axes: dict[str, list[str]]) -> LrStabilityView | DepthView | None:
    """The table's ``report.view`` (None: the plain table only) and its options block."""
    where = f"conf/table/{name}.yaml"
    view = (report or {}).get("view")
    if view is None:
        for key in VIEWS:
            if key in (report or {}):
                raise ConfigError(f"{where}: report.{key} is set but report.view is not; add `view: {key}`")
        return None
    if view not in VIEWS:
        raise ConfigError(f"{where}: report.view {view!r} is not a known view; choose from {', '.join(VIEWS)}")
    return VIEWS[view](where, report, axes)


def load_table(name: str, seeds: str | None = None, lr_grid: str | None = None) -> TableSpec:
    """conf/table/<name>.yaml, with the swept ``seed`` / ``lr_scale`` values replaced as on the sweep's
    command line (``seed=0,1``, ``lr_scale=1``)."""
    if name not in table_names():
        raise ConfigError(f"unknown table {name!r}; the tables are: {', '.join(table_names())} "
                          f"(conf/table/*.yaml, also in the dirs of SIGMA_REPRO_CONFIG_PATH)")
    cfg = OmegaConf.load(table_files()[name])
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    for key, option, given in (("seed", "--seeds", seeds), ("lr_scale", "--lr-grid", lr_grid)):
        if given is not None:
            if key not in params:
                raise ConfigError(f"table {name!r} does not sweep {key}; drop {option}")
            params[key] = given
    try:
        seed_list = [int(s) for s in _values(params.pop("seed"))]
    except ValueError as err:
        raise ConfigError(f"table {name!r}: seeds must be a comma list of integers, e.g. 0,1,2 ({err})") from None
    cells = [c.strip() for c in str(params.pop("experiment")).split(",")]
    report = OmegaConf.to_container(cfg.get("report"), resolve=True) if "report" in cfg else None
    metrics, columns = _report(name, report)
    axes = {key: _values(v) for key, v in params.items()}
    return TableSpec(name, cells, axes, seed_list, metrics, columns, _view(name, report, axes),
                     _entropy_groups(name, report))


def paper_values(table: str) -> dict[str, Any]:
    """The paper's number per cell from results/paper_reference.yaml (None where not known)."""
    reference = OmegaConf.to_container(OmegaConf.load(PAPER_REFERENCE)) if PAPER_REFERENCE.exists() else {}
    return {cell: (entry or {}).get("published") for cell, entry in (reference.get(table) or {}).items()}


# -- rows -----------------------------------------------------------------------------------------
@dataclass
class Row:
    """A cell at one value of each swept key (plus any extra overrides), over seeds."""

    cell: str
    axes: dict[str, str]
    extras: tuple[str, ...]
    expected_seeds: list[int]
    runs: list[Run] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return self.cell, tuple(self.axes.values()), self.extras


def group_rows(spec: TableSpec, runs: list[Run]) -> list[Row]:
    """Rows in the table's order: every expected (cell, axes) row, even without runs; then rows that
    only runs made (a swept value outside the grid, extra overrides), after their cell's rows."""
    rows = {}
    for cell in spec.cells:
        for combo in itertools.product(*spec.axes.values()):
            row = Row(cell, dict(zip(spec.axes, combo)), (), spec.seeds)
            rows[row.key] = row
    for run in runs:
        axes = {key: _canon(run.value(key)) for key in spec.axes}
        extras = tuple(sorted(f"{k}={v}" for k, v in run.overrides.items() if k not in spec.axes))
        row = Row(run.experiment, axes, extras, spec.seeds)
        rows.setdefault(row.key, row).runs.append(run)
    order = {cell: i for i, cell in enumerate(spec.cells)}
    position = {key: i for i, key in enumerate(rows)}  # grid order first, then as runs came
    return sorted(rows.values(), key=lambda r: (order[r.cell], bool(r.extras), position[r.key]))


def _conditions(runs: list[Run], columns: list[str]) -> dict[str, str]:
    """The conditions a table cell fixes, as the runs' resolved configs have them (values that
    differ between seeds are all shown, joined by '/'; a "running" stub has no config yet)."""
    runs = [r for r in runs if r.config]
    return {c: "/".join(sorted({str(CONDITIONS[c](r)) for r in runs})) if runs else "" for c in columns}


def _mean_layers(run: Run, which: str) -> float | None:
    values = run.summary.get("attention_entropy", {}).get(which)
    return float(np.mean(values)) if values else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def group_entropy_min(run: Run, pattern: str) -> float | None:
    """The run's minimum attention entropy over the probes and over its attention layers whose names match
    ``pattern`` (fnmatch; summary.json attention_entropy.layers and .min, the per-layer minimum over
    probes); None when no layer matches or none has a finite value."""
    entropy = run.summary.get("attention_entropy", {})
    values = [v for name, v in zip(entropy.get("layers", []), entropy.get("min", []))
              if fnmatch(name, pattern) and v is not None and np.isfinite(v)]
    return min(values) if values else None


def row_record(row: Row, spec: TableSpec, paper: dict[str, Any], now: float, stale_after_min: float) -> dict[str, Any]:
    """One row as plain data (the CSV row): conditions, seeds by state, metrics and diagnostics."""
    by_state: dict[str, list[Run]] = {s: [] for s in RUN_STATES}
    for run in sorted(row.runs, key=lambda r: r.seed):
        by_state[run.state(now, stale_after_min)].append(run)
    seeds = {s: [r.seed for r in by_state[s]] for s in RUN_STATES}
    seeds["missing"] = [s for s in row.expected_seeds if s not in {r.seed for r in row.runs}]
    scores = {}
    for metric in spec.metrics:
        finished = [r.summary.get("metrics", {}).get(metric.name) for r in by_state["finished"]]
        values = [v for v in finished if v is not None]
        scores |= {f"{metric.name} mean": float(np.mean(values)) if values else None,
                   f"{metric.name} std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                   f"{metric.name} n": len(values)}
    ended = by_state["finished"] + by_state["diverged"]  # both say how attention behaved to the end
    return {
        "cell": row.cell, **row.axes, "extra_overrides": ",".join(row.extras),
        **_conditions(row.runs, spec.columns),
        **scores,
        **{f"n_{s}": len(seeds[s]) for s in STATES},
        **{f"seeds_{s}": ",".join(map(str, seeds[s])) for s in STATES},
        "diverged_steps": ",".join(str(r.summary.get("diverged_step")) for r in by_state["diverged"]),
        "attention_entropy_final": _mean([_mean_layers(r, "final") for r in ended]),
        "attention_entropy_min": _mean([_mean_layers(r, "min") for r in ended]),
        **{f"attention_entropy_min {group}": _mean([group_entropy_min(r, pattern) for r in ended])
           for group, pattern in spec.entropy_groups.items()},
        "loss_spikes": _mean([r.summary.get("loss_spikes") for r in ended]),
        "paper": paper.get(row.cell) if not row.extras else None,
        "run_dirs": ";".join(str(r.dir) for r in row.runs),
    }


# -- Markdown -------------------------------------------------------------------------------------
def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _seeds_text(rec: dict[str, Any], state: str) -> str:
    return f"{state} {rec[f'seeds_{state}']}" if rec[f"n_{state}"] else ""


def _score(rec: dict[str, Any], metric: Metric, best: float | None) -> str:
    mean, std, n = rec[f"{metric.name} mean"], rec[f"{metric.name} std"], rec[f"{metric.name} n"]
    score = _num(mean, 4)
    if std is not None:
        score += f" ± {std:.4f}"
    if n < rec["n_finished"]:
        score += f" (of {n})"
    return f"**{score}**" if mean is not None and mean == best else score


def _best(records: list[dict[str, Any]], metric: Metric) -> float | None:
    means = [r[f"{metric.name} mean"] for r in records if r[f"{metric.name} mean"] is not None]
    return (max if metric.higher_is_better else min)(means) if means else None


def markdown_row(rec: dict[str, Any], spec: TableSpec, best: dict[str, float | None]) -> list[str]:
    cell = rec["cell"].removeprefix(spec.name + "/")
    if rec["extra_overrides"]:
        cell += f" [{rec['extra_overrides']}]"
    diverged = str(rec["n_diverged"])
    if rec["n_diverged"]:
        diverged += " (" + ", ".join(f"s{s} @ {d}" for s, d in zip(rec["seeds_diverged"].split(","),
                                                                   rec["diverged_steps"].split(","))) + ")"
    failed = str(rec["n_failed"]) + (f" (s{rec['seeds_failed']})" if rec["n_failed"] else "")
    not_done = "; ".join(filter(None, (_seeds_text(rec, s) for s in NOT_DONE)))
    return [cell, *(rec[k] for k in spec.axes), *(str(rec[c]) for c in spec.columns),
            *(_score(rec, m, best[m.name]) for m in spec.metrics), str(rec["n_finished"]), diverged, failed,
            not_done, _num(rec["attention_entropy_final"], 3), _num(rec["attention_entropy_min"], 3),
            *(_num(rec[f"attention_entropy_min {g}"], 3) for g in spec.entropy_groups),
            _num(rec["loss_spikes"], 1), "" if rec["paper"] is None else str(rec["paper"])]


def markdown_table(records: list[dict[str, Any]], spec: TableSpec) -> str:
    head = ["cell", *spec.axes, *(c.replace("_", " ") for c in spec.columns),
            *(f"{m.name} (mean ± std, {'↑' if m.higher_is_better else '↓'})" for m in spec.metrics),
            "finished", "diverged", "failed", "not done (seeds)",
            "attention entropy final", "attention entropy min",
            *(f"attention entropy min {g}" for g in spec.entropy_groups), "loss spikes", "paper"]
    best = {m.name: _best(records, m) for m in spec.metrics}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(markdown_row(r, spec, best)) + " |" for r in records]
    return "\n".join(lines)


def _tally(values: list[Any]) -> str:
    return ", ".join(f"{v} ({n})" for v, n in Counter(values).most_common())


def provenance_lines(args: argparse.Namespace, spec: TableSpec, root: Path, used: list[Run],
                     other_scales: Counter, unreadable: list[str]) -> list[str]:
    """Where the table came from: the command, the runs' git shas, machines and dates, and every run
    found but not used."""
    ended = sorted(r.summary["ended_at"] for r in used if r.summary.get("ended_at")) or ["-"]
    shas = _tally([r.summary["git_sha"] for r in used if r.summary.get("git_sha")]) or "none ended yet"
    machines = _tally([f"{m.get('hostname')} ({m.get('device_name')})"
                       for r in used if (m := r.summary.get("machine"))]) or "none ended yet"
    hours = sum(r.summary.get("wall_time_s", 0.0) for r in used) / 3600
    axes = "".join(f" × {len(v)} {k}" for k, v in spec.axes.items())
    seeds = ",".join(map(str, spec.seeds))
    today = datetime.now(timezone.utc).date().isoformat()
    lines = [
        f"- Command: `{command_line(args)}`, {today}, git sha {provenance.git_sha()}.",
        f"- Scale: **{args.scale}**. Expected: {len(spec.cells)} cells{axes} × seeds {seeds} "
        f"(conf/table/{spec.name}.yaml).",
        f"- Runs: {len(used)} run dirs under `{root}`, {hours:.2f} h of wall time in all; "
        f"git sha of the runs: {shas}; machines: {machines}; ended {ended[0]} to {ended[-1]}.",
    ]
    if getattr(args, "records", None) is not None:
        records = Path(args.records).resolve()
        read_back = sum(r.dir.resolve().is_relative_to(records) for r in used)
        lines.append(f"- Records: every ended run's summary.json is kept in `{args.records}`; {read_back} of the "
                     f"runs above were read back from there (their run dirs are gone).")
    if other_scales:
        lines.append(f"- Not in this table: runs of these cells at other scales "
                     f"({_tally(list(other_scales.elements()))}); see `--scale`.")
    lines += [f"- Unreadable summary.json, not counted: {note}" for note in unreadable]
    return lines


def command_line(args: argparse.Namespace) -> str:
    """The table command as the options it ran with (defaults included), whatever called it."""
    parts = ["sigma-repro table", args.table, str(runs_root(args.runs_dir)), "--scale", args.scale,
             "--stale-after", f"{args.stale_after:g}", "--out", args.out]
    if args.metric is not None:
        parts += ["--metric", args.metric] + (["--lower-is-better"] if args.lower_is_better else [])
    for option, value in (("--seeds", args.seeds), ("--lr-grid", args.lr_grid),
                          ("--records", getattr(args, "records", None))):
        if value is not None:
            parts += [option, value]
    return " ".join(parts)


READING = (
    "How to read it: {metrics} the mean ± sample standard deviation (ddof 1) over the finished seeds "
    "(the final value each run recorded; ↑ higher or ↓ lower is better, the best row in bold); attention entropy (nats, mean over layers of each run's final and "
    "minimum-over-training value) and loss spikes are averaged over finished and diverged seeds. "
    "*diverged* runs hit a non-finite loss (seed @ step); *failed* runs raised an error (summary.json says "
    "which); *running* runs are in progress; *interrupted* runs were stopped by a signal (Ctrl-C, SIGTERM, "
    "a preemption) after saving a checkpoint; *incomplete* runs say running but their process is gone "
    "(seen on the host that ran them) or they have written nothing for {stale:g} minutes (killed, or "
    "waiting for a requeue). Re-run the sweep command to resume interrupted and incomplete runs. "
    "*missing* seeds have no run dir. `paper` is the published number from results/paper_reference.yaml "
    "(full scale; empty where not known). Rows with [overrides] are runs of the cell with extra "
    "command-line overrides, kept apart from the table's own runs. Per-row run dirs are in the CSV."
)


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    """Plain-data rows (one dict each, the same keys) as a CSV file, its dir made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def write_table(out_dir: Path, spec: TableSpec, scale: str, records: list[dict[str, Any]], header: list[str],
                stale_after_min: float, view_lines: list[str] | None = None) -> tuple[Path, Path]:
    """``<scale>.md`` (the header, then the table's view when it declares one, then every row) and
    ``<scale>.csv`` (every row)."""
    csv_path, md_path = out_dir / f"{scale}.csv", out_dir / f"{scale}.md"
    write_csv(csv_path, records)
    every_row = [spec.view.every_row_title(), ""] if view_lines and spec.view else []
    groups = [f"`attention entropy min {g}` is, per run, the minimum over probes and over the attention layers "
              f"named like `{p}`" for g, p in spec.entropy_groups.items()]
    entropy_groups = ("; ".join(groups) + " (its mean over finished and diverged seeds; "
                      f"conf/table/{spec.name}.yaml report.entropy_groups).") if groups else ""
    md_path.write_text("\n".join([
        f"# Table {spec.name} (scale={scale})", "",
        f"What it reproduces and how it was run: recipes/{spec.name}.md.", "",
        *header, "",
        *(view_lines or []),
        *every_row,
        markdown_table(records, spec), "",
        READING.format(metrics=" and ".join(f"`{m.name}`" for m in spec.metrics)
                       + (" is" if len(spec.metrics) == 1 else " are"), stale=stale_after_min)
        + (" " + entropy_groups if entropy_groups else ""), "",
    ]))
    return md_path, csv_path


# -- the lr_stability view -----------------------------------------------------------------------
# A table that sweeps a learning-rate grid, seen one row per cell: the largest lr that trained stably,
# the loss at each lr and where attention entropy collapsed (definitions: LrStabilityView). Written as
# a section of <scale>.md, as <scale>_lr_stability.csv and as the plot <scale>_loss_vs_lr.png.
COLLAPSE_CURVE = "diag/attention_entropy/min"  # per probe step: min over layers of the mean over heads
ENDED = ("stable", "unstable", "diverged")     # the outcomes that say how a run behaved


def lr_outcome(run: Run, state: str, loss: str, stable_below: float) -> str:
    """stable | unstable | diverged for a run that ended (LrStabilityView); otherwise its state
    (failed, running, interrupted, incomplete)."""
    if state == "diverged":
        return "diverged"
    if state != "finished":
        return state
    value = run.summary.get("metrics", {}).get(loss)
    return "stable" if value is not None and np.isfinite(value) and value < stable_below else "unstable"


def collapse_step(run: Run, below: float) -> int | None:
    """The first probe step at which the run's minimum attention entropy over layers
    (``diag/attention_entropy/min`` in its metrics.csv) fell below ``below`` nats; None if it never
    did or the run has no metrics.csv."""
    if not (run.dir / "metrics.csv").exists():
        return None
    steps, values = metric_curve(run.dir, COLLAPSE_CURVE)
    return next((step for step, value in zip(steps, values) if value < below), None)


def _entropy_min(run: Run) -> float | None:
    """Minimum attention entropy over layers and probes (summary.json attention_entropy.min is per layer)."""
    values = [v for v in run.summary.get("attention_entropy", {}).get("min", []) if v is not None and np.isfinite(v)]
    return min(values) if values else None


@dataclass
class LrPoint:
    """One run in the view: its seed, learning rate (optim.lr) and what it showed."""

    run: Run
    outcome: str
    lr: float | None
    loss: float | None
    entropy_min: float | None
    collapse_step: int | None


@dataclass
class LrColumn:
    """One value of the lr axis; labelled by the learning rate itself when every run at it has one."""

    value: str
    label: str


@dataclass
class LrRow:
    """A cell (at one value of every other swept key, plus any extra overrides) across the lr grid."""

    cell: str
    other_axes: dict[str, str]
    extras: tuple[str, ...]
    points: dict[str, list[LrPoint]]   # lr-axis value -> its runs
    failed: dict[str, int]             # lr-axis value -> failed runs
    not_done: dict[str, int]           # lr-axis value -> seeds running, interrupted, incomplete or missing

    def lr(self, value: str) -> float | None:
        """The learning rate the runs at this lr-axis value used (their mean, should they differ)."""
        return _mean([p.lr for p in self.points.get(value, [])])

    def seeds(self) -> list[int]:
        return sorted({p.run.seed for pts in self.points.values() for p in pts if p.outcome in ENDED})


def _axis_float(value: str, axis: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"view lr_stability: {axis}={value!r} is not a number; the lr axis must be numeric") from None


def lr_rows(rows: list[Row], view: LrStabilityView, stable_below: float, collapse_below: float, now: float,
            stale_after_min: float) -> tuple[list[LrRow], list[LrColumn]]:
    """The table's rows regrouped one per cell (and value of other swept keys, and extra overrides),
    with every run classified; and the lr columns in increasing order (the grid and any value only
    runs made)."""
    groups: dict[tuple, LrRow] = {}
    for row in rows:
        other = {k: v for k, v in row.axes.items() if k != view.lr_axis}
        key = (row.cell, tuple(other.items()), row.extras)
        group = groups.setdefault(key, LrRow(row.cell, other, row.extras, {}, {}, {}))
        value = row.axes[view.lr_axis]
        points, failed, not_done = group.points.setdefault(value, []), 0, 0
        for run in row.runs:
            state = run.state(now, stale_after_min)
            outcome = lr_outcome(run, state, view.loss, stable_below)
            if outcome == "failed":
                failed += 1
            elif outcome not in ENDED:
                not_done += 1
            loss = run.summary.get("metrics", {}).get(view.loss) if state == "finished" else None
            points.append(LrPoint(run, outcome, float(run.config["optim"]["lr"]) if run.config else None,
                                  loss if loss is not None and np.isfinite(loss) else None,
                                  _entropy_min(run) if outcome in ENDED else None,
                                  collapse_step(run, collapse_below) if outcome in ENDED else None))
        seen = {r.seed for r in row.runs}
        group.failed[value] = failed
        group.not_done[value] = not_done + sum(1 for s in row.expected_seeds if s not in seen)
    values = sorted({v for g in groups.values() for v in g.points}, key=lambda v: _axis_float(v, view.lr_axis))
    columns = []
    for value in values:
        lrs = {f"{p.lr:.3g}" for g in groups.values() for p in g.points.get(value, []) if p.lr is not None}
        columns.append(LrColumn(value, f"lr {lrs.pop()}" if len(lrs) == 1 else f"{view.lr_axis} {value}"))
    return list(groups.values()), columns


def _per_seed(row: LrRow, pick: Callable[[list[LrPoint]], float | None]) -> dict[int, float | None]:
    """A value per seed that ended at least one run of the row, from that seed's ended runs."""
    mine = {seed: [p for pts in row.points.values() for p in pts if p.run.seed == seed and p.outcome in ENDED]
            for seed in row.seeds()}
    return {seed: pick(points) for seed, points in mine.items()}


def _largest_stable(points: list[LrPoint]) -> float | None:
    return max((p.lr for p in points if p.outcome == "stable"), default=None)


def _breaking(points: list[LrPoint]) -> float | None:
    """The smallest lr above the largest stable one at which the run was unstable (with no stable lr:
    the smallest unstable one)."""
    stable = _largest_stable(points)
    return min((p.lr for p in points if p.outcome in ("unstable", "diverged") and (stable is None or p.lr > stable)),
               default=None)


def _unstable_below(points: list[LrPoint]) -> bool:
    """Unstable at a learning rate below the largest stable one (too slow at the low end, or a gap)."""
    stable = _largest_stable(points)
    return stable is not None and any(p.outcome in ("unstable", "diverged") and p.lr < stable for p in points)


def _seed_values_text(values: dict[int, float | None], none: str) -> str:
    return ", ".join(f"s{seed} {none if v is None else f'{v:.3g}'}" for seed, v in values.items())


def lr_row_record(row: LrRow, columns: list[LrColumn], spec: TableSpec, paper: dict[str, Any],
                  collapse_below: float) -> dict[str, Any]:
    """One row of the view as plain data (the CSV row); the Markdown row is made from it."""
    view = spec.view
    top = columns[-1].value
    max_stable = _per_seed(row, _largest_stable)
    divergence = _per_seed(row, _breaking)
    unstable_below = [seed for seed, below in _per_seed(row, _unstable_below).items() if below]
    at_top = [p.run.seed for p in row.points.get(top, []) if p.outcome == "stable"]
    unstable = [p for pts in row.points.values() for p in pts if p.outcome in ("unstable", "diverged")]
    diverged = [p for p in unstable if p.outcome == "diverged"]
    no_curve = [p for p in diverged if not (p.run.dir / "metrics.csv").exists()]
    leads = [p.run.summary["diverged_step"] - p.collapse_step for p in diverged
             if p.collapse_step is not None and p.run.summary.get("diverged_step") is not None
             and p.collapse_step <= p.run.summary["diverged_step"]]
    per_column: dict[str, Any] = {}
    collapse_lr = None
    for col in columns:
        points = row.points.get(col.value, [])
        ended = [p for p in points if p.outcome in ENDED]
        entropy = _mean([p.entropy_min for p in ended])
        collapsed = entropy is not None and entropy < collapse_below
        if collapsed and collapse_lr is None:
            collapse_lr = row.lr(col.value)
        per_column |= {
            f"{col.label}: {view.loss} mean": _mean([p.loss for p in points if p.outcome in ("stable", "unstable")]),
            **{f"{col.label}: n_{o}": sum(p.outcome == o for p in points) for o in ENDED},
            f"{col.label}: n_failed": row.failed.get(col.value, 0),
            f"{col.label}: n_not_done": row.not_done.get(col.value, 0),
            f"{col.label}: attention_entropy_min": entropy,
            f"{col.label}: entropy_collapsed": collapsed,
        }
    runs = [p.run for pts in row.points.values() for p in pts]
    columns_shown = [c for c in spec.columns if c != "lr"]  # the lr is in the column headers
    return {
        "cell": row.cell, **row.other_axes, "extra_overrides": ",".join(row.extras),
        **_conditions(runs, columns_shown),
        "max_stable_lr": _mean(list(max_stable.values())),
        "max_stable_lr_n": sum(v is not None for v in max_stable.values()),
        "max_stable_lr_seeds": _seed_values_text(max_stable, "none"),
        "seeds_stable_at_top_lr": ",".join(map(str, at_top)),
        "seeds_unstable_below_max_stable_lr": ",".join(map(str, unstable_below)),
        "divergence_lr": _mean(list(divergence.values())),
        "divergence_lr_n": sum(v is not None for v in divergence.values()),
        "divergence_lr_seeds": _seed_values_text(divergence, "none"),
        "seeds_ended": len(max_stable),
        "entropy_collapse_lr": collapse_lr,
        "unstable_runs": len(unstable),
        "unstable_runs_collapsed": sum(p.entropy_min is not None and p.entropy_min < collapse_below for p in unstable),
        "diverged_runs": len(diverged),
        "collapsed_before_divergence": len(leads),
        "diverged_without_metrics_csv": len(no_curve),
        "collapse_lead_steps_mean": _mean(leads),
        **per_column,
        "paper": paper.get(row.cell) if not row.extras else None,
    }


def _lr_cell(rec: dict[str, Any], which: str, none: str, bound: bool) -> str:
    """Max stable / divergence lr: the mean over seeds, each seed's value where they differ; ``none``
    when no seed has one."""
    n_seeds, n = rec["seeds_ended"], rec[f"{which}_n"]
    if not n_seeds:
        return ""
    if not n:
        return none
    text = ("≥ " if bound else "") + f"{rec[which]:.3g}"
    seeds = rec[f"{which}_seeds"]
    if len({part.split(" ", 1)[1] for part in seeds.split(", ")}) > 1:
        text += f" [{seeds}]"
    return text


def _loss_cell(rec: dict[str, Any], col: LrColumn, loss: str) -> str:
    mean = rec[f"{col.label}: {loss} mean"]
    marks = [f"{symbol}{rec[f'{col.label}: n_{key}']}" for key, symbol in
             (("unstable", "*"), ("diverged", "†"), ("failed", "!"), ("not_done", "?")) if rec[f"{col.label}: n_{key}"]]
    if rec[f"{col.label}: entropy_collapsed"]:
        marks.append("◦")
    return " ".join(["—" if mean is None else f"{mean:.3f}", *marks])


def _collapse_cell(rec: dict[str, Any]) -> str:
    """Of the unstable runs, how many collapsed; of the diverged ones, how many collapsed first."""
    if not rec["unstable_runs"]:
        return "no unstable run"
    text = f"{rec['unstable_runs_collapsed']} of {rec['unstable_runs']}"
    n, k = rec["diverged_runs"], rec["collapsed_before_divergence"]
    if n:
        text += f"; diverged: {k} of {n} before diverging" + (
            f", {rec['collapse_lead_steps_mean']:.0f} steps ahead" if k else "")
        missing = rec["diverged_without_metrics_csv"]
        text += f" ({missing} without metrics.csv)" if missing else ""
    return text


def lr_stability_markdown(records: list[dict[str, Any]], rows: list[LrRow], columns: list[LrColumn],
                          spec: TableSpec) -> str:
    view = spec.view
    other = [k for k in spec.axes if k != view.lr_axis]
    shown = [c for c in spec.columns if c != "lr"]
    head = ["cell", *other, *(c.replace("_", " ") for c in shown), "max stable lr (mean over seeds)",
            "divergence lr (mean over seeds)", "paper", *(f"{view.loss} @ {c.label}" for c in columns),
            "entropy collapse lr", "entropy collapsed in unstable runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec, row in zip(records, rows):
        cell = rec["cell"].removeprefix(spec.name + "/") + (f" [{rec['extra_overrides']}]" if rec["extra_overrides"] else "")
        lrs = [lr for lr in (row.lr(c.value) for c in columns) if lr is not None]
        below, above = (f"< {lrs[0]:.3g}", f"> {lrs[-1]:.3g}") if lrs else ("none", "none")
        lines.append("| " + " | ".join([
            cell, *(rec[k] for k in other), *(str(rec[c]) for c in shown),
            _lr_cell(rec, "max_stable_lr", below, bool(rec["seeds_stable_at_top_lr"]))
            + (" (also unstable below it: " + ", ".join(f"s{seed}" for seed in
                                                         rec["seeds_unstable_below_max_stable_lr"].split(",")) + ")"
               if rec["seeds_unstable_below_max_stable_lr"] else ""),
            _lr_cell(rec, "divergence_lr", above, False),
            "" if rec["paper"] is None else f"{rec['paper']:g}",
            *(_loss_cell(rec, c, view.loss) for c in columns),
            *(("none" if rec["entropy_collapse_lr"] is None else f"{rec['entropy_collapse_lr']:.3g}",
               _collapse_cell(rec)) if rec["seeds_ended"] else ("", "")),
        ]) + " |")
    return "\n".join(lines)


LR_READING = (
    "How to read it: one row per cell. A run is *stable* when it finished with a final `{loss}` below "
    "{stable:g}; a run that finished at or above it (e.g. one that plateaued at the uniform-prediction loss) "
    "is *unstable*, and so is a *diverged* run (a non-finite training loss stopped it). Each `{loss} @ lr` "
    "column is the mean final `{loss}` over the seeds that finished at that learning rate, marked *n where n "
    "of them were unstable, †n where n diverged, !n failed, ?n not done (running, interrupted, incomplete or "
    "missing), ◦ where attention entropy collapsed there: the mean over finished and diverged seeds of each "
    "run's minimum attention entropy (min over layers and probes of the layer's mean over heads, query "
    "positions and probe examples) is below {collapse:g} nats. *max stable lr*: per seed, the largest "
    "learning rate at which that seed's run was stable, then the mean over the seeds that have one (each "
    "seed's value in brackets where they differ, `none` for a seed stable nowhere); ≥ when a seed was stable "
    "at the top of the grid, so the grid does not reach its limit; < the lowest lr when no seed was stable "
    "anywhere; (also unstable below it: s…) names seeds that were unstable at some lower learning rate too "
    "(too slow at the low end of the grid, or a gap). *divergence lr*: per seed, the smallest learning rate "
    "above its largest stable one at which its run was unstable (for a seed stable nowhere, its smallest "
    "learning rate); the mean over the seeds that have one; > the top lr when no seed broke on the grid. *entropy collapse lr*: the "
    "smallest learning rate marked ◦; at or below the divergence lr, collapse comes with (or before) the "
    "lr at which training breaks. *entropy collapsed in unstable runs*: of the row's unstable runs (at any "
    "lr), how many had a minimum attention entropy below {collapse:g} nats; of its diverged runs, how many "
    "had `diag/attention_entropy/min` below it at a probe at or before their divergence step (the last probe "
    "reads the weights the diverging step started from), and the mean number of steps from that first "
    "collapsed probe to the divergence. `paper` is the published number from "
    "results/paper_reference.yaml (for this view, the learning rate at which the published model diverged; "
    "full scale, empty where not known). Thresholds: conf/table/{table}.yaml `report.lr_stability`. "
    "Per-lr counts, entropies and every seed's values are in {csv}; the plot is {plot}."
)


def draw_lr_stability(rows: list[LrRow], columns: list[LrColumn], spec: TableSpec, scale: str,
                      stable_below: float, collapse_below: float):
    """Final loss (top) and minimum attention entropy (bottom) against the learning rate (log x), one
    colour per cell: a line through the mean over finished seeds, a filled dot per stable run, a hollow
    one per unstable (finished, not below the threshold) run, an x along the top per diverged run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator
    from matplotlib.transforms import blended_transform_factory

    view = spec.view
    fig, (loss_ax, entropy_ax) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True, constrained_layout=True,
                                              gridspec_kw={"height_ratios": [3, 2]})
    top = blended_transform_factory(loss_ax.transData, loss_ax.transAxes)
    for i, row in enumerate(rows):
        color = f"C{i % 10}"
        label = row.cell.removeprefix(spec.name + "/") + "".join(f" {k}={v}" for k, v in row.other_axes.items()) \
            + (f" [{','.join(row.extras)}]" if row.extras else "")
        xs, losses, entropies = [], [], []
        for col in columns:
            points = row.points.get(col.value, [])
            lr = row.lr(col.value)
            if lr is None:
                continue
            finished = [p.loss for p in points if p.outcome in ("stable", "unstable") and p.loss is not None]
            xs.append(lr)
            losses.append(np.mean(finished) if finished else np.nan)
            entropy = _mean([p.entropy_min for p in points if p.outcome in ENDED])
            entropies.append(np.nan if entropy is None else entropy)
            for outcome, face in (("stable", color), ("unstable", "none")):
                ys = [p.loss for p in points if p.outcome == outcome and p.loss is not None]
                loss_ax.scatter([lr] * len(ys), ys, s=30, facecolors=face, edgecolors=color,
                                zorder=3, gid=f"{outcome}:{row.cell}")
            off_axis = [p for p in points if p.outcome == "diverged" or (p.outcome == "unstable" and p.loss is None)]
            if off_axis:
                # in the free band along the top, each cell at its own height so their marks stay apart
                loss_ax.plot([lr] * len(off_axis), [0.985 - 0.017 * (i % 6)] * len(off_axis), "x", color=color,
                             markersize=8, transform=top, gid=f"diverged:{row.cell}")
        loss_ax.plot(xs, losses, "-", color=color, label=label if xs else f"_{label}", gid=f"mean:{row.cell}")
        entropy_ax.plot(xs, entropies, "o-", color=color, markersize=4, gid=f"entropy:{row.cell}")
    loss_ax.axhline(stable_below, color="grey", linestyle="--", linewidth=1)
    entropy_ax.axhline(collapse_below, color="grey", linestyle="--", linewidth=1)
    data_low, data_high = loss_ax.dataLim.y0, loss_ax.dataLim.y1  # the finite losses drawn (and the thresholds)
    if data_low > 0 and data_high / data_low > 10:  # a run blew up to a huge finite loss: log y, or it flattens the rest
        loss_ax.set_yscale("log")
        low, high = data_low / 1.2, data_high * 1.2
        loss_ax.set_ylim(low, high * (high / low) ** 0.12)  # a free band along the top for the diverged runs' x
    else:
        low, high = loss_ax.get_ylim()
        loss_ax.set_ylim(low, high + 0.12 * (high - low))
    markers = [Line2D([], [], marker="o", linestyle="", color="k", label=f"stable: final {view.loss} < {stable_below:g}"),
               Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="k",
                      label=f"unstable: finished, final {view.loss} ≥ {stable_below:g}"),
               Line2D([], [], marker="x", linestyle="", color="k", label="diverged (non-finite loss), drawn at the top"),
               Line2D([], [], linestyle="--", color="grey", label="thresholds (report.lr_stability)")]
    handles, _ = loss_ax.get_legend_handles_labels()
    loss_ax.legend(handles=handles + markers, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"{spec.name} (scale={scale}): final {view.loss} and attention entropy against the learning rate")
    loss_ax.set(ylabel=f"final {view.loss}\n(line: mean over finished seeds)")
    entropy_ax.set(xlabel="learning rate (optim.lr)",
                   ylabel=f"min attention entropy (nats)\n(mean over seeds; collapse < {collapse_below:g})")
    ticks = sorted({lr for row in rows for lr in (row.lr(c.value) for c in columns) if lr is not None})
    for ax in (loss_ax, entropy_ax):
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    if ticks:  # the grid's learning rates, not decades: a factor-2 grid has few decade ticks
        entropy_ax.set_xticks(ticks, [f"{lr:.3g}" for lr in ticks], rotation=45)
        entropy_ax.xaxis.set_minor_locator(NullLocator())
    return fig


def write_lr_stability(out_dir: Path, rows: list[Row], spec: TableSpec, scale: str, paper: dict[str, Any],
                       now: float, stale_after_min: float) -> tuple[list[str], Path, Path]:
    """The view of an lr-grid table: its Markdown section (for <scale>.md), <scale>_lr_stability.csv
    and the plot <scale>_loss_vs_lr.png."""
    import matplotlib.pyplot as plt

    stable_below, collapse_below = spec.view.thresholds(scale, spec.name)
    grouped, columns = lr_rows(rows, spec.view, stable_below, collapse_below, now, stale_after_min)
    records = [lr_row_record(row, columns, spec, paper, collapse_below) for row in grouped]
    csv_path, png_path = out_dir / f"{scale}_lr_stability.csv", out_dir / f"{scale}_loss_vs_lr.png"
    write_csv(csv_path, records)
    fig = draw_lr_stability(grouped, columns, spec, scale, stable_below, collapse_below)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    lines = [
        "## Learning-rate stability (view lr_stability)", "",
        lr_stability_markdown(records, grouped, columns, spec), "",
        LR_READING.format(loss=spec.view.loss, stable=stable_below, collapse=collapse_below, table=spec.name,
                          csv=csv_path.name, plot=png_path.name), "",
        f"![final {spec.view.loss} against the learning rate]({png_path.name})", "",
    ]
    return lines, csv_path, png_path


# -- the depth view -------------------------------------------------------------------------------
# A table whose cells sit at several depths (mt_depth: 6L-6L ... 100L-100L x scheme), seen as each metric
# against depth, one line per scheme. Written as a section of <scale>.md, as <scale>_depth.csv and as the
# plot <scale>_vs_depth.png.
@dataclass
class DepthView:
    """``report: {view: depth, depth: {x: model.depth, series_part: -1, metrics: [val/bleu, val/nll]}}``: for
    a table whose cells differ in depth, each of ``metrics`` (a subset of report.metrics; default the
    headline) against the depth, one line per *series*.

    - A row's *depth* is the value of the config key ``x`` in its runs' resolved configs (the most common
      one should they differ); rows without a run have none and are listed apart.
    - A row's *series* is part ``series_part`` of its cell name split at "/" (-1, the last:
      mt_depth/18L-18L/admin -> admin), with any other swept key's value and extra overrides appended.
    - Each point is the row's record (``row_record``): mean ± std of the metric over its finished seeds,
      its diverged seeds (with their divergence steps), failed ones and those not done.
    """

    x: str
    series_part: int
    metrics: list[Metric]

    def every_row_title(self) -> str:
        return "## Every row: each cell"

    def write(self, out_dir: Path, rows: list[Row], spec: TableSpec, scale: str, paper: dict[str, Any], now: float,
              stale_after_min: float) -> tuple[list[str], list[Path]]:
        lines, csv_path, png_path = write_depth(out_dir, rows, spec, scale, paper, now, stale_after_min)
        return lines, [csv_path, png_path]


def depth_series(row: Row, spec: TableSpec) -> str:
    """The line a row belongs to in the depth view (DepthView)."""
    parts = row.cell.split("/")
    try:
        name = parts[spec.view.series_part]
    except IndexError:
        raise ConfigError(f"conf/table/{spec.name}.yaml: report.depth.series_part {spec.view.series_part} is not a "
                          f"part of the cell name {row.cell!r} split at '/'") from None
    return name + "".join(f" {k}={v}" for k, v in row.axes.items()) + (f" [{','.join(row.extras)}]" if row.extras else "")


def row_depth(row: Row, key: str) -> float | None:
    """The depth of a row: the value of config key ``key`` its runs have (the most common one)."""
    values = [v for r in row.runs if r.config and (v := r.value(key)) is not None]
    if not values:
        return None
    try:
        return float(Counter(values).most_common(1)[0][0])
    except (TypeError, ValueError):
        raise ConfigError(f"view depth: {key}={values[0]!r} in the runs of {row.cell} is not a number; "
                          f"report.depth.x must name a numeric config key") from None


def depth_records(rows: list[Row], spec: TableSpec, paper: dict[str, Any], now: float,
                  stale_after_min: float) -> list[tuple[dict[str, Any], Row]]:
    """Per row, its record (the CSV row: its ``series`` and depth ``x``, then its row_record) and the row
    itself; by series in the table's order, then by depth. Rows without a depth (no run yet) come last,
    with x None."""
    shown = {m.name for m in spec.metrics}  # the view's own metrics too, should --metric have replaced them
    spec = replace(spec, metrics=[*spec.metrics, *(m for m in spec.view.metrics if m.name not in shown)])
    out = [({"series": depth_series(row, spec), "x": row_depth(row, spec.view.x),
             **row_record(row, spec, paper, now, stale_after_min)}, row) for row in rows]
    series = list(dict.fromkeys(rec["series"] for rec, _ in out))
    return sorted(out, key=lambda p: (p[0]["x"] is None, series.index(p[0]["series"]), p[0]["x"] or 0.0))


def _depth_label(depth: float) -> str:
    return f"{depth:g}"


def _depth_cell(rec: dict[str, Any], metric: Metric, best: float | None) -> str:
    mean, std = rec[f"{metric.name} mean"], rec[f"{metric.name} std"]
    text = "—" if mean is None else f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    if mean is not None and mean == best:
        text = f"**{text}**"
    marks = [f"†{rec['n_diverged']}"] if rec["n_diverged"] else []
    marks += [f"!{rec['n_failed']}"] if rec["n_failed"] else []
    not_done = sum(rec[f"n_{s}"] for s in NOT_DONE)
    marks += [f"?{not_done}"] if not_done else []
    return " ".join([text, *marks])


def depth_markdown(records: list[dict[str, Any]], spec: TableSpec) -> str:
    """Per metric of the view, a grid: one line per series, one column per depth."""
    placed = [r for r in records if r["x"] is not None]
    depths = sorted({r["x"] for r in placed})
    series = list(dict.fromkeys(r["series"] for r in placed))
    by_key = {(r["series"], r["x"]): r for r in placed}
    blocks = []
    for metric in spec.view.metrics:
        best = {d: _best([r for r in placed if r["x"] == d], metric) for d in depths}
        head = ["series", *(f"depth {_depth_label(d)}" for d in depths)]
        lines = [f"### {metric.name} against depth ({'↑' if metric.higher_is_better else '↓'})", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in series:
            cells = [_depth_cell(by_key[(name, d)], metric, best[d]) if (name, d) in by_key else "" for d in depths]
            lines.append("| " + " | ".join([name, *cells]) + " |")
        blocks.append("\n".join(lines))
    unplaced = [r["cell"] + (f" [{r['extra_overrides']}]" if r["extra_overrides"] else "")
                for r in records if r["x"] is None]
    if unplaced:
        blocks.append(f"Not drawn (no run, so no depth yet): {', '.join(unplaced)}.")
    return "\n\n".join(blocks)


DEPTH_READING = (
    "How to read it: one line per series (a cell's scheme, part {part} of its name), one column per depth "
    "(`{x}` of the runs' configs). Each entry is the mean ± sample standard deviation over the finished seeds, "
    "the best at each depth in bold, — where no seed finished with a value; †n: n seeds diverged (a "
    "non-finite training loss stopped them; steps in the table below), !n failed, ?n not done (running, "
    "interrupted, incomplete or missing). The plot {plot} draws the same: a dot per finished seed, the line "
    "through the means, an x along the top of the panel per diverged seed; each series a little apart on "
    "the (log) depth axis so that their points stay visible. Every record, entropy groups included: {csv}."
)


def draw_depth(points: list[tuple[dict[str, Any], Row]], spec: TableSpec, scale: str, now: float,
               stale_after_min: float):
    """Each metric of the view (one panel each) against depth (log x), one colour per series: a dot per
    finished seed's final value, a line through the means over finished seeds, an x along the top per
    diverged seed. Series are offset a little along x (a factor 10^(±0.012 k)) so their points stay apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator
    from matplotlib.transforms import blended_transform_factory

    view = spec.view
    placed = [(rec, row) for rec, row in points if rec["x"] is not None]
    series = list(dict.fromkeys(rec["series"] for rec, _ in placed))
    depths = sorted({rec["x"] for rec, _ in placed})
    fig, axes = plt.subplots(len(view.metrics), 1, figsize=(10, 3.4 * len(view.metrics) + 0.6), sharex=True,
                             constrained_layout=True, squeeze=False)
    for ax, metric in zip(axes[:, 0], view.metrics):
        top = blended_transform_factory(ax.transData, ax.transAxes)
        for i, name in enumerate(series):
            color, shift = f"C{i % 10}", 10 ** (0.012 * (i - (len(series) - 1) / 2))
            mine = sorted(((rec, row) for rec, row in placed if rec["series"] == name), key=lambda p: p[0]["x"])
            xs, means = [], []
            for rec, row in mine:
                x = rec["x"] * shift
                finished = [r.summary.get("metrics", {}).get(metric.name) for r in row.runs
                            if r.state(now, stale_after_min) == "finished"]
                values = [v for v in finished if v is not None and np.isfinite(v)]
                ax.scatter([x] * len(values), values, s=22, color=color, zorder=3, gid=f"seeds:{name}")
                if rec[f"{metric.name} mean"] is not None:
                    xs.append(x)
                    means.append(rec[f"{metric.name} mean"])
                if rec["n_diverged"]:
                    ax.plot([x] * rec["n_diverged"], [0.97 - 0.02 * (i % 6)] * rec["n_diverged"], "x", color=color,
                            markersize=8, transform=top, gid=f"diverged:{name}")
            ax.plot(xs, means, "-", color=color, label=name, gid=f"mean:{name}")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.15 * (high - low))  # a free band along the top for the diverged seeds' x
        ax.set(ylabel=f"{metric.name} ({'↑' if metric.higher_is_better else '↓'})\n(line: mean over finished seeds)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    bottom = axes[-1, 0]
    bottom.set_xlabel(f"depth ({view.x})")
    if depths:
        bottom.set_xticks(depths, [_depth_label(d) for d in depths])
        bottom.xaxis.set_minor_locator(NullLocator())
    markers = [Line2D([], [], marker="o", linestyle="", color="k", label="a finished seed"),
               Line2D([], [], marker="x", linestyle="", color="k", label="a diverged seed (drawn at the top)")]
    handles, _ = axes[0, 0].get_legend_handles_labels()
    axes[0, 0].legend(handles=handles + markers, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"{spec.name} (scale={scale}): {', '.join(m.name for m in view.metrics)} against depth")
    return fig


def write_depth(out_dir: Path, rows: list[Row], spec: TableSpec, scale: str, paper: dict[str, Any], now: float,
                stale_after_min: float) -> tuple[list[str], Path, Path]:
    """The depth view: its Markdown section (for <scale>.md), <scale>_depth.csv and the plot <scale>_vs_depth.png."""
    import matplotlib.pyplot as plt

    points = depth_records(rows, spec, paper, now, stale_after_min)
    records = [rec for rec, _ in points]
    csv_path, png_path = out_dir / f"{scale}_depth.csv", out_dir / f"{scale}_vs_depth.png"
    write_csv(csv_path, records)
    fig = draw_depth(points, spec, scale, now, stale_after_min)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    lines = [
        "## Against depth (view depth)", "",
        depth_markdown(records, spec), "",
        DEPTH_READING.format(part=spec.view.series_part, x=spec.view.x, plot=png_path.name, csv=csv_path.name), "",
        f"![{', '.join(m.name for m in spec.view.metrics)} against depth]({png_path.name})", "",
    ]
    return lines, csv_path, png_path


# -- the command ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", help=f"a table config in conf/table/ ({', '.join(table_names())})")
    parser.add_argument("runs_dir", nargs="?", default=None,
                        help="root of the run dirs (default: $SIGMA_REPRO_RUNS, else runs)")
    parser.add_argument("--scale", default="proxy", choices=SCALES, help="which runs (default: proxy)")
    parser.add_argument("--metric", default=None,
                        help="summary metric to aggregate instead of the table's own (its report.metrics)")
    parser.add_argument("--lower-is-better", action="store_true", help="with --metric: lower values are better")
    parser.add_argument("--seeds", default=None,
                        help="expected seeds, e.g. 0,1, when the sweep was run with seeds other than the table's")
    parser.add_argument("--lr-grid", default=None,
                        help="expected lr_scale values, e.g. 1, when the sweep was run with another lr_grid")
    parser.add_argument("--stale-after", type=float, default=STALE_AFTER_MIN,
                        help=f"minutes without a write after which a 'running' run counts as incomplete "
                             f"(default: {STALE_AFTER_MIN:g})")
    parser.add_argument("--records", default=None,
                        help="keep every ended run's summary.json here (paths made relative) and read back the "
                             "runs recorded here whose run dirs are gone, e.g. results/<table>/records")
    parser.add_argument("--out", default="results", help="tables go to <out>/<table>/<scale>.md and .csv "
                                                          "(with an lr_stability view: also _lr_stability.csv and "
                                                          "_loss_vs_lr.png)")


def run(args: argparse.Namespace) -> int:
    spec = load_table(args.table, args.seeds, args.lr_grid)
    root = runs_root(args.runs_dir)
    if not root.is_dir():
        raise ConfigError(f"runs dir {root.resolve()} does not exist; pass the runs dir as the second argument "
                          f"or set SIGMA_REPRO_RUNS (run the table first: sigma-repro-train table={spec.name} "
                          f"scale={args.scale})")
    runs, unreadable = find_runs(root)
    if args.records is not None:
        runs = keep_records(runs, Path(args.records), root)
    cells = [r for r in runs if r.experiment in spec.cells]
    used = [r for r in cells if r.scale == args.scale]
    if not used:
        elsewhere = f"; {len(cells)} runs of its cells at scale={_tally([r.scale for r in cells])}" if cells else ""
        raise ConfigError(f"no runs of table {spec.name!r} at scale={args.scale} under {root.resolve()} "
                          f"({len(runs)} summary.json found there{elsewhere}). Run it with "
                          f"`sigma-repro-train table={spec.name} scale={args.scale}`, or point to its runs dir.")
    now = time.time()
    paper = paper_values(spec.name)
    if args.metric is not None:
        spec.metrics = [Metric(args.metric, not args.lower_is_better)]
    rows = group_rows(spec, used)
    records = [row_record(row, spec, paper, now, args.stale_after) for row in rows]
    header = provenance_lines(args, spec, root, used, Counter(r.scale for r in cells if r.scale != args.scale),
                              unreadable)
    out_dir = Path(args.out) / spec.name
    view_lines, written = None, []
    if spec.view is not None:
        view_lines, paths = spec.view.write(out_dir, rows, spec, args.scale, paper, now, args.stale_after)
        written = [f"{'plot' if p.suffix == '.png' else 'view'}:  {p}" for p in paths]
    md_path, csv_path = write_table(out_dir, spec, args.scale, records, header, args.stale_after, view_lines)
    print(md_path.read_text())
    print("\n".join([f"table: {md_path}", f"data:  {csv_path}", *written]))
    return 0
