"""Rank-collapse metrics for token representations (Noci et al. 2022; Dong et al. 2021).

At init, deep transformers can map all tokens of a sequence to nearly the same vector ("rank
collapse"); then the gradients of queries and keys vanish. Two cheap, O(B·T·d) measures of how far
that has gone, both computed per sequence over its valid tokens and then averaged over sequences:

- ``token_cosine``: mean cosine between distinct tokens, 1 at full collapse, about 0 for random
  directions. Uses ||Σ_t x̂_t||² = T + Σ_{t≠t'} cos(x_t, x_t'), so no T×T matrix is built.
- ``residual_ratio``: ||X - mean_t X||_F / ||X||_F, the part of X not explained by one shared
  token, 0 at full collapse (Dong et al.'s "Frobenius residue").

Inputs are (B, T, d) activations, e.g. block outputs captured by forward hooks; ``mask`` (B, T) is
True at valid tokens (padding is ignored, each sequence uses its own length).

``rank_collapse`` applies both to the output of every transformer block of a model in one no-grad
forward; ``capture_rank_collapse`` is the same as a context manager, so the training callback
takes them from the forward it already runs for the attention entropy.

Which modules are blocks: the model says. A module declares its blocks with a method
``transformer_blocks(self) -> list[tuple[str, nn.Module]]`` (names relative to it; our stacks do),
or its class is registered here with ``register_blocks(cls, "layers", ...)``, naming ModuleLists
whose items are the blocks (timm's VisionTransformer, torchaudio's Conformer, nn.TransformerEncoder
and nn.TransformerDecoder are). The outermost declaring modules answer, their names prefixed, so a
seq2seq model holding an encoder and a decoder stack gets ``encoder.layers.*`` and
``decoder.layers.*`` without declaring anything itself. Explicit fnmatch patterns on module names
(``blocks=``) override the declarations.

Token layout and padding come from the first attention call inside each block call (its
self-attention), as that call's attention kind reads them (attention_kinds.py: the key padding of
``nn.MultiheadAttention``, whose ``batch_first=False`` also says the block output is (T, B, d), or
the recorded masks of the q_tap/k_tap convention). timm attention has no padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatch

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sigma_repro.diagnostics.attention_kinds import AttentionKind, TokenLayout, attention_modules
from sigma_repro.modes import eval_mode

# Classes we do not own -> the attributes holding their blocks, keyed by "module.QualName" so that
# registering a class needs no import of its library (torchaudio takes a second to import).
BLOCK_LISTS: dict[str, tuple[str, ...]] = {}


def token_cosine(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean pairwise cosine between token representations, averaged over sequences.

    x (B, T, d); returns a 0-dim float32 tensor. Sequences with fewer than two valid tokens have no
    pair and are left out of the average. Zero vectors count as orthogonal to everything.
    """
    valid = _valid_tokens(x, mask)  # (B, T, 1)
    x_hat = F.normalize(x.float(), dim=-1) * valid  # (B, T, d) unit tokens, padding zeroed
    n = valid.sum((1, 2))  # (B,)
    pair_sum = x_hat.sum(1).square().sum(-1) - n  # (B,) Σ over ordered pairs t≠t' of cos
    has_pairs = n >= 2
    return (pair_sum[has_pairs] / (n * (n - 1))[has_pairs]).mean()


def residual_ratio(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """||X - mean_t X||_F / ||X||_F per sequence (over its valid tokens), averaged over sequences.

    x (B, T, d); returns a 0-dim float32 tensor. Sequences without valid tokens are left out.
    """
    valid = _valid_tokens(x, mask)  # (B, T, 1)
    x = x.float() * valid
    n = valid.sum(1, keepdim=True)  # (B, 1, 1)
    centred = (x - x.sum(1, keepdim=True) / n.clamp_min(1)) * valid  # (B, T, d)
    ratio = centred.flatten(1).norm(dim=-1) / x.flatten(1).norm(dim=-1)  # (B,)
    return ratio[n.flatten() >= 1].mean()


def _valid_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """(B, T, 1) float32 with 1 at valid tokens; checks the shapes."""
    if x.dim() != 3:
        raise ValueError(f"expected token representations of shape (B, T, d); got {tuple(x.shape)}.")
    if mask is None:
        return x.new_ones(x.shape[:2], dtype=torch.float32)[..., None]
    if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool (B, T) = {tuple(x.shape[:2])} tensor, True at valid tokens; "
            f"got {mask.dtype} {tuple(mask.shape)}."
        )
    return mask.float()[..., None]


def rank_collapse(model: nn.Module, *inputs, blocks: str | Sequence[str] | None = None,
                  **kwargs) -> dict[str, dict[str, float]]:
    """``token_cosine`` and ``residual_ratio`` of every transformer block's output.

    Runs one no-grad, eval-mode forward ``model(*inputs, **kwargs)`` (modes restored afterwards)
    and returns, keyed by block name in module order, ``{"token_cosine": c, "residual_ratio": r}``
    (averaged over the calls if a block runs more than once). ``blocks``: fnmatch pattern(s) on
    qualified module names; the outermost matching modules are the blocks, so "encoder.layers.*"
    picks the encoder layers and not their submodules. None: the blocks the model declares.
    """
    with capture_rank_collapse(model, blocks) as result, eval_mode(model), torch.no_grad():
        model(*inputs, **kwargs)
    return result


def register_blocks(model_type: type | str, *module_lists: str) -> None:
    """Declare the blocks of a class we cannot give a ``transformer_blocks`` method: the items of
    its ModuleLists ``module_lists``, in that order. ``model_type``: the class or its
    "module.QualName" (subclasses are covered too)."""
    key = model_type if isinstance(model_type, str) else f"{model_type.__module__}.{model_type.__qualname__}"
    BLOCK_LISTS[key] = module_lists


def transformer_blocks(model: nn.Module, blocks: str | Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of the blocks of ``model``: those it declares, or with ``blocks`` the
    outermost modules whose qualified names match one of the fnmatch patterns, in module order."""
    if blocks is None:
        return _declared_blocks(model)
    patterns = (blocks,) if isinstance(blocks, str) else tuple(blocks)
    matched = {name: m for name, m in model.named_modules() if any(fnmatch(name, p) for p in patterns)}
    found = [(name, m) for name, m in matched.items()
             if not any(".".join(name.split(".")[:i]) in matched for i in range(1, name.count(".") + 1))]
    if not found:
        examples = [name for name, _ in model.named_modules() if name][:8]
        raise ValueError(
            f"no module of {type(model).__name__} matches the block pattern(s) {list(patterns)}; pass fnmatch "
            f"patterns on module names such as {examples} (e.g. blocks=['encoder.layers.*'])."
        )
    return found


def _declared_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks declared by the outermost declaring modules, names prefixed with theirs."""
    found: list[tuple[str, nn.Module]] = []
    declared: list[str] = []  # names of the modules that answered; their submodules are not asked
    for name, module in model.named_modules():
        if any(outer == "" or name.startswith(f"{outer}.") for outer in declared):
            continue
        declare = _declaration(module)
        if declare is not None:
            declared.append(name)
            found += [(f"{name}.{block_name}" if name else block_name, block) for block_name, block in declare()]
    if not found:
        raise ValueError(
            f"{type(model).__name__} declares no transformer blocks for rank collapse: give the model (or its "
            "stacks) a method `transformer_blocks(self) -> list[tuple[str, nn.Module]]`, register a class you do not "
            "own with sigma_repro.diagnostics.register_blocks(cls, 'layers'), or pass fnmatch patterns on module "
            "names (blocks=['encoder.layers.*'])."
        )
    return found


def _declaration(module: nn.Module) -> Callable[[], list[tuple[str, nn.Module]]] | None:
    """How ``module`` lists its blocks: its own ``transformer_blocks`` method, or its registered lists."""
    method = getattr(module, "transformer_blocks", None)
    if callable(method):
        return method
    for cls in type(module).__mro__:
        lists = BLOCK_LISTS.get(f"{cls.__module__}.{cls.__qualname__}")
        if lists is not None:
            return lambda: [(f"{attr}.{i}", block) for attr in lists for i, block in enumerate(getattr(module, attr))]
    return None


@contextmanager
def capture_rank_collapse(model: nn.Module, blocks: str | Sequence[str] | None = None
                          ) -> Iterator[dict[str, dict[str, float]]]:
    """Measure every block output of the forwards run inside the context (whatever their mode).

    Yields a dict that is filled when the context exits without error, as ``rank_collapse``
    returns it; blocks no forward called are left out. The hooks are removed on exit.
    """
    per_block: dict[str, list[Tensor]] = {}
    handles: list[RemovableHandle] = []
    result: dict[str, dict[str, float]] = {}
    try:
        kinds = {module: kind for _, module, kind in attention_modules(model)}
        for name, block in transformer_blocks(model, blocks):
            per_block[name] = []
            handles += _hook_block(name, block, per_block[name], kinds)
        yield result
    finally:
        for handle in handles:
            handle.remove()
    for name, values in per_block.items():
        if values:
            cosine, residual = torch.stack(values).mean(0).tolist()  # one device->host copy per block
            result[name] = {"token_cosine": cosine, "residual_ratio": residual}


def _hook_block(name: str, block: nn.Module, values: list[Tensor],
                attention_kinds: dict[nn.Module, AttentionKind]) -> list[RemovableHandle]:
    """Hooks that append [token_cosine, residual_ratio] of each call's output to ``values``."""
    call: list[TokenLayout] = []  # the token layout of this call's first attention call

    def measure(mod: nn.Module, args, output) -> None:
        x = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(
                f"block {name!r} ({type(mod).__name__}) returned {type(x).__name__} "
                f"{tuple(x.shape) if isinstance(x, Tensor) else ''}; rank-collapse metrics need token "
                "representations (B, T, d). Declare other blocks, or choose them with the blocks patterns."
            )
        seq_first, valid = call[0] if call else (False, None)
        if seq_first:
            x = x.transpose(0, 1)  # (T, B, d) -> (B, T, d)
        if valid is not None and valid.shape != x.shape[:2]:
            valid = None  # the mask is not over this output's tokens (e.g. cross-attention memory)
        values.append(torch.stack([token_cosine(x, valid), residual_ratio(x, valid)]))

    def record(layout: TokenLayout) -> None:
        if not call:  # an earlier attention call of this block call already said
            call.append(layout)

    handles = [block.register_forward_pre_hook(lambda mod, args: call.clear()),
               block.register_forward_hook(measure)]
    for module in block.modules():
        kind = attention_kinds.get(module)
        if kind is not None and kind.hook_tokens is not None:
            handles += kind.hook_tokens(module, record)
    return handles


register_blocks("timm.models.vision_transformer.VisionTransformer", "blocks")
register_blocks("torchaudio.models.conformer.Conformer", "conformer_layers")
register_blocks(nn.TransformerEncoder, "layers")
register_blocks(nn.TransformerDecoder, "layers")
