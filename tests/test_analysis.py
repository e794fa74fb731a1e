"""The analytical results at small sizes: numbers against the theorem and independent computations."""

import csv
import json
from pathlib import Path

import pytest

from sigma_repro.analysis import entropy_bound
from sigma_repro.cli import main
from sigma_repro.diagnostics.bound import entropy_lower_bound


def test_entropy_bound_holds_and_is_attained_under_the_constraint():
    rows = entropy_bound.measure([16], [1.0, 3.0], d=8, samples=4, steps=150, restarts=2, seed=0)
    for r in rows:
        assert r["bound"] == pytest.approx(entropy_lower_bound(r["s"], 16))
        assert r["construction"] == pytest.approx(r["bound"], abs=1e-9)
        assert r["random_min"] >= r["bound"] - 1e-9 and r["adversarial_min"] >= r["bound"] - 1e-9
        assert r["adversarial_min"] - r["bound"] < 1e-2  # the search reaches the floor
    assert rows[1]["bound"] == pytest.approx(1.7675, abs=1e-4)  # REFERENCE.md value, T=16, s=3


def test_entropy_bound_command_writes_table_and_plot(tmp_path):
    code = main(["analysis", "entropy-bound", "--T", "8", "--scales", "2", "--samples", "2", "--steps", "20",
                 "--restarts", "1", "--out", str(tmp_path)])
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "entropy_bound.csv").open()))
    assert len(rows) == 1 and float(rows[0]["bound"]) == pytest.approx(entropy_lower_bound(2.0, 8))
    md = (tmp_path / "entropy_bound.md").read_text()
    assert "Paper's claim" in md and "git sha" in md
    assert (tmp_path / "entropy_bound.png").stat().st_size > 10_000


def test_training_collapse_gathers_real_runs(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    code = main(["analysis", "training-collapse", "--lrs", "0.01", "--runs-dir", str(runs), "--out", str(out),
                 "logger=csv", "trainer.max_steps=12", "model.depth=2", "callbacks.diagnostics.every_n_steps=4",
                 "trainer.enable_progress_bar=false"])
    assert code == 0
    rows = {r["run"]: r for r in csv.DictReader((out / "training_collapse.csv").open())}
    assert set(rows) == {"baseline", "sigma"}
    for name, row in rows.items():
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert float(row["val_acc"]) == pytest.approx(summary["metrics"]["val/acc"], abs=1e-4)
        assert float(row["entropy_min_over_training"]) == pytest.approx(min(summary["attention_entropy"]["min"]), abs=1e-4)
        assert summary["config"]["reparam"]["name"] == ("sigma_stats" if name == "baseline" else "sigma")
    # σReparam with γ = σ(W) at init and the baseline start from the same weights: same σ at step 0
    assert float(rows["baseline"]["qkv_norm_init"]) == pytest.approx(float(rows["sigma"]["qkv_norm_init"]), rel=1e-5)
    assert (out / "training_collapse.png").stat().st_size > 10_000
