"""Forward-mode AD: jvp and linearize, as an interpreter over ATen ops.

Inside ``jvp(f, primals, tangents)`` every tensor the function sees or
creates is a :class:`DualTensor`: its primal value (of the level below) and
its tangent (None: zero).  Each ATen op on one reaches
:meth:`JvpInterpreter.process`, which computes the primal one level down and
the output tangent from the op's JVP rule.  JVP rules, in order of
preference: a rule registered for the op (elementwise ops get theirs from
the same partial derivatives as their VJPs; linear ops apply themselves to
the tangents); the op's decomposition; else the op's VJP rule transposed
(see NOTE [JVP from a VJP]), so every op with a VJP rule has a JVP.

NOTE [Tangents of views]
A view's tangent is the same view of its root's tangent, derived lazily
(the root may get a tangent only later, when a tracked value is written
into one of its views).  Writes never go into a tangent in place (a tangent
may be an expanded or otherwise unwritable view): an in-place op on a root
replaces its tangent; one on a view replaces the root's tangent by a copy
with the view's region overwritten.  Either way the root's tangent epoch
moves on and its views re-derive their tangents when next used.

NOTE [Tangent layout]
A root's tangent is kept in its primal's memory layout when the primal is
dense (as torch's forward AD does): view ops read strides (``view`` decides
whether it can alias, ``as_strided`` addresses storage), and the tangent of
a view is the same view op applied to the root's tangent, so a tangent laid
out differently would fail or, for ``as_strided``, give wrong numbers.

NOTE [JVP from a VJP]
A VJP rule computes u -> J^T u, linear in u.  For an op without a JVP rule,
its JVP J t is the gradient with respect to u of <J^T u, t>: the VJP rule
runs once on a tracked u at a temporary reverse-mode level, and one
backward pass through that gives J t.  Exact, general and slower (two rule
evaluations); ops that matter get a JVP rule of their own.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from .._core.dispatch import dispatch_keys_restored, needs_dispatch_keys
from .._core.errors import MissingRuleError
from .._core.pytree import flatten as tree_flatten
from .._core.pytree import unflatten as tree_unflatten
from .._core.interpreter import Interpreter, interpreting
from .._core.registry import JVP_RULES, NONDIFFERENTIABLE, VJP_RULES, on_rules_changed
from .._core.schema import is_view_op, metadata_inplace_counterpart, mutates_self
from .._core.tracer import Tracer, apply_metadata_op, new_tracer
from ._autodiff import (
    any_differentiable,
    bound_value,
    is_differentiable,
    lower,
    ready_for_write,
    replay_view,
    schema_bindings,
    write_into_captured,
)

Tensor = torch.Tensor
aten = torch.ops.aten


# --------------------------------------------------------------------------
# DualTensor
# --------------------------------------------------------------------------


class ForwardView:
    """How a view DualTensor derives from its root.  See NOTE [Tangents of views]."""

    __slots__ = ("root", "chain", "epoch")

    def __init__(self, root, chain, epoch) -> None:
        self.root = root
        self.chain = chain
        self.epoch = epoch  # the root's tangent epoch this view's tangent was derived at


class DualTensor(Tracer):
    """A value tracked by one forward-mode level: ``_primal`` (of the level
    below), ``_tangent`` (None: zero), ``_view`` (a :class:`ForwardView` for
    views) and ``_epoch`` (a one-element list a root shares with its views)."""

    # Slots: faster to set and read than the instance dict (every op
    # makes one tracer and reads several of these).
    __slots__ = ("_primal", "_interp", "_tangent", "_view", "_epoch")

    _primal: Tensor
    _tangent: Any
    _view: ForwardView | None
    _epoch: list

    def _payload_repr(self) -> str:
        return f"value=\n{self._primal!r},\ntangent=\n{self._tangent!r}"

    def _dead_value(self):
        return self._primal

    def _underlying(self):
        return self._primal


def make_dual(primal, interp, tangent=None, view=None, epoch=None) -> DualTensor:
    t = new_tracer(DualTensor, interp, primal, primal.shape, primal.stride(), primal.layout)
    t._primal = primal
    t._tangent = tangent
    t._view = view
    t._epoch = epoch if epoch is not None else [0]
    return t


def in_layout_of(primal, tangent):
    """``tangent`` with ``primal``'s strides (a copy if it had others), when
    ``primal`` is dense.  See NOTE [Tangent layout]."""
    strides = primal.stride()
    if tangent.stride() == strides or primal.dim() < 2:
        return tangent
    order = sorted(range(primal.dim()), key=lambda d: -strides[d])  # outermost dim first
    expected = 1
    for d in reversed(order):  # dense: each stride is the size of what lies inside it
        size = primal.shape[d]
        if size != 1 and strides[d] != expected:
            return tangent  # overlapping or with gaps (expanded, sliced): no layout to copy
        expected *= size
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return tangent.permute(order).contiguous().permute(inverse)


def tangent_of(x: DualTensor):
    """``x``'s tangent, re-derived from its root if the root's changed."""
    view = x._view
    if view is None:
        return x._tangent
    root = view.root
    if view.epoch != root._epoch[0]:
        x._tangent = None if root._tangent is None else replay_view(view.chain, root._tangent)
        view.epoch = root._epoch[0]
    return x._tangent


# --------------------------------------------------------------------------
# Per-op plans
# --------------------------------------------------------------------------

_JVP_SPECIAL = ("tangents", "result", "op")


class _JvpPlan:
    """What a JVP rule wants, read off its signature once.  A rule is either
    *raw* (``rule(op, primals, tangents, kwargs, result)``, for generic
    rules) or names what it needs: schema arguments (primals), ``<name>_t``
    (that argument's tangent, None for zero), ``tangents`` (all of them, by
    position), ``result`` and ``op``."""

    __slots__ = ("rule", "raw", "bindings", "tangent_bindings", "wants_tangents", "wants_result", "wants_op",
                 "wants_self_before")

    def __init__(self, op, rule) -> None:
        self.rule = rule
        self.raw = getattr(rule, "raw_jvp", False)
        if self.raw:
            self.bindings = self.tangent_bindings = ()
            self.wants_tangents = self.wants_result = self.wants_op = False
            self.wants_self_before = mutates_self(op)
            return
        params = inspect.signature(rule).parameters
        positions = {a.name: i for i, a in enumerate(op._schema.arguments) if not a.kwarg_only}
        tangent_params = tuple(p for p in params if p.endswith("_t") and p[:-2] in positions)
        self.tangent_bindings = tuple((p, positions[p[:-2]]) for p in tangent_params)
        self.bindings = schema_bindings(op, rule, _JVP_SPECIAL + tangent_params)
        self.wants_tangents = "tangents" in params
        self.wants_result = "result" in params
        self.wants_op = "op" in params
        self.wants_self_before = mutates_self(op) and any(b[1] == 0 for b in self.bindings)

    def __call__(self, op, primals, tangents, kwargs, result):
        if self.raw:
            return self.rule(op, primals, tangents, kwargs, result)
        call = {name: bound_value(pos, name, default, primals, kwargs) for name, pos, default in self.bindings}
        for name, position in self.tangent_bindings:
            call[name] = tangents[position] if position < len(tangents) else None
        if self.wants_tangents:
            call["tangents"] = tangents
        if self.wants_result:
            call["result"] = result
        if self.wants_op:
            call["op"] = op
        return self.rule(**call)


_PLANS: dict[int, tuple] = {}


def _plan(op):
    rule_op = op
    counterpart = metadata_inplace_counterpart(op)
    if counterpart is not None:
        rule_op = counterpart
    rule = JVP_RULES.get(rule_op)
    returns = op._schema.returns
    plan = (
        _JvpPlan(rule_op, rule) if rule is not None else None,
        mutates_self(op),
        counterpart,
        is_view_op(op),
        op in NONDIFFERENTIABLE and rule is None and op not in VJP_RULES,
        bool(returns) and str(returns[0].type).startswith("List"),
        rule_op if rule_op in VJP_RULES else None,
        getattr(op, "_op", op),  # the C++ entry point
    )
    _PLANS[id(op)] = plan
    return plan




on_rules_changed(_PLANS.clear)




# --------------------------------------------------------------------------
# The interpreter
# --------------------------------------------------------------------------


class JvpInterpreter(Interpreter):
    """The interpreter of one jvp level."""

    __slots__ = ()
    name = "jvp"
    claims_untracked = True  # tensors created inside the transform belong to it

    def process(self, op, args, kwargs):
        plan = _PLANS.get(id(op))
        if plan is None:
            plan = _plan(op)
        jvp_plan, inplace, metadata_counterpart, is_view, nondiff, returns_list, vjp_op, call = plan

        primals = list(args)
        tangents = [None] * len(args)
        own = any_tangent = False
        i = -1
        for a in args:
            i += 1
            if type(a) is DualTensor and a._interp is self:
                own = True
                primals[i] = a._primal
                t = tangents[i] = a._tangent if a._view is None else tangent_of(a)
                if t is not None:
                    any_tangent = True
            elif type(a) is list or type(a) is tuple:
                if any(type(b) is DualTensor and b._interp is self for b in a):
                    own = True
                    primals[i] = [b._primal if type(b) is DualTensor and b._interp is self else b for b in a]
                    ts = [tangent_of(b) if type(b) is DualTensor and b._interp is self else None for b in a]
                    if any(t is not None for t in ts):
                        tangents[i] = ts
                        any_tangent = True
        if kwargs:
            kwargs, kwarg_tangent = self._unwrap_kwargs(op, kwargs)
            if kwarg_tangent:
                raise RuntimeError(
                    f"jvp: the keyword argument(s) {', '.join(kwarg_tangent)} of {op} carry tangents; "
                    f"forward-mode rules take tangents of positional arguments only. Pass a tensor "
                    f"without a tangent (e.g. .detach()) there."
                )

        if not own:  # an untracked op claimed at user level: its outputs are constants here
            out = lower(self, op, primals, kwargs)
            return args[0] if inplace else self._wrap_outputs(op, args, kwargs, out, None, False, returns_list)
        if inplace and not (type(args[0]) is DualTensor and args[0]._interp is self):
            return write_into_captured(self, op, args[0], primals, kwargs)
        need = any_tangent and not nondiff
        if need and jvp_plan is None:
            out = self.decompose(op, args, kwargs)
            if out is not NotImplemented:
                return out
            if vjp_op is None:
                out = lower(self, metadata_counterpart or op, primals, kwargs)
                if not any_differentiable(out):
                    return self._wrap_outputs(op, args, kwargs, out, None, is_view, returns_list)
                raise MissingRuleError(
                    f"jvp: there is no JVP rule (nor VJP rule to derive one from) for {op}, and its "
                    f"inputs carry tangents. Register one with torchxform.register_jvp "
                    f"(see torchxform/rules/ for examples), or pass inputs without tangents there.",
                    op,
                    "jvp",
                )

        rule_primals = primals
        if need and inplace and (jvp_plan is None or jvp_plan.wants_self_before):
            rule_primals = list(primals)
            rule_primals[0] = lower(self, aten.clone.default, (primals[0],), {})  # the input before it is overwritten
        if metadata_counterpart is None:
            out = lower(self, op, primals, kwargs, call)
        else:
            out = lower(self, metadata_counterpart, primals, kwargs)
        out_tangent = None
        if need:
            rule_op = metadata_counterpart or op
            # The rule runs here, inside a dispatch handler: it needs the keys
            # restored for autograd interop and lazy conj views.  See NOTE
            # [Autograd inside rules].
            if needs_dispatch_keys(rule_primals) or needs_dispatch_keys(tangents):
                with dispatch_keys_restored():
                    out_tangent = self._run_rule(jvp_plan, rule_op, vjp_op, rule_primals, tangents, kwargs, out)
            elif jvp_plan is not None:
                out_tangent = jvp_plan(rule_op, rule_primals, tangents, kwargs, out)
            else:
                out_tangent = jvp_from_vjp(self, vjp_op, rule_primals, tangents, kwargs, out)

        if metadata_counterpart is not None:
            return self._finish_metadata_inplace(op, args, kwargs, out, out_tangent)
        if inplace:
            return self._finish_inplace(args[0], out_tangent, need)
        if not is_view and isinstance(out, Tensor):  # the common case of _wrap_outputs
            if not (out.is_floating_point() or out.is_complex()):
                return out  # See NOTE [Integer tensors stay plain] in reverse.py
            return make_dual(out, self, out_tangent if out_tangent is None else in_layout_of(out, out_tangent))
        return self._wrap_outputs(op, args, kwargs, out, out_tangent, is_view, returns_list)

    def _run_rule(self, jvp_plan, rule_op, vjp_op, primals, tangents, kwargs, out):
        if jvp_plan is not None:
            return jvp_plan(rule_op, primals, tangents, kwargs, out)
        return jvp_from_vjp(self, vjp_op, primals, tangents, kwargs, out)

    def _unwrap_kwargs(self, op, kwargs):
        unwrapped, carrying = {}, []
        for name, value in kwargs.items():
            if type(value) is DualTensor and value._interp is self:
                if name == "out":
                    raise RuntimeError(
                        f"jvp: {op} writes into an `out=` tensor that this transform tracks; out= variants "
                        f"are not supported under jvp. Use the functional form instead."
                    )
                if tangent_of(value) is not None:
                    carrying.append(name)
                value = value._primal
            unwrapped[name] = value
        return unwrapped, carrying

    # -- outputs -----------------------------------------------------------

    def _wrap_outputs(self, op, args, kwargs, out, tangent, is_view, returns_list):
        if isinstance(out, Tensor):
            return self._wrap_one(op, args, kwargs, out, tangent, is_view, None)
        if type(out) is tuple or type(out) is list:
            tangents = tangent if tangent is not None else (None,) * len(out)
            if returns_list:
                return [self._wrap_one(op, args, kwargs, o, t, is_view, i) for i, (o, t) in enumerate(zip(out, tangents))]
            return type(out)(
                self._wrap_one(op, args, kwargs, o, t, False, None) if isinstance(o, Tensor) else o
                for o, t in zip(out, tangents)
            )
        return out

    def _wrap_one(self, op, args, kwargs, value, tangent, is_view, view_index):
        if not is_differentiable(value):
            return value  # See NOTE [Integer tensors stay plain] in reverse.py
        if is_view and type(args[0]) is DualTensor and args[0]._interp is self:
            base = args[0]
            view = base._view
            root = view.root if view is not None else base
            link = (op, tuple(args[1:]), kwargs, view_index)
            chain = (view.chain if view is not None else ()) + (link,)
            return make_dual(value, self, tangent, ForwardView(root, chain, root._epoch[0]), root._epoch)
        return make_dual(value, self, tangent if tangent is None else in_layout_of(value, tangent))

    def _finish_inplace(self, target, new_tangent, need):
        """See NOTE [Tangents of views]."""
        view = target._view
        if view is None:
            if need or target._tangent is not None:
                target._tangent = new_tangent if new_tangent is None else in_layout_of(target._primal, new_tangent)
                target._epoch[0] += 1
            return target
        root = view.root
        if new_tangent is None and root._tangent is None:
            return target
        base = root._tangent.clone() if root._tangent is not None else ready_for_write(torch.zeros_like(root._primal), new_tangent)
        region = replay_view(view.chain, base)
        if new_tangent is None:
            region.zero_()
        else:
            region.copy_(new_tangent)
        root._tangent = base
        root._epoch[0] += 1
        return target

    def _finish_metadata_inplace(self, op, args, kwargs, new_primal, new_tangent):
        """``squeeze_``, ``t_``, ...: new metadata for the wrapper, then the
        new view's value and tangent."""
        target = args[0]
        apply_metadata_op(op, args, kwargs)
        target._primal = new_primal
        target._tangent = new_tangent
        view = target._view
        if view is None:
            target._epoch[0] += 1
        else:
            link = (metadata_inplace_counterpart(op), tuple(args[1:]), kwargs, None)
            target._view = ForwardView(view.root, view.chain + (link,), view.root._epoch[0])
        return target


# --------------------------------------------------------------------------
# NOTE [JVP from a VJP]
# --------------------------------------------------------------------------


def jvp_from_vjp(interp, op, primals, tangents, kwargs, out):
    """The JVP of ``op`` derived from its VJP rule."""
    from .reverse import GradInterpreter, GradTensor, Leaf, _meta, _RulePlan, make_grad_tensor, run_backward

    outputs = list(out) if type(out) in (tuple, list) else [out]
    if any(isinstance(o, Tensor) and o.is_complex() for o in outputs) or any(
        isinstance(t, Tensor) and t.is_complex() for t in _flat(tangents)
    ):
        raise RuntimeError(
            f"jvp: {op} has no JVP rule, and deriving one from its VJP rule is only done for real "
            f"dtypes. Register a JVP rule for it (torchxform._core.registry.register_jvp)."
        )
    vjp_plan = _RulePlan(op, VJP_RULES[op])
    leaves = [Leaf() if is_differentiable(o) else None for o in outputs]
    zeros = [torch.zeros_like(o) if leaf is not None else None for o, leaf in zip(outputs, leaves)]
    with interpreting(GradInterpreter()) as level:
        seeds = [make_grad_tensor(z, level, leaf, 0) if leaf is not None else None for z, leaf in zip(zeros, leaves)]
        call = {name: bound_value(pos, name, default, primals, kwargs) for name, pos, default in vjp_plan.bindings}
        if vjp_plan.wants_result:
            call["result"] = out
        if vjp_plan.wants_needs:
            call["needs"] = tuple(
                (tuple(x is not None for x in t) if type(t) is list else t is not None) for t in tangents
            )
        if vjp_plan.wants_inputs_meta:
            call["inputs_meta"] = tuple(_meta(p) for p in primals)
        if vjp_plan.wants_op:
            call["op"] = op
        grad = tuple(seeds) if type(out) in (tuple, list) else seeds[0]
        cotangents = vjp_plan.rule(grad=grad, **call)
        total = None
        for c, t in zip(cotangents, tangents):
            for ci, ti in zip(c if type(c) in (list, tuple) else [c], t if type(t) is list else [t]):
                if ci is None or ti is None:
                    continue
                term = (ci * ti).sum()
                total = term if total is None else total + term
        tracked = type(total) is GradTensor and total._interp is level and total._node is not None
        root = (total._node, total._index) if tracked else None
        value = total._primal if tracked else None
    if root is None:
        return _zero_tangents(out)
    with dispatch_keys_restored():  # backward runs here, inside a dispatch handler
        collected = run_backward([(root[0], root[1], torch.ones_like(value))])
    result = [collected.get(leaf) if leaf is not None else None for leaf in leaves]
    result = [torch.zeros_like(o) if r is None and leaf is not None else r for r, o, leaf in zip(result, outputs, leaves)]
    return tuple(result) if type(out) in (tuple, list) else result[0]


def _flat(tangents):
    for t in tangents:
        if type(t) is list:
            yield from t
        else:
            yield t


def _zero_tangents(out):
    if type(out) in (tuple, list):
        return tuple(torch.zeros_like(o) if is_differentiable(o) else None for o in out)
    return torch.zeros_like(out)


# --------------------------------------------------------------------------
# The public API (torch.func's contract)
# --------------------------------------------------------------------------


def _check_tuple_of_tensors(value, api, name):
    if not isinstance(value, tuple):
        raise RuntimeError(f"{api}: Expected {name} to be a tuple. E.g. it should be valid to call f(*{name}).")
    flat, _ = tree_flatten(value)
    if len(flat) == 0:
        raise RuntimeError(f"{api}: Expected {name} to contain at least one Tensor.")
    for leaf in flat:
        if not isinstance(leaf, Tensor):
            raise RuntimeError(f"{api}: Expected {name} to only contain Tensors, got {type(leaf)}")
    return flat


_JVP_API = "jvp(f, primals, tangents)"


def _unwrap_dual(value, interp):
    if type(value) is DualTensor and value._interp is interp:
        return value._primal
    return value


def jvp(func: Callable, primals: Any, tangents: Any, *, strict: bool = False, has_aux: bool = False):
    """Standing for the Jacobian-vector product, returns a tuple containing
    the output of ``func(*primals)`` and the "Jacobian of ``func`` evaluated
    at ``primals``" times ``tangents``. This is also known as forward-mode
    autodiff.

    Args:
        func (function): A Python function that takes one or more arguments,
            one of which must be a Tensor, and returns one or more Tensors.
        primals (Tensors): Positional arguments to ``func`` that must all be
            Tensors (or pytrees of Tensors). The returned function will also
            be computing the derivative with respect to these arguments.
        tangents (Tensors): The "vector" for which the Jacobian-vector
            product is computed. Must be the same structure and sizes as the
            inputs to ``func``.
        strict (bool): accepted for torch.func compatibility (which raises
            NotImplementedError for True); here True is also unsupported.
        has_aux (bool): Flag indicating that ``func`` returns a
            ``(output, aux)`` tuple where the first element is the output of
            the function to be differentiated and the second element is
            other auxiliary objects that will not be differentiated.
            Default: False.

    Returns:
        ``(output, jvp_out)`` (and ``aux`` with ``has_aux``): the outputs of
        ``func`` and their tangents, with the outputs' structure.

    Example::

        >>> import torch
        >>> from torchxform import jvp
        >>> x = torch.randn(5)
        >>> out, tangent = jvp(torch.sin, (x,), (torch.ones(5),))
        >>> torch.allclose(tangent, x.cos())
        True
    """
    if strict:
        raise RuntimeError("jvp(f, primals, tangents, strict=True): strict=True is not supported (as in torch.func)")
    flat_primals = _check_tuple_of_tensors(primals, _JVP_API, "primals")
    flat_tangents = _check_tuple_of_tensors(tangents, _JVP_API, "tangents")
    primals_spec = tree_flatten(primals)[1]
    tangents_spec = tree_flatten(tangents)[1]
    if primals_spec != tangents_spec:
        raise RuntimeError(
            f"{_JVP_API}: Expected primals and tangents to have the same python structure. For example, if "
            f"primals is a tuple of 3 tensors, tangents also must be. Got primals with structure "
            f"{primals_spec} and tangents with structure {tangents_spec}"
        )
    for p, t in zip(flat_primals, flat_tangents):
        if p.shape != t.shape:
            raise RuntimeError(
                f"{_JVP_API}: Expected primals and tangents to have the same shape: got a primal of shape "
                f"{tuple(p.shape)} with a tangent of shape {tuple(t.shape)}"
            )
        if p.dtype != t.dtype:
            raise RuntimeError(
                f"{_JVP_API}: Expected primals and tangents to have the same dtype: got a primal of dtype "
                f"{p.dtype} with a tangent of dtype {t.dtype}"
            )
    return jvp_with_argnums(func, primals, tangents, None, has_aux)


def jvp_with_argnums(func: Callable, args: tuple, tangents: Any, argnums, has_aux: bool):
    """jvp where ``tangents`` go with the arguments at ``argnums`` (None: all
    of them, structure for structure); the other tensors are constants of
    the level.  Errors read as jvp's (jacfwd is built on this)."""
    from .reverse import _check_argnums

    if argnums is None:
        chosen = tuple(range(len(args)))
        tangent_args = tangents
    else:
        positions = _check_argnums(argnums, len(args))
        chosen = (positions,) if isinstance(positions, int) else positions
        tangent_args = (tangents,) if isinstance(positions, int) else tangents
    # Laid out before the level exists, so that these are ops of the level below.
    flat_tangents = {
        i: [in_layout_of(p, t) for p, t in zip(tree_flatten(args[i])[0], tree_flatten(tangent_args[chosen.index(i)])[0])]
        for i in chosen
    }
    with interpreting(JvpInterpreter()) as interp:
        wrapped = list(args)
        for i in range(len(args)):
            flat, spec = tree_flatten(args[i])
            if i in chosen:
                flat = [make_dual(p, interp, t) for p, t in zip(flat, flat_tangents[i])]
            else:
                flat = [make_dual(p, interp) if isinstance(p, Tensor) else p for p in flat]
            wrapped[i] = tree_unflatten(flat, spec)
        outputs = func(*wrapped)
        aux = None
        if has_aux:
            if not (isinstance(outputs, tuple) and len(outputs) == 2):
                raise RuntimeError(f"{_JVP_API}: output of function f should be a tuple: (output, aux) if has_aux is True")
            outputs, aux = outputs
            flat_aux, aux_spec = tree_flatten(aux)
            aux = tree_unflatten([_unwrap_dual(a, interp) for a in flat_aux], aux_spec)
        flat_outputs, output_spec = tree_flatten(outputs)
        for o in flat_outputs:
            if not isinstance(o, Tensor):
                raise RuntimeError(
                    f"{_JVP_API}: Expected f(*primals) to return only tensors, got unsupported type {type(o)}"
                )
        primals_out = [_unwrap_dual(o, interp) for o in flat_outputs]
        tangents_out = [
            tangent_of(o) if type(o) is DualTensor and o._interp is interp else None for o in flat_outputs
        ]
    # Zero tangents are made after the level is gone: inside it, a new tensor
    # would belong to it.
    primal_outs = tree_unflatten(primals_out, output_spec)
    tangent_outs = tree_unflatten(
        [torch.zeros_like(p) if t is None else t for p, t in zip(primals_out, tangents_out)], output_spec
    )
    if has_aux:
        return primal_outs, tangent_outs, aux
    return primal_outs, tangent_outs


__all__ = ["jvp", "jvp_with_argnums", "JvpInterpreter", "DualTensor", "make_dual", "tangent_of", "jvp_from_vjp"]
