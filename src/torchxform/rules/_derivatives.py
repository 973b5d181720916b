"""Generic derivative rules shared by op families.

A *linear* op's JVP is the op applied to the tangents; a *multilinear* op's
(``mm``, ``bmm``, ``convolution`` without bias, ...) is the sum, over its
tensor arguments, of the op with that argument replaced by its tangent.
"""

from __future__ import annotations

import functools

import torch

from .._core.schema import functional_counterpart, mutates_self

Tensor = torch.Tensor


def _differentiable(x) -> bool:
    return isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex())


@functools.lru_cache(maxsize=None)
def _positions(op, names: tuple[str, ...]) -> tuple[int, ...]:
    arguments = op._schema.arguments
    return tuple(i for i, a in enumerate(arguments) if a.name in names and not a.kwarg_only)


def _substitute(primal, tangent):
    """The tangent standing in for ``primal``: zeros where it has none; a
    non-differentiable argument (indices, masks, sizes) stays as it is."""
    if type(primal) is list:
        tangents = tangent if tangent is not None else [None] * len(primal)
        return [_substitute(p, t) for p, t in zip(primal, tangents)]
    if not _differentiable(primal):
        return primal
    return tangent if tangent is not None else torch.zeros_like(primal)


def linear_jvp(zero: tuple[str, ...] = ()):
    """A raw JVP rule for ops linear in all their differentiable arguments:
    the op applied to the tangents.  Scalar arguments named in ``zero`` are
    data (e.g. a fill ``value``) whose tangent is 0.  Views stay views: the
    tangent of a view is the same view of the tangent.  An in-place op
    applies its functional op: a tangent is never written in place (it may
    be the user's, or expanded; see NOTE [Tangents of views])."""

    def rule(op, primals, tangents, kwargs, result):
        if mutates_self(op):
            op = functional_counterpart(op)
        args = [_substitute(p, t) for p, t in zip(primals, tangents)]
        for i in _positions(op, zero):
            if i < len(args):
                args[i] = 0
        return op(*args, **kwargs)

    rule.raw_jvp = True
    return rule


def multilinear_jvp(positions: tuple[int, ...], *, affine: tuple[int, ...] = ()):
    """A raw JVP rule for ops linear in each of the arguments at
    ``positions`` separately (``mm(a, b)``: ``mm(ta, b) + mm(a, tb)``).
    Arguments at ``affine`` positions enter additively (a bias): their
    tangent rides along in the first term; in the other terms they are None."""

    def rule(op, primals, tangents, kwargs, result):
        total = None
        affine_pending = [i for i in affine if i < len(tangents) and tangents[i] is not None]
        for i in positions:
            if i >= len(tangents) or tangents[i] is None:
                continue
            args = list(primals)
            args[i] = tangents[i]
            for j in affine:
                if j < len(args):
                    args[j] = tangents[j] if j in affine_pending else None
            affine_pending = []
            term = op(*args, **kwargs)
            total = term if total is None else total + term
        if affine_pending:  # only the affine arguments carry tangents
            args = list(primals)
            for i in positions:
                args[i] = torch.zeros_like(primals[i])
            for j in affine:
                if j < len(args):
                    args[j] = tangents[j]
            total = op(*args, **kwargs)
        return total

    rule.raw_jvp = True
    return rule
