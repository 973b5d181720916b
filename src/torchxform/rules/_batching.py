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

