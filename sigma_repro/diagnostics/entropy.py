"""Attention entropy per layer and head, read from any model through temporary hooks.

The σReparam paper's central diagnostic: Ent(A_i) = -Σ_j A_ij log A_ij for each query i, averaged over
queries and examples, per head. Collapse (entropy -> 0, one key per query) accompanies unstable
training; at init it is about log T.

Fused attention (SDPA) never materialises A, so we do not read A: we capture the queries and keys
each attention module actually uses and recompute the logits once, in fp32, outside autocast, on a
probe batch. Hooks live for that one forward only; the model is run in eval mode (no dropout, and
σReparam's power iteration does not advance) and its modes are restored afterwards, so probing
never changes training.

Supported attention modules (found by ``named_modules``; others are ignored):

- ours: any module with ``q_tap`` and ``k_tap`` submodules (identities receiving q, k of shape
  (B, H, T, hd)), an attribute ``scale``, and, set during its forward, ``last_key_padding_mask``
  ((B, Tk) bool, True = pad, or None) and ``last_causal`` (bool). Padded queries are excluded from
  the average via ``last_query_padding_mask`` ((B, Tq) bool, True = pad, or None) when the module
  has that attribute; without it, attention with as many queries as keys is taken to be
  self-attention and the key padding applies to the queries too.
- timm ``Attention``: hooks on ``q_norm`` / ``k_norm`` (called on the fused and the manual path),
  plus its ``attn_mask`` / ``is_causal`` arguments.
- ``nn.MultiheadAttention``: q and k are recomputed from the call's query/key and the module's
  projection weights (which may be σReparam-parametrized); ``key_padding_mask``, ``attn_mask``
  (bool or float) and ``is_causal`` are applied; in self-attention, queries at padded positions are
  excluded. Its own ``need_weights=True`` output is not used: in train mode it is post-dropout.

A key is masked only where its logit bias is -inf (bool masks become -inf; a float mask using a
large finite negative number counts those keys as visible for the normalized entropy). Queries
that see no key (fully masked rows) are excluded. The normalized entropy divides each query's
entropy by log(number of keys it may attend to); queries with a single key have no freedom and
are excluded from that average.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sigma_repro.modes import eval_mode

# Largest (b, H, Tq, Tk) logits block built at once; the probe batch is processed in chunks of
# examples below it so that long sequences (LM, T = 1024) do not allocate gigabytes.
_MAX_LOGITS = 1 << 24

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def attention_entropy(model: nn.Module, *inputs, normalized: bool = False, **kwargs) -> dict[str, Tensor]:
    """Per-head mean attention entropy of every supported attention module in ``model``.

    Runs one no-grad, eval-mode forward ``model(*inputs, **kwargs)`` and returns, keyed by qualified
    module name in module order, a float32 CPU tensor (H,). With ``normalized=True`` each query's
    entropy is divided by log(T_valid), making sequences of different lengths comparable.
    Modules that the forward did not call are left out.
    """
    entropy, entropy_norm = probe_attention_entropy(model, inputs, kwargs)
    return entropy_norm if normalized else entropy


def probe_attention_entropy(
    model: nn.Module, args: tuple, kwargs: dict
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Both the plain and the normalized per-head entropies from the same single forward.

    The callback logs both; this saves it a second forward. See ``attention_entropy``.
    """
    accumulators: dict[str, _HeadEntropy] = {}
    handles: list[RemovableHandle] = []
    for name, module in model.named_modules():
        install = _hook_installer(module)
        if install is not None:
            accumulators[name] = _HeadEntropy()
            handles += install(module, accumulators[name])
    if not accumulators:
        raise ValueError(
            f"attention_entropy found no supported attention module in {type(model).__name__}: "
            "expected timm Attention, nn.MultiheadAttention, or a module with q_tap/k_tap "
            "submodules (see sigma_repro/diagnostics/entropy.py)."
        )

    try:
        with eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()

    called = {name: acc for name, acc in accumulators.items() if acc.sums is not None}
    return (
        {name: acc.mean() for name, acc in called.items()},
        {name: acc.mean_normalized() for name, acc in called.items()},
    )


class _HeadEntropy:
    """Per-head running sums over the valid queries of one module, across its calls in a forward."""

    def __init__(self) -> None:
        self.sums: Tensor | None = None  # (4, H): entropy, count, normalized entropy, its count

    def add(self, q: Tensor, k: Tensor, scale: float, bias: Tensor | None, query_valid: Tensor | None) -> None:
        sums = _entropy_sums(q, k, scale, bias, query_valid).cpu()
        self.sums = sums if self.sums is None else self.sums + sums

    def mean(self) -> Tensor:
        return (self.sums[0] / self.sums[1]).float()  # (H,), NaN for a head without valid queries

    def mean_normalized(self) -> Tensor:
        return (self.sums[2] / self.sums[3]).float()


def _entropy_sums(q: Tensor, k: Tensor, scale: float, bias: Tensor | None, query_valid: Tensor | None) -> Tensor:
    """Sums over examples and valid queries of the entropy and normalized entropy, per head.

    q (B, H, Tq, hd), k (B, H, Tk, hd); ``bias`` is added to the logits, broadcastable to
    (B, H, Tq, Tk) with -inf at keys a query may not see; ``query_valid`` (B, Tq) bool marks the
    queries to average over (None = all). Returns float64 (4, H): entropy sum, query count,
    normalized-entropy sum, query count for it.
    """
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    chunk = max(1, _MAX_LOGITS // (H * Tq * Tk))
    totals = torch.zeros(4, H, dtype=torch.float64, device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        for start in range(0, B, chunk):
            rows = slice(start, start + chunk)
            logits = (q[rows].float() * scale) @ k[rows].float().transpose(-2, -1)  # (b, H, Tq, Tk)
            if bias is not None:
                logits = logits + (bias[rows] if bias.shape[0] > 1 else bias)
            visible = ~torch.isneginf(logits)
            logp = logits.log_softmax(dim=-1)  # NaN on rows with no visible key; excluded below
            ent = -torch.where(visible, logp.exp() * logp, 0.0).sum(-1)  # (b, H, Tq)
            n_keys = visible.sum(-1)  # (b, H, Tq)
            ent_norm = ent / n_keys.clamp_min(2).log()
            valid = n_keys >= 1
            valid_norm = n_keys >= 2
            if query_valid is not None:
                valid = valid & query_valid[rows, None, :]
                valid_norm = valid_norm & query_valid[rows, None, :]
            totals += torch.stack([
                torch.where(valid, ent, 0.0).sum((0, 2)),
                valid.sum((0, 2)),
                torch.where(valid_norm, ent_norm, 0.0).sum((0, 2)),
                valid_norm.sum((0, 2)),
            ]).double()
    return totals


def _hook_installer(module: nn.Module) -> Callable[[nn.Module, _HeadEntropy], list[RemovableHandle]] | None:
    """Which hooks read q and k from this module; None if it is not a supported attention module."""
    if hasattr(module, "q_tap") and hasattr(module, "k_tap"):
        return _hook_tapped
    if isinstance(module, TimmAttention):
        return _hook_timm
    if isinstance(module, nn.MultiheadAttention):
        return _hook_mha
    return None


def _mask_to_bias(mask: Tensor, blocked_when: bool) -> Tensor:
    """fp32 additive logit bias from a mask: a bool mask gives -inf where it equals ``blocked_when``;
    a float mask is already additive."""
    if mask.dtype != torch.bool:
        return mask.float()
    return torch.zeros(mask.shape, device=mask.device).masked_fill(mask == blocked_when, float("-inf"))


def _causal_bias(Tq: int, Tk: int, device: torch.device) -> Tensor:
    """(Tq, Tk) bias blocking keys after each query, aligned top-left as SDPA's ``is_causal``."""
    return torch.full((Tq, Tk), float("-inf"), device=device).triu(1)


def _as_4d(bias: Tensor) -> Tensor:
    """Left-pad a broadcastable bias with singleton dims to (B or 1, H or 1, Tq, Tk)."""
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def _hook_tapped(module: nn.Module, acc: _HeadEntropy) -> list[RemovableHandle]:
    """Our attention convention: q/k taps, ``scale``, and the masks the module records per forward."""
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
            bias = _mask_to_bias(key_pad, blocked_when=True)[:, None, None, :]  # (B, 1, 1, Tk)
        if mod.last_causal:
            causal = _causal_bias(Tq, Tk, q.device)
            bias = causal if bias is None else bias + causal
        if hasattr(mod, "last_query_padding_mask"):
            query_pad = mod.last_query_padding_mask
        else:
            query_pad = key_pad if Tq == Tk else None
        acc.add(q, k, float(mod.scale), bias, None if query_pad is None else ~query_pad)

    return [
        module.q_tap.register_forward_hook(lambda m, a, out: captured.__setitem__("q", out)),
        module.k_tap.register_forward_hook(lambda m, a, out: captured.__setitem__("k", out)),
        module.register_forward_hook(after_forward),
    ]


def _hook_timm(module: TimmAttention, acc: _HeadEntropy) -> list[RemovableHandle]:
    """timm ``Attention(x, attn_mask=None, is_causal=False)``: SDPA mask semantics (bool True = attend)."""
    captured: dict = {}

    def before_forward(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["attn_mask"] = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        captured["is_causal"] = args[2] if len(args) > 2 else kwargs.get("is_causal", False)

    def after_forward(mod: TimmAttention, args, output) -> None:
        q, k = captured.pop("q"), captured.pop("k")  # (B, H, N, hd)
        attn_mask = captured.pop("attn_mask")
        if captured.pop("is_causal"):  # takes precedence over attn_mask, as in timm
            bias = _causal_bias(q.shape[2], k.shape[2], q.device)
        elif attn_mask is not None:
            bias = _as_4d(_mask_to_bias(attn_mask, blocked_when=False))
        else:
            bias = None
        acc.add(q, k, mod.scale, bias, None)

    return [
        module.register_forward_pre_hook(before_forward, with_kwargs=True),
        module.q_norm.register_forward_hook(lambda m, a, out: captured.__setitem__("q", out)),
        module.k_norm.register_forward_hook(lambda m, a, out: captured.__setitem__("k", out)),
        module.register_forward_hook(after_forward),
    ]


def _hook_mha(module: nn.MultiheadAttention, acc: _HeadEntropy) -> list[RemovableHandle]:
    """``nn.MultiheadAttention``: recompute q, k from the call's inputs in a forward pre-hook."""
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError(
            "attention_entropy does not support nn.MultiheadAttention with add_bias_kv=True or "
            "add_zero_attn=True (extra keys); construct it without them or add support in "
            "sigma_repro/diagnostics/entropy.py."
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
            mask_bias = _mask_to_bias(attn_mask, blocked_when=True)
            bias = bias + (mask_bias.view(B, H, Tq, Tk) if mask_bias.dim() == 3 else mask_bias)
        elif call.arguments["is_causal"]:
            bias = bias + _causal_bias(Tq, Tk, q.device)
        query_valid = None
        if key_pad is not None:  # (B, Tk); bool True = pad, or float additive
            bias = bias + _mask_to_bias(key_pad, blocked_when=True)[:, None, None, :]
            if self_attention:
                query_valid = ~key_pad if key_pad.dtype == torch.bool else ~torch.isneginf(key_pad)
        acc.add(q, k, (E // H) ** -0.5, bias, query_valid)

    return [module.register_forward_pre_hook(before_forward, with_kwargs=True)]
