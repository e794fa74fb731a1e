"""Entropy-collapse demo: a small ViT on embedded digits, plain vs σReparam, same recipe.

Runs the Hydra app twice (``experiment=demo/plain`` and ``experiment=demo/sigma``) — real runs in
ordinary run dirs, so a second ``sigma-repro demo`` prints the stored results at once — then prints
a table (final accuracy, final and minimum attention entropy per layer, loss spikes, divergence)
and writes ``<runs>/demo/attention_entropy.png``, ``train_loss.png`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from sigma_repro.errors import ConfigError
from sigma_repro.results import metric_curve

EXPERIMENTS = {"plain": "demo/plain", "sigma": "demo/sigma"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", default="runs", help="root of the run dirs (default: runs)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs, e.g. optim.lr=3e-3")


def launch(experiment: str, runs_dir: str, overrides: list[str]) -> Path:
    """Run the training app in a subprocess (progress bar on the terminal); return its run dir."""
    cmd = [sys.executable, "-m", "sigma_repro.train", f"experiment={experiment}", f"paths.runs_dir={runs_dir}", *overrides]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    run_dir = next((line.split(None, 2)[2] for line in proc.stdout.splitlines() if line.strip().startswith("run dir")), None)
    if proc.returncode != 0 or run_dir is None:
        raise ConfigError(f"the {experiment} run failed (exit {proc.returncode}); see its output above.")
    return Path(run_dir)


def run_row(label: str, run_dir: Path) -> dict:
    from sigma_repro.diagnostics.callbacks import load_diagnostics

    summary = json.loads((run_dir / "summary.json").read_text())
    diag = load_diagnostics(run_dir / "diagnostics.npz")
    layer_means = diag["attention_entropy"].mean(axis=2)  # (steps, layers): mean over heads
    return {
        "label": label,
        "status": summary["status"],
        "diverged_step": summary.get("diverged_step"),
        "val_acc": summary["metrics"].get("val/acc", float("nan")),
        "loss_spikes": summary.get("loss_spikes", 0),
        "entropy_init": layer_means[0],
        "entropy_final": layer_means[-1],
        "entropy_min": layer_means.min(axis=0),
        "run_dir": run_dir,
    }


def plot_train_loss(run_dirs: dict[str, Path], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
    for label, run_dir in run_dirs.items():
        ax.plot(*metric_curve(run_dir, "train/loss"), label=label)
    ax.set(xlabel="optimizer step", ylabel="train loss (nats)", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    n_layers = len(rows[0]["entropy_final"])
    fmt = lambda xs: " ".join(f"{x:4.2f}" for x in xs)  # noqa: E731
    head = f"| run | status | val acc | loss spikes | entropy per layer L0..L{n_layers - 1}: init / final / min |"
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] + (f" @ step {r['diverged_step']}" if r["diverged_step"] is not None else "")
        lines.append(
            f"| {r['label']} | {status} | {r['val_acc']:.3f} | {r['loss_spikes']} | "
            f"{fmt(r['entropy_init'])} / {fmt(r['entropy_final'])} / {fmt(r['entropy_min'])} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from sigma_repro.diagnostics.callbacks import plot_entropy_comparison

    run_dirs = {label: launch(exp, args.runs_dir, args.overrides) for label, exp in EXPERIMENTS.items()}
    rows = [run_row(label, d) for label, d in run_dirs.items()]
    out_dir = Path(args.runs_dir) / "demo"
    png = out_dir / "attention_entropy.png"
    plot_entropy_comparison({label: d / "diagnostics.npz" for label, d in run_dirs.items()}, png)
    plot_train_loss(run_dirs, out_dir / "train_loss.png")
    table = format_table(rows)
    overrides = " ".join(args.overrides) or "(none)"
    (out_dir / "summary.md").write_text(
        f"# sigma-repro demo\n\nextra overrides: {overrides}\n\n{table}\n\n"
        + "\n".join(f"- {r['label']}: {r['run_dir']}" for r in rows) + "\n"
    )
    print("\nAttention entropy (nats; log T = log 17 = 2.83 at uniform attention):\n")
    print(table)
    print(f"\nplots: {png}, {out_dir / 'train_loss.png'}\ntable: {out_dir / 'summary.md'}")
    return 0
