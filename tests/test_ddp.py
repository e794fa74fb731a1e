"""Several processes: DDP on one node, two CPU processes over gloo (``trainer.devices=2
trainer.strategy=ddp``). Only global rank 0 writes the run dir; a hard kill resumes exactly; a
non-finite loss on one rank stops every rank at the same step; each rank seeds its own dropout;
a resume refuses another process count. The runs are real subprocesses of ``sigma_repro.train``,
whose rank 1 Lightning starts by re-running the same command."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from sigma_repro.checkpointing import checkpoint_meta
from sigma_repro.tasks.base import StabilityTask
from sigma_repro.tasks.classification import ClassificationTask
from sigma_repro.train import is_rank_zero

from .conftest import ROOT
from .test_resume import computed

STEPS = 10  # a multiple of checkpoint_every_n_steps: last.ckpt then holds the final weights
# 1437 digits / 2 ranks / 16 = 44 steps per epoch: the kill at step 7 (checkpoint at 5) is mid-epoch.
DDP = [
    "logger=csv", "model.depth=2", "model.embed_dim=32", "model.drop_rate=0.1", "data.batch_size=16",
    f"trainer.max_steps={STEPS}", "trainer.max_epochs=-1", "trainer.enable_progress_bar=false",
    "trainer.deterministic=true", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
    "trainer.strategy=ddp", "checkpoint_every_n_steps=5", "callbacks.diagnostics.every_n_steps=5",
]
RANKS_DIR_ENV = "SIGMA_REPRO_TEST_RANKS_DIR"


def launch(run_dir: Path, *overrides: str, devices: int = 2, env: dict | None = None,
           expect: int = 0) -> subprocess.CompletedProcess:
    """One launch of the app in ``run_dir`` with ``devices`` processes. It runs in a session of its own,
    so that on a timeout (a hung collective) the whole process group, rank 1 included, is killed."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "sigma_repro.train", f"paths.runs_dir={run_dir.parent}",
               f"hydra.run.dir={run_dir}", f"trainer.devices={devices}", *DDP, *overrides]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out (a hung collective?)\nSTDOUT:\n{stdout[-3000:]}\nSTDERR:\n{stderr[-5000:]}")
    done = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    if done.returncode != expect:
        raise AssertionError(f"exit {done.returncode}, expected {expect}\nSTDOUT:\n{stdout[-3000:]}\n"
                             f"STDERR:\n{stderr[-5000:]}")
    return done


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv's rows, each without its empty cells and throughput (a wall-clock rate)."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if v != "" and not k.endswith("_per_s")} for row in csv.DictReader(f)]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, str]:
    """A 2-process run of STEPS steps, never interrupted (the reference for the other tests): its
    dir and its stdout, which both ranks share."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    return run_dir, launch(run_dir).stdout


@pytest.mark.slow
def test_only_rank_zero_writes_the_run_dir(uninterrupted):
    run_dir, stdout = uninterrupted
    assert stdout.count("sigma-repro: run ended") == 1  # one rank ran the bookkeeping
    got = summary(run_dir)
    assert got["status"] == "finished" and got["steps"] == STEPS
    assert got["launches"] == 1 and got["world_size"] == 2
    assert "train_ddp_process" not in got["command"]  # rank 1 re-runs the command with this hydra.job.name
    written = files_under(run_dir.parent)
    assert {"run/summary.json", "run/DONE.json", "run/metrics.csv", "run/checkpoints/last.ckpt",
            "run/diagnostics.npz"} <= written
    assert not [f for f in written if f.endswith(".tmp") or "ddp_process" in f], written
    assert sorted(f for f in written if f.endswith(("summary.json", "DONE.json"))) == ["run/DONE.json",
                                                                                     "run/summary.json"]
    train_steps = [int(row["step"]) for row in metric_rows(run_dir) if "train/loss" in row]
    assert train_steps == list(range(STEPS))  # each step once, from rank 0 alone

    again = launch(run_dir)  # a finished run is not rerun, on any rank, and not counted again
    assert "stored result" in again.stdout
    assert summary(run_dir)["launches"] == 1


@pytest.mark.slow
def test_hard_kill_then_resume_matches_uninterrupted_run(uninterrupted, tmp_path):
    ref_dir, run_dir = uninterrupted[0], tmp_path / "run"
    killed = launch(run_dir, "+callbacks.kill._target_=tests.helpers.KillAtStep", "+callbacks.kill.step=7",
                    expect=-signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint_meta(run_dir / "checkpoints" / "last.ckpt") == {"global_step": 5, "world_size": 2}
    assert summary(run_dir)["status"] == "running" and summary(run_dir)["launches"] == 1
    resumed = launch(run_dir)
    assert resumed.stdout.count("sigma-repro: resuming") == 1

    ref, got = summary(ref_dir), summary(run_dir)
    assert got["status"] == "finished" and got["launches"] == 2 and got["world_size"] == 2
    assert computed(got["metrics"]) == computed(ref["metrics"]) and got["loss_spikes"] == ref["loss_spikes"]
    a = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The rows logged between the checkpoint and the kill were dropped, not doubled: the same file.
    assert metric_rows(run_dir) == metric_rows(ref_dir)
    with np.load(ref_dir / "diagnostics.npz") as x, np.load(run_dir / "diagnostics.npz") as y:
        assert x.files == y.files and all(np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f")
                                          for k in x.files)


@pytest.mark.slow
def test_ctrl_c_ends_every_rank_quietly_after_one_checkpoint_and_the_run_resumes_exactly(uninterrupted, tmp_path):
    # Ctrl-C reaches every process of the foreground group: both ranks take SIGINT after step 7.
    ref_dir, run_dir = uninterrupted[0], tmp_path / "run"
    stopped = launch(run_dir, "+callbacks.signal._target_=tests.test_resume.SignalAtStep", "+callbacks.signal.step=7",
                     "+callbacks.signal.name=SIGINT", expect=1)
    assert "Traceback" not in stopped.stderr + stopped.stdout, stopped.stderr[-5000:]  # rank 1 used to print one
    assert stopped.stdout.count("sigma-repro: run ended: status interrupted") == 1  # rank 0 reports, rank 1 is quiet
    got = summary(run_dir)
    assert (got["status"], got["signal"], got["steps"], got["launches"]) == ("interrupted", "SIGINT", 7, 1)
    assert checkpoint_meta(run_dir / "checkpoints" / "last.ckpt") == {"global_step": 7, "world_size": 2}
    resumed = launch(run_dir)
    assert resumed.stdout.count("sigma-repro: resuming") == 1
    ref, got = summary(ref_dir), summary(run_dir)
    assert got["status"] == "finished" and got["launches"] == 2
    assert computed(got["metrics"]) == computed(ref["metrics"])
    a = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_with_another_process_count_is_refused(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run_dir)
    (run_dir / "DONE.json").unlink()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    mtime = ckpt.stat().st_mtime_ns
    proc = launch(run_dir, devices=1, expect=1)
    error = summary(run_dir)["error"]
    assert "saved by a run on 2 processes" in error and "this launch has 1" in error
    assert "trainer.devices x trainer.num_nodes = 2" in error and "new run dir" in error
    assert error in proc.stdout and "Traceback" not in proc.stderr
    assert ckpt.stat().st_mtime_ns == mtime and not (run_dir / "DONE.json").exists()


@pytest.mark.slow
def test_checkpoint_meta_reads_what_a_full_load_reads(uninterrupted):
    ckpt = uninterrupted[0] / "checkpoints" / "last.ckpt"
    full = torch.load(ckpt, weights_only=True)
    assert checkpoint_meta(ckpt) == {"global_step": full["global_step"], "world_size": 2}
    assert full["global_step"] == STEPS


def test_checkpoint_meta_leaves_the_tensors_on_disk(tmp_path):
    """Reading the step of a checkpoint with 256 MB of weights keeps the reader's peak memory far below that."""
    ckpt = tmp_path / "big.ckpt"
    torch.save({"global_step": 7, "state_dict": {"w": torch.zeros(64 * 2**20)}, "sigma_repro": {"world_size": 4}},
               ckpt)
    probe = ("import resource, sys, torch; from pathlib import Path; from sigma_repro.checkpointing import "
             "checkpoint_meta; before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
             "meta = checkpoint_meta(Path(sys.argv[1])); "
             "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; print(meta['global_step'], "
             "meta['world_size'], (after - before) // 1024)")
    out = subprocess.run([sys.executable, "-c", probe, str(ckpt)], capture_output=True, text=True, cwd=ROOT,
                         check=True, timeout=120).stdout.split()
    step, world_size, grown_mb = map(int, out)
    assert (step, world_size) == (7, 4)
    assert grown_mb < 32, f"peak memory grew by {grown_mb} MB reading a 256 MB checkpoint's step"


class NaNOnRankOne(ClassificationTask):
    """The loss turns NaN on rank 1 only, from step 3 on; each rank records where it stopped and
    whether the weights it had when the NaN came are the weights it ended with."""

    def compute_loss(self, batch, stage):
        loss, logs = super().compute_loss(batch, stage)
        if stage == "train" and self.global_step == 3:
            self.weights_at_nan = [p.detach().clone() for p in self.parameters()]
        if stage == "train" and self.global_rank == 1 and self.global_step >= 3:
            loss = loss * float("nan")
        return loss, logs

    def on_train_end(self) -> None:
        unchanged = all(torch.equal(a, b) for a, b in zip(self.weights_at_nan, self.parameters(), strict=True))
        record = {"step": self.global_step, "diverged_step": self.diverged_step, "weights_unchanged": unchanged}
        Path(os.environ[RANKS_DIR_ENV], f"rank{self.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    ranks_dir = tmp_path / "ranks"
    ranks_dir.mkdir()
    run_dir = tmp_path / "run"
    launch(run_dir, "task._target_=tests.test_ddp.NaNOnRankOne", env={RANKS_DIR_ENV: str(ranks_dir)})
    got = summary(run_dir)
    assert got["status"] == "diverged" and got["diverged_step"] == 3
    assert (run_dir / "DONE.json").exists()
    ranks = {p.name: json.loads(p.read_text()) for p in ranks_dir.iterdir()}
    assert ranks == {f"rank{r}.json": {"step": got["steps"], "diverged_step": 3, "weights_unchanged": True}
                     for r in (0, 1)}


def test_each_rank_draws_its_own_dropout_masks_and_rank_zero_the_single_process_ones():
    def mask(task: StabilityTask, rank: int) -> torch.Tensor:
        task._trainer = SimpleNamespace(global_step=7, global_rank=rank)  # the hook reads only these
        task.on_train_batch_start(None, 0)
        return nn.functional.dropout(torch.ones(4096), 0.5) > 0

    task = StabilityTask(nn.Identity(), optim={}, schedule={}, seed=3)
    torch.manual_seed(3 * 1_000_003 + 7)  # the single-process seed of (seed 3, step 7), as before ranks existed
    single = nn.functional.dropout(torch.ones(4096), 0.5) > 0
    rank0, rank1 = mask(task, 0), mask(task, 1)
    assert torch.equal(rank0, single)
    assert not torch.equal(rank1, rank0) and 0.4 < rank1.float().mean() < 0.6


@pytest.mark.parametrize(("env", "zero"), [
    ({}, True),                                               # one process, or rank 0 before fit spawns the rest
    ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),            # rank 0 once Lightning's launcher has set its env
    ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, False),  # a rank Lightning's launcher started
    ({"NODE_RANK": "1"}, False),                              # local rank 0 of the second node
    ({"RANK": "3", "LOCAL_RANK": "0"}, False),                # torchrun
    ({"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "cell", "SLURM_PROCID": "1"}, False),
    ({"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "cell", "SLURM_PROCID": "0", "LOCAL_RANK": "0"}, True),
])
def test_rank_zero_is_known_from_the_launcher_environment(monkeypatch, env, zero):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_PROCID",
                 "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_rank_zero() is zero
