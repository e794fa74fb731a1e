"""The translation family's model against independent computations: the forward is fairseq's
(embedding·sqrt(d) + sinusoidal positions written out by hand, the stacks, the tied head), no target
position sees a later one (every norm placement and residual scheme), padding changes no real
output, σReparam covers exactly the attention and FFN matrices of both stacks, DeepNorm's constants
are REFERENCE.md's, Admin's profiling matches a hand computation of Transformer-Clinic's rule and
survives a state-dict round trip, the entropy probe matches a direct softmax of q·kᵀ for encoder
self-, decoder self- and cross-attention, and the configs have the parameter count of their shape."""

import copy
import math

import hydra
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn
from torch.nn.utils import parametrize

from sigma_repro.diagnostics import attention_entropy
from sigma_repro.errors import ConfigError
from sigma_repro.models.attention import MultiHeadAttention
from sigma_repro.models.seq2seq import Seq2SeqTransformer
from sigma_repro.reparam import apply_sigma_reparam, iter_sigma_reparam

from .conftest import CONF_DIR
from .helpers import direct_entropy

VOCAB, PAD, D, HEADS, FFN = 20, 0, 16, 2, 32
TINY = dict(vocab_size=VOCAB, pad_id=PAD, max_positions=24, dim=D, depth=2, num_heads=HEADS, ffn_dim=FFN,
            dropout=0.0)
TOL = 1e-5
# Every norm placement with every scheme it allows (sigma_repro.models.residual).
NORM_SCHEMES = [("post", "standard"), ("pre", "standard"), ("none", "standard"), ("pre", "scaled"),
                ("post", "admin"), ("post", "deepnorm"), ("none", "rezero")]


def tiny(seed=0, **options):
    torch.manual_seed(seed)
    return Seq2SeqTransformer(**{**TINY, **options}).eval()


def tokens(lengths, T, seed=0):
    """(B, T) random real tokens (ids 4..) padded with PAD after each row's length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (len(lengths), T), generator=g)
    return ids.masked_fill(torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None], PAD)


def fairseq_positions(T, dim, pad_id):
    """fairseq's SinusoidalPositionalEmbedding rows pad_id+1 .. pad_id+T, element by element."""
    half = dim // 2
    rows = []
    for t in range(T):
        p = t + pad_id + 1
        freqs = [math.exp(-i * math.log(10000) / (half - 1)) for i in range(half)]
        rows.append([math.sin(p * f) for f in freqs] + [math.cos(p * f) for f in freqs])
    return torch.tensor(rows)


# -- the forward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scale_embedding", [True, False])
def test_forward_is_embedding_positions_stacks_and_tied_head(scale_embedding):
    model = tiny(norm="pre", scale_embedding=scale_embedding)
    src, tgt = tokens([7, 4], 7), tokens([5, 3], 5, seed=1)
    scale = math.sqrt(D) if scale_embedding else 1.0
    E = model.embed.weight
    src_pad, tgt_pad = src.eq(PAD), tgt.eq(PAD)
    with torch.no_grad():
        memory = model.encoder(E[src] * scale + fairseq_positions(7, D, PAD), padding_mask=src_pad)
        hidden = model.decoder(E[tgt] * scale + fairseq_positions(5, D, PAD), memory, padding_mask=tgt_pad,
                               memory_padding_mask=src_pad)
        torch.testing.assert_close(model(src, tgt), hidden @ E.T, atol=TOL, rtol=0)


def test_shared_embedding_is_one_parameter_with_fairseq_init():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(vocab_size=400, pad_id=1, max_positions=8, dim=64, depth=1, num_heads=4, ffn_dim=64)
    assert model.head.weight is model.embed.weight and model.head.bias is None
    assert sum(p is model.embed.weight for p in model.parameters()) == 1
    assert torch.equal(model.embed.weight[1], torch.zeros(64))
    assert model.embed.weight[2:].std().item() == pytest.approx(64 ** -0.5, rel=0.05)


def test_depths_per_stack_and_final_norms_only_for_pre_ln():
    model = tiny(depth=3, decoder_depth=1)
    assert (len(model.encoder.layers), len(model.decoder.layers)) == (3, 1)
    assert [name for name, _ in model.transformer_blocks()] == [
        "encoder.layers.0", "encoder.layers.1", "encoder.layers.2", "decoder.layers.0"]
    assert model.transformer_blocks()[3][1] is model.decoder.layers[0]
    for norm, final in (("post", nn.Identity), ("pre", nn.LayerNorm), ("none", nn.Identity)):
        model = tiny(norm=norm)
        assert type(model.encoder.final_norm) is final and type(model.decoder.final_norm) is final


@pytest.mark.parametrize("options,match", [
    (dict(depth=0), "encoder_depth to be an integer >= 1, found 0"),
    (dict(decoder_depth=0), "decoder_depth to be an integer >= 1, found 0"),
    (dict(num_heads=3), "dim=16 is not divisible by model.num_heads=3"),
    (dict(dim=5, num_heads=1), "even number >= 4 .*, found 5"),
    (dict(dim=2, num_heads=1), "even number >= 4 .*, found 2"),
    (dict(pad_id=20), "pad_id=20 is not an id of the vocabulary of 20 tokens"),
    (dict(vocab_size=0), "vocab_size to be an integer >= 1"),
    (dict(norm="pre", scheme="deepnorm"), "needs norm='post'"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        Seq2SeqTransformer(**{**TINY, **options})


def test_sequences_longer_than_max_positions_are_clear_errors():
    model = tiny(max_positions=6)
    ok = torch.full((1, 6), 5)
    model(ok, ok)
    with pytest.raises(ConfigError, match="source sequence of 7 tokens.*max_positions=6"):
        model(torch.full((1, 7), 5), ok)
    with pytest.raises(ConfigError, match="target sequence of 7 tokens.*max_positions=6"):
        model(ok, torch.full((1, 7), 5))
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        model(torch.full((6,), 5), ok)


# -- masks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,scheme", NORM_SCHEMES, ids=[f"{n}-{s}" for n, s in NORM_SCHEMES])
def test_no_target_position_sees_a_later_one(norm, scheme):
    model = tiny(norm=norm, scheme=scheme)
    with torch.no_grad():  # weights large enough that every position visibly reads what it may see
        for name, p in model.named_parameters():
            if p.dim() == 2 and name != "embed.weight":
                p.normal_(std=0.3)
            elif name.endswith(".tau"):  # ReZero's branches start at τ = 0 and would mix nothing
                p.fill_(0.5)
    src, tgt = tokens([6, 4, 6], 6), tokens([8, 8, 8], 8, seed=1)
    t = 4
    perturbed = tgt.clone()
    perturbed[:, t] = 4 + (tgt[:, t] - 3) % (VOCAB - 4)  # another real token
    with torch.no_grad():
        before, after = model(src, tgt), model(src, perturbed)
    assert before.shape == (3, 8, VOCAB)
    assert torch.equal(after[:, :t], before[:, :t])  # a masked key's probability is exactly 0
    changed = (after[:, t:] - before[:, t:]).abs().amax(dim=(0, 2))
    assert (changed > 1e-3).all(), changed  # position t and every later one read the new token


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_padding_a_source_or_a_target_changes_no_real_output(norm):
    model = tiny(norm=norm)
    src, tgt = tokens([7, 4, 6], 7), tokens([5, 6, 2], 6, seed=1)
    with torch.no_grad():
        batch = model(src, tgt)  # (3, 6, V), both sides padded
        memory, src_mask = model.encode(src)
        assert torch.equal(src_mask, src.eq(PAD))
        for i, (S, T) in enumerate([(7, 5), (4, 6), (6, 2)]):
            alone = model(src[i:i + 1, :S], tgt[i:i + 1, :T])  # unpadded: no mask at all
            torch.testing.assert_close(batch[i:i + 1, :T], alone, atol=TOL, rtol=0)
            torch.testing.assert_close(memory[i:i + 1, :S], model.encode(src[i:i + 1, :S])[0], atol=TOL, rtol=0)
        # extra padded target positions change nothing before them
        longer = torch.cat([tgt, torch.full((3, 3), PAD)], dim=1)
        torch.testing.assert_close(model(src, longer)[:, :6], batch, atol=TOL, rtol=0)


def test_no_padding_means_no_mask_tensor():
    model = tiny()
    calls = []
    for name, m in model.named_modules():
        if isinstance(m, MultiHeadAttention):
            m.register_forward_hook(lambda m, a, out, name=name: calls.append((name, m.last_key_padding_mask)))
    with torch.no_grad():
        model(tokens([5, 5], 5), tokens([4, 4], 4))
    assert len(calls) == 2 + 4 and all(mask is None for _, mask in calls)
    assert model.encode(tokens([5, 5], 5))[1] is None


# -- σReparam ------------------------------------------------------------------------------------------

def projection_matrices(model):
    """Every q/k/v/out projection and FFN Linear of both stacks, by module name from the tree."""
    ends = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    return {name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith(("encoder.", "decoder.")) and name.endswith(ends)}


@pytest.mark.parametrize("norm", ["post", "none"])
def test_sigma_reparam_covers_every_projection_of_both_stacks_and_not_embedding_head_or_norms(norm):
    model = tiny(norm=norm, depth=2, decoder_depth=3)
    expected = projection_matrices(model)
    assert len(expected) == 2 * (4 + 2) + 3 * (8 + 2)
    with torch.no_grad():
        src, tgt = tokens([6, 3], 6), tokens([4, 5], 5, seed=1)
        before = model(src, tgt)
    apply_sigma_reparam(model)
    assert {name.removesuffix(".weight") for name, _ in iter_sigma_reparam(model)} == expected
    for module in (model.embed, model.head, *[m for m in model.modules() if isinstance(m, nn.LayerNorm)]):
        assert not parametrize.is_parametrized(module)
    assert model.head.weight is model.embed.weight  # still tied, still the raw embedding
    with torch.no_grad():  # γ = σ at apply time: the function is unchanged (up to float32 rounding of γ/σ·W)
        torch.testing.assert_close(model(src, tgt), before, atol=TOL * before.abs().max().item(), rtol=0)


# -- DeepNorm and Admin ----------------------------------------------------------------------------------

def gain_of(linears, fan_in, fan_out):
    """The xavier_normal gain the weights were drawn with: their std / sqrt(2 / (fan_in + fan_out))."""
    w = torch.cat([m.weight.detach().flatten() for m in linears])
    return w.std().item() / math.sqrt(2 / (fan_in + fan_out))


@pytest.mark.parametrize("n_enc,n_dec,enc,dec", [
    (6, 6, (1.418, 0.497), (2.060, 0.343)),  # REFERENCE.md §2
    (12, 3, (0.81 * (12**4 * 3) ** (1 / 16), 0.87 * (12**4 * 3) ** (-1 / 16)), ((3 * 3) ** 0.25, (12 * 3) ** -0.25)),
])
def test_deepnorm_constants_are_set_per_encoder_decoder_pair(n_enc, n_dec, enc, dec):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(vocab_size=32, pad_id=0, max_positions=8, dim=64, encoder_depth=n_enc,
                               decoder_depth=n_dec, num_heads=4, ffn_dim=256, scheme="deepnorm")
    for stack, (alpha, beta) in ((model.encoder, enc), (model.decoder, dec)):
        omegas = {sub.omega for _, sub in stack.residual_sublayers()}
        assert len(omegas) == 1 and omegas.pop() == pytest.approx(alpha, abs=1e-3)
        attns = [m for m in stack.modules() if isinstance(m, MultiHeadAttention)]
        assert gain_of([m.v_proj for m in attns] + [m.out_proj for m in attns], 64, 64) == pytest.approx(beta, rel=0.03)
        assert gain_of([m.q_proj for m in attns] + [m.k_proj for m in attns], 64, 64) == pytest.approx(1.0, rel=0.03)
        assert gain_of([layer.ffn.sublayer.fc1 for layer in stack.layers], 64, 256) == pytest.approx(beta, rel=0.03)


def hand_admin_profile(model, src, tgt):
    """Transformer-Clinic's profiling written out on a copy: sublayer by sublayer in call order,
    ω_i = r, then r = sqrt(Var(x·ω_i) + Var(f_i(x))) over all elements (padding included), r = 1 at the
    start of each stack; post-LN x <- LN(x·ω_i + f_i(x)). Dropout is 0, so train mode changes nothing."""
    model = copy.deepcopy(model)
    scale, E = math.sqrt(D), model.embed.weight
    src_pad, tgt_pad = src.eq(PAD), tgt.eq(PAD)
    omegas = []

    def run(layers, x, calls):
        r = 1.0
        for layer in layers:
            for sub, call in calls(layer):
                omegas.append(r)
                skip, branch = x * r, call(sub.sublayer, x)
                r = math.sqrt(skip.double().var(correction=0).item() + branch.double().var(correction=0).item())
                x = F.layer_norm(skip + branch, (D,), sub.post_norm.weight, sub.post_norm.bias)
        return x

    with torch.no_grad():
        memory = run(model.encoder.layers, E[src] * scale + fairseq_positions(src.shape[1], D, PAD), lambda layer: [
            (layer.self_attn, lambda f, x: f(x, key_padding_mask=src_pad)), (layer.ffn, lambda f, x: f(x))])
        run(model.decoder.layers, E[tgt] * scale + fairseq_positions(tgt.shape[1], D, PAD), lambda layer: [
            (layer.self_attn, lambda f, x: f(x, key_padding_mask=tgt_pad, causal=True)),
            (layer.cross_attn, lambda f, x: f(x, memory, key_padding_mask=src_pad)),
            (layer.ffn, lambda f, x: f(x))])
    return omegas


def test_admin_profile_matches_the_hand_rule_and_is_restored_from_a_state_dict():
    model = tiny(scheme="admin", depth=2, decoder_depth=3)
    src, tgt = tokens([7, 5, 3], 7), tokens([6, 2, 4], 6, seed=1)
    assert model.needs_admin_profile and not model.admin_profiled
    reference = hand_admin_profile(model, src, tgt)
    profiled = model.profile_admin(src, tgt)
    names = [f"{part}.{name}" for part in ("encoder", "decoder")
             for name, _ in getattr(model, part).residual_sublayers()]
    assert list(profiled) == names and len(names) == 2 * 2 + 3 * 3
    assert list(profiled.values()) == pytest.approx(reference, rel=1e-6)
    assert profiled[names[0]] == profiled[names[4]] == 1.0  # r restarts at 1 in the decoder
    for name, omega in profiled.items():
        torch.testing.assert_close(model.get_submodule(name).omega.detach(), torch.full((D,), omega))
    assert bool(model.admin_profiled) and not model.needs_admin_profile and not model.training

    state = model.state_dict()
    assert state["admin_profiled"].dtype == torch.bool and bool(state["admin_profiled"])
    fresh = tiny(seed=1, scheme="admin", depth=2, decoder_depth=3)
    assert fresh.needs_admin_profile
    fresh.load_state_dict(state)
    assert not fresh.needs_admin_profile
    for name, omega in profiled.items():
        torch.testing.assert_close(fresh.get_submodule(name).omega.detach(), torch.full((D,), omega))
    with torch.no_grad():
        torch.testing.assert_close(fresh(src, tgt), model(src, tgt), atol=0, rtol=0)


def test_only_admin_models_need_or_take_a_profile():
    model = tiny(scheme="deepnorm")
    assert not model.needs_admin_profile
    with pytest.raises(ConfigError, match="scheme='deepnorm'.*build it with scheme='admin'"):
        model.profile_admin(tokens([3], 3), tokens([3], 3))


# -- attention entropy ------------------------------------------------------------------------------------

def direct_probs(model, src, tgt):
    """{attention name: (B, H, Tq, Tk) float64 probabilities, query_valid (B, Tq)}: softmax(q kᵀ/sqrt(hd))
    from each module's own q_proj, k_proj on the inputs it received, padded keys (and later target
    positions in decoder self-attention) at -inf."""
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args))
               for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
    src_pad, tgt_pad = src.eq(PAD), tgt.eq(PAD)
    with torch.no_grad():
        model(src, tgt)
        for h in handles:
            h.remove()
        out = {}
        for name, args in inputs.items():
            attn = model.get_submodule(name)
            x, context = args[0], args[1] if len(args) > 1 else args[0]
            B, Tq, Tk = x.shape[0], x.shape[1], context.shape[1]
            q = attn.q_proj(x).double().view(B, Tq, HEADS, -1).transpose(1, 2)  # (B, H, Tq, hd)
            k = attn.k_proj(context).double().view(B, Tk, HEADS, -1).transpose(1, 2)
            logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            keys_pad = tgt_pad if ".self_attn" in name and name.startswith("decoder") else src_pad
            logits = logits.masked_fill(keys_pad[:, None, None, :], float("-inf"))
            if name.startswith("decoder") and ".self_attn" in name:
                logits = logits.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool).triu(1), float("-inf"))
            out[name] = (logits.softmax(-1), ~(src_pad if name.startswith("encoder") else tgt_pad))
    return out


@pytest.mark.parametrize("reparam", [False, True], ids=["plain", "sigma"])
def test_entropy_probe_matches_a_direct_softmax_for_each_kind_of_attention(reparam):
    model = tiny(norm="post", depth=2)
    if reparam:
        apply_sigma_reparam(model, gamma_init=1.0)  # changes the function, so Ŵ must be what is read
    src, tgt = tokens([7, 3, 5], 7), tokens([6, 2, 4], 6, seed=1)
    got, got_norm = attention_entropy(model, src, tgt), attention_entropy(model, src, tgt, normalized=True)
    ref = direct_probs(model, src, tgt)
    assert list(got) == list(ref) == [
        "encoder.layers.0.self_attn.sublayer", "encoder.layers.1.self_attn.sublayer",
        "decoder.layers.0.self_attn.sublayer", "decoder.layers.0.cross_attn.sublayer",
        "decoder.layers.1.self_attn.sublayer", "decoder.layers.1.cross_attn.sublayer"]
    for name, (probs, query_valid) in ref.items():
        torch.testing.assert_close(got[name].double(), direct_entropy(probs, query_valid), atol=TOL, rtol=0)
        torch.testing.assert_close(got_norm[name].double(), direct_entropy(probs, query_valid, normalized=True),
                                   atol=TOL, rtol=0)
    assert got["decoder.layers.0.cross_attn.sublayer"].shape == (HEADS,)


# -- configs -------------------------------------------------------------------------------------------------

def seq2seq_params(V, d, f, N, M, *, norm="post"):
    """Shared embedding (tied head, no positions), N encoder layers (attention, FFN, two LayerNorms),
    M decoder layers (two attentions, FFN, three LayerNorms), a final LayerNorm per stack for pre-LN."""
    attention, ffn, norm_params = 4 * (d * d + d), d * f + f + f * d + d, 2 * d
    final = 2 * norm_params if norm == "pre" else 0
    return V * d + N * (attention + ffn + 2 * norm_params) + M * (2 * attention + ffn + 3 * norm_params) + final


@pytest.mark.parametrize("name,V,shape", [("mt_tiny", 6000, (64, 256, 4, 6)), ("mt_base", 32768, (512, 2048, 8, 6))])
def test_model_configs_have_the_parameter_count_of_their_shape(name, V, shape):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}"])
    assert cfg.model.encoder_depth is None and cfg.model.decoder_depth is None and cfg.model.dropout == 0.1
    assert (cfg.model.dim, cfg.model.ffn_dim, cfg.model.num_heads, cfg.model.depth) == shape
    assert (cfg.model.norm, cfg.model.scheme) == ("post", "standard")
    with torch.device("meta"):  # shapes only
        model = hydra.utils.instantiate(cfg.model, vocab_size=V, pad_id=0, max_positions=256)
    got = sum(p.numel() for p in model.parameters())
    d, f, _, L = shape
    assert got == seq2seq_params(V, d, f, L, L)
    assert got == {"mt_tiny": 1_084_416, "mt_base": 60_915_712}[name]  # the numbers in the YAML comments
    assert seq2seq_params(V, d, f, L, L, norm="pre") == got + 4 * d
