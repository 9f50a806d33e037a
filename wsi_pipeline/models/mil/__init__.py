"""MIL aggregators: `create_aggregator(name, in_dim, n_classes, **cfg)`; one file per model.

Importing this package registers the built-in aggregators: abmil, transmil, mean, max (baselines),
mambamil, bimamba_mil, mamba_mil (MambaMIL), gmmamba (GMMamba), fmamil (FMaMIL stage 1),
mammil (MamMIL) and twodmamba (2DMamba).
"""

from .registry import AGGREGATORS, MILOutput, create_aggregator, list_aggregators, register_aggregator

from . import abmil, fmamil, gmmamba, mammil, mambamil, pooling, transmil, twodmamba  # noqa: E402,F401  (registration side effect)

__all__ = ["AGGREGATORS", "MILOutput", "create_aggregator", "list_aggregators", "register_aggregator"]
