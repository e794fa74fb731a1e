"""`sigma-repro table` for a table with a learning-rate grid: the lr_stability view (results.LrStabilityView)
on run dirs laid out as the app lays them out, with known numbers: which runs are stable, the largest
stable lr per seed and its mean over seeds, the divergence lr, where attention entropy collapsed, the
per-lr loss columns with their markers, and the plot of final loss against the learning rate."""

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from sigma_repro import results
from sigma_repro.cli import main
from sigma_repro.errors import ConfigError

from .test_results import fake_run, run_dir, write_metrics

TABLE = "lm_lr_stability"
BASE_LR = 2.0e-3        # proxy_lr_base of conf/fragments/lm_architectures/recipe.yaml
STABLE_BELOW = 3.2      # report.lr_stability.stable_loss_below.proxy of conf/table/lm_lr_stability.yaml
COLLAPSE_BELOW = 0.1    # report.lr_stability.collapse_entropy_below.proxy
ARCH = {"pre_ln": ("pre", "none"), "post_ln": ("post", "none"), "no_norm": ("none", "none"),
        "sigma_no_norm": ("none", "sigma"), "sigma_pre_ln": ("pre", "sigma"), "sigma_post_ln": ("post", "sigma")}
GRID = "1,2,4,8"        # the runs below use this part of the table's grid (--lr-grid)


def lm_run(root: Path, arch: str, seed: int, lr_scale: float, *, status: str = "finished", loss: float | None = 2.0,
           entropy_min: float = 2.0, diverged_step: int | None = None, entropy_curve: list[float] | None = None,
           scale: str = "proxy") -> Path:
    """A run of lm_lr_stability/<arch> as train.py leaves it: summary.json (and metrics.csv with the
    per-probe minimum attention entropy when ``entropy_curve`` is given, one probe every 10 steps)."""
    experiment = f"{TABLE}/{arch}"
    norm, reparam = ARCH[arch]
    overrides = [f"experiment={experiment}", f"lr_scale={lr_scale:g}", f"seed={seed}", f"table={TABLE}",
                 f"scale={scale}", "logger=csv"]
    out = run_dir(root, experiment, overrides, seed)
    out.mkdir(parents=True)
    metrics = {} if loss is None else {"val/loss": loss, "val/ppl": math.exp(loss), "val/bits_per_byte": loss / math.log(2)}
    summary = {
        "status": status, "diverged_step": diverged_step, "steps": 300, "loss_spikes": 0, "metrics": metrics,
        "wall_time_s": 15.0, "launches": 1, "git_sha": "abc1234", "ended_at": "2026-01-02T03:04:05+00:00",
        "machine": {"hostname": "nodeA", "device_name": "cpu"}, "run_dir": str(out),
        "experiment": experiment, "overrides": overrides, "seed": seed,
        "choices": {"experiment": experiment, "scale": scale, "optim": "adamw", "reparam": reparam, "task": "lm"},
        "config": {"seed": seed, "lr_scale": lr_scale, "optim": {"lr": BASE_LR * lr_scale, "weight_decay": 0.1},
                   "schedule": {"warmup_steps": 30}, "reparam": {"name": reparam}, "model": {"norm": norm, "depth": 4}},
    }
    if status != "failed":
        # two layers; the run's minimum over layers and probes is entropy_min
        summary["attention_entropy"] = {"layers": ["blocks.0.attn", "blocks.1.attn"], "final": [3.0, entropy_min + 0.1],
                                        "min": [entropy_min + 1.0, entropy_min]}
    (out / "summary.json").write_text(json.dumps(summary))
    if entropy_curve is not None:
        write_metrics(out, {"train/loss": [2.0] * len(entropy_curve), results.COLLAPSE_CURVE: entropy_curve})
    return out


def grid_runs(root: Path) -> None:
    """Known outcomes on lr_scale 1, 2, 4, 8 (lr 2e-3 .. 1.6e-2), seeds 0 and 1.

    pre_ln   seed 0: stable at 1, 2, 4; unstable (finished at 3.4 >= 3.2) at 8
             seed 1: stable at 1, 2; diverged at 4 (step 120, entropy collapsed at step 20) and at 8
                     (step 50, entropy never below 0.1)
    post_ln  both seeds finish at the uniform-prediction loss ln 256 everywhere: stable nowhere
    sigma_pre_ln  stable everywhere, entropy high: the grid does not reach its limit
    no_norm  seed 0 failed at 2; seed 1 has no run at 8
    sigma_no_norm  seed 0 only: unstable at 1 (3.3), stable at 2 and 4, diverged at 8 (no metrics.csv)
    """
    losses = {1: 2.1, 2: 2.0, 4: 2.2}
    for s in (1, 2, 4):
        lm_run(root, "pre_ln", 0, s, loss=losses[s], entropy_min={1: 2.0, 2: 1.5, 4: 0.08}[s])
    lm_run(root, "pre_ln", 0, 8, loss=3.4, entropy_min=0.04)
    for s in (1, 2):
        lm_run(root, "pre_ln", 1, s, loss=losses[s] + 0.1, entropy_min=1.8)
    lm_run(root, "pre_ln", 1, 4, status="diverged", loss=None, entropy_min=0.06, diverged_step=120,
           entropy_curve=[3.0, 2.0, 0.06, 0.05])
    lm_run(root, "pre_ln", 1, 8, status="diverged", loss=None, entropy_min=0.18, diverged_step=50,
           entropy_curve=[3.0, 0.18])
    for seed in (0, 1):
        for s in (1, 2, 4, 8):
            lm_run(root, "post_ln", seed, s, loss=math.log(256), entropy_min=3.5)
            lm_run(root, "sigma_pre_ln", seed, s, loss=1.9 + 0.01 * s, entropy_min=2.5)
    for s in (1, 4, 8):
        lm_run(root, "no_norm", 0, s, loss=2.5)
    lm_run(root, "no_norm", 0, 2, status="failed", loss=None)
    for s in (1, 2, 4):
        lm_run(root, "no_norm", 1, s, loss=2.6)
    lm_run(root, "sigma_no_norm", 0, 1, loss=3.3)  # too slow at the lowest lr, then stable, then diverged
    lm_run(root, "sigma_no_norm", 0, 2, loss=2.4)
    lm_run(root, "sigma_no_norm", 0, 4, loss=2.3)
    lm_run(root, "sigma_no_norm", 0, 8, status="diverged", loss=None, diverged_step=10)


def render(tmp_path: Path) -> tuple[Path, dict[str, dict[str, str]], str]:
    runs, out = tmp_path / "runs", tmp_path / "results"
    grid_runs(runs)
    assert main(["table", TABLE, str(runs), "--lr-grid", GRID, "--seeds", "0,1", "--out", str(out)]) == 0
    with (out / TABLE / "proxy_lr_stability.csv").open(newline="") as f:
        view = {r["cell"].removeprefix(f"{TABLE}/"): r for r in csv.DictReader(f)}
    return out, view, (out / TABLE / "proxy.md").read_text()


def test_thresholds_in_the_test_are_the_table_s():
    view = results.load_table(TABLE).view
    assert (view.lr_axis, view.loss) == ("lr_scale", "val/loss")
    assert view.thresholds("proxy", TABLE) == (STABLE_BELOW, COLLAPSE_BELOW)
    grid = [float(v) for v in results.load_table(TABLE).axes["lr_scale"]]
    assert len(grid) >= 6 and np.allclose(np.diff(np.log2(grid)), 1.0) and 1.0 in grid  # factor 2 apart, the usual lr in it


def test_each_run_is_stable_unstable_or_diverged_by_the_declared_definition(tmp_path):
    cases = [  # (status, final val/loss) -> outcome, with stable_loss_below 3.2
        ("finished", 3.1999, "stable"), ("finished", 3.2, "unstable"), ("finished", math.log(256), "unstable"),
        ("finished", float("nan"), "unstable"), ("finished", None, "unstable"), ("diverged", None, "diverged"),
        ("failed", None, "failed"), ("interrupted", 2.0, "interrupted"),
    ]
    for i, (status, loss, expected) in enumerate(cases):
        out = lm_run(tmp_path, "pre_ln", i, 1, status=status, loss=loss)
        run = results.read_run(out / "summary.json", tmp_path)
        assert results.lr_outcome(run, status, "val/loss", STABLE_BELOW) == expected, (status, loss)


def test_collapse_step_is_the_first_probe_below_the_threshold(tmp_path):
    out = lm_run(tmp_path, "pre_ln", 0, 1, entropy_curve=[3.0, 0.6, 0.49, 0.1, 0.7])
    run = results.read_run(out / "summary.json", tmp_path)
    assert results.collapse_step(run, 0.5) == 20 and results.collapse_step(run, 0.05) is None
    without_csv = results.read_run(lm_run(tmp_path, "pre_ln", 1, 1) / "summary.json", tmp_path)
    assert results.collapse_step(without_csv, 0.5) is None


def test_view_gives_the_largest_stable_lr_per_seed_and_its_mean(tmp_path, capsys):
    out, view, md = render(tmp_path)
    lr = {s: BASE_LR * s for s in (1, 2, 4, 8)}

    pre = view["pre_ln"]
    # seed 0: largest stable lr_scale 4; seed 1: 2 -> mean of 8e-3 and 4e-3
    assert float(pre["max_stable_lr"]) == pytest.approx(np.mean([lr[4], lr[2]]))
    assert (pre["max_stable_lr_n"], pre["seeds_ended"], pre["seeds_stable_at_top_lr"]) == ("2", "2", "")
    assert pre["max_stable_lr_seeds"] == "s0 0.008, s1 0.004"
    # smallest unstable lr: seed 0 at 8 (finished above the threshold), seed 1 at 4 (diverged)
    assert float(pre["divergence_lr"]) == pytest.approx(np.mean([lr[8], lr[4]]))
    # per-lr: mean final loss over the seeds that finished (stable or not), counts of each outcome
    assert float(pre["lr 0.002: val/loss mean"]) == pytest.approx(np.mean([2.1, 2.2]))
    assert float(pre["lr 0.008: val/loss mean"]) == pytest.approx(2.2)
    assert (pre["lr 0.008: n_stable"], pre["lr 0.008: n_diverged"]) == ("1", "1")
    assert float(pre["lr 0.016: val/loss mean"]) == pytest.approx(3.4)
    assert (pre["lr 0.016: n_unstable"], pre["lr 0.016: n_diverged"]) == ("1", "1")
    # entropy: mean over finished and diverged seeds of each run's minimum; collapsed below 0.1
    assert float(pre["lr 0.008: attention_entropy_min"]) == pytest.approx(np.mean([0.08, 0.06]))
    assert pre["lr 0.004: entropy_collapsed"] == "False" and pre["lr 0.008: entropy_collapsed"] == "True"
    assert float(pre["lr 0.016: attention_entropy_min"]) == pytest.approx(np.mean([0.04, 0.18]))
    assert float(pre["entropy_collapse_lr"]) == pytest.approx(lr[4])
    # unstable: seed 0 at 8 (entropy 0.04) and seed 1 at 4 (0.06) and 8 (0.18); the two diverged runs of
    # seed 1, one collapsed (step 20) before diverging (step 120): 100 steps ahead
    assert (pre["unstable_runs"], pre["unstable_runs_collapsed"]) == ("3", "2")
    assert (pre["diverged_runs"], pre["collapsed_before_divergence"]) == ("2", "1")
    assert float(pre["collapse_lead_steps_mean"]) == pytest.approx(100)
    assert float(pre["paper"]) == pytest.approx(8e-3)  # Rybakov et al. 2024, results/paper_reference.yaml

    post = view["post_ln"]
    assert (post["max_stable_lr"], post["max_stable_lr_n"], post["seeds_ended"]) == ("", "0", "2")
    assert float(post["divergence_lr"]) == pytest.approx(lr[1])
    assert post["entropy_collapse_lr"] == "" and post["diverged_runs"] == "0"

    sigma = view["sigma_pre_ln"]
    assert float(sigma["max_stable_lr"]) == pytest.approx(lr[8]) and sigma["seeds_stable_at_top_lr"] == "0,1"
    assert (sigma["divergence_lr"], sigma["divergence_lr_n"], sigma["paper"]) == ("", "0", "0.04")

    no_norm = view["no_norm"]
    assert (no_norm["lr 0.004: n_failed"], no_norm["lr 0.016: n_not_done"]) == ("1", "1")
    assert float(no_norm["max_stable_lr"]) == pytest.approx(np.mean([lr[8], lr[4]]))

    low_end = view["sigma_no_norm"]
    # the largest stable lr is 4; the divergence lr the first unstable one above it, not the slow start at 1
    assert float(low_end["max_stable_lr"]) == pytest.approx(lr[4]) and float(low_end["divergence_lr"]) == pytest.approx(lr[8])
    assert (low_end["seeds_unstable_below_max_stable_lr"], low_end["diverged_runs"]) == ("0", "1")
    assert (low_end["collapsed_before_divergence"], low_end["diverged_without_metrics_csv"]) == ("0", "1")

    assert view["sigma_post_ln"]["seeds_ended"] == "0"  # no runs: every seed at every lr not done
    assert view["sigma_post_ln"]["lr 0.016: n_not_done"] == "2"

    # the Markdown view: conditions, the lr cells with their bounds, the per-lr loss cells with markers
    section = md[md.index("## Learning-rate stability"):md.index("## Every row")]
    row = {line.split(" | ")[0].removeprefix("| "): line for line in section.splitlines() if line.startswith("| ")}
    assert "| pre_ln | pre | none | warmup | 0.006 [s0 0.008, s1 0.004] | 0.012 [s0 0.016, s1 0.008] | 0.008 |" \
        in row["pre_ln"]
    assert "| 2.150 | 2.050 | 2.200 †1 ◦ | 3.400 *1 †1 | 0.008 | 2 of 3; diverged: 1 of 2 before diverging, 100 steps ahead |" in row["pre_ln"]
    assert "| < 0.002 | 0.002 |" in row["post_ln"] and "| 5.545 *2 |" in row["post_ln"]
    assert "| ≥ 0.016 | > 0.016 | 0.04 |" in row["sigma_pre_ln"] and "no unstable run" in row["sigma_pre_ln"]
    assert row["post_ln"].endswith("| none | 0 of 8 |")
    assert "| ≥ 0.012 [s0 0.016, s1 0.008] | > 0.016 |" in row["no_norm"]  # seed 1 has no run at the top
    assert "| 2.600 !1 |" in row["no_norm"] and "| 2.500 ?1 |" in row["no_norm"]
    assert "| 0.008 (also unstable below it: s0) | 0.016 |" in row["sigma_no_norm"]
    assert row["sigma_no_norm"].endswith("| 0 of 2; diverged: 0 of 1 before diverging (1 without metrics.csv) |")
    assert row["sigma_post_ln"].endswith("| — ?2 | — ?2 | — ?2 | — ?2 |  |  |")
    assert "| val/loss @ lr 0.002 | val/loss @ lr 0.004 | val/loss @ lr 0.008 | val/loss @ lr 0.016 |" in md
    assert md.index("## Learning-rate stability") < md.index("## Every row: each cell at each lr_scale")
    assert "final `val/loss` below 3.2;" in md and "below 0.1 nats" in md
    assert "![final val/loss against the learning rate](proxy_loss_vs_lr.png)" in md
    printed = capsys.readouterr().out
    assert f"plot:  {out / TABLE / 'proxy_loss_vs_lr.png'}" in printed

    # the plain table is still there, one row per cell and lr_scale
    with (out / TABLE / "proxy.csv").open(newline="") as f:
        every = list(csv.DictReader(f))
    assert len(every) == 6 * 4
    pre_4 = next(r for r in every if r["cell"] == f"{TABLE}/pre_ln" and r["lr_scale"] == "4")
    assert (pre_4["n_finished"], pre_4["n_diverged"], pre_4["diverged_steps"]) == ("1", "1", "120")


def test_plot_draws_final_loss_against_lr_with_unstable_and_diverged_runs_marked(tmp_path):
    runs = tmp_path / "runs"
    grid_runs(runs)
    spec = results.load_table(TABLE, seeds="0,1", lr_grid=GRID)
    found, _ = results.find_runs(runs)
    rows, columns = results.lr_rows(results.group_rows(spec, found), spec.view, STABLE_BELOW, COLLAPSE_BELOW,
                                    now=2e9, stale_after_min=30)
    fig = results.draw_lr_stability(rows, columns, spec, "proxy", STABLE_BELOW, COLLAPSE_BELOW)
    loss_ax, entropy_ax = fig.axes
    assert (loss_ax.get_xscale(), entropy_ax.get_xscale()) == ("log", "log")

    def artists(ax, gid):
        return [a for a in [*ax.get_lines(), *ax.collections] if a.get_gid() == gid]

    cell = f"{TABLE}/pre_ln"
    (mean,) = artists(loss_ax, f"mean:{cell}")
    np.testing.assert_allclose(mean.get_xdata(), [BASE_LR * s for s in (1, 2, 4, 8)])
    np.testing.assert_allclose(mean.get_ydata(), [np.mean([2.1, 2.2]), np.mean([2.0, 2.1]), 2.2, 3.4])
    stable = np.concatenate([c.get_offsets() for c in artists(loss_ax, f"stable:{cell}")])
    assert sorted(map(tuple, stable.tolist())) == sorted([(BASE_LR, 2.1), (BASE_LR, 2.2), (2 * BASE_LR, 2.0),
                                                          (2 * BASE_LR, 2.1), (4 * BASE_LR, 2.2)])
    unstable = np.concatenate([c.get_offsets() for c in artists(loss_ax, f"unstable:{cell}")])
    assert unstable.tolist() == [[8 * BASE_LR, 3.4]]
    assert all(len(c.get_facecolors()) == 0 or c.get_facecolors()[0][3] == 0  # hollow
               for c in artists(loss_ax, f"unstable:{cell}") if len(c.get_offsets()))
    diverged = artists(loss_ax, f"diverged:{cell}")
    assert sorted(x for line in diverged for x in line.get_xdata()) == [4 * BASE_LR, 8 * BASE_LR]
    assert all(line.get_marker() == "x" for line in diverged)
    # diverged runs are drawn in a band along the top of the axes (kept free of data), not at a made-up loss
    low, high = loss_ax.get_ylim()
    band = 1 - 0.12 / 1.12
    assert all(np.all(np.asarray(line.get_ydata()) > band) for line in diverged)
    assert max(3.4, math.log(256)) < low + band * (high - low)
    (entropy,) = artists(entropy_ax, f"entropy:{cell}")
    np.testing.assert_allclose(entropy.get_ydata(), [np.mean([2.0, 1.8]), np.mean([1.5, 1.8]), np.mean([0.08, 0.06]),
                                                     np.mean([0.04, 0.18])])
    assert [line.get_ydata()[0] for line in loss_ax.get_lines() if line.get_linestyle() == "--"] == [STABLE_BELOW]
    (no_runs,) = artists(loss_ax, f"mean:{TABLE}/sigma_post_ln")
    assert len(no_runs.get_xdata()) == 0  # a cell without runs draws nothing and is not in the legend
    assert "sigma_post_ln" not in [t.get_text() for t in loss_ax.get_legend().get_texts()]
    png = tmp_path / "results" / TABLE / "proxy_loss_vs_lr.png"
    assert main(["table", TABLE, str(runs), "--lr-grid", GRID, "--seeds", "0,1", "--out", str(tmp_path / "results")]) == 0
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 600


def test_any_table_with_an_lr_grid_can_use_the_view(tmp_path, monkeypatch):
    """A user's table over the ViT cells (SIGMA_REPRO_CONFIG_PATH), judged by train/loss; columns are
    labelled by lr_scale where the cells' base rates differ."""
    (tmp_path / "conf" / "table").mkdir(parents=True)
    (tmp_path / "conf" / "table" / "my_grid.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      experiment: vit_optimizers/sgd_plain,vit_supervised/b16/deit\n"
        "      lr_scale: 0.3,1\n      seed: 0\n"
        "report:\n  metrics: [{name: val/acc, higher_is_better: true}]\n  columns: [optimizer, lr]\n"
        "  view: lr_stability\n  lr_stability: {loss: train/loss, stable_loss_below: {proxy: 1.0},\n"
        "                 collapse_entropy_below: {proxy: 0.3}}\n")
    monkeypatch.setenv("SIGMA_REPRO_CONFIG_PATH", str(tmp_path / "conf"))
    runs, out = tmp_path / "runs", tmp_path / "results"
    fake_run(runs, "vit_optimizers/sgd_plain", 0, lr_scale="0.3")
    fake_run(runs, "vit_optimizers/sgd_plain", 0, lr_scale="1", status="diverged", diverged_step=7)
    fake_run(runs, "vit_supervised/b16/deit", 0, lr_scale="0.3", entropy=([0.2, 0.2], [0.1, 0.2]))
    fake_run(runs, "vit_supervised/b16/deit", 0, lr_scale="1")
    assert main(["table", "my_grid", str(runs), "--out", str(out)]) == 0
    with (out / "my_grid" / "proxy_lr_stability.csv").open(newline="") as f:
        view = {r["cell"]: r for r in csv.DictReader(f)}
    sgd, deit = view["vit_optimizers/sgd_plain"], view["vit_supervised/b16/deit"]
    assert float(sgd["max_stable_lr"]) == pytest.approx(0.03) and float(sgd["divergence_lr"]) == pytest.approx(0.1)
    assert float(deit["max_stable_lr"]) == pytest.approx(3e-3) and deit["seeds_stable_at_top_lr"] == "0"
    assert float(deit["entropy_collapse_lr"]) == pytest.approx(0.3 * 3e-3)  # min 0.1 < 0.3 at lr_scale 0.3
    assert "lr_scale 0.3: train/loss mean" in sgd and sgd["optimizer"] == "sgd"
    assert "lr" not in sgd  # the lr is in the per-lr columns, not a condition


@pytest.mark.parametrize("report,message", [
    ({"view": "grid"}, "report.view 'grid' is not a known view; choose from lr_stability"),
    ({"view": "lr_stability"}, "needs a report.lr_stability block"),
    ({"lr_stability": {}}, "report.lr_stability is set but report.view is not"),
    ({"view": "lr_stability", "lr_stability": {"loss": "val/loss", "lr_axis": "lr", "stable_loss_below": {"proxy": 3},
                                               "collapse_entropy_below": {"proxy": 0.5}}},
     "reads the learning-rate grid from the swept key 'lr', but the table sweeps lr_scale"),
    ({"view": "lr_stability", "lr_stability": {"stable_loss_below": {"proxy": 3}, "collapse_entropy_below": {"proxy": 1}}},
     "report.lr_stability.loss must name the summary metric"),
    ({"view": "lr_stability", "lr_stability": {"loss": "val/loss", "stable_loss_below": {"medium": 3},
                                               "collapse_entropy_below": {"proxy": 1}}},
     "report.lr_stability.stable_loss_below needs a positive number per scale (proxy and/or full)"),
    ({"view": "lr_stability", "lr_stability": {"loss": "val/loss", "stable_loss_below": {"proxy": 3},
                                               "collapse_entropy_below": {"proxy": -1}}},
     "collapse_entropy_below needs a positive number per scale"),
    ({"view": "lr_stability", "lr_stability": {"loss": "val/loss", "stable_loss_below": {"proxy": 3},
                                               "collapse_entropy_below": {"proxy": 1}, "colour": 1}},
     "report.lr_stability has unknown keys ['colour']"),
])
def test_view_block_errors_say_what_to_write(report, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        results._view("t", report, {"lr_scale": ["1", "2"]})


def test_view_without_a_threshold_for_the_scale_says_which(tmp_path, monkeypatch):
    view = results.LrStabilityView("lr_scale", "val/loss", {"proxy": 3.0}, {"proxy": 0.5, "full": 0.5})
    with pytest.raises(ConfigError, match=re.escape("report.lr_stability.stable_loss_below has no value for "
                                                    "scale=full; add `full: <number>`")):
        view.thresholds("full", "t")


def test_view_reads_a_real_run_of_the_app(tmp_path):
    """Three steps of a real lm_lr_stability cell: the view takes its loss, entropy and lr from what
    train.py wrote (a 3-step model is far above the stable-loss threshold: unstable)."""
    from .test_train import train

    runs, out = tmp_path / "runs", tmp_path / "results"
    train(runs, f"experiment={TABLE}/sigma_pre_ln", "scale=proxy", "lr_scale=1", "logger=csv", "trainer.max_steps=3",
          "proxy.warmup_steps=2", "callbacks.diagnostics.every_n_steps=1", "trainer.enable_progress_bar=false")
    assert main(["table", TABLE, str(runs), "--lr-grid", "1", "--seeds", "0", "--out", str(out)]) == 0
    summary = json.loads(next(runs.rglob("summary.json")).read_text())
    with (out / TABLE / "proxy_lr_stability.csv").open(newline="") as f:
        real = next(r for r in csv.DictReader(f) if r["extra_overrides"])
    assert real["extra_overrides"] == "callbacks.diagnostics.every_n_steps=1,proxy.warmup_steps=2,trainer.max_steps=3"
    assert (real["norm"], real["reparam"], real["warmup"]) == ("pre", "sigma", "warmup")
    assert float(real["lr 0.002: val/loss mean"]) == pytest.approx(summary["metrics"]["val/loss"])
    assert summary["metrics"]["val/loss"] >= STABLE_BELOW and real["lr 0.002: n_unstable"] == "1"
    assert float(real["divergence_lr"]) == pytest.approx(summary["config"]["optim"]["lr"]) == pytest.approx(BASE_LR)
    assert float(real["lr 0.002: attention_entropy_min"]) == pytest.approx(min(summary["attention_entropy"]["min"]))
    steps, entropy = results.metric_curve(next(runs.rglob("metrics.csv")).parent, results.COLLAPSE_CURVE)
    assert steps == [0, 1, 2, 3] and min(entropy) == pytest.approx(min(summary["attention_entropy"]["min"]), abs=1e-4)


def test_plot_turns_to_a_log_loss_axis_when_a_run_blew_up_to_a_huge_finite_loss(tmp_path):
    runs = tmp_path / "runs"
    grid_runs(runs)
    lm_run(runs, "no_norm", 1, 8, loss=500.0)  # finished, unstable: a linear axis would flatten every other line
    spec = results.load_table(TABLE, seeds="0,1", lr_grid=GRID)
    found, _ = results.find_runs(runs)
    rows, columns = results.lr_rows(results.group_rows(spec, found), spec.view, STABLE_BELOW, COLLAPSE_BELOW,
                                    now=2e9, stale_after_min=30)
    loss_ax, _ = results.draw_lr_stability(rows, columns, spec, "proxy", STABLE_BELOW, COLLAPSE_BELOW).axes
    low, high = loss_ax.get_ylim()
    assert loss_ax.get_yscale() == "log" and low <= 2.0 and high > 500.0
