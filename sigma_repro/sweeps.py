"""The end of a multirun: one line tallying its cells, and an exit status that says whether all ended.

Inside a multirun the app returns each cell's summary instead of exiting (sigma_repro/train.py), so
that one failure never takes the sweep down; Hydra then exits 0 whatever its cells did. ``SweepTally``
(a Hydra callback, registered in conf/train.yaml under hydra.callbacks) counts them: after the last
cell it prints ``finished / diverged / failed / interrupted`` with the run dirs of the cells that did
not end, and exits 1 if there are any.

A stop signal (Ctrl-C) that reaches the process running the cells (the local launcher runs them all
in the launching process) stops the whole sweep: the cell it came in records itself interrupted
after its checkpoint (as a single run does), the cells after it are not started, and the tally of
the cells so far is printed with exit status 1. On SLURM each cell is a job of its own: a signal
there (preemption: SIGUSR2, SIGTERM) is that job's, which records itself interrupted (submitit
requeues it), and the sweep goes on.

Where the cells run: the local launcher runs them in this process; hydra/launcher=slurm (submitit)
runs each in its own SLURM job and calls ``on_job_end`` there. So each cell's global rank 0 leaves
its status as a file in a tally dir under the sweep dir (``<runs>/.multirun/tally-*``, a shared
file system on a cluster, as the run dirs are), which the launching process reads and removes at
the end. A SLURM job killed outright has no status: submitit's launcher raises for it
(UncompletedJobError) and the sweep exits non-zero before any tally; the launching process still
removes its tally dir as it exits. A tally dir records its launching process (``owner.json``: pid
and host); one whose process is gone (killed outright itself) is removed when the next sweep into
the same runs dir starts on that host. Each sweep has a tally dir of its own, so leftovers never
mix into another sweep's tally.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sigma_repro.run_state import launch_gone, this_launch

TALLIED = ("finished", "diverged", "failed", "interrupted")
NOT_ENDED = ("failed", "interrupted")
TALLY_ROOT, TALLY_PREFIX, OWNER = ".multirun", "tally-", "owner.json"


class SweepTally(Callback):
    """Counts a multirun's cells by status; the sweep exits 1 if any failed or was interrupted, and
    stops at once, tallying the cells so far, when a stop signal reaches the process running them."""

    def __init__(self) -> None:
        # set in the launching process; they travel with the jobs (submitit pickles the callbacks)
        self.tally_dir: str | None = None
        self.launcher: dict[str, Any] | None = None  # pid and host of the launching process

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        root = (Path(config.hydra.sweep.dir) / TALLY_ROOT).resolve()
        root.mkdir(parents=True, exist_ok=True)
        for note in remove_stale_tally_dirs(root):
            print(f"sigma-repro: {note}", flush=True)
        self.launcher = this_launch()
        self.tally_dir = tempfile.mkdtemp(prefix=TALLY_PREFIX, dir=root)
        (Path(self.tally_dir) / OWNER).write_text(json.dumps(self.launcher))
        atexit.register(self.remove_tally_dir)  # also when the launcher raises (a SLURM job killed outright)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        from sigma_repro.train import is_rank_zero

        if self.tally_dir is None or not is_rank_zero():  # a single run, or a rank that writes nothing
            return
        run_dir = job_return.hydra_cfg.hydra.runtime.output_dir
        if job_return.status == JobStatus.COMPLETED:
            status = job_return.return_value["status"]
        else:  # raised out of the app: failed, the error is in the job's log
            status = "failed"
        record = Path(self.tally_dir) / f"{job_return.hydra_cfg.hydra.job.num}.json"
        record.write_text(json.dumps({"status": status, "run_dir": str(run_dir)}))
        stopped_by = self.stop_signal_here()
        if stopped_by:
            self.end(stopped_by)  # exits: Hydra's launcher starts no further cell

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.end()

    def stop_signal_here(self) -> str | None:
        """The stop signal this process took, if it is the process that runs the sweep's cells (the
        local launcher); None in a SLURM job, whose signals are its own."""
        if self.launcher != this_launch():
            return None
        from sigma_repro.checkpointing import StopSignals

        return StopSignals.first_in_process

    def end(self, stopped_by: str | None = None) -> None:
        """Print the tally of the cells recorded, remove the tally dir, and exit 1 if any cell did not
        end or the sweep was stopped."""
        tally_dir = Path(self.tally_dir)
        cells = [json.loads(p.read_text()) for p in sorted(tally_dir.glob("[0-9]*.json"), key=lambda p: int(p.stem))]
        self.remove_tally_dir()
        atexit.unregister(self.remove_tally_dir)
        print(tally_line(cells, stopped_by), flush=True)
        if stopped_by or any(c["status"] in NOT_ENDED for c in cells):
            sys.exit(1)

    def remove_tally_dir(self) -> None:
        tally_dir = Path(self.tally_dir)
        shutil.rmtree(tally_dir, ignore_errors=True)
        try:
            tally_dir.parent.rmdir()  # .multirun, unless another sweep's tally dir is in it
        except OSError:
            pass


def remove_stale_tally_dirs(root: Path) -> list[str]:
    """Remove the tally dirs under ``root`` whose launching process is gone from this host (a sweep
    killed outright); a note for each. Dirs of a live process, of another host, or without a readable
    owner record (one being made this moment) are left alone."""
    notes = []
    for tally_dir in sorted(root.glob(f"{TALLY_PREFIX}*")):
        try:
            owner = json.loads((tally_dir / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and launch_gone(owner) is True:
            shutil.rmtree(tally_dir, ignore_errors=True)
            notes.append(f"removed {tally_dir}, the tally dir of an earlier sweep whose process "
                         f"(pid {owner['pid']}) ended without tallying")
    return notes


def tally_line(cells: list[dict[str, str]], stopped_by: str | None = None) -> str:
    """``sigma-repro: sweep of N cells: a finished, b diverged, c failed, d interrupted`` and the run
    dirs of the failed and interrupted ones (re-run the same sweep command to retry or resume them);
    for a sweep that a signal stopped, ``sweep stopped by <signal> after N cells``."""
    counts = ", ".join(f"{sum(c['status'] == s for c in cells)} {s}" for s in TALLIED)
    if stopped_by:
        line = f"sigma-repro: sweep stopped by {stopped_by} after {len(cells)} cells, the rest not started: {counts}"
    else:
        line = f"sigma-repro: sweep of {len(cells)} cells: {counts}"
    for status in NOT_ENDED:
        dirs = [c["run_dir"] for c in cells if c["status"] == status]
        if dirs:
            line += f"; {status}: {', '.join(dirs)}"
    if stopped_by:
        line += " (the same command resumes the interrupted cells, retries the failed ones and runs the rest)"
    elif any(c["status"] in NOT_ENDED for c in cells):
        line += " (the same command retries the failed cells and resumes the interrupted ones)"
    return line
