"""The registry of attention kinds and the blocks models declare, from the side of a new model family.

A toy GPT-style attention (one fused ``c_attn`` Linear, as nanoGPT) is registered with the public
``register_attention_kind`` and read by every diagnostic without changing them; a model without a
registered attention gets the same error from each; torchaudio's Conformer, which we do not own, is
found by its registered blocks and its nn.MultiheadAttention, with its key padding.
"""

from types import SimpleNamespace

import pytest
import torch
import torchaudio
from torch import nn

from sigma_repro.diagnostics import (
    AttentionCall,
    AttentionKind,
    AttentionLayout,
    Projection,
    attention_entropy,
    attention_grad_norms,
    attention_logit_norms,
    rank_collapse,
    register_attention_kind,
    register_blocks,
    residual_ratio,
    token_cosine,
)
from sigma_repro.diagnostics import attention_kinds, rank
from sigma_repro.diagnostics.callbacks import AttentionDiagnostics
from sigma_repro.errors import ConfigError
from tests.helpers import direct_entropy, per_head_logit_norms

TOL = 1e-5
D, HEADS = 16, 2


class ToyCausalAttention(nn.Module):
    """nanoGPT's attention: q, k, v from one fused Linear, causal; keeps its probabilities."""

    def __init__(self, dim=D, n_head=HEADS):
        super().__init__()
        self.n_head = n_head
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        logits = (q @ k.transpose(-2, -1)) * (C // self.n_head) ** -0.5
        self.last_probs = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.c_proj((self.last_probs @ v).transpose(1, 2).reshape(B, T, C))


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp = ToyCausalAttention(), nn.Linear(D, D)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class ToyGPT(nn.Module):
    """A stack of blocks, declared for rank collapse by ``transformer_blocks``."""

    def __init__(self, depth=2):
        super().__init__()
        self.h = nn.ModuleList(ToyBlock() for _ in range(depth))

    def forward(self, x):
        for block in self.h:
            x = block(x)
        return x

    def transformer_blocks(self):
        return [(f"h.{i}", block) for i, block in enumerate(self.h)]


# What a new family writes next to its model: how to read q, k per call, and where W_Q, W_K, W_V, W_O are.
def toy_logits(module, record):
    def before_forward(mod, args):
        x = args[0]
        B, T, C = x.shape
        q, k, _ = mod.c_attn(x).view(B, T, 3, mod.n_head, C // mod.n_head).permute(2, 0, 3, 1, 4)
        causal = torch.full((T, T), float("-inf")).triu(1)
        record(AttentionCall(q, k, (C // mod.n_head) ** -0.5, causal, None))

    return [module.register_forward_pre_hook(before_forward)]


def toy_projections(module):
    d = module.c_attn.out_features // 3
    q, k, v = (Projection(module.c_attn, "weight", slice(i * d, (i + 1) * d)) for i in range(3))
    return AttentionLayout(q, k, v, Projection(module.c_proj, "weight", slice(None)), module.n_head,
                           (d // module.n_head) ** -0.5)


TOY_KIND = AttentionKind("toy fused c_attn", ToyCausalAttention, toy_logits, toy_projections)


@pytest.fixture
def registries(monkeypatch):
    """Registrations made by a test stay in it."""
    monkeypatch.setattr(attention_kinds, "ATTENTION_KINDS", dict(attention_kinds.ATTENTION_KINDS))
    monkeypatch.setattr(rank, "BLOCK_LISTS", dict(rank.BLOCK_LISTS))


def test_a_registered_kind_is_read_by_every_diagnostic(registries):
    register_attention_kind(TOY_KIND)
    torch.manual_seed(0)
    model = ToyGPT()
    x = torch.randn(3, 5, D)

    got = attention_entropy(model, x)
    got_norm = attention_entropy(model, x, normalized=True)
    assert list(got) == ["h.0.attn", "h.1.attn"]
    for name in got:
        probs = model.get_submodule(name).last_probs  # from the probe's own forward: same input
        torch.testing.assert_close(got[name].double(), direct_entropy(probs), atol=TOL, rtol=0)
        torch.testing.assert_close(got_norm[name].double(), direct_entropy(probs, normalized=True), atol=TOL, rtol=0)

    norms = attention_logit_norms(model)
    for name, value in norms.items():
        w = model.get_submodule(name).c_attn.weight
        torch.testing.assert_close(value, per_head_logit_norms(w[:D], w[D:2 * D], HEADS, (D // HEADS) ** -0.5),
                                   rtol=1e-6, atol=0)

    (model(x) * torch.randn(3, 5, D)).sum().backward()
    grads = attention_grad_norms(model)
    for name, value in grads.items():
        attn = model.get_submodule(name)
        for i, role in enumerate("qkv"):
            assert value[role] == pytest.approx(float(attn.c_attn.weight.grad[i * D:(i + 1) * D].norm()), rel=1e-6)
        assert value["o"] == pytest.approx(float(attn.c_proj.weight.grad.norm()), rel=1e-6)

    blocks = rank_collapse(model, x)
    assert list(blocks) == ["h.0", "h.1"]  # as the model declares them
    outputs = {}
    for name in blocks:
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
    with torch.no_grad():
        model(x)
    for name, out in outputs.items():  # no token hooks registered: batch-first, no padding
        assert blocks[name]["token_cosine"] == pytest.approx(float(token_cosine(out)), abs=1e-6)
        assert blocks[name]["residual_ratio"] == pytest.approx(float(residual_ratio(out)), abs=1e-6)


def test_every_diagnostic_gives_the_same_error_without_a_registered_attention(registries):
    model = ToyGPT()
    x = torch.randn(2, 4, D)
    model(x).sum().backward()
    task = SimpleNamespace(model=model, probe_inputs=lambda n: ((x,), {}))
    calls = {
        "attention_entropy": lambda: attention_entropy(model, x),
        "attention_logit_norms": lambda: attention_logit_norms(model),
        "attention_grad_norms": lambda: attention_grad_norms(model),
        "rank_collapse": lambda: rank_collapse(model, x),
        "AttentionDiagnostics": lambda: AttentionDiagnostics().on_fit_start(None, task),
    }
    messages = {}
    for name, call in calls.items():
        with pytest.raises(ConfigError) as err:
            call()
        messages[name] = str(err.value)
    assert len(set(messages.values())) == 1, messages
    message = messages["attention_entropy"]
    assert "found no supported attention module in ToyGPT" in message
    for kind in ("torch.nn.MultiheadAttention", "timm.layers.Attention", "q_tap/k_tap"):  # expected
        assert kind in message
    assert "'ToyCausalAttention'" in message and "'Linear'" in message  # found
    assert "register_attention_kind(AttentionKind(...))" in message  # what to do

    register_attention_kind(TOY_KIND)
    assert list(attention_entropy(model, x)) == ["h.0.attn", "h.1.attn"]
    with pytest.raises(ValueError, match="already registered"):
        register_attention_kind(TOY_KIND)


def test_blocks_come_from_declarations_or_patterns_and_their_absence_says_how_to_declare(registries):
    register_attention_kind(TOY_KIND)

    class Stages(nn.Module):  # a class "we do not own": no transformer_blocks method
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList(ToyCausalAttention() for _ in range(2))

        def forward(self, x):
            for stage in self.stages:
                x = x + stage(x)
            return x

    class Wrapper(nn.Module):  # declares nothing itself: the stacks inside answer, names prefixed
        def __init__(self):
            super().__init__()
            self.gpt, self.extra = ToyGPT(), Stages()

        def forward(self, x):
            return self.extra(self.gpt(x))

    x = torch.randn(2, 4, D)
    how_to_declare = r"declares no transformer blocks.*transformer_blocks\(self\).*register_blocks"
    with pytest.raises(ValueError, match=how_to_declare):
        rank_collapse(Stages(), x)
    assert list(rank_collapse(Wrapper(), x)) == ["gpt.h.0", "gpt.h.1"]
    register_blocks(Stages, "stages")
    assert list(rank_collapse(Wrapper(), x)) == ["gpt.h.0", "gpt.h.1", "extra.stages.0", "extra.stages.1"]
    assert list(rank_collapse(Wrapper(), x, blocks="gpt.h.1")) == ["gpt.h.1"]  # patterns override declarations

    Wrapper.transformer_blocks = lambda self: [("last", self.extra.stages[1])]  # the outermost declaration answers
    assert list(rank_collapse(Wrapper(), x)) == ["last"]


def conformer_and_inputs():
    torch.manual_seed(3)
    model = torchaudio.models.Conformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=2,
                                        depthwise_conv_kernel_size=3)
    x, lengths = torch.randn(3, 7, 16), torch.tensor([7, 4, 5])
    pad = torch.arange(7)[None, :] >= lengths[:, None]  # (B, T) True = pad
    return model, x, lengths, pad


def test_torchaudio_conformer_entropy_matches_a_direct_softmax_of_its_own_queries_and_keys():
    model, x, lengths, pad = conformer_and_inputs()
    calls, handles = {}, []
    for i, layer in enumerate(model.conformer_layers):
        handles.append(layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: calls.__setitem__(i, kw), with_kwargs=True))
    got = attention_entropy(model, x, lengths)
    for h in handles:
        h.remove()

    assert list(got) == ["conformer_layers.0.self_attn", "conformer_layers.1.self_attn"]
    for i, layer in enumerate(model.conformer_layers):
        mha, call = layer.self_attn, calls[i]
        assert torch.equal(call["key_padding_mask"], pad)
        query = call["query"].transpose(0, 1).double()  # (T, B, D) -> (B, T, D)
        (w_q, w_k, _), (b_q, b_k, _) = mha.in_proj_weight.double().chunk(3), mha.in_proj_bias.double().chunk(3)
        q = (query @ w_q.T + b_q).view(3, 7, 2, 8).transpose(1, 2)  # (B, H, T, hd)
        k = (query @ w_k.T + b_k).view(3, 7, 2, 8).transpose(1, 2)
        logits = (q @ k.transpose(-2, -1) / 8 ** 0.5).masked_fill(pad[:, None, None, :], float("-inf"))
        probs = logits.softmax(-1).detach()
        torch.testing.assert_close(got[f"conformer_layers.{i}.self_attn"].double(), direct_entropy(probs, ~pad),
                                   atol=TOL, rtol=0)
        assert not torch.allclose(got[f"conformer_layers.{i}.self_attn"].double(), direct_entropy(probs), atol=1e-3)


def test_torchaudio_conformer_rank_collapse_over_its_registered_layers_skips_padding():
    model, x, lengths, pad = conformer_and_inputs()
    got = rank_collapse(model, x, lengths)
    assert list(got) == ["conformer_layers.0", "conformer_layers.1"]
    outputs = {}
    for i, layer in enumerate(model.conformer_layers):
        layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(f"conformer_layers.{i}", out))
    model.eval()
    with torch.no_grad():
        model(x, lengths)
    for name, out in outputs.items():
        tokens = out.transpose(0, 1)  # the layers work on (T, B, D)
        assert got[name]["token_cosine"] == pytest.approx(float(token_cosine(tokens, ~pad)), abs=1e-6)
        assert got[name]["residual_ratio"] == pytest.approx(float(residual_ratio(tokens, ~pad)), abs=1e-6)
        assert got[name]["token_cosine"] != pytest.approx(float(token_cosine(tokens)), abs=1e-4)
