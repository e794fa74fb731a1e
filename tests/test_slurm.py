"""Sweeps on a real SLURM (slurm/local-cluster): jobs run, a hard-killed job fails the launcher in
bounded time, a re-run finishes only the missing cells, and a preempted job is requeued by submitit
into the same run dir and resumes there, appending to the same W&B run. Plus what needs no cluster:
the launcher config, the cluster profile, the Lightning plugin, the W&B close.

The cluster tests are slow and skip with a reason without SLURM; as root on Debian with the packages
installed they start the local cluster themselves (and stop it afterwards). .ci/run installs it."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sigma_repro.slurm import finish_wandb, trainer_plugins

from .conftest import CONF_DIR, ROOT

LOCAL_CLUSTER = ROOT / "slurm" / "local-cluster"
JOB_NAME = "sigma-repro-test"  # the tests cancel their own leftovers by this name, nothing else
# The local cluster: CPU only, one default partition, 2 cores. Explicit so that a developer's
# profile (conf/local/slurm.yaml) for a real cluster cannot send these jobs elsewhere.
LAUNCHER = [
    "hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10",
    f"hydra.launcher.name={JOB_NAME}",
]
# A 10-step digits run: 2-block ViT, CSV logging, a checkpoint every 5 steps.
TINY = ["logger=csv", "model.depth=2", "model.embed_dim=16", "trainer.max_steps=10", "trainer.max_epochs=-1",
        "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=5"]


# -- without a cluster ----------------------------------------------------------------------------
def compose_launcher(conf: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_launcher_gives_one_task_per_device_and_submitit_owns_requeue(tmp_path):
    conf = shutil.copytree(CONF_DIR, tmp_path / "conf", ignore=shutil.ignore_patterns("local"))  # no profile
    launcher = compose_launcher(conf, "hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2",
                                f"paths.runs_dir={tmp_path / 'runs'}")
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 2)
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] > 0
    assert launcher["submitit_folder"] == f"{tmp_path / 'runs'}/.submitit/%j"  # under the sweep dir
    assert any("WANDB_MODE=offline" in line for line in launcher["setup"])


def test_cluster_profile_reaches_only_the_slurm_launcher(tmp_path):
    conf = shutil.copytree(CONF_DIR, tmp_path / "conf", ignore=shutil.ignore_patterns("local"))
    (conf / "local").mkdir()
    shutil.copy(ROOT / "slurm" / "profile.example.yaml", conf / "local" / "slurm.yaml")
    launcher = compose_launcher(conf, "hydra/launcher=slurm", "hydra.launcher.qos=high")
    assert (launcher["partition"], launcher["cpus_per_task"], launcher["qos"]) == ("gpu", 8, "high")
    assert launcher["tasks_per_node"] == 1  # the profile sizes jobs; the task layout stays the trainer's
    assert compose_launcher(conf)["_target_"].endswith("BasicLauncher")  # local sweeps never see it


@pytest.mark.filterwarnings("ignore:The `srun` command is available")  # Lightning's hint off SLURM
def test_trainer_plugins_turn_lightning_requeue_off_only_inside_slurm(monkeypatch):
    for var in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    assert trainer_plugins() == []
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "sigma-repro")
    (env,) = trainer_plugins()
    assert type(env).__name__ == "SLURMEnvironment" and env.auto_requeue is False
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # `srun --pty bash`: Lightning's own rule, no SLURM env
    assert trainer_plugins() == []


def test_finish_wandb_reports_a_dying_service_instead_of_raising(monkeypatch, capsys):
    class DeadService:  # what wandb.finish() meets after SLURM signalled the whole job step
        run = object()

        @staticmethod
        def finish():
            raise ConnectionResetError("Connection lost")

    monkeypatch.setitem(sys.modules, "wandb", DeadService)
    finish_wandb()
    assert "W&B did not close cleanly (ConnectionResetError: Connection lost)" in capsys.readouterr().err


# -- on the local cluster -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """The local cluster, started here (and stopped after) if it is not up and we may start it."""
    if shutil.which("sinfo") is None:
        pytest.skip("no SLURM client (sinfo); `slurm/local-cluster up` as root on Debian installs one")
    if subprocess.run([LOCAL_CLUSTER, "status"], capture_output=True).returncode == 0:
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster is not up, and starting it needs root: sudo slurm/local-cluster up")
    up = subprocess.run([LOCAL_CLUSTER, "up"], capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        pytest.skip(f"slurm/local-cluster up failed: {up.stderr.strip()[-500:]}")
    yield
    subprocess.run([LOCAL_CLUSTER, "down"], capture_output=True, timeout=120)


@pytest.fixture
def runs(tmp_path, cluster):
    yield tmp_path
    subprocess.run(["scancel", "--name", JOB_NAME], capture_output=True, timeout=30)  # leftovers of a failed test


def sweep_command(runs: Path, *overrides: str) -> tuple[list[str], dict[str, str]]:
    """``sigma-repro-train -m`` through the SLURM launcher, and its environment (jobs inherit it)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return [sys.executable, "-m", "sigma_repro.train", "-m", *LAUNCHER, f"paths.runs_dir={runs}", *overrides], env


def sweep(runs: Path, *overrides: str, timeout: float = 150) -> tuple[subprocess.CompletedProcess, float]:
    """Runs a sweep to its end; returns the launcher's exit and its wall time."""
    cmd, env = sweep_command(runs, *overrides)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"the launcher hung: still waiting after {timeout} s\n{err.stderr}") from None
    return proc, time.monotonic() - start


def cells(runs: Path) -> dict[str, Path]:
    """Run dirs by optim.lr; the one-dir-per-cell check is part of every call."""
    dirs = [p.parent for p in runs.rglob("summary.json")]
    by_lr = {d.parent.name.split("optim.lr=")[1].split(",")[0]: d for d in dirs}
    assert len(by_lr) == len(dirs), f"two run dirs for one cell: {dirs}"
    return by_lr


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def job_logs(runs: Path, suffix: str) -> list[str]:
    return [p.read_text() for p in sorted((runs / ".submitit").glob(f"*/*_0_log.{suffix}"))]


@pytest.mark.slow
def test_sweep_runs_jobs_fails_fast_on_a_killed_job_and_reruns_only_missing_cells(runs):
    # 1. Two cells of the table run as SLURM jobs.
    proc, _ = sweep(runs, *TINY, "optim.lr=0.001,0.003")
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = cells(runs)
    assert sorted(done) == ["0.001", "0.003"]
    for run_dir in done.values():
        s = summary(run_dir)
        assert (s["status"], s["steps"], s["launches"]) == ("finished", 10, 1)
    errs = job_logs(runs, "err")
    assert len(errs) == 2
    assert not any("SLURM auto-requeueing enabled" in e for e in errs), \
        "Lightning's requeue is on: train.py must pass plugins=sigma_repro.slurm.trainer_plugins() to the Trainer"
    mtimes = {lr: (d / "DONE.json").stat().st_mtime_ns for lr, d in done.items()}

    # 2. The third cell's job is SIGKILLed after its step-5 checkpoint. The kill callback is kept out
    #    of the run identity, so the job writes into the same run dir the plain cell has.
    exclude = OmegaConf.load(CONF_DIR / "train.yaml").hydra.job.config.override_dirname.exclude_keys
    exclude = ",".join([*exclude, "callbacks.kill._target_", "callbacks.kill.step"])
    proc, wall = sweep(runs, *TINY, "optim.lr=0.002", "+callbacks.kill._target_=tests.helpers.KillAtStep",
                       "+callbacks.kill.step=7", f"hydra.job.config.override_dirname.exclude_keys=[{exclude}]",
                       timeout=120)
    assert proc.returncode != 0 and "UncompletedJobError" in proc.stderr, proc.stderr[-3000:]
    assert wall < 90, f"the launcher took {wall:.0f} s to report a killed job"
    killed = cells(runs)["0.002"]
    assert summary(killed)["status"] == "running" and not (killed / "DONE.json").exists()
    assert (killed / "checkpoints" / "last.ckpt").exists()

    # 3. The whole table again: the finished cells print their stored result and are left alone;
    #    the killed cell resumes from its checkpoint in its own run dir.
    proc, _ = sweep(runs, *TINY, "optim.lr=0.001,0.002,0.003")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = cells(runs)
    assert sorted(after) == ["0.001", "0.002", "0.003"] and after["0.002"] == killed
    assert {lr: (after[lr] / "DONE.json").stat().st_mtime_ns for lr in mtimes} == mtimes
    assert sum("stored result" in out for out in job_logs(runs, "out")) == 2
    s = summary(killed)
    assert (s["status"], s["steps"], s["launches"]) == ("finished", 10, 2)
    assert any("resuming from" in out for out in job_logs(runs, "out"))


@pytest.mark.slow
def test_preempted_job_is_requeued_by_submitit_and_resumes_in_its_run_dir(runs):
    # W&B on (offline): the requeued launch must append to the same run id, and W&B's service,
    # signalled with the rest of the job step, must not turn the requeue into a failed cell.
    cmd, env = sweep_command(runs, *[o for o in TINY if o != "logger=csv"], "trainer.max_steps=300",
                             "checkpoint_every_n_steps=20", "optim.lr=0.004")
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 90
        while not list(runs.rglob("checkpoints/last.ckpt")):
            assert time.monotonic() < deadline and launcher.poll() is None, "no checkpoint before the preemption"
            time.sleep(0.2)
        (job_id,) = subprocess.run(["squeue", "-h", "-n", JOB_NAME, "-o", "%i"], capture_output=True, text=True,
                                   check=True).stdout.split()
        # What SLURM sends signal_delay_s before the time limit (and at preemption, where configured);
        # with timeout_min=10 submitit counts it as a time-out, the path max_num_timeout governs.
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        # SLURM holds a requeued job for about two minutes (BeginTime); release it at once.
        while subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%r"], capture_output=True,
                             text=True).stdout.strip() != "BeginTime":
            assert time.monotonic() < deadline + 30, "the job was not requeued"
            time.sleep(0.2)
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, stderr[-3000:]
    (run_dir,) = cells(runs).values()
    s = summary(run_dir)
    assert (s["status"], s["steps"], s["launches"]) == ("finished", 300, 2)
    (log,) = job_logs(runs, "out")  # both launches, appended
    assert "Requeued job" in log and "resuming from" in log
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(f"-{s['wandb_run_id']}") for name in offline), offline
