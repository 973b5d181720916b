"""Helpers for batching rules: moving and aligning batch dims.

Vocabulary: a batched argument is a *physical* tensor plus its batch dim
(``bdim``); its *logical* shape is the physical shape without that dim.
``None`` as a bdim means "not batched at this level".
"""

from __future__ import annotations

import torch


def logical_rank(x: torch.Tensor, bdim: int | None) -> int:
    """Number of dims the user sees."""
    return x.dim() - (bdim is not None)


def move_bdim_to_front(x: torch.Tensor, bdim: int | None) -> torch.Tensor:
    """``x`` with its batch dim at 0 (a view; unchanged when unbatched)."""
    if bdim is None or bdim == 0:
        return x
    return x.movedim(bdim, 0)


def wrap_dim(dim: int, rank: int) -> int:
    """Canonicalize a possibly negative ``dim`` for a tensor of ``rank`` dims
    (a 0-dim tensor accepts -1 and 0), raising IndexError as torch does."""
    bound = max(rank, 1)
    if dim < -bound or dim >= bound:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-bound}, {bound - 1}], but got {dim})"
        )
    return dim + bound if dim < 0 else dim


def physical_dim(x: torch.Tensor, bdim: int | None, dim: int) -> int:
    """The dim of the front-batched physical tensor for logical ``dim``."""
    return wrap_dim(dim, logical_rank(x, bdim)) + 1


def front_padded(x: torch.Tensor, bdim: int, rank: int) -> torch.Tensor:
    """Batch dim moved to the front, then size-1 dims inserted after it so
    the logical part has ``rank`` dims and broadcasts from the right.

    # [3, B] (bdim=1), rank 3 -> [B, 1, 1, 3]
    """
    x = move_bdim_to_front(x, bdim)
    missing = rank - (x.dim() - 1)
    if missing > 0:
        shape = x.shape
        x = x.view(shape[:1] + (1,) * missing + shape[1:])
    return x


def materialize(x: torch.Tensor, bdim: int | None, batch_size: int) -> torch.Tensor:
    """``x`` with its batch dim at 0; an unbatched ``x`` is expanded (a view,
    no copy) to ``batch_size`` copies."""
    if bdim is None:
        return x.expand((batch_size,) + tuple(x.shape))
    return move_bdim_to_front(x, bdim)


def batch_size(args, bdims) -> int:
    """The batch size, read off the first batched argument."""
    for x, bdim in zip(args, bdims):
        if bdim is None:
            continue
        if type(bdim) is tuple:
            for y, b in zip(x, bdim):
                if b is not None:
                    return y.shape[b]
            continue
        return x.shape[bdim]
    raise AssertionError("batching rule called without a batched argument")



# --------------------------------------------------------------------------
# NOTE [Errors as eager raises them]
# Physical ops see physical shapes: a logical vector batched is a matrix, and
# a failing op reports physical dims and sizes.  Where a rule finds the
# logical arguments invalid, or the physical op raises, it replays the op on
# the first example alone: if that raises, its error is eager's own (type
# and message) and is raised instead.  If the first example goes through,
# the physical error stands (e.g. a later example is singular).  Nothing of
# this runs on the path that succeeds.
# --------------------------------------------------------------------------


class InvalidArguments(Exception):
    """Raised inside a rule: the logical arguments are invalid for the op
    (``with_eager_errors`` then reports eager's error)."""


def _first_example(value, bdim):
    if bdim is None:
        return value
    if type(bdim) is tuple:
        return [_first_example(v, b) for v, b in zip(value, bdim)]
    return value.select(bdim, 0)


def _has_examples(args, bdims) -> bool:
    for a, b in zip(args, bdims):
        if type(b) is int and a.shape[b] == 0:
            return False
        if type(b) is tuple and not _has_examples(a, b):
            return False
    return True


def raise_as_eager(op, bdims, args, kwargs=None, error=None):
    """Raise what eager ``op`` raises for the first example of ``args``;
    if that example goes through, raise ``error`` (the batched call's own),
    or a generic error.  See NOTE [Errors as eager raises them]."""
    from .._core.schema import mutates_self

    if _has_examples(args, bdims):
        example = [_first_example(a, b) for a, b in zip(args, bdims)]
        if mutates_self(op) and isinstance(example[0], torch.Tensor):
            example[0] = example[0].clone()  # the replay must not write into the batch
        try:
            op(*example, **(kwargs or {}))
        except Exception as eager_error:
            raise eager_error from None
    if error is not None and not isinstance(error, InvalidArguments):
        raise error
    raise RuntimeError(f"vmap: {op} got arguments whose logical shapes it does not accept")


def with_eager_errors(rule, **options):
    """``rule(op, bdims, *args, **options, **kwargs)``, raising eager's
    errors.  See NOTE [Errors as eager raises them]."""

    def checked(op, bdims, *args, **kwargs):
        try:
            return rule(op, bdims, *args, **options, **kwargs)
        except Exception as error:
            raise_as_eager(op, bdims, args, kwargs, error)

    checked.__wrapped__ = rule
    return checked
