"""The Hydra app ``sigma-repro-train`` (= ``python -m sigma_repro.train``).

One run, as data flows (DESIGN.md):
  compose conf/train.yaml -> deterministic job dir (no timestamps)
  -> DONE.json there: print the stored result and exit (idempotent re-runs and sweeps)
  -> build DataModule (validates paths) -> model (shapes from the data) -> reparam plugin
  -> Task -> Trainer.fit, resuming from checkpoints/last.ckpt (or last.prev.ckpt when that does not
     read; sigma_repro/checkpointing.py); checkpoints every N steps, at the end and on a stop signal
  -> summary.json ("running" while it runs, with the launch's pid and host; then finished | diverged |
     failed | interrupted, with metrics, divergence step, loss spikes, attention entropy, wall time,
     git sha, machine, resolved config and the run's identity) -> DONE.json for finished and diverged runs.
A failed or interrupted run writes summary.json without DONE.json, so the same command retries or
resumes it; inside a multirun it returns instead of exiting, so one failure never takes the sweep down
(the sweep tallies its cells at the end and exits non-zero if any failed: sigma_repro/sweeps.py).
Before any compute a launch reads back what earlier ones left (sigma_repro/run_state.py): half-written
files are repaired, and DONE.json is trusted only while the stored config is this command's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sigma_repro import checks, provenance, run_state
from sigma_repro.config import CONF_DIR
from sigma_repro.errors import ConfigError, RunInterrupted
from sigma_repro.run_state import DONE, SUMMARY
from sigma_repro.slurm import finish_wandb, trainer_plugins

# Config keys that never change what a run computes, besides the job dir's exclude_keys
# (conf/train.yaml): where it writes and what it logs to.
NOT_COMPUTED = ("paths", "logger")


# -- run metadata ---------------------------------------------------------------------------------
def run_tags(cfg: DictConfig) -> list[str]:
    """Filterable W&B tags: task, scale, optimizer, warmup, reparam, norm, model, data (the cell is the
    W&B group). At scale=proxy the model and data choices are "proxy" (the family's proxy sizes)."""
    choices = HydraConfig.get().runtime.choices
    warmup = "warmup" if cfg.schedule.warmup_steps > 0 else "no-warmup"
    return [f"task:{choices.get('task')}", f"scale:{choices.get('scale') or 'full'}", f"optim:{choices.get('optim')}",
            warmup, f"reparam:{cfg.reparam.name}", f"norm:{cfg.model.get('norm', 'none')}",
            f"model:{choices.get('model')}", f"data:{choices.get('data')}", *cfg.logger.wandb.get("extra_tags", [])]


def run_identity() -> dict[str, Any]:
    """What selects this run: its experiment cell, config-group choices and command-line overrides.

    Tables group runs by these (``scale`` is a group choice, not a config key)."""
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    return {"experiment": choices.get("experiment"), "choices": choices, "overrides": list(hc.overrides.task)}


def validate_config(cfg: DictConfig) -> None:
    """Values and option combinations that cannot work, caught before any data is read or model built:
    unset ``???`` values, the seed, the optimizer's arguments, batch size, precision, accelerator and
    device count, W&B credentials (sigma_repro.checks, sigma_repro.optim.check_optim_config), then
    options that clash with each other."""
    from sigma_repro.optim import check_optim_config

    hc = HydraConfig.get()
    checks.check_required_values(cfg, hc.runtime.choices)
    checks.check_seed(cfg.seed)
    check_optim_config(OmegaConf.to_container(cfg.optim, resolve=True))
    checks.check_batch_size(cfg.data)
    checks.check_trainer(cfg.trainer)
    checks.check_wandb(cfg.logger)
    t = cfg.trainer
    clashes = []
    if t.max_steps in (None, -1) and t.max_epochs in (None, -1):
        clashes.append("trainer.max_steps=-1 and trainer.max_epochs=-1 clash: the run would never end; "
                       "set one of them")
    if t.max_steps not in (None, -1) and cfg.schedule.warmup_steps >= t.max_steps:
        clashes.append(f"schedule.warmup_steps={cfg.schedule.warmup_steps} and trainer.max_steps={t.max_steps} "
                       f"clash: warmup would never finish; lower the warmup or train longer")
    if t.get("deterministic") is True and t.get("benchmark"):
        clashes.append("trainer.deterministic=true and trainer.benchmark=true clash: cuDNN benchmarking picks "
                       "kernels nondeterministically; drop one")
    if cfg.checkpoint_every_n_steps < 1:
        clashes.append(f"checkpoint_every_n_steps must be >= 1, got {cfg.checkpoint_every_n_steps}")
    if hc.mode == RunMode.MULTIRUN and hc.runtime.choices.get("hydra/launcher") == "basic" and _devices(t) > 1:
        # Lightning starts the other ranks by re-running this command line, sweep and all.
        clashes.append(f"a local multirun (-m) cannot train on trainer.devices={t.devices}: each extra process would "
                       f"rerun the whole sweep; run the cells one by one, or sweep with hydra/launcher=slurm "
                       f"(one task per device)")
    if clashes:
        raise ConfigError("; ".join(clashes))


def _devices(trainer_cfg: DictConfig) -> int:
    """How many devices ``trainer.devices`` asks for on this node (1 for "auto" or -1: not known here)."""
    devices = trainer_cfg.get("devices", 1)
    if OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str):  # "2", "0,1" (device ids) or "auto"
        return len(devices.split(",")) if "," in devices else int(devices) if devices.isdigit() else 1
    return max(int(devices), 1)


# -- building blocks ------------------------------------------------------------------------------
def build_model(cfg: DictConfig, datamodule):
    """The model from config with what the data fixes (``datamodule.model_kwargs``), then the model
    converter of the ``reparam`` group (before the optimizer); returns (model, converter)."""
    model = hydra.utils.instantiate(cfg.model, **datamodule.model_kwargs)
    converter = hydra.utils.instantiate(cfg.reparam, _convert_="all")
    return converter.convert(model), converter


def rebuild_run(summary: dict[str, Any]) -> tuple[Any, Any]:
    """(model, data module) of a run as the app built them, from its summary.json (``summary["config"]``):
    the data module with the run's seed, the model with what the data fixes, then the reparam converter.
    The weights are freshly initialised: ``load_last_weights`` puts the run's in."""
    config = OmegaConf.create(summary["config"])
    datamodule = hydra.utils.instantiate(config.data, seed=summary.get("seed", config.get("seed", 0)))
    model, _ = build_model(config, datamodule)
    return model, datamodule


def load_last_weights(model, run_dir: Path):
    """``model`` (from ``rebuild_run``) with the weights of ``<run_dir>/checkpoints/last.ckpt``."""
    import torch

    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise ConfigError(f"{checkpoint} not found: the run has not saved a checkpoint yet (or its dir was "
                          f"cleaned). Train it first (the same sigma-repro-train command resumes it).")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model


def build_loggers(cfg: DictConfig, out: Path, run_name: str, group: str) -> list:
    """CSV always; W&B (id = hash of the run name, so a requeued run appends) and TensorBoard on request."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from sigma_repro.loggers import ResumableCSVLogger

    loggers: list = [ResumableCSVLogger(save_dir=str(out), name="", version="")]
    wb = cfg.logger.get("wandb", {})
    if wb.get("enabled"):
        os.environ.setdefault("WANDB_MODE", wb.mode)  # offline unless the user's environment says otherwise
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(WandbLogger(
            save_dir=str(out), project=wb.project, group=group, job_type=wb.job_type, id=wandb_run_id(run_name),
            name=run_name, tags=run_tags(cfg), mode=os.environ["WANDB_MODE"],
        ))
    if cfg.logger.get("tensorboard", {}).get("enabled"):
        loggers.append(TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""))
    return loggers


def wandb_run_id(run_name: str) -> str:
    return hashlib.sha1(run_name.encode()).hexdigest()[:16]


def build_trainer(cfg: DictConfig, out: Path, loggers: list):
    """The configured Trainer with the run's callbacks, its checkpoint callback (last.ckpt every
    ``checkpoint_every_n_steps``, at the end and on a stop signal) and atomic checkpoint writes."""
    from sigma_repro.checkpointing import AtomicCheckpointIO, RunCheckpoint

    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c is not None and "_target_" in c]
    for c in callbacks:
        if hasattr(c, "save_dir") and c.save_dir is None:
            c.save_dir = str(out)
    callbacks.append(RunCheckpoint(out / "checkpoints", every_n_steps=cfg.checkpoint_every_n_steps))
    return hydra.utils.instantiate(cfg.trainer, default_root_dir=str(out), logger=loggers, callbacks=callbacks,
                                   plugins=[*trainer_plugins(), AtomicCheckpointIO()])


# -- one run --------------------------------------------------------------------------------------
def train(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Fit one configured run in ``out``; returns the summary (status finished or diverged)."""
    import lightning as L

    from sigma_repro.checkpointing import compute_environment, resume_point
    from sigma_repro.loggers import trim_metrics_after

    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data, seed=cfg.seed)  # validates data paths first
    model, converter = build_model(cfg, datamodule)
    # The task gets plain dicts (not DictConfig): they land in checkpoints loaded with weights_only=True.
    task = hydra.utils.instantiate(cfg.task, _partial_=True, _convert_="all")(
        model=model,
        **datamodule.task_kwargs,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        schedule=OmegaConf.to_container(cfg.schedule, resolve=True),
        **converter.optimizer_options(),
        seed=cfg.seed,
    )
    runs_dir, job_dir = Path(cfg.paths.runs_dir).resolve(), out.resolve()
    # <cell>/<overrides>/seed=<n>; a job dir placed outside the runs dir (hydra.run.dir=...) keeps its path
    run_name = str(job_dir.relative_to(runs_dir) if job_dir.is_relative_to(runs_dir) else job_dir)
    group = HydraConfig.get().runtime.choices.get("experiment") or "default"
    # last.ckpt, else last.prev.ckpt, else step 0 (an unreadable checkpoint is set aside, and said so)
    ckpt, resumed = resume_point(out / "checkpoints" / "last.ckpt", report=is_rank_zero())
    if is_rank_zero():
        # rows after the resumed step are logged again (all rows, when the run starts over)
        trim_metrics_after(out / "metrics.csv", resumed["global_step"] if resumed else -1)
        if resumed:
            print(f"sigma-repro: resuming from {ckpt}", flush=True)
    loggers = build_loggers(cfg, out, run_name, group)
    for lg in loggers[1:]:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = build_trainer(cfg, out, loggers)
    if resumed:
        check_resume_world_size(resumed, trainer.world_size, ckpt)
    trainer.fit(task, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    metrics = scalar_metrics(trainer)
    if task.diverged_step is None and task.last_val_step != trainer.global_step:
        # Final metrics always describe the final weights, however the last epoch ended.
        trainer.validate(task, datamodule=datamodule, verbose=False)
        metrics.update(scalar_metrics(trainer))
    # What a family computes once on the final weights (translation: the test set with the beam).
    final = task.final_evaluation(datamodule, out) if task.diverged_step is None else {}
    metrics.update(final.get("metrics", {}))
    return {
        **entropy_summary(trainer),
        "status": "diverged" if task.diverged_step is not None else "finished",
        "diverged_step": task.diverged_step,
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "world_size": trainer.world_size,
        **compute_environment(trainer.strategy.root_device),  # cpu_threads, device: both change results
        "loss_spikes": task.loss_spikes(),
        "headline_metric": {"name": task.headline_metric, "higher_is_better": task.higher_is_better},
        "metrics": metrics,
        "data": datamodule.describe(),
        **({"evaluation": final["evaluation"]} if final.get("evaluation") else {}),
        "wandb_run_id": wandb_run_id(run_name) if cfg.logger.get("wandb", {}).get("enabled") else None,
    }


def user_error(err: BaseException) -> ConfigError | None:
    """The ConfigError behind ``err`` (Hydra wraps errors raised inside ``instantiate``), if any."""
    while err is not None:
        if isinstance(err, ConfigError):
            return err
        err = err.__cause__
    return None


def scalar_metrics(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def entropy_summary(trainer) -> dict[str, Any]:
    """Final and minimum attention entropy per layer (mean over heads) from the diagnostics callback."""
    import numpy as np

    from sigma_repro.diagnostics.callbacks import AttentionDiagnostics

    probe = next((c for c in trainer.callbacks if isinstance(c, AttentionDiagnostics)), None)
    if probe is None or not probe.history["steps"]:
        return {}
    with warnings.catch_warnings():  # an all-NaN probe (the weights of a diverged run) stays NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        per_layer = np.nanmean(np.asarray(probe.history["attention_entropy"], dtype=float), axis=-1)  # (steps, layers)
        # the minimum over the probes that were finite: a diverged run keeps its entropy before the blow-up
        lowest = np.nanmin(per_layer, axis=0)
    return {"attention_entropy": {"layers": list(probe.history["layers"]),
                                  "final": per_layer[-1].round(5).tolist(), "min": lowest.round(5).tolist()}}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, default=str))
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a crash leaves the old file or the new one
    tmp.replace(path)  # atomic: a reader never sees half a summary


def print_summary(summary: dict[str, Any], out: Path, *, head: str = "run ended") -> None:
    lines = [f"sigma-repro: {head}: status {summary['status']}"]
    if summary.get("diverged_step") is not None:
        lines.append(f"  diverged at step {summary['diverged_step']}")
    if summary["status"] == "interrupted":
        lines.append(f"  stopped by {summary.get('signal')} at step {summary.get('steps')}; "
                     f"the same command resumes from its checkpoint")
    if summary.get("error"):
        lines.append(f"  error: {summary['error']}")
    headline = summary.get("headline_metric")
    if headline and headline["name"] in summary.get("metrics", {}):
        better = "higher" if headline["higher_is_better"] else "lower"
        lines.append(f"  headline    {headline['name']} {summary['metrics'][headline['name']]:.4f} ({better} is better)")
    for key in sorted(summary.get("metrics", {})):
        if key.startswith(("val/", "test/", "train/loss")):
            lines.append(f"  {key:28s} {summary['metrics'][key]:.4f}")
    if "attention_entropy" in summary:
        ent = summary["attention_entropy"]
        lines.append("  attention entropy per layer, final: " + " ".join(f"{x:.2f}" for x in ent["final"]))
        lines.append("  attention entropy per layer, min:   " + " ".join(f"{x:.2f}" for x in ent["min"]))
    lines.append(f"  run dir     {out}")
    for label, rel in (("metrics", "metrics.csv"), ("plots", "plots"), ("checkpoint", "checkpoints/last.ckpt"),
                       ("wandb", "wandb")):
        if (out / rel).exists():
            lines.append(f"  {label:11s} {out / rel}")
    print("\n".join(lines), flush=True)


def check_resume_world_size(saved: dict[str, Any], world_size: int, last: Path) -> None:
    """Refuse to resume on another number of processes than the checkpoint's run used.

    The world size is not in the run identity (``trainer.devices`` and ``trainer.num_nodes`` stay out
    of the job dir), but it sets the global batch and each rank's shard of the data: a resume with
    another one would silently continue a different experiment. Checkpoints older than the world
    size record (``saved["world_size"] is None``) are not checked."""
    if saved["world_size"] not in (None, world_size):
        raise ConfigError(
            f"{last} was saved by a run on {saved['world_size']} processes (trainer.devices x trainer.num_nodes); "
            f"this launch has {world_size}. The process count sets the global batch and the data sharding, so "
            f"resuming would continue a different experiment. Relaunch with trainer.devices x trainer.num_nodes = "
            f"{saved['world_size']}, or start a new run dir (hydra.run.dir=<new dir>)."
        )


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, known before Lightning sets up its strategy.

    Rank 0 alone writes to the run dir. How the other ranks come to exist, and what tells them apart:
    - ``trainer.strategy=ddp`` on one node: Lightning's launcher re-runs this command for local ranks
      1.. with ``LOCAL_RANK`` (and ``NODE_RANK``, ``WORLD_SIZE``) set and ``hydra.run.dir`` pinned to
      rank 0's run dir (``lightning/fabric/strategies/launchers/subprocess_script.py``); rank 0 gets
      ``LOCAL_RANK=0`` only once ``Trainer.fit`` starts. On other nodes ``NODE_RANK`` > 0.
    - SLURM, one task per device: every task runs this command; ``SLURM_PROCID`` is the global rank.
    - torchrun: ``RANK``.
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    env = os.environ
    if "RANK" in env:
        return env["RANK"] == "0"
    if SLURMEnvironment.detect():
        return env.get("SLURM_PROCID", "0") == "0"
    return env.get("NODE_RANK", "0") == "0" and env.get("LOCAL_RANK", "0") == "0"


def run_other_rank(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Rank > 0 of a multi-process run: it trains beside rank 0 (the collectives need every rank) and
    writes nothing to the run dir; summary.json, DONE.json, the launch count, metrics.csv and
    checkpoints are rank 0's. A stop signal ends it as it ends rank 0 (in the training loop every rank
    stops after the same step: sigma_repro/checkpointing.py), quietly, for rank 0 reports: outside a
    multirun it exits 1, as rank 0 does. Errors propagate: a rank that fails ends the whole run."""
    if (out / DONE).exists():  # SLURM starts every rank: all of them skip (or refuse) a finished run together
        return stored_result(cfg, out)[0]
    from sigma_repro.checkpointing import StopSignals, Stopped

    with StopSignals():
        try:
            return train(cfg, out)
        except (RunInterrupted, Stopped) as err:
            summary = interrupted(err, out)
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        sys.exit(1)
    return summary


def interrupted(err: BaseException, out: Path) -> dict[str, Any]:
    """The end of a launch that a stop signal stopped: status "interrupted", the signal, and the step
    of the checkpoint the next launch resumes from (RunInterrupted: the step it just saved; a stop
    outside the training loop, ``checkpointing.Stopped``: the last checkpoint, 0 if there is none)."""
    from sigma_repro.checkpointing import resume_point

    if isinstance(err, RunInterrupted):
        step = err.step
    else:
        _, saved = resume_point(out / "checkpoints" / "last.ckpt", report=False)
        step = saved["global_step"] if saved else 0
    return {"status": "interrupted", "signal": err.signal_name, "steps": step}


def stored_result(cfg: DictConfig, out: Path) -> tuple[dict[str, Any], str]:
    """What a run dir with DONE.json stands for, and how to head its print: its stored summary, or,
    when that cannot be trusted (unreadable, or its config is not what this command composes), a
    "failed" record saying why and what to do; that record is not written, the stored files stay."""
    try:
        summary = run_state.read_stored_result(out)
        check_stored_config(summary, cfg, out)
    except ConfigError as err:
        return {"status": "failed", "error": str(err), "run_dir": str(out)}, "refused to trust DONE.json"
    return summary, "stored result (delete DONE.json to rerun)"


def check_stored_config(summary: dict[str, Any], cfg: DictConfig, out: Path) -> None:
    """Refuse a finished run whose stored resolved config differs from this command's in a key that
    changes what is computed (not the job dir's exclude_keys, nor ``NOT_COMPUTED``): edited by hand, or
    changed by a config default that the job dir does not capture."""
    ignore = [*HydraConfig.get().job.config.override_dirname.exclude_keys, *NOT_COMPUTED]
    current = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str))  # as stored
    differences = run_state.config_differences(summary.get("config", {}), current, ignore)
    if differences:
        shown = "; ".join(f"{key}: stored {old!r}, this command {new!r}" for key, old, new in differences[:10])
        more = f"; and {len(differences) - 10} more" if len(differences) > 10 else ""
        raise ConfigError(
            f"{out / DONE} says this run ended, but the config stored in its {SUMMARY} is not what this command "
            f"composes ({len(differences)} keys differ: {shown}{more}), so the stored result may not be this "
            f"command's. To rerun it with this config, delete the run dir {out} (deleting only {DONE} would "
            f"resume from the final checkpoint, trained with the stored config); to keep the stored run, give "
            f"this command another paths.runs_dir."
        )


def report(summary: dict[str, Any], out: Path, head: str = "run ended") -> dict[str, Any]:
    """Print the summary and return it; outside a multirun a failed or interrupted run exits 1 (a
    multirun counts this one in its tally and goes on to its other cells, unless a stop signal reached
    the process that runs them: sigma_repro/sweeps.py)."""
    print_summary(summary, out, head=head)
    if summary["status"] in ("failed", "interrupted") and HydraConfig.get().mode != RunMode.MULTIRUN:
        if "traceback" in summary:
            print(summary["traceback"], file=sys.stderr)
        sys.exit(1)
    return summary


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run (or skip, or resume) the job whose dir Hydra chose; always leaves a summary.json.

    First it reads back what earlier launches left (``run_state``): half-written files are repaired,
    a finished run's result is returned only if its stored config is this command's, an unreadable
    summary of an unfinished run is kept aside, W&B temp dirs of a killed launch are removed; each
    repair is printed and listed in the summary under ``recovered``. Only global rank 0 writes to
    the run dir (``is_rank_zero``); other ranks go to ``run_other_rank``."""
    from sigma_repro.checkpointing import StopSignals, Stopped

    out = Path(HydraConfig.get().runtime.output_dir)
    if not is_rank_zero():
        return run_other_rank(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    notes = run_state.recover_run_dir(out)
    if (out / DONE).exists():
        say(notes)
        summary, head = stored_result(cfg, out)
        return report(summary, out, head)

    started = time.time()
    previous, unreadable = run_state.read_previous_summary(out)
    notes += [*unreadable, *run_state.remove_temp_dirs_of(previous)]
    say(notes)
    launches = previous.get("launches", 0) + 1
    prior_wall = previous.get("wall_time_s", 0.0)
    recovered = [*previous.get("recovered", []), *(f"launch {launches}: {n}" for n in notes)]
    wandb_on = cfg.logger.get("wandb", {}).get("enabled")
    # "running" until this launch ends: a hard-killed run keeps this status (and its launch count); its
    # pid and host tell the next launch and `sigma-repro table` whether it is gone.
    write_json(out / SUMMARY, {"status": "running", "launches": launches, "wall_time_s": prior_wall,
                               "started_at": _now(), "run_dir": str(out), "seed": cfg.seed, "recovered": recovered,
                               **run_state.this_launch(), "tmp_dirs": run_state.wandb_temp_dirs() if wandb_on else [],
                               **run_identity()})
    # Stop signals from here to the summary (sigma_repro/checkpointing.py): in the training loop at the
    # end of a step, after its checkpoint; elsewhere at once (Lightning would turn Ctrl-C into sys.exit,
    # past this bookkeeping); once training is over they are only noted, and the summary is written.
    with StopSignals() as stop:
        try:
            summary = train(cfg, out)
        except (RunInterrupted, Stopped) as err:
            summary = interrupted(err, out)
        except Exception as err:  # noqa: BLE001 - recorded in summary.json; the sweep goes on
            bad_input = user_error(err)
            summary = {"status": "failed", "error": str(bad_input)} if bad_input else {
                "status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        finally:
            stop.note_only()
            finish_wandb()  # one W&B run per job, also inside a multirun
        summary.update(
            wall_time_s=round(time.time() - started + prior_wall, 2),
            launches=launches,
            recovered=recovered,
            git_sha=provenance.git_sha(),
            machine=provenance.machine_info(),
            command=" ".join(sys.argv),
            run_dir=str(out),
            ended_at=_now(),
            seed=cfg.seed,
            config=OmegaConf.to_container(cfg, resolve=True),
            **run_identity(),
        )
        write_json(out / SUMMARY, summary)
        if summary["status"] in ("finished", "diverged"):
            write_json(out / DONE, {"status": summary["status"], "summary": SUMMARY})
    return report(summary, out)


def say(notes: list[str]) -> None:
    for note in notes:
        print(f"sigma-repro: {note}", flush=True)


def quiet_third_party() -> None:
    """Drop two messages every run would print that say nothing about the run."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "Tip:" not in r.getMessage())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used.*")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    quiet_third_party()
    return run(cfg)


if __name__ == "__main__":
    main()
