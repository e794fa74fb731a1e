"""Diagnostics that read a model without changing it: attention entropy per layer and head, the
σReparam entropy lower bound, rank-collapse metrics, spectral norms and γ.

Functions here work on any nn.Module (bring your own model). The Lightning callback and the plot
helpers live in ``sigma_repro.diagnostics.callbacks`` (``AttentionDiagnostics``,
``plot_entropy_curves``, ``plot_entropy_comparison``), imported from there so that importing this
package needs neither Lightning nor matplotlib.
"""

from sigma_repro.diagnostics.bound import entropy_lower_bound
from sigma_repro.diagnostics.entropy import attention_entropy, probe_attention_entropy
from sigma_repro.diagnostics.rank import residual_ratio, token_cosine
from sigma_repro.diagnostics.spectral import reparam_gammas, reparam_sigmas, spectral_norms

__all__ = [
    "attention_entropy",
    "entropy_lower_bound",
    "probe_attention_entropy",
    "reparam_gammas",
    "reparam_sigmas",
    "residual_ratio",
    "spectral_norms",
    "token_cosine",
]
