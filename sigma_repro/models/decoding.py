"""Greedy and beam-search decoding of a ``Seq2SeqTransformer``, with a KV cache, as fairseq decodes.

Both take a batch of source sentences (B, S) (padded with the model's ``pad_id``) and return, per
sentence, the token ids of its best hypothesis WITHOUT bos and eos. They run in eval mode under
no_grad (the model's modes are restored afterwards) and feed the decoder one position per step:
``model.decode(new tokens, memory, src_padding_mask, cache=cache)`` with one cache dict per batch,
in which self-attention keys and values grow by one position per step and cross-attention keys and
values are computed from the encoder output once per sentence (``MultiHeadAttention.forward``).
When hypotheses are reordered (beams) or dropped (finished sentences), ``reorder_cache`` selects
the same rows of every cached tensor.

The rules, fairseq's ``SequenceGenerator`` (defaults: min_len 1, no unk penalty):
- log-probabilities are the model's log-softmax over the whole vocabulary; pad and bos are never
  chosen (their log-probability is set to -inf, without renormalising);
- eos cannot be the first token (fairseq's ``--min-len 1``: no empty translations);
- a sentence of n source tokens (its eos included, padding not) gets at most
  max_len = int(max_len_a·n + max_len_b) target tokens, capped so that bos and max_len tokens fit
  the model's ``max_positions`` (and at least 1); at step max_len a hypothesis must end: only eos
  is allowed, with its own log-probability;
- beam search (``--beam``, ``--lenpen``): a hypothesis ends when it emits eos; its final score is
  (sum of its token log-probabilities, eos included) / length^lenpen, the length counting its
  tokens and the eos (lenpen 1: the mean log-probability; 0: the plain sum; > 1 favours longer
  ones). Each step takes the 2·beam best continuations of the live hypotheses by summed
  log-probability; those ending in eos are finished if they rank among the first beam, and the
  first beam that do not end in eos live on. A sentence is done once it has beam finished
  hypotheses (or nothing lives); its translation is the finished one of best final score.
- greedy decoding is beam search with beam 1: the argmax token each step (eos ends it).

Sentences are decoded together; each stops at its own length, and finished ones leave the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sigma_repro.errors import ConfigError
from sigma_repro.modes import eval_mode


def reorder_cache(cache: dict, rows: Tensor) -> None:
    """Keep rows ``rows`` (a 1-D index along the batch) of every tensor in the nested ``cache``, in place."""
    for key, value in cache.items():
        if isinstance(value, dict):
            reorder_cache(value, rows)
        elif isinstance(value, Tensor):
            cache[key] = value.index_select(0, rows)


def _check(model: nn.Module, src: Tensor, bos_id: int, eos_id: int, max_len_a: float, max_len_b: float) -> Tensor:
    """Clear errors before any compute; returns the source lengths (B,) without padding."""
    if src.dim() != 2 or src.dtype != torch.long:
        raise ValueError(f"decoding takes source ids as a (batch, time) int64 tensor, got "
                         f"{src.dtype} of shape {tuple(src.shape)}")
    vocab = model.vocab_size
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if not 0 <= value < vocab or value == model.pad_id:
            raise ConfigError(f"{name}={value} must be a non-pad id of the model's vocabulary of {vocab} tokens "
                              f"(pad_id={model.pad_id}); the data's task_kwargs give it")
    if bos_id == eos_id:
        raise ConfigError(f"bos_id and eos_id are both {bos_id}; the data's task_kwargs give two different ids")
    if not (max_len_a >= 0 and max_len_b >= 0 and math.isfinite(max_len_a) and math.isfinite(max_len_b)):
        raise ConfigError(f"max_len_a and max_len_b must be finite numbers >= 0 (max length = a·source length + b), "
                          f"got a={max_len_a}, b={max_len_b}")
    lengths = src.ne(model.pad_id).sum(1)  # (B,)
    if (lengths == 0).any():
        empty = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"source sentences {empty[:8]} of the batch are all padding; every source needs at least "
                         f"one token (its eos)")
    return lengths


def _max_lengths(model: nn.Module, src_lengths: Tensor, max_len_a: float, max_len_b: float) -> Tensor:
    """(B,) the most target tokens (eos excluded) each sentence may get."""
    wanted = torch.tensor([int(max_len_a * n + max_len_b) for n in src_lengths.tolist()], device=src_lengths.device)
    return wanted.clamp(max=model.max_positions - 1).clamp(min=1)


def _log_probs(model: nn.Module, last: Tensor, memory: Tensor, src_padding_mask: Tensor | None, cache: dict,
               step: int, forced: Tensor, *, bos_id: int, eos_id: int) -> Tensor:
    """(N, V) float32 next-token log-probabilities of N hypotheses whose last token is ``last`` (N, 1),
    with the rules of the module docstring; ``forced`` (N,) bool: rows that must end now."""
    logits = model.decode(last, memory, src_padding_mask, cache=cache)[:, -1]  # (N, V)
    lprobs = F.log_softmax(logits.float(), dim=-1)
    lprobs[:, [model.pad_id, bos_id]] = -math.inf
    if step == 0:
        lprobs[:, eos_id] = -math.inf  # min_len 1
    eos_only = torch.full_like(lprobs[0], -math.inf)
    eos_only[eos_id] = 0.0
    return torch.where(forced[:, None], lprobs + eos_only, lprobs)


@torch.no_grad()
def greedy_decode(model: nn.Module, src: Tensor, *, bos_id: int, eos_id: int, max_len_a: float = 1.5,
                  max_len_b: float = 10) -> list[list[int]]:
    """The argmax token at each step until eos or the sentence's max length (module docstring):
    token ids per sentence, without bos and eos. Equals ``beam_search`` with beam_size=1."""
    src_lengths = _check(model, src, bos_id, eos_id, max_len_a, max_len_b)
    max_lens = _max_lengths(model, src_lengths, max_len_a, max_len_b)
    hypotheses: list[list[int]] = [[] for _ in range(src.shape[0])]
    with eval_mode(model), parametrize.cached():  # σReparam: each Ŵ computed once per call, not per step
        memory, src_padding_mask = model.encode(src)
        alive = torch.arange(src.shape[0], device=src.device)  # sentences still decoding
        last = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        cache: dict = {}
        for step in range(int(max_lens.max()) + 1):
            lprobs = _log_probs(model, last, memory, src_padding_mask, cache, step, max_lens[alive] == step,
                                bos_id=bos_id, eos_id=eos_id)
            tokens = lprobs.argmax(dim=-1)  # (N,)
            for sentence, token in zip(alive.tolist(), tokens.tolist()):
                if token != eos_id:
                    hypotheses[sentence].append(token)
            keep = torch.nonzero(tokens != eos_id).flatten()
            if keep.numel() == 0:
                break
            if keep.numel() < alive.numel():
                reorder_cache(cache, keep)
                memory = memory.index_select(0, keep)
                src_padding_mask = None if src_padding_mask is None else src_padding_mask.index_select(0, keep)
            alive, last = alive[keep], tokens[keep, None]
    return hypotheses


@torch.no_grad()
def beam_search(model: nn.Module, src: Tensor, *, bos_id: int, eos_id: int, beam_size: int = 4, lenpen: float = 0.6,
                max_len_a: float = 1.5, max_len_b: float = 10) -> list[list[int]]:
    """fairseq's beam search with length penalty ``lenpen`` (module docstring): per sentence the token
    ids of the finished hypothesis of best (sum of log-probabilities) / length^lenpen, the length
    counting the eos; without bos and eos."""
    if not (isinstance(beam_size, int) and beam_size >= 1):
        raise ConfigError(f"beam_size must be an integer >= 1, got {beam_size!r}")
    if not math.isfinite(lenpen):
        raise ConfigError(f"lenpen must be a finite number (fairseq's --lenpen, 0.6 in Admin's recipe), got {lenpen}")
    src_lengths = _check(model, src, bos_id, eos_id, max_len_a, max_len_b)
    max_lens = _max_lengths(model, src_lengths, max_len_a, max_len_b)
    B, K, V = src.shape[0], beam_size, model.vocab_size
    limits = max_lens.tolist()
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]  # (final score, tokens) per sentence
    with eval_mode(model), parametrize.cached():  # σReparam: each Ŵ computed once per call, not per step
        memory, src_padding_mask = model.encode(src)
        rows = torch.arange(B, device=src.device).repeat_interleave(K)  # (B·K,): beam k of sentence i is row i·K + k
        memory = memory.index_select(0, rows)
        src_padding_mask = None if src_padding_mask is None else src_padding_mask.index_select(0, rows)
        alive = torch.arange(B, device=src.device)  # sentences still decoding, K rows each
        tokens = torch.full((B * K, 1), bos_id, dtype=torch.long, device=src.device)  # (N·K, step + 1), bos first
        scores = torch.full((B, K), -math.inf, device=src.device)
        scores[:, 0] = 0.0  # one live hypothesis (bos) per sentence at first, not K copies of it
        cache: dict = {}
        for step in range(max(limits) + 1):
            N = alive.numel()
            forced = (max_lens[alive] == step).repeat_interleave(K)  # (N·K,)
            lprobs = _log_probs(model, tokens[:, -1:], memory, src_padding_mask, cache, step, forced,
                                bos_id=bos_id, eos_id=eos_id)  # (N·K, V)
            candidates = (scores[:, :, None] + lprobs.view(N, K, V)).view(N, K * V)
            top_scores, top = candidates.topk(min(2 * K, K * V), dim=1)  # (N, 2K), best first
            top_beams, top_tokens = top // V, top % V
            ends = top_tokens == eos_id  # (N, 2K)
            norm = (step + 1) ** lenpen  # tokens so far + eos
            done = []
            for i, (sentence, row_ends) in enumerate(zip(alive.tolist(), ends[:, :K].tolist())):
                for j in (j for j, e in enumerate(row_ends) if e):  # eos among the first K: finished
                    if len(finished[sentence]) < K and math.isfinite(score := float(top_scores[i, j])):
                        hypothesis = tokens[i * K + int(top_beams[i, j]), 1:].tolist()
                        finished[sentence].append((score / norm, hypothesis))
                done.append(len(finished[sentence]) >= K or step == limits[sentence])
            # the first K continuations of each sentence that do not end: the hypotheses of the next step
            order = torch.where(ends, 2 * K, torch.arange(top.shape[1], device=src.device))
            keep = order.argsort(dim=1, stable=True)[:, :K]  # (N, K) positions in the top-2K list
            next_beams, next_tokens = top_beams.gather(1, keep), top_tokens.gather(1, keep)
            next_scores = top_scores.gather(1, keep)
            # a dead hypothesis (score -inf, e.g. the K-1 empty beams of step 0) may hold a banned token
            # such as pad: feed it a real one, its score keeps it out of every result
            next_tokens = next_tokens.masked_fill(torch.isinf(next_scores), eos_id)
            stay = torch.nonzero(~torch.tensor(done, device=src.device)).flatten()  # sentences still decoding
            if stay.numel() == 0:
                break
            selected = ((stay[:, None] * K) + next_beams[stay]).flatten()  # (N'·K,) rows of this step
            reorder_cache(cache, selected)
            memory = memory.index_select(0, selected)
            src_padding_mask = None if src_padding_mask is None else src_padding_mask.index_select(0, selected)
            tokens = torch.cat([tokens.index_select(0, selected), next_tokens[stay].reshape(-1, 1)], dim=1)
            scores, alive = next_scores[stay], alive[stay]
    return [max(hypotheses, key=lambda h: h[0])[1] for hypotheses in finished]
