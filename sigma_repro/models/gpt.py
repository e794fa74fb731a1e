"""GPT: the causal language model of the LM tables, on the shared ``DecoderOnly`` stack.

nanoGPT's model (Karpathy; GPT-2 small's shape at ``conf/model/gpt_small.yaml``) with the suite's
switches: token embedding + learned positions, ``depth`` causal self-attention blocks (SDPA with
``is_causal``, in ``sigma_repro.models.attention``), an output head over the vocabulary. The stack
brings the norm placement (``norm``: pre | post | none) and the residual scheme (``scheme``:
standard | scaled | rezero | deepnorm | admin, see ``sigma_repro.models.residual``); it ends in a
final LayerNorm only for pre-LN, as GPT-2's ``ln_f``.

Weight tying (``tie_weights=True``, GPT-2's and nanoGPT's default): the head is an ``nn.Linear``
whose weight IS the token embedding's Parameter, so reading a token in and scoring it out use one
matrix (Press & Wolf 2017), which saves vocab × dim parameters. σReparam leaves a shared weight
alone (``sigma_repro.reparam``: the embedding reads the raw W and would not see Ŵ), so the tied
head is never reparameterised; an untied head is a plain Linear and is.

Init (GPT-2, as nanoGPT): embeddings, positions and every Linear N(0, 0.02), biases zero. For
``scheme="standard"`` the two projections that end a residual branch (attention ``out_proj``, FFN
``fc2``) get N(0, 0.02/sqrt(2·depth)): the residual stream sums 2·depth branches, and this keeps its
variance independent of depth. The other schemes handle depth themselves, so they do not get that
factor twice: "scaled" multiplies each branch by τ, "rezero" starts each branch at τ = 0, "admin"
weights the skip by ω; and "deepnorm" keeps the stack's own xavier_normal·β init (it is part of
the scheme), only the embeddings get GPT-2's.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch
from torch import Tensor, nn

from sigma_repro.errors import ConfigError
from sigma_repro.models.attention import MultiHeadAttention
from sigma_repro.models.transformer import DecoderOnly, FeedForward

GPT2_STD = 0.02


class GPT(nn.Module):
    """tokens (B, T) int64 -> logits (B, T, vocab_size); position t sees tokens 0..t only.

    vocab_size, max_seq_len: from the data (``model_kwargs``); max_seq_len is the number of
        learned positions, the longest sequence the model takes.
    dim, depth, num_heads, ffn_dim: width, blocks, attention heads, FFN hidden width (None: 4·dim).
    norm, scheme, tau, tau_depth, activation: the stack's (``sigma_repro.models.transformer``).
    dropout: on the embedding sum and on every branch output (nanoGPT's one ``dropout``);
    attention_dropout: on the attention probabilities; activation_dropout: inside the FFN (0 in GPT-2).
    bias: False drops the biases of every Linear and LayerNorm (nanoGPT's ``bias=False``); the
        head has none either way.
    tie_weights: the head shares the token embedding's weight (see the module docstring).
    """

    def __init__(self, *, vocab_size: int, max_seq_len: int, dim: int = 64, depth: int = 4, num_heads: int = 4,
                 ffn_dim: int | None = None, norm: str = "pre", scheme: str = "standard", dropout: float = 0.0,
                 attention_dropout: float = 0.0, activation_dropout: float = 0.0, bias: bool = True,
                 tie_weights: bool = True, activation: str = "gelu", tau: float | None = None,
                 tau_depth: str = "sublayers"):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len), ("dim", dim)):
            if not (isinstance(value, Integral) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"GPT needs model.{name} to be an integer >= 1, found {value!r}")
        self.max_seq_len = int(max_seq_len)
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)  # learned positions, as GPT-2's wpe
        self.drop = nn.Dropout(dropout)
        self.decoder = DecoderOnly(dim=dim, depth=depth, num_heads=num_heads, ffn_dim=ffn_dim or 4 * dim, norm=norm,
                                   scheme=scheme, dropout=dropout, attention_dropout=attention_dropout,
                                   activation_dropout=activation_dropout, activation=activation, tau=tau,
                                   tau_depth=tau_depth, bias=bias)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.tok_emb.weight
        self._init_gpt2(scheme, depth)

    def _init_gpt2(self, scheme: str, depth: int) -> None:
        """GPT-2's init where the scheme has none of its own (see the module docstring)."""
        for layer in (self.tok_emb, self.pos_emb, self.head):  # a tied head re-draws the embedding: harmless
            nn.init.normal_(layer.weight, std=GPT2_STD)
        if scheme == "deepnorm":
            return
        for module in self.decoder.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=GPT2_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if scheme == "standard":
            branch_ends = [m.out_proj for m in self.decoder.modules() if isinstance(m, MultiHeadAttention)]
            branch_ends += [m.fc2 for m in self.decoder.modules() if isinstance(m, FeedForward)]
            for linear in branch_ends:
                nn.init.normal_(linear.weight, std=GPT2_STD / math.sqrt(2 * depth))

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"GPT takes token ids of shape (batch, time), got shape {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if T > self.max_seq_len:
            raise ConfigError(f"GPT got sequences of {T} tokens but has learned positions for max_seq_len="
                              f"{self.max_seq_len}; build it with max_seq_len >= {T} (the data's block_size sets "
                              f"it) or feed sequences of at most {self.max_seq_len} tokens")
        positions = torch.arange(T, device=tokens.device)  # (T,)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))  # (B, T, dim)
        x = self.decoder(x)  # (B, T, dim), final LayerNorm included for pre-LN
        return self.head(x)  # (B, T, vocab_size)

    def transformer_blocks(self) -> list[tuple[str, nn.Module]]:
        """The stack's blocks, named from this model ("decoder.layers.0", ...): rank collapse's blocks."""
        return [(f"decoder.{name}", block) for name, block in self.decoder.transformer_blocks()]
