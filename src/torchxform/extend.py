"""Extending torchxform in Python: rules for your own ops (or ATen ops)
under vmap, grad/vjp and jvp.

A rule is ordinary torch code.  It runs one level below the transform that
calls it, on the values that transform wraps, so every rule composes with
every other transform (``vmap(grad(f))`` of a custom op needs its batching
and VJP rules, nothing more).  Rules registered here replace torchxform's own
for the same op.
"""

from __future__ import annotations

from collections.abc import Callable

from torch._ops import OpOverload, OpOverloadPacket

from ._core import registry


def _as_overload(op) -> OpOverload:
    """An OpOverload from an overload, a packet with a single overload, or a
    ``torch.library.custom_op`` function."""
    inner = getattr(op, "_opoverload", None)  # torch.library.custom_op's CustomOpDef
    if isinstance(inner, OpOverload):
        return inner
    if isinstance(op, OpOverloadPacket) and op.overloads() == ["default"]:
        return op.default
    return op  # validated (with a message saying what to pass) by the registry


def register_batch_rule(*ops) -> Callable[[Callable], Callable]:
    """Registers a batching rule: how ``vmap`` runs ``op`` on batched inputs
    in one call, instead of the slow per-example loop.

    The rule is called as ``rule(in_dims, *args, **kwargs)``: ``args`` are
    the op's positional arguments with batched tensors replaced by their
    physical tensors (batch dim included), ``in_dims`` has one entry per
    positional argument: the batch dim of that physical tensor, or None
    (unbatched tensors and non-tensor arguments; a tuple of entries for a
    list of tensors).  It returns ``(output, out_dim)``: the physical output
    and where its batch dim is (None if unbatched; a tuple for several
    outputs).  Keyword arguments are never batched.

    Args:
        *ops: the ops: ``torch.ops.ns.name.overload`` (an ``OpOverload``), a
            packet with a single overload, or a ``torch.library.custom_op``.

    Returns:
        A decorator that registers the rule and returns it unchanged.

    Example::

        >>> import torch
        >>> import torchxform
        >>> @torch.library.custom_op("demo_ext::scale", mutates_args=())
        ... def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
        ...     return x * factor
        >>> @torchxform.register_batch_rule(scale)
        ... def scale_batch(in_dims, x, factor):
        ...     return scale(x, factor), in_dims[0]  # elementwise: the batch dim stays put
        >>> torchxform.vmap(lambda x: scale(x, 2.0))(torch.ones(3, 2)).shape
        torch.Size([3, 2])
    """
    return registry.register_batching(*[_as_overload(op) for op in ops])


def register_vjp(*ops) -> Callable[[Callable], Callable]:
    """Registers a VJP rule: how ``grad``/``vjp`` (and so ``jacrev``) pull a
    cotangent back through ``op``.

    The rule names what it needs, by keyword, and only that is kept for the
    backward pass: ``grad`` (the cotangent of the output; a tuple for
    several outputs, None where one got none), any of the op's argument
    names as in its schema (their forward values), ``result`` (the forward
    output), ``needs`` (per positional argument, whether its gradient is
    wanted) and ``inputs_meta`` (per positional argument ``(shape, dtype,
    device)`` of a tensor, else None).  It returns one gradient per
    positional argument of the op, None for arguments without one (a shorter
    tuple means None for the rest).  Written in torch ops, it is itself
    differentiable and batchable (second order, per-sample gradients).

    Args:
        *ops: the ops, as for :func:`register_batch_rule`.

    Returns:
        A decorator that registers the rule and returns it unchanged.

    Example::

        >>> import torch
        >>> import torchxform
        >>> @torch.library.custom_op("demo_ext::cube", mutates_args=())
        ... def cube(x: torch.Tensor) -> torch.Tensor:
        ...     return x**3
        >>> @torchxform.register_vjp(cube)
        ... def cube_vjp(grad, x):
        ...     return (3 * x**2 * grad,)
        >>> torchxform.grad(lambda x: cube(x).sum())(torch.tensor([1.0, 2.0]))
        tensor([ 3., 12.])
    """
    return registry.register_vjp(*[_as_overload(op) for op in ops])


def register_jvp(*ops) -> Callable[[Callable], Callable]:
    """Registers a JVP rule: how ``jvp`` (and so ``jacfwd``, ``hessian``)
    pushes tangents forward through ``op``.

    The rule names what it needs, by keyword: any of the op's argument names
    (their values), ``<name>_t`` (that argument's tangent, None for zero) and
    ``result`` (the op's output).  It returns the output's tangent (a tuple
    for several outputs; None for zero).  An op without a JVP rule but with
    a VJP rule still works under jvp (the VJP rule is transposed, at about
    twice the cost).

    Args:
        *ops: the ops, as for :func:`register_batch_rule`.

    Returns:
        A decorator that registers the rule and returns it unchanged.

    Example::

        >>> import torch
        >>> import torchxform
        >>> @torch.library.custom_op("demo_ext::square", mutates_args=())
        ... def square(x: torch.Tensor) -> torch.Tensor:
        ...     return x * x
        >>> @torchxform.register_jvp(square)
        ... def square_jvp(x, x_t):
        ...     return 2 * x * x_t
        >>> torchxform.jvp(square, (torch.tensor([3.0]),), (torch.tensor([1.0]),))
        (tensor([9.]), tensor([6.]))
    """
    return registry.register_jvp(*[_as_overload(op) for op in ops])


__all__ = ["register_batch_rule", "register_vjp", "register_jvp"]
