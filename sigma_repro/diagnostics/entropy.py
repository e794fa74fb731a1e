"""Attention entropy per layer and head, read from any model through temporary hooks.

The σReparam paper's central diagnostic: Ent(A_i) = -Σ_j A_ij log A_ij for each query i, averaged over
queries and examples, per head. Collapse (entropy -> 0, one key per query) accompanies unstable
training; at init it is about log T.

Fused attention (SDPA) never materialises A, so we do not read A: we capture the queries and keys
each attention module actually uses and recompute the logits once, in fp32, outside autocast, on a
probe batch. Hooks live for that one forward only; the model is run in eval mode (no dropout, and
σReparam's power iteration does not advance) and its modes are restored afterwards, so probing
never changes training.

Which modules are attention, and how their q, k and masks are read, is the registry's business
(attention_kinds.py: timm ``Attention``, ``nn.MultiheadAttention``, our q_tap/k_tap convention,
and whatever a model family registers).

A key is masked only where its logit bias is -inf (bool masks become -inf; a float mask using a
large finite negative number counts those keys as visible for the normalized entropy). Queries
that see no key (fully masked rows) are excluded. The normalized entropy divides each query's
entropy by log(number of keys it may attend to); queries with a single key have no freedom and
are excluded from that average.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sigma_repro.diagnostics.attention_kinds import AttentionCall, attention_modules
from sigma_repro.modes import eval_mode

# Largest (b, H, Tq, Tk) logits block built at once; the probe batch is processed in chunks of
# examples below it so that long sequences (LM, T = 1024) do not allocate gigabytes.
_MAX_LOGITS = 1 << 24


def attention_entropy(model: nn.Module, *inputs, normalized: bool = False, **kwargs) -> dict[str, Tensor]:
    """Per-head mean attention entropy of every attention module in ``model`` (attention_kinds.py).

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
    try:
        for name, module, kind in attention_modules(model):
            accumulators[name] = _HeadEntropy()
            handles += kind.hook_logits(module, accumulators[name].add)
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

    def add(self, call: AttentionCall) -> None:
        sums = _entropy_sums(*call).cpu()
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
