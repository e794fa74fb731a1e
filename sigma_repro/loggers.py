"""CSV logging that survives resume.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when a new logger opens the same dir, so a
run resumed from ``last.ckpt`` would lose the curve it had before it was killed. Here the writer
keeps the file and appends; ``trim_metrics_after`` first drops the rows logged after the checkpoint
the run resumes from (they will be logged again), so the final file has each step once.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` is appended to, never deleted, across resumes."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def trim_metrics_after(path: Path, step: int) -> None:
    """Drop rows of ``path`` logged after ``step`` (the step of the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], [r for r in reader if int(float(r["step"])) <= step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
