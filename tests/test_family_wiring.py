"""A family added without touching the app: the test-only sequence-reversal family in
tests/toy_family (a DataModule, a model, a task and configs reached through Hydra's search path)
runs end to end through ``sigma-repro-train`` with only ``task=reverse``, resumes exactly after a
hard kill, picks its own proxy, trains the parameters its task owns, and takes σReparam."""

import csv
import json
import statistics

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from sigma_repro.cli import main
from sigma_repro.converters import NoReparam, SigmaReparamConverter
from sigma_repro.errors import ConfigError
from sigma_repro.optim import build_optimizer
from sigma_repro.reparam import iter_sigma_reparam

from .conftest import CONF_DIR, ROOT
from .helpers import computed_metrics
from .test_train import only_run_dir, reference_and_killed_run, train
from .toy_family import Reverser, ReversalData, ReversalTask

TOY_CONF = ROOT / "tests" / "toy_family" / "conf"
SEARCH = f"hydra.searchpath=[file://{TOY_CONF}]"
FAST = [SEARCH, "logger=csv", "trainer.max_steps=40", "trainer.max_epochs=-1", "trainer.enable_progress_bar=false",
        "callbacks.diagnostics.every_n_steps=10", "optim.lr=3e-3"]


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[SEARCH, *overrides], return_hydra_config=True)


def test_task_alone_selects_the_family_model_and_data_and_scale_proxy_its_proxy():
    choices = compose_train("task=reverse").hydra.runtime.choices
    assert (choices.model, choices.data) == ("reverser", "reversal")
    proxy = compose_train("experiment=reverse/sigma", "scale=proxy")
    assert (proxy.model.dim, proxy.model.depth, proxy.data.train_size) == (16, 1, 256)  # reverser_small, cell depth
    assert proxy.trainer.max_steps == 20
    classification = compose_train("scale=proxy")  # the ViT family keeps its own proxy
    assert classification.model._target_ == "sigma_repro.models.vit.build_vit" and classification.model.patch_size == 2


def test_toy_family_trains_through_the_app_with_task_alone(tmp_path):
    train(tmp_path, *FAST, "task=reverse")
    run_dir = only_run_dir(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 40
    assert summary["choices"]["task"] == "reverse" and summary["config"]["model"]["norm"] == "post"
    assert "train/token_acc" in summary["metrics"]
    assert len(summary["attention_entropy"]["final"]) == 2  # one per encoder layer, from the diagnostics
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["temperature"].item() != 1.0  # the task's own parameter was optimised

    # val/token_acc is the final weights' token accuracy on the validation set, scored independently
    data = ReversalData()
    model = Reverser(**data.model_kwargs, dim=32, depth=2, num_heads=2, norm="post").eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    with torch.no_grad():
        tokens, target = (torch.stack(t) for t in zip(*(data.val_set[i] for i in range(len(data.val_set)))))
        acc = ((model(tokens) * state["temperature"]).argmax(-1) == target).float().mean().item()
    assert summary["metrics"]["val/token_acc"] == pytest.approx(acc, abs=1e-6)


@pytest.mark.parametrize("reparam", ["none", pytest.param("sigma", marks=pytest.mark.slow)])
def test_toy_family_resumes_exactly_after_a_hard_kill(tmp_path, reparam):
    common = [*FAST, "task=reverse", "trainer.deterministic=true", "checkpoint_every_n_steps=5",
              f"reparam={reparam}"]
    ref_dir, run_dir = reference_and_killed_run(tmp_path, common, kill_step=23)
    train(tmp_path / "b", *common, f"hydra.run.dir={run_dir}")  # 512 // 32 = 16 steps an epoch: mid-epoch 2
    ref, got = (json.loads((d / "summary.json").read_text()) for d in (ref_dir, run_dir))
    assert got["launches"] == 2 and computed_metrics(got) == computed_metrics(ref)
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for d in (ref_dir, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _task(converter) -> ReversalTask:
    data = ReversalData()
    model = converter.convert(Reverser(**data.model_kwargs))
    return ReversalTask(model, **data.task_kwargs, optim={"_target_": "torch.optim.AdamW", "lr": 1e-3,
                        "weight_decay": 0.05}, schedule={}, **converter.optimizer_options())


@pytest.mark.parametrize("converter", [NoReparam(), SigmaReparamConverter(gamma_lr_mult=0.5)], ids=["none", "sigma"])
def test_optimizer_holds_every_trainable_parameter_of_the_task_once(converter):
    task = _task(converter)
    optimizer = build_optimizer(task, task.hparams.optim, gamma_lr_mult=task.hparams.gamma_lr_mult)
    in_groups = [id(p) for g in optimizer.param_groups for p in g["params"]]
    trainable = {id(p) for p in task.parameters() if p.requires_grad}
    assert len(in_groups) == len(set(in_groups)) and set(in_groups) == trainable
    assert id(task.temperature) in in_groups  # lives on the task, not on task.model
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert [id(p) for p in groups["decay"]["params"]] == [
        id(p) for p in task.parameters() if p.requires_grad and p.ndim >= 2 and p.shape != (1,) and
        not any(p is q for q in (groups.get("gamma", {}).get("params", [])))]
    if converter.name == "sigma":
        assert groups["gamma"]["lr"] == pytest.approx(0.5e-3) and groups["gamma"]["weight_decay"] == 0.0


def test_sigma_reparam_covers_every_matrix_of_the_family_and_no_embedding():
    task = _task(SigmaReparamConverter())
    covered = {name.removesuffix(".weight") for name, _ in iter_sigma_reparam(task.model)}
    linears = {name for name, m in task.model.named_modules() if isinstance(m, nn.Linear)}
    assert covered == linears  # attention q/k/v/out, FFN fc1/fc2 and the head: all of them
    assert {"encoder.layers.0.self_attn.sublayer.q_proj", "encoder.layers.1.ffn.sublayer.fc2", "head"} <= covered
    for name, param in task.model.named_parameters():  # embedding, positions and norms stay plain
        if name.startswith(("embed.", "pos")) or ".norm." in name:
            assert "parametrizations" not in name, name


def test_reparam_options_are_checked_before_compute():
    with pytest.raises(ConfigError, match=r"reparam=none takes no σReparam options, found \['qkv'\]"):
        NoReparam(qkv="qk_v")
    with pytest.raises(ConfigError, match=r"unknown σReparam option\(s\) \['remove_norms'\].*model.norm=none"):
        SigmaReparamConverter(remove_norms=True)


def test_toy_family_table_runs_as_a_sweep_and_reports_its_own_metrics(tmp_path, monkeypatch):
    """The family's table (its own config dir, named by SIGMA_REPRO_CONFIG_PATH) runs as one multirun
    at its proxy scale, and `sigma-repro table` reports the metrics and columns the table declares."""
    monkeypatch.setenv("SIGMA_REPRO_CONFIG_PATH", str(TOY_CONF))
    runs = tmp_path / "runs"
    train(runs, "table=reverse", "scale=proxy", "logger=csv", "trainer.enable_progress_bar=false")
    assert main(["table", "reverse", str(runs), "--out", str(tmp_path / "results")]) == 0
    with (tmp_path / "results" / "reverse" / "proxy.csv").open(newline="") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"reverse/none", "reverse/sigma"}
    for cell, r in rows.items():
        summaries = [json.loads(p.read_text()) for p in (runs / cell).rglob("summary.json")]
        accs = [s["metrics"]["val/token_acc"] for s in summaries]
        assert len(accs) == 2 and float(r["val/token_acc mean"]) == pytest.approx(statistics.mean(accs))
        assert float(r["val/loss mean"]) == pytest.approx(statistics.mean(s["metrics"]["val/loss"] for s in summaries))
        assert (r["reparam"], r["norm"], r["depth"]) == (cell.split("/")[1], "post", "1")
        assert {s["steps"] for s in summaries} == {20}
    text = (tmp_path / "results" / "reverse" / "proxy.md").read_text()
    assert "val/token_acc (mean ± std, ↑)" in text and "val/loss (mean ± std, ↓)" in text
