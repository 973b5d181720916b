"""torchxform: JAX-like composable function transforms for PyTorch, in Python."""

from . import rules as _rules  # noqa: F401  (registers every rule)
from ._core.errors import SlowFallbackWarning
from .transforms.forward import jvp
from .transforms.jacobians import hessian, jacfwd, jacrev, linearize
from .transforms.reverse import grad, grad_and_value, vjp
from .transforms.vmap import vmap

__all__ = [
    "vmap",
    "grad",
    "grad_and_value",
    "vjp",
    "jvp",
    "linearize",
    "jacrev",
    "jacfwd",
    "hessian",
    "SlowFallbackWarning",
]
__version__ = "0.1.0"
