"""Run state that survives faults (sigma_repro/run_state.py, train.run): each file a killed launch can
leave half-written is recovered from or explained, metrics.csv holds each step once across kills and
resumes, DONE.json is trusted only while the stored config is the command's, and W&B's temp dirs of a
killed launch are removed. Real runs are subprocesses of the app, killed with SIGKILL."""

import csv
import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from sigma_repro import results
from sigma_repro.errors import ConfigError
from sigma_repro.loggers import drop_relogged_rows, repair_metrics
from sigma_repro.run_state import read_previous_summary, read_stored_result, recover_run_dir

from .test_train import FAST, train

KILL = "+callbacks.kill._target_=tests.helpers.KillAtStep"


def killed_at(runs: Path, run_dir: Path, step: int, *overrides: str) -> subprocess.CompletedProcess:
    """A launch into ``run_dir`` SIGKILLed when it reaches ``step``."""
    proc = train(runs, *overrides, f"hydra.run.dir={run_dir}", KILL, f"+callbacks.kill.step={step}", check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    return proc


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv's rows, each without its empty cells and throughput (a wall-clock rate, never equal)."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if v != "" and not k.endswith("_per_s")} for row in csv.DictReader(f)]


def assert_each_step_once_per_key(rows: list[dict[str, str]]) -> None:
    keys = {k for r in rows for k in r} - {"step", "epoch"}
    for key in keys:
        steps = Counter(r["step"] for r in rows if key in r)
        assert max(steps.values()) == 1, (key, {s: n for s, n in steps.items() if n > 1})


# -- each file, on its own ------------------------------------------------------------------------
def test_half_written_last_row_of_metrics_is_dropped_with_a_note(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"epoch,step,train/loss\r\n0,9,2.30\r\n0,19,2.2")
    note = repair_metrics(path)
    assert path.read_bytes() == b"epoch,step,train/loss\r\n0,9,2.30\r\n"
    assert "half-written last row" in note and "'0,19,2.2'" in note
    assert repair_metrics(path) is None and path.read_bytes().endswith(b"2.30\r\n")  # a whole file is left alone

    path.write_text("epoch,st")  # killed while writing the header
    assert "only a half-written header" in repair_metrics(path) and not path.exists()


def test_relogged_rows_are_dropped_whatever_throughput_they_carry(tmp_path):
    # Step 5 logged before a kill (with a rate) and again by the resumed launch (its first batch: no rate).
    path = tmp_path / "metrics.csv"
    path.write_text("step,train/loss,train/samples_per_s,diag/x\r\n4,1.0,9.0,\r\n5,0.9,8.0,\r\n5,,,0.3\r\n"
                    "5,0.9,,\r\n6,0.8,7.5,\r\n")
    drop_relogged_rows(path)
    with path.open(newline="") as f:
        rows = [{k: v for k, v in r.items() if v} for r in csv.DictReader(f)]
    assert rows == [{"step": "4", "train/loss": "1.0", "train/samples_per_s": "9.0"}, {"step": "5", "diag/x": "0.3"},
                    {"step": "5", "train/loss": "0.9"}, {"step": "6", "train/loss": "0.8", "train/samples_per_s": "7.5"}]


def test_stale_temp_files_are_removed_with_a_note(tmp_path):
    (tmp_path / "summary.tmp").write_text("")  # a summary write killed before its first byte
    (tmp_path / "DONE.tmp").write_text('{"sta')
    notes = recover_run_dir(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    assert len(notes) == 2 and all("killed before its rename" in n for n in notes)


def test_corrupt_summary_of_an_unfinished_run_is_kept_aside(tmp_path):
    (tmp_path / "summary.json").write_text('{"status": "running", "launc')
    previous, notes = read_previous_summary(tmp_path)
    assert previous == {} and not (tmp_path / "summary.json").exists()
    assert (tmp_path / "summary.corrupt.json").read_text() == '{"status": "running", "launc'
    assert "summary.corrupt.json" in notes[0] and "launch count" in notes[0]


def test_corrupt_summary_of_a_finished_run_is_explained_and_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "DONE.json").write_text('{"status": "finished", "summary": "summary.json"}')
    (run_dir / "summary.json").write_text("")
    with pytest.raises(ConfigError, match="cannot be read .* the stored result is lost. Delete"):
        read_stored_result(run_dir)
    # through the app: the same words, exit 1, no traceback, the files as they were
    proc = train(tmp_path, *FAST, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "refused to trust DONE.json" in proc.stdout and "the stored result is lost" in proc.stdout
    assert (run_dir / "summary.json").read_text() == "" and (run_dir / "DONE.json").exists()


# -- through the app, with real kills -------------------------------------------------------------
def test_relaunch_recovers_from_a_corrupt_summary_a_half_row_and_a_stale_tmp(tmp_path):
    run_dir = tmp_path / "run"
    common = [*FAST, "checkpoint_every_n_steps=5"]
    killed_at(tmp_path, run_dir, 17, *common)  # last checkpoint at step 15
    (run_dir / "summary.json").write_text('{"status": "running", "laun')
    (run_dir / "summary.tmp").write_text("")
    with (run_dir / "metrics.csv").open("a") as f:
        f.write("0,16,2.28")  # the row a launch was writing when it was killed: no line end

    proc = train(tmp_path, *common, f"hydra.run.dir={run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["steps"], summary["launches"]) == ("finished", 30, 1)
    assert (run_dir / "summary.corrupt.json").read_text() == '{"status": "running", "laun'
    assert not list(run_dir.glob("*.tmp"))
    recovered = " ".join(summary["recovered"])
    for said in ("summary.tmp", "half-written last row", "summary.corrupt.json"):
        assert said in recovered and said in proc.stdout, said
    rows = metric_rows(run_dir)
    assert all(int(r["step"]) <= 30 for r in rows) and not any(r.get("train/loss") == "2.28" for r in rows)
    assert_each_step_once_per_key(rows)


def test_metrics_hold_each_step_once_after_a_kill_before_the_first_checkpoint_and_a_resume(tmp_path):
    common = [*FAST, "callbacks.diagnostics.every_n_steps=5", "trainer.log_every_n_steps=5"]
    train(tmp_path / "ref", *common)
    reference = metric_rows(next((tmp_path / "ref").rglob("metrics.csv")).parent)

    run_dir = tmp_path / "runs" / "run"
    killed_at(tmp_path / "runs", run_dir, 12, *common, "checkpoint_every_n_steps=100")  # before any checkpoint
    assert not (run_dir / "checkpoints").exists() and len(metric_rows(run_dir)) > 5
    stub = json.loads((run_dir / "summary.json").read_text())
    assert stub["status"] == "running" and {"pid", "host"} <= stub.keys()
    (run,), _ = results.find_runs(tmp_path / "runs")
    assert run.state(time.time(), stale_after_min=1e9) == "incomplete"  # its process is gone, whatever its age

    killed_at(tmp_path / "runs", run_dir, 17, *common, "checkpoint_every_n_steps=5")  # starts over, ckpt at 15
    assert_each_step_once_per_key(metric_rows(run_dir))  # at every moment, not only once the run has ended
    train(tmp_path / "runs", *common, f"hydra.run.dir={run_dir}")  # resumes from step 15
    rows = metric_rows(run_dir)
    assert_each_step_once_per_key(rows)
    assert rows == reference  # the uninterrupted run's rows, each once, in its order, with its values


def test_done_is_refused_when_the_stored_config_is_not_the_commands(tmp_path):
    common = [*FAST, "trainer.max_steps=3"]
    train(tmp_path, *common)
    run_dir = next(tmp_path.rglob("DONE.json")).parent
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    lr = summary["config"]["optim"]["lr"]
    summary["config"]["optim"]["lr"] = 0.5  # edited by hand
    summary["config"]["model"]["made_up"] = 1  # a key this command does not have
    summary["config"]["paths"]["runs_dir"] = "/elsewhere"  # where it was written: not what it computes
    summary["config"]["logger"]["wandb"]["project"] = "other"
    summary["config"]["checkpoint_every_n_steps"] = 7  # in the job dir's exclude_keys
    path.write_text(json.dumps(summary))
    stored = path.read_text()

    proc = train(tmp_path, *common, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    said = proc.stdout
    assert "2 keys differ" in said
    assert f"model.made_up: stored 1, this command (absent); optim.lr: stored 0.5, this command {lr!r}" in said
    assert "delete the run dir" in said and "another paths.runs_dir" in said
    assert path.read_text() == stored and (run_dir / "DONE.json").exists()

    summary["config"]["optim"]["lr"] = lr
    del summary["config"]["model"]["made_up"]
    path.write_text(json.dumps(summary))
    assert "stored result" in train(tmp_path, *common).stdout  # only non-computing keys differ: trusted


def test_wandb_temp_dirs_of_a_killed_launch_are_removed_at_the_next(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    common = [o for o in FAST if o != "logger=csv"]  # the default logger: W&B, offline
    run_dir = tmp_path / "runs" / "run"
    killed_at(tmp_path / "runs", run_dir, 3, *common)
    left = sorted(p.name for p in tmp.glob("tmp*wandb-*"))
    assert len(left) == 2 and {n.split("wandb-")[1] for n in left} == {"media", "artifacts"}
    assert sorted(Path(d).name for d in json.loads((run_dir / "summary.json").read_text())["tmp_dirs"]) == left

    proc = train(tmp_path / "runs", *common, "trainer.max_steps=5", f"hydra.run.dir={run_dir}")
    assert "removed 2 W&B temp dirs" in proc.stdout
    assert not list(tmp.glob("tmp*wandb-*"))  # the killed launch's, and this launch's own at its clean exit
