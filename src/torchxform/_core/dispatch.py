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
autograd dispatch keys while they run (and the lazy conj/neg view keys).
Outputs must stay differentiable by ordinary torch.autograd when the user's
plain inputs require grad, so an interpreter runs a rule with those keys
re-enabled whenever one of the plain tensors it handles requires grad or is
a lazy conj/neg view (:func:`dispatch_keys_restored`).  At
user level nothing needs doing: autograd has already recorded the op before
the mode saw it, and ``bind`` runs plain ops below autograd there, so
nothing is recorded twice.
"""

from __future__ import annotations

import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

from . import interpreter as _interpreter_module
from . import tracer as _tracer_module
from .interpreter import STATE
from .tracer import Tracer

_C = torch._C
_DK = _C.DispatchKey
Tensor = torch.Tensor
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
        state = STATE
        if state.ceiling is None and state.stack:
            innermost = state.stack[-1]
            if innermost.claims_untracked:
                return innermost.process(op, args, kwargs)
        return op(*args, **kwargs)
    if not top.alive:
        args, kwargs = _replace_dead_tracers(args, kwargs)
        return bind(op, args, kwargs)
    if op is _LAZY_CONJ:  # See NOTE [Conjugation is physical inside tracers]
        op = _PHYSICAL_CONJ
    return top.process(op, args, kwargs)


# NOTE [Conjugation is physical inside tracers]
# A tracer's wrapper never carries PyTorch's lazy conjugate bit, so its
# payload must not either: ``x.conj().real`` checks the (clear) bit on the
# wrapper and then reaches a kernel (view_as_real) that refuses a lazily
# conjugated payload.  So ``_conj`` on a tracer runs as ``conj_physical``:
# same values, but the result does not alias its input.
_LAZY_CONJ = torch.ops.aten._conj.default
_PHYSICAL_CONJ = torch.ops.aten.conj_physical.default

_tracer_module._bind = bind


def _replace_dead_tracers(args, kwargs):
    def fix(a):
        while isinstance(a, Tracer) and not a._interp.alive:
            a = a._dead_value()
        if type(a) is list or type(a) is tuple:
            return type(a)(fix(b) for b in a)
        return a

    return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}


# --------------------------------------------------------------------------
# Calling an op on tracers from rule code without the trip through the C++
# dispatcher.
# --------------------------------------------------------------------------

_len_dispatch_modes = _C._len_torch_dispatch_stack
_dispatch_mode_at = _C._get_dispatch_stack_at
_pop_dispatch_mode = _C._pop_torch_dispatch_stack
_push_dispatch_mode = _C._push_on_torch_dispatch_stack
_torch_function_mode_enabled = _C._is_torch_function_mode_enabled
_any_autocast_enabled = _C._is_any_autocast_enabled


def call_on_tracers(op, args, kwargs=_EMPTY_KWARGS):
    """``op(*args, **kwargs)`` for ``args`` with a tracer among them (and
    ``kwargs`` as the dispatcher passes them on: no tensors, the keyword-only
    arguments it fills in), as PyTorch would run it, minus the C++ dispatcher's round
    trip: what reaches ``bind`` is the same, and so is the dispatch mode
    stack while it runs (PyTorch pops a mode while its handler runs).

    Where PyTorch would do more before the Python dispatch key (a plain
    argument that requires grad: autograd records; autocast; a torch
    function mode; a dispatch mode of someone else's on top), the op runs
    the ordinary way.  Used on the hot paths of backward rules."""
    for a in args:
        if isinstance(a, Tensor) and a.requires_grad:
            return op(*args, **kwargs)
    if _torch_function_mode_enabled() or _any_autocast_enabled():
        return op(*args, **kwargs)
    n = _len_dispatch_modes()
    if not n:
        return bind(op, args, kwargs)
    mode = _dispatch_mode_at(n - 1)
    if type(mode) is not TransformMode:
        return op(*args, **kwargs)
    _pop_dispatch_mode(None)
    try:
        return bind(op, args, kwargs)
    finally:
        _push_dispatch_mode(mode)


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


_interpreter_module._dispatch = sys.modules[__name__]


# --------------------------------------------------------------------------
# Restoring, inside rules, the dispatch keys a handler runs without.  See
# NOTE [Autograd inside rules].
# --------------------------------------------------------------------------

# Excluded while a __torch_dispatch__ handler runs, but needed by rules:
# autograd (interop with torch.autograd) and the lazy conjugate/negative
# views' fallbacks (a kernel must not read a conj()/neg() view raw).
_RESTORED_KEYS = (_DK.AutogradFunctionality, _DK.ADInplaceOrView, _DK.AutogradOther, _DK.Conjugate, _DK.Negative)
_GUARD_SETS: dict = {}


def dispatch_keys_restored():
    """A guard that re-enables, for a rule, the dispatch keys excluded while
    a ``__torch_dispatch__`` handler runs (see ``needs_dispatch_keys``)."""
    include = _C._dispatch_tls_local_include_set()
    exclude = _C._dispatch_tls_local_exclude_set()
    key = (include.raw_repr(), exclude.raw_repr())
    sets = _GUARD_SETS.get(key)
    if sets is None:
        restored = exclude
        for k in _RESTORED_KEYS:
            restored = restored.remove(k)
        sets = _GUARD_SETS[key] = (include, restored)
    return _C._ForceDispatchKeyGuard(*sets)


def _needs_keys(v) -> bool:
    # Complex values, not only lazy conj views: kernels may build conj views
    # internally (linalg_pinv does), which the excluded key would leave raw.
    return isinstance(v, torch.Tensor) and (
        (v.requires_grad and not isinstance(v, Tracer)) or v.is_complex() or v.is_neg()
    )


def needs_dispatch_keys(values) -> bool:
    """Whether a rule over ``values`` (or inside a list among them) must run
    under :func:`dispatch_keys_restored`: a plain tensor requires grad, or a
    tensor is complex or a lazy negative view."""
    for v in values:
        if type(v) is list or type(v) is tuple:
            for w in v:
                if _needs_keys(w):
                    return True
        elif _needs_keys(v):
            return True
    return False
