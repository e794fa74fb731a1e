"""sigma-repro: reproduction suite for transformer training-stability research.

Public entry points (see DESIGN.md): ``sigma_repro.reparam.apply_sigma_reparam``,
``sigma_repro.reparam.remove_sigma_reparam``, ``sigma_repro.diagnostics``, the Hydra app
``sigma-repro-train`` and the ``sigma-repro`` command.
"""

__version__ = "0.1.0"

from sigma_repro import config  # noqa: E402,F401  (importing it registers the OmegaConf resolvers)
__all__ = ["__version__", "config"]
