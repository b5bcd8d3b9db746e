"""The attention methods: one table, filled on import (read it here: `from utils.methods import METHODS, ...`).

registry.py (AttentionMethod, LayerContext, register, run_method) registers only "dense"; each package imported below
registers its own methods with `register`, in this order:
    registry.py     dense
    dhsa/           dhsa, dhsa_no_robust_repr, dhsa_fixed_chunks (DHSA's selection, scores, boundaries, GPU path)
    baselines/      the training-free baselines, one module each (see its __init__)
Adding a method: write its module (a selection rule and a `register(...)` call) and import it below.
"""

# Each module registers its methods when imported; the import order is the order of METHODS (runners and plots).
from utils.methods import dhsa  # noqa: F401  (isort: skip)
from utils.methods import baselines  # noqa: F401  (isort: skip)
from utils.methods.registry import METHODS, AttentionMethod, LayerContext, get_method, method_names, register, run_method

__all__ = ["METHODS", "AttentionMethod", "LayerContext", "get_method", "method_names", "register", "run_method"]
