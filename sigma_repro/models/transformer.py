"""Transformer stacks for translation, language modelling and depth analysis: encoder, decoder,
decoder-only, at any depth and with any residual scheme of ``sigma_repro.models.residual``.

The stacks take embedded inputs (B, T, dim) and return (B, T, dim); embeddings, positions and
output heads belong to the task models that use them. Every sublayer is a ``ResidualSublayer``
around our ``MultiHeadAttention`` or a ``FeedForward``, so σReparam sees every projection matrix,
the entropy probe sees every attention, and ``residual_sublayers()`` lists every ω and τ.

Norm placement follows fairseq, which the Admin and σReparam translation results use:
post-LN has NO final LayerNorm (each sublayer already ends in one; ``nn.Transformer`` adds an
extra one, which changes the model), pre-LN ends with one final LayerNorm (``normalize_before``
stacks do), and "none" has neither.

Init: xavier_uniform weights and zero biases (fairseq's ``Linear``); DeepNorm instead uses
xavier_normal with gain β on the FFN, value and output projections and gain 1 on queries and keys
(its paper's pseudo-code). Admin's ω start at the closed form sqrt((N+1)/ln(N+1) − 1), so an
Admin stack is Admin even unprofiled; ``admin_profile`` replaces them with profiled values.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from sigma_repro.errors import ConfigError
from sigma_repro.models.attention import MultiHeadAttention
from sigma_repro.models.residual import ResidualSublayer, admin_closed_form, deepnorm_constants

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}
TAU_DEPTHS = ("blocks", "sublayers")


def check_width(dim: int, num_heads: int, *, sinusoidal: bool = False) -> None:
    """A model config's width fits its heads (and sinusoidal positions), or a ConfigError before any layer is built."""
    if dim % num_heads:
        raise ConfigError(f"model.dim={dim} is not divisible by model.num_heads={num_heads}; choose num_heads "
                          f"among the divisors of {dim}")
    if sinusoidal and (dim % 2 or dim < 4):
        raise ConfigError(f"model.dim must be an even number >= 4 (the sinusoidal positions pair a sine and a "
                          f"cosine per frequency), found {dim}")


class FeedForward(nn.Module):
    """Position-wise FFN: Linear(dim, ffn_dim) – activation – dropout – Linear(ffn_dim, dim);
    ``bias=False`` drops both Linears' biases."""

    def __init__(self, dim: int, ffn_dim: int, *, activation: str = "relu", dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.fc1 = nn.Linear(dim, ffn_dim, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(ffn_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class SelfAttentionLayer(nn.Module):
    """Self-attention then FFN, each a residual sublayer: an encoder layer, or with ``causal`` a
    decoder-only (GPT) block."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, causal: bool, activation: str,
                 attention_dropout: float, activation_dropout: float, bias: bool, **residual):
        super().__init__()
        self.causal = causal
        self.self_attn = ResidualSublayer(
            dim, MultiHeadAttention(dim, num_heads, bias=bias, dropout=attention_dropout), **residual)
        self.ffn = ResidualSublayer(
            dim, FeedForward(dim, ffn_dim, activation=activation, dropout=activation_dropout, bias=bias), **residual)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        x = self.self_attn(x, key_padding_mask=padding_mask, causal=self.causal)
        return self.ffn(x)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, FFN: three residual sublayers."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, activation: str, attention_dropout: float,
                 activation_dropout: float, bias: bool, **residual):
        super().__init__()
        self.self_attn = ResidualSublayer(
            dim, MultiHeadAttention(dim, num_heads, bias=bias, dropout=attention_dropout), **residual)
        self.cross_attn = ResidualSublayer(
            dim, MultiHeadAttention(dim, num_heads, bias=bias, dropout=attention_dropout), **residual)
        self.ffn = ResidualSublayer(
            dim, FeedForward(dim, ffn_dim, activation=activation, dropout=activation_dropout, bias=bias), **residual)

    def forward(self, x: Tensor, memory: Tensor, padding_mask: Tensor | None = None,
                memory_padding_mask: Tensor | None = None, cache: dict | None = None) -> Tensor:
        """cache: incremental decoding, this layer's dict: its attentions keep their keys and values
        under "self_attn" and "cross_attn" (see ``MultiHeadAttention.forward``); padding_mask then
        covers every position so far, the new ones last."""
        self_cache = None if cache is None else cache.setdefault("self_attn", {})
        cross_cache = None if cache is None else cache.setdefault("cross_attn", {})
        query_padding_mask = padding_mask  # the new positions' padding: the last ones with a cache
        if padding_mask is not None and padding_mask.shape[1] != x.shape[1]:
            query_padding_mask = padding_mask[:, -x.shape[1]:]
        x = self.self_attn(x, key_padding_mask=padding_mask, causal=True, cache=self_cache)
        x = self.cross_attn(x, memory, key_padding_mask=memory_padding_mask, query_padding_mask=query_padding_mask,
                            cache=cross_cache)
        return self.ffn(x)


class TransformerStack(nn.Module):
    """What the three stacks share: building ``depth`` layers with their residual options, the final
    norm (pre-LN only), init, the layer loop and ``residual_sublayers()``.

    Options (keyword-only, the same for every stack):
    dim, depth, num_heads, ffn_dim: width, number of layers, attention heads, FFN hidden width.
    norm: "post" | "pre" | "none"; scheme: "standard" | "scaled" | "admin" | "deepnorm" | "rezero"
        (see ``sigma_repro.models.residual``).
    dropout: on each branch output before the sum; attention_dropout: on the attention
        probabilities; activation_dropout: inside the FFN (fairseq's three dropouts).
    activation: "relu" | "gelu" (``ACTIVATIONS``).
    tau: branch weight of scheme "scaled"; default 1/sqrt(L) (Noci et al.), L = depth for
        tau_depth="blocks", or the number of residual sublayers (2 or 3 per layer) for "sublayers".
    bias: False drops every bias of the stack: the attention and FFN Linears' and the LayerNorms'
        (nanoGPT's ``bias=False``); True (default) keeps them all.
    """

    def __init__(self, layer: type[nn.Module], layer_options: dict, *, sublayers_per_layer: int,
                 deepnorm_depths: tuple[int, int], part: str, dim: int, depth: int, num_heads: int, ffn_dim: int,
                 norm: str = "post", scheme: str = "standard", dropout: float = 0.0, attention_dropout: float = 0.0,
                 activation_dropout: float = 0.0, activation: str = "relu", tau: float | None = None,
                 tau_depth: str = "sublayers", bias: bool = True):
        super().__init__()
        if depth < 1:
            raise ConfigError(f"depth must be at least 1, got {depth}")
        if tau_depth not in TAU_DEPTHS:
            raise ConfigError(f"tau_depth must be one of {list(TAU_DEPTHS)}, got {tau_depth!r}")
        if tau is not None and scheme != "scaled":
            raise ConfigError(f"tau={tau} is used only by scheme='scaled'; got scheme={scheme!r}")
        num_sublayers = depth * sublayers_per_layer
        residual = dict(norm=norm, scheme=scheme, dropout=dropout, norm_bias=bias)
        if scheme == "scaled":  # Noci et al.: x + f(x)/sqrt(L), L counting blocks or residual branches
            residual["tau"] = tau if tau is not None else (depth if tau_depth == "blocks" else num_sublayers) ** -0.5
        elif scheme == "admin":
            residual["alpha"] = admin_closed_form(num_sublayers)
        elif scheme == "deepnorm":
            residual["alpha"], beta = deepnorm_constants(*deepnorm_depths, part=part)
        self.layers = nn.ModuleList(
            layer(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, activation=activation,
                  attention_dropout=attention_dropout, activation_dropout=activation_dropout, bias=bias,
                  **layer_options, **residual)
            for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, bias=bias) if norm == "pre" else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if scheme == "deepnorm":
            _deepnorm_init(self, beta)

    def _run(self, x: Tensor, *args, cache: dict | None = None, **kwargs) -> Tensor:
        """The layers in order, then the final norm; with a ``cache`` dict, layer i gets its own
        dict ``cache["layers.<i>"]`` (incremental decoding)."""
        for i, layer in enumerate(self.layers):
            if cache is None:
                x = layer(x, *args, **kwargs)
            else:
                x = layer(x, *args, cache=cache.setdefault(f"layers.{i}", {}), **kwargs)
        return self.final_norm(x)

    def transformer_blocks(self) -> list[tuple[str, nn.Module]]:
        """(name, layer) of every layer, e.g. ("layers.0", ...): the blocks the rank-collapse probe
        measures (sigma_repro.diagnostics.rank)."""
        return [(f"layers.{i}", layer) for i, layer in enumerate(self.layers)]

    def residual_sublayers(self) -> Iterator[tuple[str, ResidualSublayer]]:
        """(name, sublayer) for every residual sublayer in call order, e.g. ("layers.0.self_attn", ...)."""
        for name, module in self.named_modules():
            if isinstance(module, ResidualSublayer):
                yield name, module


def _deepnorm_init(stack: nn.Module, beta: float) -> None:
    """DeepNorm init: xavier_normal gain β on FFN, v_proj, out_proj; gain 1 on q_proj, k_proj."""
    for module in stack.modules():
        if isinstance(module, MultiHeadAttention):
            gains = [(module.q_proj, 1.0), (module.k_proj, 1.0), (module.v_proj, beta), (module.out_proj, beta)]
        elif isinstance(module, FeedForward):
            gains = [(module.fc1, beta), (module.fc2, beta)]
        else:
            continue
        for linear, gain in gains:
            nn.init.xavier_normal_(linear.weight, gain=gain)


class TransformerEncoder(TransformerStack):
    """``depth`` x (self-attention, FFN); forward(x (B, T, dim), padding_mask (B, T) True = pad).

    Options: see ``TransformerStack``. decoder_depth: depth of the decoder this encoder feeds, for
    DeepNorm's encoder constants; 0 = encoder-only (single-stack constants).
    """

    def __init__(self, *, depth: int, decoder_depth: int = 0, **options):
        super().__init__(SelfAttentionLayer, dict(causal=False), sublayers_per_layer=2,
                         deepnorm_depths=(depth, decoder_depth), part="encoder", depth=depth, **options)

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None) -> Tensor:
        return self._run(x, padding_mask=padding_mask)


class TransformerDecoder(TransformerStack):
    """``depth`` x (causal self-attention, cross-attention, FFN), attending to an encoder output.

    forward(x (B, T, dim), memory (B, S, dim), padding_mask (B, T), memory_padding_mask (B, S)),
    masks True = pad. Options: see ``TransformerStack``. encoder_depth: depth of the paired
    encoder, required by scheme="deepnorm", whose constants are set per encoder-decoder pair.

    Incremental decoding: ``forward(..., cache={})`` with one dict kept across calls feeds only the
    new positions (one at a time once the cache holds keys); keys and values of earlier positions
    and of ``memory`` come from the cache, as ``{"layers.<i>": {"self_attn": {"k", "v"},
    "cross_attn": {"k", "v"}}}`` tensors (B, H, T, head_dim) (``sigma_repro.models.decoding``
    reorders them along the batch). padding_mask, if given, then covers every position so far.
    """

    def __init__(self, *, depth: int, encoder_depth: int | None = None, **options):
        if options.get("scheme") == "deepnorm" and encoder_depth is None:
            raise ConfigError("scheme='deepnorm' needs encoder_depth, the depth of the encoder this decoder "
                              "attends to (DeepNorm's constants are set per encoder-decoder pair)")
        super().__init__(DecoderLayer, {}, sublayers_per_layer=3, deepnorm_depths=(encoder_depth or 0, depth),
                         part="decoder", depth=depth, **options)

    def forward(self, x: Tensor, memory: Tensor, *, padding_mask: Tensor | None = None,
                memory_padding_mask: Tensor | None = None, cache: dict | None = None) -> Tensor:
        return self._run(x, memory, padding_mask=padding_mask, memory_padding_mask=memory_padding_mask, cache=cache)


class DecoderOnly(TransformerStack):
    """``depth`` x (causal self-attention, FFN): the language-model stack.

    forward(x (B, T, dim), padding_mask (B, T) True = pad). Options: see ``TransformerStack``;
    DeepNorm uses its single-stack constants.
    """

    def __init__(self, *, depth: int, **options):
        super().__init__(SelfAttentionLayer, dict(causal=True), sublayers_per_layer=2,
                         deepnorm_depths=(0, depth), part="decoder", depth=depth, **options)

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None) -> Tensor:
        return self._run(x, padding_mask=padding_mask)


STACKS = {"encoder": TransformerEncoder, "decoder": TransformerDecoder, "decoder_only": DecoderOnly}


def build_stack(kind: str = "encoder", **options) -> TransformerStack:
    """``STACKS[kind](**options)``: kind "encoder" | "decoder" | "decoder_only"."""
    if kind not in STACKS:
        raise ConfigError(f"stack kind must be one of {list(STACKS)}, got {kind!r}")
    return STACKS[kind](**options)
