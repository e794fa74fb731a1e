"""Spectral norms σ(W) of a model's weight matrices, and σReparam's learned scales γ.

The entropy bound (bound.py) says attention can only collapse when the spectral norm of the
query/key product grows, so σ of the weights is the quantity to watch next to entropy. For
matrices reparameterised by σReparam (sigma_repro/reparam.py) the plugin already tracks σ by power
iteration, and Ŵ = γ/σ·W has spectral norm γ, so γ is the effective norm the model uses.

Keys are "<module path>.<tensor name>" as ``iter_sigma_reparam`` names them (e.g.
"blocks.0.attn.qkv.weight"); a matrix split into row blocks (fused qkv with qkv="qk_v" or
"separate") gets one value per block, with suffix ".0", ".1", …. Read-only: nothing here changes
the model or advances the power iteration.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from sigma_repro.reparam import SigmaReparam, iter_sigma_reparam


def reparam_sigmas(model: nn.Module) -> dict[str, float]:
    """σ(W) as tracked by σReparam (its ``sigma`` buffer), for every reparameterised matrix,
    ``stats_only`` ones included. Cheap: no SVD. Empty for a model without the plugin."""
    return {key: value for name, reparam in iter_sigma_reparam(model)
            for key, value in _per_split(name, reparam.sigma)}


def reparam_gammas(model: nn.Module) -> dict[str, float]:
    """γ of every matrix σReparam actually rescales (``stats_only`` ones have no γ in use)."""
    return {key: value for name, reparam in iter_sigma_reparam(model) if not reparam.stats_only
            for key, value in _per_split(name, reparam.gamma)}


def spectral_norms(model: nn.Module) -> dict[str, float]:
    """σ of every weight matrix of nn.Linear, convolution and nn.MultiheadAttention projection.

    Reparameterised matrices report σReparam's tracked σ of the underlying W (``reparam_sigmas``);
    every other one its exact largest singular value, torch.linalg.matrix_norm(W.flatten(1), 2)
    (conv kernels (out, in/groups, k...) read as (out, in/groups·k...) matrices).
    """
    norms = reparam_sigmas(model)
    for module_name, module in model.named_modules():
        for tensor_name in _weight_matrices(module):
            if not _has_sigma_reparam(module, tensor_name):
                weight = getattr(module, tensor_name).detach()
                norms[f"{module_name}.{tensor_name}" if module_name else tensor_name] = float(
                    torch.linalg.matrix_norm(weight.flatten(1).float(), 2)
                )
    return norms


def _per_split(name: str, values: torch.Tensor) -> list[tuple[str, float]]:
    """[(name, v)] for one value, [(name.0, v0), (name.1, v1), …] for a split matrix."""
    values = values.detach().float().cpu().tolist()
    if len(values) == 1:
        return [(name, values[0])]
    return [(f"{name}.{i}", v) for i, v in enumerate(values)]


def _weight_matrices(module: nn.Module) -> list[str]:
    """Names of the weight tensors of ``module`` that are matrices for spectral purposes."""
    if isinstance(module, (nn.Linear, _ConvNd)):
        return ["weight"]
    if isinstance(module, nn.MultiheadAttention):  # out_proj is an nn.Linear, reached on its own
        if module.in_proj_weight is not None:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    return []


def _has_sigma_reparam(module: nn.Module, tensor_name: str) -> bool:
    return parametrize.is_parametrized(module, tensor_name) and any(
        isinstance(p, SigmaReparam) for p in module.parametrizations[tensor_name]
    )
