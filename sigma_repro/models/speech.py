"""Speech recognition models of the asr family: ``ConformerCTC`` and ``SpeechTransformer``, CTC over characters.

Both take log-mel features and their lengths and return unnormalised CTC logits and the lengths after
the front end's subsampling:

    model(features (B, T, F) float, lengths (B,) int64) -> (logits (B, T', vocab_size), out_lengths (B,) int64)

Positions t >= out_lengths[b] of a row are padding; ``model.output_lengths(lengths)`` gives out_lengths
without running the model. Constructors are keyword-only and take ``input_dim`` (F, the data's n_mels)
and ``vocab_size`` (blank id 0 + the alphabet) from the data's ``model_kwargs``. Inputs are trimmed to
the longest length in the batch first, so T' always equals max(out_lengths).

Padding changes no real output in eval mode (tests/test_speech_model.py checks it to 1e-5): attention
never attends to padded frames, the front ends see zeros past each length exactly as an utterance
alone does, and in the Conformer's convolution module padded frames are zeroed before the depthwise
convolution and left out of the GroupNorm statistics (``PaddedGLU``, ``PaddedGroupNorm``: torchaudio
leaves both to padding). Not covered: BatchNorm (``use_group_norm=False``) in training mode takes its
batch statistics over padded frames too (in eval it uses running statistics, so eval is exact);
length-bucketed batches keep that padding small.

ConformerCTC (Gulati et al. 2020, CTC head; the model of torchaudio's and ESPnet's recipes):
    Conv2d(1, C, 3, stride 2) - ReLU - Conv2d(C, C, 3, stride 2) - ReLU over (time, frequency), no
    padding (ESPnet's Conv2dSubsampling; C = dim by default), so out_lengths = ((L - 1)//2 - 1)//2 and
    an utterance needs at least 7 frames; Linear(C·F'', dim) with F'' = ((F - 1)//2 - 1)//2; dropout;
    ``torchaudio.models.Conformer`` (half-step FFNs, nn.MultiheadAttention, convolution module with
    pointwise and depthwise Conv1d); Linear(dim, vocab_size) CTC head.
    Positions: none besides what the depthwise convolutions give, as torchaudio leaves it (no
    absolute or relative positional encoding; the Conformer paper uses relative positions, which
    torchaudio's layer does not have).

SpeechTransformer (the σReparam paper's speech model shape, REFERENCE.md §1: 36 blocks, d 768, 4 heads,
MLP 3072, ReLU, dropout 0.3, layer-drop 0.3, CAPE positions, conv front end k 7 stride 3 GLU).
The paper's speech code (JAX) is not available offline. That shape is the transformer of flashlight's
CAPE / slimIPL speech recipes, so where a detail is needed and flashlight's ``Transformer`` block
says it (dropout placement, layer-drop), we follow that block; each such place says so.
    Front end: Conv1d(F, 2·dim, kernel 7, stride 3, padding 3) over time with the filterbanks as
    channels, then GLU over channels -> dim; out_lengths = (L + 2·3 - 7)//3 + 1 = (L - 1)//3 + 1.
    The paper's front end is a 1-D convolution over the 80 filterbanks, kernel 7, stride 3, with GLU;
    its padding and any dropout around it are not known here: the padding of kernel//2 (every input
    frame read) is ours.
    Positions: sinusoidal ([sin | cos] halves, fairseq's frequencies 10000^(-i/(dim/2 - 1))) of
    continuous positions counted in output frames, added to the front end's output, then dropout.
    CAPE (Likhomanenko et al. 2021) in training: each utterance's positions are shifted by one global
    Δ ~ U(-cape_global_shift, +cape_global_shift) seconds (60 s in CAPE's speech recipe) and, with
    cape_global_scaling > 1, scaled by one λ = exp(U(-ln s, ln s)): p = (t + Δ)·λ. Not implemented:
    CAPE's local shift (independent jitter of each position) and its mean-centring of positions.
    In eval positions are 0, 1, 2, ... and nothing is drawn.
    Encoder: our shared ``TransformerEncoder`` (sigma_repro.models.transformer), so σReparam sees
    every q/k/v/out and FFN Linear and the entropy probe reads each attention's q/k taps. norm "post"
    (the paper's baseline and, with σReparam, its "σReparam + post-LN"), "pre", or "none" (with
    σReparam, the paper's "σReparam"); other residual schemes of sigma_repro.models.residual work too.
    ReLU FFN. Dropouts as fairseq names them: ``attention_dropout`` (attention probabilities),
    ``activation_dropout`` (inside the FFN), ``dropout`` (branch outputs and the front end's output).
    flashlight's Transformer block applies its one dropout p to the attention probabilities and
    inside the MLP only, so conf/model/speech_transformer.yaml puts the paper's 0.3 there. Its
    Linears have no bias and its init is U(±1/sqrt(fan_in)); ours keep biases and the shared
    stack's xavier init.
    Layer-drop (``layer_drop``, flashlight's pLayerdrop): in training each layer is dropped with
    probability layer_drop, drawn independently per layer and forward from torch's global RNG (the
    task seeds it per step and rank, so runs and resumes repeat their draws); in eval no layer is
    dropped and nothing is drawn. A dropped layer is what flashlight's is, each branch times 0 and no
    rescaling: every residual sublayer gives post_norm(ω·x), i.e. x for pre-LN / no norm and
    LN2(LN1(x)) for post-LN; but its attention and FFN are not computed (flashlight computes and
    multiplies by 0). DDP: every parameter of a dropped layer still enters the graph through a
    zero-weighted term, so each gets a zero gradient, as in flashlight, on every rank. DDP's reducer
    therefore sees every parameter used in every step and needs no find_unused_parameters, and ranks
    may drop different layers (each rank draws its own; the averaged gradient mixes them, as LayerDrop
    under DDP does).
    CTC head: Linear(dim, vocab_size) (flashlight's recipe ends with a linear layer too).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from sigma_repro.errors import ConfigError
from sigma_repro.models.transformer import TransformerEncoder, check_width


def _check_sizes(model: str, **sizes) -> None:
    for name, value in sizes.items():
        if not (isinstance(value, Integral) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"{model} needs model.{name} to be an integer >= 1, found {value!r}")


def _check_batch(model: nn.Module, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Shapes, dtypes and lengths checked; features trimmed to the longest length: (B, max L, F)."""
    name = type(model).__name__
    if features.dim() != 3 or features.shape[2] != model.input_dim:
        raise ValueError(f"{name} takes features of shape (batch, time, {model.input_dim}) (input_dim from the data), "
                         f"got shape {tuple(features.shape)}")
    if lengths.dim() != 1 or lengths.shape[0] != features.shape[0] or lengths.is_floating_point():
        raise ValueError(f"{name} takes integer lengths of shape ({features.shape[0]},), one per utterance, got "
                         f"{lengths.dtype} of shape {tuple(lengths.shape)}")
    shortest, longest = (int(v) for v in torch.stack([lengths.min(), lengths.max()]).tolist())
    if shortest < model.min_length or longest > features.shape[1]:
        raise ValueError(f"{name} takes utterances of {model.min_length} to {features.shape[1]} frames (the front end "
                         f"needs at least {model.min_length}; lengths cannot exceed the padded time axis), got lengths "
                         f"{shortest}..{longest}; drop shorter utterances in the data or fix the lengths")
    return features[:, :longest], lengths.long()


def padding_mask(lengths: Tensor, length: int) -> Tensor | None:
    """(B, length) bool, True past each row's length; None when no row is padded (an all-False mask
    would force SDPA's masked, slower kernel for nothing)."""
    mask = torch.arange(length, device=lengths.device)[None, :] >= lengths[:, None]
    return mask if mask.any() else None


# ---- ConformerCTC -----------------------------------------------------------------------------------

class PaddedGLU(nn.GLU):
    """GLU that zeroes padded frames of its (B, C, T) output, so the depthwise convolution after it
    reads zeros past each length, as it does for an utterance alone. ``frame_valid`` ((B, T) bool,
    True at real frames, or None) is set by ``ConformerCTC.forward``."""

    frame_valid: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y if self.frame_valid is None else y * self.frame_valid[:, None, :].to(y.dtype)


class PaddedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are over the real frames of each (B, C, T) input only (torchaudio's
    GroupNorm(1, C) averages over padding too). Same parameters as nn.GroupNorm, so it loads their
    state dicts and counts as a norm for σReparam. ``frame_valid`` as in ``PaddedGLU``."""

    frame_valid: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.frame_valid is None:
            return super().forward(x)
        B, C, T = x.shape
        G = self.num_groups
        xg = x.float().view(B, G, C // G, T)  # (B, G, C/G, T), statistics in fp32 as GroupNorm's
        keep = self.frame_valid[:, None, None, :].float()  # (B, 1, 1, T)
        count = keep.sum(-1, keepdim=True) * (C // G)  # (B, 1, 1, 1)
        mean = (xg * keep).sum((2, 3), keepdim=True) / count
        var = ((xg - mean).square() * keep).sum((2, 3), keepdim=True) / count
        y = ((xg - mean) * torch.rsqrt(var + self.eps)).view(B, C, T)
        if self.affine:
            y = y * self.weight[:, None] + self.bias[:, None]
        return y.to(x.dtype)


class ConformerCTC(nn.Module):
    """Conv2d x2 subsampling -> Linear -> ``torchaudio.models.Conformer`` -> Linear CTC head (module docstring).

    input_dim, vocab_size: from the data (n_mels; blank + alphabet).
    dim, depth, num_heads, ffn_dim: width, Conformer layers, attention heads, FFN hidden width.
    kernel_size: the depthwise convolution's kernel (odd: torchaudio pads it 'same').
    dropout: torchaudio's one dropout (FFNs, attention probabilities and output, convolution module),
        also on the front end's output.
    use_group_norm: GroupNorm (padding-exact here, batch-size independent) instead of BatchNorm1d in
        the convolution module. convolution_first: convolution module before self-attention.
    subsampling_channels: channels of the two Conv2d (None = dim, ESPnet's Conv2dSubsampling).
    """

    min_length = 7  # frames: ((7 - 1)//2 - 1)//2 = 1

    def __init__(self, *, input_dim: int, vocab_size: int, dim: int = 144, depth: int = 16, num_heads: int = 4,
                 ffn_dim: int = 576, kernel_size: int = 31, dropout: float = 0.1, use_group_norm: bool = False,
                 convolution_first: bool = False, subsampling_channels: int | None = None):
        super().__init__()
        channels = dim if subsampling_channels is None else subsampling_channels
        _check_sizes("ConformerCTC", input_dim=input_dim, vocab_size=vocab_size, dim=dim, depth=depth,
                     num_heads=num_heads, ffn_dim=ffn_dim, kernel_size=kernel_size, subsampling_channels=channels)
        if input_dim < 7:
            raise ConfigError(f"ConformerCTC's two stride-2 Conv2d need at least 7 feature bins, got input_dim="
                              f"{input_dim}; use more mel bins (data n_mels)")
        check_width(dim, num_heads)
        if kernel_size % 2 == 0:
            raise ConfigError(f"model.kernel_size must be odd (torchaudio pads the depthwise convolution 'same'), "
                              f"found {kernel_size}; e.g. 31 for Conformer-S's 32")
        if not (isinstance(dropout, Real) and 0.0 <= dropout < 1.0):
            raise ConfigError(f"model.dropout must be a probability in [0, 1), found {dropout!r}")
        from torchaudio.models import Conformer  # torchaudio takes a second to import: only when built

        self.input_dim, self.vocab_size = int(input_dim), int(vocab_size)
        freq = ((input_dim - 1) // 2 - 1) // 2  # F'' after the two convolutions
        self.subsampling = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2), nn.ReLU(), nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU())
        self.input_proj = nn.Linear(channels * freq, dim)
        self.dropout = nn.Dropout(dropout)
        self.conformer = Conformer(input_dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, num_layers=depth,
                                   depthwise_conv_kernel_size=kernel_size, dropout=dropout,
                                   use_group_norm=use_group_norm, convolution_first=convolution_first)
        for layer in self.conformer.conformer_layers:  # torchaudio's padding-blind parts, same parameters
            conv = layer.conv_module.sequential  # pointwise, GLU, depthwise, norm, SiLU, pointwise, dropout
            conv[1] = PaddedGLU(dim=1)
            if use_group_norm:
                conv[3] = PaddedGroupNorm(conv[3].num_groups, conv[3].num_channels, eps=conv[3].eps)
        self.head = nn.Linear(dim, vocab_size)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Frames after the two k3/stride-2 convolutions without padding: ((L - 1)//2 - 1)//2."""
        return ((lengths - 1).div(2, rounding_mode="floor") - 1).div(2, rounding_mode="floor")

    def _padded_modules(self) -> Iterator[nn.Module]:
        return (m for m in self.modules() if isinstance(m, (PaddedGLU, PaddedGroupNorm)))

    @contextmanager
    def _frames(self, valid: Tensor | None) -> Iterator[None]:
        """The convolution modules' ``frame_valid`` set to ``valid`` for one forward, then cleared."""
        for module in self._padded_modules():
            module.frame_valid = valid
        try:
            yield
        finally:
            for module in self._padded_modules():
                module.frame_valid = None

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        features, lengths = _check_batch(self, features, lengths)
        x = self.subsampling(features.unsqueeze(1))  # (B, C, T', F'')
        B, C, T, freq = x.shape
        x = self.input_proj(x.transpose(1, 2).reshape(B, T, C * freq))  # (B, T', dim)
        out_lengths = self.output_lengths(lengths)
        pad = padding_mask(out_lengths, T)
        with self._frames(None if pad is None else ~pad):
            x, _ = self.conformer(self.dropout(x), out_lengths)  # (B, T', dim)
        return self.head(x), out_lengths  # (B, T', vocab_size)


# ---- SpeechTransformer --------------------------------------------------------------------------------

def continuous_sinusoidal(positions: Tensor, dim: int) -> Tensor:
    """Sinusoidal vectors of real-valued positions (..., T) -> (..., T, dim) float32: [sin(p·f) | cos(p·f)]
    with fairseq's frequencies f_i = 10000^(-i/(dim/2 - 1)) (CAPE encodes continuous positions so)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=positions.device)
                      * -(math.log(10000.0) / (half - 1)))
    angles = positions.float()[..., None] * freqs  # (..., T, half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def _dropped_layer(layer: nn.Module, x: Tensor) -> Tensor:
    """A layer dropped by layer-drop, as flashlight's (each branch times 0): each residual sublayer gives
    post_norm(ω·x). Its attention and FFN are not run; every parameter of the layer enters the graph
    through a zero-weighted term, so DDP sees it used and it gets a zero gradient, as in flashlight."""
    untouched = torch.stack([p.reshape(-1)[0] for p in layer.parameters()]).sum() * 0.0
    for sublayer in (layer.self_attn, layer.ffn):
        x = sublayer.post_norm(sublayer.omega * x)
    return x + untouched.to(x.dtype)


class SpeechTransformer(nn.Module):
    """Conv1d + GLU front end -> sinusoidal (CAPE) positions -> shared transformer encoder with layer-drop
    -> Linear CTC head: the σReparam paper's speech model shape (module docstring).

    input_dim, vocab_size: from the data (n_mels; blank + alphabet).
    dim, depth, num_heads, ffn_dim: width, encoder layers, attention heads, FFN hidden width.
    norm, scheme, tau, tau_depth, activation, bias: the encoder's (``sigma_repro.models.transformer``).
    dropout: front end output and every branch output; attention_dropout: attention probabilities;
        activation_dropout: inside the FFN.
    layer_drop: probability of dropping each layer in a training forward (flashlight's pLayerdrop).
    kernel_size, stride: the front end's Conv1d (padding kernel_size//2).
    frame_seconds: the input features' frame shift in seconds (10 ms for the data's log-mels); with
        ``stride`` it converts CAPE's shift from seconds to output frames.
    cape_global_shift: max |Δ| in seconds of the per-utterance global position shift in training (0 = off).
    cape_global_scaling: max λ of the per-utterance global position scaling in training (1 = off).
    """

    min_length = 1  # frames: the padded convolution gives every utterance at least one output frame

    def __init__(self, *, input_dim: int, vocab_size: int, dim: int = 768, depth: int = 36, num_heads: int = 4,
                 ffn_dim: int = 3072, norm: str = "post", scheme: str = "standard", activation: str = "relu",
                 dropout: float = 0.0, attention_dropout: float = 0.3, activation_dropout: float = 0.3,
                 layer_drop: float = 0.3, kernel_size: int = 7, stride: int = 3, frame_seconds: float = 0.01,
                 cape_global_shift: float = 60.0, cape_global_scaling: float = 1.0, tau: float | None = None,
                 tau_depth: str = "sublayers", bias: bool = True):
        super().__init__()
        _check_sizes("SpeechTransformer", input_dim=input_dim, vocab_size=vocab_size, dim=dim, depth=depth,
                     num_heads=num_heads, ffn_dim=ffn_dim, kernel_size=kernel_size, stride=stride)
        check_width(dim, num_heads, sinusoidal=True)
        for name, value in (("dropout", dropout), ("attention_dropout", attention_dropout),
                            ("activation_dropout", activation_dropout), ("layer_drop", layer_drop)):
            if not (isinstance(value, Real) and 0.0 <= value < 1.0):
                raise ConfigError(f"model.{name} must be a probability in [0, 1), found {value!r}")
        if not (isinstance(frame_seconds, Real) and frame_seconds > 0):
            raise ConfigError(f"model.frame_seconds must be the features' frame shift in seconds (> 0, 0.01 for a "
                              f"10 ms hop), found {frame_seconds!r}")
        if not (isinstance(cape_global_shift, Real) and cape_global_shift >= 0):
            raise ConfigError(f"model.cape_global_shift must be >= 0 seconds (0 = no shift), found {cape_global_shift!r}")
        if not (isinstance(cape_global_scaling, Real) and cape_global_scaling >= 1):
            raise ConfigError(f"model.cape_global_scaling must be >= 1 (1 = no scaling; CAPE's WSJ recipe 1.1), "
                              f"found {cape_global_scaling!r}")
        self.input_dim, self.vocab_size, self.dim = int(input_dim), int(vocab_size), dim
        self.kernel_size, self.stride, self.layer_drop = kernel_size, stride, float(layer_drop)
        self.cape_shift_frames = cape_global_shift / (frame_seconds * stride)  # seconds -> output frames
        self.cape_global_scaling = float(cape_global_scaling)
        self.front_end = nn.Sequential(
            nn.Conv1d(input_dim, 2 * dim, kernel_size, stride=stride, padding=kernel_size // 2), nn.GLU(dim=1))
        self.dropout = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(
            depth=depth, dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, norm=norm, scheme=scheme, dropout=dropout,
            attention_dropout=attention_dropout, activation_dropout=activation_dropout, activation=activation,
            tau=tau, tau_depth=tau_depth, bias=bias)
        self.head = nn.Linear(dim, vocab_size)

    def extra_repr(self) -> str:
        return (f"layer_drop={self.layer_drop}, cape_shift_frames={self.cape_shift_frames:.4g}, "
                f"cape_global_scaling={self.cape_global_scaling}")

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Frames after the front end's Conv1d (padding k//2): (L + 2·(k//2) - k)//stride + 1."""
        return (lengths + 2 * (self.kernel_size // 2) - self.kernel_size).div(self.stride, rounding_mode="floor") + 1

    def positions(self, batch_size: int, length: int, device: torch.device | None = None) -> Tensor:
        """(B, T') float32 positions in output frames: 0, 1, 2, ... in eval; in training with CAPE's global
        shift and scaling, (t + Δ_b)·λ_b per utterance, drawn from torch's global RNG."""
        p = torch.arange(length, dtype=torch.float32).expand(batch_size, length)
        if self.training and self.cape_shift_frames > 0:
            p = p + (torch.rand(batch_size, 1) * 2 - 1) * self.cape_shift_frames
        if self.training and self.cape_global_scaling > 1:
            p = p * torch.exp((torch.rand(batch_size, 1) * 2 - 1) * math.log(self.cape_global_scaling))
        return p.to(device)

    def dropped_layers(self) -> list[bool]:
        """This forward's layer-drop draw, one bool per layer: all False in eval or without layer-drop."""
        depth = len(self.encoder.layers)
        if not (self.training and self.layer_drop > 0):
            return [False] * depth
        return (torch.rand(depth) < self.layer_drop).tolist()

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        features, lengths = _check_batch(self, features, lengths)
        in_pad = padding_mask(lengths, features.shape[1])
        if in_pad is not None:  # the convolution reads zeros past each length, as for an utterance alone
            features = features.masked_fill(in_pad[:, :, None], 0.0)
        x = self.front_end(features.transpose(1, 2)).transpose(1, 2)  # (B, F, T) -> (B, 2·dim, T') -> (B, T', dim)
        B, T, _ = x.shape
        out_lengths = self.output_lengths(lengths)
        pad = padding_mask(out_lengths, T)
        x = self.dropout(x + continuous_sinusoidal(self.positions(B, T, x.device), self.dim).to(x.dtype))
        for layer, dropped in zip(self.encoder.layers, self.dropped_layers()):
            x = _dropped_layer(layer, x) if dropped else layer(x, padding_mask=pad)
        x = self.encoder.final_norm(x)
        return self.head(x), out_lengths  # (B, T', vocab_size)

    def transformer_blocks(self) -> list[tuple[str, nn.Module]]:
        """The encoder's layers ("encoder.layers.0", ...): the blocks the rank-collapse probe measures."""
        return [(f"encoder.{name}", block) for name, block in self.encoder.transformer_blocks()]
