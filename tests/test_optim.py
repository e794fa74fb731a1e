"""Parameter groups, optimizers from config and the warmup/cosine schedule."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from sigma_repro.errors import ConfigError
from sigma_repro.models.vit import build_vit
from sigma_repro.optim import WarmupSchedule, build_optimizer, build_scheduler, parameter_groups
from sigma_repro.reparam import apply_sigma_reparam

from .conftest import CONF_DIR


def tiny_vit():
    torch.manual_seed(0)
    return build_vit(img_size=8, in_chans=1, num_classes=10, patch_size=2, embed_dim=16, depth=2, num_heads=2)


def test_groups_split_matrices_from_vectors_and_tokens():
    model = tiny_vit()
    groups = {g["name"]: g for g in parameter_groups(model, lr=0.1, weight_decay=0.05)}
    named = dict(model.named_parameters())
    expect_decay = {n for n, p in named.items() if p.ndim >= 2 and n not in ("pos_embed", "cls_token")}
    got_decay = {n for n, p in named.items() if any(p is q for q in groups["decay"]["params"])}
    assert got_decay == expect_decay
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert "gamma" not in groups
    assert sum(len(g["params"]) for g in groups.values()) == len(named)


@pytest.mark.parametrize("gamma_weight_decay", [False, True])
def test_gamma_group_has_its_own_lr_and_decay_switch(gamma_weight_decay):
    model = apply_sigma_reparam(tiny_vit())
    groups = {g["name"]: g for g in parameter_groups(
        model, lr=0.1, weight_decay=0.05, gamma_lr_mult=0.1, gamma_weight_decay=gamma_weight_decay)}
    n_gamma = sum(1 for n, _ in model.named_parameters() if n.endswith(".gamma"))
    assert n_gamma > 0 and len(groups["gamma"]["params"]) == n_gamma
    assert groups["gamma"]["lr"] == pytest.approx(0.01)
    assert groups["gamma"]["weight_decay"] == (0.05 if gamma_weight_decay else 0.0)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "lars", "lamb"])
def test_every_optimizer_config_builds(name):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"optim={name}"])
    opt = build_optimizer(tiny_vit(), dict(cfg.optim))
    assert type(opt).__name__.lower() == name
    assert all(g["lr"] == pytest.approx(cfg.optim.lr) for g in opt.param_groups)


def test_warmup_cosine_values():
    s = WarmupSchedule(total_steps=110, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1)
    assert WarmupSchedule(total_steps=5, decay="constant")(3) == 1.0


def test_scheduler_drives_every_group():
    model = apply_sigma_reparam(tiny_vit())
    opt = build_optimizer(model, {"_target_": "torch.optim.SGD", "lr": 1.0}, gamma_lr_mult=0.5)
    sched = build_scheduler(opt, {"warmup_steps": 4, "decay": "constant", "min_lr_ratio": 1.0}, total_steps=20)
    lrs = []
    for _ in range(6):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [row[0] for row in lrs] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert [row[-1] for row in lrs] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])


def test_warmup_longer_than_training_is_a_clear_error():
    with pytest.raises(ConfigError, match="warmup_steps=100 is not below the run's 50"):
        WarmupSchedule(total_steps=50, warmup_steps=100)


def test_lars_adapts_matrices_even_without_weight_decay():
    model = tiny_vit()
    opt = build_optimizer(model, {"_target_": "timm.optim.Lars", "lr": 1.0, "weight_decay": 0.0, "momentum": 0.0})
    flags = {g["name"]: g["always_adapt"] for g in opt.param_groups}
    assert flags == {"decay": True, "no_decay": False}
    w = model.patch_embed.proj.weight
    w.grad = torch.ones_like(w)
    before = w.detach().clone()
    opt.step()
    # trust ratio: step = lr * trust_coeff * ||w|| / ||g|| * g
    expected = before - 1e-3 * before.norm() / w.grad.norm() * w.grad
    assert torch.allclose(w.detach(), expected, atol=1e-6)
