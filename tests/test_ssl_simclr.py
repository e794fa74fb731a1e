"""The SimCLR family (sigma_repro.tasks.ssl), as FAMILIES.md asks of every family, so far.

Pieces against direct computations: NT-Xent against its formula written out here, the task's pairing
of the two views; the weighted kNN vote on a hand-made example; the linear probe on separable
features; neither evaluation moves the backbone (parameters, σReparam's u, v, σ, gradients, mode);
σReparam covers every matrix of the ViT backbone and, by design, none of the projection head; the
task's options refused before compute. Then ``task=simclr`` through the app with σReparam: the
summary's val/knn_acc and val/linear_acc are the final weights', recomputed from the checkpoint with
the kNN and probe written out here, and the diagnostics' entropy is a direct softmax of the final
model's attention on the probe batch.
"""

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from sigma_repro.data.images import DigitsDataModule
from sigma_repro.data.views import SimCLRViewsDataModule
from sigma_repro.diagnostics.callbacks import load_diagnostics
from sigma_repro.errors import ConfigError
from sigma_repro.models.vit import build_vit
from sigma_repro.optim import build_optimizer
from sigma_repro.reparam import apply_sigma_reparam, iter_sigma_reparam
from sigma_repro.tasks.ssl import SimCLRTask, extract_features, knn_predict, linear_probe_accuracy
from sigma_repro.train import build_model

from .conftest import CONF_DIR
from .helpers import computed_metrics, direct_entropy, final_model_and_data
from .test_diag_entropy import timm_manual_probs
from .test_train import only_run_dir, reference_and_killed_run, train

OPTIM = {"_target_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.05}
SCHEDULE = {"warmup_steps": 0, "decay": "cosine", "min_lr_ratio": 0.0}
DIGITS_VIEW = {"min_scale": 0.4, "hf_prob": 0.0, "cj_strength": 0.5, "random_gray_scale": 0.0, "gaussian_blur": 0.0}
# A fast SimCLR run: the family's default data, a 2-block ViT, 12 steps (one epoch of 192 images at 16),
# one validation at the end.
FAST = ["task=simclr", "logger=csv", "trainer.max_steps=12", "trainer.max_epochs=-1",
        "trainer.enable_progress_bar=false", "callbacks.diagnostics.every_n_steps=6",
        "callbacks.diagnostics.probe_size=8", "data.batch_size=16", "model.depth=2"]


def tiny_backbone(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build_vit(img_size=8, in_chans=1, num_classes=0, patch_size=2, embed_dim=32, depth=2, num_heads=2, **kwargs)


def simclr_task(model: nn.Module, **kwargs) -> SimCLRTask:
    return SimCLRTask(model, num_classes=10, optim=OPTIM, schedule=SCHEDULE, **kwargs)


# -- NT-Xent -----------------------------------------------------------------------------------------

def direct_nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> float:
    """SimCLR's loss written out: the 2B projections, L2-normalised; for each anchor i,
    -log(exp(s(i, partner) / τ) / Σ_{k ≠ i} exp(s(i, k) / τ)) with s the dot product; mean over anchors."""
    z = [v / np.linalg.norm(v) for v in np.concatenate([z0.double().numpy(), z1.double().numpy()])]
    n = len(z) // 2
    losses = []
    for i in range(2 * n):
        partner = i + n if i < n else i - n
        denominator = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(2 * n) if k != i)
        losses.append(-(float(z[i] @ z[partner]) / temperature - math.log(denominator)))
    return sum(losses) / len(losses)


def test_nt_xent_is_its_formula_at_the_configured_temperature():
    task = simclr_task(tiny_backbone(), temperature=0.3)
    torch.manual_seed(1)
    z0, z1 = torch.randn(5, 4), torch.randn(5, 4)
    assert task.criterion(z0, z1).item() == pytest.approx(direct_nt_xent(z0, z1, 0.3), rel=1e-6)
    # partners matter: pairing each projection with itself gives a much lower loss than random partners
    assert task.criterion(z0, z0 + 0.01).item() < direct_nt_xent(z0, z1, 0.3) - 1


def test_the_loss_pairs_view_i_of_the_first_batch_with_view_i_of_the_second():
    task = simclr_task(tiny_backbone(), temperature=0.5).eval()  # eval: BatchNorm per sample, no power step
    torch.manual_seed(2)
    v0, v1 = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    loss, logs = task.compute_loss([v0, v1], "train")
    with torch.no_grad():
        z0, z1 = (task.projection_head(task.model(v)) for v in (v0, v1))
    assert logs == {} and loss.item() == pytest.approx(direct_nt_xent(z0, z1, 0.5), rel=1e-5)
    assert z0.shape == (6, 64)  # projection_dim
    with pytest.raises(ConfigError, match="two views"):
        task.compute_loss([v0, v1, v0], "train")


# -- kNN ---------------------------------------------------------------------------------------------

def direct_knn(query: np.ndarray, bank: np.ndarray, labels: np.ndarray, *, k: int, temperature: float,
               num_classes: int) -> list[int]:
    """One query at a time: cosine similarity to every bank row, the k most similar, each adds
    exp(similarity / temperature) to its label's score; the best score's label (the first on ties)."""
    predictions = []
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    for q in query:
        sims = (bank @ (q / np.linalg.norm(q))).tolist()
        nearest = sorted(range(len(bank)), key=lambda j: -sims[j])[:k]
        scores = [0.0] * num_classes
        for j in nearest:
            scores[labels[j]] += math.exp(sims[j] / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (scores[c], -c)))
    return predictions


def test_knn_vote_is_weighted_by_similarity_on_a_hand_made_example():
    # unit vectors at angles (degrees): one bank vector of class 0 near the query, two of class 1 further
    angles, labels = [0.0, 60.0, 70.0, 180.0], [0, 1, 1, 2]
    bank = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles])
    query = torch.tensor([[1.0, 0.2]]) * 3.0  # 11.3 degrees; its length does not matter (cosine)
    s = [math.cos(math.radians(a - math.degrees(math.atan2(0.2, 1.0)))) for a in angles]
    # k=3: class 0 scores exp(s0/T), class 1 exp(s1/T) + exp(s2/T); at T=0.1 class 0 wins, at T=10
    # the vote is nearly a count and the two class-1 neighbours win
    assert math.exp(s[0] / 0.1) > math.exp(s[1] / 0.1) + math.exp(s[2] / 0.1)
    assert math.exp(s[0] / 10) < math.exp(s[1] / 10) + math.exp(s[2] / 10)
    for temperature, expected in ((0.1, 0), (10.0, 1)):
        got = knn_predict(query, bank, torch.tensor(labels), num_classes=3, k=3, temperature=temperature)
        assert got.tolist() == [expected]
    # k=1 is the nearest neighbour; k beyond the bank is the whole bank
    assert knn_predict(query, bank, torch.tensor(labels), num_classes=3, k=1, temperature=10.0).tolist() == [0]
    whole = knn_predict(query, bank, torch.tensor(labels), num_classes=3, k=50, temperature=0.07)
    assert whole.tolist() == direct_knn(query.numpy(), bank.numpy(), np.array(labels), k=4, temperature=0.07,
                                        num_classes=3)

    torch.manual_seed(3)
    bank, labels, queries = torch.randn(40, 5), torch.randint(0, 4, (40,)), torch.randn(12, 5)
    got = knn_predict(queries, bank, labels, num_classes=4, k=7, temperature=0.2)
    assert got.tolist() == direct_knn(queries.numpy(), bank.numpy(), labels.numpy(), k=7, temperature=0.2,
                                      num_classes=4)


# -- linear probe ------------------------------------------------------------------------------------

def test_linear_probe_scores_separable_features_and_a_known_wrong_label():
    rng = np.random.default_rng(0)
    centres = np.array([[-6.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    y_train = np.repeat(np.arange(3), 20)
    x_train = centres[y_train] + rng.normal(scale=0.5, size=(60, 2))
    x_val, y_val = centres[[0, 1, 2, 2]], np.array([0, 1, 2, 0])  # the last label is wrong on purpose
    result = linear_probe_accuracy((torch.tensor(x_train), torch.tensor(y_train)),
                                   (torch.tensor(x_val), torch.tensor(y_val)), c=1.0, max_iter=1000)
    assert result["accuracy"] == 0.75 and result["converged"] and result["iterations"] >= 1
    blown_up = torch.tensor(x_train).clone()
    blown_up[3, 1] = float("inf")
    nan = linear_probe_accuracy((blown_up, torch.tensor(y_train)), (torch.tensor(x_val), torch.tensor(y_val)),
                                c=1.0, max_iter=1000)
    assert math.isnan(nan["accuracy"])


# -- the evaluations never move the backbone -----------------------------------------------------

def test_knn_and_linear_probe_leave_the_backbone_untouched(tmp_path):
    """With σReparam and a power step pending (an optimizer has stepped since the last training read),
    a whole validation (kNN) and the final linear probe leave every parameter and buffer as it was,
    no gradient anywhere, and the task in train mode."""
    backbone = apply_sigma_reparam(tiny_backbone())
    task = simclr_task(backbone, knn_k=10)
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    task.compute_loss([torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)], "train")[0].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    data = SimCLRViewsDataModule(images="sigma_repro.data.images.DigitsDataModule", batch_size=128, view=DIGITS_VIEW)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (validated,) = trainer.validate(task, datamodule=data, verbose=False)
    final = task.final_evaluation(data, tmp_path)

    after = task.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, γ, u, v, σ, BatchNorm statistics
    assert all(p.grad is None for p in task.parameters())
    assert task.training and task.model.training
    assert 0.1 < validated["val/knn_acc"] <= 1 and 0.1 < final["metrics"]["val/linear_acc"] <= 1
    assert final["evaluation"]["linear_probe_train_images"] == 1437
    assert final["evaluation"]["linear_probe_val_images"] == 360

    features, labels = extract_features(task.model, data.val_dataloader(), torch.device("cpu"))
    assert features.shape == (360, 32) and not features.requires_grad and labels.shape == (360,)


# -- σReparam and the config -----------------------------------------------------------------------

def test_task_simclr_composes_and_sigma_reparam_covers_the_backbone_not_the_projection_head():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["task=simclr", "reparam=sigma"], return_hydra_config=True)
    assert (cfg.hydra.runtime.choices.model, cfg.hydra.runtime.choices.data) == ("vit_digits", "digits_views")
    assert cfg.task.gather_distributed is True and cfg.task.linear_probe is True
    data = instantiate(cfg.data, seed=0)
    model, converter = build_model(cfg, data)
    task = instantiate(cfg.task, _partial_=True, _convert_="all")(
        model=model, **data.task_kwargs, optim=OmegaConf.to_container(cfg.optim, resolve=True),
        schedule=OmegaConf.to_container(cfg.schedule, resolve=True), **converter.optimizer_options(), seed=0)
    assert task.headline_metric == "val/linear_acc" and task.higher_is_better

    # every matrix of the backbone: the patch embedding and q/k/v (fused), out, fc1, fc2 of each block
    depth = cfg.model.depth
    expected = ["patch_embed.proj.weight"] + [f"blocks.{i}.{m}.weight" for i in range(depth)
                                              for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    reparams = dict(iter_sigma_reparam(task.model))
    assert sorted(reparams) == sorted(expected)
    modules = dict(task.model.named_modules())
    for name, reparam in reparams.items():
        weight = modules[name.removesuffix(".weight")].parametrizations.weight.original.detach()
        sigma = torch.linalg.matrix_norm(weight.flatten(1).double(), ord=2)
        assert reparam.sigma.item() == pytest.approx(sigma.item(), rel=1e-5)
    # not the norms, embeddings or the class token; the classifier is an Identity (num_classes=0)
    assert isinstance(task.model.head, nn.Identity)
    # the projection head is left out on purpose (see SimCLRTask's docstring), and it trains
    assert list(iter_sigma_reparam(task.projection_head)) == []
    head_linears = [m for m in task.projection_head.modules() if isinstance(m, nn.Linear)]
    assert len(head_linears) == 2 and not any(parametrize.is_parametrized(m) for m in head_linears)
    optimized = {id(p) for group in build_optimizer(task, task.hparams.optim).param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in task.projection_head.parameters())


def test_bad_simclr_options_are_refused_before_compute():
    for options, message in (({"temperature": 0.0}, "temperature must be a positive number"),
                             ({"knn_k": 0}, "knn_k must be a whole number >= 1"),
                             ({"knn_temperature": -1.0}, "knn_temperature must be a positive number"),
                             ({"projection_layers": 1}, "projection_layers must be a whole number >= 2"),
                             ({"linear_probe": "yes"}, "linear_probe must be true or false")):
        with pytest.raises(ConfigError, match=message):
            simclr_task(tiny_backbone(), **options)
    with pytest.raises(ConfigError, match="has no num_features"):
        simclr_task(nn.Linear(4, 4))
    task = simclr_task(tiny_backbone())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(ConfigError, match="needs a views DataModule .* found DigitsDataModule"):
        trainer.validate(task, datamodule=DigitsDataModule(batch_size=64), verbose=False)


# -- through the app -------------------------------------------------------------------------------

def test_simclr_run_reports_the_final_weights_knn_and_linear_probe_accuracy(tmp_path):
    train(tmp_path, *FAST, "reparam=sigma")
    run_dir = only_run_dir(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 12
    assert summary["headline_metric"] == {"name": "val/linear_acc", "higher_is_better": True}
    metrics = summary["metrics"]
    assert math.isfinite(metrics["train/loss"]) and metrics["train/samples_per_s"] > 0
    assert summary["evaluation"]["linear_probe_converged"] is True

    # the final weights' kNN and linear-probe accuracy, recomputed from the checkpoint
    model, data = final_model_and_data(run_dir)
    assert len(list(iter_sigma_reparam(model))) == 1 + 4 * 2
    with torch.no_grad():
        train_x, train_y = (torch.cat(t) for t in zip(*((model(x), y) for x, y in data.plain_train_dataloader())))
        val_x, val_y = (torch.cat(t) for t in zip(*((model(x), y) for x, y in data.val_dataloader())))
    task_cfg = summary["config"]["task"]
    knn = direct_knn(val_x.numpy(), train_x.numpy(), train_y.numpy(), k=task_cfg["knn_k"],
                     temperature=task_cfg["knn_temperature"], num_classes=10)
    assert metrics["val/knn_acc"] == pytest.approx(np.mean(np.array(knn) == val_y.numpy()), abs=1e-6)
    from sklearn.linear_model import LogisticRegression

    mean, std = train_x.double().mean(0), train_x.double().std(0, unbiased=False)
    probe = LogisticRegression(C=task_cfg["linear_probe_c"], max_iter=1000).fit(
        ((train_x - mean) / std).numpy(), train_y.numpy())
    linear = np.mean(probe.predict(((val_x - mean) / std).numpy()) == val_y.numpy())
    assert metrics["val/linear_acc"] == pytest.approx(linear, abs=1e-6)

    # the diagnostics' last probe (the final weights) is a direct softmax of each attention's q·kᵀ
    images, _ = data.probe_batch(8)
    saved = load_diagnostics(run_dir / "diagnostics.npz")
    probs = timm_manual_probs(model, images)
    assert saved["layers"].tolist() == list(probs) and saved["steps"][-1] == 12
    for i, p in enumerate(probs.values()):
        torch.testing.assert_close(torch.as_tensor(saved["attention_entropy"][-1, i]).double(), direct_entropy(p),
                                   atol=1e-5, rtol=0)


@pytest.mark.slow
def test_simclr_resumes_exactly_after_a_hard_kill_mid_epoch(tmp_path):
    # 6 steps an epoch (96 images at 16): killed in the middle of the third epoch, after two validations;
    # dropout on, so the resumed run must also draw the same masks.
    common = [*FAST, "trainer.deterministic=true", "trainer.max_steps=16", "checkpoint_every_n_steps=5",
              "data.images_per_epoch=96", "model.drop_rate=0.1"]
    ref_dir, run_dir = reference_and_killed_run(tmp_path, common, kill_step=13)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    train(tmp_path / "b", *common, f"hydra.run.dir={run_dir}")
    ref, got = (json.loads((d / "summary.json").read_text()) for d in (ref_dir, run_dir))
    assert got["launches"] == 2 and computed_metrics(got) == computed_metrics(ref)
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for d in (ref_dir, run_dir))
    assert any(k.startswith("projection_head.") for k in a)  # the head and its BatchNorm statistics resume too
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
