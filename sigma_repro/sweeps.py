"""The end of a multirun: one line tallying its cells, and an exit status that says whether all ended.

Inside a multirun the app returns each cell's summary instead of exiting (sigma_repro/train.py), so
that one failure never takes the sweep down; Hydra then exits 0 whatever its cells did. ``SweepTally``
(a Hydra callback, registered in conf/train.yaml under hydra.callbacks) counts them: after the last
cell it prints ``finished / diverged / failed / interrupted`` with the run dirs of the cells that did
not end, and exits 1 if there are any.

Where the cells run: the local launcher runs them in this process; hydra/launcher=slurm (submitit)
runs each in its own SLURM job and calls ``on_job_end`` there. So each cell's global rank 0 leaves
its status as a file in a tally dir under the sweep dir (``<runs>/.multirun/tally-*``, a shared
file system on a cluster, as the run dirs are), which the launching process reads and removes at
the end. A SLURM job killed outright has no status: submitit's launcher raises for it
(UncompletedJobError) and the sweep exits non-zero before any tally.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

TALLIED = ("finished", "diverged", "failed", "interrupted")
NOT_ENDED = ("failed", "interrupted")


class SweepTally(Callback):
    """Counts a multirun's cells by status; the sweep exits 1 if any failed or was interrupted."""

    def __init__(self) -> None:
        self.tally_dir: str | None = None  # set in the launching process, travels with the jobs

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir) / ".multirun"
        root.mkdir(parents=True, exist_ok=True)
        self.tally_dir = tempfile.mkdtemp(prefix="tally-", dir=root.resolve())

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

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        tally_dir = Path(self.tally_dir)
        cells = [json.loads(p.read_text()) for p in sorted(tally_dir.glob("*.json"), key=lambda p: int(p.stem))]
        shutil.rmtree(tally_dir, ignore_errors=True)
        print(tally_line(cells), flush=True)
        if any(c["status"] in NOT_ENDED for c in cells):
            sys.exit(1)


def tally_line(cells: list[dict[str, str]]) -> str:
    """``sigma-repro: sweep of N cells: a finished, b diverged, c failed, d interrupted`` and the
    run dirs of the failed and interrupted ones (re-run the same sweep command to retry or resume them)."""
    counts = ", ".join(f"{sum(c['status'] == s for c in cells)} {s}" for s in TALLIED)
    line = f"sigma-repro: sweep of {len(cells)} cells: {counts}"
    for status in NOT_ENDED:
        dirs = [c["run_dir"] for c in cells if c["status"] == status]
        if dirs:
            line += f"; {status}: {', '.join(dirs)}"
    if any(c["status"] in NOT_ENDED for c in cells):
        line += " (the same command retries the failed cells and resumes the interrupted ones)"
    return line
