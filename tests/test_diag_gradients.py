"""attention_grad_norms against autograd on a functional re-implementation, and Noci et al.'s claim
that rank-collapsed input leaves W_Q and W_K without gradient while W_V keeps one."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sigma_repro.diagnostics import attention_grad_norms
from sigma_repro.reparam import apply_sigma_reparam
from tests.helpers import ProjAttention


def reference_attention(x, context, w, heads, scale):
    """Multi-head attention from separate leaf matrices w = {q, k, v, o, bq, bk, bv, bo}."""
    (B, Tq, _), Tk = x.shape, context.shape[1]
    q = F.linear(x, w["q"], w["bq"]).view(B, Tq, heads, -1).transpose(1, 2)
    k = F.linear(context, w["k"], w["bk"]).view(B, Tk, heads, -1).transpose(1, 2)
    v = F.linear(context, w["v"], w["bv"]).view(B, Tk, heads, -1).transpose(1, 2)
    out = ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v  # (B, H, Tq, hd)
    return F.linear(out.transpose(1, 2).reshape(B, Tq, -1), w["o"], w["bo"])


def timm_case():
    attn = TimmAttention(16, num_heads=2, qkv_bias=True)
    d = 16
    (q, k, v), (bq, bk, bv) = attn.qkv.weight.split(d), attn.qkv.bias.split(d)
    weights = dict(q=q, k=k, v=v, o=attn.proj.weight, bq=bq, bk=bk, bv=bv, bo=attn.proj.bias)
    return attn, lambda x, ctx: attn(x), weights, attn.scale


def mha_packed_case():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    (q, k, v), (bq, bk, bv) = mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)
    weights = dict(q=q, k=k, v=v, o=mha.out_proj.weight, bq=bq, bk=bk, bv=bv, bo=mha.out_proj.bias)
    return mha, lambda x, ctx: mha(x, x, x, need_weights=False)[0], weights, 4 ** -0.5


def mha_separate_case():
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    weights = dict(q=mha.q_proj_weight, k=mha.k_proj_weight, v=mha.v_proj_weight, o=mha.out_proj.weight,
                   bq=bq, bk=bk, bv=bv, bo=mha.out_proj.bias)
    return mha, lambda x, ctx: mha(x, ctx, ctx, need_weights=False)[0], weights, 8 ** -0.5


def proj_case():
    attn = ProjAttention(16, 2, kdim=8, scale=0.2)
    weights = dict(q=attn.q_proj.weight, k=attn.k_proj.weight, v=attn.v_proj.weight, o=attn.out_proj.weight,
                   bq=attn.q_proj.bias, bk=attn.k_proj.bias, bv=attn.v_proj.bias, bo=attn.out_proj.bias)
    return attn, lambda x, ctx: attn(x, ctx), weights, 0.2


@pytest.mark.parametrize("case", [timm_case, mha_packed_case, mha_separate_case, proj_case])
def test_grad_norms_match_autograd_on_separate_matrices(case):
    torch.manual_seed(0)
    module, call, weights, scale = case()
    heads = module.num_heads
    x = torch.randn(3, 5, 16)
    context = x if case in (timm_case, mha_packed_case) else torch.randn(3, 6, 8)
    target = torch.randn(3, 5, 16)
    (call(x, context) * target).sum().backward()
    got = attention_grad_norms(module)

    leaves = {name: w.detach().clone().requires_grad_() for name, w in weights.items()}
    out = reference_attention(x, context, leaves, heads, scale)
    torch.testing.assert_close(out, call(x, context).detach(), atol=1e-5, rtol=0)  # the reference is the module
    grads = torch.autograd.grad((out * target).sum(), [leaves[r] for r in "qkvo"])
    expected = {role: float(g.norm()) for role, g in zip("qkvo", grads)}
    assert list(got) == [""] and set(got[""]) == {"q", "k", "v", "o", "ratio_qv"}
    for role in "qkvo":
        assert got[""][role] == pytest.approx(expected[role], rel=1e-5)
    assert got[""]["ratio_qv"] == pytest.approx(expected["q"] / expected["v"], rel=1e-5)


def test_sigma_reparam_reports_the_gradient_of_the_raw_weight():
    torch.manual_seed(1)
    vit = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2)
    apply_sigma_reparam(vit, gamma_init=1.0)
    F.cross_entropy(vit(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
    got = attention_grad_norms(vit)
    assert list(got) == ["blocks.0.attn", "blocks.1.attn"]
    attn = vit.blocks[1].attn
    raw = attn.qkv.parametrizations.weight.original.grad  # (48, 16): rows q, k, v
    for role, rows in zip("qkv", raw.split(16)):
        assert got["blocks.1.attn"][role] == pytest.approx(float(rows.norm()), rel=1e-6)
    assert got["blocks.1.attn"]["o"] == pytest.approx(float(attn.proj.parametrizations.weight.original.grad.norm()))


@pytest.mark.parametrize("fused", [False, True])
def test_rank_collapsed_input_leaves_queries_and_keys_without_gradient(fused):
    """Noci et al. 2022: all tokens equal -> every query sees equal logits whatever W_Q, W_K, so
    their gradients are zero (to rounding) while the value path still learns."""
    torch.manual_seed(2)
    attn = TimmAttention(16, num_heads=2, qkv_bias=True).double()
    attn.fused_attn = fused
    x = torch.randn(3, 1, 16, dtype=torch.float64).expand(3, 8, 16)  # rank collapse: X = 1 xᵀ
    (attn(x) * torch.randn(3, 8, 16, dtype=torch.float64)).sum().backward()
    got = attention_grad_norms(attn)[""]
    assert got["v"] > 1.0 and got["o"] > 1.0
    assert got["q"] < 1e-12 * got["v"] and got["k"] < 1e-12 * got["v"]
    assert got["ratio_qv"] < 1e-12


def test_ratio_falls_as_tokens_align():
    ratios = []
    for alignment in (0.0, 0.5, 0.9, 0.99):
        torch.manual_seed(3)
        attn = ProjAttention(16, 2)
        shared, noise = torch.randn(4, 1, 16), torch.randn(4, 8, 16)
        (attn(alignment * shared + (1 - alignment) * noise) * torch.randn(4, 8, 16)).sum().backward()
        ratios.append(attention_grad_norms(attn)[""]["ratio_qv"])
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] < 0.01 * ratios[0]


def test_missing_gradients_and_missing_attention_are_clear_errors():
    attn = ProjAttention()
    with pytest.raises(ValueError, match="after loss.backward"):
        attention_grad_norms(attn)
    attn.v_proj.weight.requires_grad_(False)  # a frozen role is left out, and with it the ratio
    attn(torch.randn(2, 3, 16)).sum().backward()
    assert set(attention_grad_norms(attn)[""]) == {"q", "k", "o"}
    with pytest.raises(ValueError, match="no supported attention module"):
        attention_grad_norms(nn.Linear(3, 3))
    no_heads = ProjAttention()
    del no_heads.num_heads
    with pytest.raises(ValueError, match="num_heads"):
        attention_grad_norms(no_heads)


def test_project_attention_module_is_read_like_the_stand_in():
    """sigma_repro.models.attention.MultiHeadAttention follows the q/k/v/out_proj convention."""
    attention = pytest.importorskip("sigma_repro.models.attention")
    torch.manual_seed(4)
    mha = attention.MultiHeadAttention(16, 4)
    x = torch.randn(2, 5, 16)
    (mha(x) * torch.randn(2, 5, 16)).sum().backward()
    got = attention_grad_norms(mha)[""]
    for role, proj in zip("qkvo", (mha.q_proj, mha.k_proj, mha.v_proj, mha.out_proj)):
        assert got[role] == pytest.approx(float(proj.weight.grad.norm()), rel=1e-6)
