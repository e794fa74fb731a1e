"""AttentionDiagnostics in a real lightning.Trainer on CPU: logged keys, saved files, resume; and
`sigma-repro bench diagnostics`, which times it."""

import argparse
import csv
import json
import statistics
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sigma_repro import bench
from sigma_repro.diagnostics import attention_entropy, attention_grad_norms, attention_logit_norms, rank_collapse
from sigma_repro.diagnostics.callbacks import (
    AttentionDiagnostics,
    load_diagnostics,
    plot_entropy_comparison,
    plot_entropy_curves,
    plot_entropy_heads,
    plot_sigma_curves,
    save_history,
)
from sigma_repro.errors import ConfigError
from sigma_repro.reparam import apply_sigma_reparam
from tests.helpers import TappedAttention


class TinyVitTask(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=16,
                                       depth=2, num_heads=2)
        apply_sigma_reparam(self.model)
        self.probe_x = torch.randn(8, 1, 8, 8)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def probe_inputs(self, n):
        return (self.probe_x[:n],), {}


def training_data():
    torch.manual_seed(1)
    return torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))


def fit(root, max_steps, diagnostics, ckpt_path=None):
    data = DataLoader(TensorDataset(*training_data()), batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=root,
        logger=CSVLogger(root, name="csv", version=0), log_every_n_steps=50,
        callbacks=[diagnostics, ModelCheckpoint(dirpath=root / "checkpoints", save_last=True,
                                                enable_version_counter=False)],
        enable_progress_bar=False, enable_model_summary=False,
    )
    task = TinyVitTask()
    trainer.fit(task, data, ckpt_path=ckpt_path)
    return trainer, task


def logged_rows(root):
    with open(root / "csv" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_logs_saves_and_resumes_the_whole_curve(tmp_path):
    diag = AttentionDiagnostics(every_n_steps=2, probe_size=4)
    trainer, task = fit(tmp_path, 5, diag)

    # step 0 before training, every 2 steps, and the last step
    assert diag.history["steps"] == [0, 2, 4, 5]
    rows = [r for r in logged_rows(tmp_path) if r.get("diag/attention_entropy/min")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]  # log_every_n_steps=50 does not thin them
    for key in ["diag/attention_entropy/L00", "diag/attention_entropy/L01", "diag/attention_entropy/L01/H01",
                "diag/attention_entropy_norm/L00", "diag/sigma/blocks.0.attn.qkv", "diag/gamma/blocks.1.mlp.fc2",
                "diag/sigma/patch_embed.proj"]:
        assert rows[-1][key], key
    last = rows[-1]
    assert float(last["diag/attention_entropy/min"]) == min(float(last["diag/attention_entropy/L00"]),
                                                       float(last["diag/attention_entropy/L01"]))

    # the last probe is attention_entropy, rank_collapse and attention_logit_norms of the trained
    # model on the probe batch, all from its one forward
    final = attention_entropy(task.model, task.probe_x[:4])
    assert float(last["diag/attention_entropy/L01/H00"]) == pytest.approx(float(final["blocks.1.attn"][0]), abs=1e-6)
    blocks = rank_collapse(task.model, task.probe_x[:4])
    for b, name in enumerate(["blocks.0", "blocks.1"]):
        for kind in ("token_cosine", "residual_ratio"):
            assert float(last[f"diag/{kind}/B{b:02d}"]) == pytest.approx(blocks[name][kind], abs=1e-6)
    logit_norms = attention_logit_norms(task.model)
    assert float(last["diag/attention_logit_norm/L01"]) == pytest.approx(float(logit_norms["blocks.1.attn"].max()),
                                                                         rel=1e-6)
    assert float(last["diag/attention_logit_norm/L00/H01"]) == pytest.approx(float(logit_norms["blocks.0.attn"][1]),
                                                                             rel=1e-6)

    # gradient norms of the training batch at probe steps 0, 2, 4 (step 5 trains no batch)
    grad_rows = [r for r in logged_rows(tmp_path) if r.get("diag/grad_ratio_qv/L00")]
    assert [int(r["step"]) for r in grad_rows] == [0, 2, 4]
    for row in grad_rows:
        for i in range(2):
            ratio = float(row[f"diag/grad_norm/q/L{i:02d}"]) / float(row[f"diag/grad_norm/v/L{i:02d}"])
            assert float(row[f"diag/grad_ratio_qv/L{i:02d}"]) == pytest.approx(ratio, rel=1e-6)
    fresh = TinyVitTask().model.train()  # step 0's gradients, recomputed on the first training batch
    images, labels = training_data()
    F.cross_entropy(fresh(images[:8]), labels[:8]).backward()
    for role in ("q", "k", "v", "o"):
        expected = attention_grad_norms(fresh)["blocks.1.attn"][role]
        assert float(grad_rows[0][f"diag/grad_norm/{role}/L01"]) == pytest.approx(expected, rel=1e-5)

    saved = np.load(tmp_path / "diagnostics.npz")
    assert saved["steps"].tolist() == [0, 2, 4, 5]
    assert saved["attention_entropy"].shape == (4, 2, 2) and saved["attention_entropy_norm"].shape == (4, 2, 2)
    assert saved["layers"].tolist() == ["blocks.0.attn", "blocks.1.attn"]
    assert saved["sigma"].shape == (4, len(saved["sigma_names"])) and "blocks.0.attn.qkv" in saved["sigma_names"]
    assert saved["gamma"].shape == (4, len(saved["gamma_names"]))
    assert np.allclose(saved["attention_entropy"][0], np.log(17), atol=0.5)  # near log T at init
    assert saved["blocks"].tolist() == ["blocks.0", "blocks.1"]
    assert saved["token_cosine"].shape == saved["residual_ratio"].shape == (4, 2)
    assert saved["attention_logit_layers"].tolist() == saved["layers"].tolist()
    assert saved["attention_logit_norm"].shape == (4, 2, 2)
    assert saved["grad_steps"].tolist() == [0, 2, 4] and saved["grad_norm"].shape == (3, 2, 4)
    assert saved["grad_roles"].tolist() == ["q", "k", "v", "o"]
    assert saved["grad_norm"][0, 1, 0] == pytest.approx(float(grad_rows[0]["diag/grad_norm/q/L01"]), rel=1e-6)
    for plot in ("attention_entropy", "entropy_heads", "sigma"):
        assert (tmp_path / "plots" / f"{plot}.png").stat().st_size > 0

    # resume from the step-5 checkpoint to step 8: the history continues on the same grid. The
    # end-of-training probe at step 5 came after that checkpoint was written, so it is not in it.
    resumed = AttentionDiagnostics(every_n_steps=2, probe_size=4)
    fit(tmp_path, 8, resumed, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert resumed.history["steps"] == [0, 2, 4, 6, 8]
    assert resumed.history["attention_entropy"][:3] == diag.history["attention_entropy"][:3]
    assert resumed.history["grad_steps"] == [0, 2, 4, 6]
    assert resumed.history["token_cosine"][:3] == diag.history["token_cosine"][:3]
    assert np.load(tmp_path / "diagnostics.npz")["attention_entropy"].shape == (5, 2, 2)


def test_state_dict_round_trip_and_plots_from_files(tmp_path):
    diag = AttentionDiagnostics(every_n_steps=3)
    diag.history.update(steps=[0, 3], layers=["a", "b"],
                        attention_entropy=[[[2.0, 2.1], [2.2, 2.3]], [[1.0, 1.1], [0.5, 0.6]]],
                        attention_entropy_norm=[[[0.9, 0.9], [0.9, 0.9]], [[0.5, 0.5], [0.2, 0.3]]])
    state = diag.state_dict()
    torch.save({"callbacks": {diag.state_key: state}}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["callbacks"][diag.state_key]
    other = AttentionDiagnostics(every_n_steps=3)
    other.load_state_dict(loaded)
    assert other.history == diag.history

    save_history(other.history, tmp_path / "run" / "diagnostics.npz")
    plot_entropy_curves(tmp_path / "run" / "diagnostics.npz", tmp_path / "one.png", title="one run")
    plot_entropy_comparison({"baseline": tmp_path / "run" / "diagnostics.npz",
                             "sigma": tmp_path / "run" / "diagnostics.npz"}, tmp_path / "both.png")
    plot_entropy_heads(tmp_path / "run" / "diagnostics.npz", tmp_path / "heads.png")
    for png in ("one", "both", "heads"):
        assert (tmp_path / f"{png}.png").stat().st_size > 0
    with pytest.raises(ValueError, match="sigma_stats"):
        plot_sigma_curves(tmp_path / "run" / "diagnostics.npz", tmp_path / "sigma.png")

    # a checkpoint from before rank collapse, logit and gradient norms, and before the renamed keys
    old = {key: diag.history[key] for key in ("steps", "layers", "sigma_names", "sigma", "gamma_names", "gamma")}
    old.update(entropy=diag.history["attention_entropy"], entropy_norm=diag.history["attention_entropy_norm"])
    other.load_state_dict(old)
    assert other.history == diag.history


def test_files_with_the_old_key_names_still_load(tmp_path):
    """diagnostics.npz written before the keys were renamed (entropy, logit_norm, ...) reads as a new one."""
    entropy = np.array([[[2.0, 2.1]], [[1.0, 1.2]]], dtype=np.float32)  # (S, L, H)
    np.savez(tmp_path / "diagnostics.npz", steps=np.array([0, 5]), layers=np.array(["blocks.0.attn"]),
             entropy=entropy, entropy_norm=entropy / 3, logit_layers=np.array(["blocks.0.attn"]),
             logit_norm=entropy * 2)
    loaded = load_diagnostics(tmp_path / "diagnostics.npz")
    assert set(loaded) == {"steps", "layers", "attention_entropy", "attention_entropy_norm", "attention_logit_layers",
                           "attention_logit_norm"}
    assert np.array_equal(loaded["attention_entropy"], entropy)
    assert np.array_equal(loaded["attention_logit_norm"], entropy * 2)
    plot_entropy_heads(tmp_path / "diagnostics.npz", tmp_path / "heads.png")
    assert (tmp_path / "heads.png").stat().st_size > 0


def test_parts_switch_off_and_unusable_models_fail_before_training(tmp_path):
    diag = AttentionDiagnostics(every_n_steps=2, probe_size=4, rank_collapse=False, grad_norms=False,
                                logit_norms=False)
    fit(tmp_path, 2, diag)
    keys = set().union(*logged_rows(tmp_path))
    assert "diag/attention_entropy/L00" in keys
    assert not any(k.startswith(("diag/token_cosine", "diag/grad_", "diag/attention_logit_norm")) for k in keys)
    saved = np.load(tmp_path / "diagnostics.npz")
    assert not {"token_cosine", "attention_logit_norm", "grad_norm"} & set(saved.files)

    no_blocks = SimpleNamespace(model=nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)}),
                                probe_inputs=lambda n: ((), {}))
    with pytest.raises(ConfigError, match="rank_collapse=false"):
        AttentionDiagnostics().on_fit_start(None, no_blocks)
    AttentionDiagnostics(rank_collapse=False).on_fit_start(None, no_blocks)
    fused_only = SimpleNamespace(model=nn.ModuleDict({"layers": nn.ModuleList([TappedAttention()])}),
                                 probe_inputs=lambda n: ((), {}))  # taps, but one fused qkv matrix
    with pytest.raises(ConfigError, match="set both to false"):
        AttentionDiagnostics().on_fit_start(None, fused_only)
    AttentionDiagnostics(grad_norms=False, logit_norms=False, blocks="layers.*").on_fit_start(None, fused_only)


def test_bench_diagnostics_reports_the_ratio_of_its_recorded_times(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="sigma-repro bench")
    bench.add_arguments(parser)
    out = tmp_path / "diagnostics.json"
    args = parser.parse_args(["diagnostics", "--depth", "1", "--steps", "3", "--every-n-steps", "2",
                              "--batch-size", "16", "--probe-size", "4", "--out", str(out)])
    assert bench.run(args) == 0
    record = json.loads(out.read_text())

    assert record["benchmark"] == "diagnostics" and record["config"]["every_n_steps"] == 2
    for key in ("cpu_model", "torch_version", "torch_threads", "device_name", "date", "git_sha", "command"):
        assert key in record["machine"]
    plain, timed, overhead = (record["results"][k] for k in ("plain", "diagnostics", "overhead"))
    for run in (plain, timed):
        assert len(run["samples"]) == 3 and run["step_s"] == statistics.median(run["samples"]) and run["train_s"] > 0
    assert len(timed["probe_samples"]) == 3  # steps 0, 2 and the last step, 3
    assert len(timed["grad_samples"]) == 2  # the training batches at steps 0 and 2
    assert timed["probe_s"] == statistics.median(timed["probe_samples"])
    assert timed["grad_s"] == statistics.median(timed["grad_samples"])
    assert overhead["amortised"] == (timed["probe_s"] + timed["grad_s"]) / (2 * timed["step_s"])
    assert overhead["measured"] == timed["train_s"] / plain["train_s"] - 1
    printed = capsys.readouterr().out
    assert "amortised" in printed and f"wrote {out}" in printed


def test_sigma_tracking_error_is_logged_against_svd_and_leaves_training_unchanged(tmp_path):
    on = AttentionDiagnostics(every_n_steps=2, probe_size=4)
    _, task = fit(tmp_path / "on", 5, on)
    off = AttentionDiagnostics(every_n_steps=2, probe_size=4, sigma_tracking_error=False)
    _, task_off = fit(tmp_path / "off", 5, off)
    # the probe changes nothing: the same run, buffers included
    a, b = task.model.state_dict(), task_off.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    last = [r for r in logged_rows(tmp_path / "on") if r.get("diag/sigma_tracking_error/max")][-1]
    assert int(last["step"]) == 5  # the end-of-training probe: the model as fit left it
    errors = {}
    for module_name, module in task.model.named_modules():  # independently: SVD of each final W
        if hasattr(module, "parametrizations"):
            reparam = module.parametrizations.weight[0]
            w = module.parametrizations.weight.original.detach().double()  # (reading module.weight in
            w = w.reshape(w.shape[0], -1)  # train mode would step: the other fit's optimizer stepped since)
            for i, (block, tracked) in enumerate(zip(w.split(reparam.split_sizes), reparam.sigma.tolist())):
                exact = torch.linalg.matrix_norm(block, ord=2).item()
                errors[module_name + (f".{i}" if len(reparam.split_sizes) > 1 else "")] = (exact - tracked) / exact
    for name, error in errors.items():
        assert float(last[f"diag/sigma_tracking_error/{name}"]) == pytest.approx(error, abs=1e-6), name
    assert float(last["diag/sigma_tracking_error/max"]) == pytest.approx(max(errors.values()), abs=1e-6)
    saved = np.load(tmp_path / "on" / "diagnostics.npz")
    assert saved["sigma_tracking_error"].shape == (4, len(errors))
    assert "sigma_tracking_error" not in np.load(tmp_path / "off" / "diagnostics.npz")
