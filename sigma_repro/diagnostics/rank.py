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
takes them from the forward it already runs for the attention entropy. Which modules are blocks:
the outermost modules whose qualified names match fnmatch patterns, by default the children of
a top-level ``blocks`` (timm ViT) or ``layers`` (our stacks, nn.TransformerEncoder) list.
Padding comes from the first attention call inside each block call (its self-attention): the
key padding mask of ``nn.MultiheadAttention`` (whose ``batch_first=False`` also says the block
output is (T, B, d)), or ``last_query_padding_mask`` / ``last_key_padding_mask`` of modules with
the q_tap/k_tap convention (entropy.py). timm attention has no padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatch
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sigma_repro.diagnostics.entropy import _MHA_SIGNATURE
from sigma_repro.modes import eval_mode

DEFAULT_BLOCKS = ("blocks.*", "layers.*")


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
    qualified module names (default ``DEFAULT_BLOCKS``); the outermost matching modules are the
    blocks, so "encoder.layers.*" picks the encoder layers and not their submodules.
    """
    with capture_rank_collapse(model, blocks) as result, eval_mode(model), torch.no_grad():
        model(*inputs, **kwargs)
    return result


def transformer_blocks(model: nn.Module, blocks: str | Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of the outermost modules whose names match a pattern, in module order."""
    patterns = DEFAULT_BLOCKS if blocks is None else (blocks,) if isinstance(blocks, str) else tuple(blocks)
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
        for name, block in transformer_blocks(model, blocks):
            per_block[name] = []
            handles += _hook_block(name, block, per_block[name])
        yield result
    finally:
        for handle in handles:
            handle.remove()
    for name, values in per_block.items():
        if values:
            cosine, residual = torch.stack(values).mean(0).tolist()  # one device->host copy per block
            result[name] = {"token_cosine": cosine, "residual_ratio": residual}


def _hook_block(name: str, block: nn.Module, values: list[Tensor]) -> list[RemovableHandle]:
    """Hooks that append [token_cosine, residual_ratio] of each call's output to ``values``."""
    call: dict = {}  # this call's self-attention: "seq_first" and, with padding, "valid" (B, T)

    def measure(mod: nn.Module, args, output) -> None:
        x = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(
                f"block {name!r} ({type(mod).__name__}) returned {type(x).__name__} "
                f"{tuple(x.shape) if isinstance(x, Tensor) else ''}; rank-collapse metrics need token "
                "representations (B, T, d). Choose other modules with the blocks patterns."
            )
        if call.get("seq_first"):
            x = x.transpose(0, 1)  # (T, B, d) -> (B, T, d)
        valid = call.get("valid")
        if valid is not None and valid.shape != x.shape[:2]:
            valid = None  # the mask is not over this output's tokens (e.g. cross-attention memory)
        values.append(torch.stack([token_cosine(x, valid), residual_ratio(x, valid)]))

    handles = [block.register_forward_pre_hook(lambda mod, args: call.clear()),
               block.register_forward_hook(measure)]
    for module in block.modules():
        if isinstance(module, nn.MultiheadAttention):
            handles.append(module.register_forward_pre_hook(partial(_mha_queries, call), with_kwargs=True))
        elif hasattr(module, "q_tap") and hasattr(module, "k_tap"):
            handles.append(module.register_forward_hook(partial(_tapped_queries, call)))
    return handles


def _mha_queries(call: dict, module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
    if call:  # an earlier attention call of this block call already said
        return
    bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
    query, key, pad = bound.arguments["query"], bound.arguments["key"], bound.arguments.get("key_padding_mask")
    call["seq_first"] = query.dim() == 3 and not module.batch_first
    if query is key and pad is not None and query.dim() == 3:  # self-attention: padded keys are padded tokens
        call["valid"] = _valid_tokens_from_padding(pad)


def _tapped_queries(call: dict, module: nn.Module, args, output) -> None:
    if call:
        return
    call["seq_first"] = False
    pad = getattr(module, "last_query_padding_mask", getattr(module, "last_key_padding_mask", None))
    if pad is not None:
        call["valid"] = _valid_tokens_from_padding(pad)


def _valid_tokens_from_padding(pad: Tensor) -> Tensor:
    """(B, T) bool True at real tokens from a padding mask: bool True = pad, or float -inf = pad."""
    return ~pad if pad.dtype == torch.bool else ~torch.isneginf(pad)
