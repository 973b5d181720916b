"""torch.autograd.Function under torchxform's transforms.

NOTE [autograd.Function under the transforms]
A Function's ``forward`` is ordinary ops, but its ``backward``, ``jvp`` and
``vmap`` staticmethods are Python code that must replace what the
transforms would derive from those ops.  While a transform runs,
``Function.apply`` is patched (see NOTE [Patches while transforms run]) so
that a Function applied to tracers is handled by the highest level among
them, level by level as for any op (torch.func does the same with its
``custom_function_call`` operator):

* grad: the Function becomes one node of the tape: its forward (and
  ``setup_context``) run one level down, its pullback is the Function's own
  ``backward`` on the cotangents;
* jvp: the forward runs one level down, and the output tangents are the
  Function's own ``jvp`` on the input tangents (``save_for_forward``);
* vmap: its ``vmap`` staticmethod runs one level down on the unbatched
  values and in_dims; without one, a generated rule runs ``forward``,
  ``setup_context``, ``backward`` and ``jvp`` under vmap (torch.func's
  ``generate_vmap_rule=True``; torchxform also uses it when the flag is not
  set, where torch.func raises, as long as there is no ``vmap``
  staticmethod);
* functionalize: the Function runs one level down on current values.

In each case the levels below see ``Function.apply`` again, so nesting needs
no special case.  Functions without ``setup_context`` get torch.func's error
when differentiated; under vmap alone their forward's ops are batched.
``Fn.apply`` looked up before the first transform started (``jacrev(Fn.apply)``,
or a name bound outside) escapes the patch: torch then runs the forward
without grad mode, so derivatives through it come out zero; call
``Fn.apply`` inside the transformed function instead.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .._core.interpreter import register_patch
from .._core.tracer import Tracer
from ._autodiff import below

_original_apply = torch.autograd.Function.apply.__func__
_ONCE_DIFFERENTIABLE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__


class VmapInfo(NamedTuple):
    """What a Function's ``vmap`` staticmethod learns about its vmap level
    (torch.func's ``info`` argument)."""

    batch_size: int
    randomness: str


class FunctionContext:
    """The ``ctx`` a Function's ``setup_context``, ``backward`` and ``jvp``
    receive under torchxform: saved tensors, ``needs_input_grad``,
    non-differentiable outputs, ``set_materialize_grads``, and any other
    attribute the Function stores on it."""

    def __init__(self, needs_input_grad) -> None:
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()
        self.non_differentiable: set[int] = set()
        self.materialize_grads = True

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors

    def save_for_forward(self, *tensors) -> None:
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *outputs) -> None:
        self.non_differentiable.update(id(o) for o in outputs)

    def set_materialize_grads(self, value: bool) -> None:
        self.materialize_grads = value

    def mark_dirty(self, *tensors) -> None:
        raise RuntimeError("torchxform: autograd.Functions that modify their inputs in place (mark_dirty) are "
                           "not supported under grad, jvp or vmap; return new tensors instead")


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _wrap_like(output, wrapped: tuple):
    """``wrapped`` (one value per output) in the shape of ``output``."""
    return wrapped if isinstance(output, tuple) else wrapped[0]


# --------------------------------------------------------------------------
# grad
# --------------------------------------------------------------------------


def _check_differentiable_once(user_function, values) -> None:
    """A ``@once_differentiable`` backward runs without grad mode: if an outer
    level is differentiating through it, its derivative would be lost."""
    if getattr(user_function.backward, "__code__", None) is not _ONCE_DIFFERENTIABLE:
        return
    for leaf in tree_leaves(values):
        while isinstance(leaf, Tracer):
            if leaf._interp.alive and leaf._interp.name in ("grad", "jvp") and _carries_derivative(leaf):
                raise RuntimeError(
                    f"trying to differentiate twice a function that was marked with @once_differentiable: "
                    f"{user_function.__name__}.backward runs without grad mode, so an outer grad/jvp transform cannot "
                    f"differentiate it; remove @once_differentiable or differentiate only once"
                )
            leaf = leaf._underlying()


def _apply_at_grad_level(cls, interp, args):
    """``cls.apply(*args)`` recorded as one node of ``interp``'s tape whose
    pullback is the Function's own ``backward``; the forward runs one level
    down (so lower levels see it as usual)."""
    from .reverse import Node, make_grad_tensor

    user_function = cls
    primals, edges = interp._unwrap_list(args)  # the arguments as one Tensor[]: primals and tape edges
    ctx = FunctionContext(tuple(e is not None for e in edges))
    with below(interp):
        output = cls.apply(*primals)  # the levels below run the Function in their turn
        cls.setup_context(ctx, tuple(primals), output)
    outputs = _as_tuple(output)

    def pullback(cotangents):
        grads = [
            torch.zeros_like(o) if g is None and ctx.materialize_grads and isinstance(o, torch.Tensor) else g
            for g, o in zip(cotangents, outputs)
        ]
        _check_differentiable_once(user_function, (grads, ctx.saved_tensors))
        result = _as_tuple(user_function.backward(ctx, *grads))  # the Function's own VJP, as torch.func runs it
        return tuple(g if e is not None else None for g, e in zip(result, edges))

    node = Node(pullback, tuple(edges), len(outputs), (), f"{cls.__name__}.backward")
    wrapped = tuple(
        make_grad_tensor(o, interp, None if id(o) in ctx.non_differentiable or not o.is_floating_point() else node, i)
        if isinstance(o, torch.Tensor) else o
        for i, o in enumerate(outputs)
    )
    return _wrap_like(output, wrapped)


# --------------------------------------------------------------------------
# jvp
# --------------------------------------------------------------------------


def _apply_at_jvp_level(cls, interp, args):
    """The forward one level down; output tangents from the Function's own
    ``jvp`` (also one level down) on the input tangents."""
    from .forward import DualTensor, make_dual, tangent_of

    primals, tangents = [], []
    for a in args:
        own = type(a) is DualTensor and a._interp is interp
        primals.append(a._primal if own else a)
        tangents.append(tangent_of(a) if own else None)
    ctx = FunctionContext(tuple(t is not None for t in tangents))
    with below(interp):
        output = cls.apply(*primals)
        cls.setup_context(ctx, tuple(primals), output)
        outputs = _as_tuple(output)
        out_tangents = (None,) * len(outputs)
        if any(t is not None for t in tangents):
            if cls.jvp is torch.autograd.Function.jvp:
                raise RuntimeError(
                    f"jvp: {cls.__name__} is a torch.autograd.Function without a jvp staticmethod, so its "
                    f"forward-mode derivative is unknown. Implement {cls.__name__}.jvp (with "
                    f"ctx.save_for_forward in setup_context), or use a reverse-mode transform (grad, vjp, jacrev)."
                )
            tangents = [
                torch.zeros_like(p) if t is None and isinstance(p, torch.Tensor) and ctx.materialize_grads else t
                for p, t in zip(primals, tangents)
            ]
            out_tangents = _as_tuple(cls.jvp(ctx, *tangents))
    wrapped = tuple(
        make_dual(o, interp, None if id(o) in ctx.non_differentiable or not o.is_floating_point() else t)
        if isinstance(o, torch.Tensor) else o
        for o, t in zip(outputs, out_tangents)
    )
    return _wrap_like(output, wrapped)


# --------------------------------------------------------------------------
# vmap
# --------------------------------------------------------------------------


def _has_vmap_staticmethod(cls) -> bool:
    return cls.vmap is not torch.autograd.Function.vmap


def _apply_at_vmap_level(cls, interp, args):
    from .vmap import BatchedTensor, make_batched

    values, in_dims = [], []
    for a in args:
        own = type(a) is BatchedTensor and a._interp is interp
        values.append(a._value if own else a)
        in_dims.append(a._bdim if own else None)
    if all(d is None for d in in_dims):  # nothing batched at this level: step aside
        with below(interp):
            return cls.apply(*values)
    if getattr(cls, "generate_vmap_rule", False) and _has_vmap_staticmethod(cls):
        raise RuntimeError(
            f"You tried to vmap over {cls.__name__}, but it has both generate_vmap_rule=True and an "
            f"overridden vmap staticmethod. Please set generate_vmap_rule=False or delete the overridden "
            f"vmap staticmethod to avoid ambiguity. For more details, please see "
            f"https://pytorch.org/docs/main/notes/extending.func.html"
        )
    in_dims = tuple(in_dims)
    info = VmapInfo(interp.batch_size, interp.randomness)
    with below(interp):
        if _has_vmap_staticmethod(cls):
            result = cls.vmap(info, in_dims, *values)
            if not isinstance(result, tuple) or len(result) != 2:
                raise RuntimeError(
                    "Expected the vmap staticmethod to have two returns, an output and out_dims with pytree "
                    f"structure compatible with the output. Got {type(result) if not isinstance(result, tuple) else len(result)}"
                    f"{'' if not isinstance(result, tuple) else ' returns'} instead"
                )
            output, out_dims = result
        else:
            output = _vmapped_function(cls, in_dims, info).apply(*values)
            out_dims = tuple(0 if isinstance(o, torch.Tensor) else None for o in _as_tuple(output))
            out_dims = out_dims if isinstance(output, tuple) else out_dims[0]
    flat_out, spec = tree_flatten(output)
    flat_dims = tree_flatten(out_dims)[0] if isinstance(out_dims, (tuple, list)) else [out_dims] * len(flat_out)
    if len(flat_dims) != len(flat_out):
        raise RuntimeError(
            f"{cls.__name__}.vmap returned out_dims {out_dims} that do not match the structure of its output"
        )
    wrapped = [
        make_batched(o, d % o.dim() if d < 0 else d, interp) if isinstance(o, torch.Tensor) and d is not None else o
        for o, d in zip(flat_out, flat_dims)
    ]
    return tree_unflatten(wrapped, spec)


def _vmapped_function(cls, in_dims, info):
    """A Function over the physical (batched) values whose forward, backward
    and jvp are ``cls``'s under vmap (torch.func's generated vmap rule).
    Outputs, saved tensors, gradients and tangents keep their batch dim at
    the front."""
    from .vmap import vmap

    def batched(fn, dims):
        return vmap(fn, in_dims=dims, out_dims=0, randomness=info.randomness)

    def batched_with_nones(fn, dims, *args):
        """``batched(fn, dims)(*args)`` for an ``fn`` returning a tuple in
        which some entries are None (vmap returns tensors only)."""
        present = []

        def tensors_only(*args):
            result = _as_tuple(fn(*args))
            present[:] = [r is not None for r in result]
            return tuple(r for r in result if r is not None)

        tensors = iter(batched(tensors_only, dims)(*args))
        return tuple(next(tensors) if p else None for p in present)

    def forward(*values):
        return batched(cls.forward, in_dims)(*values)

    def setup_context(ctx, inputs, output):
        inner = FunctionContext(None)
        outputs = _as_tuple(output)
        non_differentiable = []

        def run(inputs, outputs):
            cls.setup_context(inner, inputs, outputs if isinstance(output, tuple) else outputs[0])
            non_differentiable[:] = [i for i, o in enumerate(outputs) if id(o) in inner.non_differentiable]
            saved = tuple(inner.saved_tensors)
            inner.saved_tensors = ()
            return saved

        saved = batched(run, (in_dims, tuple(0 for _ in outputs)))(tuple(inputs), outputs)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        if non_differentiable:
            ctx.mark_non_differentiable(*(outputs[i] for i in non_differentiable))
        ctx.inner = inner

    def backward(ctx, *grads):
        inner = ctx.inner
        inner.needs_input_grad = ctx.needs_input_grad

        user_function = cls

        def run(saved, grads):
            inner.saved_tensors = saved
            return user_function.backward(inner, *grads)  # the Function's own VJP, per example

        grad_dims = tuple(None if g is None else 0 for g in grads)
        result = batched_with_nones(run, (0, grad_dims), tuple(ctx.saved_tensors), grads)
        # Per-example gradients: summed over the batch for unbatched inputs.
        return tuple(
            None if g is None else g.sum(0) if d is None else g.movedim(0, d) for g, d in zip(result, in_dims)
        )

    def jvp(ctx, *tangents):
        inner = ctx.inner

        def run(saved, tangents):
            inner.saved_tensors = saved
            return cls.jvp(inner, *tangents)

        tangent_dims = tuple(d if t is not None else None for t, d in zip(tangents, in_dims))
        out = batched_with_nones(run, (0, tangent_dims), tuple(ctx.saved_tensors), tangents)
        return out if len(out) > 1 else out[0]

    return type(
        f"Vmapped{cls.__name__}",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
            "generate_vmap_rule": True,
        },
    )


# --------------------------------------------------------------------------
# functionalize, and the patched apply
# --------------------------------------------------------------------------


def _apply_at_functionalize_level(cls, interp, args):
    """The Function on the current values, one level down; outputs are new
    values of the level."""
    values = [interp.unwrap(a) for a in args]
    with below(interp):
        output = cls.apply(*values)
    return interp.wrap_outputs(output)


_LEVEL_RULES = {
    "grad": _apply_at_grad_level,
    "jvp": _apply_at_jvp_level,
    "vmap": _apply_at_vmap_level,
    "functionalize": _apply_at_functionalize_level,
}


def _carries_derivative(tracer) -> bool:
    if tracer._interp.name == "grad":
        return tracer._node is not None
    if tracer._interp.name == "jvp":
        return tracer._tangent is not None or tracer._view is not None
    return False


def _differentiated(args) -> bool:
    """Whether a live grad/jvp level differentiates any argument."""
    for leaf in tree_leaves(args):
        while isinstance(leaf, Tracer):
            if leaf._interp.alive and _carries_derivative(leaf):
                return True
            leaf = leaf._underlying()
    return False


def _top_level(args):
    """The highest live level among the tracers in ``args``, or None."""
    top = None
    for leaf in tree_leaves(args):
        if isinstance(leaf, Tracer) and leaf._interp.alive and (top is None or leaf._interp.level > top.level):
            top = leaf._interp
    return top


def _has_setup_context(cls) -> bool:
    return cls.setup_context is not torch.autograd.function._SingleLevelFunction.setup_context


def _patched_apply(cls, *args, **kwargs):
    top = _top_level((args, kwargs))
    if top is None or top.name not in _LEVEL_RULES:
        return _original_apply(cls, *args, **kwargs)
    if not _has_setup_context(cls):
        if not _differentiated((args, kwargs)):
            return _original_apply(cls, *args, **kwargs)  # vmap alone: the forward's ops are batched
        raise RuntimeError(
            "In order to use an autograd.Function with functorch transforms (vmap, grad, jvp, jacrev, ...), "
            "it must override the setup_context staticmethod (torchxform follows torch.func here). See "
            "https://pytorch.org/docs/main/notes/extending.func.html"
        )
    if kwargs:  # as Function.apply does: keyword arguments become positional ones
        bound = inspect.signature(cls.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        args = bound.args
    return _LEVEL_RULES[top.name](cls, top, args)


register_patch(torch.autograd.Function, "apply", classmethod(_patched_apply))
