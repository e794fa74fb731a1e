"""`sigma-repro table mt_depth`: the minimum attention entropy per kind of attention (report.entropy_groups)
and the depth view (results.DepthView: each metric against depth, one line per scheme, with its plot), on
run dirs laid out as the app lays them out, against numbers computed here by hand."""

import csv
import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from sigma_repro import results
from sigma_repro.cli import main
from sigma_repro.errors import ConfigError

from .test_results import run_dir

TABLE = "mt_depth"
# cell name -> (model.norm, model.scheme, reparam, optimizer, lr, warmup steps) at scale=proxy
SCHEMES = {"post_ln": ("post", "standard", "none", "adam", 1e-3, 0), "admin": ("post", "admin", "none", "adam", 1e-3, 0),
           "sigma_post_ln": ("post", "standard", "sigma", "adam", 1e-3, 0),
           "sgd_post_ln": ("post", "standard", "none", "sgd", 0.1, 0)}
# two layers per stack, as the model names them (relative to the task: model.<...>)
LAYERS = ["model.encoder.layers.0.self_attn.sublayer", "model.encoder.layers.1.self_attn.sublayer",
          "model.decoder.layers.0.self_attn.sublayer", "model.decoder.layers.0.cross_attn.sublayer",
          "model.decoder.layers.1.self_attn.sublayer", "model.decoder.layers.1.cross_attn.sublayer"]
ENC, DEC, CROSS = [0, 1], [2, 4], [3, 5]  # positions of each kind in LAYERS


def mt_run(root: Path, cell: str, seed: int, *, status: str = "finished", bleu: float | None = None,
           nll: float | None = None, entropy_min: list[float] | None = None, diverged_step: int | None = None,
           extra: tuple[str, ...] = (), scale: str = "proxy") -> Path:
    """A run of mt_depth/<depth>/<scheme> as train.py leaves it (summary.json)."""
    experiment = f"{TABLE}/{cell}"
    depth, scheme = cell.split("/")
    norm, residual, reparam, optim, lr, warmup = SCHEMES[scheme]
    overrides = [f"experiment={experiment}", f"seed={seed}", f"table={TABLE}", f"scale={scale}", "logger=csv", *extra]
    out = run_dir(root, experiment, overrides, seed)
    out.mkdir(parents=True)
    metrics = {} if bleu is None else {"val/bleu": bleu, "val/nll": nll, "test/bleu": bleu - 0.5, "val/chrf": 20.0}
    summary = {
        "status": status, "diverged_step": diverged_step, "steps": 600, "loss_spikes": 0, "metrics": metrics,
        "wall_time_s": 80.0, "launches": 1, "git_sha": "abc1234", "ended_at": "2026-01-02T03:04:05+00:00",
        "machine": {"hostname": "nodeA", "device_name": "cpu"}, "run_dir": str(out),
        "experiment": experiment, "overrides": overrides, "seed": seed,
        "choices": {"experiment": experiment, "scale": scale, "optim": optim, "reparam": reparam, "task": "translation"},
        "config": {"seed": seed, "optim": {"lr": lr, "weight_decay": 0.0}, "schedule": {"warmup_steps": warmup},
                   "reparam": {"name": reparam},
                   "model": {"norm": norm, "scheme": residual, "depth": int(depth.split("L")[0])}},
    }
    if entropy_min is not None:
        summary["attention_entropy"] = {"layers": LAYERS, "final": [v + 0.5 for v in entropy_min], "min": entropy_min}
    (out / "summary.json").write_text(json.dumps(summary))
    return out


E = {  # per run, each layer's minimum attention entropy over probes (in LAYERS order)
    "post6_0": [2.0, 1.5, 1.0, 3.0, 0.8, 2.5], "post6_1": [1.8, 1.9, 1.2, 2.0, 1.1, 2.2],
    "post18_0": [2.9, 2.95, 1.0, 2.8, 1.4, 2.7], "post18_1": [0.05, 0.3, 0.9, 2.0, float("nan"), 1.9],
    "sigma6_0": [2.1, 2.2, 1.3, 2.6, 1.5, 2.4], "sigma6_1": [0.2, 0.1, 0.7, 1.0, 0.6, 0.9],
    "sigma18_0": [2.0, 2.1, 1.6, 2.5, 1.7, 2.6], "sigma18_1": [1.9, 2.3, 1.4, 2.2, 1.5, 2.1],
    "admin6_0": [2.2, 2.4, 1.8, 2.9, 1.9, 2.8], "extra6_0": [3.0, 3.0, 3.0, 3.0, 3.0, 3.0],
}


def table_runs(root: Path) -> None:
    """Known outcomes at scale=proxy, seeds 0 and 1.

    post_ln        6L: finished twice (BLEU 4.0, 5.0); 18L: seed 0 finished (BLEU 0.5), seed 1 diverged at
                   step 120 with a collapsed encoder; 50L: seed 0 failed, seed 1 missing
    sigma_post_ln  6L: seed 0 finished (6.0), seed 1 diverged at step 240; 18L: finished twice (5.5, 6.5)
    admin          6L: seed 0 finished (5.0), seed 1 missing
    post_ln 6L with trainer.max_steps=2: a row (and line) of its own
    every other cell: no runs
    """
    mt_run(root, "6L-6L/post_ln", 0, bleu=4.0, nll=5.3, entropy_min=E["post6_0"])
    mt_run(root, "6L-6L/post_ln", 1, bleu=5.0, nll=5.1, entropy_min=E["post6_1"])
    mt_run(root, "18L-18L/post_ln", 0, bleu=0.5, nll=6.8, entropy_min=E["post18_0"])
    mt_run(root, "18L-18L/post_ln", 1, status="diverged", diverged_step=120, entropy_min=E["post18_1"])
    mt_run(root, "50L-50L/post_ln", 0, status="failed")
    mt_run(root, "6L-6L/sigma_post_ln", 0, bleu=6.0, nll=4.9, entropy_min=E["sigma6_0"])
    mt_run(root, "6L-6L/sigma_post_ln", 1, status="diverged", diverged_step=240, entropy_min=E["sigma6_1"])
    mt_run(root, "18L-18L/sigma_post_ln", 0, bleu=5.5, nll=5.0, entropy_min=E["sigma18_0"])
    mt_run(root, "18L-18L/sigma_post_ln", 1, bleu=6.5, nll=4.8, entropy_min=E["sigma18_1"])
    mt_run(root, "6L-6L/admin", 0, bleu=5.0, nll=5.2, entropy_min=E["admin6_0"])
    mt_run(root, "6L-6L/post_ln", 0, bleu=0.1, nll=8.0, entropy_min=E["extra6_0"], extra=("trainer.max_steps=2",))
    mt_run(root, "6L-6L/post_ln", 0, bleu=9.9, nll=1.0, entropy_min=E["post6_0"], scale="full")  # other scale: not here


def render(tmp_path: Path) -> tuple[Path, dict, list[dict[str, str]], str]:
    runs, out = tmp_path / "runs", tmp_path / "results"
    table_runs(runs)
    assert main(["table", TABLE, str(runs), "--out", str(out)]) == 0
    with (out / TABLE / "proxy.csv").open(newline="") as f:
        rows = {(r["cell"].removeprefix(f"{TABLE}/"), r["extra_overrides"]): r for r in csv.DictReader(f)}
    with (out / TABLE / "proxy_depth.csv").open(newline="") as f:
        depth = list(csv.DictReader(f))
    return out, rows, depth, (out / TABLE / "proxy.md").read_text()


def kind_min(run: str, kind: list[int]) -> float:
    return min(E[run][i] for i in kind if np.isfinite(E[run][i]))


def test_entropy_groups_of_the_table_match_each_kind_of_attention():
    groups = results.load_table(TABLE).entropy_groups
    assert list(groups) == ["enc_self", "dec_self", "cross"]
    for group, kind in zip(groups.values(), (ENC, DEC, CROSS)):
        assert [i for i, name in enumerate(LAYERS) if re.fullmatch(group.replace(".", r"\.").replace("*", ".*"), name)] == kind


def test_group_minimum_is_over_matching_layers_and_probes(tmp_path):
    run = results.read_run(mt_run(tmp_path, "18L-18L/post_ln", 1, status="diverged", diverged_step=120,
                                  entropy_min=E["post18_1"]) / "summary.json", tmp_path)
    assert results.group_entropy_min(run, "*encoder.layers.*.self_attn*") == 0.05
    assert results.group_entropy_min(run, "*decoder.layers.*.self_attn*") == 0.9  # the NaN layer is skipped
    assert results.group_entropy_min(run, "*decoder.layers.*.cross_attn*") == 1.9
    assert results.group_entropy_min(run, "*blocks.*.attn*") is None
    no_probe = results.read_run(mt_run(tmp_path, "6L-6L/admin", 0, status="failed") / "summary.json", tmp_path)
    assert results.group_entropy_min(no_probe, "*encoder*") is None


def test_table_rows_give_bleu_statuses_divergence_step_and_entropy_per_kind(tmp_path, capsys):
    _, rows, _, md = render(tmp_path)
    assert len(rows) == 32 + 1  # every cell, plus the run with an extra override

    post6 = rows[("6L-6L/post_ln", "")]
    assert float(post6["val/bleu mean"]) == pytest.approx(4.5)
    assert float(post6["val/bleu std"]) == pytest.approx(np.std([4.0, 5.0], ddof=1))
    assert float(post6["val/nll mean"]) == pytest.approx(5.2) and float(post6["test/bleu mean"]) == pytest.approx(4.0)
    assert (post6["scheme"], post6["norm"], post6["reparam"], post6["optimizer"], post6["warmup"], post6["lr"],
            post6["depth"]) == ("standard", "post", "none", "adam", "no-warmup", "0.001", "6")
    for group, kind in (("enc_self", ENC), ("dec_self", DEC), ("cross", CROSS)):
        assert float(post6[f"attention_entropy_min {group}"]) == pytest.approx(
            np.mean([kind_min("post6_0", kind), kind_min("post6_1", kind)]))
    assert post6["paper"] == "27.8"  # Admin's WMT14 post-LN 6L-6L (results/paper_reference.yaml)

    post18 = rows[("18L-18L/post_ln", "")]
    assert (post18["n_finished"], post18["n_diverged"], post18["diverged_steps"]) == ("1", "1", "120")
    assert float(post18["val/bleu mean"]) == 0.5 and post18["val/bleu std"] == ""
    # entropy over finished and diverged seeds: the diverged run's collapsed encoder is the point
    assert float(post18["attention_entropy_min enc_self"]) == pytest.approx(np.mean([2.9, 0.05]))
    assert float(post18["attention_entropy_min dec_self"]) == pytest.approx(np.mean([1.0, 0.9]))
    assert post18["paper"] == ""  # Admin: post-LN 18L-18L failed, no number

    post50 = rows[("50L-50L/post_ln", "")]
    assert (post50["n_failed"], post50["n_missing"], post50["attention_entropy_min cross"]) == ("1", "1", "")
    assert (rows[("6L-6L/admin", "")]["scheme"], rows[("18L-18L/admin", "")]["paper"]) == ("admin", "29.03")
    assert rows[("6L-6L/post_ln", "trainer.max_steps=2")]["val/bleu mean"] == "0.1"

    every_row = md[md.index("## Every row: each cell"):]
    head = every_row.splitlines()[2]
    assert "| attention entropy min | attention entropy min enc_self | attention entropy min dec_self | " \
           "attention entropy min cross | loss spikes |" in head
    line = next(row for row in every_row.splitlines() if row.startswith("| 18L-18L/post_ln |"))
    assert "| 1 (s1 @ 120) |" in line  # diverged: seed 1 at step 120
    assert " | ".join(f"{np.mean([kind_min('post18_0', k), kind_min('post18_1', k)]):.3f}" for k in (ENC, DEC, CROSS)) \
        == "1.475 | 0.950 | 2.300" and "| 1.475 | 0.950 | 2.300 |" in line
    assert "attention layers named like `*encoder.layers.*.self_attn*`" in md


def test_depth_view_is_each_metric_against_depth_one_line_per_scheme(tmp_path):
    out, _, depth, md = render(tmp_path)
    placed = [(r["series"], r["x"]) for r in depth if r["x"]]
    # series in the table's order (a row with extra overrides right after its cell's), then by depth
    assert placed == [("post_ln", "6.0"), ("post_ln", "18.0"), ("post_ln", "50.0"), ("post_ln [trainer.max_steps=2]", "6.0"),
                      ("admin", "6.0"), ("sigma_post_ln", "6.0"), ("sigma_post_ln", "18.0")]
    assert sum(1 for r in depth if not r["x"]) == 32 - 6  # the cells without a run, last

    section = md[md.index("## Against depth (view depth)"):md.index("## Every row")]
    bleu = section[section.index("### val/bleu against depth (↑)"):section.index("### val/nll")]
    assert "| series | depth 6 | depth 18 | depth 50 |" in bleu
    assert f"| post_ln | 4.50 ± {np.std([4.0, 5.0], ddof=1):.2f} | 0.50 †1 | — !1 ?1 |" in bleu
    assert "| admin | 5.00 ?1 |  |  |" in bleu
    assert f"| sigma_post_ln | **6.00** †1 | **6.00 ± {np.std([5.5, 6.5], ddof=1):.2f}** |  |" in bleu
    assert "| post_ln [trainer.max_steps=2] | 0.10 ?1 |  |  |" in bleu  # its seed 1 has no run either
    nll = section[section.index("### val/nll against depth (↓)"):]
    assert "| post_ln | 5.20 ± 0.14 | 6.80 †1 | — !1 ?1 |" in nll
    assert "| sigma_post_ln | **4.90** †1 | **4.90 ± 0.14** |  |" in nll
    assert "Not drawn (no run, so no depth yet): mt_depth/100L-100L/post_ln," in section
    assert md.index("## Against depth") < md.index("## Every row: each cell")
    assert (out / TABLE / "proxy_vs_depth.png").stat().st_size > 0 and "](proxy_vs_depth.png)" in md


def test_depth_view_keeps_its_metrics_when_the_table_shows_another(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    table_runs(runs)
    assert main(["table", TABLE, str(runs), "--metric", "val/chrf", "--out", str(out)]) == 0
    md = (out / TABLE / "proxy.md").read_text()
    assert "| post_ln | 4.50 ± 0.71 | 0.50 †1 | — !1 ?1 |" in md and "val/chrf (mean ± std, ↑)" in md


def test_depth_plot_draws_seeds_means_and_diverged_runs(tmp_path):
    runs = tmp_path / "runs"
    table_runs(runs)
    spec = results.load_table(TABLE)
    found = [r for r in results.find_runs(runs)[0] if r.scale == "proxy"]
    now = 1e12  # long after: states come from the summaries alone
    points = results.depth_records(results.group_rows(spec, found), spec, {}, now, results.STALE_AFTER_MIN)
    fig = results.draw_depth(points, spec, "proxy", now, results.STALE_AFTER_MIN)
    bleu_ax, nll_ax = fig.axes[:2]
    lines = {line.get_gid(): line for line in bleu_ax.get_lines()}
    post, sigma = lines["mean:post_ln"], lines["mean:sigma_post_ln"]
    assert list(post.get_ydata()) == pytest.approx([4.5, 0.5]) and list(sigma.get_ydata()) == pytest.approx([6.0, 6.0])
    # x: the depths, each series shifted by one constant factor on the log axis
    assert post.get_xdata()[1] / post.get_xdata()[0] == pytest.approx(3.0)
    assert sigma.get_xdata()[0] / 6 == pytest.approx(sigma.get_xdata()[1] / 18)
    assert post.get_xdata()[0] / 6 != pytest.approx(sigma.get_xdata()[0] / 6)
    seeds = [c for c in bleu_ax.collections if c.get_gid() == "seeds:post_ln"]
    assert sorted(y for c in seeds for _, y in c.get_offsets()) == pytest.approx([0.5, 4.0, 5.0])
    diverged = {line.get_gid(): len(line.get_xdata()) for line in bleu_ax.get_lines() if line.get_gid().startswith("diverged:")}
    assert diverged == {"diverged:post_ln": 1, "diverged:sigma_post_ln": 1}
    assert [t.get_text() for t in nll_ax.get_xticklabels()] == ["6", "18", "50"]
    assert nll_ax.get_xscale() == "log"
    plt.close(fig)


@pytest.mark.parametrize("report,message", [
    ({"view": "depth", "depth": {"metrics": ["val/chrf"]}},
     "report.depth.metrics must list metrics of report.metrics (['val/bleu'])"),
    ({"view": "depth", "depth": {"x": ""}}, "report.depth.x must name the config key"),
    ({"view": "depth", "depth": {"series_part": "last"}}, "report.depth.series_part must be an index"),
    ({"view": "depth", "depth": {"colour": 1}}, "report.depth has unknown keys ['colour']"),
    ({"depth": {}}, "report.depth is set but report.view is not; add `view: depth`"),
    ({"view": "grid"}, "report.view 'grid' is not a known view; choose from lr_stability, depth"),
])
def test_depth_block_errors_say_what_to_write(report, message):
    report = {"metrics": [{"name": "val/bleu", "higher_is_better": True}], **report}
    with pytest.raises(ConfigError, match=re.escape(message)):
        results._view("t", report, {})


def test_defaults_draw_the_headline_against_model_depth():
    view = results._view("t", {"metrics": [{"name": "val/bleu", "higher_is_better": True},
                                           {"name": "val/nll", "higher_is_better": False}], "view": "depth"}, {})
    assert (view.x, view.series_part, [m.name for m in view.metrics]) == ("model.depth", -1, ["val/bleu"])


@pytest.mark.parametrize("groups", [["enc"], {"enc": ""}, {"": "*enc*"}])
def test_entropy_groups_must_map_names_to_patterns(groups):
    with pytest.raises(ConfigError, match="report.entropy_groups must map a column name to an fnmatch pattern"):
        results._entropy_groups("t", {"entropy_groups": groups})


@pytest.mark.slow
def test_entropy_groups_and_depth_view_read_a_real_run_of_the_app(tmp_path):
    """Three steps of a real mt_depth cell (one layer per stack): every kind of attention the model names
    falls into its group, and the table takes its numbers from what train.py wrote."""
    from .test_train import train

    runs, out = tmp_path / "runs", tmp_path / "results"
    train(runs, "experiment=mt_depth/6L-6L/sigma_post_ln", "scale=proxy", "logger=csv", "model.depth=1",
          "trainer.max_steps=3", "trainer.enable_progress_bar=false")
    summary = json.loads(next(runs.rglob("summary.json")).read_text())
    entropy = dict(zip(summary["attention_entropy"]["layers"], summary["attention_entropy"]["min"]))
    groups = results.load_table(TABLE).entropy_groups
    matched = {group: [v for name, v in entropy.items() if re.fullmatch(p.replace(".", r"\.").replace("*", ".*"), name)]
               for group, p in groups.items()}
    assert all(len(v) == 1 for v in matched.values()) and sum(map(len, matched.values())) == len(entropy) == 3

    assert main(["table", TABLE, str(runs), "--seeds", "0", "--out", str(out)]) == 0
    with (out / TABLE / "proxy.csv").open(newline="") as f:
        real, = [r for r in csv.DictReader(f) if r["extra_overrides"]]
    assert real["extra_overrides"] == "model.depth=1,trainer.max_steps=3" and real["n_finished"] == "1"
    assert float(real["val/bleu mean"]) == pytest.approx(summary["metrics"]["val/bleu"])
    for group, values in matched.items():
        assert float(real[f"attention_entropy_min {group}"]) == pytest.approx(values[0])
    with (out / TABLE / "proxy_depth.csv").open(newline="") as f:
        placed = [(r["series"], r["x"]) for r in csv.DictReader(f) if r["x"]]
    assert placed == [("sigma_post_ln [model.depth=1,trainer.max_steps=3]", "1.0")]
