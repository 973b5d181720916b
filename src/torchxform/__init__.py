"""torchxform: JAX-like composable function transforms for PyTorch, in Python."""

from . import rules as _rules  # noqa: F401  (registers every rule)
from .transforms import autograd_function as _autograd_function  # noqa: F401  (patch while transforms run)
from ._core.errors import SlowFallbackWarning
from ._core.tracer import debug_unwrap
from ._coverage import coverage, explain
from .einops import rearrange
from .extend import register_batch_rule, register_jvp, register_vjp
from .nn import (
    combine_state_for_ensemble,
    functional_call,
    make_functional,
    make_functional_with_buffers,
    replace_all_batch_norm_modules_,
    stack_module_state,
)
from .transforms.forward import jvp
from .transforms.functionalize import functionalize
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
    "functional_call",
    "stack_module_state",
    "replace_all_batch_norm_modules_",
    "functionalize",
    "make_functional",
    "make_functional_with_buffers",
    "combine_state_for_ensemble",
    "debug_unwrap",
    "rearrange",
    "coverage",
    "explain",
    "register_batch_rule",
    "register_vjp",
    "register_jvp",
    "SlowFallbackWarning",
]
__version__ = "0.1.0"
