"""attention_entropy against direct softmax computations, for every supported attention kind.

References: timm Attention on its manual path (probabilities read at ``attn_drop``'s input),
nn.MultiheadAttention's own ``need_weights=True, average_attn_weights=False`` output in eval mode,
and a stand-in module following our q_tap/k_tap convention that keeps its probabilities.
"""

import math

import pytest
import torch
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sigma_repro.diagnostics import attention_entropy, probe_attention_entropy
from sigma_repro.diagnostics import entropy as entropy_module
from sigma_repro.reparam import apply_sigma_reparam

from .helpers import TappedAttention, direct_entropy

TOL = 1e-5


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=16, depth=2,
                             num_heads=2, **kwargs)


def timm_manual_probs(model, *args, **kwargs):
    """Probabilities of every timm Attention on its non-fused path, read at attn_drop's input."""
    probs, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, TimmAttention):
            mod.fused_attn = False
            handles.append(mod.attn_drop.register_forward_pre_hook(
                lambda m, a, name=name: probs.__setitem__(name, a[0])))
    model.eval()
    with torch.no_grad():
        model(*args, **kwargs)
    for h in handles:
        h.remove()
    return probs


def test_timm_vit_fused_path_matches_direct_softmax_and_leaves_model_as_it_was():
    model = tiny_vit()
    x = torch.randn(3, 1, 8, 8)
    model.train()
    model.blocks[1].eval()
    got = attention_entropy(model, x)
    got_norm = attention_entropy(model, x, normalized=True)

    assert model.training and not model.blocks[1].training and model.blocks[0].training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert list(got) == ["blocks.0.attn", "blocks.1.attn"]
    probs = timm_manual_probs(model, x)
    for name, ref in probs.items():
        assert got[name].dtype == torch.float32 and got[name].shape == (2,)
        torch.testing.assert_close(got[name].double(), direct_entropy(ref), atol=TOL, rtol=0)
        torch.testing.assert_close(got_norm[name].double(), direct_entropy(ref) / math.log(17), atol=TOL, rtol=0)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "causal"])
def test_timm_attention_masks_match_direct_softmax(mask_kind):
    torch.manual_seed(1)
    attn = TimmAttention(dim=16, num_heads=2, qkv_bias=True)
    x = torch.randn(2, 5, 16)
    keep = torch.rand(2, 1, 5, 5) > 0.3
    keep[..., 0] = True  # every query sees at least one key
    kwargs = {
        "bool": {"attn_mask": keep},
        "float": {"attn_mask": torch.randn(2, 1, 5, 5)},
        "causal": {"is_causal": True},
    }[mask_kind]
    got = attention_entropy(attn, x, **kwargs)
    got_norm = attention_entropy(attn, x, normalized=True, **kwargs)
    ref = timm_manual_probs(attn, x, **kwargs)[""]
    torch.testing.assert_close(got[""].double(), direct_entropy(ref), atol=TOL, rtol=0)
    torch.testing.assert_close(got_norm[""].double(), direct_entropy(ref, normalized=True), atol=TOL, rtol=0)


def mha_probs(mha, query, key, **kwargs):
    mha.eval()
    with torch.no_grad():
        _, probs = mha(query, key, key, need_weights=True, average_attn_weights=False, **kwargs)
    return probs  # (B, H, Tq, Tk)


def test_mha_self_attention_with_key_padding_excludes_padded_queries():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = pad[2, 1:] = True
    got = attention_entropy(mha, x, x, x, key_padding_mask=pad)
    ref = mha_probs(mha, x, x, key_padding_mask=pad)
    torch.testing.assert_close(got[""].double(), direct_entropy(ref, ~pad), atol=TOL, rtol=0)
    # padded queries count if they were included: the exclusion is real
    assert not torch.allclose(got[""].double(), direct_entropy(ref), atol=1e-3)


def test_mha_unbatched_input():
    torch.manual_seed(9)
    mha = nn.MultiheadAttention(16, 2)
    x = torch.randn(5, 16)  # (T, E)
    pad = torch.tensor([False, False, False, False, True])
    got = attention_entropy(mha, x, x, x, key_padding_mask=pad)
    ref = mha_probs(mha, x, x, key_padding_mask=pad)  # (H, Tq, Tk)
    torch.testing.assert_close(got[""].double(), direct_entropy(ref[None], ~pad[None]), atol=TOL, rtol=0)


@pytest.mark.parametrize("causal_as", ["bool", "float", "bool+is_causal"])
def test_mha_causal_mask_sequence_first(causal_as):
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(16, 2)  # (T, B, E) inputs
    x = torch.randn(7, 2, 16)
    blocked = torch.ones(7, 7, dtype=torch.bool).triu(1)
    mask = blocked if causal_as.startswith("bool") else torch.zeros(7, 7).masked_fill(blocked, float("-inf"))
    extra = {"is_causal": True} if causal_as == "bool+is_causal" else {}
    got = attention_entropy(mha, x, x, x, attn_mask=mask, need_weights=False, **extra)
    got_norm = attention_entropy(mha, x, x, x, attn_mask=mask, normalized=True)
    ref = mha_probs(mha, x, x, attn_mask=mask)
    torch.testing.assert_close(got[""].double(), direct_entropy(ref), atol=TOL, rtol=0)
    torch.testing.assert_close(got_norm[""].double(), direct_entropy(ref, normalized=True), atol=TOL, rtol=0)


def test_mha_cross_attention_with_separate_kdim_and_per_head_mask():
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)
    query, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 8)
    pad = torch.zeros(2, 5)  # float key padding: additive, -inf = padded
    pad[1, 3:] = float("-inf")
    head_bias = torch.randn(2 * 2, 3, 5)  # (B*H, Tq, Tk) float mask
    got = attention_entropy(mha, query, memory, memory, key_padding_mask=pad, attn_mask=head_bias)
    ref = mha_probs(mha, query, memory, key_padding_mask=pad, attn_mask=head_bias)
    torch.testing.assert_close(got[""].double(), direct_entropy(ref), atol=TOL, rtol=0)


def test_mha_with_sigma_reparam_matches_and_does_not_advance_power_iteration():
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    apply_sigma_reparam(layer, gamma_init=1.0)
    layer.train()
    u_before = layer.self_attn.parametrizations.in_proj_weight[0].u.clone()
    x = torch.randn(2, 5, 16)
    got = attention_entropy(layer, x)
    torch.testing.assert_close(layer.self_attn.parametrizations.in_proj_weight[0].u, u_before, atol=0, rtol=0)
    assert layer.training
    ref = mha_probs(layer.self_attn, x, x)
    torch.testing.assert_close(got["self_attn"].double(), direct_entropy(ref), atol=TOL, rtol=0)


def test_tapped_convention_with_causal_and_padding():
    torch.manual_seed(6)
    attn = TappedAttention()
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 3:] = True
    entropy, entropy_norm = probe_attention_entropy(attn, (x,), {"key_padding_mask": pad, "causal": True})
    ref = attn.last_probs
    torch.testing.assert_close(entropy[""].double(), direct_entropy(ref, ~pad), atol=TOL, rtol=0)
    torch.testing.assert_close(entropy_norm[""].double(), direct_entropy(ref, ~pad, normalized=True), atol=TOL, rtol=0)


def test_module_called_twice_in_one_forward_averages_over_both_calls():
    torch.manual_seed(8)
    attn = TappedAttention()
    model = nn.Sequential(attn, attn)
    seen = []
    attn.register_forward_hook(lambda m, a, out: seen.append(m.last_probs))
    got = attention_entropy(model, torch.randn(2, 5, 16))
    assert list(got) == ["0"]  # named_modules lists a shared module once
    torch.testing.assert_close(got["0"].double(), direct_entropy(torch.cat(seen)), atol=TOL, rtol=0)


def test_tapped_cross_attention_reports_its_own_query_padding():
    torch.manual_seed(7)
    attn = TappedAttention()
    x = torch.randn(2, 4, 16)
    attn.last_query_padding_mask = torch.tensor([[False, False, False, True], [False] * 4])
    got = attention_entropy(attn, x)  # no key padding; the query padding attribute still applies
    ref = attn.last_probs
    torch.testing.assert_close(got[""].double(), direct_entropy(ref, ~attn.last_query_padding_mask), atol=TOL, rtol=0)


def test_chunked_logits_give_the_same_result(monkeypatch):
    model = tiny_vit()
    x = torch.randn(4, 1, 8, 8)
    whole = attention_entropy(model, x)
    monkeypatch.setattr(entropy_module, "_MAX_LOGITS", 2 * 17 * 17)  # one example per chunk
    chunked = attention_entropy(model, x)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-6, rtol=0)


def test_errors_are_clear_and_hooks_never_leak():
    with pytest.raises(ValueError, match="no supported attention module"):
        attention_entropy(nn.Linear(4, 4), torch.randn(2, 4))
    model = tiny_vit()
    with pytest.raises(Exception):
        attention_entropy(model, torch.randn(2, 3, 8, 8))  # wrong channel count fails in the forward
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="add_bias_kv"):
        attention_entropy(nn.MultiheadAttention(8, 2, add_bias_kv=True), *(torch.randn(3, 1, 8),) * 3)


def test_bf16_autocast_probe_stays_close_to_fp32():
    model = tiny_vit()
    x = torch.randn(2, 1, 8, 8)
    ref = attention_entropy(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention_entropy(model, x)
    for name in ref:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], ref[name], atol=2e-2, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_probe_matches_cpu_and_returns_cpu_tensors():
    model = tiny_vit()
    x = torch.randn(3, 1, 8, 8)
    ref = attention_entropy(model, x)
    got = attention_entropy(model.cuda(), x.cuda())
    for name in ref:
        assert got[name].device.type == "cpu"
        torch.testing.assert_close(got[name], ref[name], atol=1e-4, rtol=0)
