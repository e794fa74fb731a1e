"""The one registry of attention kinds: which modules are attention, and how each diagnostic reads them.

Every attention diagnostic finds its modules here and nowhere else: the entropy probe (entropy.py)
takes the queries, keys and masks each call used; the logit norms (spectral.py) and gradient norms
(gradients.py) read the rows of W_Q, W_K, W_V, W_O; rank collapse (rank.py) reads whether a call's
tokens are sequence-first and which are padding. A kind is registered once with all of that:

- ``matches``: the attention class (isinstance), or a predicate on a module;
- ``hook_logits(module, record)``: installs hooks that call ``record(AttentionCall(...))`` once per
  forward call of the module, with the q, k, scale and masks its logits were computed from;
- ``projections(module)`` (optional): an ``AttentionLayout`` of where W_Q, W_K, W_V, W_O are, or
  None when this module's weights are not laid out so (its logit and gradient norms are skipped);
- ``hook_tokens(module, record)`` (optional): installs hooks that call ``record(TokenLayout(...))``
  per call; without it, a call is taken to be batch-first (B, T, d) without padding.

A model family with its own attention class adds one entry, ``register_attention_kind(AttentionKind(...))``,
next to its model (its module is imported before any diagnostic runs on the model); the diagnostic
modules do not change. Built in, newest registration first when several match:

- ``q_tap/k_tap`` — our convention (sigma_repro.models.attention.MultiHeadAttention, and any module
  following it): ``nn.Identity`` taps ``q_tap`` / ``k_tap`` called on q (B, H, Tq, hd) and
  k (B, H, Tk, hd), an attribute ``scale``, and, set during its forward, ``last_key_padding_mask``
  ((B, Tk) bool, True = pad, or None) and ``last_causal`` (bool). Padded queries are excluded via
  ``last_query_padding_mask`` ((B, Tq) bool or None) when the module has that attribute; without
  it, attention with as many queries as keys is taken to be self-attention and the key padding
  applies to the queries too. Projections: ``q_proj`` / ``k_proj`` (optional ``v_proj``,
  ``out_proj``) ``nn.Linear`` children with an int ``num_heads``.
- ``timm.layers.Attention`` — hooks on ``q_norm`` / ``k_norm`` (called on the fused and the manual
  path) plus its ``attn_mask`` / ``is_causal`` arguments; projections: the fused ``qkv`` rows
  [q; k; v] and ``proj``. No padding.
- ``torch.nn.MultiheadAttention`` (also inside nn.Transformer* and torchaudio's Conformer) — q and k
  recomputed from the call's query/key and the module's (possibly σReparam-parametrized) projection
  weights; ``key_padding_mask``, ``attn_mask`` (bool or float) and ``is_causal`` applied; in
  self-attention (query is key) padded queries are excluded. Its ``need_weights=True`` output is
  not used: in train mode it is post-dropout. Projections: ``in_proj_weight`` rows [q; k; v] or
  ``q/k/v_proj_weight``, and ``out_proj``.

A key is masked only where its logit bias is -inf (bool masks become -inf).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sigma_repro.errors import ConfigError


class AttentionCall(NamedTuple):
    """What one call of an attention module computed its logits from: scale · q kᵀ + bias."""

    q: Tensor  # (B, H, Tq, hd)
    k: Tensor  # (B, H, Tk, hd)
    scale: float
    bias: Tensor | None  # broadcastable to (B, H, Tq, Tk); -inf at keys a query may not see
    query_valid: Tensor | None  # (B, Tq) bool, True at the queries to average over; None = all


class TokenLayout(NamedTuple):
    """How one attention call holds the tokens it attends from (and its block outputs)."""

    seq_first: bool  # (T, B, d) rather than (B, T, d)
    valid: Tensor | None  # (B, T) bool, True at real tokens; None = all (or not known)


class Projection(NamedTuple):
    """Where one attention projection matrix lives: rows ``rows`` of ``owner.<tensor_name>``
    (an (out, in) matrix; heads are consecutive blocks of head_dim rows)."""

    owner: nn.Module
    tensor_name: str
    rows: slice


class AttentionLayout(NamedTuple):
    """W_Q, W_K, W_V, W_O of one attention module (W_V, W_O None where it has none), its number
    of heads and the scale its logits are multiplied by."""

    q: Projection
    k: Projection
    v: Projection | None
    o: Projection | None
    num_heads: int
    scale: float


Hooks = Callable[[nn.Module, Callable], list[RemovableHandle]]


@dataclass(frozen=True)
class AttentionKind:
    """One kind of attention module and how each diagnostic reads it (see the module docstring)."""

    name: str
    matches: type | Callable[[nn.Module], bool]
    hook_logits: Hooks  # (module, record(AttentionCall)) -> hook handles
    projections: Callable[[nn.Module], AttentionLayout | None] | None = None
    hook_tokens: Hooks | None = None  # (module, record(TokenLayout)) -> hook handles

    def match(self, module: nn.Module) -> bool:
        return isinstance(module, self.matches) if isinstance(self.matches, type) else bool(self.matches(module))


ATTENTION_KINDS: dict[str, AttentionKind] = {}


def register_attention_kind(kind: AttentionKind) -> None:
    """Add ``kind`` to the registry every attention diagnostic reads; it takes precedence over the
    kinds registered before it."""
    if kind.name in ATTENTION_KINDS:
        raise ValueError(f"an attention kind named {kind.name!r} is already registered (kinds: "
                         f"{list(ATTENTION_KINDS)}); give yours another name.")
    ATTENTION_KINDS[kind.name] = kind


def _kind_of(module: nn.Module) -> AttentionKind | None:
    """The kind of ``module`` (the newest registration that matches), or None if it is not attention."""
    return next((kind for kind in reversed(ATTENTION_KINDS.values()) if kind.match(module)), None)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, AttentionKind]]:
    """(name, module, kind) of every attention module of ``model`` in module order.

    Raises the one error of every attention diagnostic when there is none (a ConfigError: it is
    raised before any compute, and the Hydra app prints it without a traceback).
    """
    found = [(name, module, kind) for name, module in model.named_modules()
             if (kind := _kind_of(module)) is not None]
    if not found:
        types = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError(
            f"found no supported attention module in {type(model).__name__}: expected a module of a registered "
            f"attention kind {list(ATTENTION_KINDS)}; found modules of types {types}. Register the model's "
            "attention class with sigma_repro.diagnostics.register_attention_kind(AttentionKind(...)) "
            "(see sigma_repro/diagnostics/attention_kinds.py)."
        )
    return found


def attention_projections(model: nn.Module) -> list[tuple[str, AttentionLayout]]:
    """(name, layout) of every attention module whose kind says where its W_Q, W_K are."""
    attention = attention_modules(model)
    found = [(name, layout) for name, module, kind in attention
             if kind.projections is not None and (layout := kind.projections(module)) is not None]
    if not found:
        kinds = sorted({f"{type(module).__name__} ({kind.name})" for _, module, kind in attention})
        raise ValueError(
            f"none of the attention modules of {type(model).__name__} has W_Q, W_K rows the diagnostics can read: "
            f"found {kinds}. Give the kind a `projections` function in register_attention_kind "
            "(sigma_repro/diagnostics/attention_kinds.py), or give the module q_proj/k_proj nn.Linear projections."
        )
    return found


# ---- masks -------------------------------------------------------------------------------------

def mask_to_bias(mask: Tensor, blocked_when: bool) -> Tensor:
    """fp32 additive logit bias from a mask: a bool mask gives -inf where it equals ``blocked_when``;
    a float mask is already additive."""
    if mask.dtype != torch.bool:
        return mask.float()
    return torch.zeros(mask.shape, device=mask.device).masked_fill(mask == blocked_when, float("-inf"))


def causal_bias(Tq: int, Tk: int, device: torch.device) -> Tensor:
    """(Tq, Tk) bias blocking keys after each query, aligned top-left as SDPA's ``is_causal``."""
    return torch.full((Tq, Tk), float("-inf"), device=device).triu(1)


def valid_from_padding(pad: Tensor) -> Tensor:
    """(B, T) bool True at real tokens from a padding mask: bool True = pad, or float -inf = pad."""
    return ~pad if pad.dtype == torch.bool else ~torch.isneginf(pad)


def _as_4d(bias: Tensor) -> Tensor:
    """Left-pad a broadcastable bias with singleton dims to (B or 1, H or 1, Tq, Tk)."""
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


# ---- q_tap/k_tap: our convention -----------------------------------------------------------------

def _has_taps(module: nn.Module) -> bool:
    return hasattr(module, "q_tap") and hasattr(module, "k_tap")


def _tap_logits(module: nn.Module, record: Callable[[AttentionCall], None]) -> list[RemovableHandle]:
    """q and k from the taps; the masks the module records per forward."""
    captured: dict[str, Tensor] = {}

    def after_forward(mod: nn.Module, args, output) -> None:
        q, k = captured.pop("q"), captured.pop("k")
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(
                f"{type(mod).__name__}.q_tap/k_tap must receive (B, H, T, head_dim) tensors; "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}."
            )
        Tq, Tk = q.shape[2], k.shape[2]
        key_pad = mod.last_key_padding_mask  # (B, Tk) True = pad, or None
        bias = None
        if key_pad is not None:
            bias = mask_to_bias(key_pad, blocked_when=True)[:, None, None, :]  # (B, 1, 1, Tk)
        if mod.last_causal:
            causal = causal_bias(Tq, Tk, q.device)
            bias = causal if bias is None else bias + causal
        if hasattr(mod, "last_query_padding_mask"):
            query_pad = mod.last_query_padding_mask
        else:
            query_pad = key_pad if Tq == Tk else None
        record(AttentionCall(q, k, float(mod.scale), bias, None if query_pad is None else ~query_pad))

    return [
        module.q_tap.register_forward_hook(lambda m, a, out: captured.__setitem__("q", out)),
        module.k_tap.register_forward_hook(lambda m, a, out: captured.__setitem__("k", out)),
        module.register_forward_hook(after_forward),
    ]


def _tap_tokens(module: nn.Module, record: Callable[[TokenLayout], None]) -> list[RemovableHandle]:
    def after_forward(mod: nn.Module, args, output) -> None:
        pad = getattr(mod, "last_query_padding_mask", getattr(mod, "last_key_padding_mask", None))
        record(TokenLayout(False, None if pad is None else valid_from_padding(pad)))

    return [module.register_forward_hook(after_forward)]


def _tap_projections(module: nn.Module) -> AttentionLayout | None:
    """Separate ``q_proj``, ``k_proj`` (optional ``v_proj``, ``out_proj``) nn.Linear children split
    into ``num_heads`` heads; scale ``module.scale``, default head_dim^-1/2. None without q_proj/k_proj
    (e.g. a fused qkv)."""
    full = slice(None)
    q_proj, k_proj = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
    if not (isinstance(q_proj, nn.Linear) and isinstance(k_proj, nn.Linear)):
        return None
    num_heads = getattr(module, "num_heads", None)
    if not isinstance(num_heads, int) or q_proj.out_features % num_heads:
        raise ValueError(
            f"{type(module).__name__} has q_proj/k_proj but no int `num_heads` dividing its "
            f"{q_proj.out_features} query rows (found num_heads={num_heads!r}); set `self.num_heads` "
            "so the diagnostics can split the projections per head."
        )
    optional = {role: Projection(getattr(module, f"{role}_proj"), "weight", full)
                for role in ("v", "out") if isinstance(getattr(module, f"{role}_proj", None), nn.Linear)}
    scale = float(getattr(module, "scale", (q_proj.out_features // num_heads) ** -0.5))
    return AttentionLayout(Projection(q_proj, "weight", full), Projection(k_proj, "weight", full),
                           optional.get("v"), optional.get("out"), num_heads, scale)


# ---- timm Attention --------------------------------------------------------------------------------

def _timm_logits(module: TimmAttention, record: Callable[[AttentionCall], None]) -> list[RemovableHandle]:
    """timm ``Attention(x, attn_mask=None, is_causal=False)``: SDPA mask semantics (bool True = attend)."""
    captured: dict = {}

    def before_forward(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["attn_mask"] = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        captured["is_causal"] = args[2] if len(args) > 2 else kwargs.get("is_causal", False)

    def after_forward(mod: TimmAttention, args, output) -> None:
        q, k = captured.pop("q"), captured.pop("k")  # (B, H, N, hd)
        attn_mask = captured.pop("attn_mask")
        if captured.pop("is_causal"):  # takes precedence over attn_mask, as in timm
            bias = causal_bias(q.shape[2], k.shape[2], q.device)
        elif attn_mask is not None:
            bias = _as_4d(mask_to_bias(attn_mask, blocked_when=False))
        else:
            bias = None
        record(AttentionCall(q, k, mod.scale, bias, None))

    return [
        module.register_forward_pre_hook(before_forward, with_kwargs=True),
        module.q_norm.register_forward_hook(lambda m, a, out: captured.__setitem__("q", out)),
        module.k_norm.register_forward_hook(lambda m, a, out: captured.__setitem__("k", out)),
        module.register_forward_hook(after_forward),
    ]


def _timm_projections(module: TimmAttention) -> AttentionLayout:
    d, full = module.num_heads * module.head_dim, slice(None)
    return AttentionLayout(
        Projection(module.qkv, "weight", slice(0, d)), Projection(module.qkv, "weight", slice(d, 2 * d)),
        Projection(module.qkv, "weight", slice(2 * d, 3 * d)), Projection(module.proj, "weight", full),
        module.num_heads, module.scale,
    )


# ---- nn.MultiheadAttention ---------------------------------------------------------------------------

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _mha_logits(module: nn.MultiheadAttention, record: Callable[[AttentionCall], None]) -> list[RemovableHandle]:
    """Recompute q, k from the call's inputs in a forward pre-hook."""
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError(
            "the attention diagnostics do not support nn.MultiheadAttention with add_bias_kv=True or "
            "add_zero_attn=True (extra keys); construct it without them or register a kind for it "
            "(sigma_repro/diagnostics/attention_kinds.py)."
        )

    def before_forward(mod: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        call = _MHA_SIGNATURE.bind(mod, *args, **kwargs)
        call.apply_defaults()
        query, key = call.arguments["query"], call.arguments["key"]
        key_pad, attn_mask = call.arguments["key_padding_mask"], call.arguments["attn_mask"]
        self_attention = query is key
        if query.dim() == 2:  # unbatched (T, E)
            query, key = query[None], key[None]
            key_pad = None if key_pad is None else key_pad[None]
        elif not mod.batch_first:  # (T, B, E)
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        B, Tq, E = query.shape
        Tk, H = key.shape[1], mod.num_heads

        if mod.in_proj_weight is not None:
            w_q, w_k, _ = mod.in_proj_weight.chunk(3)
        else:  # kdim/vdim differ from embed_dim: separate projections
            w_q, w_k = mod.q_proj_weight, mod.k_proj_weight
        b_q = b_k = None
        if mod.in_proj_bias is not None:
            b_q, b_k, _ = mod.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(B, Tq, H, E // H).transpose(1, 2)  # (B, H, Tq, hd)
        k = F.linear(key, w_k, b_k).view(B, Tk, H, E // H).transpose(1, 2)  # (B, H, Tk, hd)

        bias = torch.zeros(1, 1, Tq, Tk, device=q.device)
        if attn_mask is not None:  # (Tq, Tk) or (B*H, Tq, Tk); bool True = blocked
            mask_bias = mask_to_bias(attn_mask, blocked_when=True)
            bias = bias + (mask_bias.view(B, H, Tq, Tk) if mask_bias.dim() == 3 else mask_bias)
        elif call.arguments["is_causal"]:
            bias = bias + causal_bias(Tq, Tk, q.device)
        query_valid = None
        if key_pad is not None:  # (B, Tk); bool True = pad, or float additive
            bias = bias + mask_to_bias(key_pad, blocked_when=True)[:, None, None, :]
            if self_attention:
                query_valid = valid_from_padding(key_pad)
        record(AttentionCall(q, k, (E // H) ** -0.5, bias, query_valid))

    return [module.register_forward_pre_hook(before_forward, with_kwargs=True)]


def _mha_tokens(module: nn.MultiheadAttention, record: Callable[[TokenLayout], None]) -> list[RemovableHandle]:
    """``batch_first=False`` means (T, B, E); in self-attention the key padding is the token padding."""

    def before_forward(mod: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        call = _MHA_SIGNATURE.bind(mod, *args, **kwargs)
        query, key, pad = call.arguments["query"], call.arguments["key"], call.arguments.get("key_padding_mask")
        self_padding = query is key and pad is not None and query.dim() == 3
        record(TokenLayout(query.dim() == 3 and not mod.batch_first, valid_from_padding(pad) if self_padding else None))

    return [module.register_forward_pre_hook(before_forward, with_kwargs=True)]


def _mha_projections(module: nn.MultiheadAttention) -> AttentionLayout:
    d, full = module.embed_dim, slice(None)
    if module._qkv_same_embed_dim:  # one packed in_proj_weight (reading it would run σReparam)
        q, k, v = (Projection(module, "in_proj_weight", slice(i * d, (i + 1) * d)) for i in range(3))
    else:
        q, k, v = (Projection(module, f"{role}_proj_weight", full) for role in "qkv")
    return AttentionLayout(q, k, v, Projection(module.out_proj, "weight", full), module.num_heads,
                           (d // module.num_heads) ** -0.5)


register_attention_kind(AttentionKind("torch.nn.MultiheadAttention", nn.MultiheadAttention, _mha_logits,
                                      _mha_projections, _mha_tokens))
register_attention_kind(AttentionKind("timm.layers.Attention", TimmAttention, _timm_logits, _timm_projections))
register_attention_kind(AttentionKind("q_tap/k_tap", _has_taps, _tap_logits, _tap_projections, _tap_tokens))
