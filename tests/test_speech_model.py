"""The asr family's models against independent computations: output lengths are the convolution
arithmetic floor((L + 2p - k)/s) + 1 for odd and even L and match the logits and the attention masks,
padding changes no real output, σReparam covers exactly the matrices a hand-written list of the module
tree names (attention in/out projections, FFN Linears, pointwise and depthwise Conv1d, the front ends'
Conv2d/Conv1d, the heads) and no norm or bias, the entropy probe equals a direct softmax of each
model's own q·kᵀ with padding, layer-drop and CAPE act in training only and repeat under a seed, and
the configs have the parameter count of their shape (the paper's 36 x 768 built on the meta device)."""

import math

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.nn.utils import parametrize

from sigma_repro.diagnostics import attention_entropy
from sigma_repro.errors import ConfigError
from sigma_repro.models.attention import MultiHeadAttention
from sigma_repro.models.speech import ConformerCTC, SpeechTransformer, continuous_sinusoidal
from sigma_repro.reparam import apply_sigma_reparam, iter_sigma_reparam

from .conftest import CONF_DIR
from .helpers import direct_entropy

F_IN, V, TOL = 20, 29, 1e-5
CONFORMER = dict(input_dim=F_IN, vocab_size=V, dim=32, depth=2, num_heads=4, ffn_dim=64, kernel_size=5,
                 dropout=0.0, use_group_norm=True)
TRANSFORMER = dict(input_dim=F_IN, vocab_size=V, dim=32, depth=2, num_heads=4, ffn_dim=64, attention_dropout=0.0,
                   activation_dropout=0.0, layer_drop=0.0)


def conformer(seed=0, **options):
    torch.manual_seed(seed)
    return ConformerCTC(**{**CONFORMER, **options}).eval()


def transformer(seed=0, **options):
    torch.manual_seed(seed)
    return SpeechTransformer(**{**TRANSFORMER, **options}).eval()


def batch(lengths, T=None, seed=0):
    """(B, T, F_IN) random features zero-padded past each length, and the lengths."""
    T = max(lengths) if T is None else T
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), T, F_IN, generator=g)
    lengths = torch.tensor(lengths)
    return x.masked_fill(torch.arange(T)[None, :, None] >= lengths[:, None, None], 0.0), lengths


def conv_length(L, k, s, p=0):
    return (L + 2 * p - k) // s + 1


ODD_AND_EVEN = [7, 8, 9, 10, 11, 12, 13, 24, 25, 31, 100, 101]


# -- output lengths --------------------------------------------------------------------------------

@pytest.mark.parametrize("build,expected", [
    (conformer, lambda L: conv_length(conv_length(L, 3, 2), 3, 2)),  # two k3/s2 Conv2d, no padding
    (transformer, lambda L: conv_length(L, 7, 3, p=3)),  # Conv1d k7/s3, padding 3
], ids=["conformer", "transformer"])
def test_output_lengths_match_the_convolutions_the_logits_and_the_attention_masks(build, expected):
    model = build()
    masks = []  # the key padding mask of every attention call

    def record(module, args, kwargs):
        masks.append(kwargs.get("key_padding_mask"))

    for m in model.modules():
        if isinstance(m, (nn.MultiheadAttention, MultiHeadAttention)):
            m.register_forward_pre_hook(record, with_kwargs=True)
    lengths = torch.tensor(ODD_AND_EVEN)
    want = torch.tensor([expected(L) for L in ODD_AND_EVEN])
    assert torch.equal(model.output_lengths(lengths), want)
    with torch.no_grad():
        for L, n in zip(ODD_AND_EVEN, want.tolist()):  # alone: the logits have exactly n frames, no mask
            masks.clear()
            logits, out = model(*batch([L]))
            assert logits.shape == (1, n, V) and out.tolist() == [n]
            assert all(mask is None or not mask.any() for mask in masks)
        masks.clear()
        features, _ = batch(ODD_AND_EVEN, T=120)  # padded beyond the longest: trimmed first
        logits, out = model(features, lengths)
    assert torch.equal(out, want) and logits.shape == (len(ODD_AND_EVEN), max(want), V)
    pad = torch.arange(max(want))[None, :] >= want[:, None]
    assert len(masks) == 2 and all(torch.equal(mask, pad) for mask in masks)


def test_too_short_utterances_and_bad_shapes_are_clear_errors():
    model = conformer()
    with pytest.raises(ValueError, match="utterances of 7 to 6 frames.*got lengths 6..6"):
        model(*batch([6]))
    with pytest.raises(ValueError, match=r"shape \(batch, time, 20\).*got shape \(2, 9, 21\)"):
        model(torch.zeros(2, 9, F_IN + 1), torch.tensor([9, 9]))
    with pytest.raises(ValueError, match="lengths cannot exceed.*got lengths 9..10"):
        model(torch.zeros(2, 9, F_IN), torch.tensor([9, 10]))
    with pytest.raises(ValueError, match="integer lengths of shape"):
        transformer()(torch.zeros(2, 9, F_IN), torch.tensor([9.0, 9.0]))


@pytest.mark.parametrize("build,options,match", [
    (ConformerCTC, dict(kernel_size=4), "kernel_size must be odd"),
    (ConformerCTC, dict(num_heads=3), "dim=32 is not divisible by model.num_heads=3"),
    (ConformerCTC, dict(input_dim=6), "at least 7 feature bins"),
    (ConformerCTC, dict(depth=0), "model.depth to be an integer >= 1, found 0"),
    (SpeechTransformer, dict(layer_drop=1.0), "layer_drop must be a probability in"),
    (SpeechTransformer, dict(cape_global_scaling=0.9), "cape_global_scaling must be >= 1"),
    (SpeechTransformer, dict(cape_global_shift=-1.0), "cape_global_shift must be >= 0"),
    (SpeechTransformer, dict(frame_seconds=0), "frame_seconds must be"),
    (SpeechTransformer, dict(norm="pre", scheme="deepnorm"), "needs norm='post'"),
    (SpeechTransformer, dict(vocab_size=0), "vocab_size to be an integer >= 1"),
])
def test_bad_options_are_clear_errors(build, options, match):
    base = CONFORMER if build is ConformerCTC else TRANSFORMER
    with pytest.raises(ConfigError, match=match):
        build(**{**base, **options})


# -- padding ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build,options", [
    (conformer, dict(use_group_norm=True)), (conformer, dict(use_group_norm=False)),
    (transformer, dict(norm="post")), (transformer, dict(norm="pre")), (transformer, dict(norm="none")),
], ids=["conformer-groupnorm", "conformer-batchnorm", "transformer-post", "transformer-pre", "transformer-none"])
def test_an_utterance_s_logits_do_not_change_when_batched_with_longer_ones(build, options):
    model = build(**options)
    if not options.get("use_group_norm", True):  # eval BatchNorm with non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
    lengths = [61, 23, 40, 8]
    features, lengths_t = batch(lengths)
    with torch.no_grad():
        logits, out = model(features, lengths_t)
        for i, L in enumerate(lengths):
            alone, n = model(features[i:i + 1, :L], lengths_t[i:i + 1])
            assert n.item() == out[i].item()
            torch.testing.assert_close(logits[i:i + 1, :n.item()], alone, atol=TOL, rtol=0)


# -- σReparam -----------------------------------------------------------------------------------------

def conformer_matrices(depth):
    """Every matrix the paper reparameterises in ConformerCTC, written out from torchaudio's layer layout."""
    names = {"subsampling.0.weight", "subsampling.2.weight", "input_proj.weight", "head.weight"}
    for i in range(depth):
        layer = f"conformer.conformer_layers.{i}"
        names |= {f"{layer}.self_attn.in_proj_weight", f"{layer}.self_attn.out_proj.weight"}
        names |= {f"{layer}.{ffn}.sequential.{j}.weight" for ffn in ("ffn1", "ffn2") for j in (1, 4)}
        # pointwise Conv1d (dim -> 2 dim), depthwise Conv1d (groups = dim), pointwise Conv1d (dim -> dim)
        names |= {f"{layer}.conv_module.sequential.{j}.weight" for j in (0, 2, 5)}
    return names


def transformer_matrices(depth):
    names = {"front_end.0.weight", "head.weight"}
    for i in range(depth):
        names |= {f"encoder.layers.{i}.self_attn.sublayer.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
        names |= {f"encoder.layers.{i}.ffn.sublayer.{p}.weight" for p in ("fc1", "fc2")}
    return names


@pytest.mark.parametrize("build,matrices,norm_types", [
    (conformer, conformer_matrices, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)),
    (transformer, transformer_matrices, (nn.LayerNorm,)),
], ids=["conformer", "transformer"])
def test_sigma_reparam_covers_every_matrix_and_no_norm_or_bias(build, matrices, norm_types):
    model = build()
    features, lengths = batch([30, 17])
    with torch.no_grad():
        before = model(features, lengths)[0]
    apply_sigma_reparam(model)
    covered = sorted(name for name, _ in iter_sigma_reparam(model))
    print(f"\n{type(model).__name__}: σReparam covers {len(covered)} matrices:\n  " + "\n  ".join(covered))
    assert set(covered) == matrices(2)
    if isinstance(model, ConformerCTC):
        depthwise = model.conformer.conformer_layers[0].conv_module.sequential[2]
        assert depthwise.groups == depthwise.in_channels == 32 and parametrize.is_parametrized(depthwise, "weight")
    for name, module in model.named_modules():
        if isinstance(module, norm_types):
            assert not parametrize.is_parametrized(module), name
        if parametrize.is_parametrized(module):
            assert set(module.parametrizations) <= {"weight", "in_proj_weight"}, name  # never a bias
    with torch.no_grad():  # γ = σ at apply time: the function is unchanged
        after = model(features, lengths)[0]
    torch.testing.assert_close(after, before, atol=TOL * before.abs().max().item(), rtol=0)


# -- attention entropy ----------------------------------------------------------------------------------

def direct_probs(model, features, lengths):
    """{attention name: ((B, H, Tq, Tk) float64 softmax(q kᵀ/sqrt(hd)) with padded keys at -inf, (B, Tq)
    real queries)}, q and k from each module's own (possibly σReparam) projection weights and inputs."""
    inputs, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.MultiheadAttention, MultiHeadAttention)):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, kwargs, name=name: inputs.__setitem__(name, (args, kwargs)), with_kwargs=True))
    with torch.no_grad():
        _, out_lengths = model(features, lengths)
        for h in handles:
            h.remove()
        real = torch.arange(int(out_lengths.max()))[None, :] < out_lengths[:, None]  # (B, T')
        probs = {}
        for name, (args, kwargs) in inputs.items():
            attn = model.get_submodule(name)
            if isinstance(attn, nn.MultiheadAttention):  # torchaudio: query (T, B, D), packed [q; k; v] rows
                x = kwargs["query"].transpose(0, 1)
                w_q, w_k, _ = attn.in_proj_weight.chunk(3)
                b_q, b_k, _ = attn.in_proj_bias.chunk(3)
                q, k, heads = x @ w_q.T + b_q, x @ w_k.T + b_k, attn.num_heads
            else:
                x = args[0]
                q, k, heads = attn.q_proj(x), attn.k_proj(x), attn.num_heads
            B, T, D = q.shape
            q = q.double().view(B, T, heads, D // heads).transpose(1, 2)  # (B, H, T, hd)
            k = k.double().view(B, T, heads, D // heads).transpose(1, 2)
            logits = (q @ k.transpose(-2, -1) / math.sqrt(D // heads)).masked_fill(~real[:, None, None, :], -math.inf)
            probs[name] = (logits.softmax(-1), real)
    return probs


@pytest.mark.parametrize("reparam", [False, True], ids=["plain", "sigma"])
@pytest.mark.parametrize("build", [conformer, transformer], ids=["conformer", "transformer"])
def test_entropy_probe_matches_a_direct_softmax_with_padding(build, reparam):
    model = build()
    if reparam:
        apply_sigma_reparam(model, gamma_init=1.0)  # changes the function, so Ŵ must be what is read
    features, lengths = batch([50, 21, 33])
    got = attention_entropy(model, features, lengths)
    got_norm = attention_entropy(model, features, lengths, normalized=True)
    ref = direct_probs(model, features, lengths)
    assert list(got) == list(ref) and len(ref) == 2
    for name, (probs, real) in ref.items():
        torch.testing.assert_close(got[name].double(), direct_entropy(probs, real), atol=TOL, rtol=0)
        torch.testing.assert_close(got_norm[name].double(), direct_entropy(probs, real, normalized=True),
                                   atol=TOL, rtol=0)


# -- layer-drop and CAPE --------------------------------------------------------------------------------

def test_layer_drop_draws_in_training_only_and_repeats_under_a_seed():
    model = transformer(depth=6, layer_drop=0.3)
    features, lengths = batch([40, 25])
    torch.manual_seed(1)
    with torch.no_grad():
        first = model(features, lengths)[0]
        torch.manual_seed(2)
        assert torch.equal(model(features, lengths)[0], first)  # eval: no draw, no drop
    assert model.dropped_layers() == [False] * 6
    model.train()
    draws = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        draws.append([model.dropped_layers() for _ in range(4)])
    assert draws[0] == draws[1] and draws[0] != draws[2]
    torch.manual_seed(0)
    rate = torch.tensor([model.dropped_layers() for _ in range(2000)]).float().mean().item()
    assert rate == pytest.approx(0.3, abs=0.015)  # 12,000 Bernoulli(0.3) draws: 5 standard errors
    torch.manual_seed(5)
    a = model(features, lengths)[0]
    torch.manual_seed(5)
    assert torch.equal(model(features, lengths)[0], a)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_a_dropped_layer_is_flashlight_s_zero_branch_and_every_parameter_gets_a_gradient(norm, monkeypatch):
    """flashlight's layer with f = 0: post-LN LN2(LN1(x + 0) + 0), pre-LN x + 0; its parameters get a
    zero gradient (DDP needs every parameter in the graph), the others a real one."""
    model = transformer(norm=norm, cape_global_shift=0.0).train()
    monkeypatch.setattr(model, "dropped_layers", lambda: [True, False])
    features, lengths = batch([30, 19])
    logits, _ = model(features, lengths)
    with torch.no_grad():
        x = model.front_end(features.transpose(1, 2)).transpose(1, 2)
        x = x + continuous_sinusoidal(torch.arange(x.shape[1]).float(), 32)
        layer0 = model.encoder.layers[0]
        if norm == "post":
            x = layer0.ffn.post_norm(layer0.self_attn.post_norm(x))
        pad = torch.arange(x.shape[1])[None, :] >= model.output_lengths(lengths)[:, None]
        x = model.encoder.final_norm(model.encoder.layers[1](x, padding_mask=pad))
        torch.testing.assert_close(logits, model.head(x), atol=TOL, rtol=0)
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        zero = name.startswith("encoder.layers.0.") and not (norm == "post" and "post_norm" in name)
        assert (p.grad.abs().max().item() == 0) == zero, name


def test_cape_shifts_and_scales_positions_in_training_only():
    model = transformer(cape_global_shift=1.5, cape_global_scaling=1.1, frame_seconds=0.01, stride=3)
    assert torch.equal(model.positions(3, 8), torch.arange(8.0).expand(3, 8))
    state = torch.get_rng_state()
    features, lengths = batch([30, 19])
    with torch.no_grad():
        eval_out = model(features, lengths)[0]
    assert torch.equal(torch.get_rng_state(), state)  # eval draws nothing
    model.train()
    p = model.positions(1000, 8)
    step = p.diff(dim=1)  # λ per utterance, the same between every pair of positions
    torch.testing.assert_close(step, step[:, :1].expand_as(step))
    lam = step[:, 0]
    assert lam.min() >= 1 / 1.1 - 1e-6 and lam.max() <= 1.1 + 1e-6 and lam.std() > 0.02
    shift = p[:, 0] / lam  # Δ in output frames: 1.5 s at 30 ms per frame is at most 50 frames
    assert shift.abs().max() <= 50 + 1e-3 and shift.abs().max() > 45 and shift.std() > 20
    # with nothing else random (no dropout, no layer-drop), training differs from eval only by positions
    plain = transformer(cape_global_shift=0.0).train()
    with torch.no_grad():
        torch.testing.assert_close(plain(features, lengths)[0], eval_out, atol=TOL, rtol=0)
        assert (model(features, lengths)[0] - eval_out).abs().max() > 1e-2


# -- configs ---------------------------------------------------------------------------------------------

def conformer_params(F, V, d, f, k, L, C=None):
    """Conv2d(1, C, 3) + Conv2d(C, C, 3) + Linear(C·F'', d); per layer two FFNs (LN, d->f, f->d), attention
    (LN, packed in_proj 3d x d, out_proj), conv module (LN, pointwise d->2d, depthwise d x k, norm,
    pointwise d->d), final LN; head d->V. Every Linear/Conv with bias."""
    C = d if C is None else C
    freq = ((F - 1) // 2 - 1) // 2
    front = (9 * C + C) + (9 * C * C + C) + (C * freq * d + d)
    ffn = 2 * d + d * f + f + f * d + d
    attention = 2 * d + 3 * d * d + 3 * d + d * d + d
    conv = 2 * d + (d * 2 * d + 2 * d) + (d * k + d) + 2 * d + (d * d + d)
    return front + L * (2 * ffn + attention + conv + 2 * d) + d * V + V


def transformer_params(F, V, d, f, L, k=7, norm="post"):
    """Conv1d(F, 2d, k) + L x (q/k/v/out, FFN, two LayerNorms) (+ final LN for pre-LN) + head d->V."""
    layer = 4 * (d * d + d) + (d * f + f + f * d + d) + (2 * 2 * d if norm != "none" else 0)
    return (F * k * 2 * d + 2 * d) + L * layer + (2 * d if norm == "pre" else 0) + d * V + V


@pytest.mark.parametrize("name,expected", [
    ("conformer_tiny", (1_127_165, lambda: conformer_params(80, 29, 96, 384, 15, 4))),
    ("conformer", (8_357_933, lambda: conformer_params(80, 29, 144, 576, 31, 16))),
    ("speech_transformer_tiny", (1_336_989, lambda: transformer_params(80, 29, 128, 512, 6))),
    ("speech_transformer", (256_047_389, lambda: transformer_params(80, 29, 768, 3072, 36))),
])
def test_model_configs_have_the_parameter_count_of_their_shape(name, expected):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}"])
    if name == "speech_transformer":  # the paper's model (REFERENCE.md §1)
        m = cfg.model
        assert (m.dim, m.depth, m.num_heads, m.ffn_dim, m.activation, m.kernel_size, m.stride) == (
            768, 36, 4, 3072, "relu", 7, 3)
        assert m.layer_drop == m.attention_dropout == m.activation_dropout == 0.3
    with torch.device("meta"):  # shapes only: the 256M-parameter model costs no memory
        model = hydra.utils.instantiate(cfg.model, input_dim=80, vocab_size=29)
    got = sum(p.numel() for p in model.parameters())
    in_yaml, formula = expected
    assert got == formula() == in_yaml  # the number in the YAML comment
