"""Multi-head attention shared by the translation, language-model and analysis stacks (ViT uses timm's).

Why our own and not ``nn.MultiheadAttention``: σReparam must see each projection as its own
``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``; MHA packs q, k, v into one
``in_proj_weight`` and bypasses a converted ``out_proj``), cross-attention needs keys from another
sequence, and the attention-entropy probe needs the queries and keys the fused kernel used.
Those come through two identity taps, the convention of ``sigma_repro.diagnostics.attention_kinds``:

- ``q_tap(q)``, ``k_tap(k)``: ``nn.Identity`` modules called on q (B, H, Tq, hd) and k (B, H, Tk, hd)
  right before ``F.scaled_dot_product_attention``; the logits are ``scale · q kᵀ``.
- ``last_key_padding_mask`` ((B, Tk) bool, True = pad, or None), ``last_query_padding_mask``
  ((B, Tq) bool or None) and ``last_causal`` (bool): the masks of the latest forward, so the
  probe can mask exactly the logits the kernel masked and average over real queries only.

Incremental decoding (``sigma_repro.models.decoding``) passes a ``cache`` dict: self-attention
appends each call's keys and values to it, cross-attention computes them from the encoder output
once per sentence. A cached call still sends every key it uses through ``k_tap``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sigma_repro.errors import ConfigError


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention (Vaswani et al.) with separate q, k, v, out projections.

    ``kdim``: width of the ``context`` that keys and values come from (cross-attention from an
    encoder of another width); None = ``dim``. ``dropout`` is the attention-probability dropout.
    """

    def __init__(self, dim: int, num_heads: int, *, kdim: int | None = None, bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"attention width dim={dim} is not divisible by num_heads={num_heads}; "
                              f"choose num_heads among the divisors of {dim}")
        kdim = dim if kdim is None else kdim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(kdim, dim, bias=bias)
        self.v_proj = nn.Linear(kdim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.q_tap = nn.Identity()
        self.k_tap = nn.Identity()
        self.last_key_padding_mask: Tensor | None = None
        self.last_query_padding_mask: Tensor | None = None
        self.last_causal = False

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, dropout={self.dropout}"

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                causal: bool = False, query_padding_mask: Tensor | None = None,
                cache: dict[str, Tensor] | None = None) -> Tensor:
        """Attend from ``x`` (B, Tq, dim) to ``context`` (B, Tk, kdim), or to ``x`` itself when None.

        key_padding_mask: (B, Tk) bool, True = padded key, never attended to.
        causal: query i sees keys 0..i (top-left aligned, as SDPA's ``is_causal``).
        query_padding_mask: (B, Tq) bool, True = padded query. It does not change the output (a
            padded query's output is simply ignored downstream); it is recorded so the entropy
            probe averages over real queries. In self-attention it defaults to key_padding_mask.
        cache: incremental decoding; a dict this call reads and fills. Self-attention (``context``
            None or ``x``) appends this call's keys and values to ``cache["k"]``, ``cache["v"]``
            (B, H, T_cached + Tq, hd), so keys are every position so far and key_padding_mask, if
            given, covers them all (B, T_cached + Tq). Cross-attention computes keys and values
            from ``context`` on the first call and reuses them afterwards (``context`` is then not
            read). Once keys are cached, causal self-attention takes one new query at a time: the
            latest position, which sees every key, so the call is recorded as not causal.
        Returns (B, Tq, dim).
        """
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor (True = pad), got {key_padding_mask.dtype}")
        self_attention = context is None or context is x
        context = x if context is None else context
        B, Tq, _ = x.shape
        q = self.q_proj(x).view(B, Tq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, hd)
        cached = cache is not None and "k" in cache
        if cached and not self_attention:  # cross-attention: this sentence's keys, computed once
            k, v = cache["k"], cache["v"]  # (B, H, Tk, hd)
        else:
            S = context.shape[1]
            k = self.k_proj(context).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
            v = self.v_proj(context).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
            if cached:  # self-attention: the new positions' keys after the cached ones
                if causal and Tq != 1:
                    raise ValueError(f"causal self-attention with {cache['k'].shape[2]} cached positions takes one "
                                     f"new position per call, got {Tq}; feed the new tokens one at a time")
                causal = False  # the one new query is the latest position: it may see every key
                k = torch.cat([cache["k"], k], dim=2)  # (B, H, T_cached + Tq, hd)
                v = torch.cat([cache["v"], v], dim=2)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        Tk = k.shape[2]
        if query_padding_mask is None and self_attention:  # the queries' own padding: the last Tq keys'
            query_padding_mask = key_padding_mask if key_padding_mask is None or Tk == Tq else key_padding_mask[:, -Tq:]
        self.last_key_padding_mask = key_padding_mask
        self.last_query_padding_mask = query_padding_mask
        self.last_causal = causal

        q, k = self.q_tap(q), self.k_tap(k)
        if key_padding_mask is None:  # no mask tensor: SDPA may pick its flash kernels
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                                 is_causal=causal, scale=self.scale)
        else:
            attend = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk), True = may attend
            if causal:
                attend = attend & torch.ones(Tq, Tk, dtype=torch.bool, device=x.device).tril()  # (B, 1, Tq, Tk)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend,
                                                 dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, Tq, self.num_heads * self.head_dim)  # (B, Tq, dim)
        return self.out_proj(out)
