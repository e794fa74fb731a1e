"""Admin's output-change amplification: how much a small update of every weight moves the output.

Why (Liu et al., EMNLP 2020): post-LN training is unstable not because of vanishing gradients but
because each residual branch depends heavily on its own sublayer, so a parameter update is
amplified with depth: E|F(x, W) - F(x, W + δ)|² grows O(N) with N sublayers for post-LN and
O(log N) for pre-LN and Admin. Measuring it at init tells which models will need warmup.

As in their code, δ = ε·sign(N(0, 1)) perturbs every weight except biases, normalisation
parameters and the stabilisers' own scales (Admin's ω, residual τ / α, σReparam's γ): parameters
whose name contains "bias", those of normalisation layers, and those named ``omega``, ``tau``,
``alpha`` or ``gamma`` directly under a σReparam parametrization. Under σReparam the perturbed W
is the raw ``original`` (Ŵ follows from it). Embeddings and the output layer are perturbed too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sigma_repro.modes import eval_mode
from sigma_repro.reparam import NORM_TYPES, SigmaReparam

STABILIZER_SCALES = ("omega", "tau", "alpha")


@dataclass(frozen=True)
class OutputChange:
    """``change``: E|F(x, W) - F(x, W + δ)|², the mean over samples of δ and over output elements;
    ``relative``: the same divided by E|F(x, W)|² (mean over elements), comparable across models."""

    change: float
    relative: float

    def __float__(self) -> float:
        return self.change


def output_change(model: nn.Module, inputs: Tensor | tuple, *, eps: float = 1e-4, n_samples: int = 3,
                  seed: int = 0, loss_fn: Callable[[object], Tensor] | None = None) -> OutputChange:
    """Admin's amplification measure of ``model`` at its current weights.

    inputs: the model's input tensor, or a tuple of positional arguments.
    eps: the size of every weight's perturbation; n_samples: how many independent signs δ to
    average over; seed: seeds their generator (a CPU ``torch.Generator``; the global RNG is untouched).
    loss_fn: maps the model output to the tensor compared (e.g. logits out of a tuple, or a loss);
    default the output itself, which must be a tensor.

    Runs 1 + n_samples no-grad forwards in eval mode (no dropout); the weights are copied back
    bit for bit and the modules' train/eval modes restored afterwards, also on error.
    """
    if eps <= 0 or n_samples < 1:
        raise ValueError(f"output_change needs eps > 0 and n_samples >= 1; got eps={eps}, n_samples={n_samples}.")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    params = perturbed_parameters(model)
    if not params:
        raise ValueError(f"{type(model).__name__} has no weight to perturb (all are biases, norms or scales).")

    def output() -> Tensor:
        out = model(*args)
        out = out if loss_fn is None else loss_fn(out)
        if not isinstance(out, Tensor):
            raise ValueError(f"the model returned {type(out).__name__}; pass loss_fn to pick the tensor to compare.")
        return out.double()

    generator = torch.Generator().manual_seed(seed)
    saved = [p.detach().clone() for p in params.values()]
    changes = []
    with eval_mode(model), torch.no_grad():
        try:
            clean = output()
            for _ in range(n_samples):  # each sample perturbs the saved W afresh: W + δ_s
                for p, original in zip(params.values(), saved):
                    sign = torch.randn(p.shape, generator=generator).sign().to(p.device, p.dtype)
                    p.copy_(original).add_(sign, alpha=eps)
                changes.append((output() - clean).square().mean())
        finally:
            for p, original in zip(params.values(), saved):
                p.copy_(original)
    change = torch.stack(changes).mean()
    return OutputChange(change=float(change), relative=float(change / clean.square().mean()))  # inf at F = 0


def perturbed_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters Admin's measure perturbs, by qualified name (see the module docstring)."""
    excluded = set()
    for module in model.modules():
        norm = isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")  # timm RmsNorm too
        for name, p in module.named_parameters(recurse=False):
            if norm or "bias" in name or name in STABILIZER_SCALES or isinstance(module, SigmaReparam):
                excluded.add(id(p))
    return {name: p for name, p in model.named_parameters() if id(p) not in excluded}
