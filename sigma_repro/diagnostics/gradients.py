"""Gradient norms of the attention projections W_Q, W_K, W_V, W_O, per attention module.

Why (Noci et al., NeurIPS 2022): when token representations align with depth (rank collapse, see
rank.py), every query sees keys that differ only little, the softmax barely depends on W_Q and
W_K, and their gradients vanish while W_V's does not. The ratio ||∂L/∂W_Q|| / ||∂L/∂W_V|| falls
roughly like 1 - ρ for token correlation ρ, so a small ratio early in training says the query/key
path is not learning; it is exactly 0 at full collapse.

Reads the ``.grad`` that a backward left on the model; computes nothing else and changes nothing.
The projections are where each module's attention kind says (attention_kinds.py: timm's fused
``qkv`` rows, ``nn.MultiheadAttention``'s ``in_proj_weight`` rows, separate ``q/k/v/out_proj``). Under
σReparam the parameter the optimizer updates is the raw W, ``parametrizations.weight.original``,
and its gradient is the one reported (∂L/∂W, through Ŵ = γ/σ(W)·W).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sigma_repro.diagnostics.attention_kinds import Projection, attention_projections

ROLES = ("q", "k", "v", "o")


def attention_grad_norms(model: nn.Module) -> dict[str, dict[str, float]]:
    """Frobenius norms of the gradients of W_Q, W_K, W_V, W_O and the ratio ||∂W_Q|| / ||∂W_V||.

    Call after ``loss.backward()`` (and before ``optimizer.zero_grad``). Returns, keyed by attention
    module name in module order, ``{"q", "k", "v", "o", "ratio_qv"}`` as floats; a role whose
    parameter has no gradient (frozen, unused, or a module without it) is left out, and so is
    ``ratio_qv`` unless both q and v are there (it is inf or NaN when ||∂W_V|| = 0). Modules
    without any gradient are left out.
    """
    norms = {}
    for name, layout in attention_projections(model):
        projections = (layout.q, layout.k, layout.v, layout.o)
        grads = {role: _grad(p) for role, p in zip(ROLES, projections) if p is not None}
        grads = {role: g for role, g in grads.items() if g is not None}
        if not grads:
            continue
        keys, values = list(grads), torch.stack([g.float().norm() for g in grads.values()])
        if "q" in grads and "v" in grads:  # tensor division: inf or NaN, not an exception, at ||∂W_V|| = 0
            keys.append("ratio_qv")
            values = torch.cat([values, values[keys.index("q"), None] / values[keys.index("v"), None]])
        norms[name] = dict(zip(keys, values.tolist()))  # one device->host copy per module
    if not norms:
        raise ValueError("attention_grad_norms found no gradients on the attention projections: call it after "
                         "loss.backward() and before optimizer.zero_grad().")
    return norms


def _grad(projection: Projection) -> Tensor | None:
    """The gradient rows of the Parameter the optimizer updates for this projection."""
    grad = _leaf(projection.owner, projection.tensor_name).grad
    return None if grad is None else grad[projection.rows]


def _leaf(owner: nn.Module, tensor_name: str) -> Tensor:
    """``owner.<tensor_name>``'s Parameter; σReparam's ``original`` W when it is parametrized."""
    if parametrize.is_parametrized(owner, tensor_name):
        return owner.parametrizations[tensor_name].original
    return getattr(owner, tensor_name)
