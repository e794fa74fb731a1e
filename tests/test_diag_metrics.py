"""Entropy lower bound, rank-collapse metrics and spectral norms against independent computations."""

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sigma_repro.diagnostics import (
    attention_logit_norms,
    entropy_lower_bound,
    rank_collapse,
    reparam_gammas,
    reparam_sigmas,
    residual_ratio,
    spectral_norms,
    token_cosine,
)
from sigma_repro.reparam import apply_sigma_reparam
from tests.helpers import ProjAttention, per_head_logit_norms


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


def test_logit_norms_match_explicit_per_head_products():
    torch.manual_seed(4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=16,
                                         depth=1, num_heads=2, qkv_bias=True)
            self.packed = nn.MultiheadAttention(12, 3)
            self.separate = nn.MultiheadAttention(16, 4, kdim=6, vdim=6)
            self.proj = ProjAttention(16, 4, kdim=8, scale=0.3)

    model = Model()
    for m in model.modules():  # larger than timm's init, so that the products are far from 0
        if isinstance(m, (nn.Linear, nn.MultiheadAttention)):
            for p in m.parameters():
                nn.init.normal_(p)
    with torch.no_grad():
        model.proj.q_proj.weight[1:4] = 0  # head 0 of W_Q has rank 1: the explicit-product path
    got = attention_logit_norms(model)
    qkv = model.vit.blocks[0].attn.qkv.weight
    w_q, w_k, _ = model.packed.in_proj_weight.chunk(3)
    expected = {
        "vit.blocks.0.attn": per_head_logit_norms(qkv[:16], qkv[16:32], 2, 8 ** -0.5),
        "packed": per_head_logit_norms(w_q, w_k, 3, 4 ** -0.5),
        "separate": per_head_logit_norms(model.separate.q_proj_weight, model.separate.k_proj_weight, 4, 4 ** -0.5),
        "proj": per_head_logit_norms(model.proj.q_proj.weight, model.proj.k_proj.weight, 4, 0.3),
    }
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == torch.float32 and got[name].shape == value.shape
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=0)


def test_logit_norms_use_the_sigma_reparam_weights():
    torch.manual_seed(5)
    vit = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    w = vit.blocks[0].attn.qkv.weight.detach().clone()
    apply_sigma_reparam(vit, gamma_init=1.0)  # Ŵ = W / σ(W): σ is exact at apply time
    u = vit.blocks[0].attn.qkv.parametrizations.weight[0].u.clone()
    w_hat = w / svd_norm(w)
    got = attention_logit_norms(vit)["blocks.0.attn"]
    torch.testing.assert_close(got, per_head_logit_norms(w_hat[:16], w_hat[16:32], 2, 8 ** -0.5), rtol=1e-5, atol=0)
    assert torch.equal(vit.blocks[0].attn.qkv.parametrizations.weight[0].u, u)  # no power step
    # nor after an optimizer-like in-place update, on a model in train mode: σReparam steps at the
    # first training-mode read of a changed W, and reading is not training
    qkv = vit.blocks[0].attn.qkv.parametrizations.weight
    with torch.no_grad():
        qkv.original.mul_(1.5)
    vit.train()
    buffers = {n: b.clone() for n, b in vit.named_buffers()}
    torch.testing.assert_close(attention_logit_norms(vit)["blocks.0.attn"], got, rtol=1e-5, atol=0)  # Ŵ: W/σ(W)
    assert all(torch.equal(b, buffers[n]) for n, b in vit.named_buffers()) and vit.training
    with pytest.raises(ValueError, match="no supported attention module"):
        attention_logit_norms(nn.Linear(2, 2))


def hooked_outputs(model, names, *args, **kwargs):
    """Outputs of the named modules in one eval no-grad forward, by hooks of the test's own."""
    outputs, handles = {}, []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out)))
    model.eval()
    with torch.no_grad():
        model(*args, **kwargs)
    for h in handles:
        h.remove()
    return outputs


def test_rank_collapse_per_timm_block_matches_metrics_on_hooked_outputs():
    torch.manual_seed(6)
    vit = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=16, depth=3, num_heads=2)
    vit.train()
    x = torch.randn(4, 1, 8, 8)
    got = rank_collapse(vit, x)
    assert list(got) == ["blocks.0", "blocks.1", "blocks.2"]  # not blocks.0.attn & co: outermost matches
    assert vit.training and all(not m._forward_hooks and not m._forward_pre_hooks for m in vit.modules())
    for name, out in hooked_outputs(vit, got, x).items():
        assert got[name]["token_cosine"] == pytest.approx(float(token_cosine(out)), abs=1e-6)
        assert got[name]["residual_ratio"] == pytest.approx(float(residual_ratio(out)), abs=1e-6)
    assert list(rank_collapse(vit, x, blocks="blocks.2")) == ["blocks.2"]
    with pytest.raises(ValueError, match="encoder.layers"):
        rank_collapse(vit, x, blocks=["encoder.layers.*"])


def test_rank_collapse_is_mask_aware_for_sequence_first_mha_stacks():
    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0)  # (T, B, E)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    x = torch.randn(6, 3, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = pad[2, 2:] = True
    x[pad.T] = 50.0  # padded positions must not count
    got = rank_collapse(encoder, x, src_key_padding_mask=pad)
    assert list(got) == ["layers.0", "layers.1"]
    for name, out in hooked_outputs(encoder, got, x, src_key_padding_mask=pad).items():
        tokens = out.transpose(0, 1)  # (B, T, E)
        assert got[name]["token_cosine"] == pytest.approx(float(token_cosine(tokens, ~pad)), abs=1e-6)
        assert got[name]["residual_ratio"] == pytest.approx(float(residual_ratio(tokens, ~pad)), abs=1e-6)
        assert got[name]["token_cosine"] != pytest.approx(float(token_cosine(tokens)), abs=1e-3)


class TappedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.cross_attn = ProjAttention(16, 2), ProjAttention(16, 2)

    def forward(self, x, memory, pad, memory_pad):
        x = x + self.self_attn(x, key_padding_mask=pad)
        return x + self.cross_attn(x, memory, key_padding_mask=memory_pad)


class TappedDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList([TappedBlock(), TappedBlock()])

    def forward(self, x, memory, pad, memory_pad):
        for block in self.decoder.layers:
            x = block(x, memory, pad, memory_pad)
        return x


def test_rank_collapse_takes_the_padding_of_the_self_attention_in_tapped_blocks():
    torch.manual_seed(8)
    model = TappedDecoder()
    x, memory = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True
    memory_pad = torch.zeros(3, 5, dtype=torch.bool)
    memory_pad[0, 1:] = True  # same length as x: only the self-attention's mask is about x's tokens
    args = (x, memory, pad, memory_pad)
    got = rank_collapse(model, *args, blocks="decoder.layers.*")
    assert list(got) == ["decoder.layers.0", "decoder.layers.1"]
    for name, out in hooked_outputs(model, got, *args).items():
        assert got[name]["token_cosine"] == pytest.approx(float(token_cosine(out, ~pad)), abs=1e-6)
        assert got[name]["residual_ratio"] == pytest.approx(float(residual_ratio(out, ~pad)), abs=1e-6)
