"""Residual sublayers: where the LayerNorm sits and how the skip and the branch are weighted.

Every sublayer (attention or FFN) of our transformer stacks is wrapped in one ``ResidualSublayer``.
Its forward is a single formula,

    y = post_norm(ω·x + τ·dropout(f(pre_norm(x))))

whose parts the options fill in (disabled parts are ``nn.Identity`` or the constant 1):

| norm, scheme            | formula                  | paper                                           |
|-------------------------|--------------------------|-------------------------------------------------|
| post, standard          | LN(x + f(x))             | Vaswani et al.; fairseq's post-LN               |
| pre, standard           | x + f(LN(x))             | pre-LN (fairseq ``normalize_before``)           |
| none, standard          | x + f(x)                 | no normalisation                                |
| any, scaled             | as above with τ·f        | Noci et al. 2022: τ = 1/sqrt(L)                 |
| post, admin             | LN(ω ⊙ x + f(x))         | Admin (Liu et al. 2020): ω a learned vector     |
| post, deepnorm          | LN(α·x + f(x))           | DeepNorm (Wang et al. 2022): ω = α constant     |
| none, rezero            | x + τ·f(x)               | ReZero (Bachlechner et al.): τ learned, init 0  |

The skip weight is stored as ``omega`` in every scheme (a learned (dim,) Parameter for Admin, the
float α for DeepNorm, 1.0 otherwise) and the branch weight as ``tau`` (a learned scalar for ReZero,
a float otherwise), so analysis code finds them under one name. ReZero gets one τ per sublayer
(its reference code and Transformer-Clinic share one per layer; the function at init is the same).

This module also holds the schemes' constants: ``admin_profile`` / ``admin_closed_form`` for
Admin's ω and ``deepnorm_constants`` for DeepNorm's α and init gain β.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sigma_repro.errors import ConfigError
from sigma_repro.modes import module_mode

NORMS = ("post", "pre", "none")
SCHEMES = ("standard", "admin", "deepnorm", "scaled", "rezero")
# Schemes tied to one norm placement: Admin and DeepNorm re-weight the skip inside post-LN's
# LN(ω·x + f(x)); ReZero replaces the norm altogether.
_SCHEME_NORM = {"admin": "post", "deepnorm": "post", "rezero": "none"}


class ResidualSublayer(nn.Module):
    """y = post_norm(ω·x + τ·dropout(f(pre_norm(x)))), f = ``sublayer``; see the module docstring.

    norm: "post" (LN after the sum), "pre" (LN on the branch input), "none".
    scheme: "standard", "scaled" (τ = ``tau``), "admin" (ω learned, initialised to ``alpha``),
        "deepnorm" (ω = ``alpha``), "rezero" (τ learned, initialised to 0).
    dropout: on the branch output, before the sum (fairseq's ``dropout``).
    alpha: skip weight: DeepNorm's α, or the initial value of Admin's ω (see ``admin_profile``).
    tau: branch weight of the "scaled" scheme.
    norm_bias: False builds the LayerNorm without its bias (nanoGPT's ``bias=False``).
    Extra forward arguments go to ``sublayer`` (masks, the encoder output for cross-attention).
    """

    def __init__(self, dim: int, sublayer: nn.Module, *, norm: str = "post", scheme: str = "standard",
                 dropout: float = 0.0, alpha: float = 1.0, tau: float = 1.0, norm_bias: bool = True):
        super().__init__()
        _check_options(norm, scheme, alpha, tau)
        self.norm, self.scheme = norm, scheme
        self.sublayer = sublayer
        self.pre_norm = nn.LayerNorm(dim, bias=norm_bias) if norm == "pre" else nn.Identity()
        self.post_norm = nn.LayerNorm(dim, bias=norm_bias) if norm == "post" else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        # Admin: one ω per channel, as Transformer-Clinic's nn.Parameter(torch.ones(embed_dim)).
        self.omega = nn.Parameter(torch.full((dim,), float(alpha))) if scheme == "admin" else float(alpha)
        self.tau = nn.Parameter(torch.zeros(())) if scheme == "rezero" else float(tau)

    def extra_repr(self) -> str:
        omega = "learned" if isinstance(self.omega, nn.Parameter) else f"{self.omega:.4g}"
        tau = "learned" if isinstance(self.tau, nn.Parameter) else f"{self.tau:.4g}"
        return f"norm={self.norm!r}, scheme={self.scheme!r}, omega={omega}, tau={tau}"

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        branch = self.dropout(self.sublayer(self.pre_norm(x), *args, **kwargs))
        return self.post_norm(self.omega * x + self.tau * branch)


def _check_options(norm: str, scheme: str, alpha: float, tau: float) -> None:
    if norm not in NORMS:
        raise ConfigError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    if _SCHEME_NORM.get(scheme, norm) != norm:
        raise ConfigError(f"scheme={scheme!r} needs norm={_SCHEME_NORM[scheme]!r}, got norm={norm!r}")
    if alpha != 1.0 and scheme not in ("admin", "deepnorm"):
        raise ConfigError(f"alpha={alpha} weights the skip only in scheme 'deepnorm' (α) or 'admin' (initial ω); "
                          f"scheme={scheme!r} keeps it at 1")
    if tau != 1.0 and scheme != "scaled":
        raise ConfigError(f"tau={tau} weights the branch only in scheme 'scaled'; use scheme='scaled' "
                          f"(or 'rezero' for a learned τ)")
    if not (math.isfinite(alpha) and alpha > 0 and math.isfinite(tau) and tau > 0):
        raise ConfigError(f"alpha and tau must be positive finite numbers, got alpha={alpha}, tau={tau}")


def admin_closed_form(num_sublayers: int) -> float:
    """Admin's ω without profiling: sqrt((N+1)/ln(N+1) − 1), N = residual sublayers of the stack.

    admin-torch's O(log N) output-change setting; N is 2 per encoder layer, 3 per decoder layer
    (6-layer encoder: N = 12, ω = 2.017).
    """
    if num_sublayers < 1:
        raise ConfigError(f"admin_closed_form needs at least 1 residual sublayer, got {num_sublayers}")
    n = num_sublayers
    return math.sqrt((n + 1) / math.log(n + 1) - 1)


@torch.no_grad()
def admin_profile(model: nn.Module, *args, **kwargs) -> dict[str, float]:
    """Set every Admin ω of ``model`` from one profiling forward ``model(*args, **kwargs)``.

    Admin (Liu et al. 2020, Transformer-Clinic's ``adaptive-profiling``): in train mode (dropout
    on) and without gradients, for the Admin sublayers in the order they are called, set
    ω_i = r, then r = sqrt(Var(x·ω_i) + Var(f_i(x))), the variances over all elements of the skip
    and of the branch after dropout; r starts at 1.0 in each stack (encoder and decoder apart).
    A stack is a submodule with a ``residual_sublayers()`` method (our transformer stacks); Admin
    sublayers outside any stack count as one stack. The ω are Parameters, so they are saved in
    checkpoints. Modes are restored afterwards. Returns {qualified name: ω} in call order.

    Call it on the first training batch, before σReparam (in train mode its power iteration would
    advance). Each sublayer must receive x positionally, as our stacks call them.
    """
    names = {m: name for name, m in model.named_modules()
             if isinstance(m, ResidualSublayer) and m.scheme == "admin"}
    if not names:
        raise ConfigError(f"admin_profile found no ResidualSublayer with scheme='admin' in {type(model).__name__}; "
                          f"build the model with scheme='admin'")
    stack_of = {sub: model for sub in names}
    for stack in model.modules():  # pre-order: an inner stack overrides an outer one
        if callable(getattr(stack, "residual_sublayers", None)):
            for _, sub in stack.residual_sublayers():
                if sub in stack_of:
                    stack_of[sub] = stack
    ratio: dict[nn.Module, float] = {}
    skip: dict[ResidualSublayer, Tensor] = {}
    profiled: dict[str, float] = {}

    def set_omega(sub: ResidualSublayer, args: tuple) -> None:
        r = ratio.setdefault(stack_of[sub], 1.0)
        sub.omega.fill_(r)
        profiled[names[sub]] = r
        skip[sub] = args[0] * sub.omega  # x·ω_i

    def next_ratio(sub: ResidualSublayer, branch: Tensor) -> None:
        ratio[stack_of[sub]] = math.sqrt(skip.pop(sub).double().var(correction=0).item()
                                         + branch.double().var(correction=0).item())

    handles = []
    for sub in names:
        handles.append(sub.register_forward_pre_hook(set_omega))
        handles.append(sub.dropout.register_forward_hook(lambda m, a, out, sub=sub: next_ratio(sub, out)))
    try:
        with module_mode(model, training=True):  # dropout on, as in Admin's profiling run
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missed = [name for sub, name in names.items() if name not in profiled]
    if missed:
        raise ConfigError(f"admin_profile: the forward did not call the Admin sublayers {missed[:4]}...; "
                          f"pass inputs that run the whole model (encoder and decoder)")
    return profiled


class DeepNormConstants(NamedTuple):
    alpha: float  # skip weight in LN(α·x + f(x))
    beta: float  # xavier_normal gain of the FFN, v and out projections (q, k keep gain 1)


def deepnorm_constants(n_enc: int, n_dec: int, *, part: str) -> DeepNormConstants:
    """DeepNorm's α and β (Wang et al. 2022) for the ``part`` ("encoder" or "decoder") of a model
    with ``n_enc`` encoder and ``n_dec`` decoder layers.

    Encoder-decoder (N = n_enc, M = n_dec): encoder α = 0.81(N⁴M)^{1/16}, β = 0.87(N⁴M)^{-1/16};
    decoder α = (3M)^{1/4}, β = (12M)^{-1/4}. A single stack (the other count 0: encoder-only or
    decoder-only, N layers): α = (2N)^{1/4}, β = (8N)^{-1/4}. 6-6: encoder (1.418, 0.497),
    decoder (2.060, 0.343).
    """
    if part not in ("encoder", "decoder"):
        raise ConfigError(f"deepnorm_constants part must be 'encoder' or 'decoder', got {part!r}")
    own, other = (n_enc, n_dec) if part == "encoder" else (n_dec, n_enc)
    if own < 1 or other < 0:
        raise ConfigError(f"deepnorm_constants needs at least 1 {part} layer and no negative depth, "
                          f"got n_enc={n_enc}, n_dec={n_dec}")
    if other == 0:
        return DeepNormConstants((2 * own) ** 0.25, (8 * own) ** -0.25)
    if part == "encoder":
        return DeepNormConstants(0.81 * (n_enc**4 * n_dec) ** (1 / 16), 0.87 * (n_enc**4 * n_dec) ** (-1 / 16))
    return DeepNormConstants((3 * n_dec) ** 0.25, (12 * n_dec) ** -0.25)
