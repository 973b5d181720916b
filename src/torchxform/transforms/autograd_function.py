"""torch.autograd.Function under torchxform's transforms.

NOTE [autograd.Function under the transforms]
A Function's ``forward`` runs as ordinary ops, which every interpreter sees;
its ``backward`` and ``jvp`` are Python code torch.autograd would call.
Under vmap, batching the forward's ops is the Function's meaning.  Under
grad or jvp, differentiating the forward's ops would silently ignore the
custom derivative (a straight-through estimator would get zero gradients),
so until Functions get their own nodes, ``Function.apply`` raises when a
grad or jvp level differentiates one of its inputs.  ``apply`` is patched
only while a transform runs (see NOTE [Patches while transforms run]);
``Fn.apply`` looked up before the transform started (``jvp(Fn.apply, ...)``)
escapes the check.
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


def _differentiating_transform(args, kwargs) -> str | None:
    """The name of a live grad/jvp level differentiating any argument."""
    for leaf in tree_leaves((args, kwargs)):
        while isinstance(leaf, Tracer):
            if leaf._interp.alive and _carries_derivative(leaf):
                return leaf._interp.name
            leaf = leaf._underlying()
    return None


def _checked_apply(cls, *args, **kwargs):
    transform = _differentiating_transform(args, kwargs)
    if transform is not None:
        raise RuntimeError(
            f"{transform}: {cls.__name__} is a torch.autograd.Function and one of its inputs is being "
            f"differentiated; torchxform does not run custom autograd.Function derivatives yet, and "
            f"differentiating its forward instead could give wrong results. Write the function in "
            f"torch ops, or register its derivative as a custom op rule (torchxform.register_vjp / "
            f"register_jvp on a torch.library.custom_op)."
        )
    return _original_apply(cls, *args, **kwargs)


register_patch(torch.autograd.Function, "apply", classmethod(_checked_apply))
