"""The causal-LM family through the app, as FAMILIES.md §1 asks of every family: ``task=lm`` alone
trains on the embedded standard-library bytes; the summary's metrics are the final weights' loss,
perplexity and bits per byte, recomputed here from the checkpoint; a hard kill resumes exactly;
a blow-up ends as ``diverged``; W&B tags name the family; σReparam is applied from config."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from sigma_repro.reparam import iter_sigma_reparam

from .conftest import CONF_DIR
from .helpers import computed_metrics, final_model_and_data
from .test_train import only_run_dir, reference_and_killed_run, train, wandb_offline_record

# A fast LM run: the family's default model and data, 30 optimizer steps, small validation.
FAST = ["task=lm", "logger=csv", "trainer.max_steps=30", "trainer.max_epochs=-1", "trainer.enable_progress_bar=false",
        "callbacks.diagnostics.every_n_steps=10", "callbacks.diagnostics.probe_size=8", "data.block_size=64",
        "data.val_blocks=32", "data.batch_size=16"]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_task_lm_alone_picks_the_gpt_on_stdlib_bytes_and_scale_proxy_keeps_them():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["task=lm"], return_hydra_config=True)
        proxy = compose(config_name="train", overrides=["task=lm", "scale=proxy"], return_hydra_config=True)
    assert (cfg.hydra.runtime.choices.model, cfg.hydra.runtime.choices.data) == ("gpt_tiny", "stdlib")
    assert proxy.model._target_ == "sigma_repro.models.gpt.GPT"
    assert proxy.data._target_ == "sigma_repro.data.text.StdlibDataModule"


@pytest.mark.parametrize("reparam", ["none", "sigma", pytest.param("sigma_stats", marks=pytest.mark.slow)])
def test_lm_run_reports_the_final_weights_loss_ppl_and_bits_per_byte(tmp_path, reparam):
    train(tmp_path, *FAST, f"reparam={reparam}")
    run_dir = only_run_dir(tmp_path)
    summary = _summary(run_dir)
    assert summary["status"] == "finished" and summary["steps"] == 30
    assert summary["headline_metric"] == {"name": "val/ppl", "higher_is_better": False}
    assert summary["data"]["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert summary["data"]["tokenizer"] == "bytes" and len(summary["data"]["sha256"]) == 64
    assert len(summary["attention_entropy"]["final"]) == summary["config"]["model"]["depth"]
    assert summary["metrics"]["train/tokens_per_s"] > 0

    # The validation metrics, recomputed from the checkpointed weights on the validation blocks.
    model, data = final_model_and_data(run_dir)
    if reparam != "none":  # q, k, v, out and both FFN matrices of every block; not the tied head
        assert len(list(iter_sigma_reparam(model))) == 6 * summary["config"]["model"]["depth"]
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in data.val_dataloader():
            logits = model(inputs)
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
    loss = total / count
    metrics = summary["metrics"]
    assert metrics["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["val/bits_per_byte"] == pytest.approx(loss / math.log(2), rel=1e-5)  # one byte a token
    assert metrics["val/loss"] < math.log(256)  # it learnt something in 30 steps


@pytest.mark.slow
def test_lm_resumes_exactly_after_a_hard_kill_mid_epoch(tmp_path):
    # 16 steps an epoch (blocks_per_epoch 256 / batch 16): killed in the middle of the second epoch.
    common = [*FAST, "trainer.deterministic=true", "checkpoint_every_n_steps=5", "data.blocks_per_epoch=256",
              "model.dropout=0.1"]
    ref_dir, run_dir = reference_and_killed_run(tmp_path, common, kill_step=23)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20
    train(tmp_path / "b", *common, f"hydra.run.dir={run_dir}")
    ref, got = _summary(ref_dir), _summary(run_dir)
    assert got["launches"] == 2 and computed_metrics(got) == computed_metrics(ref)
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for d in (ref_dir, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lm_blow_up_ends_as_diverged_and_a_rerun_returns_the_stored_result(tmp_path):
    overrides = [*FAST, "model.norm=none", "optim=sgd", "optim.lr=1e12", "optim.momentum=0.0"]
    proc = train(tmp_path, *overrides)
    summary = _summary(only_run_dir(tmp_path))
    assert summary["status"] == "diverged" and 0 <= summary["diverged_step"] < 30
    assert "Traceback" not in proc.stderr
    again = train(tmp_path, *overrides)
    assert _summary(only_run_dir(tmp_path))["launches"] == 1 and "diverged" in again.stdout + again.stderr


@pytest.mark.slow
def test_lm_wandb_offline_tags_name_the_family(tmp_path):
    train(tmp_path, *[o for o in FAST if o != "logger=csv"], "trainer.max_steps=6", "reparam=sigma")
    record = wandb_offline_record(only_run_dir(tmp_path))
    assert {"task:lm", "reparam:sigma", "norm:pre", "model:gpt_tiny", "data:stdlib"} <= set(record["tags"])
    assert "val/ppl" in record["summary"]
