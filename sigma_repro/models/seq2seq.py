"""Seq2SeqTransformer: the encoder-decoder of the translation family, on the shared stacks.

What is fairseq's (``transformer`` with ``--share-all-embeddings``, the model Admin's
Transformer-Clinic, a fairseq fork, trains for its WMT14 results):
- one embedding over the joint source/target vocabulary, read by the encoder, the decoder and, as
  the output projection, by the head (tied: the head's weight IS the embedding's Parameter, so
  σReparam leaves it alone; see ``sigma_repro.reparam``); the head has no bias;
- embeddings scaled by sqrt(dim), plus sinusoidal positions (``SinusoidalPositionalEmbedding``:
  [sin | cos] halves, frequencies 10000^(-i/(dim/2 - 1)), and position t of a sequence reads
  row t + pad_id + 1, since fairseq numbers positions from ``padding_idx + 1``), then dropout;
- post-LN stacks without final norms (pre-LN ends each stack with one; see
  ``sigma_repro.models.transformer``); xavier_uniform Linears with zero biases; the embedding drawn
  from N(0, dim^-1/2) with the pad row zero (``padding_idx``: reading pad adds no gradient; the
  tied head still scores pad, as fairseq's does).

What is ours: the stacks' residual schemes (``scheme``: standard | scaled | admin | deepnorm |
rezero, ``sigma_repro.models.residual``), the "none" norm placement, Admin's profiling bookkeeping
(``profile_admin`` and the persistent ``admin_profiled`` flag, so a resumed run keeps its ω and
does not profile again), ``transformer_blocks`` for the rank-collapse probe, and the incremental
``decode(..., cache=...)`` of ``sigma_repro.models.decoding``. fairseq gives padded tokens a zero
position vector; here they get the position their index gives: their outputs are masked (keys) or
ignored (queries), so no real output differs.

DeepNorm's constants are set per encoder-decoder pair: the encoder is told the decoder's depth and
the decoder the encoder's (REFERENCE.md §2; 6-6: encoder α 1.418 β 0.497, decoder α 2.060 β 0.343).
"""

from __future__ import annotations

import math
from numbers import Integral

import torch
from torch import Tensor, nn

from sigma_repro.errors import ConfigError
from sigma_repro.models.residual import admin_profile
from sigma_repro.models.transformer import TransformerDecoder, TransformerEncoder, check_width


def sinusoidal_positions(start: int, length: int, dim: int, *, pad_id: int, device=None) -> Tensor:
    """fairseq's sinusoidal position vectors of sequence positions start..start+length-1: (length, dim)
    float32, row t = [sin(p·f) | cos(p·f)] with p = t + pad_id + 1 and f_i = 10000^(-i/(dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=device) * -(math.log(10000.0) / (half - 1)))
    rows = torch.arange(start, start + length, dtype=torch.float32, device=device) + (pad_id + 1)  # (length,)
    angles = rows[:, None] * freqs[None, :]  # (length, half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (length, dim)


class Seq2SeqTransformer(nn.Module):
    """src (B, S), tgt_in (B, T) token ids -> logits (B, T, vocab_size); target position t sees
    tgt_in[:, :t+1] and every real source token. Padding masks come from ``pad_id``.

    vocab_size, pad_id, max_positions: from the data (``model_kwargs``): the joint vocabulary, its
        pad id, the longest source or target sequence (in tokens) the model takes.
    dim, num_heads, ffn_dim: width, attention heads, FFN hidden width.
    depth: layers of each stack; encoder_depth / decoder_depth override it per stack (None = depth;
        ``scale=proxy`` sets depth).
    norm, scheme, tau, tau_depth, activation, bias: the stacks' (``sigma_repro.models.transformer``).
    dropout: on the embedding sum and on every branch output; attention_dropout: on the attention
        probabilities; activation_dropout: inside the FFN (fairseq's three dropouts).
    scale_embedding: multiply embeddings by sqrt(dim) (fairseq's default; False =
        ``--no-scale-embedding``).
    """

    def __init__(self, *, vocab_size: int, pad_id: int, max_positions: int = 1024, dim: int = 512, depth: int = 6,
                 encoder_depth: int | None = None, decoder_depth: int | None = None, num_heads: int = 8,
                 ffn_dim: int = 2048, norm: str = "post", scheme: str = "standard", dropout: float = 0.1,
                 attention_dropout: float = 0.0, activation_dropout: float = 0.0, activation: str = "relu",
                 tau: float | None = None, tau_depth: str = "sublayers", bias: bool = True,
                 scale_embedding: bool = True):
        super().__init__()
        encoder_depth = depth if encoder_depth is None else encoder_depth
        decoder_depth = depth if decoder_depth is None else decoder_depth
        for name, value in (("vocab_size", vocab_size), ("max_positions", max_positions), ("dim", dim),
                            ("num_heads", num_heads), ("ffn_dim", ffn_dim), ("encoder_depth", encoder_depth),
                            ("decoder_depth", decoder_depth)):
            if not (isinstance(value, Integral) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"Seq2SeqTransformer needs model.{name} to be an integer >= 1, found {value!r}"
                                  + (" (None takes model.depth)" if name.endswith("_depth") else ""))
        check_width(dim, num_heads, sinusoidal=True)
        if not (isinstance(pad_id, Integral) and 0 <= pad_id < vocab_size):
            raise ConfigError(f"pad_id={pad_id!r} is not an id of the vocabulary of {vocab_size} tokens; the data's "
                              f"model_kwargs give both (vocab_size and pad_id of one tokenizer)")
        self.vocab_size, self.pad_id, self.max_positions = int(vocab_size), int(pad_id), int(max_positions)
        self.dim, self.scheme = dim, scheme
        self.embed_scale = math.sqrt(dim) if scale_embedding else 1.0
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.drop = nn.Dropout(dropout)
        stack = dict(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, norm=norm, scheme=scheme, dropout=dropout,
                     attention_dropout=attention_dropout, activation_dropout=activation_dropout,
                     activation=activation, tau=tau, tau_depth=tau_depth, bias=bias)
        self.encoder = TransformerEncoder(depth=encoder_depth, decoder_depth=decoder_depth, **stack)
        self.decoder = TransformerDecoder(depth=decoder_depth, encoder_depth=encoder_depth, **stack)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # one matrix reads tokens in and scores them out
        # Saved with the ω in checkpoints: a resumed Admin run keeps its profiled ω and does not profile again.
        self.register_buffer("admin_profiled", torch.tensor(False))
        nn.init.normal_(self.embed.weight, mean=0.0, std=dim ** -0.5)  # fairseq's Embedding
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()

    def _check_tokens(self, tokens: Tensor, what: str, start: int = 0) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"Seq2SeqTransformer takes {what} token ids of shape (batch, time), "
                             f"got shape {tuple(tokens.shape)}")
        if start + tokens.shape[1] > self.max_positions:
            raise ConfigError(f"Seq2SeqTransformer got a {what} sequence of {start + tokens.shape[1]} tokens but "
                              f"takes at most max_positions={self.max_positions}; build it with a larger "
                              f"max_positions (the data's model_kwargs set it) or feed shorter sequences")

    def _embed(self, tokens: Tensor, start: int = 0) -> Tensor:
        """Scaled token embeddings plus the positions start.. (fairseq), then dropout: (B, T, dim)."""
        x = self.embed(tokens) * self.embed_scale  # (B, T, dim)
        positions = sinusoidal_positions(start, tokens.shape[1], self.dim, pad_id=self.pad_id, device=tokens.device)
        return self.drop(x + positions.to(x.dtype))

    def _padding_mask(self, tokens: Tensor) -> Tensor | None:
        """(B, T) True at pad, or None when there is none: an all-False mask would force SDPA's
        masked (slower) kernel for nothing."""
        mask = tokens.eq(self.pad_id)
        return mask if mask.any() else None

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor | None]:
        """src (B, S) -> (memory (B, S, dim), src_padding_mask (B, S) True = pad, or None)."""
        self._check_tokens(src, "source")
        src_padding_mask = self._padding_mask(src)
        return self.encoder(self._embed(src), padding_mask=src_padding_mask), src_padding_mask

    def decode(self, tgt_in: Tensor, memory: Tensor, src_padding_mask: Tensor | None,
               cache: dict | None = None) -> Tensor:
        """tgt_in (B, T) -> logits (B, T, vocab_size), attending to ``memory`` from ``encode``.

        cache: incremental decoding (``sigma_repro.models.decoding``): one dict kept across calls,
        empty at the first. ``tgt_in`` then holds only the new positions (one per call once the cache
        holds some; no padding): keys and values of the earlier target positions and of ``memory``
        come from the cache, and ``cache["length"]`` counts the positions fed so far.
        """
        start = 0 if cache is None else cache.get("length", 0)
        self._check_tokens(tgt_in, "target", start)
        tgt_padding_mask = self._padding_mask(tgt_in)
        if cache is not None and tgt_padding_mask is not None:
            raise ValueError(f"incremental decoding feeds real tokens only, got pad (id {self.pad_id}) in tgt_in; "
                             f"decode padded targets without a cache")
        x = self.decoder(self._embed(tgt_in, start), memory, padding_mask=tgt_padding_mask,
                         memory_padding_mask=src_padding_mask,
                         cache=None if cache is None else cache.setdefault("decoder", {}))  # (B, T, dim)
        if cache is not None:
            cache["length"] = start + tgt_in.shape[1]
        return self.head(x)  # (B, T, vocab_size)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, src_padding_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_padding_mask)

    @property
    def needs_admin_profile(self) -> bool:
        """True for scheme="admin" until ``profile_admin`` has run (on this model or on the one whose
        state dict it loaded)."""
        return self.scheme == "admin" and not bool(self.admin_profiled)

    def profile_admin(self, src: Tensor, tgt_in: Tensor) -> dict[str, float]:
        """Admin's profiling (``sigma_repro.models.residual.admin_profile``) on one real batch: sets
        every ω of both stacks, marks the model profiled, returns {sublayer name: ω}. Run it on the
        first training batch, before σReparam is applied."""
        if self.scheme != "admin":
            raise ConfigError(f"profile_admin profiles Admin's ω, but this model has scheme={self.scheme!r}; "
                              f"build it with scheme='admin' (and norm='post')")
        profiled = admin_profile(self, src, tgt_in)
        self.admin_profiled.fill_(True)
        return profiled

    def transformer_blocks(self) -> list[tuple[str, nn.Module]]:
        """Every layer of both stacks, named from this model ("encoder.layers.0", ..., "decoder.layers.0",
        ...): the blocks the rank-collapse probe measures."""
        return ([(f"encoder.{name}", block) for name, block in self.encoder.transformer_blocks()]
                + [(f"decoder.{name}", block) for name, block in self.decoder.transformer_blocks()])
