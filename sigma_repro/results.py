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
seeds, and every expected seed accounted for as finished, diverged, failed, running, incomplete or
missing. Nothing is dropped silently: runs of a cell with extra overrides (``trainer.max_steps=2``)
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from sigma_repro import provenance
from sigma_repro.config import CONF_DIR
from sigma_repro.errors import ConfigError

PAPER_REFERENCE = Path(__file__).resolve().parent.parent / "results" / "paper_reference.yaml"
RUN_STATES = ("finished", "diverged", "failed", "running", "incomplete")  # what a run dir can say
STATES = (*RUN_STATES, "missing")  # ... and an expected seed without a run dir
# A run that says "running" but has written nothing for this long is taken to be dead (killed hard,
# or waiting for a requeue): the CSV logger and checkpoints write at least every few minutes.
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
        """finished | diverged | failed | running | incomplete (says running, but nothing written lately)."""
        status = self.summary.get("status")
        if status not in ("finished", "diverged", "failed", "running"):
            raise ConfigError(f"{self.dir / 'summary.json'}: status {status!r} is not one of finished, diverged, "
                              f"failed, running; was it written by sigma-repro-train?")
        if status == "running" and now - _last_write(self.dir) > stale_after_min * 60:
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


def metric_curve(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric as logged in the run's metrics.csv; empty if it was never logged."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(metric)]
    return [int(float(r["step"])) for r in rows], [float(r[metric]) for r in rows]


# -- the table's expected runs --------------------------------------------------------------------
def table_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "table").glob("*.yaml"))


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
class TableSpec:
    """What a table expects: cells in row order, other swept keys with their values, seeds."""

    name: str
    cells: list[str]
    axes: dict[str, list[str]]
    seeds: list[int]


def load_table(name: str, seeds: str | None = None, lr_grid: str | None = None) -> TableSpec:
    """conf/table/<name>.yaml, with the swept ``seed`` / ``lr_scale`` values replaced as on the sweep's
    command line (``seed=0,1``, ``lr_scale=1``)."""
    if name not in table_names():
        raise ConfigError(f"unknown table {name!r}; the tables are: {', '.join(table_names())} "
                          f"(conf/table/*.yaml)")
    cfg = OmegaConf.load(CONF_DIR / "table" / f"{name}.yaml")
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
    return TableSpec(name, cells, {key: _values(v) for key, v in params.items()}, seed_list)


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


def _conditions(runs: list[Run]) -> dict[str, str]:
    """The conditions a table cell fixes, as the runs' resolved configs have them (values that
    differ between seeds are all shown, joined by '/'; a "running" stub has no config yet)."""
    runs = [r for r in runs if r.config]

    def each(get) -> str:
        return "/".join(sorted({str(get(r)) for r in runs})) if runs else ""
    return {
        "optimizer": each(lambda r: r.summary.get("choices", {}).get("optim")),
        "lr": each(lambda r: f"{r.config['optim']['lr']:.3g}"),
        "warmup": each(lambda r: "warmup" if r.config["schedule"]["warmup_steps"] > 0 else "no-warmup"),
        "weight_decay": each(lambda r: f"{r.config['optim'].get('weight_decay', 0.0):g}"),
        "norm": each(lambda r: "no-norm" if r.config["reparam"].get("remove_norms") else "norm"),
        "reparam": each(lambda r: r.config["reparam"]["name"]),
    }


def _mean_layers(run: Run, which: str) -> float | None:
    values = run.summary.get("attention_entropy", {}).get(which)
    return float(np.mean(values)) if values else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def row_record(row: Row, metric: str, paper: dict[str, Any], now: float, stale_after_min: float) -> dict[str, Any]:
    """One row as plain data (the CSV row): conditions, seeds by state, metric and diagnostics."""
    by_state: dict[str, list[Run]] = {s: [] for s in RUN_STATES}
    for run in sorted(row.runs, key=lambda r: r.seed):
        by_state[run.state(now, stale_after_min)].append(run)
    seeds = {s: [r.seed for r in by_state[s]] for s in RUN_STATES}
    seeds["missing"] = [s for s in row.expected_seeds if s not in {r.seed for r in row.runs}]
    finished = [r.summary.get("metrics", {}).get(metric) for r in by_state["finished"]]
    values = [v for v in finished if v is not None]
    ended = by_state["finished"] + by_state["diverged"]  # both say how attention behaved to the end
    return {
        "cell": row.cell, **row.axes, "extra_overrides": ",".join(row.extras),
        **_conditions(row.runs),
        f"{metric} mean": float(np.mean(values)) if values else None,
        f"{metric} std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        f"{metric} n": len(values),
        **{f"n_{s}": len(seeds[s]) for s in STATES},
        **{f"seeds_{s}": ",".join(map(str, seeds[s])) for s in STATES},
        "diverged_steps": ",".join(str(r.summary.get("diverged_step")) for r in by_state["diverged"]),
        "attn_entropy_final": _mean([_mean_layers(r, "final") for r in ended]),
        "attn_entropy_min": _mean([_mean_layers(r, "min") for r in ended]),
        "loss_spikes": _mean([r.summary.get("loss_spikes") for r in ended]),
        "paper": paper.get(row.cell) if not row.extras else None,
        "run_dirs": ";".join(str(r.dir) for r in row.runs),
    }


# -- Markdown -------------------------------------------------------------------------------------
def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _seeds_text(rec: dict[str, Any], state: str) -> str:
    return f"{state} {rec[f'seeds_{state}']}" if rec[f"n_{state}"] else ""


def markdown_row(rec: dict[str, Any], spec: TableSpec, metric: str) -> list[str]:
    cell = rec["cell"].removeprefix(spec.name + "/")
    if rec["extra_overrides"]:
        cell += f" [{rec['extra_overrides']}]"
    score = _num(rec[f"{metric} mean"], 4)
    if rec[f"{metric} std"] is not None:
        score += f" ± {rec[f'{metric} std']:.4f}"
    if rec[f"{metric} n"] < rec["n_finished"]:
        score += f" (of {rec[f'{metric} n']})"
    diverged = str(rec["n_diverged"])
    if rec["n_diverged"]:
        diverged += " (" + ", ".join(f"s{s} @ {d}" for s, d in zip(rec["seeds_diverged"].split(","),
                                                                   rec["diverged_steps"].split(","))) + ")"
    failed = str(rec["n_failed"]) + (f" (s{rec['seeds_failed']})" if rec["n_failed"] else "")
    not_done = "; ".join(filter(None, (_seeds_text(rec, s) for s in ("running", "incomplete", "missing"))))
    return [cell, *(rec[k] for k in spec.axes), rec["optimizer"], rec["lr"], rec["warmup"], rec["weight_decay"],
            rec["norm"], rec["reparam"], score, str(rec["n_finished"]), diverged, failed, not_done,
            _num(rec["attn_entropy_final"], 3), _num(rec["attn_entropy_min"], 3), _num(rec["loss_spikes"], 1),
            "" if rec["paper"] is None else str(rec["paper"])]


def markdown_table(records: list[dict[str, Any]], spec: TableSpec, metric: str) -> str:
    head = ["cell", *spec.axes, "optimizer", "lr", "warmup", "weight decay", "norm", "reparam",
            f"{metric} (mean ± std)", "finished", "diverged", "failed", "not done (seeds)",
            "attn entropy final", "attn entropy min", "loss spikes", "paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(markdown_row(r, spec, metric)) + " |" for r in records]
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
        f"- Runs: {len(used)} run dirs under `{root.resolve()}`, {hours:.2f} h of wall time in all; "
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
             "--metric", args.metric, "--stale-after", f"{args.stale_after:g}", "--out", args.out]
    for option, value in (("--seeds", args.seeds), ("--lr-grid", args.lr_grid)):
        if value is not None:
            parts += [option, value]
    return " ".join(parts)


READING = (
    "How to read it: `{metric}` is the mean ± sample standard deviation (ddof 1) over the finished seeds "
    "(the final value each run recorded); attention entropy (nats, mean over layers of each run's final and "
    "minimum-over-training value) and loss spikes are averaged over finished and diverged seeds. "
    "*diverged* runs hit a non-finite loss (seed @ step); *failed* runs raised an error (summary.json says "
    "which); *running* runs are in progress; *incomplete* runs say running but have written nothing for "
    "{stale:g} minutes (killed, or waiting for a requeue: re-run the sweep command to resume them); "
    "*missing* seeds have no run dir. `paper` is the published number from results/paper_reference.yaml "
    "(full scale; empty where not known). Rows with [overrides] are runs of the cell with extra "
    "command-line overrides, kept apart from the table's own runs. Per-row run dirs are in the CSV."
)


def write_table(out_dir: Path, spec: TableSpec, scale: str, records: list[dict[str, Any]], header: list[str],
                metric: str, stale_after_min: float) -> tuple[Path, Path]:
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
        markdown_table(records, spec, metric), "",
        READING.format(metric=metric, stale=stale_after_min), "",
    ]))
    return md_path, csv_path


# -- the command ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", help=f"a table config in conf/table/ ({', '.join(table_names())})")
    parser.add_argument("runs_dir", nargs="?", default=None,
                        help="root of the run dirs (default: $SIGMA_REPRO_RUNS, else runs)")
    parser.add_argument("--scale", default="proxy", choices=["proxy", "full"], help="which runs (default: proxy)")
    parser.add_argument("--metric", default="val/acc", help="summary metric to aggregate (default: val/acc)")
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
    records = [row_record(row, args.metric, paper, now, args.stale_after) for row in group_rows(spec, used)]
    header = provenance_lines(args, spec, root, used, Counter(r.scale for r in cells if r.scale != args.scale),
                              unreadable)
    md_path, csv_path = write_table(Path(args.out) / spec.name, spec, args.scale, records, header, args.metric,
                                    args.stale_after)
    print(md_path.read_text())
    print(f"table: {md_path}\ndata:  {csv_path}")
    return 0
