"""Decoding against independent computations: the KV cache (attention and whole model) gives the full
forward's outputs at every step, greedy decoding equals a naive greedy that reruns the whole model
without a cache, beam search with a beam wider than the search space equals an exhaustive search
over every sequence of a tiny vocabulary, beam 1 equals greedy, and fairseq's rules (length
penalty, min length 1, per-sentence max length, forced eos) hold on a scripted model."""

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sigma_repro.diagnostics import attention_entropy
from sigma_repro.errors import ConfigError
from sigma_repro.models.attention import MultiHeadAttention
from sigma_repro.models.decoding import beam_search, greedy_decode, reorder_cache
from sigma_repro.models.seq2seq import Seq2SeqTransformer
from sigma_repro.reparam import apply_sigma_reparam

from .helpers import direct_entropy

PAD, UNK, BOS, EOS = 0, 1, 2, 3
TOL = 1e-5
IDS = dict(bos_id=BOS, eos_id=EOS)


def tiny(vocab=20, seed=0, **options):
    torch.manual_seed(seed)
    return Seq2SeqTransformer(**{**dict(vocab_size=vocab, pad_id=PAD, max_positions=32, dim=16, depth=2,
                                        num_heads=2, ffn_dim=32, dropout=0.0), **options}).eval()


def sources(lengths, vocab=20, seed=0):
    """(B, max length) random real tokens ending in eos, padded after each row's length."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    src = torch.randint(4, vocab, (len(lengths), T), generator=g)
    src[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = EOS
    return src.masked_fill(torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None], PAD)


# -- the cache ---------------------------------------------------------------------------------------------

def test_attention_cache_appends_self_attention_keys_and_computes_cross_keys_once():
    torch.manual_seed(0)
    attn, cross = MultiHeadAttention(16, 2).eval(), MultiHeadAttention(16, 2, kdim=12).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 4, 12)
    pad = torch.tensor([[False, True, False, False, False], [False] * 5])  # a padded key in the middle
    memory_pad = torch.tensor([[False, False, True, True], [False] * 4])
    full = attn(x, key_padding_mask=pad, causal=True)
    full_cross = cross(x, memory, key_padding_mask=memory_pad)
    self_cache, cross_cache, cross_keys = {}, {}, []
    cross.k_proj.register_forward_hook(lambda m, a, out: cross_keys.append(out))
    steps = [attn(x[:, :2], key_padding_mask=pad[:, :2], causal=True, cache=self_cache)]  # two at once from empty
    cross_steps = [cross(x[:, :2], memory, key_padding_mask=memory_pad, cache=cross_cache)]
    for t in range(2, 5):
        steps.append(attn(x[:, t:t + 1], key_padding_mask=pad[:, :t + 1], causal=True, cache=self_cache))
        assert attn.last_causal is False and torch.equal(attn.last_query_padding_mask, pad[:, t:t + 1])
        cross_steps.append(cross(x[:, t:t + 1], memory, key_padding_mask=memory_pad, cache=cross_cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cat(cross_steps, 1), full_cross, atol=TOL, rtol=0)
    assert self_cache["k"].shape == (2, 2, 5, 8) and cross_cache["k"].shape == (2, 2, 4, 8)
    assert len(cross_keys) == 1  # keys and values of the encoder output: computed once
    with pytest.raises(ValueError, match="one new position per call, got 2"):
        attn(x[:, :2], causal=True, cache=self_cache)


def test_entropy_probe_reads_a_cached_step_as_the_last_row_of_the_full_softmax():
    torch.manual_seed(1)
    attn = MultiHeadAttention(16, 2).eval()
    x = torch.randn(3, 6, 16)
    cache = {}
    with torch.no_grad():
        attn(x[:, :5], causal=True, cache=cache)
    got = attention_entropy(attn, x[:, 5:], causal=True, cache=cache)[""]
    q = attn.q_proj(x).view(3, 6, 2, 8).transpose(1, 2).double()  # (B, H, T, hd)
    k = attn.k_proj(x).view(3, 6, 2, 8).transpose(1, 2).double()
    probs = (q[:, :, 5:] @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1)  # the last query sees every key
    torch.testing.assert_close(got.double(), direct_entropy(probs.detach()), atol=TOL, rtol=0)


@pytest.mark.parametrize("norm,scheme", [("post", "standard"), ("pre", "standard"), ("post", "admin"),
                                         ("post", "deepnorm"), ("none", "scaled")])
def test_incremental_decode_equals_the_full_forward_at_every_step(norm, scheme):
    model = tiny(norm=norm, scheme=scheme, depth=2, decoder_depth=3)
    src = sources([7, 3, 5])
    tgt = torch.cat([torch.full((3, 1), BOS), sources([6, 6, 6], seed=1)[:, :5]], 1)  # (3, 6), no padding
    with torch.no_grad():
        full = model(src, tgt)
        memory, src_mask = model.encode(src)
        cache = {}
        steps = [model.decode(tgt[:, :2], memory, src_mask, cache=cache)]  # two positions from an empty cache
        steps += [model.decode(tgt[:, t:t + 1], memory, src_mask, cache=cache) for t in range(2, 6)]
    assert cache["length"] == 6
    for t, step in enumerate(torch.cat(steps, 1).unbind(1)):
        torch.testing.assert_close(step, full[:, t], atol=TOL, rtol=0)
    layer = cache["decoder"]["layers.2"]
    assert layer["self_attn"]["k"].shape == (3, 2, 6, 8) and layer["cross_attn"]["k"].shape == (3, 2, 7, 8)
    with pytest.raises(ValueError, match="real tokens only"):
        model.decode(torch.full((3, 1), PAD), memory, src_mask, cache=cache)


def test_reorder_cache_selects_rows_of_every_tensor():
    cache = {"length": 3, "decoder": {"layers.0": {"self_attn": {"k": torch.arange(4.0)[:, None]}}}}
    reorder_cache(cache, torch.tensor([2, 2, 0]))
    assert cache["length"] == 3
    assert cache["decoder"]["layers.0"]["self_attn"]["k"].flatten().tolist() == [2.0, 2.0, 0.0]


# -- greedy and beam search on a real model --------------------------------------------------------------

def max_len(n, a, b, max_positions):
    return max(1, min(int(a * n + b), max_positions - 1))


def naive_greedy(model, src, a, b):
    """Greedy without a cache: the whole model rerun on the growing target, one sentence at a time."""
    out = []
    for row in src:
        row = row[row != PAD][None]  # (1, n)
        limit, tgt = max_len(row.shape[1], a, b, model.max_positions), [BOS]
        while True:
            with torch.no_grad():
                lp = F.log_softmax(model(row, torch.tensor([tgt]))[0, -1], -1)
            lp[[PAD, BOS]] = -math.inf
            if len(tgt) == 1:
                lp[EOS] = -math.inf
            token = EOS if len(tgt) - 1 == limit else int(lp.argmax())
            if token == EOS:
                break
            tgt.append(token)
        out.append(tgt[1:])
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_equals_a_naive_greedy_without_cache(seed):
    model = tiny(seed=seed, norm="pre" if seed else "post")
    src = sources([9, 4, 6, 2], seed=seed)
    got = greedy_decode(model, src, **IDS, max_len_a=1.0, max_len_b=3)
    assert got == naive_greedy(model, src, 1.0, 3)
    assert [len(h) for h in got] != [0] * 4


def score(model, src_row, hypothesis):
    """log p(hypothesis + eos | source) by the full forward, pad/bos never chosen (not renormalised)."""
    tgt = torch.tensor([[BOS] + hypothesis])
    with torch.no_grad():
        lp = F.log_softmax(model(src_row[None], tgt)[0], -1)  # (len + 1, V)
    return sum(lp[t, y].item() for t, y in enumerate(hypothesis + [EOS]))


def exhaustive_search(model, src_row, limit, lenpen):
    """The best of EVERY hypothesis of 1..limit real tokens (fairseq's min length 1) by
    score / (length + 1)^lenpen: (best normalised score, hypothesis)."""
    words = [t for t in range(model.vocab_size) if t not in (PAD, BOS, EOS)]
    best = (-math.inf, None)
    for n in range(1, limit + 1):
        for hyp in itertools.product(words, repeat=n):
            best = max(best, (score(model, src_row, list(hyp)) / (n + 1) ** lenpen, list(hyp)), key=lambda b: b[0])
    return best


@pytest.mark.parametrize("lenpen", [0.0, 0.6, 1.0, 2.0])
def test_a_wide_beam_equals_an_exhaustive_search(lenpen):
    """Vocabulary of 6 (pad, unk, bos, eos + 2): 3 choosable tokens; sources of 4, 2, 3 tokens with
    max_len = source length give at most 3 + 9 + 27 + 81 = 120 hypotheses, and at most 108 candidates
    per step: beam 128 keeps every prefix and finishes every hypothesis. Weights of std 0.5 make the
    choices vary by source and prefix (at init a tied-embedding model repeats one token); here the
    answers mix tokens and lengths, and a beam of 2 misses the best at three of the four lenpens."""
    model = tiny(vocab=6, seed=23)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.5)
    src = sources([4, 2, 3], vocab=6, seed=23)
    got = beam_search(model, src, **IDS, beam_size=128, lenpen=lenpen, max_len_a=1.0, max_len_b=0)
    for row, n, hypothesis in zip(src, [4, 2, 3], got):
        best_score, best = exhaustive_search(model, row[:n], n, lenpen)
        assert hypothesis == best
        normalised = score(model, row[:n], hypothesis) / (len(hypothesis) + 1) ** lenpen
        assert normalised == pytest.approx(best_score, abs=1e-5)


def test_beam_one_equals_greedy_and_wider_beams_finish_with_one_hypothesis_each():
    model = tiny(seed=4)
    src = sources([8, 3, 5, 6, 2], seed=4)
    greedy = greedy_decode(model, src, **IDS)
    assert beam_search(model, src, **IDS, beam_size=1, lenpen=0.6) == greedy
    assert beam_search(model, src, **IDS, beam_size=1, lenpen=2.0) == greedy  # one finished hypothesis: no choice
    wide = beam_search(model, src, **IDS, beam_size=4)
    assert len(wide) == 5 and all(EOS not in h and BOS not in h and PAD not in h for h in wide)


def test_decoding_runs_in_eval_mode_and_restores_the_modes():
    model = tiny(dropout=0.3, attention_dropout=0.3)
    src = sources([6, 4])
    expected = greedy_decode(model, src, **IDS)
    model.train()
    assert greedy_decode(model, src, **IDS) == expected and beam_search(model, src, **IDS) == beam_search(
        model.eval(), src, **IDS)
    model.train()
    greedy_decode(model, src, **IDS)
    assert model.training and all(m.training for m in model.modules())


def test_a_sigma_reparameterised_model_decodes_as_the_plain_one():
    model = tiny(seed=5)
    src = sources([7, 5, 3], seed=5)
    plain = greedy_decode(model, src, **IDS), beam_search(model, src, **IDS)
    apply_sigma_reparam(model)  # γ = σ: the same function
    assert (greedy_decode(model, src, **IDS), beam_search(model, src, **IDS)) == plain


# -- fairseq's rules on a scripted model --------------------------------------------------------------------

class MarkovModel(nn.Module):
    """A scripted decoder for the decoding rules: the next-token probabilities depend only on the last
    token (row ``table[last]``); the source is ignored. Ids: pad 0, unk 1, bos 2, eos 3, A 4, B 5, C 6."""

    def __init__(self, rows: dict[int, dict[int, float]], vocab=7, max_positions=64):
        super().__init__()
        table = torch.full((vocab, vocab), 1.0 / vocab)
        for last, probs in rows.items():
            table[last] = torch.tensor([probs.get(t, 0.0) for t in range(vocab)])
        self.log_table = table.log()
        self.vocab_size, self.pad_id, self.max_positions = vocab, PAD, max_positions

    def encode(self, src):
        return torch.zeros(src.shape[0], 1, 1), None

    def decode(self, tgt_in, memory, src_padding_mask, cache=None):
        assert PAD not in tgt_in
        return self.log_table[tgt_in]  # (B, T, V): log-probabilities are logits


A, B, C = 4, 5, 6


def test_length_penalty_changes_the_choice_in_a_constructed_case():
    """"A eos" has probability 0.6·0.7 = 0.42, "B C eos" 0.4·0.99·0.99 = 0.392: by the sum of
    log-probabilities (lenpen 0) the short one wins, by the mean (lenpen 1: -0.434 vs -0.312) the long one."""
    model = MarkovModel({BOS: {A: 0.6, B: 0.4}, A: {EOS: 0.7, C: 0.3}, B: {C: 0.99, EOS: 0.01},
                         C: {EOS: 0.99, C: 0.01}})
    src = torch.tensor([[4, 4, EOS]])
    assert beam_search(model, src, **IDS, beam_size=2, lenpen=0.0) == [[A]]
    assert beam_search(model, src, **IDS, beam_size=2, lenpen=1.0) == [[B, C]]
    assert greedy_decode(model, src, **IDS) == [[A]]
    assert beam_search(model, src, **IDS, beam_size=1, lenpen=1.0) == [[A]]  # B never survives a beam of 1


def test_min_length_one_and_the_max_length_of_each_sentence():
    """eos is likely first (0.9) but cannot be; then A follows A until the forced eos at
    max_len = int(a·n + b), n counting the source's eos but not its padding, capped at max_positions - 1.
    (With beam 2 eos never ranks among the 2 best continuations before it is forced: no early finish.)"""
    rows = {BOS: {EOS: 0.9, A: 0.1}, A: {A: 0.5, B: 0.49, EOS: 0.01}, B: {A: 0.5, B: 0.49, EOS: 0.01}}
    src = torch.tensor([[4, 4, EOS, PAD, PAD], [4, 4, 4, 4, EOS]])
    for decode in (greedy_decode, functools.partial(beam_search, beam_size=2)):
        assert decode(MarkovModel(rows), src, **IDS, max_len_a=1.0, max_len_b=1) == [[A] * 4, [A] * 6]
        assert decode(MarkovModel(rows), src, **IDS, max_len_a=0.5, max_len_b=0) == [[A], [A] * 2]
        assert decode(MarkovModel(rows, max_positions=5), src, **IDS, max_len_a=1.0, max_len_b=1) == [[A] * 4] * 2
        assert decode(MarkovModel(rows), src, **IDS, max_len_a=0.0, max_len_b=0) == [[A], [A]]  # at least 1


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(bos_id=EOS), ConfigError, "bos_id and eos_id are both 3"),
    (dict(bos_id=PAD), ConfigError, "bos_id=0 must be a non-pad id"),
    (dict(eos_id=99), ConfigError, "eos_id=99 must be a non-pad id of the model's vocabulary of 20"),
    (dict(max_len_a=-1.0), ConfigError, "max_len_a and max_len_b must be finite numbers >= 0"),
    (dict(beam_size=0), ConfigError, "beam_size must be an integer >= 1, got 0"),
    (dict(lenpen=math.nan), ConfigError, "lenpen must be a finite number"),
])
def test_bad_decoding_options_are_clear_errors(kwargs, error, match):
    model, src = tiny(), sources([4, 3])
    with pytest.raises(error, match=match):
        beam_search(model, src, **{**IDS, **kwargs})


def test_bad_sources_are_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"source sentences \[1\] of the batch are all padding"):
        greedy_decode(model, torch.tensor([[5, EOS], [PAD, PAD]]), **IDS)
    with pytest.raises(ValueError, match=r"\(batch, time\) int64"):
        greedy_decode(model, torch.tensor([5, EOS]), **IDS)
