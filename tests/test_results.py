"""`sigma-repro table` and `sigma-repro compare` on run dirs laid out as the app lays them out.

Fake runs are written in tmp_path with the app's own job-dir naming (sigma_repro.config.job_dir_name)
and the keys train.py writes; one test reads a real (3-step) run of the app."""

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from sigma_repro import compare, results
from sigma_repro.cli import main
from sigma_repro.config import job_dir_name
from sigma_repro.errors import ConfigError

from .test_train import train

CONDITIONS = {  # (optim choice, lr, warmup steps, weight decay, reparam, model.norm) as the cells set them
    "vit_supervised/b16/deit": ("adamw", 3e-3, 50, 0.05, "none", "pre"),
    "vit_supervised/b16/sigma": ("adamw", 3e-3, 50, 0.05, "sigma", "pre"),
    "vit_supervised/b16/sigma_no_ln": ("adamw", 3e-3, 50, 0.05, "sigma", "none"),
    "vit_optimizers/sgd_plain": ("sgd", 0.1, 0, 0.0, "none", "pre"),
    "vit_optimizers/sgd_sigma": ("sgd", 0.1, 0, 0.0, "sigma", "pre"),
}


def run_dir(root: Path, experiment: str, overrides: list[str], seed: int) -> Path:
    """Where the app puts the run: identity overrides sorted into the dir name, as Hydra does."""
    identity = sorted(o for o in overrides if o.split("=")[0] not in results._non_identity_keys())
    return root / job_dir_name(experiment, ",".join(identity), seed)


def fake_run(root: Path, experiment: str, seed: int, *, status: str = "finished", scale: str = "proxy",
             lr_scale: str | None = None, extra: tuple[str, ...] = (), acc: float = 0.9,
             entropy: tuple[list[float], list[float]] = ([2.0, 1.0], [1.5, 0.5]), spikes: int = 0,
             diverged_step: int | None = None, curves: dict[str, list[float]] | None = None) -> Path:
    """A finished/diverged/failed run's summary.json (and metrics.csv with ``curves``)."""
    optim, lr, warmup, wd, reparam, norm = CONDITIONS[experiment]
    overrides = [f"experiment={experiment}", *([f"lr_scale={lr_scale}"] if lr_scale else []), f"seed={seed}",
                 f"table={experiment.split('/')[0]}", f"scale={scale}", "logger=csv", *extra]
    out = run_dir(root, experiment, overrides, seed)
    out.mkdir(parents=True)
    summary = {
        "status": status, "diverged_step": diverged_step, "steps": 500, "loss_spikes": spikes,
        "metrics": {"val/acc": acc, "train/loss": 0.5} if status != "failed" else {},
        "wall_time_s": 60.0, "launches": 1, "git_sha": "abc1234", "ended_at": "2026-01-02T03:04:05+00:00",
        "machine": {"hostname": "nodeA", "device_name": "NVIDIA H100"}, "command": "train.py", "run_dir": str(out),
        "experiment": experiment, "overrides": overrides,
        "choices": {"experiment": experiment, "scale": scale, "optim": optim, "reparam": reparam},
        "config": {"seed": seed, "lr_scale": float(lr_scale or 1.0),
                   "optim": {"lr": lr * float(lr_scale or 1.0), "weight_decay": wd},
                   "schedule": {"warmup_steps": warmup}, "reparam": {"name": reparam}, "model": {"norm": norm}},
    }
    if status != "failed":
        summary["attention_entropy"] = {"layers": ["blocks.0.attn", "blocks.1.attn"],
                                        "final": entropy[0], "min": entropy[1]}
    (out / "summary.json").write_text(json.dumps(summary))
    if curves:
        write_metrics(out, curves)
    return out


def write_metrics(out: Path, curves: dict[str, list[float]]) -> None:
    """metrics.csv as Lightning writes it: one row per logged step, blanks where a metric was not logged."""
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", *curves])
        writer.writeheader()
        steps = max(len(v) for v in curves.values())
        for i in range(steps):
            writer.writerow({"epoch": 0, "step": 10 * i, **{k: v[i] if i < len(v) else "" for k, v in curves.items()}})


def running_stub(root: Path, experiment: str, seed: int, *, minutes_ago: float) -> Path:
    """The stub a first launch writes (train.run): no identity, only status and timing; files last
    written ``minutes_ago``."""
    out = run_dir(root, experiment, [f"experiment={experiment}", f"seed={seed}", "scale=proxy"], seed)
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"status": "running", "launches": 1, "wall_time_s": 0.0,
                                                  "started_at": "2026-01-02T03:04:05+00:00", "run_dir": str(out)}))
    (out / "metrics.csv").write_text("epoch,step,train/loss\n0,0,2.3\n")
    then = time.time() - 60 * minutes_ago
    for path in out.iterdir():
        os.utime(path, (then, then))
    return out


def table_rows(out: Path, table: str, scale: str = "proxy") -> list[dict[str, str]]:
    with (out / table / f"{scale}.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def row(rows: list[dict[str, str]], cell: str, **match: str) -> dict[str, str]:
    found = [r for r in rows if r["cell"] == cell and all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (cell, match, found)
    return found[0]


def test_table_counts_every_expected_seed_and_aggregates_over_finished_ones(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "results"
    accs = [0.91, 0.93, 0.96]
    entropies = [([2.0, 1.0], [1.5, 0.5]), ([2.2, 1.4], [1.9, 0.7]), ([1.8, 0.6], [1.2, 0.1])]
    for seed, (acc, ent) in enumerate(zip(accs, entropies)):
        fake_run(runs, "vit_supervised/b16/deit", seed, acc=acc, entropy=ent, spikes=seed)
    fake_run(runs, "vit_supervised/b16/sigma", 0, acc=0.95, entropy=([2.5, 2.5], [2.4, 2.2]))
    fake_run(runs, "vit_supervised/b16/sigma", 1, status="diverged", diverged_step=120,
             entropy=([0.1, 0.3], [0.05, 0.2]), spikes=7)
    fake_run(runs, "vit_supervised/b16/sigma", 2, status="failed")
    running_stub(runs, "vit_supervised/b16/sigma_no_ln", 0, minutes_ago=240)  # killed hard: incomplete
    running_stub(runs, "vit_supervised/b16/sigma_no_ln", 1, minutes_ago=0)    # still writing: running
    fake_run(runs, "vit_supervised/b16/deit", 0, scale="full", acc=0.5)        # other scale: not in the table
    fake_run(runs, "vit_supervised/b16/deit", 0, extra=("trainer.max_steps=2",), acc=0.2)  # its own row
    fake_run(runs, "vit_optimizers/sgd_sigma", 0, lr_scale="1")               # another table: ignored

    assert main(["table", "vit_supervised", str(runs), "--out", str(out)]) == 0
    rows = table_rows(out, "vit_supervised")
    assert len(rows) == 14 + 1  # every cell of the table, plus the run with an extra override

    deit = row(rows, "vit_supervised/b16/deit", extra_overrides="")
    assert float(deit["val/acc mean"]) == pytest.approx(np.mean(accs))
    assert float(deit["val/acc std"]) == pytest.approx(np.std(accs, ddof=1))
    assert (deit["n_finished"], deit["n_missing"], deit["seeds_finished"]) == ("3", "0", "0,1,2")
    assert float(deit["attention_entropy_final"]) == pytest.approx(np.mean([np.mean(e[0]) for e in entropies]))
    assert float(deit["attention_entropy_min"]) == pytest.approx(np.mean([np.mean(e[1]) for e in entropies]))
    assert float(deit["loss_spikes"]) == pytest.approx(1.0)
    assert (deit["optimizer"], deit["warmup"], deit["weight_decay"], deit["norm"], deit["reparam"]) == \
        ("adamw", "warmup", "0.05", "pre", "none")
    assert deit["paper"] == ""  # published: null in results/paper_reference.yaml

    sigma = row(rows, "vit_supervised/b16/sigma")
    assert (sigma["n_finished"], sigma["n_diverged"], sigma["n_failed"], sigma["n_missing"]) == ("1", "1", "1", "0")
    assert (sigma["val/acc mean"], sigma["val/acc std"], sigma["diverged_steps"]) == ("0.95", "", "120")
    # entropy and spikes over finished and diverged seeds: the diverged run's collapse is the point
    assert float(sigma["attention_entropy_min"]) == pytest.approx(np.mean([np.mean([2.4, 2.2]), np.mean([0.05, 0.2])]))
    assert float(sigma["loss_spikes"]) == pytest.approx(3.5)

    no_ln = row(rows, "vit_supervised/b16/sigma_no_ln")
    assert (no_ln["seeds_incomplete"], no_ln["seeds_running"], no_ln["seeds_missing"]) == ("0", "1", "2")
    assert (no_ln["n_finished"], no_ln["val/acc mean"], no_ln["optimizer"]) == ("0", "", "")

    untouched = row(rows, "vit_supervised/l16/deit")
    assert (untouched["n_missing"], untouched["seeds_missing"], untouched["run_dirs"]) == ("3", "0,1,2", "")

    extra = row(rows, "vit_supervised/b16/deit", extra_overrides="trainer.max_steps=2")
    assert (extra["n_finished"], extra["seeds_missing"], extra["val/acc mean"]) == ("1", "1,2", "0.2")
    assert rows.index(extra) == rows.index(deit) + 1  # right after its cell's own row

    md = (out / "vit_supervised" / "proxy.md").read_text()
    assert "Scale: **proxy**" in md and "abc1234 (7)" in md and "nodeA (NVIDIA H100) (7)" in md
    assert "runs of these cells at other scales (full (1))" in md
    assert "| b16/sigma_no_ln |" in md and "running 1; incomplete 0; missing 2" in md
    assert "| 1 (s1 @ 120) |" in md and "0.9333 ± 0.0252" in md
    assert "b16/deit [trainer.max_steps=2]" in md
    assert f"sigma-repro table vit_supervised {runs} --scale proxy" in md
    assert "table:" in capsys.readouterr().out


def test_table_rows_follow_the_lr_grid_and_scale_filter(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    fake_run(runs, "vit_optimizers/sgd_sigma", 0, lr_scale="1", acc=0.8)
    fake_run(runs, "vit_optimizers/sgd_sigma", 1, lr_scale="1.0", acc=0.6)  # same lr_scale, other spelling
    fake_run(runs, "vit_optimizers/sgd_sigma", 0, lr_scale="3", acc=0.1)    # outside the grid: its own row
    fake_run(runs, "vit_optimizers/sgd_plain", 0, lr_scale="0.3", scale="full")

    assert main(["table", "vit_optimizers", str(runs), "--lr-grid", "0.3,1", "--seeds", "0,1",
                 "--out", str(out)]) == 0
    rows = table_rows(out, "vit_optimizers")
    assert len(rows) == 10 * 2 + 1
    grid = row(rows, "vit_optimizers/sgd_sigma", lr_scale="1")
    assert (grid["n_finished"], grid["n_missing"], grid["lr"]) == ("2", "0", "0.1")
    assert float(grid["val/acc mean"]) == pytest.approx(0.7)
    outside = row(rows, "vit_optimizers/sgd_sigma", lr_scale="3")
    assert (outside["n_finished"], outside["seeds_missing"]) == ("1", "1")
    assert [r["lr_scale"] for r in rows if r["cell"] == "vit_optimizers/sgd_sigma"] == ["0.3", "1", "3"]
    assert row(rows, "vit_optimizers/sgd_plain", lr_scale="0.3")["n_missing"] == "2"  # the full-scale run is not here
    assert "| lr_scale |" in (out / "vit_optimizers" / "proxy.md").read_text()

    assert main(["table", "vit_optimizers", str(runs), "--scale", "full", "--out", str(out)]) == 0
    full = table_rows(out, "vit_optimizers", "full")
    assert len(full) == 10 * 3 and row(full, "vit_optimizers/sgd_plain", lr_scale="0.3")["n_finished"] == "1"


def test_paper_reference_names_every_cell_and_its_numbers_reach_the_table(tmp_path, monkeypatch):
    for table in results.table_names():
        published = results.paper_values(table)
        assert sorted(published) == sorted(results.load_table(table).cells)
        assert all(v is None or isinstance(v, float) for v in published.values())

    reference = tmp_path / "paper_reference.yaml"
    reference.write_text("vit_supervised:\n  vit_supervised/b16/deit: {published: 0.5}\n")
    monkeypatch.setattr(results, "PAPER_REFERENCE", reference)
    fake_run(tmp_path / "runs", "vit_supervised/b16/deit", 0)
    assert main(["table", "vit_supervised", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    rows = table_rows(tmp_path / "out", "vit_supervised")
    assert [r["paper"] for r in rows][:2] == ["0.5", ""]


def test_table_errors_say_what_was_expected(tmp_path, capsys):
    assert main(["table", "vit_nope", str(tmp_path)]) == 2
    assert f"unknown table 'vit_nope'; the tables are: {', '.join(results.table_names())}" in capsys.readouterr().err
    assert {"vit_optimizers", "vit_supervised", "lm_architectures", "lm_lr_stability"} <= set(results.table_names())

    assert main(["table", "vit_supervised", str(tmp_path), "--lr-grid", "1"]) == 2
    assert "does not sweep lr_scale; drop --lr-grid" in capsys.readouterr().err

    assert main(["table", "vit_supervised", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no runs of table 'vit_supervised' at scale=proxy under {tmp_path.resolve()} (0 summary.json" in err

    fake_run(tmp_path, "vit_supervised/b16/deit", 0, scale="full")
    assert main(["table", "vit_supervised", str(tmp_path), "--out", str(tmp_path / "results")]) == 2
    assert "1 runs of its cells at scale=full (1)" in capsys.readouterr().err


def test_table_reads_a_real_run_of_the_app(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    train(runs, "experiment=vit_supervised/b16/sigma_no_ln_sgd", "scale=proxy", "logger=csv", "model.depth=1",
          "model.embed_dim=16", "trainer.max_steps=3", "trainer.enable_progress_bar=false")
    assert main(["table", "vit_supervised", str(runs), "--seeds", "0", "--out", str(out)]) == 0
    real = row(table_rows(out, "vit_supervised"), "vit_supervised/b16/sigma_no_ln_sgd",
               extra_overrides="model.depth=1,model.embed_dim=16,trainer.max_steps=3")
    summary = json.loads(next(runs.rglob("summary.json")).read_text())
    assert real["n_finished"] == "1" and float(real["val/acc mean"]) == pytest.approx(summary["metrics"]["val/acc"])
    assert (real["optimizer"], real["warmup"], real["weight_decay"], real["norm"], real["reparam"]) == \
        ("sgd", "no-warmup", "0", "none", "sigma")
    assert float(real["attention_entropy_final"]) == pytest.approx(np.mean(summary["attention_entropy"]["final"]))


CURVES = {"train/loss": [2.3, 1.9, 1.2, 0.8], "val/acc": [0.3, 0.5], "diag/attention_entropy/min": [2.8, 2.1, 1.0, 0.4]}


def optimizer_runs(runs: Path) -> dict[str, Path]:
    no_acc = {k: v for k, v in CURVES.items() if k != "val/acc"}
    return {
        "plain": fake_run(runs, "vit_optimizers/sgd_plain", 0, lr_scale="1", curves=no_acc),
        "sigma": fake_run(runs, "vit_optimizers/sgd_sigma", 0, lr_scale="1", curves=CURVES),
        "sigma_low": fake_run(runs, "vit_optimizers/sgd_sigma", 0, lr_scale="0.3",
                              curves={k: [x / 2 for x in v] for k, v in CURVES.items()}),
        "sigma_seed1": fake_run(runs, "vit_optimizers/sgd_sigma", 1, lr_scale="1", curves=CURVES),
        "adam": fake_run(runs, "vit_optimizers/sgd_sigma", 0, lr_scale="1", scale="full", curves=CURVES),
    }


def test_compare_draws_one_line_per_run_and_metric(tmp_path):
    dirs = optimizer_runs(tmp_path)
    chosen, _ = compare.resolve_runs([str(dirs[k]) for k in ("plain", "sigma", "sigma_low")], tmp_path)
    fig, plotted, notes = compare.draw(chosen, ["train/loss", "val/acc"], logy=frozenset({"train/loss"}))
    loss_ax, acc_ax = fig.axes
    assert (loss_ax.get_yscale(), acc_ax.get_yscale()) == ("log", "linear")
    assert len(loss_ax.get_lines()) == 3 and len(acc_ax.get_lines()) == 2
    assert plotted["val/acc"] == ["vit_optimizers/sgd_sigma lr_scale=1", "vit_optimizers/sgd_sigma lr_scale=0.3"]
    np.testing.assert_allclose(loss_ax.get_lines()[2].get_ydata(), np.array(CURVES["train/loss"]) / 2)
    np.testing.assert_array_equal(acc_ax.get_lines()[0].get_xdata(), [0, 10])
    assert notes == ["vit_optimizers/sgd_plain lr_scale=1: never logged val/acc, left out of that plot"]
    assert loss_ax.get_lines()[1].get_color() == acc_ax.get_lines()[0].get_color()  # one colour per run


def test_compare_resolves_filters_against_the_runs_dir(tmp_path, capsys):
    dirs = optimizer_runs(tmp_path / "runs")
    resolved, _ = compare.resolve_runs(["vit_optimizers/sgd_*"], tmp_path / "runs", scale="proxy", seed=0)
    assert {r.dir for r in resolved} == {dirs["plain"], dirs["sigma"], dirs["sigma_low"]}
    every, _ = compare.resolve_runs(["vit_optimizers/sgd_sigma", str(dirs["sigma"])], tmp_path / "runs")
    assert len(every) == 4  # a run named twice is drawn once
    labels = dict(zip((r.dir for r in every), compare.labels(every)))
    assert labels[dirs["adam"]] == "vit_optimizers/sgd_sigma lr_scale=1 scale=full seed=0"
    assert labels[dirs["sigma_low"]] == "vit_optimizers/sgd_sigma lr_scale=0.3 scale=proxy seed=0"
    with pytest.raises(ConfigError, match="experiments there: vit_optimizers/sgd_plain, vit_optimizers/sgd_sigma"):
        compare.resolve_runs(["vit_optimizers/lars_*"], tmp_path / "runs")

    png = tmp_path / "cmp.png"
    assert main(["compare", "vit_optimizers/sgd_*", "--runs-dir", str(tmp_path / "runs"), "--scale", "proxy",
                 "--seed", "0", "--metrics", "train/loss,val/acc,diag/attention_entropy/min", "--out", str(png)]) == 0
    printed = capsys.readouterr().out
    assert f"{png}: 3 metrics of 3 runs" in printed and "val/acc: 2 runs" in printed and "note:" in printed
    assert matplotlib.image.imread(png).shape[0] > 500  # three stacked subplots


def test_running_stub_with_identity_is_counted_as_running(tmp_path):
    run_dir = tmp_path / "vit_supervised/b16/deit/scale=proxy/seed=1"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({
        "status": "running", "launches": 1, "seed": 1, "experiment": "vit_supervised/b16/deit",
        "choices": {"scale": "proxy"}, "overrides": ["scale=proxy", "seed=1"], "run_dir": str(run_dir)}))
    runs, unreadable = results.find_runs(tmp_path)
    assert unreadable == [] and [(r.experiment, r.seed, r.scale) for r in runs] == [("vit_supervised/b16/deit", 1, "proxy")]


def test_runs_from_before_the_norm_setting_and_the_key_rename_still_read(tmp_path):
    """Committed proxy results came from runs that said no-norm as reparam.remove_norms and logged
    diag/attn_entropy/*: the table and compare read them under today's names."""
    runs, out = tmp_path / "runs", tmp_path / "results"
    old = fake_run(runs, "vit_supervised/b16/sigma_no_ln", 0, curves={"diag/attn_entropy/min": [2.0, 1.5, 1.2]})
    summary = json.loads((old / "summary.json").read_text())
    summary["config"]["reparam"]["remove_norms"] = True
    summary["config"]["model"] = {"depth": 6}  # no norm key then
    (old / "summary.json").write_text(json.dumps(summary))
    plain = fake_run(runs, "vit_supervised/b16/deit", 0)
    summary = json.loads((plain / "summary.json").read_text())
    summary["config"]["reparam"]["remove_norms"] = False
    summary["config"]["model"] = {"depth": 6}  # no norm key then
    (plain / "summary.json").write_text(json.dumps(summary))

    assert main(["table", "vit_supervised", str(runs), "--out", str(out)]) == 0
    rows = table_rows(out, "vit_supervised")
    assert row(rows, "vit_supervised/b16/sigma_no_ln")["norm"] == "none"
    assert row(rows, "vit_supervised/b16/deit")["norm"] == "pre"
    assert results.metric_curve(old, "diag/attention_entropy/min") == ([0, 10, 20], [2.0, 1.5, 1.2])


def test_table_reports_its_declared_metrics_with_their_direction(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    fake_run(runs, "vit_supervised/b16/deit", 0, acc=0.91)
    fake_run(runs, "vit_supervised/b16/sigma", 0, acc=0.95)
    assert main(["table", "vit_supervised", str(runs), "--out", str(out)]) == 0
    text = (out / "vit_supervised" / "proxy.md").read_text()
    assert "val/acc (mean ± std, ↑)" in text
    assert "| **0.9500** |" in text and "| 0.9100 |" in text  # higher is better: sigma's row is the best

    # another metric, lower is better: train/loss is 0.5 in both, so both rows are the best
    assert main(["table", "vit_supervised", str(runs), "--out", str(out), "--metric", "train/loss",
                 "--lower-is-better"]) == 0
    text = (out / "vit_supervised" / "proxy.md").read_text()
    assert "train/loss (mean ± std, ↓)" in text and text.count("**0.5000**") == 2
    assert "--metric train/loss --lower-is-better" in text


@pytest.mark.parametrize("report,message", [
    (None, "has no report.metrics"),
    ({"metrics": [{"name": "val/acc"}]}, "needs a name and higher_is_better"),
    ({"metrics": [{"name": "val/acc", "higher_is_better": True}], "columns": ["colour"]},
     "report.columns ['colour'] are not known conditions"),
])
def test_table_report_block_errors_say_what_to_write(report, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        results._report("t", report)


def test_compare_defaults_to_each_runs_headline_metric(tmp_path):
    vit = fake_run(tmp_path, "vit_optimizers/sgd_plain", 0, lr_scale="1")
    lm = fake_run(tmp_path, "vit_optimizers/sgd_sigma", 0, lr_scale="1")
    summary = json.loads((lm / "summary.json").read_text())
    summary["headline_metric"] = {"name": "val/ppl", "higher_is_better": False}
    (lm / "summary.json").write_text(json.dumps(summary))
    runs, _ = compare.resolve_runs([str(vit), str(lm)], tmp_path)
    # the ViT run predates headline_metric in summaries: read as val/acc
    assert compare.default_metrics(runs) == ["train/loss", "val/acc", "val/ppl", "diag/attention_entropy/min"]


def with_launch(run_dir: Path, **record) -> None:
    """Add the launch record (pid, host) the app writes into its "running" stub."""
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, **record}))


def test_running_stub_whose_process_is_gone_is_incomplete_at_once_on_its_host(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now
    host = socket.gethostname()
    runs, now = tmp_path / "runs", time.time()
    cases = {  # seed: (pid, host, minutes since the last write) -> state
        0: ((child.pid, host, 0), "incomplete"),      # gone, seen on its own host: no need to wait
        1: ((os.getpid(), host, 0), "running"),       # alive
        2: ((child.pid, "other-node", 0), "running"),  # another host: only the age rule can tell
        3: ((child.pid, "other-node", 240), "incomplete"),
        4: ((os.getpid(), host, 240), "incomplete"),  # alive but silent for hours: hung, or the pid reused
    }
    for seed, ((pid, where, minutes), _) in cases.items():
        stub = running_stub(runs, "vit_supervised/b16/deit", seed, minutes_ago=minutes)
        with_launch(stub, pid=pid, host=where)
        then = now - 60 * minutes
        os.utime(stub / "summary.json", (then, then))
    found, _ = results.find_runs(runs)
    assert {r.seed: r.state(now) for r in found} == {seed: state for seed, (_, state) in cases.items()}


def test_interrupted_run_is_counted_as_not_done(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    fake_run(runs, "vit_supervised/b16/deit", 0)
    fake_run(runs, "vit_supervised/b16/deit", 1, status="interrupted")
    assert main(["table", "vit_supervised", str(runs), "--seeds", "0,1", "--out", str(out)]) == 0
    deit = row(table_rows(out, "vit_supervised"), "vit_supervised/b16/deit")
    assert (deit["n_finished"], deit["n_interrupted"], deit["seeds_interrupted"]) == ("1", "1", "1")
    assert deit["val/acc n"] == "1"  # the interrupted run's metrics are not averaged in
    md = (out / "vit_supervised" / "proxy.md").read_text()
    assert "| interrupted 1 |" in md and "*interrupted* runs were stopped by a signal" in md


def test_records_keep_ended_runs_with_relative_paths_and_bring_them_back_when_their_run_dirs_are_gone(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIGMA_REPRO_DATA", str(cache))
    runs, records = Path("runs"), Path("results") / "vit_supervised" / "records"
    dirs = [fake_run(runs, "vit_supervised/b16/deit", seed, acc=acc) for seed, acc in enumerate([0.91, 0.95])]
    running_stub(runs, "vit_supervised/b16/sigma", 0, minutes_ago=0)  # not ended: never recorded
    for out in dirs:  # the paths a real run writes: the program, the data cache, the run dir, all absolute
        summary = json.loads((out / "summary.json").read_text())
        summary.update(command=f"{sys.prefix}/bin/sigma-repro-train experiment=vit_supervised/b16/deit",
                       run_dir=str(out.resolve()), data={"path": f"{cache.resolve()}/digits-abc"})
        (out / "summary.json").write_text(json.dumps(summary))

    args = ["table", "vit_supervised", str(runs), "--out", "results", "--records", str(records), "--seeds", "0,1"]
    assert main(args) == 0
    kept = sorted(records.rglob("summary.json"))
    assert [p.parent.relative_to(records) for p in kept] == [d.relative_to(runs) for d in dirs]
    record = json.loads(kept[0].read_text())
    assert record["run_dir"] == str(dirs[0]) and record["data"]["path"] == "$SIGMA_REPRO_DATA/digits-abc"
    assert record["command"] == "sigma-repro-train experiment=vit_supervised/b16/deit"
    assert str(tmp_path) not in kept[0].read_text() and str(tmp_path) not in kept[1].read_text()
    before = row(table_rows(Path("results"), "vit_supervised"), "vit_supervised/b16/deit")

    # the run dirs are purged: the same command renders the same cell from the records alone
    for out in dirs:
        for path in sorted(out.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        out.rmdir()
    capsys.readouterr()
    assert main(args) == 0
    assert "2 of the runs above were read back from there" in capsys.readouterr().out
    after = row(table_rows(Path("results"), "vit_supervised"), "vit_supervised/b16/deit")
    assert (after["n_finished"], after["seeds_finished"]) == ("2", "0,1")
    assert float(after["val/acc mean"]) == pytest.approx(np.mean([0.91, 0.95])) == float(before["val/acc mean"])
    assert after["run_dirs"] == ";".join(str(records / d.relative_to(runs)) for d in dirs)

    # a new run of seed 0 in the runs dir wins over its record, and its record is rewritten
    fake_run(runs, "vit_supervised/b16/deit", 0, acc=0.5)
    assert main(args) == 0
    again = row(table_rows(Path("results"), "vit_supervised"), "vit_supervised/b16/deit")
    assert float(again["val/acc mean"]) == pytest.approx(np.mean([0.5, 0.95]))
    assert json.loads(kept[0].read_text())["metrics"]["val/acc"] == 0.5


def test_records_inside_the_runs_dir_are_refused(tmp_path, capsys):
    fake_run(tmp_path / "runs", "vit_supervised/b16/deit", 0)
    code = main(["table", "vit_supervised", str(tmp_path / "runs"), "--records", str(tmp_path / "runs" / "rec")])
    assert code != 0 and "is inside the runs dir" in capsys.readouterr().err
