"""A run's checkpoints: when they are written, how, and which one a relaunch resumes from.

When (``RunCheckpoint``, the app's one checkpoint callback): ``checkpoints/last.ckpt`` is written every
``checkpoint_every_n_steps`` optimizer steps, at the end of training (so it always holds the final
weights), and at the first step end after a SIGTERM, SIGUSR2 or SIGINT; never at an epoch end as such.
Each save first writes out the loggers' buffered rows: metrics.csv then holds every row up to the
checkpoint's step, which a resumed run does not log again.
After a signal's checkpoint the signal goes on to the handler that had it before the fit, if that is
a Python function: submitit's SIGUSR2 handler then requeues the job and exits (the summary stays
"running" until the requeued job resumes), its SIGTERM handler only logs. Otherwise the run stops
with ``sigma_repro.errors.RunInterrupted``: the app records status "interrupted" with the step, and
the same command resumes.

How (``AtomicCheckpointIO``, the Trainer's CheckpointIO plugin): into a temporary file in the same
dir, fsynced, then renamed over ``last.ckpt``; the checkpoint it replaces becomes ``last.prev.ckpt``.
A save that fails (a full disk) leaves both as they were.

Which (``resume_point``): ``last.ckpt`` if it reads, else ``last.prev.ckpt`` (after a crash between
the two renames, or a ``last.ckpt`` damaged some other way), else a start from step 0; an unreadable
file is renamed to ``<name>.unreadable`` and the choice is printed.

Each checkpoint also records where it was computed (``compute_environment``: CPU threads, device
kind): both change floating-point results, so a resume elsewhere is flagged (``warn_on_new_compute``).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from sigma_repro.errors import RunInterrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


def previous_path(path: Path) -> Path:
    """``last.ckpt`` -> ``last.prev.ckpt``: where the checkpoint before ``path`` is kept."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves through a temporary file + fsync + rename, keeping the replaced file as ``*.prev.ckpt``.

    A reader (a relaunch) sees either the old checkpoint or the new one, never part of one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            tmp.unlink(missing_ok=True)
            kept = f"{path} still holds the checkpoint before it" if path.exists() else "no checkpoint was written"
            raise OSError(err.errno, f"could not write the checkpoint {path} ({err.strerror or err}); {kept}. "
                                     f"Free space on that disk (or fix it) and rerun the same command: it resumes "
                                     f"from the last complete checkpoint") from err
        if path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the renames themselves survive a power cut
        finally:
            os.close(dir_fd)


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """The global step and world size ``path`` was saved at, read without loading its tensors: they
    are memory-mapped and never touched (a full load reads gigabytes per rank at ViT-L size)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {"global_step": ckpt["global_step"], "world_size": ckpt.get("sigma_repro", {}).get("world_size")}


def resume_point(last: Path, *, report: bool = True) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint a launch resumes from, with its ``checkpoint_meta``; ``(None, None)``: step 0.

    ``last``, else its ``previous_path``, whichever reads first. With ``report`` (global rank 0 only:
    it alone renames) an unreadable file is renamed to ``<name>.unreadable`` (so that no later save
    rotates it into ``last.prev.ckpt``) and every fallback is printed."""
    skipped = []
    for path in (last, previous_path(last)):
        if not path.exists():
            continue
        try:
            meta = checkpoint_meta(path)
        except Exception as err:  # noqa: BLE001 - any file that does not read is no place to resume from
            skipped.append(path)
            if report:
                aside = path.with_name(f"{path.name}.unreadable")
                os.replace(path, aside)
                print(f"sigma-repro: {path} is unreadable ({type(err).__name__}: {str(err).strip()[:200]}); "
                      f"moved it to {aside}", flush=True)
            continue
        if skipped and report:
            print(f"sigma-repro: falling back to {path} (step {meta['global_step']})", flush=True)
        return path, meta
    if skipped and report:
        print("sigma-repro: no readable checkpoint is left: the run starts again from step 0", flush=True)
    return None, None


def compute_environment(device: torch.device) -> dict[str, Any]:
    """Where a run computes: CPU threads (they set the order of CPU reductions) and the device kind."""
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"cpu_threads": torch.get_num_threads(), "device": kind}


def warn_on_new_compute(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Print one warning when a resumed run computes elsewhere than the launch that saved its checkpoint
    (checkpoints older than this record have neither key and are not checked)."""
    changed = [f"{key} {saved[key]} -> {now[key]}" for key in ("cpu_threads", "device")
               if key in saved and saved[key] != now[key]]
    if changed:
        print(f"sigma-repro: WARNING: this launch resumes on other compute than the checkpoint was saved on "
              f"({', '.join(changed)}): the rest of the run will not be bit-identical to an uninterrupted one. "
              f"For an exact resume relaunch with the same thread count (OMP_NUM_THREADS / torch.set_num_threads) "
              f"on the same kind of device.", flush=True)


class RunCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_steps`` optimizer steps, at the end of training, and on a stop signal.

    Stop signals (SIGTERM, SIGUSR2, SIGINT) are taken over from the first training batch to the end of
    fit: the handler only notes the signal; at the end of the step in flight every rank agrees on it,
    the checkpoint of that step is written, the handler in place before the fit is called if it is a
    Python function (submitit's requeue; not Python's KeyboardInterrupt) and ``RunInterrupted`` ends
    the fit (a signal after the last step lets the run finish: its final checkpoint is written anyway).
    A second SIGINT raises KeyboardInterrupt at once. Lightning's teardown puts the handlers
    from before the fit back. Lightning's own SIGTERM handler is left out while training: it would end
    the fit at the epoch's end, or in the middle of a validation, without this checkpoint, and under
    DDP it broadcasts from rank 0 alone.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int) -> None:
        super().__init__(dirpath=str(dirpath), save_last=True, save_top_k=0, enable_version_counter=False,
                         every_n_train_steps=every_n_steps, save_on_train_epoch_end=True)
        self._signal: int | None = None
        self._before_fit: dict[int, Any] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # before Lightning registers its own SIGTERM handler (Trainer._run)
        self._before_fit = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._signal = None
        if threading.current_thread() is threading.main_thread():  # Python sets handlers there only
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._note_signal)

    def _note_signal(self, signum: int, frame) -> None:
        if self._signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
        self._signal = self._signal or signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        signum = int(trainer.strategy.reduce(torch.tensor(self._signal or 0, device=trainer.strategy.root_device),
                                             reduce_op="max")) if trainer.world_size > 1 else self._signal
        if signum:
            self._save_final(trainer)
            chained = self._before_fit.get(signum)
            if callable(chained) and chained is not signal.default_int_handler:
                chained(signum, None)  # submitit's SIGUSR2 handler requeues the job and exits here
            raise RunInterrupted(signal.Signals(signum).name, trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_final(trainer)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        # Loggers buffer rows until Lightning next logs (every log_every_n_steps; the diagnostics log
        # between): rows logged before this checkpoint must be on disk with it, or a hard kill loses
        # rows that the resumed run never logs again.
        for logger in trainer.loggers:
            logger.save()
        super()._save_checkpoint(trainer, filepath)

    def _save_final(self, trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step already saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

