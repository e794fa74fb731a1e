"""A run's checkpoints: when they are written, how, and which one a relaunch resumes from.

When (``RunCheckpoint``, the app's one checkpoint callback): ``checkpoints/last.ckpt`` is written every
``checkpoint_every_n_steps`` optimizer steps, at the end of training (so it always holds the final
weights), and at the first step end after a SIGTERM, SIGUSR2 or SIGINT; never at an epoch end as such.
Each save first writes out the loggers' buffered rows: metrics.csv then holds every row up to the
checkpoint's step, which a resumed run does not log again.

Stop signals (``StopSignals``, held by the app for a whole launch, on every rank): in the training
loop a signal is only noted; at the end of the step in flight every rank agrees on it, that step's
checkpoint is written, the signal goes on to the handler that had it before the launch if that is a
Python function (submitit's SIGUSR2 handler then requeues the job and exits: the summary stays
"running" until the requeued job resumes; its SIGTERM handler only logs), and the fit stops with
``sigma_repro.errors.RunInterrupted``. Anywhere else (building data and model, restoring, the
sanity check, the final validation), and at a second Ctrl-C, the signal goes on in the same way and
``Stopped`` ends the launch at once: the last checkpoint stands. Either way the app records status
"interrupted" with the signal and the checkpoint's step, and the same command resumes.

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


class Stopped(BaseException):
    """A launch ended at once by a stop signal outside the training loop, or by a second Ctrl-C; the
    last checkpoint stands. A BaseException, as KeyboardInterrupt is: no ``except Exception`` on its way
    (Hydra's instantiate, library code) catches or wraps it, and Lightning re-raises it after its
    teardown (a KeyboardInterrupt it would turn into ``sys.exit(1)``, past the app's bookkeeping)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name


class StopSignals:
    """SIGTERM, SIGUSR2 and SIGINT for the length of one launch (``with StopSignals(): train(...)``).

    Every signal is noted (``received``; ``first_in_process`` keeps the first for the whole process:
    a local sweep stops at it, sigma_repro/sweeps.py). What else it does depends on ``mode``:
    - "raise", from the start: it goes on to the handler from before the launch (``pass_on``) and
      ``Stopped`` is raised where the launch is (then "note");
    - "defer", set by ``RunCheckpoint`` for the training loop: nothing else; the callback saves the step
      in flight, passes the signal on and raises RunInterrupted (then "note"). A second SIGINT raises
      ``Stopped`` at once (Ctrl-C twice: stop now, without that step's checkpoint);
    - "note" (``note_only``), once the launch is ending and being recorded: nothing else.
    Leaving the block puts the handlers from before it back. A process forked inside the block (a
    DataLoader worker) inherits the handler; there a signal does what it did before the launch
    (Ctrl-C reaches the workers too; the launch's own process decides).
    """

    current: StopSignals | None = None  # the one this process holds: signal handlers are per process
    first_in_process: str | None = None  # the name of the first stop signal any launch here received

    def __init__(self) -> None:
        self.received: int | None = None
        self.mode = "raise"
        self._before: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python sets handlers there only
            self._before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
            self.install()
        StopSignals.current = self
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        StopSignals.current = None

    def install(self) -> None:
        """Put this handler in front again (Lightning's fit sets its own SIGTERM handler)."""
        for signum in self._before:  # empty when held outside the main thread
            signal.signal(signum, self._handle)

    def defer(self) -> None:
        self.install()
        self.mode = "defer"

    def note_only(self) -> None:
        self.mode = "note"

    def pass_on(self, signum: int) -> None:
        """Call the handler from before the launch if it is a Python function other than Python's own
        KeyboardInterrupt raiser: submitit's SIGUSR2 handler requeues the job and exits here."""
        before = self._before.get(signum)
        if callable(before) and before is not signal.default_int_handler:
            before(signum, None)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked child: as before the launch
            before = self._before.get(signum)
            if callable(before):
                before(signum, frame)  # Python's KeyboardInterrupt: DataLoader workers end on it quietly
            elif before != signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        name = signal.Signals(signum).name
        again = self.received == signal.SIGINT == signum
        self.received = self.received or signum
        StopSignals.first_in_process = StopSignals.first_in_process or name
        if self.mode == "raise" or (self.mode == "defer" and again):
            self.note_only()  # the launch is ending: a signal while it records that is only noted
            self.pass_on(signum)
            raise Stopped(name)


class RunCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_steps`` optimizer steps, at the end of training, and on a stop signal.

    Stop signals come from the launch's ``StopSignals`` (the app holds one on every rank; without one
    the callback saves every N steps and at the end only). From the first training batch to the end
    of training it defers them: at the end of the step in flight every rank agrees on a noted signal,
    the checkpoint of that step is written, the signal is passed on (submitit's requeue) and
    ``RunInterrupted`` ends the fit. At the fit's last step the fit ends first, so that the checkpoint
    is the final one (the end-of-training probe and loop state in it), and then stops; a signal after
    the last step's end (in the fit's last validation) lets the run finish. Lightning's own
    SIGTERM handler is kept out while training: it would end the fit at the epoch's end, or in the
    middle of a validation, without this checkpoint, and under DDP it broadcasts from rank 0 alone.

    Each checkpoint also holds the run's latest scalar metrics (``trainer.callback_metrics``, the
    last step's training metrics among them): a launch that resumes from the final checkpoint trains
    no step, and gets them back at the end of its fit, so its summary is the uninterrupted run's.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int) -> None:
        super().__init__(dirpath=str(dirpath), save_last=True, save_top_k=0, enable_version_counter=False,
                         every_n_train_steps=every_n_steps, save_on_train_epoch_end=True)
        self._stop: StopSignals | None = None
        self._stop_at_end: int | None = None  # a signal noted at the fit's last step
        self._restored_metrics: dict[str, torch.Tensor] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._restored_metrics = None  # this fit trains: it logs its own
        self._stop_at_end = None
        self._stop = StopSignals.current
        if self._stop is not None:
            self._stop.defer()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        noted = (self._stop.received if self._stop is not None else None) or 0
        signum = int(trainer.strategy.reduce(torch.tensor(noted, device=trainer.strategy.root_device),
                                             reduce_op="max")) if trainer.world_size > 1 else noted
        if not signum:
            return
        if last_step_of_fit(trainer):
            self._stop_at_end = signum  # on_train_end saves the final checkpoint, then stops
            return
        self._save_final(trainer)
        self._stop_here(trainer, signum)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_final(trainer)
        if self._stop_at_end:
            self._stop_here(trainer, self._stop_at_end)
        self._stop_deferring()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._stop_deferring()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._restored_metrics is not None:  # no step trained: the fit resumed at its end
            for key, value in self._restored_metrics.items():
                trainer.callback_metrics.setdefault(key, value)
            self._restored_metrics = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        checkpoint["callback_metrics"] = {key: value.detach().cpu().clone()
                                          for key, value in trainer.callback_metrics.items() if value.numel() == 1}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._restored_metrics = checkpoint.get("callback_metrics")  # checkpoints before this record: None

    def _stop_here(self, trainer, signum: int) -> None:
        if self._stop is not None:
            self._stop.note_only()
            self._stop.pass_on(signum)  # submitit's SIGUSR2 handler requeues the job and exits here
        raise RunInterrupted(signal.Signals(signum).name, trainer.global_step)

    def _stop_deferring(self) -> None:
        if self._stop is not None and self._stop.mode == "defer":
            self._stop.mode = "raise"
        self._stop = None

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


def last_step_of_fit(trainer) -> bool:
    """Whether the step that just ended is the fit's last: ``max_steps`` reached, or the last batch of
    the last of ``max_epochs`` epochs (as Lightning's fit and epoch loops decide)."""
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    return last_epoch and trainer.fit_loop.epoch_loop._num_ready_batches_reached()
