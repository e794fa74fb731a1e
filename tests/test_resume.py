"""Resume and run state under faults, through the real app: hard kills at random steps with the default
trainer settings (max_epochs=30, so epochs end and the schedule spans epochs) and with proxy-like ones
(max_epochs=-1), stop signals (checkpoint at that step, status interrupted), a truncated last.ckpt, a
full disk during a save. Every resumed run must end bit-identical to the uninterrupted one: final
metrics, every tensor of the final checkpoint and metrics.csv byte for byte (throughput, a wall-clock
rate, left out of both)."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from sigma_repro import checkpointing
from sigma_repro.checkpointing import AtomicCheckpointIO, StopSignals, Stopped, resume_point
from sigma_repro.data.images import DigitsDataModule
from sigma_repro.data.sampling import planned_optimizer_steps

from .conftest import ROOT
from .test_data import TinyClassifier

# A 2-block digits ViT with dropout; 128-image batches: 11 steps per epoch. 47 steps: 4 epochs and 3
# steps, not a multiple of the checkpoint interval. trainer.max_epochs stays at its default (30).
DEFAULT = ["logger=csv", "model.depth=2", "model.embed_dim=16", "model.drop_rate=0.1", "trainer.max_steps=47",
           "trainer.deterministic=true", "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=5",
           "callbacks.diagnostics.every_n_steps=10"]
PROXY_LIKE = [*DEFAULT, "trainer.max_epochs=-1"]  # what scale=proxy sets
SETTINGS = {"default": DEFAULT, "proxy_like": PROXY_LIKE}
STEPS = 47


class SignalAtStep(Callback):
    """Sends the signal ``name`` (e.g. "SIGTERM") to its own process once, at the end of step ``step``:
    a real signal at a known point. It runs before the checkpoint callback of that step."""

    def __init__(self, step: int, name: str) -> None:
        self.step, self.signum = step, signal.Signals[name]

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class SignalOutsideTraining(Callback):
    """Sends the signal ``name`` to its own process once, outside the training loop: ``when`` "fit_start"
    (before the first batch; a resumed fit has restored its checkpoint) or "final_validation" (during
    the first batch of the validation the app runs after the fit)."""

    def __init__(self, when: str, name: str) -> None:
        self.when, self.signum = when, signal.Signals[name]

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.when == "fit_start":
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.when == "final_validation" and trainer.state.fn == TrainerFn.VALIDATING and batch_idx == 0:
            os.kill(os.getpid(), self.signum)


def launch(run_dir: Path, *overrides: str, threads: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """``sigma-repro-train`` in ``run_dir`` (pinned: the kill callbacks stay out of the job dir's name)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "sigma_repro.train", f"paths.runs_dir={run_dir.parent}", f"hydra.run.dir={run_dir}",
         *overrides], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


def kill_at(step: int) -> list[str]:
    return ["+callbacks.kill._target_=tests.helpers.KillAtStep", f"+callbacks.kill.step={step}"]


def signal_outside_training(when: str, name: str) -> list[str]:
    return ["+callbacks.signal._target_=tests.test_resume.SignalOutsideTraining", f"+callbacks.signal.when={when}",
            f"+callbacks.signal.name={name}"]


def signal_at(step: int, name: str) -> list[str]:
    return ["+callbacks.signal._target_=tests.test_resume.SignalAtStep", f"+callbacks.signal.step={step}",
            f"+callbacks.signal.name={name}"]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def saved_step(path: Path) -> int:
    return torch.load(path, weights_only=True, mmap=True)["global_step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of each setting, made on first use."""
    done: dict[str, Path] = {}

    def get(setting: str) -> Path:
        if setting not in done:
            done[setting] = tmp_path_factory.mktemp("reference") / setting
            launch(done[setting], *SETTINGS[setting])
        return done[setting]

    return get


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped by the signal ``name`` at ``step``, made on first use: ``get(name, step, into)``
    copies its run dir to ``into`` and returns the launch that was stopped."""
    done: dict[tuple[str, int], tuple[Path, subprocess.CompletedProcess]] = {}

    def get(name: str, step: int, into: Path) -> subprocess.CompletedProcess:
        if (name, step) not in done:
            run_dir = tmp_path_factory.mktemp("interrupted") / "run"
            done[name, step] = run_dir, launch(run_dir, *DEFAULT, *signal_at(step, name), check=False)
        run_dir, proc = done[name, step]
        shutil.copytree(run_dir, into)
        return proc

    return get


def computed(metrics: dict) -> dict:
    """A summary's metrics without throughput (``train/<unit>_per_s``): wall-clock rates differ between
    any two runs."""
    return {k: v for k, v in metrics.items() if not k.endswith("_per_s")}


def computed_columns(path: Path) -> list[str]:
    """metrics.csv's lines, as written, without the throughput columns."""
    lines = path.read_bytes().decode().splitlines()
    keep = [i for i, name in enumerate(lines[0].split(",")) if not name.endswith("_per_s")]
    return [",".join(cells[i] for i in keep) for cells in (line.split(",") for line in lines)]


def assert_same_run(ref_dir: Path, run_dir: Path) -> None:
    ref, got = summary(ref_dir), summary(run_dir)
    assert (got["status"], got["steps"]) == ("finished", STEPS) == (ref["status"], ref["steps"])
    assert computed(got["metrics"]) == computed(ref["metrics"])
    assert {k.split("/")[0] for k in ref["metrics"]} == {"train", "val"}  # the last step's training metrics too
    assert got["attention_entropy"] == ref["attention_entropy"] and got["loss_spikes"] == ref["loss_spikes"]
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (ref_dir, run_dir))
    assert a["global_step"] == b["global_step"] == STEPS  # last.ckpt holds the final weights
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert computed_columns(run_dir / "metrics.csv") == computed_columns(ref_dir / "metrics.csv")


def test_uninterrupted_run_ends_with_final_checkpoint_and_records_its_compute(reference):
    ref_dir = reference("default")
    s = summary(ref_dir)
    assert (s["status"], s["steps"], s["cpu_threads"], s["device"]) == ("finished", STEPS, 1, "cpu")
    ckpt = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS  # not 45, the last multiple of checkpoint_every_n_steps
    assert (ckpt["sigma_repro"]["cpu_threads"], ckpt["sigma_repro"]["device"]) == (1, "cpu")
    assert saved_step(ref_dir / "checkpoints" / "last.prev.ckpt") == 45
    assert sorted(p.name for p in (ref_dir / "checkpoints").iterdir()) == ["last.ckpt", "last.prev.ckpt"]


def test_hard_kill_mid_epoch_resumes_exactly_with_default_max_epochs(reference, tmp_path):
    # Killed at step 27, resumed from the step-25 checkpoint: batch 3 of epoch 2. With the default
    # max_epochs the schedule's length used to build the train loader before the checkpoint was
    # restored, and the resumed epoch started over at its first batch.
    run_dir = tmp_path / "run"
    assert launch(run_dir, *DEFAULT, *kill_at(27), check=False).returncode == -signal.SIGKILL
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == 25
    assert "resuming from" in launch(run_dir, *DEFAULT).stdout
    assert_same_run(reference("default"), run_dir)


@pytest.mark.slow
@pytest.mark.soak  # 22 launches, about 2.5 minutes: `make test-soak`; CI keeps the one-kill resume tests
@pytest.mark.parametrize("setting", ["default", "proxy_like"])
def test_ten_random_hard_kills_resume_exactly(setting, reference, tmp_path):
    run_dir = tmp_path / "run"
    kills = sorted(random.Random(f"issue-8-{setting}").sample(range(1, STEPS), 10))
    for step in kills:  # each launch is killed at a later step than the one before
        proc = launch(run_dir, *SETTINGS[setting], *kill_at(step), check=False)
        assert proc.returncode == -signal.SIGKILL, (step, proc.stderr[-2000:])
    launch(run_dir, *SETTINGS[setting])
    assert summary(run_dir)["launches"] == len(kills) + 1
    assert_same_run(reference(setting), run_dir)


@pytest.mark.parametrize(("name", "step"), [("SIGTERM", 23), ("SIGINT", 12)])
def test_stop_signal_saves_that_step_records_interrupted_and_resumes_exactly(name, step, reference, interrupted,
                                                                            tmp_path):
    run_dir = tmp_path / "run"
    proc = interrupted(name, step, run_dir)
    assert proc.returncode not in (0, -signal.SIGKILL), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    s = summary(run_dir)
    assert (s["status"], s["signal"], s["steps"]) == ("interrupted", name, step)
    assert not (run_dir / "DONE.json").exists()
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == step
    assert saved_step(run_dir / "checkpoints" / "last.prev.ckpt") == step - step % 5
    launch(run_dir, *DEFAULT)
    assert summary(run_dir)["launches"] == 2
    assert_same_run(reference("default"), run_dir)


def test_ctrl_c_before_the_first_batch_records_interrupted_at_the_checkpoints_step(reference, interrupted,
                                                                                  tmp_path):
    # Lightning turns a KeyboardInterrupt outside the training loop into sys.exit(1), past the app's
    # bookkeeping: the summary used to say "running".
    run_dir = tmp_path / "run"
    interrupted("SIGINT", 12, run_dir)
    saved = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    proc = launch(run_dir, *DEFAULT, *signal_outside_training("fit_start", "SIGINT"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "stopped by SIGINT at step 12" in proc.stdout
    s = summary(run_dir)
    assert (s["status"], s["signal"], s["steps"], s["launches"]) == ("interrupted", "SIGINT", 12, 2)
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == saved and not (run_dir / "DONE.json").exists()
    launch(run_dir, *DEFAULT)
    assert summary(run_dir)["launches"] == 3
    assert_same_run(reference("default"), run_dir)


@pytest.mark.parametrize("stop", [
    pytest.param(signal_outside_training("final_validation", "SIGTERM"), id="SIGTERM in the final validation"),
    pytest.param(signal_at(STEPS, "SIGINT"), id="SIGINT at the last step", marks=pytest.mark.slow),
])
def test_stop_signal_after_training_keeps_the_final_checkpoint_and_the_next_launch_only_validates(stop, reference,
                                                                                               tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, *DEFAULT, *stop, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    s = summary(run_dir)
    assert (s["status"], s["signal"], s["steps"]) == ("interrupted", stop[-1].split("=")[1], STEPS)
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == STEPS and not (run_dir / "DONE.json").exists()
    resumed = launch(run_dir, *DEFAULT)
    assert "resuming from" in resumed.stdout
    assert_same_run(reference("default"), run_dir)  # the training metrics of step 47 from the checkpoint


def test_truncated_last_checkpoint_falls_back_to_the_previous_one(reference, interrupted, tmp_path):
    run_dir = tmp_path / "run"
    interrupted("SIGTERM", 23, run_dir)  # last.ckpt at step 23, last.prev.ckpt at 20
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # what a full disk left behind before saves were atomic
    proc = launch(run_dir, *DEFAULT)
    assert f"{last} is unreadable" in proc.stdout
    assert f"falling back to {run_dir / 'checkpoints' / 'last.prev.ckpt'} (step 20)" in proc.stdout
    assert (run_dir / "checkpoints" / "last.ckpt.unreadable").stat().st_size == 1000
    assert_same_run(reference("default"), run_dir)


def test_resume_on_another_thread_count_warns_once(interrupted, tmp_path):
    run_dir = tmp_path / "run"
    interrupted("SIGINT", 12, run_dir)  # saved by a launch with 1 thread
    proc = launch(run_dir, *DEFAULT, "trainer.max_steps=14", threads=2)  # two steps are enough to see it
    assert proc.stdout.count("WARNING: this launch resumes on other compute") == 1
    assert "cpu_threads 1 -> 2" in proc.stdout
    assert summary(run_dir)["cpu_threads"] == 2


# -- without a run ----------------------------------------------------------------------------------
class _Counted(Exception):
    pass


class CountSteps(Callback):
    """Reads both step counts when the fit starts (the train loader not yet built), then stops it."""

    def on_fit_start(self, trainer, pl_module) -> None:
        planned = planned_optimizer_steps(trainer)  # first: Lightning's count builds the loader
        raise _Counted(planned, trainer.estimated_stepping_batches)


@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated")  # inside Lightning
@pytest.mark.parametrize(("trainer_args", "steps"), [
    ({"max_epochs": 3}, 3 * 22),  # 1437 digits // 64 = 22 batches per epoch
    ({"max_epochs": 30, "max_steps": 47}, 47),
    ({"max_epochs": 2, "limit_train_batches": 0.5, "accumulate_grad_batches": 3}, 2 * 4),  # ceil(11 / 3)
    ({"max_epochs": 2, "limit_train_batches": 5}, 2 * 5),
    ({"max_epochs": -1, "max_steps": 9}, 9),
])
def test_planned_optimizer_steps_counts_what_lightning_estimates(trainer_args, steps, tmp_path):
    trainer = pl.Trainer(**trainer_args, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[CountSteps()],
                         default_root_dir=tmp_path)
    with pytest.raises(_Counted) as counted:
        trainer.fit(TinyClassifier(), datamodule=DigitsDataModule(batch_size=64))
    assert counted.value.args == (steps, steps)


def test_a_save_that_fills_the_disk_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    io.save_checkpoint({"global_step": 2}, path)

    def disk_full(obj, f):
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", disk_full)
    with pytest.raises(OSError, match="still holds the checkpoint before it") as raised:
        io.save_checkpoint({"global_step": 3}, path)
    assert raised.value.errno == errno.ENOSPC and "rerun the same command" in str(raised.value)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"global_step": 2}
    assert torch.load(path.with_name("last.prev.ckpt"), weights_only=True) == {"global_step": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.prev.ckpt"]  # no temp file left


def test_no_readable_checkpoint_means_a_clean_restart(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    AtomicCheckpointIO().save_checkpoint({"global_step": 5}, ckpts / "last.ckpt")
    good = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(good[:1000])
    (ckpts / "last.prev.ckpt").write_bytes(b"")
    assert resume_point(ckpts / "last.ckpt", report=False) == (None, None)  # ranks > 0 only look
    assert (ckpts / "last.ckpt").exists()
    assert resume_point(ckpts / "last.ckpt") == (None, None)
    out = capsys.readouterr().out
    assert out.count("is unreadable") == 2 and "starts again from step 0" in out
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt.unreadable", "last.prev.ckpt.unreadable"]
    shutil.rmtree(ckpts)
    assert resume_point(ckpts / "last.ckpt") == (None, None) and capsys.readouterr().out == ""


# -- stop signals, without a run ----------------------------------------------------------------------
@pytest.fixture
def no_signal_yet(monkeypatch):
    monkeypatch.setattr(StopSignals, "first_in_process", None)  # put back after the test


def test_stop_signal_outside_the_training_loop_passes_on_and_stops_at_once(no_signal_yet):
    passed_on = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: passed_on.append(signum))  # as submitit's
    try:
        with pytest.raises(Stopped) as stopped, StopSignals() as stop:
            assert StopSignals.current is stop
            os.kill(os.getpid(), signal.SIGUSR2)
        assert stopped.value.signal_name == "SIGUSR2" and passed_on == [signal.SIGUSR2]
        assert StopSignals.first_in_process == "SIGUSR2" and StopSignals.current is None
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers from before
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_stop_signals_in_the_training_loop_are_noted_until_a_second_ctrl_c(no_signal_yet):
    with StopSignals() as stop:
        stop.defer()  # as RunCheckpoint does for the training loop
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGINT and stop.mode == "defer"
        with pytest.raises(Stopped, match="stopped by SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.mode == "note"  # the launch is ending: later signals are only noted
        os.kill(os.getpid(), signal.SIGINT)
    assert StopSignals.first_in_process == "SIGINT"


@pytest.mark.parametrize(("name", "ends"), [("SIGINT", "KeyboardInterrupt"), ("SIGTERM", "killed")])
def test_a_forked_child_takes_a_stop_signal_as_before_the_launch(name, ends, no_signal_yet):
    # DataLoader workers are forked: Ctrl-C reaches them too; the launch's own process decides.
    with StopSignals():
        pid = os.fork()
        if pid == 0:  # the child: exit 3 on KeyboardInterrupt, 4 if nothing happens
            code = 4
            try:
                os.kill(os.getpid(), signal.Signals[name])
                time.sleep(2)
            except KeyboardInterrupt:
                code = 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    got = "KeyboardInterrupt" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3 else \
        "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM else status
    assert got == ends
    assert StopSignals.first_in_process is None  # the parent took no signal
