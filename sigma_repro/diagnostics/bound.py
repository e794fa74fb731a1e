"""The σReparam paper's lower bound on attention entropy, as a function of the logit scale.

For logits a = X W_K W_Q^T X^T over T keys, with s = ||W_K W_Q^T||_2 · ||X X^T||_2, every query's
attention entropy is at least

    log(1 + (T-1)β) + s·sqrt(T(T-1))·β / (1 + (T-1)β),    β = exp(-s·sqrt(T/(T-1))).

It decreases monotonically from log T (s = 0) towards 0, so a growing spectral norm of the
attention logits is what permits entropy collapse; σReparam bounds s by controlling σ(W).
The bound is attained: it is the entropy of a softmax with one logit s·sqrt(T/(T-1)) above T-1
equal logits. Used to draw the floor under measured entropy curves.
"""

from __future__ import annotations

import torch
from torch import Tensor


def entropy_lower_bound(s: float | Tensor, T: int | float | Tensor) -> float | Tensor:
    """The entropy floor for logit scale ``s`` >= 0 and sequence length ``T`` >= 2.

    Python numbers in give a float; any tensor in gives a float64 tensor (broadcast over s and T).
    """
    if not isinstance(s, Tensor) and not isinstance(T, Tensor):
        return float(entropy_lower_bound(torch.tensor(float(s)), T))
    s = torch.as_tensor(s, dtype=torch.float64)
    T = torch.as_tensor(T, dtype=torch.float64)
    if (s < 0).any() or (T < 2).any():
        raise ValueError(
            f"entropy_lower_bound needs s >= 0 and T >= 2 (a softmax over at least two keys); "
            f"got s min {s.min().item()}, T min {T.min().item()}."
        )
    beta = torch.exp(-s * torch.sqrt(T / (T - 1)))
    spread = 1 + (T - 1) * beta
    return torch.log(spread) + s * torch.sqrt(T * (T - 1)) * beta / spread

