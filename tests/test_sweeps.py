"""Sweeps: one identity per run however the sweep spells a value (config.job_dir_name), and a
multirun that tallies its cells and exits non-zero when any did not end (sweeps.SweepTally); a
Ctrl-C stops a local sweep (through the app, here), a SLURM job's signal does not; tally dirs of
sweeps killed outright are removed. The multirun through the app with failing cells is in test_train.py."""

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from sigma_repro import sweeps
from sigma_repro.checkpointing import StopSignals
from sigma_repro.config import job_dir_name
from sigma_repro.sweeps import SweepTally

from .conftest import ROOT


def sweep_spelling(*overrides: str) -> list[str]:
    """The overrides of a sweep's first job, as Hydra's basic sweeper writes them for the job dir."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return BasicSweeper.split_arguments(parsed, None)[0][0]


def test_booleans_and_null_give_one_dir_however_a_sweep_spells_them():
    swept = sweep_spelling("model.norm=none", "trainer.deterministic=true,false", "x=NULL,1", "y=None")
    assert swept == ["model.norm=none", "trainer.deterministic=True", "x=null", "y=None"]  # Hydra's spellings
    typed = "model.norm=none,trainer.deterministic=true,x=NULL,y=None"
    assert job_dir_name("e", ",".join(swept), 0) == job_dir_name("e", typed, 0) == \
        "e/model.norm=none,trainer.deterministic=true,x=null,y=None/seed=0"  # "none" is a name, "None" a string
    assert job_dir_name("e", "a=FALSE,true=1,b=truex", 0) == "e/a=false,true=1,b=truex/seed=0"


def job_return(num: int, status: JobStatus, value) -> JobReturn:
    hydra_cfg = OmegaConf.create({"hydra": {"job": {"num": num}, "runtime": {"output_dir": f"/runs/cell{num}"}}})
    return JobReturn(hydra_cfg=hydra_cfg, status=status, _return_value=value)


def tallied(tmp_path, *returns: JobReturn):
    tally = SweepTally()
    sweep = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    tally.on_multirun_start(sweep)
    for r in returns:
        tally.on_job_end(OmegaConf.create(), r)
    tally.on_multirun_end(sweep)


def test_a_sweep_whose_cells_all_ended_exits_zero_with_its_tally(tmp_path, capsys):
    tallied(tmp_path, job_return(0, JobStatus.COMPLETED, {"status": "finished"}),
            job_return(1, JobStatus.COMPLETED, {"status": "diverged"}))
    assert capsys.readouterr().out == "sigma-repro: sweep of 2 cells: 1 finished, 1 diverged, 0 failed, 0 interrupted\n"
    assert not (tmp_path / ".multirun").exists()  # the tally dir is removed, and the dir that held it


def test_a_sweep_with_failed_or_interrupted_cells_exits_one_naming_their_dirs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        tallied(tmp_path, job_return(0, JobStatus.COMPLETED, {"status": "failed"}),
                job_return(1, JobStatus.COMPLETED, {"status": "finished"}),
                job_return(2, JobStatus.FAILED, RuntimeError("raised out of the app")),
                job_return(3, JobStatus.COMPLETED, {"status": "interrupted"}))
    assert exit_.value.code == 1
    assert capsys.readouterr().out.startswith(
        "sigma-repro: sweep of 4 cells: 1 finished, 0 diverged, 2 failed, 1 interrupted; "
        "failed: /runs/cell0, /runs/cell2; interrupted: /runs/cell3 (the same command retries")



# -- a stop signal, and tally dirs left behind ----------------------------------------------------------
def test_a_stop_signal_in_the_process_running_the_cells_stops_the_sweep_after_that_cell(tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.setattr(StopSignals, "first_in_process", None)
    tally = SweepTally()
    tally.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    tally.on_job_end(OmegaConf.create(), job_return(0, JobStatus.COMPLETED, {"status": "finished"}))
    monkeypatch.setattr(StopSignals, "first_in_process", "SIGINT")  # Ctrl-C during cell 1
    with pytest.raises(SystemExit) as exit_:
        tally.on_job_end(OmegaConf.create(), job_return(1, JobStatus.COMPLETED, {"status": "interrupted"}))
    assert exit_.value.code == 1
    assert capsys.readouterr().out == (
        "sigma-repro: sweep stopped by SIGINT after 2 cells, the rest not started: 1 finished, 0 diverged, "
        "0 failed, 1 interrupted; interrupted: /runs/cell1 (the same command resumes the interrupted cells, "
        "retries the failed ones and runs the rest)\n")
    assert not (tmp_path / ".multirun").exists()


def test_a_signal_in_a_slurm_job_is_that_cells_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    tally = SweepTally()
    sweep = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    tally.on_multirun_start(sweep)
    job = pickle.loads(pickle.dumps(tally))  # as submitit sends it to the job
    monkeypatch.setattr(sweeps, "this_launch", lambda: {"pid": 4242, "host": "node17"})  # the job's process
    monkeypatch.setattr(StopSignals, "first_in_process", "SIGUSR2")  # preempted
    job.on_job_end(OmegaConf.create(), job_return(0, JobStatus.COMPLETED, {"status": "interrupted"}))
    job.on_job_end(OmegaConf.create(), job_return(1, JobStatus.COMPLETED, {"status": "finished"}))
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        tally.on_multirun_end(sweep)
    assert capsys.readouterr().out.startswith(
        "sigma-repro: sweep of 2 cells: 1 finished, 0 diverged, 0 failed, 1 interrupted; interrupted: /runs/cell0 ")


def test_tally_dirs_of_sweeps_killed_outright_are_removed_at_the_next_sweep(tmp_path, capsys):
    root = tmp_path / ".multirun"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    host = socket.gethostname()
    owners = {"tally-dead": {"pid": int(ended.stdout), "host": host}, "tally-live": {"pid": os.getppid(), "host": host},
              "tally-elsewhere": {"pid": 1, "host": f"not-{host}"}, "tally-no-owner": None}
    for name, owner in owners.items():  # each as a sweep leaves it: a cell's record, and its owner
        (root / name).mkdir(parents=True)
        (root / name / "0.json").write_text(json.dumps({"status": "finished", "run_dir": f"/old/{name}"}))
        if owner:
            (root / name / "owner.json").write_text(json.dumps(owner))
    with pytest.raises(SystemExit):
        tallied(tmp_path, job_return(0, JobStatus.COMPLETED, {"status": "failed"}))
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"sigma-repro: removed {root / 'tally-dead'}, the tally dir of an earlier sweep "
                                   f"whose process (pid {int(ended.stdout)}) ended without tallying")
    assert "sweep of 1 cells: 0 finished, 0 diverged, 1 failed, 0 interrupted; failed: /runs/cell0 " in out
    assert sorted(p.name for p in root.iterdir()) == ["tally-elsewhere", "tally-live", "tally-no-owner"]


def test_a_sweep_whose_launcher_raises_leaves_no_tally_dir(tmp_path):
    # what submitit's launcher does when a SLURM job was killed outright (UncompletedJobError)
    script = ("import sys; from omegaconf import OmegaConf; from sigma_repro.sweeps import SweepTally; "
              "tally = SweepTally(); "
              "tally.on_multirun_start(OmegaConf.create({'hydra': {'sweep': {'dir': sys.argv[1]}}})); "
              "print(tally.tally_dir, flush=True); raise RuntimeError('a job was killed')")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 1 and "a job was killed" in proc.stderr
    assert Path(proc.stdout.strip()).parent == tmp_path / ".multirun"
    assert not (tmp_path / ".multirun").exists()


class SignalInCell(Callback):
    """Sends the signal ``name`` to its own process at the end of step ``step`` of the cell with seed
    ``seed``: a user pressing Ctrl-C while that cell of a local sweep trains."""

    def __init__(self, step: int, name: str, seed: int) -> None:
        self.step, self.signum, self.seed = step, signal.Signals[name], seed

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if pl_module.hparams.seed == self.seed and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


# Three 10-step cells; Ctrl-C at step 6 of the first (the checkpoint before it is at step 5).
SWEEP = ["logger=csv", "model.depth=2", "model.embed_dim=16", "trainer.max_steps=10", "trainer.max_epochs=-1",
         "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=5", "callbacks.diagnostics.every_n_steps=5",
         "seed=0,1,2", "+callbacks.signal._target_=tests.test_sweeps.SignalInCell", "+callbacks.signal.step=6",
         "+callbacks.signal.name=SIGINT", "+callbacks.signal.seed=0"]


def multirun(runs: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "sigma_repro.train", "-m", f"paths.runs_dir={runs}", *overrides],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def stopped_sweep(runs: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """The sweep of SWEEP, stopped by Ctrl-C in its first cell; checked here, with the cell's run dir."""
    stopped = multirun(runs, *SWEEP)
    summaries = {p.parent: json.loads(p.read_text()) for p in runs.rglob("summary.json")}
    assert len(summaries) == 1, (summaries, stopped.stdout[-3000:], stopped.stderr[-3000:])  # cells 1, 2 not started
    (run_dir, s), = summaries.items()
    assert run_dir.name == "seed=0" and (s["status"], s["signal"], s["steps"]) == ("interrupted", "SIGINT", 6)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr
    assert stopped.stdout.rstrip().endswith(
        f"sigma-repro: sweep stopped by SIGINT after 1 cells, the rest not started: 0 finished, 0 diverged, 0 failed, "
        f"1 interrupted; interrupted: {run_dir} (the same command resumes the interrupted cells, retries the failed "
        f"ones and runs the rest)")
    assert not (runs / ".multirun").exists()
    return stopped, run_dir


def test_ctrl_c_in_a_local_sweep_stops_it_after_recording_that_cell(tmp_path):
    stopped_sweep(tmp_path)


@pytest.mark.slow
def test_after_a_ctrl_c_the_same_sweep_command_resumes_that_cell_and_runs_the_rest(tmp_path):
    stopped_sweep(tmp_path)
    again = multirun(tmp_path, *SWEEP)  # seed 0 resumes past step 6: no signal this time
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("sigma-repro: resuming from") == 1
    assert "sigma-repro: sweep of 3 cells: 3 finished, 0 diverged, 0 failed, 0 interrupted" in again.stdout
    summaries = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")}
    assert {k: (s["status"], s["steps"], s["launches"]) for k, s in summaries.items()} == {
        "seed=0": ("finished", 10, 2), "seed=1": ("finished", 10, 1), "seed=2": ("finished", 10, 1)}
