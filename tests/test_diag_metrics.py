"""Entropy lower bound, rank-collapse metrics and spectral norms against independent computations."""

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sigma_repro.diagnostics import (
    entropy_lower_bound,
    reparam_gammas,
    reparam_sigmas,
    residual_ratio,
    spectral_norms,
    token_cosine,
)
from sigma_repro.reparam import apply_sigma_reparam


@pytest.mark.parametrize("s, T, expected", [
    (1.0, 197, 5.2782), (3.0, 197, 5.0949), (10.0, 197, 0.0949), (10.0, 64, 0.0292), (3.0, 16, 1.7675),
])
def test_bound_reference_values(s, T, expected):
    assert entropy_lower_bound(s, T) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("s, T", [(0.5, 2), (1.0, 197), (3.0, 16), (10.0, 64)])
def test_bound_is_attained_by_one_raised_logit(s, T):
    logits = torch.zeros(T, dtype=torch.float64)
    logits[0] = s * math.sqrt(T / (T - 1))
    logp = logits.log_softmax(0)
    assert float(-(logp.exp() * logp).sum()) == pytest.approx(entropy_lower_bound(s, T), abs=1e-12)


def test_bound_holds_for_random_attention_and_broadcasts_tensors():
    torch.manual_seed(0)
    T, d = 12, 8
    for gain in (0.3, 1.0, 3.0):
        X = torch.randn(T, d, dtype=torch.float64)
        W_q, W_k = gain * torch.randn(d, d, dtype=torch.float64), gain * torch.randn(d, d, dtype=torch.float64)
        logits = X @ W_k @ W_q.T @ X.T
        s = torch.linalg.matrix_norm(W_k @ W_q.T, 2) * torch.linalg.matrix_norm(X @ X.T, 2)
        p = logits.softmax(-1)
        assert (-torch.xlogy(p, p).sum(-1) >= entropy_lower_bound(s, T)).all()

    values = entropy_lower_bound(torch.tensor([0.0, 1.0, 3.0]), torch.tensor([[197], [16]]))
    assert values.shape == (2, 3) and values.dtype == torch.float64
    assert values[0, 0] == pytest.approx(math.log(197)) and values[1, 2] == pytest.approx(1.7675, abs=1e-4)
    with pytest.raises(ValueError, match="T >= 2"):
        entropy_lower_bound(1.0, 1)


def direct_token_cosine(x, mask):
    out = []
    for seq, valid in zip(x, mask):
        tokens = seq[valid]
        n = len(tokens)
        if n >= 2:
            cos = torch.nn.functional.cosine_similarity(tokens[:, None], tokens[None], dim=-1)  # (n, n)
            out.append((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
    return torch.stack(out).mean()


def direct_residual_ratio(x, mask):
    out = []
    for seq, valid in zip(x, mask):
        tokens = seq[valid]
        out.append((tokens - tokens.mean(0)).norm() / tokens.norm())
    return torch.stack(out).mean()


def test_rank_metrics_match_pairwise_computation_with_padding():
    torch.manual_seed(1)
    x = torch.randn(4, 7, 5) + torch.randn(4, 1, 5)  # a shared component: cosines well above 0
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    mask[3, 1:] = False  # one valid token: no pair, left out of the cosine mean
    x[~mask] = 100.0  # padding must not leak in
    torch.testing.assert_close(token_cosine(x, mask), direct_token_cosine(x, mask), atol=1e-6, rtol=0)
    torch.testing.assert_close(residual_ratio(x, mask), direct_residual_ratio(x, mask), atol=1e-6, rtol=0)
    full = torch.ones(4, 7, dtype=torch.bool)
    torch.testing.assert_close(token_cosine(x), direct_token_cosine(x, full), atol=1e-6, rtol=0)


def test_rank_metrics_at_full_collapse():
    collapsed = torch.randn(2, 1, 6).expand(2, 9, 6) * torch.rand(2, 9, 1).add(0.5)  # parallel tokens
    assert float(token_cosine(collapsed)) == pytest.approx(1.0, abs=1e-5)
    same = torch.randn(2, 1, 6).expand(2, 9, 6)
    assert float(residual_ratio(same)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="bool"):
        token_cosine(same, mask=torch.ones(2, 9))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.conv = nn.Conv2d(3, 5, 3)
        self.depthwise = nn.Conv1d(4, 4, 3, groups=4)
        self.attn = nn.MultiheadAttention(8, 2)
        self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
        self.embed = nn.Embedding(10, 8)  # not a matrix σReparam covers: not reported


def svd_norm(weight):
    return float(torch.linalg.svdvals(weight.detach().reshape(weight.shape[0], -1))[0])


def test_spectral_norms_of_a_plain_model_are_exact():
    torch.manual_seed(2)
    model = Plain()
    norms = spectral_norms(model)
    expected = {
        "fc.weight": model.fc.weight, "conv.weight": model.conv.weight, "depthwise.weight": model.depthwise.weight,
        "attn.in_proj_weight": model.attn.in_proj_weight, "attn.out_proj.weight": model.attn.out_proj.weight,
        "cross.q_proj_weight": model.cross.q_proj_weight, "cross.k_proj_weight": model.cross.k_proj_weight,
        "cross.v_proj_weight": model.cross.v_proj_weight, "cross.out_proj.weight": model.cross.out_proj.weight,
    }
    assert set(norms) == set(expected)
    for name, weight in expected.items():
        assert norms[name] == pytest.approx(svd_norm(weight), rel=1e-5)
    assert reparam_sigmas(model) == {} and reparam_gammas(model) == {}


def test_spectral_norms_report_sigma_reparam_per_split_and_exact_elsewhere():
    torch.manual_seed(3)
    vit = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    qkv = vit.blocks[0].attn.qkv.weight.detach().clone()
    head = vit.head.weight.detach().clone()
    apply_sigma_reparam(vit, qkv="separate", exclude=["head"])

    sigmas, gammas, norms = reparam_sigmas(vit), reparam_gammas(vit), spectral_norms(vit)
    for i, block in enumerate(qkv.split(16)):  # σ is exact at apply time (SVD init), γ = σ
        assert sigmas[f"blocks.0.attn.qkv.weight.{i}"] == pytest.approx(svd_norm(block), rel=1e-5)
        assert gammas[f"blocks.0.attn.qkv.weight.{i}"] == pytest.approx(svd_norm(block), rel=1e-5)
    assert "blocks.0.attn.qkv.weight" not in sigmas and "patch_embed.proj.weight" in sigmas
    assert set(gammas) == set(sigmas) and "head.weight" not in sigmas
    assert norms["head.weight"] == pytest.approx(svd_norm(head), rel=1e-5)
    assert set(norms) == set(sigmas) | {"head.weight"}

    stats = nn.Sequential(nn.Linear(4, 4))
    apply_sigma_reparam(stats, stats_only=True)
    assert list(reparam_sigmas(stats)) == ["0.weight"] and reparam_gammas(stats) == {}
