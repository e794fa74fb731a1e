"""Shared transformer blocks against direct computations: attention vs a hand-written softmax,
residual formulas per (norm, scheme), Admin profiling vs a hand recomputation, DeepNorm and Admin
constants vs the papers' numbers, depth 100 at init, σReparam and attention entropy on the stacks."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sigma_repro.diagnostics import attention_entropy, rank_collapse, residual_ratio, token_cosine
from sigma_repro.errors import ConfigError
from sigma_repro.models.attention import MultiHeadAttention
from sigma_repro.models.residual import (
    ResidualSublayer,
    admin_closed_form,
    admin_profile,
    deepnorm_constants,
)
from sigma_repro.models.transformer import (
    STACKS,
    DecoderOnly,
    TransformerDecoder,
    TransformerEncoder,
    build_stack,
)
from sigma_repro.reparam import apply_sigma_reparam, iter_sigma_reparam
from tests.helpers import direct_entropy

TOL = 1e-5
D, HEADS, FFN = 16, 2, 32
# Every (norm, scheme) a ResidualSublayer accepts.
COMBOS = [("post", "standard"), ("pre", "standard"), ("none", "standard"), ("post", "scaled"), ("pre", "scaled"),
          ("none", "scaled"), ("post", "admin"), ("post", "deepnorm"), ("none", "rezero")]


def stack(kind, depth=2, **kw):
    """A tiny stack; decoders are built as the decoder of a depth-`depth` encoder-decoder pair."""
    extra = {"encoder_depth": depth} if kind == "decoder" else {}
    return build_stack(kind, dim=D, depth=depth, num_heads=HEADS, ffn_dim=FFN, **extra, **kw)


def stack_inputs(kind, B=2, T=6, S=5):
    x = torch.randn(B, T, D)
    return (x, torch.randn(B, S, D)) if kind == "decoder" else (x,)


def padding(B, T, lengths):
    return torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]  # (B, T), True = pad


class Seq2Seq(nn.Module):
    """An encoder and a decoder, as the translation model combines them (embeddings left out)."""

    def __init__(self, depth=2, **kw):
        super().__init__()
        self.encoder = TransformerEncoder(dim=D, depth=depth, num_heads=HEADS, ffn_dim=FFN, decoder_depth=depth, **kw)
        self.decoder = TransformerDecoder(dim=D, depth=depth, num_heads=HEADS, ffn_dim=FFN, encoder_depth=depth, **kw)

    def forward(self, src, tgt, src_pad=None, tgt_pad=None):
        memory = self.encoder(src, padding_mask=src_pad)
        return self.decoder(tgt, memory, padding_mask=tgt_pad, memory_padding_mask=src_pad)


def direct_probs(attn, x, context=None, key_padding_mask=None, causal=False):
    """(B, H, Tq, Tk) attention probabilities of our MultiHeadAttention, by hand."""
    context = x if context is None else context
    B, Tq, _ = x.shape
    Tk = context.shape[1]
    q = attn.q_proj(x).view(B, Tq, HEADS, -1).transpose(1, 2)
    k = attn.k_proj(context).view(B, Tk, HEADS, -1).transpose(1, 2)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if causal:
        logits = logits.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1)


# ---------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize("case", ["plain", "causal", "padding", "padding_causal", "cross"])
def test_attention_matches_direct_softmax(case):
    torch.manual_seed(0)
    cross = case == "cross"
    attn = MultiHeadAttention(D, HEADS, kdim=12 if cross else None).eval()
    x = torch.randn(3, 6, D)
    context = torch.randn(3, 4, 12) if cross else None
    pad = padding(3, 4 if cross else 6, [4, 2, 3] if cross else [6, 3, 5]) if "padding" in case or cross else None
    causal = "causal" in case
    got = attn(x, context, key_padding_mask=pad, causal=causal)

    probs = direct_probs(attn, x, context, pad, causal)
    src = x if context is None else context
    v = attn.v_proj(src).view(3, src.shape[1], HEADS, -1).transpose(1, 2)
    ref = attn.out_proj((probs @ v).transpose(1, 2).reshape(3, 6, D))
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    assert attn.last_causal is causal and attn.last_key_padding_mask is pad
    assert attn.last_query_padding_mask is (None if cross else pad)


def test_attention_entropy_on_the_module_matches_direct_computation():
    torch.manual_seed(1)
    attn = MultiHeadAttention(D, HEADS)
    x = torch.randn(3, 6, D)
    pad = padding(3, 6, [6, 2, 4])
    got = attention_entropy(attn, x, key_padding_mask=pad, causal=True)
    ref = direct_entropy(direct_probs(attn, x, None, pad, causal=True), query_valid=~pad)
    torch.testing.assert_close(got[""].double(), ref, atol=TOL, rtol=0)


def test_attention_rejects_bad_inputs():
    with pytest.raises(ConfigError, match="divisible"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="bool"):
        MultiHeadAttention(D, HEADS)(torch.randn(1, 3, D), key_padding_mask=torch.zeros(1, 3))


# ---------------------------------------------------------------------------------------------
# residual sublayers


@pytest.mark.parametrize("norm,scheme", COMBOS)
def test_residual_formula_matches_direct_computation(norm, scheme):
    torch.manual_seed(2)
    f = nn.Linear(D, D)
    alpha = {"admin": 1.7, "deepnorm": 2.06}.get(scheme, 1.0)
    tau = 0.3 if scheme == "scaled" else 1.0
    sub = ResidualSublayer(D, f, norm=norm, scheme=scheme, alpha=alpha, tau=tau)
    with torch.no_grad():  # non-trivial LN affine, ω and τ so that each factor is visible
        for ln in (sub.pre_norm, sub.post_norm):
            if isinstance(ln, nn.LayerNorm):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.uniform_(-0.5, 0.5)
        if scheme == "admin":
            assert torch.equal(sub.omega, torch.full((D,), 1.7))
            sub.omega.uniform_(1.0, 3.0)
        if scheme == "rezero":
            assert sub.tau.item() == 0.0
            sub.tau.fill_(0.4)
    x = torch.randn(2, 5, D)

    def ln(layer, h):
        return F.layer_norm(h, (D,), layer.weight, layer.bias, layer.eps)

    omega = sub.omega if scheme == "admin" else alpha
    tau = sub.tau if scheme == "rezero" else tau
    if norm == "post":
        ref = ln(sub.post_norm, omega * x + tau * f(x))
    elif norm == "pre":
        ref = x + tau * f(ln(sub.pre_norm, x))
    else:
        ref = x + tau * f(x)
    torch.testing.assert_close(sub(x), ref, atol=TOL, rtol=0)
    assert isinstance(sub.omega, nn.Parameter) == (scheme == "admin")
    assert isinstance(sub.tau, nn.Parameter) == (scheme == "rezero")


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm="pre", scheme="admin"), "needs norm='post'"),
    (dict(norm="post", scheme="rezero"), "needs norm='none'"),
    (dict(norm="post", scheme="standard", alpha=2.0), "alpha"),
    (dict(norm="pre", scheme="standard", tau=0.5), "scaled"),
    (dict(norm="mid"), "norm must be"),
    (dict(scheme="fixup"), "scheme must be"),
])
def test_residual_rejects_option_combinations_that_would_be_ignored(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ResidualSublayer(D, nn.Identity(), **kwargs)


def test_dropout_is_on_the_branch_only():
    sub = ResidualSublayer(D, nn.Identity(), norm="none", dropout=1.0).train()
    x = torch.randn(2, 3, D)
    torch.testing.assert_close(sub(x), x)  # branch dropped entirely, skip kept


# ---------------------------------------------------------------------------------------------
# stacks: norms, init, depth


@pytest.mark.parametrize("kind", list(STACKS))
def test_post_ln_has_no_final_norm_and_pre_ln_has_one(kind):
    per_layer = 3 if kind == "decoder" else 2
    for norm, extra in [("post", 0), ("pre", 1), ("none", 0)]:
        s = stack(kind, depth=3, norm=norm)
        n_ln = sum(isinstance(m, nn.LayerNorm) for m in s.modules())
        assert n_ln == (3 * per_layer if norm != "none" else 0) + extra
        assert isinstance(s.final_norm, nn.LayerNorm if norm == "pre" else nn.Identity)
    s = stack(kind, depth=3, norm="post").eval()
    inputs = stack_inputs(kind)
    last = {}
    s.layers[-1].ffn.post_norm.register_forward_hook(lambda m, a, out: last.__setitem__("y", out))
    assert torch.equal(s(*inputs), last["y"])  # the stack's output is the last sublayer's LN, nothing after


def test_pre_ln_residual_stream_grows_with_depth_while_post_ln_stays_unit():
    torch.manual_seed(3)
    x = torch.randn(4, 8, D)
    variances = {}
    for norm in ("pre", "post"):
        s = TransformerEncoder(dim=D, depth=12, num_heads=HEADS, ffn_dim=FFN, norm=norm)
        out = []
        for layer in s.layers:
            layer.register_forward_hook(lambda m, a, o: out.append(o.var().item()))
        s(x)
        variances[norm] = out
    assert variances["pre"][-1] > 4 * variances["pre"][0]
    assert all(0.95 < v < 1.05 for v in variances["post"])


DEPTH100 = [c for c in COMBOS if c != ("none", "standard")]  # that one diverges by design, see below


@pytest.mark.parametrize("kind", list(STACKS))
@pytest.mark.parametrize("norm,scheme", DEPTH100)
def test_depth_100_has_finite_outputs_and_gradients_at_init(kind, norm, scheme):
    torch.manual_seed(4)
    s = stack(kind, depth=100, norm=norm, scheme=scheme)
    inputs = stack_inputs(kind, T=8)
    y = s(*inputs, padding_mask=padding(2, 8, [8, 5]))
    y.square().mean().backward()
    assert torch.isfinite(y).all()
    for name, p in s.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_unnormalised_residual_explodes_with_depth_and_tau_scaling_keeps_it_bounded():
    """Why scheme='scaled' exists (Noci et al.): x + f(x) without a norm doubles the variance per
    sublayer; x + f(x)/sqrt(L) keeps it O(1)."""
    torch.manual_seed(5)
    x = torch.randn(2, 8, D)
    plain = DecoderOnly(dim=D, depth=24, num_heads=HEADS, ffn_dim=FFN, norm="none")(x)
    scaled = DecoderOnly(dim=D, depth=24, num_heads=HEADS, ffn_dim=FFN, norm="none", scheme="scaled")(x)
    assert plain.var() > 1e4 * x.var()
    assert scaled.var() < 10 * x.var()


@pytest.mark.parametrize("kind,per_layer", [("encoder", 2), ("decoder", 3), ("decoder_only", 2)])
def test_tau_is_one_over_sqrt_depth_in_blocks_or_sublayers(kind, per_layer):
    for tau_depth, L in [("blocks", 4), ("sublayers", 4 * per_layer)]:
        s = stack(kind, depth=4, scheme="scaled", tau_depth=tau_depth)
        taus = [sub.tau for _, sub in s.residual_sublayers()]
        assert taus == pytest.approx([1 / math.sqrt(L)] * 4 * per_layer)
    assert {sub.tau for _, sub in stack(kind, scheme="scaled", tau=0.25).residual_sublayers()} == {0.25}
    with pytest.raises(ConfigError, match="only by scheme='scaled'"):
        stack(kind, tau=0.25)


def test_residual_sublayers_lists_every_sublayer_in_call_order():
    names = [name for name, _ in stack("decoder", depth=2).residual_sublayers()]
    assert names == ["layers.0.self_attn", "layers.0.cross_attn", "layers.0.ffn",
                     "layers.1.self_attn", "layers.1.cross_attn", "layers.1.ffn"]


def test_default_init_is_xavier_uniform_with_zero_biases():
    torch.manual_seed(6)
    s = TransformerEncoder(dim=64, depth=1, num_heads=HEADS, ffn_dim=256)
    for name, m in s.named_modules():
        if isinstance(m, nn.Linear):
            bound = math.sqrt(6 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.95 * bound, name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name


def test_build_stack_names_the_kinds():
    assert isinstance(stack("decoder_only"), DecoderOnly)
    with pytest.raises(ConfigError, match="stack kind"):
        build_stack("gpt", dim=D, depth=1, num_heads=HEADS, ffn_dim=FFN)
    with pytest.raises(ConfigError, match="encoder_depth"):
        TransformerDecoder(dim=D, depth=1, num_heads=HEADS, ffn_dim=FFN, scheme="deepnorm")
    with pytest.raises(ConfigError, match="activation"):
        stack("encoder", activation="swish")


# ---------------------------------------------------------------------------------------------
# DeepNorm and Admin


@pytest.mark.parametrize("n,enc,dec", [(6, (1.418, 0.497), (2.060, 0.343)), (18, (1.999, 0.353), (2.711, 0.261))])
def test_deepnorm_constants_match_the_paper(n, enc, dec):
    assert deepnorm_constants(n, n, part="encoder") == pytest.approx(enc, abs=5e-4)
    assert deepnorm_constants(n, n, part="decoder") == pytest.approx(dec, abs=5e-4)


def test_deepnorm_single_stack_constants_and_errors():
    for n_enc, n_dec, part in [(12, 0, "encoder"), (0, 12, "decoder")]:
        assert deepnorm_constants(n_enc, n_dec, part=part) == pytest.approx((24 ** 0.25, 96 ** -0.25))
    with pytest.raises(ConfigError, match="part"):
        deepnorm_constants(6, 6, part="both")
    with pytest.raises(ConfigError, match="at least 1"):
        deepnorm_constants(0, 6, part="encoder")


def test_deepnorm_stacks_use_alpha_and_beta_gains():
    torch.manual_seed(7)
    model = Seq2Seq(depth=6, scheme="deepnorm")
    for stack_, part in [(model.encoder, "encoder"), (model.decoder, "decoder")]:
        alpha, beta = deepnorm_constants(6, 6, part=part)
        assert {sub.omega for _, sub in stack_.residual_sublayers()} == {alpha}
        weights = {"q_proj": [], "k_proj": [], "v_proj": [], "out_proj": [], "fc1": [], "fc2": []}
        for name, m in stack_.named_modules():
            if isinstance(m, nn.Linear):  # xavier_normal: std = gain * sqrt(2 / (fan_in + fan_out))
                xavier_std = math.sqrt(2 / (m.in_features + m.out_features))
                weights[name.rsplit(".", 1)[-1]].append(m.weight.flatten() / xavier_std)
        for proj, w in weights.items():
            gain = 1.0 if proj in ("q_proj", "k_proj") else beta
            assert torch.cat(w).std().item() == pytest.approx(gain, rel=0.05), (part, proj)
    alpha, _ = deepnorm_constants(0, 6, part="decoder")
    lm = DecoderOnly(dim=D, depth=6, num_heads=HEADS, ffn_dim=FFN, scheme="deepnorm")
    assert {sub.omega for _, sub in lm.residual_sublayers()} == {alpha}


def test_admin_closed_form_values_and_stack_init():
    assert admin_closed_form(12) == pytest.approx(math.sqrt(13 / math.log(13) - 1))
    assert admin_closed_form(12) == pytest.approx(2.017, abs=1e-3)  # 6-layer encoder
    assert admin_closed_form(18) == pytest.approx(2.335, abs=1e-3)  # 6-layer decoder
    for kind, n in [("encoder", 6), ("decoder", 9), ("decoder_only", 6)]:
        s = stack(kind, depth=3, scheme="admin")
        for _, sub in s.residual_sublayers():
            torch.testing.assert_close(sub.omega.detach(), torch.full((D,), admin_closed_form(n)))
    with pytest.raises(ConfigError):
        admin_closed_form(0)


def manual_admin_profile(model, src, tgt, src_pad, tgt_pad):
    """Admin's profiling recomputed layer by layer with the formula written out, on a copy."""
    omegas = []

    def run(layers, x, calls):
        r = 1.0
        for layer in layers:
            for sub, call in calls(layer):
                sub.omega.fill_(r)
                omegas.append(r)
                h = call(sub.sublayer, x)  # post-LN: the branch sees x itself; dropout is 0 here
                skip = x * r
                r = math.sqrt(skip.double().var(correction=0).item() + h.double().var(correction=0).item())
                x = F.layer_norm(skip + h, (D,), sub.post_norm.weight, sub.post_norm.bias)
        return x

    with torch.no_grad():
        memory = run(model.encoder.layers, src, lambda layer: [
            (layer.self_attn, lambda f, x: f(x, key_padding_mask=src_pad)),
            (layer.ffn, lambda f, x: f(x))])
        run(model.decoder.layers, tgt, lambda layer: [
            (layer.self_attn, lambda f, x: f(x, key_padding_mask=tgt_pad, causal=True)),
            (layer.cross_attn, lambda f, x: f(x, memory, key_padding_mask=src_pad)),
            (layer.ffn, lambda f, x: f(x))])
    return omegas


def test_admin_profile_matches_a_hand_recomputation_per_stack():
    torch.manual_seed(8)
    model = Seq2Seq(depth=3, scheme="admin").eval()
    src, tgt = torch.randn(2, 6, D), torch.randn(2, 5, D)
    src_pad, tgt_pad = padding(2, 6, [6, 4]), padding(2, 5, [3, 5])
    reference = manual_admin_profile(copy.deepcopy(model), src, tgt, src_pad, tgt_pad)
    modes = []
    model.encoder.layers[0].ffn.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    profiled = admin_profile(model, src, tgt, src_pad, tgt_pad)

    assert modes == [True] and not model.training and not any(m.training for m in model.modules())
    assert list(profiled) == [f"{part}.{name}" for part in ("encoder", "decoder")
                              for name, _ in getattr(model, part).residual_sublayers()]
    assert list(profiled.values()) == pytest.approx(reference, rel=1e-6)
    enc, dec = list(profiled.values())[:6], list(profiled.values())[6:]
    assert enc[0] == dec[0] == 1.0  # r restarts at 1 for each stack
    assert all(b > a for a, b in zip(enc, enc[1:])) and all(b > a for a, b in zip(dec, dec[1:]))
    state = model.state_dict()
    for name, omega in profiled.items():
        assert torch.equal(state[f"{name}.omega"], torch.full((D,), omega))


def test_admin_profile_runs_in_train_mode_with_dropout_and_needs_admin_sublayers():
    torch.manual_seed(9)
    s = stack("encoder", depth=2, scheme="admin", dropout=0.5)
    x = torch.randn(2, 6, D)
    first = admin_profile(s, x)
    second = admin_profile(s, x)
    assert list(first.values())[0] == 1.0 and first != second  # dropout was active: a fresh draw
    with pytest.raises(ConfigError, match="scheme='admin'"):
        admin_profile(stack("encoder"), x)
    encoder_only = Seq2Seq(depth=1, scheme="admin")
    encoder_only.forward = lambda src: encoder_only.encoder(src)  # the decoder's sublayers are never called
    with pytest.raises(ConfigError, match="did not call"):
        admin_profile(encoder_only, x)


# ---------------------------------------------------------------------------------------------
# σReparam and attention entropy on the stacks


@pytest.mark.parametrize("kind", list(STACKS))
def test_sigma_reparam_applies_to_every_projection_and_keeps_outputs(kind):
    torch.manual_seed(10)
    s = stack(kind, depth=2, norm="pre").eval()
    inputs = stack_inputs(kind)
    before = s(*inputs)
    apply_sigma_reparam(s)
    names = [name for name, _ in iter_sigma_reparam(s)]
    per_layer = 4 * (2 if kind == "decoder" else 1) + 2
    assert len(names) == 2 * per_layer
    assert "layers.0.self_attn.sublayer.q_proj.weight" in names and "layers.1.ffn.sublayer.fc2.weight" in names
    torch.testing.assert_close(s(*inputs), before, atol=TOL, rtol=0)


def test_attention_entropy_finds_self_and_cross_attention_in_order_with_their_masks():
    torch.manual_seed(11)
    model = Seq2Seq(depth=2, norm="pre")
    src, tgt = torch.randn(3, 6, D), torch.randn(3, 5, D)
    src_pad, tgt_pad = padding(3, 6, [6, 2, 4]), padding(3, 5, [5, 3, 1])
    calls = {}
    for name, m in model.named_modules():
        if isinstance(m, MultiHeadAttention):
            m.register_forward_pre_hook(lambda m, a, kw, name=name: calls.__setitem__(name, (a, kw)), with_kwargs=True)
    got = attention_entropy(model, src, tgt, src_pad, tgt_pad)

    expected = ["encoder.layers.0.self_attn.sublayer", "encoder.layers.1.self_attn.sublayer"] + [
        f"decoder.layers.{i}.{kind}.sublayer" for i in range(2) for kind in ("self_attn", "cross_attn")]
    assert list(got) == expected
    for name in expected:
        args, kwargs = calls[name]
        attn = model.get_submodule(name)
        with torch.no_grad():
            probs = direct_probs(attn, *args, key_padding_mask=kwargs["key_padding_mask"],
                                 causal=kwargs.get("causal", False))
        query_pad = src_pad if name.startswith("encoder") else tgt_pad
        torch.testing.assert_close(got[name].double(), direct_entropy(probs, ~query_pad), atol=TOL, rtol=0)
    assert got["decoder.layers.0.self_attn.sublayer"].shape == (HEADS,)


def test_rank_collapse_finds_the_layers_both_stacks_declare_with_their_padding():
    """A model holding an encoder and a decoder declares nothing itself: each stack's
    ``transformer_blocks`` answers, prefixed with its name."""
    torch.manual_seed(12)
    model = Seq2Seq(depth=2, norm="pre")
    src, tgt = torch.randn(3, 6, D), torch.randn(3, 5, D)
    src_pad, tgt_pad = padding(3, 6, [6, 2, 4]), padding(3, 5, [5, 3, 1])
    got = rank_collapse(model, src, tgt, src_pad, tgt_pad)
    assert list(got) == ["encoder.layers.0", "encoder.layers.1", "decoder.layers.0", "decoder.layers.1"]
    outputs = {}
    for name in got:
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
    with torch.no_grad():
        model(src, tgt, src_pad, tgt_pad)
    for name, out in outputs.items():
        valid = ~(src_pad if name.startswith("encoder") else tgt_pad)
        assert got[name]["token_cosine"] == pytest.approx(float(token_cosine(out, valid)), abs=1e-6)
        assert got[name]["residual_ratio"] == pytest.approx(float(residual_ratio(out, valid)), abs=1e-6)


def test_stacks_compile_to_one_graph_with_masks():
    """Recording the masks on the attention modules must not break torch.compile's graph."""
    model = Seq2Seq(depth=1, norm="pre")
    src, tgt = torch.randn(2, 6, D), torch.randn(2, 5, D)
    explanation = torch._dynamo.explain(model)(src, tgt, padding(2, 6, [6, 3]), padding(2, 5, [5, 2]))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
