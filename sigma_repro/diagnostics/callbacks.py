"""Lightning callback that logs the attention diagnostics every N steps, plus plots.

Why a callback: the paper's evidence is the entropy *curve* per layer over training, next to the
loss, and the neighbouring papers' evidence is how rank collapse, query/key gradients and logit
norms move with it. The callback probes a fixed batch, so points differ only because the model
changed. Everything but the gradients comes from ONE eval-mode no-grad forward on that batch
(entropy.py's hooks plus rank.py's block hooks) and from reading weights, so it never alters
training, and it runs on the eager module under ``torch.compile``. The gradient norms are read
from the training step's own gradients at probe steps (``on_before_optimizer_step``: after the
backward and AMP unscaling, before clipping and the update), so they cost no extra pass.

Contract with the LightningModule: ``pl_module.model`` is the nn.Module to probe and
``pl_module.probe_inputs(n) -> (args, kwargs)`` gives n fixed examples as arguments of
``pl_module.model(*args, **kwargs)``.

Outputs, logged every ``every_n_steps`` optimizer steps (and at step 0 and at the end of training)
to all of ``trainer.loggers`` at ``step=trainer.global_step``, bypassing ``log_every_n_steps``.
Attention layers ``L{i:02d}`` are numbered by the model's attention modules (attention_kinds.py)
in module order, blocks ``B{i:02d}`` by the blocks the model declares or the ``blocks`` patterns
pick (rank.py):
- ``diag/attention_entropy/L{i:02d}`` (mean over heads), ``.../L{i:02d}/H{h:02d}`` (if ``per_head``),
  ``diag/attention_entropy_norm/L{i:02d}`` (entropy / log T_valid), ``diag/attention_entropy/min``;
- ``diag/token_cosine/B{i:02d}``, ``diag/residual_ratio/B{i:02d}`` (if ``rank_collapse``);
- ``diag/attention_logit_norm/L{i:02d}``: the entropy bound's σ = ||W_K,h W_Q,hᵀ||₂·scale, max over
  heads, per head under ``/H{h:02d}`` (if ``logit_norms``; spectral.py);
- ``diag/grad_norm/{q,k,v,o}/L{i:02d}`` and ``diag/grad_ratio_qv/L{i:02d}`` = ||∂L/∂W_Q|| /
  ||∂L/∂W_V|| of the training batch at the probe steps except the last (if ``grad_norms``);
- for models with σReparam, ``diag/sigma/<matrix>`` and ``diag/gamma/<matrix>`` (e.g.
  ``blocks.0.attn.qkv``), and (if ``sigma_tracking_error``) ``diag/sigma_tracking_error/<matrix>``,
  (exact σ by SVD − tracked σ) / exact σ, with ``diag/sigma_tracking_error/max``: how far one power
  step per update lets σ lag (``reparam.power_iters`` bounds it). It compares the σ as the probe
  finds it (the power step the last update left due is not taken: the probe changes nothing). Without the plugin there is no σ to log (exact SVDs of every matrix
  every N steps are too slow at ViT-B size): run ``reparam=sigma_stats`` to track σ by power
  iteration in a baseline run without changing it.
The history of all probes is kept in the callback's state (plain data), so a resumed run has the
whole curve (the end-of-training probe comes after the last checkpoint is written, so a resumed
run's history holds the regular grid up to its checkpoint, then continues). At fit end (rank
zero) it goes to ``<save_dir or trainer.default_root_dir>/diagnostics.npz`` with plots in
``plots/`` there: ``attention_entropy.png`` (entropy per layer over steps), ``entropy_heads.png``
(layers × heads at the last probe) and ``sigma.png`` (σReparam's σ over steps, when tracked).

``plot_entropy_curves``, ``plot_entropy_comparison``, ``plot_entropy_heads`` and
``plot_sigma_curves`` redraw plots from saved files; ``load_diagnostics`` reads diagnostics.npz,
also one written before the history keys were renamed (``RENAMED_KEYS``).
"""

from __future__ import annotations

import copy
import math
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import nn

from sigma_repro.diagnostics.attention_kinds import attention_modules, attention_projections
from sigma_repro.diagnostics.entropy import probe_attention_entropy
from sigma_repro.diagnostics.gradients import ROLES, attention_grad_norms
from sigma_repro.diagnostics.rank import capture_rank_collapse, transformer_blocks
from sigma_repro.diagnostics.spectral import attention_logit_norms, reparam_gammas, reparam_sigmas
from sigma_repro.errors import ConfigError
from sigma_repro.reparam import sigma_tracking_error

NPZ_NAME = "diagnostics.npz"
PLOT_PATH = "plots/attention_entropy.png"
HEADS_PLOT_PATH = "plots/entropy_heads.png"
SIGMA_PLOT_PATH = "plots/sigma.png"
# History keys of files and checkpoints written before one concept got one name everywhere.
RENAMED_KEYS = {"entropy": "attention_entropy", "entropy_norm": "attention_entropy_norm",
                "logit_layers": "attention_logit_layers", "logit_norm": "attention_logit_norm"}


def _empty_history() -> dict[str, list]:
    # Plain Python data only: it goes into checkpoints, which are loaded with weights_only=True.
    return {
        "steps": [],           # [S] optimizer steps probed
        "layers": [],          # [L] attention modules the probe forward called, in module order
        "attention_entropy": [],       # [S][L][H] per-head mean entropy
        "attention_entropy_norm": [],  # [S][L][H] per-head mean entropy / log T_valid
        "sigma_names": [],     # [M] σReparam matrices (short names)
        "sigma": [],           # [S][M] tracked σ
        "gamma_names": [],     # [M'] matrices σReparam rescales
        "gamma": [],           # [S][M'] γ
        "sigma_tracking_error_names": [],  # [M''] σReparam matrices (per split block)
        "sigma_tracking_error": [],        # [S][M''] (exact σ - tracked σ) / exact σ
        "blocks": [],          # [B] transformer blocks (rank collapse)
        "token_cosine": [],    # [S][B]
        "residual_ratio": [],  # [S][B]
        "attention_logit_layers": [],  # [L'] attention modules with readable W_Q, W_K
        "attention_logit_norm": [],    # [S][L'][H] ||W_K,h W_Q,hᵀ||₂·scale
        "grad_steps": [],      # [G] optimizer steps whose training gradients were read
        "grad_layers": [],     # [L''] attention modules with gradients
        "grad_norm": [],       # [G][L''][4] ||∂L/∂W|| for W_Q, W_K, W_V, W_O (NaN: no such gradient)
    }


class AttentionDiagnostics(pl.Callback):
    """Probe attention diagnostics on a fixed batch every ``every_n_steps`` optimizer steps.

    probe_size: examples in the probe batch (``pl_module.probe_inputs(probe_size)``).
    per_head: also log every head's entropy and logit norm (the history always keeps per-head values).
    save_dir: where diagnostics.npz and plots/ go; None = ``trainer.default_root_dir``.
    rank_collapse: token cosine and residual ratio of every block output, from the probe forward.
    grad_norms: W_Q, W_K, W_V, W_O gradient norms of the training step at probe steps.
    logit_norms: per-head ||W_K,h W_Q,hᵀ||₂·scale from the effective weights.
    sigma_tracking_error: with σReparam, tracked σ against an exact SVD of every matrix.
    blocks: fnmatch pattern(s) naming the transformer blocks (rank.py); None = the blocks the
        model declares.
    """

    def __init__(self, every_n_steps: int = 10, probe_size: int = 64, per_head: bool = True,
                 save_dir: str | None = None, *, rank_collapse: bool = True, grad_norms: bool = True,
                 logit_norms: bool = True, sigma_tracking_error: bool = True,
                 blocks: str | list[str] | None = None) -> None:
        if every_n_steps < 1 or probe_size < 1:
            raise ConfigError(
                f"AttentionDiagnostics needs every_n_steps >= 1 and probe_size >= 1; got "
                f"every_n_steps={every_n_steps}, probe_size={probe_size}."
            )
        self.every_n_steps = every_n_steps
        self.probe_size = probe_size
        self.per_head = per_head
        self.save_dir = save_dir
        self.rank_collapse = rank_collapse
        self.grad_norms = grad_norms
        self.logit_norms = logit_norms
        self.sigma_tracking_error = sigma_tracking_error
        self.blocks = blocks
        self._probe_inputs: tuple[tuple, dict] | None = None
        self._layer_index: dict[str, int] = {}  # attention module name -> i in L{i:02d}
        self._block_index: dict[str, int] = {}  # block name -> i in B{i:02d}
        self.history = _empty_history()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, probe_size=self.probe_size)

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.history)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # older checkpoints lack newer keys, or have them under their old names
        self.history = {**_empty_history(), **_renamed(copy.deepcopy(state_dict))}
        if self.history["steps"] and "sigma_tracking_error" not in state_dict and self.sigma_tracking_error:
            # its rows would not line up with the steps probed before: keep it off for this run
            self.sigma_tracking_error = False
            rank_zero_warn("AttentionDiagnostics: the checkpoint predates sigma_tracking_error; "
                           "not logged in this resumed run")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not callable(getattr(pl_module, "probe_inputs", None)) or not hasattr(pl_module, "model"):
            raise ConfigError(
                f"AttentionDiagnostics needs {type(pl_module).__name__} to have `model` (the nn.Module "
                "to probe) and `probe_inputs(n) -> (args, kwargs)`; add them or drop the callback."
            )
        model = _eager(pl_module)
        self._layer_index = {name: i for i, (name, _, _) in enumerate(attention_modules(model))}
        if self.grad_norms or self.logit_norms:
            try:
                attention_projections(model)
            except ValueError as err:
                raise ConfigError(f"AttentionDiagnostics(grad_norms={self.grad_norms}, logit_norms="
                                  f"{self.logit_norms}): {err} Or set both to false.") from err
        if self.rank_collapse:
            try:
                blocks = transformer_blocks(model, self.blocks)
            except ValueError as err:
                raise ConfigError(f"AttentionDiagnostics(rank_collapse=True): {err} Or set rank_collapse=false.") from err
            self._block_index = {name: i for i, (name, _) in enumerate(blocks)}
        self._probe_inputs = pl_module.probe_inputs(self.probe_size)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._probe_once(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Gradient norms of the training batch at probe steps, labelled with the step whose weights
        they are taken at (the step the probe before this batch measured)."""
        step, done = trainer.global_step, self.history["grad_steps"]
        if not self.grad_norms or step % self.every_n_steps or (done and done[-1] >= step):
            return
        model = _eager(pl_module)
        if not any(p.grad is not None for p in model.parameters()):
            return  # the step was skipped (a non-finite loss ends the run without a backward)
        grads = attention_grad_norms(model)
        h = self.history
        _check_same_names(h, "grad_layers", list(grads), bool(done))
        h["grad_steps"].append(step)
        h["grad_layers"] = list(grads)
        h["grad_norm"].append([[norms.get(role, math.nan) for role in ROLES] for norms in grads.values()])
        metrics = {}
        for name, norms in grads.items():
            i = self._layer_index[name]
            metrics.update({f"diag/grad_norm/{role}/L{i:02d}": norms[role] for role in ROLES if role in norms})
            if "ratio_qv" in norms:
                metrics[f"diag/grad_ratio_qv/L{i:02d}"] = norms["ratio_qv"]
        _log(trainer, metrics, step)

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
            plot_entropy_heads(self.history, out_dir / HEADS_PLOT_PATH)
            if self.history["sigma_names"]:
                plot_sigma_curves(self.history, out_dir / SIGMA_PLOT_PATH)

    def _probe_once(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe and log at the current step unless it is already in the history (gradient
        accumulation repeats a step; a resumed run starts at a step it may have probed)."""
        step = trainer.global_step
        if self.history["steps"] and self.history["steps"][-1] >= step:
            return
        model = _eager(pl_module)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            # A diverging run: its curves end here. The probe would only measure NaN/inf, and the
            # linear algebra behind it can raise, which must never change the run's own status.
            return
        _log(trainer, self._probe(model, trainer, pl_module.device, step), step)

    def _probe(self, model: nn.Module, trainer: pl.Trainer, device: torch.device, step: int) -> dict[str, float]:
        """One probe of ``model``: the forward, the weight reads, the history entry; the metrics to log."""
        precision = trainer.precision_plugin
        args, kwargs = precision.convert_input(move_data_to_device(self._probe_inputs, device))
        capture = capture_rank_collapse(model, self.blocks) if self.rank_collapse else nullcontext({})
        with capture as blocks, precision.forward_context():
            entropy, entropy_norm = probe_attention_entropy(model, args, kwargs)
        tracking = sigma_tracking_error(model, take_pending_step=False) if self.sigma_tracking_error else {}
        probe = {
            "attention_entropy": entropy,
            "attention_entropy_norm": entropy_norm,
            "sigma": {_short_name(k): v for k, v in reparam_sigmas(model).items()},
            "gamma": {_short_name(k): v for k, v in reparam_gammas(model).items()},
            "sigma_tracking_error": {_short_name(k): v for k, v in tracking.items()},
            "blocks": blocks,
            "attention_logit_norm": attention_logit_norms(model) if self.logit_norms else {},
        }
        self._record(step, probe)
        return self._metrics(probe)

    def _record(self, step: int, probe: dict[str, dict]) -> None:
        h, first = self.history, not self.history["steps"]
        for names_key, found in (("layers", probe["attention_entropy"]), ("sigma_names", probe["sigma"]),
                                 ("gamma_names", probe["gamma"]), ("blocks", probe["blocks"]),
                                 ("sigma_tracking_error_names", probe["sigma_tracking_error"]),
                                 ("attention_logit_layers", probe["attention_logit_norm"])):
            _check_same_names(h, names_key, list(found), not first)
            h[names_key] = list(found)
        h["steps"].append(step)
        h["attention_entropy"].append([v.tolist() for v in probe["attention_entropy"].values()])
        h["attention_entropy_norm"].append([v.tolist() for v in probe["attention_entropy_norm"].values()])
        h["sigma"].append(list(probe["sigma"].values()))
        h["gamma"].append(list(probe["gamma"].values()))
        h["sigma_tracking_error"].append(list(probe["sigma_tracking_error"].values()))
        if self.rank_collapse:
            h["token_cosine"].append([m["token_cosine"] for m in probe["blocks"].values()])
            h["residual_ratio"].append([m["residual_ratio"] for m in probe["blocks"].values()])
        if self.logit_norms:
            h["attention_logit_norm"].append([v.tolist() for v in probe["attention_logit_norm"].values()])

    def _metrics(self, probe: dict[str, dict]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        layer_means = []
        for name, heads in probe["attention_entropy"].items():
            i = self._layer_index[name]
            layer_means.append(float(heads.nanmean()))
            metrics[f"diag/attention_entropy/L{i:02d}"] = layer_means[-1]
            if self.per_head:
                metrics.update({f"diag/attention_entropy/L{i:02d}/H{j:02d}": float(v) for j, v in enumerate(heads)})
            metrics[f"diag/attention_entropy_norm/L{i:02d}"] = float(probe["attention_entropy_norm"][name].nanmean())
        metrics["diag/attention_entropy/min"] = min(layer_means)
        for name, values in probe["blocks"].items():
            b = self._block_index[name]
            metrics.update({f"diag/{key}/B{b:02d}": value for key, value in values.items()})
        for name, heads in probe["attention_logit_norm"].items():
            i = self._layer_index[name]
            metrics[f"diag/attention_logit_norm/L{i:02d}"] = float(heads.max())
            if self.per_head:
                metrics.update({f"diag/attention_logit_norm/L{i:02d}/H{j:02d}": float(v)
                                for j, v in enumerate(heads)})
        metrics.update({f"diag/sigma/{name}": v for name, v in probe["sigma"].items()})
        metrics.update({f"diag/gamma/{name}": v for name, v in probe["gamma"].items()})
        tracking = probe["sigma_tracking_error"]
        metrics.update({f"diag/sigma_tracking_error/{name}": v for name, v in tracking.items()})
        if tracking:
            metrics["diag/sigma_tracking_error/max"] = max(tracking.values())
        return metrics


def _eager(pl_module: pl.LightningModule) -> nn.Module:
    """The module to probe: the eager one under torch.compile (it shares the parameters)."""
    return getattr(pl_module.model, "_orig_mod", pl_module.model)


def _log(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _check_same_names(history: dict[str, list], key: str, names: list[str], recorded: bool) -> None:
    """Every probe must reach the same modules, or the per-step rows would not line up."""
    if recorded and names != history[key]:
        raise RuntimeError(
            f"AttentionDiagnostics: the probed {key} changed between probes (before: {history[key]}, now: "
            f"{names}); the probe forward must reach the same modules every time."
        )


def _short_name(name: str) -> str:
    """Log name of a matrix: "blocks.0.attn.qkv.weight(.1)" -> "blocks.0.attn.qkv(.1)",
    "self_attn.in_proj_weight" -> "self_attn.in_proj"."""
    return re.sub(r"[._]weight(?=(\.\d+)?$)", "", name)


def save_history(history: dict[str, list], path: str | Path) -> None:
    """Write a probe history as .npz (``history_arrays``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **history_arrays(history))


def history_arrays(history: dict[str, list]) -> dict[str, np.ndarray]:
    """The arrays of diagnostics.npz: steps (S,), layers (L,), attention_entropy and
    attention_entropy_norm (S, L, H) (NaN-padded where layers have fewer heads); where recorded,
    with their names: sigma, gamma and sigma_tracking_error (S, M); token_cosine and residual_ratio (S, B) over blocks;
    attention_logit_norm (S, L', H) over attention_logit_layers; and grad_norm (G, L'', 4) at
    grad_steps over grad_layers, last axis grad_roles (q, k, v, o)."""
    arrays = {
        "steps": np.asarray(history["steps"], dtype=np.int64),
        "layers": np.asarray(history["layers"], dtype=str),
        "attention_entropy": _padded(history["attention_entropy"]),
        "attention_entropy_norm": _padded(history["attention_entropy_norm"]),
    }
    for kind in ("sigma", "gamma", "sigma_tracking_error"):
        if history[f"{kind}_names"]:
            arrays[f"{kind}_names"] = np.asarray(history[f"{kind}_names"], dtype=str)
            arrays[kind] = np.asarray(history[kind], dtype=np.float32)  # (S, M)
    if history["token_cosine"]:
        arrays["blocks"] = np.asarray(history["blocks"], dtype=str)
        for kind in ("token_cosine", "residual_ratio"):
            arrays[kind] = np.asarray(history[kind], dtype=np.float32)  # (S, B)
    if history["attention_logit_norm"]:
        arrays["attention_logit_layers"] = np.asarray(history["attention_logit_layers"], dtype=str)
        arrays["attention_logit_norm"] = _padded(history["attention_logit_norm"])
    if history["grad_norm"]:
        arrays["grad_steps"] = np.asarray(history["grad_steps"], dtype=np.int64)
        arrays["grad_layers"] = np.asarray(history["grad_layers"], dtype=str)
        arrays["grad_roles"] = np.asarray(ROLES, dtype=str)
        arrays["grad_norm"] = np.asarray(history["grad_norm"], dtype=np.float32)  # (G, L'', 4)
    return arrays


def _padded(values: list[list[list[float]]]) -> np.ndarray:
    """[S][L][H_l] nested lists -> float32 (S, L, max H) with NaN where a layer has fewer heads."""
    n_heads = max((len(heads) for step in values for heads in step), default=0)
    out = np.full((len(values), len(values[0]) if values else 0, n_heads), np.nan, dtype=np.float32)
    for s, step in enumerate(values):
        for layer, heads in enumerate(step):
            out[s, layer, : len(heads)] = heads
    return out


def load_diagnostics(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a saved diagnostics.npz (``history_arrays``), old key names renamed."""
    with np.load(path) as saved:
        return _renamed(dict(saved))


def _renamed(history: dict) -> dict:
    """``history`` with the keys of ``RENAMED_KEYS`` under their current names."""
    return {RENAMED_KEYS.get(key, key): value for key, value in history.items()}


def _arrays(history_or_npz: dict | str | Path) -> dict[str, np.ndarray]:
    """diagnostics.npz's arrays, from a history dict (the callback's state) or the saved file."""
    if isinstance(history_or_npz, dict):
        return history_arrays(history_or_npz)
    return load_diagnostics(history_or_npz)


def _draw_entropy(ax, history_or_npz: dict | str | Path, title: str | None) -> None:
    """One line per layer, coloured by depth (dark = first layer)."""
    arrays = _arrays(history_or_npz)
    steps, layers = arrays["steps"], arrays["layers"].tolist()
    entropy = np.nanmean(arrays["attention_entropy"], axis=-1)  # (S, L)
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


def plot_entropy_heads(history_or_npz_path: dict | str | Path, out_png: str | Path,
                       title: str | None = None) -> Path:
    """Heatmap of the entropy of every head (columns) of every layer (rows) at the last probe:
    which heads collapsed, where the per-layer curves only show means."""
    arrays = _arrays(history_or_npz_path)
    entropy, layers = arrays["attention_entropy"][-1], arrays["layers"].tolist()  # (L, H)
    fig = Figure(figsize=(1.5 + 0.45 * entropy.shape[1], 1.2 + 0.3 * len(layers)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(entropy, cmap="viridis", vmin=0, aspect="auto")
    fig.colorbar(image, ax=ax, label="attention entropy (nats)")
    ax.set_xticks(range(entropy.shape[1]), [f"H{h:02d}" for h in range(entropy.shape[1])], fontsize="small")
    ax.set_yticks(range(len(layers)), [f"L{i:02d} {name}" for i, name in enumerate(layers)], fontsize="x-small")
    ax.set_title(title or f"Attention entropy per head, step {int(arrays['steps'][-1])}", fontsize="medium")
    return _save(fig, out_png)


def plot_sigma_curves(history_or_npz_path: dict | str | Path, out_png: str | Path,
                      title: str | None = None) -> Path:
    """σ(W) of every σReparam-tracked matrix over training, one line per matrix coloured by
    module order (dark = first): a growing σ is what lets attention entropy collapse."""
    arrays = _arrays(history_or_npz_path)
    if "sigma" not in arrays:
        raise ValueError("this history has no σ: the run had no σReparam matrices (use reparam=sigma_stats to "
                         "track σ in a baseline run).")
    steps, names, sigma = arrays["steps"], arrays["sigma_names"].tolist(), arrays["sigma"]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, name in enumerate(names):
        ax.plot(steps, sigma[:, i], color=colormaps["viridis"](i / max(len(names) - 1, 1)), label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("σ(W), tracked by power iteration")
    ax.set_title(title or f"Spectral norms of the {len(names)} σReparam matrices")
    ax.grid(alpha=0.3)
    if len(names) <= 24:
        ax.legend(fontsize="xx-small", ncol=math.ceil(len(names) / 12))
    return _save(fig, out_png)


def _save(fig: Figure, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)  # a bare Figure renders with Agg: no pyplot, no display needed
    return out_png
