"""Every attention method, registered: importing this module fills the table of utils/registry.py.

Read the table here (`from utils.methods import METHODS, get_method, ...`): utils/registry.py alone holds only
"dense". Each module imported below registers its own methods with `utils.registry.register`, in this order:
    utils/registry.py        dense
    utils/dhsa_method.py     dhsa, dhsa_no_robust_repr, dhsa_fixed_chunks
    utils/baselines/         the training-free baselines (see its __init__)
Adding a method: write its module (a selection rule and a `register(...)` call) and import it below.
"""

# Each module registers its methods when imported; the import order is the order of METHODS (runners and plots).
from . import dhsa_method  # noqa: F401  (isort: skip)
from . import baselines  # noqa: F401  (isort: skip)
from .registry import METHODS, AttentionMethod, LayerContext, get_method, method_names, register, run_method

__all__ = ["METHODS", "AttentionMethod", "LayerContext", "get_method", "method_names", "register", "run_method"]
