"""torch.autograd.Function under torchxform's transforms.

NOTE [autograd.Function under the transforms]
A Function's ``forward`` runs as ordinary ops, which every interpreter sees;
its ``backward`` and ``jvp`` are Python code torch.autograd would call.
While a transform runs, ``Function.apply`` is patched (see NOTE [Patches
while transforms run]):
* under vmap, the forward's ops are batched (the Function's meaning);
* under grad, the Function becomes one node of the tape: its forward (and
  ``setup_context``) run one level down, its pullback is the Function's own
  ``backward`` run on the cotangents, so second order and vmap over it work
  as for any rule;
* under jvp, it raises: its ``jvp`` is not run yet, and differentiating the
  forward's ops could silently give another derivative.
Functions without ``setup_context`` get torch.func's error.  ``Fn.apply``
looked up before the transform started (``jacrev(Fn.apply)``, or a name
bound outside) escapes the patch: torch then runs the forward without grad
mode, and its derivative comes out zero.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

from .._core.interpreter import register_patch
from .._core.tracer import Tracer

_original_apply = torch.autograd.Function.apply.__func__


def _carries_derivative(tracer) -> bool:
    if tracer._interp.name == "grad":
        return tracer._node is not None
    if tracer._interp.name == "jvp":
        return tracer._tangent is not None or tracer._view is not None
    return False


def _differentiating_transform(args, kwargs, only=None) -> str | None:
    """The name of a live grad/jvp level (``only``: that one) differentiating any argument."""
    for leaf in tree_leaves((args, kwargs)):
        while isinstance(leaf, Tracer):
            if leaf._interp.alive and _carries_derivative(leaf) and (only is None or leaf._interp is only):
                return leaf._interp.name
            leaf = leaf._underlying()
    return None


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
                           "not supported under grad; return new tensors instead")


def _top_grad_level(args):
    top = None
    for leaf in tree_leaves(args):
        if isinstance(leaf, Tracer) and leaf._interp.alive and leaf._interp.name == "grad":
            if top is None or leaf._interp.level > top.level:
                top = leaf._interp
    return top


def _apply_at_grad_level(cls, interp, args):
    """``cls.apply(*args)`` recorded as one node of ``interp``'s tape whose
    pullback is the Function's own ``backward``; the forward runs one level
    down (so lower levels see it as usual)."""
    from .reverse import Node, make_grad_tensor
    from ._autodiff import below

    user_function = cls
    primals, edges = interp._unwrap_list(args)  # the arguments as one Tensor[]: primals and tape edges
    ctx = FunctionContext(tuple(e is not None for e in edges))
    with below(interp):
        output = cls.apply(*primals)  # the levels below run the Function in their turn
        cls.setup_context(ctx, tuple(primals), output)
    outputs = output if isinstance(output, tuple) else (output,)

    def pullback(cotangents):
        grads = [
            torch.zeros_like(o) if g is None and ctx.materialize_grads and isinstance(o, torch.Tensor) else g
            for g, o in zip(cotangents, outputs)
        ]
        result = user_function.backward(ctx, *grads)  # the Function's own VJP, as torch.func runs it
        result = result if isinstance(result, tuple) else (result,)
        return tuple(g if e is not None else None for g, e in zip(result, edges))

    node = Node(pullback, tuple(edges), len(outputs), (), f"{cls.__name__}.backward")
    wrapped = tuple(
        make_grad_tensor(o, interp, None if id(o) in ctx.non_differentiable or not o.is_floating_point() else node, i)
        if isinstance(o, torch.Tensor) else o
        for i, o in enumerate(outputs)
    )
    return wrapped if isinstance(output, tuple) else wrapped[0]


def _checked_apply(cls, *args, **kwargs):
    transform = _differentiating_transform(args, kwargs)
    if transform is not None and not _has_setup_context(cls):
        raise RuntimeError(
            "In order to use an autograd.Function with functorch transforms (vmap, grad, jvp, jacrev, ...), "
            "it must override the setup_context staticmethod (torchxform follows torch.func here). See "
            "https://pytorch.org/docs/main/notes/extending.func.html"
        )
    if transform == "grad" and not kwargs:
        interp = _top_grad_level(args)
        if _differentiating_transform(args, kwargs, only=interp) is not None:
            return _apply_at_grad_level(cls, interp, args)
    if transform is not None:
        raise RuntimeError(
            f"{transform}: {cls.__name__} is a torch.autograd.Function and one of its inputs is being "
            f"differentiated; torchxform does not run custom autograd.Function derivatives yet, and "
            f"differentiating its forward instead could give wrong results. Write the function in "
            f"torch ops, or register its derivative as a custom op rule (torchxform.register_vjp / "
            f"register_jvp on a torch.library.custom_op)."
        )
    return _original_apply(cls, *args, **kwargs)


def _has_setup_context(cls) -> bool:
    return cls.setup_context is not torch.autograd.function._SingleLevelFunction.setup_context


register_patch(torch.autograd.Function, "apply", classmethod(_checked_apply))
