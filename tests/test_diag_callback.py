"""AttentionDiagnostics in a real lightning.Trainer on CPU: logged keys, saved files, resume."""

import csv

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from sigma_repro.diagnostics import attention_entropy
from sigma_repro.diagnostics.callbacks import (
    AttentionDiagnostics,
    plot_entropy_comparison,
    plot_entropy_curves,
    save_history,
)
from sigma_repro.reparam import apply_sigma_reparam


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


def fit(root, max_steps, diagnostics, ckpt_path=None):
    torch.manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))), batch_size=8)
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
    rows = [r for r in logged_rows(tmp_path) if r.get("diag/attn_entropy/min")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]  # log_every_n_steps=50 does not thin them
    for key in ["diag/attn_entropy/L00", "diag/attn_entropy/L01", "diag/attn_entropy/L01/H01",
                "diag/attn_entropy_norm/L00", "diag/sigma/blocks.0.attn.qkv", "diag/gamma/blocks.1.mlp.fc2",
                "diag/sigma/patch_embed.proj"]:
        assert rows[-1][key], key
    last = rows[-1]
    assert float(last["diag/attn_entropy/min"]) == min(float(last["diag/attn_entropy/L00"]),
                                                       float(last["diag/attn_entropy/L01"]))

    # the last probe is attention_entropy of the trained model on the probe batch
    final = attention_entropy(task.model, task.probe_x[:4])
    assert float(last["diag/attn_entropy/L01/H00"]) == pytest.approx(float(final["blocks.1.attn"][0]), abs=1e-6)

    saved = np.load(tmp_path / "diagnostics.npz")
    assert saved["steps"].tolist() == [0, 2, 4, 5]
    assert saved["entropy"].shape == (4, 2, 2) and saved["entropy_norm"].shape == (4, 2, 2)
    assert saved["layers"].tolist() == ["blocks.0.attn", "blocks.1.attn"]
    assert saved["sigma"].shape == (4, len(saved["sigma_names"])) and "blocks.0.attn.qkv" in saved["sigma_names"]
    assert saved["gamma"].shape == (4, len(saved["gamma_names"]))
    assert np.allclose(saved["entropy"][0], np.log(17), atol=0.5)  # near log T at init
    assert (tmp_path / "plots" / "attention_entropy.png").stat().st_size > 0

    # resume from the step-5 checkpoint to step 8: the history continues on the same grid. The
    # end-of-training probe at step 5 came after that checkpoint was written, so it is not in it.
    resumed = AttentionDiagnostics(every_n_steps=2, probe_size=4)
    fit(tmp_path, 8, resumed, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert resumed.history["steps"] == [0, 2, 4, 6, 8]
    assert resumed.history["entropy"][:3] == diag.history["entropy"][:3]
    assert np.load(tmp_path / "diagnostics.npz")["entropy"].shape == (5, 2, 2)


def test_state_dict_round_trip_and_plots_from_files(tmp_path):
    diag = AttentionDiagnostics(every_n_steps=3)
    diag.history.update(steps=[0, 3], layers=["a", "b"], entropy=[[[2.0, 2.1], [2.2, 2.3]], [[1.0, 1.1], [0.5, 0.6]]],
                        entropy_norm=[[[0.9, 0.9], [0.9, 0.9]], [[0.5, 0.5], [0.2, 0.3]]])
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
    assert (tmp_path / "one.png").stat().st_size > 0 and (tmp_path / "both.png").stat().st_size > 0
