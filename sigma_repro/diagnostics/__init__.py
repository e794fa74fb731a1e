"""Diagnostics that read a model without changing it: attention entropy per layer and head, the
σReparam entropy lower bound and the per-head logit norm it is stated in, rank-collapse metrics per
block, query/key/value gradient norms, Admin's output-change amplification, spectral norms and γ.

Functions here work on any nn.Module (bring your own model). Attention modules are found through
one registry of attention kinds (``register_attention_kind``, attention_kinds.py); the blocks
rank collapse measures are those the model declares (a ``transformer_blocks()`` method, or
``register_blocks`` for classes you do not own; rank.py). The Lightning callback and the plot
helpers live in ``sigma_repro.diagnostics.callbacks`` (``AttentionDiagnostics``,
``load_diagnostics``, ``plot_entropy_curves``, ``plot_entropy_comparison``, ``plot_entropy_heads``,
``plot_sigma_curves``), imported from there so that importing this package needs neither
Lightning nor matplotlib.
"""

from sigma_repro.diagnostics.amplification import OutputChange, output_change
from sigma_repro.diagnostics.attention_kinds import (
    AttentionCall,
    AttentionKind,
    AttentionLayout,
    Projection,
    TokenLayout,
    register_attention_kind,
)
from sigma_repro.diagnostics.bound import entropy_lower_bound
from sigma_repro.diagnostics.entropy import attention_entropy, probe_attention_entropy
from sigma_repro.diagnostics.gradients import attention_grad_norms
from sigma_repro.diagnostics.rank import (
    capture_rank_collapse,
    rank_collapse,
    register_blocks,
    residual_ratio,
    token_cosine,
)
from sigma_repro.diagnostics.spectral import attention_logit_norms, reparam_gammas, reparam_sigmas, spectral_norms

__all__ = [
    "AttentionCall",
    "AttentionKind",
    "AttentionLayout",
    "OutputChange",
    "Projection",
    "TokenLayout",
    "attention_entropy",
    "attention_grad_norms",
    "attention_logit_norms",
    "capture_rank_collapse",
    "entropy_lower_bound",
    "output_change",
    "probe_attention_entropy",
    "rank_collapse",
    "register_attention_kind",
    "register_blocks",
    "reparam_gammas",
    "reparam_sigmas",
    "residual_ratio",
    "spectral_norms",
    "token_cosine",
]
