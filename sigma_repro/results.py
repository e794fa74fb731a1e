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
from dataclasses import dataclass, field
from datetime import datetime, timezone
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
    it reports (its ``report:`` block: metrics, the first being the headline, and condition columns)."""

    name: str
    cells: list[str]
    axes: dict[str, list[str]]
    seeds: list[int]
    metrics: list[Metric]
    columns: list[str]


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
    "model": lambda r: r.summary.get("choices", {}).get("model"),
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
    metrics, columns = _report(name, OmegaConf.to_container(cfg.get("report"), resolve=True) if "report" in cfg else None)
    return TableSpec(name, cells, {key: _values(v) for key, v in params.items()}, seed_list, metrics, columns)


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
            _num(rec["loss_spikes"], 1), "" if rec["paper"] is None else str(rec["paper"])]


def markdown_table(records: list[dict[str, Any]], spec: TableSpec) -> str:
    head = ["cell", *spec.axes, *(c.replace("_", " ") for c in spec.columns),
            *(f"{m.name} (mean ± std, {'↑' if m.higher_is_better else '↓'})" for m in spec.metrics),
            "finished", "diverged", "failed", "not done (seeds)",
            "attention entropy final", "attention entropy min", "loss spikes", "paper"]
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
    for option, value in (("--seeds", args.seeds), ("--lr-grid", args.lr_grid)):
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


def write_table(out_dir: Path, spec: TableSpec, scale: str, records: list[dict[str, Any]], header: list[str],
                stale_after_min: float) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{scale}.csv", out_dir / f"{scale}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    md_path.write_text("\n".join([
        f"# Table {spec.name} (scale={scale})", "",
        f"What it reproduces and how it was run: recipes/{spec.name}.md.", "",
        *header, "",
        markdown_table(records, spec), "",
        READING.format(metrics=" and ".join(f"`{m.name}`" for m in spec.metrics)
                       + (" is" if len(spec.metrics) == 1 else " are"), stale=stale_after_min), "",
    ]))
    return md_path, csv_path


# -- the command ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", help=f"a table config in conf/table/ ({', '.join(table_names())})")
    parser.add_argument("runs_dir", nargs="?", default=None,
                        help="root of the run dirs (default: $SIGMA_REPRO_RUNS, else runs)")
    parser.add_argument("--scale", default="proxy", choices=["proxy", "full"], help="which runs (default: proxy)")
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
    parser.add_argument("--out", default="results", help="tables go to <out>/<table>/<scale>.md and .csv")


def run(args: argparse.Namespace) -> int:
    spec = load_table(args.table, args.seeds, args.lr_grid)
    root = runs_root(args.runs_dir)
    if not root.is_dir():
        raise ConfigError(f"runs dir {root.resolve()} does not exist; pass the runs dir as the second argument "
                          f"or set SIGMA_REPRO_RUNS (run the table first: sigma-repro-train table={spec.name} "
                          f"scale={args.scale})")
    runs, unreadable = find_runs(root)
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
    records = [row_record(row, spec, paper, now, args.stale_after) for row in group_rows(spec, used)]
    header = provenance_lines(args, spec, root, used, Counter(r.scale for r in cells if r.scale != args.scale),
                              unreadable)
    md_path, csv_path = write_table(Path(args.out) / spec.name, spec, args.scale, records, header, args.stale_after)
    print(md_path.read_text())
    print(f"table: {md_path}\ndata:  {csv_path}")
    return 0
