"""Admin's output change: analytic value on a linear map, exact restoration, what is perturbed."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sigma_repro.diagnostics import OutputChange, output_change
from sigma_repro.diagnostics.amplification import perturbed_parameters
from sigma_repro.reparam import apply_sigma_reparam


def test_linear_map_change_equals_the_analytic_value():
    """Input rows c_b·e_b read one column of δ each: every output element moves by exactly
    ±ε·c_b whatever the signs, so E|ΔF|² = ε² · mean_b(c_b²); the bias is not perturbed."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    scales = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    x = torch.diag(scales)  # (5, 5)
    eps = 1e-3
    got = output_change(model, x, eps=eps, n_samples=4, seed=7)
    assert isinstance(got, OutputChange)
    assert got.change == pytest.approx(eps**2 * float(scales.square().mean()), rel=1e-9)
    with torch.no_grad():
        clean = model(x)
    assert got.relative == pytest.approx(got.change / float(clean.square().mean()), rel=1e-12)
    assert float(got) == got.change


def test_weights_buffers_and_modes_are_restored_exactly():
    torch.manual_seed(1)
    vit = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=16, depth=2,
                            num_heads=2, drop_rate=0.5)
    apply_sigma_reparam(vit)
    vit.train()
    vit.blocks[1].eval()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    x = torch.randn(3, 1, 8, 8)
    first = output_change(vit, x, seed=3)
    after = vit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # σReparam's u, v, σ included
    assert vit.training and vit.blocks[0].training and not vit.blocks[1].training
    assert output_change(vit, x, seed=3) == first  # eval mode: dropout off, same signs, same value
    assert output_change(vit, x, seed=4) != first
    assert 0 < first.relative < 1


class Admin(nn.Module):
    """Post-LN sublayer with Admin's ω, plus a residual τ and ReZero α: none of them is perturbed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.omega = nn.Parameter(torch.full((4,), 1.5))
        self.tau = nn.Parameter(torch.tensor(0.5))
        self.alpha = nn.Parameter(torch.tensor(0.1))
        self.out = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.out(self.norm(self.omega * x + self.alpha * self.tau * self.fc(x))), "extra"


def test_only_weights_are_perturbed_and_by_exactly_eps():
    torch.manual_seed(2)
    model = Admin().double()
    apply_sigma_reparam(model, include=["out"])  # its γ is a stabiliser scale too; its raw W is a weight
    assert set(perturbed_parameters(model)) == {"fc.weight", "out.parametrizations.weight.original"}
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen = []
    model.register_forward_pre_hook(
        lambda m, args: seen.append({name: p.detach().clone() for name, p in m.named_parameters()}))
    eps = 1e-4
    output_change(model, torch.randn(6, 4, dtype=torch.float64), eps=eps, n_samples=2,
                  loss_fn=lambda out: out[0])
    assert len(seen) == 3  # the clean forward, then one per sample
    assert all(torch.equal(seen[0][n], originals[n]) for n in originals)
    for sample in seen[1:]:
        for name, value in sample.items():
            delta = value - originals[name]
            if name in ("fc.weight", "out.parametrizations.weight.original"):
                torch.testing.assert_close(delta.abs(), torch.full_like(delta, eps), atol=1e-15, rtol=0)
            else:
                assert torch.equal(delta, torch.zeros_like(delta)), name
    assert not torch.equal(seen[1]["fc.weight"], seen[2]["fc.weight"])  # independent signs per sample
    assert all(torch.equal(p, originals[n]) for n, p in model.named_parameters())


def test_bad_calls_are_clear_errors():
    with pytest.raises(ValueError, match="loss_fn"):
        output_change(Admin(), torch.randn(2, 4))  # the model returns a tuple
    with pytest.raises(ValueError, match="eps > 0"):
        output_change(nn.Linear(2, 2), torch.randn(1, 2), eps=0.0)
    with pytest.raises(ValueError, match="no weight to perturb"):
        output_change(nn.LayerNorm(3), torch.randn(2, 3))
