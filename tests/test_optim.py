"""Parameter groups, optimizers from config (RAdam against a hand computation) and the schedules
(warmup/cosine, and inverse_sqrt against fairseq's formula)."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

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


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "lars", "lamb", "radam"])
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


def fairseq_inverse_sqrt_lr(peak: float, warmup: int, num_updates: int) -> float:
    """fairseq's InverseSquareRootSchedule.step_update(num_updates) with warmup_init_lr at its default (0):
    lr_step = peak / warmup, decay_factor = peak * warmup**0.5."""
    if num_updates < warmup:
        return 0.0 + num_updates * (peak - 0.0) / warmup
    return peak * warmup**0.5 * num_updates**-0.5


@pytest.mark.parametrize("warmup", [1, 8, 8000])
def test_inverse_sqrt_is_fairseq_one_update_earlier(warmup):
    """fairseq uses the lr set after ``num_updates`` updates for the next one, so its first update runs at
    lr 0; ours gives step s (0-based) the lr fairseq sets after s + 1 updates."""
    s = WarmupSchedule(total_steps=10**6, warmup_steps=warmup, decay="inverse_sqrt")
    for step in [0, 1, 2, warmup - 2, warmup - 1, warmup, warmup + 1, 4 * warmup - 1, 10 * warmup, 123_456]:
        if step >= 0:  # warmup 1: step -1 is not a step
            assert 1e-3 * s(step) == pytest.approx(fairseq_inverse_sqrt_lr(1e-3, warmup, step + 1), rel=1e-12), step


def test_inverse_sqrt_by_hand():
    s = WarmupSchedule(total_steps=10**6, warmup_steps=8000, decay="inverse_sqrt")
    assert s(0) == pytest.approx(1 / 8000) and s(3999) == pytest.approx(0.5) and s(7999) == 1.0
    assert s(31999) == pytest.approx(0.5) and s(799_999) == pytest.approx(0.1)  # sqrt(8000/32000), sqrt(8000/800000)
    no_warmup = WarmupSchedule(total_steps=1000, warmup_steps=0, decay="inverse_sqrt")  # ours: peak, then sqrt(1/n)
    assert [no_warmup(k) for k in (0, 3, 99, 399)] == pytest.approx([1.0, 0.5, 0.1, 0.05])
    assert all(no_warmup(k) == WarmupSchedule(total_steps=1000, warmup_steps=1, decay="inverse_sqrt")(k)
               for k in range(50))


def test_unknown_decay_lists_the_known_ones():
    with pytest.raises(ConfigError, match="schedule.decay must be one of 'cosine', 'constant', 'inverse_sqrt', got 'linear'"):
        WarmupSchedule(total_steps=10, decay="linear")


def radam_by_hand(p0: torch.Tensor, grads: list[torch.Tensor], lr: float, beta1: float, beta2: float,
                  eps: float) -> torch.Tensor:
    """RAdam (Liu et al. 2020, Algorithm 2), written out: bias-corrected first moment; the adaptive step
    only once the SMA length rho_t exceeds 5, scaled by the rectification term r_t."""
    p, m, v = p0.clone().double(), torch.zeros_like(p0).double(), torch.zeros_like(p0).double()
    rho_inf = 2 / (1 - beta2) - 1
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t)
        rho = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        if rho > 5:
            v_hat = (v / (1 - beta2**t)).sqrt()
            r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            p = p - lr * r * m_hat / (v_hat + eps)
        else:
            p = p - lr * m_hat
    return p


def test_radam_from_config_is_admin_s_and_steps_as_the_paper_writes():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["optim=radam", "schedule=inverse_sqrt"])
    assert dict(cfg.schedule) == {"warmup_steps": 4000, "decay": "inverse_sqrt"}
    weight = nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 0.25]]))
    module = nn.Module()
    module.weight = weight
    opt = build_optimizer(module, dict(cfg.optim))
    assert isinstance(opt, torch.optim.RAdam) and tuple(opt.defaults["betas"]) == (0.9, 0.98) and opt.defaults["lr"] == 1e-3
    torch.manual_seed(0)
    grads = [torch.randn(2, 2) for _ in range(12)]  # with beta2 0.98 the adaptive step starts at step 7 (rho_7 > 5)
    p0 = weight.detach().clone()
    for g in grads:
        weight.grad = g.clone()
        opt.step()
    expected = radam_by_hand(p0, grads, lr=1e-3, beta1=0.9, beta2=0.98, eps=1e-8)
    assert torch.allclose(weight.detach().double(), expected, rtol=0, atol=1e-6)  # float32 parameters
    # the betas matter here: with Adam's default beta2 0.999 the weights end 5e-4 away
    assert not torch.allclose(expected, radam_by_hand(p0, grads, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8), atol=1e-4)


def test_inverse_sqrt_scheduler_drives_the_optimizer():
    model = apply_sigma_reparam(tiny_vit())
    opt = build_optimizer(model, {"_target_": "torch.optim.RAdam", "lr": 1.0, "betas": [0.9, 0.98]}, gamma_lr_mult=0.5)
    sched = build_scheduler(opt, {"warmup_steps": 4, "decay": "inverse_sqrt"}, total_steps=100)
    lrs = []
    for _ in range(9):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    expected = [fairseq_inverse_sqrt_lr(1.0, 4, n) for n in range(1, 10)]  # 0.25 ... 1, sqrt(4/5) ... sqrt(4/9)
    assert [row[0] for row in lrs] == pytest.approx(expected)
    assert [row[-1] for row in lrs] == pytest.approx([0.5 * e for e in expected])
