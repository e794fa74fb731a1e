"""σReparam: reparameterise every weight matrix as Ŵ = γ/σ(W)·W (Zhai et al., ICML 2023).

Why: attention entropy collapses when the spectral norms of the query/key weights grow; dividing
every weight matrix by its spectral norm σ(W) and learning one scalar γ per matrix bounds them,
which keeps training stable without warmup, weight decay or LayerNorm.

What this module touches: it adds a `SigmaReparam` parametrization
(`torch.nn.utils.parametrize`) to each eligible weight of a model built elsewhere (no module
hooks), and, process-wide at import, one optimizer step post-hook that counts the steps of every
torch optimizer (see When the step runs). The existing weights are kept (unlike the official
converter, which re-initialises them), so apply it after custom init or checkpoint loading and
before the optimizer, torch.compile and DDP.

Eligible weights: `nn.Linear` (also MultiheadAttention's `out_proj`), `nn.Conv1d/2d/3d`
(grouped and depthwise included; a kernel (out, in/groups, k...) is read as an
(out, in/groups·k...) matrix) and `nn.MultiheadAttention`'s `in_proj_weight` or its separate
`q/k/v_proj_weight`. Never touched: embeddings, biases, norms, positional embeddings and class
tokens (none is a weight of those layers), weights that already carry a parametrization
(e.g. a weight-normed DINO head), and a weight Parameter shared by several modules (a tied LM
head, two Linears sharing one W) unless an `include` pattern names them: a module reading the raw
W (an embedding) would not see Ŵ.

Fused q/k/v projections: with qkv="qk_v" or "separate" a matrix holding the [q; k; v] rows gets
one σ and γ per row block. Which matrices are fused is declared, not guessed:
`nn.MultiheadAttention.in_proj_weight`, every nn.Linear whose name matches a pattern of the
`fused_qkv` option (default FUSED_QKV_DEFAULT: names ending in "qkv", timm's), and every
nn.Linear a module declares with a class or instance attribute
`sigma_reparam_fused_qkv = ("c_attn",)`: fnmatch patterns of module names relative to the
declaring module (the root included), so a model's author says it once for every user. Asking for
a split that splits nothing is a ConfigError.

Power iteration: u, v start from an exact SVD, so σ is exact at apply time. Afterwards one power
step (`power_iters` iterations, default 1, in at least fp32 with autocast off) follows each update
of W. One step per update lets σ lag when the top two singular values of a matrix are close:
`sigma_tracking_error` measures the lag, a larger `power_iters` shrinks it.

When the step runs: lazily, at the first training-mode read of Ŵ after an optimizer step. The
post-hook counts the steps of every torch.optim.Optimizer (fused ones, timm's, Lightning's
wrapped ones alike; a step GradScaler skips is no update and is not counted), and each
parametrization remembers the count at its last fit. So σ moves once per optimizer step whichever
entry point the forward used (`model(x)`, `model.forward_features(x)`, a probe), however often W
is read (nn.MultiheadAttention reads `in_proj_weight` three times per forward), and however many
forwards share one update (gradient accumulation, SSL views). The first training read after
`apply_sigma_reparam` (or `load_plain_state_dict`) steps once, as the official code does before
its first forward (on the exact SVD it only rounds); eval-mode reads never step; loading a
state dict makes the next training read step, so resuming from a checkpoint saved after an
optimizer step repeats the uninterrupted run exactly. Any torch optimizer's step counts, also
one that does not hold W: at worst an extra step refines σ of an unchanged W. Not noticed: a W
changed without a torch optimizer (written by hand, an EMA teacher): call `power_step(model)`
after such an update.
The step is a custom op (`sigma_repro::power_step_if_stale`), opaque to torch.compile: the
compiled graph holds it as one node, with no graph break, and it compares the counts when it
runs. (W's own version counter cannot serve: inductor hands the op a re-laid-out copy of a conv
kernel.) The step depends only on W and u, v, so DDP ranks that start equal (same seed, or
parameters synced at DDP construction) stay identical without syncing buffers every forward.

Dtypes: u, v, σ and γ are created in at least fp32 (fp64 for a float64 W); `model.to(dtype)`
casts them with the weights. σ and γ/σ are computed in at least fp32 whatever dtype they then
have, and Ŵ has W's dtype.

Checkpoints: keys become `<module>.parametrizations.weight.original` plus
`<module>.parametrizations.weight.0.{gamma,u,v,sigma}`; such a state dict loads exactly into a
freshly reparameterised model. A plain (non-reparameterised) checkpoint: load it into the plain
model first and then call `apply_sigma_reparam`, or, when the model is already reparameterised,
use `load_plain_state_dict`. `remove_sigma_reparam` bakes Ŵ into plain weights for export.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from fnmatch import fnmatch
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from sigma_repro.errors import ConfigError

QKV_MODES = ("fused", "qk_v", "separate")
FUSED_QKV_DEFAULT = ("*qkv",)  # timm's fused projections: blocks.0.attn.qkv
FUSED_QKV_ATTRIBUTE = "sigma_reparam_fused_qkv"
# torch's normalisation layers; their subclasses (timm's LayerNorm, LayerNorm2d) match too.
# timm's own RmsNorm is not a torch subclass and is kept.
NORM_TYPES = (
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
_EPS = 1e-12


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays


def _blocks(weight: torch.Tensor, split_sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """W as (out, in/groups·k...) matrix in the compute dtype, cut into row blocks (rows_i, cols)."""
    return weight.reshape(weight.shape[0], -1).to(_compute_dtype(weight)).split(split_sizes)


def _sigmas(blocks: Sequence[torch.Tensor], us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v @ (b @ u) for b, u, v in zip(blocks, us, vs)])  # vᵀWu per block


def _power_iterations(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
                      split_sizes: list[int], iters: int) -> None:
    """`iters` power iterations per block, v <- Wu/|Wu|, u <- Wᵀv/|Wᵀv|, written into u, v, sigma."""
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        blocks = _blocks(weight, split_sizes)
        us = list(u.to(blocks[0].dtype))
        for _ in range(iters):
            vs = [F.normalize(b @ u_i, dim=0, eps=_EPS) for b, u_i in zip(blocks, us)]
            us = [F.normalize(b.T @ v_i, dim=0, eps=_EPS) for b, v_i in zip(blocks, vs)]
        u.copy_(torch.stack(us))
        v.copy_(torch.cat(vs))
        sigma.copy_(_sigmas(blocks, us, vs))


# Optimizer steps taken in this process: every torch optimizer's step bumps it (post-hook below).
_OPTIMIZER_STEPS = torch.zeros((), dtype=torch.int64)


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS.add_(1)


register_optimizer_step_post_hook(_count_optimizer_step)


@torch.library.custom_op("sigma_repro::power_step_if_stale", mutates_args=("u", "v", "sigma", "fitted_at"))
def _power_step_if_stale(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor,
                         fitted_at: torch.Tensor, optimizer_steps: torch.Tensor, split_sizes: list[int],
                         iters: int) -> None:
    """The lazy power step: iterate when an optimizer step was taken since u, v were last fitted.

    A custom op, so that torch.compile keeps it as one opaque node that compares the counts when
    the graph runs; only values are read, as the compiled graph may hand it copies of its inputs.
    """
    if fitted_at.item() != optimizer_steps.item():
        _power_iterations(weight, u, v, sigma, split_sizes, iters)
        fitted_at.copy_(optimizer_steps)


@_power_step_if_stale.register_fake
def _(weight, u, v, sigma, fitted_at, optimizer_steps, split_sizes, iters) -> None:
    return None


def _stale_after_load(reparam: SigmaReparam, incompatible_keys) -> None:
    reparam.fitted_at.fill_(-1)  # W and u, v came from a checkpoint: the next training read steps


class SigmaReparam(nn.Module):
    """Parametrization W -> Ŵ = γ/σ(W)·W, with one (γ, σ) per block of rows.

    `split_sizes` cuts a fused qkv matrix into row blocks ([3d] fused, [2d, d] q and k sharing,
    [d, d, d] separate); each block is scaled by its own γ_i/σ_i. State (at least fp32):
    u (n_splits, cols) right and v (rows,) left singular vectors (v concatenated over blocks),
    sigma (n_splits,) the tracked σ for logging, gamma (n_splits,) the learned scale.
    `power_iters` power iterations follow each optimizer step, at the next training read (see the
    module docstring).
    With `stats_only` the forward returns W unchanged and γ is frozen: σ is only tracked.
    """

    def __init__(self, weight: torch.Tensor, *, split_sizes: Sequence[int] | None = None,
                 gamma_init: str | float = "sigma", stats_only: bool = False, power_iters: int = 1):
        super().__init__()
        rows, cols = weight.shape[0], weight[0].numel()
        self.split_sizes = list(split_sizes) if split_sizes else [rows]
        self.gamma_init = gamma_init
        self.stats_only = stats_only
        self.power_iters = power_iters
        n, kw = len(self.split_sizes), dict(device=weight.device, dtype=_compute_dtype(weight))
        self.register_buffer("u", torch.empty(n, cols, **kw))
        self.register_buffer("v", torch.empty(rows, **kw))
        self.register_buffer("sigma", torch.empty(n, **kw))
        self.gamma = nn.Parameter(torch.empty(n, **kw), requires_grad=not stats_only)
        # _OPTIMIZER_STEPS when u, v were last fitted to W. A CPU tensor and no buffer: the step
        # reads it without a device sync, and a checkpoint has no use for it.
        self.fitted_at = torch.tensor(-1)
        self.register_load_state_dict_post_hook(_stale_after_load)
        self.reset(weight)

    def extra_repr(self) -> str:
        return (f"split_sizes={self.split_sizes}, gamma_init={self.gamma_init!r}, stats_only={self.stats_only}, "
                f"power_iters={self.power_iters}")

    @torch.no_grad()
    def reset(self, weight: torch.Tensor) -> None:
        """Exact σ, u, v from an SVD of each row block of W; γ per `gamma_init`."""
        svds = [torch.linalg.svd(block, full_matrices=False) for block in _blocks(weight, self.split_sizes)]
        self.u.copy_(torch.stack([Vh[0] for _, _, Vh in svds]))
        self.v.copy_(torch.cat([U[:, 0] for U, _, _ in svds]))
        self.sigma.copy_(torch.stack([S[0] for _, S, _ in svds]))
        if self.gamma_init == "sigma":
            self.gamma.copy_(self.sigma)
        else:
            self.gamma.fill_(float(self.gamma_init))
        self.fitted_at.copy_(_OPTIMIZER_STEPS)

    def step_before_first_forward(self) -> None:
        """Make the next training read step once, although u, v fit W: the official code (and this
        plugin before it stepped per optimizer step) steps before the first forward. On the exact
        SVD that step changes σ only by rounding, but Adam's first update amplifies rounding, and
        the committed proxy results were trained with it."""
        self.fitted_at.fill_(-1)

    def power_step(self, weight: torch.Tensor) -> None:
        """`power_iters` power iterations on W, whether or not an optimizer stepped since the last fit."""
        _power_iterations(weight.detach(), self.u, self.v, self.sigma, self.split_sizes, self.power_iters)
        self.fitted_at.copy_(_OPTIMIZER_STEPS)

    def step_if_stale(self, weight: torch.Tensor) -> None:
        """`power_iters` power iterations if an optimizer stepped since the last fit, else nothing."""
        _power_step_if_stale(weight.detach(), self.u, self.v, self.sigma, self.fitted_at, _OPTIMIZER_STEPS,
                             self.split_sizes, self.power_iters)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.step_if_stale(weight)
        if self.stats_only:
            return weight
        # Clones: a step between this forward and its backward (power_step(), sigma_tracking_error)
        # updates u, v in place.
        u, v = self.u.clone(), self.v.clone()
        with torch.autocast(weight.device.type, enabled=False):
            blocks = _blocks(weight, self.split_sizes)
            sigmas = _sigmas(blocks, u.to(blocks[0].dtype), v.to(blocks[0].dtype).split(self.split_sizes))
            scale = self.gamma.to(sigmas.dtype) / sigmas  # σ with grad: dŴ/dW flows through σ
        row_scale = torch.cat([s.expand(n) for s, n in zip(scale, self.split_sizes)])  # (rows,)
        return weight * row_scale.to(weight.dtype).view(-1, *[1] * (weight.dim() - 1))


class _Target(NamedTuple):
    module_name: str
    module: nn.Module
    tensor_name: str
    split_sizes: list[int] | None
    owners: tuple[str, ...]  # names of every module holding this weight Parameter; several: tied

    @property
    def tied(self) -> bool:
        return len(self.owners) > 1


def _qkv_splits(rows: int, qkv: str, where: str) -> list[int] | None:
    if qkv == "fused":
        return None
    if rows % 3:
        raise ConfigError(f"qkv={qkv!r} splits {where} into 3 equal row blocks, but it has {rows} rows; "
                          f"use qkv='fused' or exclude it")
    d = rows // 3
    return [2 * d, d] if qkv == "qk_v" else [d, d, d]


def _fused_qkv_patterns(model: nn.Module, fused_qkv: Sequence[str] | None, qkv: str) -> list[str]:
    """Patterns naming the fused [q; k; v] nn.Linear modules of `model`: the `fused_qkv` option
    (default FUSED_QKV_DEFAULT) and every module's declaration. When a split is asked for, each
    given or declared pattern must name some nn.Linear."""
    if isinstance(fused_qkv, str):
        raise ConfigError(f"fused_qkv must be a list of fnmatch patterns such as ['*.c_attn'], "
                          f"found the string {fused_qkv!r}; wrap it in a list")
    if fused_qkv is None:
        patterns = dict.fromkeys(FUSED_QKV_DEFAULT)  # no source: a model without qkv need not match it
    else:
        patterns = dict.fromkeys(fused_qkv, "the fused_qkv option")
    for name, module in model.named_modules():
        declared = getattr(module, FUSED_QKV_ATTRIBUTE, ())
        where = f"{FUSED_QKV_ATTRIBUTE} of {name or 'the root'} ({type(module).__name__})"
        if isinstance(declared, str):
            raise ConfigError(f"{where} must be a tuple of fnmatch patterns such as ('c_attn',), found the string "
                              f"{declared!r}; add the trailing comma")
        patterns.update({f"{name}.{p}" if name else p: where for p in declared})
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for pattern, where in patterns.items():
        if qkv != "fused" and where and not any(fnmatch(name, pattern) for name in linear_names):
            raise ConfigError(f"{where}: pattern {pattern!r} matches no nn.Linear; fnmatch patterns on module "
                              f"names such as {linear_names[:6]}; correct or drop it")
    return list(patterns)


def _eligible(model: nn.Module, qkv: str, fused_patterns: list[str]) -> list[_Target]:
    """Every weight σReparam may take, in module order, with the modules sharing its Parameter;
    nn.Linear modules matching `fused_patterns` are split per `qkv`."""
    owners = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners[id(param)].append(name)
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            fused = any(fnmatch(name, pattern) for pattern in fused_patterns)
            tensors = [("weight", _qkv_splits(module.out_features, qkv, name) if fused else None)]
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
                targets.append(_Target(name, module, tensor_name, splits, tuple(owners[id(param)])))
    return targets


def _select(targets: list[_Target], include: Sequence[str] | None, exclude: Sequence[str] | None) -> list[_Target]:
    names = list(dict.fromkeys(t.module_name for t in targets))
    for pattern in [*(include or []), *(exclude or [])]:
        if not any(fnmatch(n, pattern) for n in names):
            raise ConfigError(f"include/exclude pattern {pattern!r} matches no eligible module; "
                              f"patterns are fnmatch on module names such as {names[:6]}")

    def excluded(t: _Target) -> bool:
        return any(fnmatch(t.module_name, p) for p in exclude or [])

    def included(t: _Target) -> bool:
        return not t.tied if include is None else any(fnmatch(t.module_name, p) for p in include)

    selected = [t for t in targets if included(t) and not excluded(t)]
    tied = [t for t in targets if t.tied and not excluded(t)]
    if not selected and include is None and tied:
        shared = "; ".join(f"{list(owners)} share one weight" for owners in dict.fromkeys(t.owners for t in tied))
        raise ConfigError(f"no weight left for σReparam: every eligible one{' not excluded' if exclude else ''} is "
                          f"tied ({shared}); tied weights are skipped unless named, since a module reading the raw W "
                          f"(e.g. an embedding) would not see Ŵ; to reparameterise them, name them in include, e.g. "
                          f"include={[t.module_name for t in tied]}")
    if not selected:
        raise ConfigError(f"include={include} / exclude={exclude} leave no weight for σReparam out of "
                          f"{len(targets)} eligible ones; loosen the patterns")
    return selected


def remove_norm_layers(model: nn.Module) -> nn.Module:
    """Replace every normalisation layer (subclasses of NORM_TYPES) with nn.Identity: the no-LN model."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, NORM_TYPES):
                setattr(module, child_name, nn.Identity())
    return model


def _weight_name(module_name: str, tensor_name: str) -> str:
    return f"{module_name}.{tensor_name}" if module_name else tensor_name


def _parametrized(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, SigmaReparam]]:
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name, chain in module.parametrizations.items():
                for reparam in chain:
                    if isinstance(reparam, SigmaReparam):
                        yield module_name, module, tensor_name, reparam


def apply_sigma_reparam(model: nn.Module, *, gamma_init: str | float = "sigma", qkv: str = "fused",
                        stats_only: bool = False, remove_norms: bool = False,
                        include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                        power_iters: int = 1, fused_qkv: Sequence[str] | None = None) -> nn.Module:
    """Reparameterise the eligible weights of `model` in place and return it.

    gamma_init: "sigma" (γ = σ(W), the model function is unchanged; PyTorch vision code) or a
        positive number (1.0: unit spectral norm at init, as in the JAX speech code).
    qkv: how a fused q/k/v matrix (MHA's in_proj_weight, a Linear named by `fused_qkv` or declared
        by `sigma_reparam_fused_qkv`) gets σ and γ: "fused" one for all, "qk_v" one for q and k
        rows and one for v, "separate" three. A split that finds no fused matrix is a ConfigError.
    stats_only: track σ (power steps, `sigma` buffers) without changing the model: baseline logs.
    remove_norms: replace every normalisation layer (subclasses of NORM_TYPES) with nn.Identity,
        the paper's no-LN ViT. include/exclude do not apply to it.
    include, exclude: fnmatch patterns on module names (e.g. exclude=["head"]); None includes all
        but tied weights.
    power_iters: power iterations per update of W (>= 1); more follow matrices whose top two
        singular values are close (see `sigma_tracking_error`) at 2 matrix-vector products each.
    fused_qkv: fnmatch patterns of the nn.Linear modules holding fused [q; k; v] rows; None: names
        ending in "qkv" (FUSED_QKV_DEFAULT). Modules' own declarations are added either way.
    """
    if not (gamma_init == "sigma" or (isinstance(gamma_init, (int, float)) and not isinstance(gamma_init, bool)
                                      and math.isfinite(gamma_init) and gamma_init > 0)):
        raise ConfigError(f"gamma_init must be 'sigma' (keep the function) or a positive number such as 1.0 "
                          f"(unit spectral norm), got {gamma_init!r}")
    if qkv not in QKV_MODES:
        raise ConfigError(f"qkv must be one of {list(QKV_MODES)}, got {qkv!r}")
    if not (isinstance(power_iters, int) and not isinstance(power_iters, bool) and power_iters >= 1):
        raise ConfigError(f"power_iters must be an integer >= 1 (power iterations per update of W), "
                          f"got {power_iters!r}; use 1 (the paper's) or more for close top singular values")
    if next(_parametrized(model), None) is not None:
        raise ConfigError("model already has σReparam; call remove_sigma_reparam(model) before applying it again")
    if remove_norms:
        remove_norm_layers(model)
    fused_patterns = _fused_qkv_patterns(model, fused_qkv, qkv)
    targets = _eligible(model, qkv, fused_patterns)
    if not targets:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear, nn.Conv1d/2d/3d or nn.MultiheadAttention "
                          f"weight for σReparam; pass a model that has some")
    selected = _select(targets, include, exclude)
    if qkv != "fused" and not any(t.split_sizes for t in selected):
        raise ConfigError(
            f"qkv={qkv!r} splits fused q/k/v matrices, but none is among the {len(selected)} weights converted: no "
            f"nn.MultiheadAttention with in_proj_weight, no nn.Linear matching {fused_patterns}; "
            f"declare the fused projection (fused_qkv=['*.c_attn'], or sigma_reparam_fused_qkv = ('c_attn',) on the "
            f"attention module) or use qkv='fused'")
    for t in selected:
        reparam = SigmaReparam(getattr(t.module, t.tensor_name), split_sizes=t.split_sizes,
                               gamma_init=gamma_init, stats_only=stats_only, power_iters=power_iters)
        parametrize.register_parametrization(t.module, t.tensor_name, reparam)  # reads Ŵ once: no step
        reparam.step_before_first_forward()
    return model


def remove_sigma_reparam(model: nn.Module) -> nn.Module:
    """Bake Ŵ = γ/σ·W into plain weights (same Parameter objects) and drop u, v, σ, γ."""
    for _, module, tensor_name, _ in list(_parametrized(model)):
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model


def iter_sigma_reparam(model: nn.Module) -> Iterator[tuple[str, SigmaReparam]]:
    """(name, parametrization) pairs, name = "<module path>.<tensor name>", e.g. "blocks.0.attn.qkv.weight"."""
    for module_name, _, tensor_name, reparam in _parametrized(model):
        yield _weight_name(module_name, tensor_name), reparam


def split_names(name: str, n_splits: int) -> list[str]:
    """Keys of the row blocks of a matrix: [name] unsplit, [name.0, name.1, ...] split (as diagnostics log them)."""
    return [name] if n_splits == 1 else [f"{name}.{i}" for i in range(n_splits)]


def gamma_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable γ, so the optimizer can give them their own lr multiplier and weight decay."""
    return [reparam.gamma for _, reparam in iter_sigma_reparam(model) if not reparam.stats_only]


def power_step(model: nn.Module) -> None:
    """`power_iters` power iterations on every σReparam weight of `model`, whether or not one is due.

    Training reads step by themselves; this is for explicit refreshes (e.g. before logging σ).
    """
    for _, module, tensor_name, reparam in _parametrized(model):
        reparam.power_step(module.parametrizations[tensor_name].original)


def sigma_tracking_error(model: nn.Module, *, take_pending_step: bool = True) -> dict[str, float]:
    """(σ(W) − tracked σ) / σ(W) per reparameterised matrix and row block, σ(W) by exact SVD.

    Keys as `split_names` gives them ("blocks.0.attn.qkv.weight.1" for the v block under qk_v).
    With `take_pending_step`, a pending step (an optimizer stepped since the last fit) is taken
    first, so the error is that of the σ the next training forward uses; that step moves earlier,
    none is added. Without, nothing changes: the error of the tracked σ as it stands (the
    diagnostics callback, which never alters the model it probes).
    """
    errors = {}
    for module_name, module, tensor_name, reparam in _parametrized(model):
        weight = module.parametrizations[tensor_name].original
        if take_pending_step:
            reparam.step_if_stale(weight)
        with torch.no_grad():
            exact = torch.stack([torch.linalg.matrix_norm(b, ord=2) for b in _blocks(weight, reparam.split_sizes)])
            error = (exact - reparam.sigma.to(exact.dtype)) / exact
        names = split_names(_weight_name(module_name, tensor_name), len(reparam.split_sizes))
        errors.update(zip(names, error.tolist()))
    return errors


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
        reparam.step_before_first_forward()
    return model
