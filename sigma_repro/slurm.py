"""What a run needs inside a SLURM job: one requeue owner, and a W&B close that survives job teardown.

Requeue belongs to submitit (conf/hydra/launcher/slurm.yaml sets ``max_num_timeout > 0``): on SIGUSR2,
sent ``signal_delay_s`` before the time limit or at preemption, it runs ``scontrol requeue`` and ends
the process with SystemExit; the requeued job runs the cell again with the same overrides. Those
compose the same run dir (no timestamps in it), so the app resumes from checkpoints/last.ckpt and W&B
appends to the same run (its id is a hash of the run dir relative to ``paths.runs_dir``).
Lightning's own auto-requeue is turned off here: it would requeue a second time and leave
hpc_ckpt_*.ckpt files that Lightning prefers over last.ckpt.
"""

from __future__ import annotations

import sys


def trainer_plugins() -> list:
    """``[SLURMEnvironment(auto_requeue=False)]`` inside a SLURM job step, else ``[]``.

    Ranks then come from SLURM, one task per device: the job's ``--ntasks-per-node`` must equal
    ``trainer.devices`` (the launcher config sets it so).
    """
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def finish_wandb() -> None:
    """Close this process's W&B run, if any; a W&B error is reported, never raised.

    When SLURM ends a job step (requeue, preemption) it signals every process of the step, W&B's
    service included, so ``wandb.finish()`` can fail. Raised from the app's ``finally``, that error
    would replace submitit's SystemExit: the job would then end "successfully" with a failed cell
    and the launcher would report the sweep failed while SLURM still requeues the job.
    """
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return
    try:
        wandb.finish()
    except Exception as err:  # noqa: BLE001 - the run's own outcome (summary.json) stands
        print(f"sigma-repro: W&B did not close cleanly ({type(err).__name__}: {err}); "
              "the offline run keeps what was logged", file=sys.stderr, flush=True)
