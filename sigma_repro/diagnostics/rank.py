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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
