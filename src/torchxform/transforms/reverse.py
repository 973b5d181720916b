"""Reverse-mode AD: grad, grad_and_value and vjp, as an interpreter over ATen ops.

Inside a reverse-mode transform every tensor the function sees or creates
is a :class:`GradTensor`: its primal value (of the level below) plus the
node of the tape that produced it (None for constants).  Each ATen op on
one reaches :meth:`GradInterpreter.process`, which computes the primal
result one level down and, when a tracked input is involved, records a
node holding the op's VJP rule and exactly the values the rule names.
Backward runs the rules in reverse creation order; they are ordinary torch
ops on values of the levels below, so gradients are themselves
differentiable and batchable (``grad(grad(f))``, ``vmap(grad(f))``).

NOTE [In-place ops and views under grad]
A GradTensor is a variable: an in-place op records a node and rebinds the
tensor to it.  Views know their root base and how to replay the view ops
on another tensor.  Writing into a view rebinds the base to "old base with
the view region replaced" (a scatter node, written with the same replayed
view ops), and bumps a version counter the base shares with all its views;
a view whose base changed since its node was made is refreshed (its node
becomes the replayed view of the base's node) when next used.  Saved
values are version-checked at backward, as torch.autograd does.

NOTE [Integer tensors stay plain]
Outputs of integer or bool dtype are never wrapped: they cannot carry a
derivative, and C++ composites (pad_packed_sequence's batch_sizes, ...)
read such tensors' data directly, which a storage-less wrapper cannot give.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from heapq import heappop, heappush
from typing import Any, Callable

import torch

from .._core.dispatch import call_on_tracers, is_random_op
from .._core.errors import MissingRuleError
from .._core.pytree import flatten as tree_flatten
from .._core.pytree import unflatten as tree_unflatten
from .._core.interpreter import Interpreter, interpreting
from .._core.registry import NONDIFFERENTIABLE, VJP_RULES, on_rules_changed
from .._core.schema import is_view_op, metadata_inplace_counterpart, mutates_self
from .._core.tracer import Tracer, apply_metadata_op, new_tracer
from ._autodiff import (
    any_differentiable,
    is_differentiable,
    lower,
    ready_for_write,
    replay_view,
    schema_bindings,
    write_into_captured,
)

Tensor = torch.Tensor
_set_grad_enabled = torch._C._set_grad_enabled
_is_grad_enabled = torch._C.is_grad_enabled
_sequence = itertools.count()


# --------------------------------------------------------------------------
# The tape
# --------------------------------------------------------------------------


class Leaf:
    """Where the cotangent of one differentiated input is collected."""

    __slots__ = ("seq",)
    n_outputs = 1
    edges = ()

    def __init__(self) -> None:
        self.seq = next(_sequence)


class Node:
    """One recorded op.  ``pullback(cotangents)`` maps the cotangents of
    the outputs (a tuple, None for absent ones) to one cotangent per entry
    of ``edges`` (each an ``(node, output_index)`` pair or None).  ``name``:
    the op (or a description), for error messages."""

    __slots__ = ("pullback", "edges", "seq", "n_outputs", "checks", "name")

    def __init__(self, pullback, edges, n_outputs, checks=(), name="") -> None:
        self.pullback = pullback
        self.edges = edges
        self.n_outputs = n_outputs
        self.checks = checks
        self.name = name
        self.seq = next(_sequence)


def _check_saved(node: Node) -> None:
    # Each check: (version holder, expected version, description); the
    # description is a tensor's (shape, dtype), a tensor of that shape and
    # dtype, or a string, formatted only on error (the checks are made per op).
    for holder, expected, what in node.checks:
        current = holder[0] if type(holder) is list else holder._version
        if current != expected:
            if isinstance(what, Tensor):
                what = (what.shape, what.dtype)
            if type(what) is tuple:
                what = f"{tuple(what[0])} {what[1]}"
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: [{what}], which is needed by {node.name}, is at version "
                f"{current}; expected version {expected} instead. Avoid modifying in place a tensor "
                f"that an earlier operation still needs (clone it first)."
            )


def _add(a, b):
    """``a + b`` for two cotangents."""
    if isinstance(a, Tracer) or isinstance(b, Tracer):
        return call_on_tracers(_ADD, (a, b))
    return a + b


_ADD = torch.ops.aten.add.Tensor
_ONES_LIKE = torch.ops.aten.ones_like.default


def _ones_like(value):
    """``torch.ones_like(value)``: the cotangent backward starts from."""
    if isinstance(value, Tracer):
        return call_on_tracers(_ONES_LIKE, (value,), {"pin_memory": False})  # as torch.ones_like passes it on
    return torch.ones_like(value)


def _accumulate(slot: list, index: int, cotangent) -> None:
    previous = slot[index]
    slot[index] = cotangent if previous is None else _add(previous, cotangent)


def run_backward(roots) -> dict:
    """Propagate cotangents from ``roots`` (``(node, index, cotangent)``)
    to every reachable node; returns ``{leaf: cotangent}``.

    Nodes run in reverse creation order (a node's inputs were made before
    it): a heap keyed by ``-seq`` holds the nodes that have received a
    cotangent and not yet run, so nodes that receive none are never visited."""
    cotangents: dict[int, list] = {}
    pending: list = []  # heap of (-seq, id, node)
    for node, index, cotangent in roots:
        if cotangent is not None:
            slot = cotangents.get(id(node))
            if slot is None:
                slot = cotangents[id(node)] = [None] * node.n_outputs
                heappush(pending, (-node.seq, id(node), node))
            _accumulate(slot, index, cotangent)
    leaves = {}
    while pending:
        node = heappop(pending)[2]
        slot = cotangents.pop(id(node))
        if type(node) is Leaf:
            leaves[node] = slot[0]
            continue
        if node.checks:
            _check_saved(node)
        inputs = node.pullback(tuple(slot))
        for edge, cotangent in zip(node.edges, inputs):
            if edge is None or cotangent is None:
                continue
            parent, index = edge
            slot = cotangents.get(id(parent))
            if slot is None:
                slot = cotangents[id(parent)] = [None] * parent.n_outputs
                heappush(pending, (-parent.seq, id(parent), parent))
            previous = slot[index]
            slot[index] = cotangent if previous is None else _add(previous, cotangent)
    return leaves


# --------------------------------------------------------------------------
# GradTensor
# --------------------------------------------------------------------------


class ViewInfo:
    """How a view GradTensor derives from its root base.  See NOTE [In-place
    ops and views under grad]."""

    __slots__ = ("root", "chain", "seen")

    def __init__(self, root, chain, seen) -> None:
        self.root = root  # the GradTensor at the root of the view chain
        self.chain = chain  # ((op, args after self, kwargs, output index or None), ...)
        self.seen = seen  # root's version when this view's node was made


class GradTensor(Tracer):
    """A value tracked by one reverse-mode level.

    ``_primal``: the value (of the level below); ``_node``/``_index``: the
    tape node and output that produced it (``_node`` None: a constant);
    ``_counter``: a one-element version list shared with its views;
    ``_view``: a :class:`ViewInfo` for views, else None.
    """

    # Slots: faster to set and read than the instance dict (every op
    # makes one tracer and reads several of these).
    __slots__ = ("_primal", "_interp", "_node", "_index", "_counter", "_view")

    _primal: Tensor
    _node: Any
    _index: int
    _counter: list
    _view: ViewInfo | None

    def _payload_repr(self) -> str:
        kind = "constant" if self._node is None else f"node={type(self._node).__name__}#{self._node.seq}"
        return f"{kind}, value=\n{self._primal!r}"

    def _dead_value(self):
        return self._primal

    def _underlying(self):
        return self._primal


def make_grad_tensor(primal, interp, node=None, index=0, counter=None, view=None) -> GradTensor:
    t = new_tracer(GradTensor, interp, primal, primal.shape, primal.stride(), primal.layout)
    t._primal = primal
    t._node = node
    t._index = index
    t._counter = counter if counter is not None else [0]
    t._view = view
    return t


def _meta(value):
    """``(shape, dtype, device)`` of a tensor argument (a tuple of them for a
    Tensor[] argument), else None: what VJP rules need to shape gradients
    without keeping the input alive."""
    if isinstance(value, Tensor):
        return (value.shape, value.dtype, value.device)
    if type(value) is list or type(value) is tuple:
        return tuple(_meta(v) for v in value)
    return None






# --------------------------------------------------------------------------
# Per-op plans: which values a VJP rule needs, read off its signature once
# --------------------------------------------------------------------------


_VJP_SPECIAL = ("grad", "result", "needs", "op", "inputs_meta", "kwarg_needs")


class _RulePlan:
    __slots__ = (
        "rule",
        "bindings",
        "wants_result",
        "wants_needs",
        "wants_op",
        "wants_inputs_meta",
        "wants_kwarg_needs",
        "wants_self_before",
    )

    def __init__(self, op, rule) -> None:
        self.rule = rule
        params = inspect.signature(rule).parameters
        self.bindings = schema_bindings(op, rule, _VJP_SPECIAL)
        self.wants_result = "result" in params
        self.wants_needs = "needs" in params
        self.wants_op = "op" in params
        self.wants_inputs_meta = "inputs_meta" in params
        self.wants_kwarg_needs = "kwarg_needs" in params
        # In-place ops whose rule needs the input value must save it before
        # the op overwrites it (autograd's "original self").
        self.wants_self_before = mutates_self(op) and any(b[1] == 0 for b in self.bindings)


_PLANS: dict[int, tuple] = {}


def _plan(op):
    rule = VJP_RULES.get(op)
    counterpart = metadata_inplace_counterpart(op)
    rule_op = op
    if counterpart is not None:
        rule, rule_op = VJP_RULES.get(counterpart), counterpart
    returns = op._schema.returns
    plan = (
        _RulePlan(rule_op, rule) if rule is not None else None,
        mutates_self(op),
        counterpart,
        is_view_op(op),
        is_random_op(op),
        op in NONDIFFERENTIABLE and rule is None,  # a registered rule wins
        len(returns),
        bool(returns) and str(returns[0].type).startswith("List"),
        getattr(op, "_op", op),  # the C++ entry point
    )
    _PLANS[id(op)] = plan
    return plan




on_rules_changed(_PLANS.clear)


# --------------------------------------------------------------------------
# The interpreter
# --------------------------------------------------------------------------


class GradInterpreter(Interpreter):
    """The interpreter of one grad/vjp level."""

    __slots__ = ("prev_grad_mode",)
    name = "grad"
    claims_untracked = True  # tensors created inside the transform belong to it

    def __init__(self) -> None:
        super().__init__()
        self.prev_grad_mode = _is_grad_enabled()

    def wrap_input(self, x, differentiable: bool):
        """Wrap a transform input: a leaf when differentiated, else a constant."""
        if not isinstance(x, Tensor):
            return x
        if differentiable:
            return make_grad_tensor(x, self, Leaf(), 0)
        return make_grad_tensor(x, self)

    # -- the per-op path ---------------------------------------------------

    def process(self, op, args, kwargs):
        plan = _PLANS.get(id(op))
        if plan is None:
            plan = _plan(op)
        rule_plan, inplace, metadata_counterpart, is_view, random, nondiff, n_returns, returns_list, call = plan

        primals = list(args)
        edges = [None] * len(args)
        tracked = own = lists = False
        i = 0
        for a in args:
            if type(a) is GradTensor and a._interp is self:
                own = True
                view = a._view
                if view is not None and view.seen != view.root._counter[0]:
                    self._refresh_view(a)
                primals[i] = a._primal
                if a._node is not None:
                    edges[i] = (a._node, a._index)
                    tracked = True
            elif type(a) is list or type(a) is tuple:
                unwrapped = self._unwrap_list(a)
                if unwrapped is not None:
                    own = lists = True
                    primals[i], edges[i] = unwrapped
                    tracked = tracked or any(e is not None for e in edges[i])
            i += 1
        kwarg_edges = None
        if kwargs:
            kwargs, kwarg_edges = self._unwrap_kwargs(op, kwargs)
            if kwarg_edges:
                own = tracked = True

        if not own:  # an untracked op claimed at user level: its outputs are constants here
            out = self._lower(op, primals, kwargs)
            return args[0] if inplace else self._wrap_outputs(op, args, kwargs, out, None, False, returns_list)

        grad_mode = _is_grad_enabled()
        record = tracked and not nondiff and grad_mode
        if inplace and not (type(args[0]) is GradTensor and args[0]._interp is self):
            return write_into_captured(self, op, args[0], primals, kwargs)
        if record and rule_plan is None:
            out = self.decompose(op, args, kwargs)
            if out is not NotImplemented:
                return out
            if not inplace:
                out = self._lower(op, primals, kwargs, metadata_counterpart)
                if not any_differentiable(out):  # comparisons, argmax, ...: nothing to differentiate
                    return self._wrap_outputs(op, args, kwargs, out, None, is_view, returns_list)
            raise MissingRuleError(
                f"grad: there is no VJP rule for {op}, and its output depends on an input being "
                f"differentiated, so a derivative is needed. Register one with "
                f"torchxform.register_vjp (see torchxform/rules/ for examples), or "
                f"compute this op under torch.no_grad() / on .detach()-ed inputs if no gradient "
                f"should flow through it.",
                op,
                "grad",
            )

        saved_self = None
        if record and inplace and rule_plan.wants_self_before:
            saved_self = self._lower(aten_clone, (primals[0],), {})
        if grad_mode == self.prev_grad_mode:
            if metadata_counterpart is None:
                out = lower(self, op, primals, kwargs, call, random)
            else:  # the new view, computed out of place
                out = lower(self, metadata_counterpart, primals, kwargs)
        else:
            out = self._lower(op, primals, kwargs, metadata_counterpart)

        node = counters = None
        if record:
            if rule_plan.wants_result and not inplace and not is_view:
                # Saved outputs are version-checked too: give them counters now.
                counters = [[0]] if n_returns <= 1 else [[0] for _ in range(n_returns)]
            node = self._record(
                op, rule_plan, args, primals, kwargs, edges, out, saved_self, n_returns, counters, kwarg_edges, lists
            )

        if metadata_counterpart is not None:
            return self._finish_metadata_inplace(op, args, kwargs, out, node)
        if inplace:
            return self._finish_inplace(args[0], node, record, nondiff, n_returns)
        if not is_view and isinstance(out, Tensor):  # the common case of _wrap_outputs
            if not (out.is_floating_point() or out.is_complex()):
                return out  # See NOTE [Integer tensors stay plain]
            return make_grad_tensor(out, self, node, 0, counters[0] if counters else None)
        return self._wrap_outputs(op, args, kwargs, out, node, is_view, returns_list, counters)

    def _unwrap_list(self, items):
        if not any(type(b) is GradTensor and b._interp is self for b in items):
            return None
        primals, edges = [], []
        for b in items:
            if type(b) is GradTensor and b._interp is self:
                if b._view is not None and b._view.seen != b._view.root._counter[0]:
                    self._refresh_view(b)
                primals.append(b._primal)
                edges.append((b._node, b._index) if b._node is not None else None)
            else:
                primals.append(b)
                edges.append(None)
        return primals, edges

    def _unwrap_kwargs(self, op, kwargs):
        """Keyword-only tensors (e.g. an attention mask): their primals, and
        the tape edges of the tracked ones."""
        unwrapped, edges = {}, {}
        for name, value in kwargs.items():
            if type(value) is GradTensor and value._interp is self:
                if name == "out":
                    raise RuntimeError(
                        f"grad: {op} writes into an `out=` tensor that this transform tracks; out= "
                        f"variants are not supported under grad. Use the functional form instead."
                    )
                if value._view is not None and value._view.seen != value._view.root._counter[0]:
                    self._refresh_view(value)
                if value._node is not None:
                    edges[name] = (value._node, value._index)
                value = value._primal
            unwrapped[name] = value
        return unwrapped, edges

    def _lower(self, op, primals, kwargs, metadata_counterpart=None):
        """Run ``op`` on the primals one level down, with the grad mode this
        level was entered with (so outer levels record what this level's
        rules do exactly when they would have recorded the op itself)."""
        if metadata_counterpart is not None:
            op = metadata_counterpart  # the new view, computed out of place
        mode = _is_grad_enabled()
        if mode == self.prev_grad_mode:
            return lower(self, op, primals, kwargs)
        _set_grad_enabled(self.prev_grad_mode)
        try:
            return lower(self, op, primals, kwargs)
        finally:
            _set_grad_enabled(mode)

    # -- recording ----------------------------------------------------------

    def _record(
        self, op, rule_plan, args, primals, kwargs, edges, out, saved_self, n_returns, counters, kwarg_edges, lists=True
    ):
        saved = {}
        checks = []
        n_primals = len(primals)
        for name, position, default in rule_plan.bindings:
            if position is None or position >= n_primals:
                value = kwargs.get(name, default)
            elif position == 0 and saved_self is not None:
                value = saved_self
            else:
                value = primals[position]
                # Remember the version of a saved input so backward can tell
                # if it was overwritten in place after being saved.
                arg = args[position]
                if type(arg) is GradTensor and arg._interp is self:
                    # `value` (the primal, which has arg's shape and dtype)
                    # describes it if the check fails.
                    counter = arg._counter
                    checks.append((counter, counter[0], value))
                elif isinstance(value, Tensor) and not isinstance(value, Tracer):
                    checks.append((value, value._version, (value.shape, value.dtype)))
            saved[name] = value
        if rule_plan.wants_result:
            saved["result"] = out
            if counters is not None:
                for c in counters:
                    checks.append((c, 0, "an output"))
            elif mutates_self(op):
                target = args[0]
                checks.append((target._counter, target._counter[0] + 1, "the output"))
        if rule_plan.wants_inputs_meta:
            meta = []
            for p in primals:
                if isinstance(p, Tensor):
                    meta.append((p.shape, p.dtype, p.device))
                elif type(p) is list or type(p) is tuple:
                    meta.append(_meta(p))
                else:
                    meta.append(None)
            saved["inputs_meta"] = tuple(meta)
        if rule_plan.wants_needs:
            if lists:
                saved["needs"] = tuple(
                    (tuple(x is not None for x in e) if type(e) is list else e is not None) for e in edges
                )
            else:
                saved["needs"] = tuple([e is not None for e in edges])
        if rule_plan.wants_op:
            saved["op"] = op
        if lists:
            flat_edges = []
            layout = []
            for e in edges:
                if type(e) is list:
                    layout.append(len(e))
                    flat_edges.extend(e)
                else:
                    layout.append(None)
                    flat_edges.append(e)
            layout = tuple(layout)
        else:
            flat_edges = edges
            layout = None  # one entry per positional argument
        kwarg_names = ()
        if kwarg_edges:
            # A keyword-only tensor being differentiated: only rules that take
            # `kwarg_needs` give it a gradient (as a dict after the positional
            # entries); anything else would silently drop it.
            if not rule_plan.wants_kwarg_needs:
                names = ", ".join(kwarg_edges)
                raise RuntimeError(
                    f"grad: the keyword argument(s) {names} of {op} are being differentiated, but its "
                    f"VJP rule gives no gradient for them. Detach them, or extend the rule "
                    f"(see `kwarg_needs` in torchxform/_core/registry.py)."
                )
            saved["kwarg_needs"] = {name: True for name in kwarg_edges}
            kwarg_names = tuple(kwarg_edges)
            if layout is None:
                layout = (None,) * len(edges)
            flat_edges = list(flat_edges)
            flat_edges.extend(kwarg_edges.values())
        if type(out) is list:  # a Tensor[] output (split, unbind, ...): one node output per element
            n_outputs, multi_output = len(out), True
        elif n_returns <= 1:
            n_outputs, multi_output = 1, False
        else:
            n_outputs, multi_output = n_returns, True
        if layout is None:
            pullback = functools.partial(_apply_simple_rule, rule_plan.rule, saved, multi_output)
        else:
            pullback = functools.partial(_apply_rule, rule_plan.rule, saved, layout, multi_output, kwarg_names)
        return Node(pullback, tuple(flat_edges), n_outputs, tuple(checks), op)

    # -- outputs -----------------------------------------------------------

    def _wrap_outputs(self, op, args, kwargs, out, node, is_view, returns_list, counters=None):
        if isinstance(out, Tensor):
            return self._wrap_one(op, args, kwargs, out, node, 0, is_view, None, counters and counters[0])
        if type(out) is tuple or type(out) is list:
            if returns_list:  # one Tensor[] output (split, unbind, ...): node output i per element
                return [self._wrap_one(op, args, kwargs, o, node, i, is_view, i) for i, o in enumerate(out)]
            return type(out)(
                self._wrap_one(op, args, kwargs, o, node, i, False, None, counters and counters[i])
                if isinstance(o, Tensor)
                else o
                for i, o in enumerate(out)
            )
        return out

    def _wrap_one(self, op, args, kwargs, value, node, index, is_view, view_index, counter=None):
        if not (value.is_floating_point() or value.is_complex()):
            return value  # See NOTE [Integer tensors stay plain]
        if is_view and type(args[0]) is GradTensor and args[0]._interp is self:
            base = args[0]
            # A view shares its root's version counter and can be replayed
            # on another tensor of the root's shape.
            view = base._view
            root = view.root if view is not None else base
            link = (op, tuple(args[1:]), kwargs, view_index)
            chain = (view.chain if view is not None else ()) + (link,)
            info = ViewInfo(root, chain, root._counter[0])
            return make_grad_tensor(value, self, node, index, root._counter, info)
        return make_grad_tensor(value, self, node, index, counter)

    def _finish_inplace(self, target, node, record, nondiff, n_returns):
        if record:
            target._node, target._index = node, 0
        elif nondiff and _is_grad_enabled():
            target._node = None  # overwritten by values that carry no derivative (uniform_, floor_, ...)
        # Otherwise (no tracked input, or grad disabled) the mutation is
        # invisible to differentiation, as in torch.autograd.
        target._counter[0] += 1
        view = target._view
        if view is not None:
            self._write_back(target)
            view.seen = target._counter[0]
        return target if n_returns else None

    def _write_back(self, view_tensor):
        """The base of a view that was written into becomes "old base with the
        view region replaced by the view's new value".  See NOTE [In-place
        ops and views under grad]."""
        info = view_tensor._view
        root = info.root
        base_edge = (root._node, root._index) if root._node is not None else None
        view_edge = (view_tensor._node, view_tensor._index) if view_tensor._node is not None else None
        if base_edge is None and view_edge is None:
            return
        pullback = functools.partial(_scatter_pullback, info.chain)
        root._node = Node(pullback, (base_edge, view_edge), 1, (), "view write-back")
        root._index = 0

    def _refresh_view(self, view_tensor):
        """A view whose base changed since its node was made: its node becomes
        the view of the base's current node."""
        info = view_tensor._view
        root = info.root
        info.seen = root._counter[0]
        if root._node is None:
            view_tensor._node = None
            return
        pullback = functools.partial(_view_of_base_pullback, info.chain, root._primal.shape)
        view_tensor._node = Node(pullback, ((root._node, root._index),), 1, (), "view refresh")
        view_tensor._index = 0

    def _finish_metadata_inplace(self, op, args, kwargs, new_primal, node):
        """``squeeze_``, ``t_``, ...: the wrapper takes the new shape (the op's
        meta kernel run on the wrapper itself, without dispatch) and the new
        view's value and node."""
        target = args[0]
        apply_metadata_op(op, args, kwargs)
        target._primal = new_primal
        target._node, target._index = node, 0
        view = target._view
        if view is not None:
            link = (metadata_inplace_counterpart(op), tuple(args[1:]), kwargs, None)
            target._view = ViewInfo(view.root, view.chain + (link,), view.root._counter[0])
        return target


aten_clone = torch.ops.aten.clone.default


def _apply_simple_rule(rule, saved, multi_output, cotangents):
    """``_apply_rule`` for ops without Tensor[] or differentiated keyword
    arguments: the rule's results are the cotangents of the edges."""
    return rule(grad=cotangents if multi_output else cotangents[0], **saved)


def _apply_rule(rule, saved, layout, multi_output, kwarg_names, cotangents):
    grad = cotangents if multi_output else cotangents[0]
    results = rule(grad=grad, **saved)
    kwarg_grads = None
    if kwarg_names:
        *results, kwarg_grads = results
    flat = []
    for position, size in enumerate(layout):
        value = results[position] if position < len(results) else None
        if size is None:
            flat.append(value)
        else:
            flat.extend(value if value is not None else [None] * size)
    if kwarg_names:
        flat.extend(kwarg_grads.get(name) for name in kwarg_names)
    return flat


def _scatter_pullback(chain, cotangents):
    (grad,) = cotangents
    base_grad = grad.clone()
    replay_view(chain, base_grad).zero_()
    return base_grad, replay_view(chain, grad)


def _view_of_base_pullback(chain, base_shape, cotangents):
    (grad,) = cotangents
    base_grad = ready_for_write(grad.new_zeros(base_shape), grad)
    replay_view(chain, base_grad).copy_(grad)
    return (base_grad,)


# --------------------------------------------------------------------------
# The public API (torch.func's contract)
# --------------------------------------------------------------------------


class _level:
    """Push a GradInterpreter with grad mode enabled for the user function
    (grad(f) differentiates f even when called under torch.no_grad(); a
    torch.no_grad() inside f stops it).  See NOTE [Ceiling] for why nothing
    else is needed for nesting."""

    def __init__(self) -> None:
        self.interp = GradInterpreter()
        self._push = interpreting(self.interp)

    def __enter__(self) -> GradInterpreter:
        self._mode = _is_grad_enabled()
        self._push.__enter__()
        _set_grad_enabled(True)
        return self.interp

    def __exit__(self, *exc) -> None:
        _set_grad_enabled(self._mode)
        self._push.__exit__(*exc)


def _unwrap(value, interp):
    """A level's tracer -> its primal (its value one level down)."""
    if type(value) is GradTensor and value._interp is interp:
        return value._primal
    return value


def _unwrap_tree(tree, interp):
    flat, spec = tree_flatten(tree)
    return tree_unflatten([_unwrap(v, interp) for v in flat], spec)


def _root_of(value, interp):
    """The (node, index) a transform output hangs from, or None."""
    if type(value) is GradTensor and value._interp is interp and value._node is not None:
        if value._view is not None and value._view.seen != value._view.root._counter[0]:
            interp._refresh_view(value)
        return value._node, value._index
    return None


def _check_argnums(argnums, num_args):
    if not isinstance(argnums, (int, tuple)):
        raise RuntimeError(f"argnums must be int or Tuple[int, ...], got: {type(argnums)}")

    def wrap(argnum):
        if not isinstance(argnum, int):
            raise RuntimeError(f"argnum must be int, got: {type(argnum)}")
        if 0 <= argnum < num_args:
            return argnum
        if -num_args <= argnum < 0:
            return argnum + num_args
        raise RuntimeError(f"Got argnum={argnum}, but only {num_args} positional inputs")

    if isinstance(argnums, int):
        return wrap(argnums)
    if len(argnums) == 0:
        raise RuntimeError("argnums must be non-empty")
    if len(set(argnums)) != len(argnums):
        raise RuntimeError(f"argnums elements must be unique, got {argnums}")
    return tuple(wrap(a) for a in argnums)


def _wrap_inputs(args, interp, differentiable):
    """Wrap the tensors of ``args`` (a pytree) for ``interp``; returns the
    wrapped pytree and, for differentiated leaves, their Leaf nodes."""
    flat, spec = tree_flatten(args)
    leaves = []
    wrapped = []
    for x in flat:
        if isinstance(x, Tensor):
            t = interp.wrap_input(x, differentiable)
            if differentiable:
                leaves.append(t._node)
            wrapped.append(t)
        else:
            if differentiable:
                raise ValueError(f"Thing passed to transform API must be Tensor, got {type(x)}")
            wrapped.append(x)
    return tree_unflatten(wrapped, spec), leaves


def _gradients(roots, leaves, like):
    """Run backward from ``roots``; the cotangent of each leaf (zeros shaped
    like the input where nothing reached it)."""
    collected = run_backward(roots) if roots else {}
    out = []
    for leaf, x in zip(leaves, like):
        g = collected.get(leaf)
        out.append(torch.zeros_like(x) if g is None else g)
    return out


def vjp(func: Callable, *primals, has_aux: bool = False):
    """Standing for the vector-Jacobian product, returns a tuple containing
    the results of ``func`` applied to ``primals`` and a function that, when
    given ``cotangents``, computes the reverse-mode Jacobian of ``func`` with
    respect to ``primals`` times ``cotangents``.

    Args:
        func (Callable): A Python function that takes one or more arguments.
            Must return one or more Tensors.
        primals (Tensors): Positional arguments to ``func`` that must all be
            Tensors (or pytrees of Tensors). The returned function will also
            compute the derivative with respect to these arguments.
        has_aux (bool): Flag indicating that ``func`` returns a
            ``(output, aux)`` tuple where the first element is the output of
            the function to be differentiated and the second element is
            other auxiliary objects that will not be differentiated.
            Default: False.

    Returns:
        A ``(output, vjp_fn)`` tuple, or ``(output, vjp_fn, aux)`` with
        ``has_aux``. ``vjp_fn(cotangents)`` takes cotangents with the
        structure of ``output`` and returns a tuple with one gradient per
        primal; it may be called several times.

    Example::

        >>> import torch
        >>> from torchxform import vjp
        >>> x = torch.randn(5)
        >>> out, vjp_fn = vjp(torch.sin, x)
        >>> (g,) = vjp_fn(torch.ones(5))
        >>> torch.allclose(g, x.cos())
        True
    """
    return vjp_with_argnums(func, primals, None, has_aux)


def vjp_with_argnums(func: Callable, args: tuple, argnums, has_aux: bool):
    """vjp with respect to the arguments at ``argnums`` (None: all of them);
    the others are passed as constants of the level.  Errors read as
    vjp's (jacrev is built on this)."""
    with _level() as interp:
        if argnums is None:
            wrapped, leaves = _wrap_inputs(args, interp, True)
            differentiated = args
        else:
            positions = _check_argnums(argnums, len(args))
            chosen = (positions,) if isinstance(positions, int) else positions
            wrapped, leaves_of = [], {}
            for i, arg in enumerate(args):
                w, leaves_of[i] = _wrap_inputs(arg, interp, i in chosen)
                wrapped.append(w)
            leaves = [leaf for i in chosen for leaf in leaves_of[i]]
            differentiated = args[positions] if isinstance(positions, int) else tuple(args[i] for i in chosen)
        outputs = func(*wrapped)
        aux = None
        if has_aux:
            if not (isinstance(outputs, tuple) and len(outputs) == 2):
                raise RuntimeError(
                    "vjp(f, *primals): output of function f should be a tuple: (output, aux) if has_aux is True"
                )
            outputs, aux = outputs
            aux = _unwrap_tree(aux, interp)
        flat_outputs, output_spec = tree_flatten(outputs)
        if (len(flat_outputs) == 1 and flat_outputs[0] is None) or len(flat_outputs) < 1:
            raise RuntimeError(
                f"vjp(f, *primals): Expected f to be a function that has non-empty output (got output = {flat_outputs})"
            )
        for o in flat_outputs:
            if not isinstance(o, Tensor):
                raise RuntimeError(
                    f"vjp(f, *primals): expected f(*primals) to return only tensors, got unsupported type {type(o)}"
                )
            if not is_differentiable(o):
                raise RuntimeError(
                    "vjp(f, ...): All outputs of f must be floating-point or complex Tensors, got Tensor "
                    f"with dtype {o.dtype}"
                )
        roots = [_root_of(o, interp) for o in flat_outputs]
        results = tree_unflatten([_unwrap(o, interp) for o in flat_outputs], output_spec)
    flat_primals, primals_spec = tree_flatten(differentiated)
    output_meta = [(o.shape, o.dtype) for o in flat_outputs]

    def vjp_fn(cotangents):
        flat_cotangents, cotangents_spec = tree_flatten(cotangents)
        if cotangents_spec != output_spec:
            raise RuntimeError(
                f"Expected pytree structure of cotangents to be the same as pytree structure of outputs "
                f"to the function. cotangents: {cotangents_spec}, primal output: {output_spec}"
            )
        for i, (ct, (shape, dtype)) in enumerate(zip(flat_cotangents, output_meta)):
            if not isinstance(ct, Tensor):
                raise RuntimeError(f"vjp_fn: expected cotangent {i} to be a Tensor, got {type(ct)}")
            if ct.shape != shape:
                raise RuntimeError(
                    f"Mismatch in shape: grad_output[{i}] has a shape of {tuple(ct.shape)} and output[{i}] "
                    f"has a shape of {tuple(shape)}. The cotangent must have the shape of the output it belongs to."
                )
        start = [(root[0], root[1], ct) for root, ct in zip(roots, flat_cotangents) if root is not None]
        grads = _gradients(start, leaves, [p for p in flat_primals if isinstance(p, Tensor)])
        it = iter(grads)
        return tree_unflatten([next(it) if isinstance(p, Tensor) else p for p in flat_primals], primals_spec)

    if has_aux:
        return results, vjp_fn, aux
    return results, vjp_fn


def grad_and_value(func: Callable, argnums: int | tuple = 0, has_aux: bool = False) -> Callable:
    """Returns a function to compute a tuple of the gradient and the primal,
    or forward, computation.

    Args:
        func (Callable): A Python function that takes one or more arguments.
            Must return a single-element Tensor. If specified ``has_aux``
            equals ``True``, function can return a tuple of single-element
            Tensor and other auxiliary objects: ``(output, aux)``.
        argnums (int or Tuple[int]): Specifies arguments to compute gradients
            with respect to. ``argnums`` can be a single integer or a tuple
            of integers. Default: 0.
        has_aux (bool): Flag indicating that ``func`` returns a tensor and
            other auxiliary objects: ``(output, aux)``. Default: False.

    Returns:
        A function that returns ``(gradient, output)``, or
        ``(gradient, (output, aux))`` with ``has_aux``. The gradient has the
        structure of the arguments selected by ``argnums``.

    Example::

        >>> import torch
        >>> from torchxform import grad_and_value
        >>> x = torch.randn(3)
        >>> g, value = grad_and_value(lambda x: (x ** 2).sum())(x)
        >>> torch.allclose(g, 2 * x) and torch.allclose(value, (x ** 2).sum())
        True
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with _level() as interp:
            positions = _check_argnums(argnums, len(args))
            chosen = (positions,) if isinstance(positions, int) else positions
            wrapped_args, leaves_of = [], {}
            for i, arg in enumerate(args):
                w, leaves_of[i] = _wrap_inputs(arg, interp, i in chosen)
                wrapped_args.append(w)
            leaves = [(i, leaves_of[i]) for i in chosen]  # gradients come in argnums order
            wrapped_kwargs, _ = _wrap_inputs(kwargs, interp, False)
            output = func(*wrapped_args, **wrapped_kwargs)
            aux = None
            if has_aux:
                if not (isinstance(output, tuple) and len(output) == 2):
                    raise RuntimeError(
                        "grad_and_value(f)(*args): output of function f should be a tuple: (output, aux) "
                        "if has_aux is True"
                    )
                output, aux = output
                aux = _unwrap_tree(aux, interp)
            if not isinstance(output, Tensor):
                raise RuntimeError(
                    f"grad_and_value(f)(*args): Expected f(*args) to return a Tensor, got {type(output)}"
                )
            if output.dim() != 0:
                raise RuntimeError(
                    "grad_and_value(f)(*args): Expected f(*args) to return a scalar Tensor, got tensor with "
                    f"{output.dim()} dims. Maybe you wanted to use the vjp or jacrev APIs instead?"
                )
            root = _root_of(output, interp)
            value = _unwrap(output, interp)
        # Backward runs after the level is popped, in the caller's grad mode:
        # outer levels record it (higher-order derivatives) when they should.
        start = [(root[0], root[1], _ones_like(value))] if root is not None else []
        collected = run_backward(start) if start else {}
        grads = []
        for i, arg_leaves in leaves:
            flat, spec = tree_flatten(args[i])
            flat_grads = []
            for leaf, x in zip(arg_leaves, [a for a in flat if isinstance(a, Tensor)]):
                g = collected.get(leaf)
                flat_grads.append(torch.zeros_like(x) if g is None else g)
            it = iter(flat_grads)
            grads.append(tree_unflatten([next(it) if isinstance(a, Tensor) else a for a in flat], spec))
        result = grads[0] if isinstance(positions, int) else tuple(grads)
        if has_aux:
            return result, (value, aux)
        return result, value

    return wrapper


def grad(func: Callable, argnums: int | tuple = 0, has_aux: bool = False) -> Callable:
    """``grad`` operator helps computing gradients of ``func`` with respect
    to the input(s) specified by ``argnums``. This operator can be nested to
    compute higher-order gradients.

    Args:
        func (Callable): A Python function that takes one or more arguments.
            Must return a single-element Tensor. If specified ``has_aux``
            equals ``True``, function can return a tuple of single-element
            Tensor and other auxiliary objects: ``(output, aux)``.
        argnums (int or Tuple[int]): Specifies arguments to compute gradients
            with respect to. ``argnums`` can be a single integer or a tuple
            of integers. Default: 0.
        has_aux (bool): Flag indicating that ``func`` returns a tensor and
            other auxiliary objects: ``(output, aux)``. Default: False.

    Returns:
        A function to compute gradients with respect to its inputs (and the
        auxiliary objects with ``has_aux``: ``(gradient, aux)``).

    Example::

        >>> import torch
        >>> from torchxform import grad, vmap
        >>> x = torch.randn(3)
        >>> torch.allclose(grad(lambda x: x.sin().sum())(x), x.cos())
        True
        >>> per_sample = vmap(grad(lambda w, x: (w * x).sum() ** 2), in_dims=(None, 0))
        >>> per_sample(torch.randn(3), torch.randn(8, 3)).shape
        torch.Size([8, 3])
    """
    inner = grad_and_value(func, argnums, has_aux)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        result, value = inner(*args, **kwargs)
        if has_aux:
            return result, value[1]
        return result

    return wrapper
