"""The Hydra app end to end: run identity, summary, idempotent re-runs, exact resume after a hard
kill, divergence, bad input, multirun. Every run is a real subprocess of ``sigma_repro.train``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sigma_repro.data.images import DigitsDataModule
from sigma_repro.models.vit import build_vit
from sigma_repro.reparam import apply_sigma_reparam
from sigma_repro.config import job_dir_name

from .conftest import ROOT

# A fast digits run: 3-block ViT, 30 optimizer steps, CSV logging only.
FAST = [
    "logger=csv", "model.depth=3", "model.embed_dim=32", "trainer.max_steps=30", "trainer.max_epochs=-1",
    "trainer.enable_progress_bar=false", "callbacks.diagnostics.every_n_steps=10",
]


def train(runs: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    flags = [o for o in overrides if o.startswith("-")]
    overrides = [o for o in overrides if not o.startswith("-")]
    proc = subprocess.run(
        [sys.executable, "-m", "sigma_repro.train", *flags, f"paths.runs_dir={runs}", *overrides],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


def only_run_dir(runs: Path) -> Path:
    dirs = [p.parent for p in runs.rglob("summary.json")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_job_dir_name_is_deterministic_and_bounded():
    assert job_dir_name(None, "", 0) == "default/default/seed=0"
    assert job_dir_name("x", "optim.lr=1e-3,trainer.max_steps=30", 0) == job_dir_name("x", "optim.lr=0.001,trainer.max_steps=30", 0)
    assert job_dir_name("x", "a=1.0,b=+2,c=abc1e3,d=[1e-3,2]", 0) == "x/a=1.0,b=2,c=abc1e3,d=_1e-3,2_/seed=0"
    assert job_dir_name("vit/b16", "optim.lr=0.1,reparam=sigma", 3) == "vit/b16/optim.lr=0.1,reparam=sigma/seed=3"
    long = ",".join(f"k{i}=v{i}" for i in range(60))
    name = job_dir_name("x", long, 1)
    assert name == job_dir_name("x", long, 1) and len(name.split("/")[1]) <= 120
    assert job_dir_name("x", long, 1) != job_dir_name("x", long + ",z=1", 1)


def test_run_writes_summary_and_rerun_returns_stored_result(tmp_path):
    # 55 steps = 5 full epochs of 11 batches: the last validation sees the checkpointed weights.
    train(tmp_path, *FAST, "trainer.max_steps=55", "reparam=sigma")
    run_dir = only_run_dir(tmp_path)
    assert run_dir.relative_to(tmp_path).as_posix().startswith("default/")
    assert run_dir.name == "seed=0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 55
    assert summary["config"]["reparam"]["name"] == "sigma" and summary["git_sha"]
    assert len(summary["attention_entropy"]["final"]) == 3
    assert (run_dir / "DONE.json").exists() and (run_dir / "metrics.csv").exists()
    assert (run_dir / "plots" / "attention_entropy.png").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # no pickled objects
    assert ckpt["global_step"] == 55

    # val/acc in the summary agrees with the checkpointed model scored independently
    model = apply_sigma_reparam(build_vit(img_size=8, in_chans=1, num_classes=10, patch_size=2, embed_dim=32,
                                          depth=3, num_heads=4))
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    model.eval()
    data = DigitsDataModule(batch_size=128)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in data.val_dataloader())
    assert summary["metrics"]["val/acc"] == pytest.approx(correct / 360, abs=1e-6)

    mtime = (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime
    again = train(tmp_path, *FAST, "reparam=sigma", "trainer.max_steps=55")  # same overrides, other order
    assert "stored result" in again.stdout
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_mtime == mtime
    assert only_run_dir(tmp_path) == run_dir


def reference_and_killed_run(tmp_path: Path, common: list[str], kill_step: int) -> tuple[Path, Path]:
    """An uninterrupted run under tmp_path/a, and the same run SIGKILLed at ``kill_step`` in
    tmp_path/b/run (relaunch it with ``train(tmp_path / "b", *common, f"hydra.run.dir={run_dir}")``)."""
    train(tmp_path / "a", *common)
    run_dir = tmp_path / "b" / "run"
    killed = train(tmp_path / "b", *common, f"hydra.run.dir={run_dir}",
                   "+callbacks.kill._target_=tests.helpers.KillAtStep", f"+callbacks.kill.step={kill_step}",
                   check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    return only_run_dir(tmp_path / "a"), run_dir


def test_hard_kill_then_resume_matches_uninterrupted_run(tmp_path):
    common = [*FAST, "trainer.deterministic=true", "trainer.max_steps=40", "checkpoint_every_n_steps=5",
              "model.drop_rate=0.1", "data.batch_size=64"]
    ref_dir, run_dir = reference_and_killed_run(tmp_path, common, kill_step=27)
    assert not (run_dir / "DONE.json").exists()
    step_at_kill = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step_at_kill == 25  # mid-epoch: 1437 // 64 = 22 steps per epoch
    resumed = train(tmp_path / "b", *common, f"hydra.run.dir={run_dir}")
    assert "resuming" in resumed.stderr + resumed.stdout

    ref, got = (json.loads((d / "summary.json").read_text()) for d in (ref_dir, run_dir))
    assert got["status"] == "finished" and got["launches"] == 2
    for key in ("val/acc", "val/loss", "train/loss"):
        assert got["metrics"][key] == ref["metrics"][key], key
    assert got["attention_entropy"]["min"] == ref["attention_entropy"]["min"]
    assert got["loss_spikes"] == ref["loss_spikes"]
    a = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(float(line.split(",")[-1])) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]
             if line.split(",")[-1]]
    assert steps == sorted(steps)  # the rows logged between checkpoint and kill were dropped, not doubled


def test_divergence_ends_cleanly_with_step(tmp_path):
    proc = train(tmp_path, *FAST, "optim=sgd", "optim.lr=1e12", "optim.momentum=0.0")
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "diverged" and 0 <= summary["diverged_step"] < 30
    assert "Traceback" not in proc.stderr


def test_unknown_config_name_lists_valid_ones(tmp_path):
    proc = train(tmp_path, "model=vit_huge", check=False)
    assert proc.returncode != 0
    assert "vit_tiny" in proc.stderr and "vit_digits" in proc.stderr


def test_missing_data_path_is_named_before_compute(tmp_path):
    proc = train(tmp_path, *FAST, "data=fashion_mnist", f"data.root={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode == 1
    assert str(tmp_path / "nowhere") in proc.stdout and "ubyte" in proc.stdout
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "failed" and "traceback" not in summary


def test_clashing_options_are_named(tmp_path):
    proc = train(tmp_path, *FAST, "trainer.max_steps=20", "schedule.warmup_steps=50", check=False)
    assert proc.returncode == 1
    assert "schedule.warmup_steps=50 and trainer.max_steps=20 clash" in proc.stdout


def test_multirun_survives_a_failing_cell_then_exits_non_zero_with_a_tally(tmp_path):
    proc = train(tmp_path, "-m", *FAST, "trainer.max_steps=10", "model.patch_size=3,2", check=False)
    statuses = {d.parent.name: json.loads((d / "summary.json").read_text())["status"]
                for d in (p.parent for p in tmp_path.rglob("summary.json"))}
    assert sorted(statuses.values()) == ["failed", "finished"], (statuses, proc.stdout[-2000:])
    failed = next(json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")
                  if json.loads(p.read_text())["status"] == "failed")
    assert "patch_size=3 does not divide" in failed["error"]
    # the failing cell came first: the other still ran, then the sweep said so and exited 1
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (f"sweep of 2 cells: 1 finished, 0 diverged, 1 failed, 0 interrupted; failed: {failed['run_dir']} "
            in proc.stdout)


def test_local_multirun_on_several_devices_is_refused_before_compute(tmp_path):
    # Lightning would start rank 1 by rerunning the command line: the whole sweep, a second time.
    proc = train(tmp_path, "-m", *FAST, "trainer.accelerator=cpu", "trainer.devices=2", "seed=0,1", check=False)
    summaries = [json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")]
    assert len(summaries) == 2 and all(s["status"] == "failed" for s in summaries), proc.stdout[-2000:]
    assert all("cannot train on trainer.devices=2" in s["error"] and "traceback" not in s for s in summaries)
    assert not list(tmp_path.rglob("last.ckpt"))
    assert proc.returncode == 1 and "sweep of 2 cells: 0 finished, 0 diverged, 2 failed" in proc.stdout


def wandb_offline_record(run_dir: Path) -> dict:
    """The run's one offline W&B run as ``wandb leet inspect`` reads it back (state, tags, summary)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{summary['wandb_run_id']}"))
    assert len(offline) == 1
    wandb_cli = Path(sys.executable).with_name("wandb")
    inspected = subprocess.run([str(wandb_cli), "leet", "inspect", "--summary", "--json", str(offline[0])],
                               capture_output=True, text=True, timeout=120)
    return json.loads(inspected.stdout)


def test_wandb_offline_and_tensorboard_runs_have_identity_group_and_tags(tmp_path):
    train(tmp_path, *[o for o in FAST if o != "logger=csv"], "trainer.max_steps=12", "optim=sgd", "optim.lr=0.05",
          "logger.tensorboard.enabled=true")
    run_dir = only_run_dir(tmp_path)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    record = wandb_offline_record(run_dir)
    assert record["state"] == "finished"
    assert {"task:classification", "scale:full", "optim:sgd", "no-warmup", "reparam:none", "norm:pre",
            "model:vit_digits", "data:digits"} <= set(record["tags"])
    assert "train/loss" in record["summary"]


def test_run_whose_weights_blow_up_is_not_failed_by_its_diagnostics(tmp_path):
    # No-LN ViT under SGD at a huge rate: weights overflow to inf before the loss turns NaN.
    train(tmp_path, *FAST, "model.norm=none", "optim=sgd", "optim.lr=1e5", "trainer.max_steps=20",
          "callbacks.diagnostics.every_n_steps=1")
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] in ("diverged", "finished") and "error" not in summary


def test_entropy_summary_keeps_the_minimum_before_a_blow_up():
    from types import SimpleNamespace

    from sigma_repro.diagnostics.callbacks import AttentionDiagnostics
    from sigma_repro.train import entropy_summary

    probe = AttentionDiagnostics.__new__(AttentionDiagnostics)
    nan = float("nan")
    # 3 probes x 2 layers x 2 heads; the last probe saw the weights of a diverged run
    probe.history = {"steps": [0, 10, 20], "layers": ["a", "b"],
                     "attention_entropy": [[[2.0, 3.0], [1.0, 1.0]], [[0.5, 1.5], [nan, 2.0]], [[nan, nan], [nan, nan]]]}
    summary = entropy_summary(SimpleNamespace(callbacks=[probe]))["attention_entropy"]
    assert summary["min"] == [1.0, 1.0]  # means over heads (NaN heads left out): a 2.5, 1.0, NaN; b 1.0, 2.0, NaN
    assert all(x != x for x in summary["final"])  # the final probe is reported as it was: NaN
