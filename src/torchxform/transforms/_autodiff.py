"""Pieces the reverse- and forward-mode interpreters share: replaying view
chains, reading what a rule wants from its signature, and running an op one
level down."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .._core.dispatch import bind, dispatch_keys_restored, is_random_op
from .._core.interpreter import STATE
from .._core.tracer import Tracer

_len_dispatch_modes = torch._C._len_torch_dispatch_stack


def replay_view(chain, base):
    """Apply the view ops of ``chain`` to ``base`` (a tensor of the root's
    shape): each link is ``(op, args after self, kwargs, output index or None)``."""
    for op, rest, kwargs, index in chain:
        base = op(base, *rest, **kwargs)
        if index is not None:
            base = base[index]
    return base


def is_differentiable(t) -> bool:
    """Whether ``t`` is a tensor that can carry a derivative."""
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def any_differentiable(out) -> bool:
    """Whether an op's output (a tensor, or a tuple/list of them) has one
    that can carry a derivative."""
    if isinstance(out, torch.Tensor):
        return is_differentiable(out)
    if type(out) is tuple or type(out) is list:
        return any(is_differentiable(o) for o in out)
    return False


def ready_for_write(zeros, value):
    """``zeros`` (fresh), made ready to take ``value`` in place in a view of
    it.  A fresh tensor belongs to no outer transform, while ``value`` (a
    tangent or cotangent) may be batched by an outer vmap, and a batched
    write into an unbatched tensor is an error: so the zeros take on every
    level ``value`` has, through a zero scalar derived from it."""
    if isinstance(value, Tracer):
        zeros = zeros + torch.zeros_like(value.reshape(-1)[:1]).sum()
    return zeros


def schema_bindings(op, rule, special: tuple[str, ...]):
    """For each parameter of ``rule`` that names an argument of ``op``'s
    schema: ``(name, position or None for keyword-only, default)``.
    Parameters in ``special`` are supplied by the transform itself."""
    schema_args = {a.name: (i, a) for i, a in enumerate(op._schema.arguments)}
    bindings = []
    for name in inspect.signature(rule).parameters:
        if name in special:
            continue
        if name not in schema_args:
            raise TypeError(
                f"rule {rule.__qualname__} for {op} names `{name}`, which is not an argument of "
                f"{op._schema}; rules may name schema arguments and {', '.join(special)}"
            )
        position, arg = schema_args[name]
        default = arg.default_value if arg.has_default_value() else None
        bindings.append((name, None if arg.kwarg_only else position, default))
    return tuple(bindings)


def bound_value(position, name, default, primals, kwargs):
    """The forward value of one schema argument (trailing defaulted
    positional arguments may be missing at dispatch)."""
    if position is not None and position < len(primals):
        return primals[position]
    return kwargs.get(name, default)


class below:
    """Run Python code (not one op: see :func:`lower`) one level below
    ``interp``: its ops go to the levels beneath (see NOTE [Ceiling])."""

    def __init__(self, interp) -> None:
        self.level = interp.floor

    def __enter__(self):
        self.saved = STATE.ceiling
        STATE.ceiling = self.level

    def __exit__(self, *exc):
        STATE.ceiling = self.saved


def write_into_captured(interp, op, target, primals, kwargs):
    """An in-place op whose target the level does not own (captured from
    outside the transform): fine for an integer tensor, which carries no
    derivative; otherwise torch.func's error."""
    if isinstance(target, torch.Tensor) and not is_differentiable(target):
        lower(interp, op, primals, kwargs)
        return target
    raise RuntimeError(
        f"During a grad (vjp, jvp, grad, etc) transform, the function provided attempted to "
        f"call in-place operation ({op}) that would mutate a captured Tensor. This is not "
        f"supported; please rewrite the function being transformed to explicitly accept the "
        f"mutated Tensor(s) as inputs."
    )


def lower(interp, op, primals, kwargs, call=None, random=None):
    """Run ``op`` on values one level below ``interp`` (see NOTE [Ceiling]),
    with the dispatch keys a rule needs (NOTE [Autograd inside rules]).

    ``call``: the op's C++ entry point (``op._op``), and ``random``: whether
    it is a random op, when the caller has them."""
    # One scan, doing ``bind``'s work too: the highest level among the
    # tracers of lower levels (``top``), and whether a plain value needs the
    # dispatch keys restored.
    needs_keys = False
    top = None
    top_level = 0
    for v in primals:
        if isinstance(v, Tensor):
            if isinstance(v, Tracer):
                level = v._interp.level
                if level > top_level:
                    top, top_level = v._interp, level
            elif v.requires_grad:
                needs_keys = True
            if v.is_complex() or v.is_neg():
                needs_keys = True
        elif type(v) is list or type(v) is tuple:
            for w in v:
                if isinstance(w, Tensor):
                    if isinstance(w, Tracer):
                        level = w._interp.level
                        if level > top_level:
                            top, top_level = w._interp, level
                    elif w.requires_grad:
                        needs_keys = True
                    if w.is_complex() or w.is_neg():
                        needs_keys = True
    if kwargs:
        for v in kwargs.values():
            if isinstance(v, Tracer):
                level = v._interp.level
                if level > top_level:
                    top, top_level = v._interp, level
    if random is None:
        random = is_random_op(op)
    if top is None and not random and not _len_dispatch_modes():
        # What ``bind`` does with plain values below a ceiling: run the op.
        # (Only with no dispatch mode active: otherwise the op would reach the
        # mode, and ``bind`` again, where the ceiling matters.)
        if call is None:
            call = op
        if needs_keys:
            with dispatch_keys_restored():
                return call(*primals, **kwargs)
        return call(*primals, **kwargs)
    state = STATE
    saved_ceiling = state.ceiling
    state.ceiling = interp.floor
    try:
        if top is not None and not random and top.alive:
            # What ``bind`` does then: hand the op to that level.
            if needs_keys:
                with dispatch_keys_restored():
                    return top.process(op, primals, kwargs)
            return top.process(op, primals, kwargs)
        if needs_keys:
            with dispatch_keys_restored():
                return bind(op, primals, kwargs)
        return bind(op, primals, kwargs)
    finally:
        state.ceiling = saved_ceiling
