"""Lightning callback that logs attention entropy (and σReparam's σ, γ) every N steps, plus plots.

Why a callback: the paper's evidence is the entropy *curve* per layer over training, next to the
loss. The callback probes a fixed batch, so points differ only because the model changed; the probe
is one eval-mode no-grad forward (entropy.py), so it never alters training, and it runs on the
eager module under ``torch.compile``.

Contract with the LightningModule: ``pl_module.model`` is the nn.Module to probe and
``pl_module.probe_inputs(n) -> (args, kwargs)`` gives n fixed examples as arguments of
``pl_module.model(*args, **kwargs)``.

Outputs:
- logged every ``every_n_steps`` optimizer steps (and at step 0 and at the end of training) to all
  of ``trainer.loggers`` at ``step=trainer.global_step``, bypassing ``log_every_n_steps``:
  ``diag/attn_entropy/L{i:02d}`` (mean over heads; layers numbered in module order),
  ``diag/attn_entropy/L{i:02d}/H{h:02d}`` (if ``per_head``), ``diag/attn_entropy_norm/L{i:02d}``
  (entropy / log T_valid), ``diag/attn_entropy/min`` (lowest layer mean), and, for models with
  σReparam, ``diag/sigma/<matrix>`` and ``diag/gamma/<matrix>`` (e.g. ``blocks.0.attn.qkv``).
- the history of all probes, kept in the callback's state so a resumed run has the whole curve
  (the end-of-training probe comes after the last checkpoint is written, so a resumed run's
  history holds the regular grid up to its checkpoint, then continues);
- at fit end (rank zero), ``<save_dir or trainer.default_root_dir>/diagnostics.npz`` and
  ``plots/attention_entropy.png`` in the same directory.

``plot_entropy_curves`` and ``plot_entropy_comparison`` redraw those plots from saved files.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.fabric.utilities.apply_func import move_data_to_device
from matplotlib import colormaps
from matplotlib.figure import Figure

from sigma_repro.diagnostics.entropy import probe_attention_entropy
from sigma_repro.diagnostics.spectral import reparam_gammas, reparam_sigmas
from sigma_repro.errors import ConfigError

NPZ_NAME = "diagnostics.npz"
PLOT_PATH = "plots/attention_entropy.png"


class AttentionDiagnostics(pl.Callback):
    """Probe attention entropy on a fixed batch every ``every_n_steps`` optimizer steps.

    probe_size: examples in the probe batch (``pl_module.probe_inputs(probe_size)``).
    per_head: also log every head's entropy (the history always keeps per-head values).
    save_dir: where diagnostics.npz and plots/ go; None = ``trainer.default_root_dir``.
    """

    def __init__(self, every_n_steps: int = 10, probe_size: int = 64, per_head: bool = True,
                 save_dir: str | None = None) -> None:
        if every_n_steps < 1 or probe_size < 1:
            raise ConfigError(
                f"AttentionDiagnostics needs every_n_steps >= 1 and probe_size >= 1; got "
                f"every_n_steps={every_n_steps}, probe_size={probe_size}."
            )
        self.every_n_steps = every_n_steps
        self.probe_size = probe_size
        self.per_head = per_head
        self.save_dir = save_dir
        self._probe_inputs: tuple[tuple, dict] | None = None
        # Plain Python data only: it goes into checkpoints, which are loaded with weights_only=True.
        self.history: dict[str, list] = {
            "steps": [],         # [S] optimizer steps probed
            "layers": [],        # [L] attention module names, in module order
            "entropy": [],       # [S][L][H] per-head mean entropy
            "entropy_norm": [],  # [S][L][H] per-head mean entropy / log T_valid
            "sigma_names": [],   # [M] σReparam matrices (short names)
            "sigma": [],         # [S][M] tracked σ
            "gamma_names": [],   # [M'] matrices σReparam rescales
            "gamma": [],         # [S][M'] γ
        }

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, probe_size=self.probe_size)

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.history)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = copy.deepcopy(state_dict)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not callable(getattr(pl_module, "probe_inputs", None)) or not hasattr(pl_module, "model"):
            raise ConfigError(
                f"AttentionDiagnostics needs {type(pl_module).__name__} to have `model` (the nn.Module "
                "to probe) and `probe_inputs(n) -> (args, kwargs)`; add them or drop the callback."
            )
        self._probe_inputs = pl_module.probe_inputs(self.probe_size)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._probe_once(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._probe_once(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._probe_once(trainer, pl_module)  # the curve reaches the last step

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.history["steps"]:
            out_dir = Path(self.save_dir or trainer.default_root_dir)
            save_history(self.history, out_dir / NPZ_NAME)
            plot_entropy_curves(self.history, out_dir / PLOT_PATH)

    def _probe_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe and log at the current step unless it is already in the history (gradient
        accumulation repeats a step; a resumed run starts at a step it may have probed)."""
        step = trainer.global_step
        if self.history["steps"] and self.history["steps"][-1] >= step:
            return
        model = getattr(pl_module.model, "_orig_mod", pl_module.model)  # eager module under torch.compile
        precision = trainer.precision_plugin
        args, kwargs = precision.convert_input(move_data_to_device(self._probe_inputs, pl_module.device))
        with precision.forward_context():
            entropy, entropy_norm = probe_attention_entropy(model, args, kwargs)
        sigmas = {_short_name(k): v for k, v in reparam_sigmas(model).items()}
        gammas = {_short_name(k): v for k, v in reparam_gammas(model).items()}
        self._record(step, entropy, entropy_norm, sigmas, gammas)
        metrics = self._metrics(entropy, entropy_norm, sigmas, gammas)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _record(self, step: int, entropy: dict, entropy_norm: dict, sigmas: dict, gammas: dict) -> None:
        h = self.history
        if not h["steps"]:
            h["layers"], h["sigma_names"], h["gamma_names"] = list(entropy), list(sigmas), list(gammas)
        elif (list(entropy), list(sigmas), list(gammas)) != (h["layers"], h["sigma_names"], h["gamma_names"]):
            raise RuntimeError(
                "AttentionDiagnostics: the probed attention modules or σReparam matrices changed between "
                f"probes (before: {h['layers']}, now: {list(entropy)}); the probe forward must reach "
                "the same modules every time."
            )
        h["steps"].append(step)
        h["entropy"].append([v.tolist() for v in entropy.values()])
        h["entropy_norm"].append([v.tolist() for v in entropy_norm.values()])
        h["sigma"].append(list(sigmas.values()))
        h["gamma"].append(list(gammas.values()))

    def _metrics(self, entropy: dict, entropy_norm: dict, sigmas: dict, gammas: dict) -> dict[str, float]:
        metrics: dict[str, float] = {}
        layer_means = []
        for i, (heads, heads_norm) in enumerate(zip(entropy.values(), entropy_norm.values())):
            layer_means.append(float(heads.nanmean()))
            metrics[f"diag/attn_entropy/L{i:02d}"] = layer_means[-1]
            if self.per_head:
                metrics.update({f"diag/attn_entropy/L{i:02d}/H{j:02d}": float(v) for j, v in enumerate(heads)})
            metrics[f"diag/attn_entropy_norm/L{i:02d}"] = float(heads_norm.nanmean())
        metrics["diag/attn_entropy/min"] = min(layer_means)
        metrics.update({f"diag/sigma/{name}": v for name, v in sigmas.items()})
        metrics.update({f"diag/gamma/{name}": v for name, v in gammas.items()})
        return metrics


def _short_name(name: str) -> str:
    """Log name of a matrix: "blocks.0.attn.qkv.weight(.1)" -> "blocks.0.attn.qkv(.1)",
    "self_attn.in_proj_weight" -> "self_attn.in_proj"."""
    return re.sub(r"[._]weight(?=(\.\d+)?$)", "", name)


def save_history(history: dict[str, list], path: str | Path) -> None:
    """Write a probe history as .npz: steps (S,), layers (L,), entropy and entropy_norm (S, L, H)
    (NaN-padded where layers have fewer heads), and sigma/gamma (S, M) with their names if any."""
    arrays = {
        "steps": np.asarray(history["steps"], dtype=np.int64),
        "layers": np.asarray(history["layers"], dtype=str),
        "entropy": _padded(history["entropy"]),
        "entropy_norm": _padded(history["entropy_norm"]),
    }
    for kind in ("sigma", "gamma"):
        if history[f"{kind}_names"]:
            arrays[f"{kind}_names"] = np.asarray(history[f"{kind}_names"], dtype=str)
            arrays[kind] = np.asarray(history[kind], dtype=np.float32)  # (S, M)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def _padded(values: list[list[list[float]]]) -> np.ndarray:
    """[S][L][H_l] nested lists -> float32 (S, L, max H) with NaN where a layer has fewer heads."""
    n_heads = max((len(heads) for step in values for heads in step), default=0)
    out = np.full((len(values), len(values[0]) if values else 0, n_heads), np.nan, dtype=np.float32)
    for s, step in enumerate(values):
        for layer, heads in enumerate(step):
            out[s, layer, : len(heads)] = heads
    return out


def _entropy_curves(history_or_npz: dict | str | Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(steps (S,), layer names, layer-mean entropy (S, L)) from a history dict or a saved .npz."""
    if isinstance(history_or_npz, dict):
        steps, layers = np.asarray(history_or_npz["steps"]), list(history_or_npz["layers"])
        entropy = _padded(history_or_npz["entropy"])
    else:
        with np.load(history_or_npz) as saved:
            steps, layers, entropy = saved["steps"], saved["layers"].tolist(), saved["entropy"]
    return steps, layers, np.nanmean(entropy, axis=-1)


def _draw_entropy(ax, history_or_npz: dict | str | Path, title: str | None) -> None:
    """One line per layer, coloured by depth (dark = first layer)."""
    steps, layers, entropy = _entropy_curves(history_or_npz)
    for i, name in enumerate(layers):
        colour = colormaps["viridis"](i / max(len(layers) - 1, 1))
        ax.plot(steps, entropy[:, i], color=colour, label=f"L{i:02d} {name}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("attention entropy (nats, mean over heads)")
    ax.set_title(title or "Attention entropy per layer")
    ax.ticklabel_format(axis="y", useOffset=False)  # absolute nats, also when curves are flat
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=math.ceil(len(layers) / 12))


def plot_entropy_curves(history_or_npz_path: dict | str | Path, out_png: str | Path,
                        title: str | None = None) -> Path:
    """Entropy per layer over training, from a history (the callback's state) or diagnostics.npz."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    _draw_entropy(fig.subplots(), history_or_npz_path, title)
    return _save(fig, out_png)


def plot_entropy_comparison(runs: dict[str, str | Path], out_png: str | Path) -> Path:
    """Runs side by side (e.g. baseline vs σReparam): one subplot per run, shared entropy axis.

    runs: label -> diagnostics.npz path, in the order to draw them.
    """
    if not runs:
        raise ValueError("plot_entropy_comparison needs at least one run: {label: diagnostics.npz path}.")
    fig = Figure(figsize=(5 * len(runs), 4.5), layout="constrained")
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, (label, path) in zip(axes, runs.items()):
        _draw_entropy(ax, path, label)
    for ax in axes[1:]:
        ax.set_ylabel("")
    return _save(fig, out_png)


def _save(fig: Figure, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)  # a bare Figure renders with Agg: no pyplot, no display needed
    return out_png
