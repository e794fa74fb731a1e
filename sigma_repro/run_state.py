"""What a run dir keeps between launches, read back safely after a launch died at any instruction.

A run dir (sigma_repro/train.py) holds summary.json ("running" while a launch runs, then its end),
DONE.json once the run has ended, metrics.csv and checkpoints/. A launch can die anywhere (SIGKILL,
the OOM killer, a full disk, a node failure); the next launch of the same command reads what it left
and recovers, or explains, file by file, before any compute:

- summary.tmp, DONE.tmp, metrics.tmp (an atomic rewrite killed before its rename): removed.
- summary.json unreadable: of an unfinished run, kept aside as summary.corrupt.json; the run goes on
  and counts launches from this one. Of a finished run (DONE.json): its result is lost, a ConfigError
  says so and what to do.
- metrics.csv: a half-written last row is dropped (``loggers.repair_metrics``). (Rows logged after the
  checkpoint a launch resumes from, all rows when it starts over, are trimmed where the resume point
  is chosen: ``train.train``.)
- W&B's temp dirs of a launch that died: removed (wandb makes two in $TMPDIR at import and removes
  them only at a clean exit).
- DONE.json: trusted only while the stored config is the one the command composes
  (``config_differences``).

The "running" stub records the launch's process id and host (``this_launch``), so the next launch
and ``sigma-repro table`` can tell a dead launch from a live one (``launch_gone``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from sigma_repro.errors import ConfigError

SUMMARY, DONE = "summary.json", "DONE.json"
CORRUPT_SUMMARY = "summary.corrupt.json"
WANDB_TEMP_GLOB = "tmp*wandb-*"  # tempfile.TemporaryDirectory("wandb-media"), ("wandb-artifacts")


class _Missing:
    """A config key one side does not have."""

    def __repr__(self) -> str:
        return "(absent)"


MISSING = _Missing()


def this_launch() -> dict[str, Any]:
    """The process id and host of this launch, for the "running" stub."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def launch_gone(record: dict[str, Any]) -> bool | None:
    """Whether the launch that wrote ``record`` (a summary with ``pid`` and ``host``) has ended: True
    or False on the same host, None when it cannot be told here (another host, or no pid recorded)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return None
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def recover_run_dir(out: Path) -> list[str]:
    """Repair what a killed launch can leave half-written (summary.tmp, metrics.csv's last row);
    returns a note per repair."""
    from sigma_repro.loggers import repair_metrics  # imports Lightning: not for `sigma-repro table`

    notes = []
    for tmp in sorted(out.glob("*.tmp")):  # summary.tmp, DONE.tmp, metrics.tmp: this launch has not begun one
        tmp.unlink()
        notes.append(f"removed {tmp}, left by a write that was killed before its rename")
    note = repair_metrics(out / "metrics.csv")
    if note:
        notes.append(note)
    return notes


def read_stored_result(out: Path) -> dict[str, Any]:
    """The summary of a finished run dir (one with DONE.json); a ConfigError if it cannot be read."""
    try:
        summary = json.loads((out / SUMMARY).read_text())
        if not isinstance(summary, dict) or "status" not in summary:
            raise ValueError(f"expected a JSON object with a status, found {type(summary).__name__}")
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{out / DONE} says this run ended, but its {SUMMARY} cannot be read ({err}): the stored result is "
            f"lost. Delete {out / DONE} and run the same command again: it resumes from the final checkpoint "
            f"and writes the summary anew."
        ) from None
    return summary


def read_previous_summary(out: Path) -> tuple[dict[str, Any], list[str]]:
    """The summary an earlier launch of an unfinished run left ({} if none), and notes. An unreadable
    one is moved to summary.corrupt.json: the run goes on, counting launches from this one."""
    path = out / SUMMARY
    if not path.exists():
        return {}, []
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict):
            raise ValueError(f"expected a JSON object, found {type(summary).__name__}")
        return summary, []
    except ValueError as err:
        path.replace(out / CORRUPT_SUMMARY)
        return {}, [f"{path} could not be read ({err}); kept as {out / CORRUPT_SUMMARY}. The run goes on; "
                    f"its launch count and wall time restart from this launch (earlier ones are not known)"]


@lru_cache(maxsize=1)
def wandb_temp_dirs() -> tuple[str, ...]:
    """Imports wandb; returns the temp dirs it made in $TMPDIR for this process (once per process).

    wandb removes them at a clean exit only; the run's stub records them, so that the next launch
    removes those of a launch that was killed (``remove_temp_dirs_of``)."""
    before = set(Path(tempfile.gettempdir()).glob(WANDB_TEMP_GLOB))
    import wandb  # noqa: F401 - the import makes them

    return tuple(sorted(str(p) for p in set(Path(tempfile.gettempdir()).glob(WANDB_TEMP_GLOB)) - before))


def remove_temp_dirs_of(previous: dict[str, Any]) -> list[str]:
    """Remove the W&B temp dirs that the launch of ``previous`` (its "running" stub) recorded, once
    that launch is known to be gone (a launch on another host, or still alive, keeps them); a note
    if any were removed."""
    dirs = [Path(d) for d in previous.get("tmp_dirs", []) if Path(d).match(WANDB_TEMP_GLOB) and Path(d).is_dir()]
    if not dirs or launch_gone(previous) is not True:
        return []
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    return [f"removed {len(dirs)} W&B temp dirs left in {dirs[0].parent} by the killed launch (pid {previous['pid']})"]


def config_differences(stored: dict[str, Any], current: dict[str, Any],
                       ignore: Iterable[str]) -> list[tuple[str, Any, Any]]:
    """(key, stored value, current value) for every dotted key whose values differ, keys under
    ``ignore`` (a key or any key below it) left out; a key on one side only has ``MISSING`` on the other."""
    ignore = tuple(ignore)
    a, b = _flatten(stored), _flatten(current)
    keys = sorted(k for k in a.keys() | b.keys() if not any(k == i or k.startswith(i + ".") for i in ignore))
    return [(k, a.get(k, MISSING), b.get(k, MISSING)) for k in keys if a.get(k, MISSING) != b.get(k, MISSING)]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; an empty dict below the top stays a value."""
    if not isinstance(node, dict) or (prefix and not node):
        return {prefix[:-1]: node}
    return {k: v for key, child in node.items() for k, v in _flatten(child, f"{prefix}{key}.").items()}
