"""Entropy collapse in training: the digits ViT at several learning rates, baseline vs σReparam.

The demo's setting (``experiment=demo/plain`` and ``demo/sigma``: 6-block ViT on digits, AdamW, no
warmup, constant rate) at each learning rate of a grid. The baseline runs with
``reparam=sigma_stats``, which tracks σ of every matrix without changing the model, so both runs
have σ curves. Each run is a real run of the training app (its run dir has every diagnostic:
entropy per layer and head, σ and γ, token cosine, Q/K/V/O gradient norms, logit norms); this
command gathers them into one table and one figure: per learning rate, the minimum over layers of
the attention entropy, the largest σ of the attention qkv matrices, and the training loss.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sigma_repro.analysis.report import write_report
from sigma_repro.demo import launch, run_row
from sigma_repro.diagnostics.callbacks import load_diagnostics
from sigma_repro.results import metric_curve

RUNS = {"baseline": ("demo/plain", ["reparam=sigma_stats"]), "sigma": ("demo/sigma", [])}


def qkv_norm_curve(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, largest spectral norm of the attention qkv weights the model computes with).

    That is σ(W) for the baseline (tracked by sigma_stats) and γ for σReparam, whose Ŵ = γ/σ·W
    has spectral norm γ."""
    diag = load_diagnostics(run_dir / "diagnostics.npz")
    kind = "gamma" if "gamma_names" in diag else "sigma"
    columns = [i for i, name in enumerate(diag[f"{kind}_names"]) if "qkv" in str(name)]
    return diag["steps"], diag[kind][:, columns].max(axis=1)


def min_entropy_curve(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    diag = load_diagnostics(run_dir / "diagnostics.npz")
    return diag["steps"], np.nanmean(diag["attention_entropy"], axis=2).min(axis=1)  # mean over heads, min over layers


def plot(run_dirs: dict[tuple[float, str], Path], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({lr for lr, _ in run_dirs})
    panels = (("min attention entropy over layers (nats)", min_entropy_curve, False),
              ("max spectral norm of attention qkv (σ(W), or γ)", qkv_norm_curve, True),
              ("train loss", lambda d: metric_curve(d, "train/loss"), True))
    fig, axes = plt.subplots(len(lrs), 3, figsize=(13, 3.2 * len(lrs)), constrained_layout=True, squeeze=False)
    for row, lr in zip(axes, lrs):
        for ax, (label, curve, logy) in zip(row, panels):
            for name in RUNS:
                if (lr, name) in run_dirs:
                    ax.plot(*curve(run_dirs[lr, name]), label=name)
            ax.set(title=f"lr {lr:g}: {label}", xlabel="optimizer step", yscale="log" if logy else "linear")
            ax.grid(alpha=0.3)
        row[0].legend()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _lrs(rows: list[dict]) -> str:
    return ", ".join(f"lr {r['lr']:g}" for r in rows) or "none"


def _runs(rows: list[dict]) -> str:
    return ", ".join(f"{r['run']} at lr {r['lr']:g}" for r in rows) or "none"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lrs", default="0.003,0.01,0.03", help="AdamW learning rates (default 0.003,0.01,0.03)")
    parser.add_argument("--runs-dir", default="runs", help="root of the run dirs (runs are reused if done)")
    parser.add_argument("--out", default="results/analysis", help="directory for the table and plot")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. seed=1")


def run(args: argparse.Namespace) -> int:
    lrs = [float(x) for x in args.lrs.split(",")]
    run_dirs = {(lr, name): launch(exp, args.runs_dir, [*extra, f"optim.lr={lr}", *args.overrides])
                for lr in lrs for name, (exp, extra) in RUNS.items()}
    rows = []
    for (lr, name), run_dir in run_dirs.items():
        r = run_row(name, run_dir)
        _, qkv_norm = qkv_norm_curve(run_dir)
        rows.append({"lr": lr, "run": name, "status": r["status"], "diverged_step": r["diverged_step"],
                     "val_acc": round(r["val_acc"], 4), "loss_spikes": r["loss_spikes"],
                     "entropy_final_min_layer": round(float(r["entropy_final"].min()), 4),
                     "entropy_min_over_training": round(float(r["entropy_min"].min()), 4),
                     "qkv_norm_init": round(float(qkv_norm[0]), 3), "qkv_norm_max": round(float(qkv_norm.max()), 3),
                     "run_dir": str(run_dir)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(run_dirs, out / "training_collapse.png")
    collapsed = [r for r in rows if r["run"] == "baseline" and r["entropy_min_over_training"] < 0.5]
    held = [r for r in rows if r["run"] == "sigma" and r["entropy_min_over_training"] >= 1.0]
    stuck = [r for r in rows if r["val_acc"] < 0.2]
    path = write_report(
        out, "training_collapse",
        title="Attention-entropy collapse in training (ViT on digits)",
        claim="low attention entropy accompanies training instability (loss oscillation, divergence); "
              "σReparam, by bounding the spectral norms, prevents entropy collapse and stabilises training.",
        method="the demo setting (6-block ViT, width 64, 4 heads, 17 tokens, digits, batch 128, AdamW, no "
               "warmup, no weight decay, constant lr, 500 steps, seed 0) at each learning rate, baseline "
               "(reparam=sigma_stats: σ tracked, model unchanged) vs σReparam (γ = σ at init, γ at the same lr). "
               "Entropy: mean over heads and 64 fixed validation images, every 10 steps; qkv norm: the "
               "spectral norm of each block's effective fused qkv matrix (largest over blocks).",
        findings=f"baseline runs whose entropy fell below 0.5 nats in some layer: {_lrs(collapsed)}; σReparam "
                 f"runs whose every layer stayed at or above 1.0 nats: {_lrs(held)}. Runs that did not learn "
                 f"(validation accuracy < 0.2): {_runs(stuck)}. "
                 "qkv_norm is the spectral norm of the qkv weights the model computes with: σ(W) for the "
                 "baseline, γ for σReparam (Ŵ = γ/σ·W). Per row below: status, validation accuracy, loss spikes, "
                 "entropy and that norm.",
        rows=rows, figure="training_collapse.png",
    )
    print(path.read_text())
    return 0
