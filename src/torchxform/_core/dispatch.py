"""``bind``: the one place where an ATen op meets the interpreter stack.

Ops reach ``bind`` two ways:

* from user code inside a transform, through :class:`TransformMode`, a
  ``TorchDispatchMode`` active while any transform runs (so factories and
  random ops without tensor arguments are seen too);
* from rules, which run with the mode popped (PyTorch pops a mode while its
  handler runs): their ops on lower-level tracers arrive through
  ``Tracer.__torch_dispatch__``, and their ops on plain tensors run directly.

NOTE [Autograd inside rules]
``__torch_dispatch__`` handlers run below autograd: PyTorch excludes the
autograd dispatch keys while they run.  Outputs must stay differentiable by
ordinary torch.autograd when the user's plain inputs require grad, so an
interpreter runs a rule with the autograd keys re-enabled whenever one of
the plain tensors it handles requires grad (:func:`autograd_enabled`).  At
user level nothing needs doing: autograd has already recorded the op before
the mode saw it, and ``bind`` runs plain ops below autograd there, so
nothing is recorded twice.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

from . import tracer as _tracer_module
from .interpreter import STATE
from .tracer import Tracer

_C = torch._C
_DK = _C.DispatchKey
_EMPTY_KWARGS: dict = {}


# --------------------------------------------------------------------------
# Random ops.  Routed to the top of the stack even when no tracer is among
# their arguments, so that vmap's `randomness` sees them.
# --------------------------------------------------------------------------

# id(op) -> bool.  Keyed by id: OpOverload.__hash__ is a Python method.
_IS_RANDOM: dict[int, bool] = {}


def is_random_op(op) -> bool:
    """True for ATen ops that draw from the random number generator."""
    flag = _IS_RANDOM.get(id(op))
    if flag is None:
        flag = _IS_RANDOM[id(op)] = torch.Tag.nondeterministic_seeded in getattr(op, "tags", ())
    return flag


# --------------------------------------------------------------------------
# bind
# --------------------------------------------------------------------------


def bind(op, args, kwargs):
    """Run ATen ``op``: hand it to the highest live interpreter among the
    tracers in ``args``/``kwargs`` (random ops: to the top of the stack below
    the ceiling, see NOTE [Ceiling]), or run it on plain values."""
    top = None
    top_level = 0
    for a in args:
        if isinstance(a, Tracer):
            level = a._interp.level
            if level > top_level:
                top, top_level = a._interp, level
        elif type(a) is list or type(a) is tuple:  # Tensor[] and Tensor?[] arguments
            for b in a:
                if isinstance(b, Tracer):
                    level = b._interp.level
                    if level > top_level:
                        top, top_level = b._interp, level
    if kwargs:
        for a in kwargs.values():
            if isinstance(a, Tracer):
                level = a._interp.level
                if level > top_level:
                    top, top_level = a._interp, level
    random = _IS_RANDOM.get(id(op))
    if random is None:
        random = is_random_op(op)
    if random:
        state = STATE
        n = len(state.stack) if state.ceiling is None else state.ceiling
        if n and n > top_level:
            top = state.stack[n - 1]
    if top is None:
        return op(*args, **kwargs)
    if not top.alive:
        args, kwargs = _replace_dead_tracers(args, kwargs)
        return bind(op, args, kwargs)
    return top.process(op, args, kwargs)


_tracer_module._bind = bind


def _replace_dead_tracers(args, kwargs):
    def fix(a):
        while isinstance(a, Tracer) and not a._interp.alive:
            a = a._dead_value()
        if type(a) is list or type(a) is tuple:
            return type(a)(fix(b) for b in a)
        return a

    return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}


def lower(op, *args, **kwargs):
    """Bind ``op`` below the interpreter that is running a rule.

    Rules call ordinary torch ops on lower-level values, which needs nothing
    special; this is for ops whose routing must not depend on their
    arguments (random ops: see NOTE [Ceiling])."""
    return bind(op, args, kwargs)


# --------------------------------------------------------------------------
# The dispatch mode
# --------------------------------------------------------------------------


class TransformMode(TorchDispatchMode):
    """Active while any transform runs: sends every ATen op to ``bind``."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Otherwise TorchDispatchMode wraps __torch_dispatch__ in
        # torch._disable_dynamo, which costs tens of microseconds per op.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return bind(func, args, kwargs or _EMPTY_KWARGS)


def enter_mode():
    """Make sure a TransformMode is the innermost dispatch mode.

    Returns a token for :func:`exit_mode` (the mode pushed, or None)."""
    if isinstance(_get_current_dispatch_mode(), TransformMode):
        return None
    mode = TransformMode()
    mode.__enter__()
    return mode


def exit_mode(token) -> None:
    if token is not None:
        token.__exit__(None, None, None)


# --------------------------------------------------------------------------
# Re-enabling autograd inside rules.  See NOTE [Autograd inside rules].
# --------------------------------------------------------------------------

_AUTOGRAD_GUARDS: dict = {}


def autograd_enabled():
    """A guard that re-enables the autograd dispatch keys excluded while a
    ``__torch_dispatch__`` handler runs."""
    include = _C._dispatch_tls_local_include_set()
    exclude = _C._dispatch_tls_local_exclude_set()
    key = (include.raw_repr(), exclude.raw_repr())
    sets = _AUTOGRAD_GUARDS.get(key)
    if sets is None:
        enabled = exclude.remove(_DK.AutogradFunctionality).remove(_DK.ADInplaceOrView)
        enabled = enabled.remove(_DK.AutogradOther)
        sets = _AUTOGRAD_GUARDS[key] = (include, enabled)
    return _C._ForceDispatchKeyGuard(*sets)


def any_requires_grad(values) -> bool:
    """Whether any plain tensor among ``values`` (or inside a list) requires grad."""
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.requires_grad and not isinstance(v, Tracer):
                return True
        elif type(v) is list or type(v) is tuple:
            for w in v:
                if isinstance(w, torch.Tensor) and w.requires_grad and not isinstance(w, Tracer):
                    return True
    return False
