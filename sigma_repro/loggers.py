"""CSV logging that survives resume.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when a new logger opens the same dir, so a
run resumed from ``last.ckpt`` would lose the curve it had before it was killed. Here the writer
keeps the file and appends; ``trim_metrics_after`` first drops the rows past the step of the
checkpoint the run resumes from (they will be logged again), and when the logger finalizes,
``drop_relogged_rows`` drops the rows of that step itself that were logged again, so the final file
has each row of the uninterrupted run once, in its order. A launch killed while it wrote a row
leaves that row half-written; ``repair_metrics`` drops it before the next launch appends.
Under DDP only global rank 0 touches the file: the logger's writes are rank-zero-only in Lightning,
and the app trims on rank 0 alone.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` is appended to, never deleted, across resumes."""

    @property
    @rank_zero_experiment  # as in CSVLogger: ranks > 0 get a no-op writer and never open metrics.csv
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)  # writes the rows still buffered
        if self._experiment is not None:
            drop_relogged_rows(Path(self._experiment.metrics_file_path))


def trim_metrics_after(path: Path, step: int) -> None:
    """Drop rows of ``path`` logged after ``step`` (the step of the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    fields, rows = _read_rows(path)
    _write_rows(path, fields, [r for r in rows if int(float(r["step"])) <= step])


def drop_relogged_rows(path: Path) -> None:
    """Of rows with the same step and the same logged keys, keep the last, where it stands.

    At the step S of the checkpoint a run resumed from, some rows were logged before the checkpoint
    was written (the diagnostics probe of step S: the resumed run does not log it again) and some
    after it (Lightning's training row labelled S, the gradient norms read at S: logged again).
    ``trim_metrics_after(path, S)`` keeps both kinds; only their keys tell them apart. An
    uninterrupted run never logs two rows with the same step and keys, so this changes nothing else.
    Throughput (``*_per_s``) does not count among the keys: the first batch of a launch has no batch
    before it to time from, so its row lacks the rate the killed launch logged at the same step.
    """
    fields, rows = _read_rows(path)
    identity = [(int(float(r["step"])), frozenset(k for k, v in r.items() if v != "" and not k.endswith("_per_s")))
                for r in rows]
    last = {key: i for i, key in enumerate(identity)}
    if len(last) < len(rows):
        _write_rows(path, fields, [r for i, r in enumerate(rows) if last[identity[i]] == i])


def repair_metrics(path: Path) -> str | None:
    """Drop a half-written last row (a launch killed mid-write leaves it without its line end, and the
    next launch would append onto it); says what it dropped. A file without one whole line (not even
    the header) is removed."""
    if not path.is_file():
        return None
    with path.open(newline="") as f:  # as written: the csv module ends lines with \r\n
        text = f.read()
    if not text or text.endswith("\n"):
        return None
    whole, newline, partial = text.rpartition("\n")
    if not newline:
        path.unlink()
        return f"removed {path}: it held only a half-written header ({partial!r})"
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        f.write(whole + newline)
    tmp.replace(path)  # atomic, as every rewrite here
    return f"dropped the half-written last row of {path} ({partial!r}), left by a launch killed while writing it"


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _write_rows(path: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)  # atomic: a kill while rewriting never leaves half a file
