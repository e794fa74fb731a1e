"""`sigma-repro compare`: chosen metrics of several runs on shared axes, the local W&B workspace view.

Each argument is a run dir, a dir holding run dirs (every run below it), or a filter on the
experiment cell such as ``'vit_optimizers/sgd_*'`` (fnmatch, resolved against the runs dir);
``--scale`` and ``--seed`` narrow the result. Curves come from each run's metrics.csv (x = optimizer
step): one subplot per metric, one line per run in the same colour on every subplot, labelled with
its experiment and whatever tells it apart from the others (lr_scale, seed, scale, other overrides).
A run that never logged a metric is left out of that subplot, with a note. Losses are drawn on a
log axis (``--logy``), where a divergence and the curves before it both stay readable.
"""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path

from sigma_repro.errors import ConfigError
from sigma_repro.results import Run, find_runs, metric_curve, runs_root

DEFAULT_LOGY = "train/loss,val/loss"


def _under(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def resolve_runs(targets: list[str], root: Path, scale: str | None = None,
                 seed: int | None = None) -> tuple[list[Run], list[str]]:
    """Runs named by ``targets`` (dirs, or filters on the experiment cell resolved in the runs dir
    ``root``), in argument order, each once; and a note for every summary.json that could not be read."""
    filters = [t for t in targets if not Path(t).is_dir()]
    in_root, notes = find_runs(root) if filters and root.is_dir() else ([], [])
    chosen: dict[Path, Run] = {}
    for target in targets:
        path = Path(target)
        if path.is_dir():
            found, unreadable = find_runs(path, root if _under(path, root) else path)
            notes += unreadable
        else:
            found = [r for r in in_root if fnmatch.fnmatch(r.experiment, target)]
        for run in found:
            if (scale is None or run.scale == scale) and (seed is None or run.seed == seed):
                chosen.setdefault(run.dir.resolve(), run)
    if not chosen:
        known = sorted({r.experiment for r in in_root})
        raise ConfigError(
            f"no runs match {' '.join(targets)}" + (f" at scale={scale}" if scale else "")
            + (f" with seed={seed}" if seed is not None else "")
            + f". Arguments are run dirs or fnmatch filters on the experiment cell, resolved in {root.resolve()}"
            + (f"; experiments there: {', '.join(known)}" if known else ""))
    return list(chosen.values()), notes


def labels(runs: list[Run]) -> list[str]:
    """Experiment plus the identity values (overrides, seed, scale) that differ between the runs."""
    facts = [{**run.overrides, "seed": str(run.seed), "scale": run.scale} for run in runs]
    keys = sorted({k for f in facts for k in f})
    telling = [k for k in keys if len({f.get(k) for f in facts}) > 1]
    out = []
    for run, f in zip(runs, facts):
        label = " ".join([run.experiment, *(f"{k}={f.get(k, '-')}" for k in telling)])
        status = run.summary.get("status")
        if status == "diverged":
            label += f" (diverged @ {run.summary.get('diverged_step')})"
        elif status != "finished":
            label += f" ({status})"
        out.append(label)
    return out


def draw(runs: list[Run], metrics: list[str], logy: frozenset[str] = frozenset()):
    """The figure, what each subplot shows ({metric: [labels]}) and notes on what was left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.8 * len(metrics)), sharex=True, squeeze=False,
                             constrained_layout=True)
    plotted: dict[str, list[str]] = {m: [] for m in metrics}
    notes = []
    for i, (run, label) in enumerate(zip(runs, labels(runs))):
        if not (run.dir / "metrics.csv").exists():
            notes.append(f"{label}: no metrics.csv in {run.dir}, left out")
            continue
        for ax, metric in zip(axes[:, 0], metrics):
            steps, values = metric_curve(run.dir, metric)
            if not steps:
                notes.append(f"{label}: never logged {metric}, left out of that plot")
                continue
            sparse = len(steps) < 30  # e.g. val/acc once an epoch: dots, so even one point shows
            ax.plot(steps, values, color=f"C{i % 10}", label=label, marker="." if sparse else None)
            plotted[metric].append(label)
    for ax, metric in zip(axes[:, 0], metrics):
        ax.set(ylabel=metric, title=metric, yscale="log" if metric in logy else "linear")
        ax.grid(alpha=0.3)
        if plotted[metric]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no run logged {metric}", ha="center", va="center", transform=ax.transAxes)
    axes[-1, 0].set_xlabel("optimizer step")
    return fig, plotted, notes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run dirs, dirs of run dirs, or filters on the experiment cell, "
                             "e.g. 'vit_optimizers/sgd_*'")
    parser.add_argument("--metrics", default=None,
                        help="comma list of metrics.csv columns (default: train/loss, each run's headline metric, "
                             "diag/attention_entropy/min)")
    parser.add_argument("--logy", default=DEFAULT_LOGY,
                        help=f"metrics drawn on a log axis (default: {DEFAULT_LOGY}; '' for none)")
    parser.add_argument("--runs-dir", default=None, help="where filters look (default: $SIGMA_REPRO_RUNS, else runs)")
    parser.add_argument("--scale", choices=["proxy", "full"], default=None, help="only runs at this scale")
    parser.add_argument("--seed", type=int, default=None, help="only runs with this seed")
    parser.add_argument("--out", default="compare.png", help="the PNG to write (default: compare.png)")


def default_metrics(runs: list[Run]) -> list[str]:
    """train/loss, the headline metric of each run's task (val/acc, val/ppl, ...; runs from before
    summaries named it: val/acc) and the minimum attention entropy."""
    headlines = [r.summary.get("headline_metric", {}).get("name", "val/acc") for r in runs]
    return ["train/loss", *dict.fromkeys(headlines), "diag/attention_entropy/min"]


def run(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    runs, unreadable = resolve_runs(args.runs, runs_root(args.runs_dir), args.scale, args.seed)
    metrics = ([m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics is not None
               else default_metrics(runs))
    fig, plotted, notes = draw(runs, metrics, frozenset(args.logy.split(",")))
    notes += [f"unreadable, not plotted: {note}" for note in unreadable]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"{out}: {len(metrics)} metrics of {len(runs)} runs")
    for metric, shown in plotted.items():
        print(f"  {metric}: {len(shown)} runs" + "".join(f"\n    {label}" for label in shown))
    for note in notes:
        print(f"  note: {note}")
    return 0
