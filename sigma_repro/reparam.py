"""σReparam: reparameterise every weight matrix as Ŵ = γ/σ(W)·W (Zhai et al., ICML 2023).

Why: attention entropy collapses when the spectral norms of the query/key weights grow; dividing
every weight matrix by its spectral norm σ(W) and learning one scalar γ per matrix bounds them,
which keeps training stable without warmup, weight decay or LayerNorm.

What this module touches: it adds a `SigmaReparam` parametrization
(`torch.nn.utils.parametrize`) to each eligible weight of a model built elsewhere, and one forward
pre-hook on the root module it was given. The existing weights are kept (unlike the official
converter, which re-initialises them), so apply it after custom init or checkpoint loading and
before the optimizer, torch.compile and DDP.

Eligible weights: `nn.Linear` (also MultiheadAttention's `out_proj`), `nn.Conv1d/2d/3d`
(grouped and depthwise included; a kernel (out, in/groups, k...) is read as an
(out, in/groups·k...) matrix) and `nn.MultiheadAttention`'s `in_proj_weight` or its separate
`q/k/v_proj_weight`. Never touched: embeddings, biases, norms, positional embeddings and class
tokens (none is a weight of those layers), weights that already carry a parametrization
(e.g. a weight-normed DINO head), and a Linear whose weight Parameter is shared with another
module (a tied LM head) unless an `include` pattern names it: the embedding would keep reading
the raw W while the head reads Ŵ.

Power iteration: σ is estimated by one power-iteration step per training forward of the root,
in fp32 with autocast off. u, v start from an exact SVD, so σ is exact at apply time and tracks
the slowly moving W afterwards. The step runs in the root's forward pre-hook, not inside the
parametrization, because `nn.MultiheadAttention` reads `in_proj_weight` three times per forward:
the parametrization stays a pure function (σ = vᵀWu with grad, from the current u, v), so
torch.compile sees one graph and every read gives the same Ŵ. A training step that calls the
root once per optimizer step gets exactly one power step; extra training-mode calls (several SSL
views, gradient accumulation) only refine σ of the same W. Eval-mode calls change nothing, and so
do calls that bypass the root (e.g. `model.forward_features`). The step depends only on W, so
DDP ranks that start equal (same seed, or buffers synced at DDP construction) stay identical
without syncing buffers every forward. `torch.compile(model)` runs module hooks outside the
compiled forward, so the step becomes a second small graph; compiling the training-step function
that calls the model gives one graph.

Checkpoints: keys become `<module>.parametrizations.weight.original` plus
`<module>.parametrizations.weight.0.{gamma,u,v,sigma}`; such a state dict loads exactly into a
freshly reparameterised model. A plain (non-reparameterised) checkpoint: load it into the plain
model first and then call `apply_sigma_reparam`, or, when the model is already reparameterised,
use `load_plain_state_dict`. `remove_sigma_reparam` bakes Ŵ into plain weights for export.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from fnmatch import fnmatch
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sigma_repro.errors import ConfigError

QKV_MODES = ("fused", "qk_v", "separate")
# torch's normalisation layers; their subclasses (timm's LayerNorm, LayerNorm2d) match too.
# timm's own RmsNorm is not a torch subclass and is kept.
NORM_TYPES = (
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
_EPS = 1e-12


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)  # (out, in/groups·k...) for conv kernels


class SigmaReparam(nn.Module):
    """Parametrization W -> Ŵ = γ/σ(W)·W, with one (γ, σ) per block of rows.

    `split_sizes` cuts a fused qkv matrix into row blocks ([3d] fused, [2d, d] q and k sharing,
    [d, d, d] separate); each block is scaled by its own γ_i/σ_i. State (all fp32):
    u (n_splits, cols) right and v (rows,) left singular vectors (v concatenated over blocks),
    sigma (n_splits,) the tracked σ for logging, gamma (n_splits,) the learned scale.
    With `stats_only` the forward returns W unchanged and γ is frozen: σ is only tracked.
    """

    def __init__(self, weight: torch.Tensor, *, split_sizes: Sequence[int] | None = None,
                 gamma_init: str | float = "sigma", stats_only: bool = False):
        super().__init__()
        rows, cols = weight.shape[0], weight[0].numel()
        self.split_sizes = list(split_sizes) if split_sizes else [rows]
        self.gamma_init = gamma_init
        self.stats_only = stats_only
        n, kw = len(self.split_sizes), dict(device=weight.device, dtype=torch.float32)
        self.register_buffer("u", torch.empty(n, cols, **kw))
        self.register_buffer("v", torch.empty(rows, **kw))
        self.register_buffer("sigma", torch.empty(n, **kw))
        self.gamma = nn.Parameter(torch.empty(n, **kw), requires_grad=not stats_only)
        self.reset(weight)

    def extra_repr(self) -> str:
        return f"split_sizes={self.split_sizes}, gamma_init={self.gamma_init!r}, stats_only={self.stats_only}"

    @torch.no_grad()
    def reset(self, weight: torch.Tensor) -> None:
        """Exact σ, u, v from an SVD of each row block of W; γ per `gamma_init`."""
        blocks = _matrix(weight).float().split(self.split_sizes)  # each (rows_i, cols)
        svds = [torch.linalg.svd(block, full_matrices=False) for block in blocks]
        self.u.copy_(torch.stack([Vh[0] for _, _, Vh in svds]))
        self.v.copy_(torch.cat([U[:, 0] for U, _, _ in svds]))
        self.sigma.copy_(torch.stack([S[0] for _, S, _ in svds]))
        if self.gamma_init == "sigma":
            self.gamma.copy_(self.sigma)
        else:
            self.gamma.fill_(float(self.gamma_init))

    def _sigma(self, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        blocks = _matrix(weight).float().split(self.split_sizes)
        return torch.stack([v_i @ (b @ u_i) for b, u_i, v_i in zip(blocks, u, v.split(self.split_sizes))])

    @torch.no_grad()
    def power_step(self, weight: torch.Tensor) -> None:
        """One power-iteration step on W (fp32, autocast off): v <- Wu/|Wu|, u <- Wᵀv/|Wᵀv|."""
        with torch.autocast(weight.device.type, enabled=False):
            blocks = _matrix(weight).float().split(self.split_sizes)
            vs = [F.normalize(b @ u, dim=0, eps=_EPS) for b, u in zip(blocks, self.u)]
            us = [F.normalize(b.T @ v, dim=0, eps=_EPS) for b, v in zip(blocks, vs)]
            self.u.copy_(torch.stack(us))
            self.v.copy_(torch.cat(vs))
            self.sigma.copy_(self._sigma(weight, self.u, self.v))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.stats_only:
            return weight
        # Clones: the next power step updates u, v in place, possibly before this graph's backward.
        u, v = self.u.clone(), self.v.clone()
        with torch.autocast(weight.device.type, enabled=False):
            scale = self.gamma.float() / self._sigma(weight, u, v)  # σ with grad: dŴ/dW flows through σ
        row_scale = torch.cat([s.expand(n) for s, n in zip(scale, self.split_sizes)])  # (rows,)
        return weight * row_scale.to(weight.dtype).view(-1, *[1] * (weight.dim() - 1))


class _Target(NamedTuple):
    module_name: str
    module: nn.Module
    tensor_name: str
    split_sizes: list[int] | None
    tied: bool


def _qkv_splits(rows: int, qkv: str, where: str) -> list[int] | None:
    if qkv == "fused":
        return None
    if rows % 3:
        raise ConfigError(f"qkv={qkv!r} splits {where} into 3 equal row blocks, but it has {rows} rows; "
                          f"use qkv='fused' or exclude it")
    d = rows // 3
    return [2 * d, d] if qkv == "qk_v" else [d, d, d]


def _eligible(model: nn.Module, qkv: str) -> list[_Target]:
    """Every weight σReparam may take, in module order, marked tied when shared with another module."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            rows = module.out_features
            tensors = [("weight", _qkv_splits(rows, qkv, name) if name.endswith("qkv") else None)]
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            tensors = [("weight", None)]
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            tensors = [("in_proj_weight", _qkv_splits(3 * module.embed_dim, qkv, f"{name}.in_proj_weight"))]
        elif isinstance(module, nn.MultiheadAttention):
            tensors = [("q_proj_weight", None), ("k_proj_weight", None), ("v_proj_weight", None)]
        else:
            continue
        for tensor_name, splits in tensors:
            if parametrize.is_parametrized(module, tensor_name):
                continue
            param = getattr(module, tensor_name)
            if isinstance(param, nn.Parameter):
                targets.append(_Target(name, module, tensor_name, splits, uses[id(param)] > 1))
    return targets


def _select(targets: list[_Target], include: Sequence[str] | None, exclude: Sequence[str] | None) -> list[_Target]:
    names = list(dict.fromkeys(t.module_name for t in targets))
    for pattern in [*(include or []), *(exclude or [])]:
        if not any(fnmatch(n, pattern) for n in names):
            raise ConfigError(f"include/exclude pattern {pattern!r} matches no eligible module; "
                              f"patterns are fnmatch on module names such as {names[:6]}")

    def wanted(t: _Target) -> bool:
        included = not t.tied if include is None else any(fnmatch(t.module_name, p) for p in include)
        return included and not any(fnmatch(t.module_name, p) for p in exclude or [])

    return [t for t in targets if wanted(t)]


def remove_norm_layers(model: nn.Module) -> nn.Module:
    """Replace every normalisation layer (subclasses of NORM_TYPES) with nn.Identity: the no-LN model."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, NORM_TYPES):
                setattr(module, child_name, nn.Identity())
    return model


def _parametrized(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, SigmaReparam]]:
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name, chain in module.parametrizations.items():
                for reparam in chain:
                    if isinstance(reparam, SigmaReparam):
                        yield module_name, module, tensor_name, reparam


def _power_step_pre_hook(module: nn.Module, args) -> None:
    if module.training:
        power_step(module)


def apply_sigma_reparam(model: nn.Module, *, gamma_init: str | float = "sigma", qkv: str = "fused",
                        stats_only: bool = False, remove_norms: bool = False,
                        include: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> nn.Module:
    """Reparameterise the eligible weights of `model` in place and return it.

    gamma_init: "sigma" (γ = σ(W), the model function is unchanged; PyTorch vision code) or a
        positive number (1.0: unit spectral norm at init, as in the JAX speech code).
    qkv: how a fused qkv matrix (a Linear whose name ends with "qkv", MHA's in_proj_weight) gets
        σ and γ: "fused" one for all, "qk_v" one for q and k rows and one for v, "separate" three.
    stats_only: track σ (power steps, `sigma` buffers) without changing the model: baseline logs.
    remove_norms: replace every normalisation layer (subclasses of NORM_TYPES) with nn.Identity,
        the paper's no-LN ViT. include/exclude do not apply to it.
    include, exclude: fnmatch patterns on module names (e.g. exclude=["head"]); None includes all.
    """
    if not (gamma_init == "sigma" or (isinstance(gamma_init, (int, float)) and not isinstance(gamma_init, bool)
                                      and math.isfinite(gamma_init) and gamma_init > 0)):
        raise ConfigError(f"gamma_init must be 'sigma' (keep the function) or a positive number such as 1.0 "
                          f"(unit spectral norm), got {gamma_init!r}")
    if qkv not in QKV_MODES:
        raise ConfigError(f"qkv must be one of {list(QKV_MODES)}, got {qkv!r}")
    if next(_parametrized(model), None) is not None:
        raise ConfigError("model already has σReparam; call remove_sigma_reparam(model) before applying it again")
    if remove_norms:
        remove_norm_layers(model)
    targets = _eligible(model, qkv)
    if not targets:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear, nn.Conv1d/2d/3d or nn.MultiheadAttention "
                          f"weight for σReparam; pass a model that has some")
    selected = _select(targets, include, exclude)
    if not selected:
        raise ConfigError(f"include={include} / exclude={exclude} leave no weight for σReparam out of "
                          f"{len(targets)} eligible ones; loosen the patterns")
    for t in selected:
        reparam = SigmaReparam(getattr(t.module, t.tensor_name), split_sizes=t.split_sizes,
                               gamma_init=gamma_init, stats_only=stats_only)
        parametrize.register_parametrization(t.module, t.tensor_name, reparam)
    model.register_forward_pre_hook(_power_step_pre_hook)
    return model


def remove_sigma_reparam(model: nn.Module) -> nn.Module:
    """Bake Ŵ = γ/σ·W into plain weights (same Parameter objects), drop u, v, σ, γ and the hook."""
    for _, module, tensor_name, _ in list(_parametrized(model)):
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    for module in model.modules():
        hooks = module._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is _power_step_pre_hook]:
            del hooks[key]
    return model


def iter_sigma_reparam(model: nn.Module) -> Iterator[tuple[str, SigmaReparam]]:
    """(name, parametrization) pairs, name = "<module path>.<tensor name>", e.g. "blocks.0.attn.qkv.weight"."""
    for module_name, _, tensor_name, reparam in _parametrized(model):
        yield (f"{module_name}.{tensor_name}" if module_name else tensor_name), reparam


def gamma_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable γ, so the optimizer can give them their own lr multiplier and weight decay."""
    return [reparam.gamma for _, reparam in iter_sigma_reparam(model) if not reparam.stats_only]


def power_step(model: nn.Module) -> None:
    """One power-iteration step on every σReparam weight of `model` (the root's pre-hook calls it)."""
    for _, module, tensor_name, reparam in _parametrized(model):
        reparam.power_step(module.parametrizations[tensor_name].original)


def load_plain_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a checkpoint of the plain model into the reparameterised `model` (strict).

    Plain keys `<module>.weight` go to `<module>.parametrizations.weight.original`; then u, v, σ
    are re-initialised by SVD and γ per its gamma_init from the loaded weights, which gives the
    same model as loading into the plain model and applying σReparam afterwards.
    """
    mapped = dict(state_dict)
    for module_name, _, tensor_name, reparam in _parametrized(model):
        prefix = f"{module_name}." if module_name else ""
        original_key = f"{prefix}parametrizations.{tensor_name}.original"
        if original_key in state_dict:
            raise ConfigError(f"state_dict already holds σReparam keys ({original_key}); "
                              f"load it with model.load_state_dict instead")
        if prefix + tensor_name in mapped:
            mapped[original_key] = mapped.pop(prefix + tensor_name)
        mapped.update(reparam.state_dict(prefix=f"{prefix}parametrizations.{tensor_name}.0."))
    model.load_state_dict(mapped)
    for _, module, tensor_name, reparam in _parametrized(model):
        reparam.reset(module.parametrizations[tensor_name].original)
    return model
