"""Indexing, gathering and scattering: advanced indexing (``index`` /
``index_put``), gather/scatter, the ``index_*`` family, take/put,
masked_scatter, embedding, searchsorted/bucketize/isin, repeat_interleave
and the ``*_scatter`` ops that write a view.

Two techniques recur.  A per-example index into a batched tensor is an
advanced index with one more index tensor, ``arange(B)``, for the batch dim
(see NOTE [Advanced indexing under vmap]); ops with an index argument along
one dim (index_select, index_copy, index_fill, take, put, embedding) are
rewritten as that advanced index when the index is batched, index_add and
index_reduce as the matching scatter with the index expanded.  Folding the
batch into the indexed dim with offsets (``index + b * size``) is avoided:
an index out of range for one example would silently read or write another
example's data instead of raising.  (embedding_dense_backward folds, but
sends such indices to a spare row first.)
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch

from .._core.registry import (
    overloads,
    register_batching,
    register_batching_each,
    register_jvp,
    register_nondifferentiable,
    register_vjp,
)
from .._core.schema import functional_counterpart, mutates_self
from .._core.tracer import Tracer
from ._batching import batch_size, front_padded, logical_rank, materialize, move_bdim_to_front, wrap_dim
from ._derivatives import linear_jvp
from .elementwise import reduce_to

aten = torch.ops.aten
Tensor = torch.Tensor

_MASK_DTYPES = (torch.bool, torch.uint8)
_INDEX_DTYPES = (torch.int64, torch.int32)


def _dynamic_shape_error(op, what: str) -> RuntimeError:
    return RuntimeError(
        f"vmap: We do not support batching operators that can output dynamic shape. Attempted to "
        f"vmap over {op} with {what}: the output shape depends on its values, so different batch "
        f"elements could need different shapes. Use a fixed-size alternative (e.g. torch.where or "
        f"masked_fill with the mask instead of indexing with it), or compute it outside vmap."
    )


def _phys(d: int, bdim: int | None) -> int:
    """Physical dim of canonical logical dim ``d`` with the batch at ``bdim``."""
    return d if bdim is None or d < bdim else d + 1


def _logical_shape(x: Tensor, bdim: int | None) -> tuple:
    shape = tuple(x.shape)
    return shape if bdim is None else shape[:bdim] + shape[bdim + 1 :]


def _logical_numel(x: Tensor, bdim: int | None) -> int:
    return math.prod(_logical_shape(x, bdim))


def _arange_index(batch: int, rank: int, like: Tensor) -> Tensor:
    """``arange(batch)`` shaped ``[B, 1, ..., 1]`` (``rank`` ones) to index the
    batch dim next to index tensors of logical rank ``rank``."""
    return torch.arange(batch, device=like.device).view((batch,) + (1,) * rank)


def _at_bdim(x: Tensor, bdim: int | None, target: int, batch: int) -> Tensor:
    """``x`` with its batch dim at ``target``; an unbatched ``x`` is expanded
    there (a view, no copy)."""
    if bdim is None:
        x = x.unsqueeze(target)
        shape = list(x.shape)
        shape[target] = batch
        return x.expand(shape)
    return x if bdim == target else x.movedim(bdim, target)


def _reject_negative(index: Tensor, size: int) -> Tensor:
    """Ops such as index_select and embedding raise on negative indices where
    advanced indexing wraps them: send them out of range instead."""
    return index.masked_fill(index < 0, size)


# --------------------------------------------------------------------------
# NOTE [Advanced indexing under vmap]
# `x[indices]` (aten.index.Tensor) with `indices` a list of index tensors and
# Nones (full slices).  Eager lays the result out in one of two ways:
#   * the index tensors are adjacent (no None between them): the broadcast
#     index shape S replaces the indexed dims in place
#       x: [4, 5, 6, 7], [:, i, j, :] with i, j: [2] -> [4, 2, 7]
#   * they are not adjacent: S goes first, the sliced dims follow in order
#       x: [4, 5, 6, 7], [:, i, :, j] -> [2, 4, 6]
# The physical index list must give the batch a known place without
# changing which of the two layouts applies:
#   * only x is batched: the batch is one more sliced dim.  A None is inserted
#     at its place, unless that splits an adjacent group of index tensors
#     (then the batch moves to just before the group).
#       x: [B, 5, 6, 7], [:, i] -> [None, :, i]           -> [B, 5, 2, 7], bdim 0
#       x: [5, 6, 7, B], [i, :, j] -> [i, :, j] (B trails) -> [2, 6, B], bdim 2
#   * an index is batched: its batch dim goes first, padded so that all
#     logical index dims right-align ([B, 2] with a [3, 2] index -> [B, 1, 2]),
#     and the broadcast shape becomes [B, *S].  With x unbatched nothing else
#     changes: the result has [B, *S] where eager puts S.  With x batched too,
#     `arange(B)` (shaped [B, 1, ..]) indexes x's batch dim, placed just
#     before the group of index tensors (or first, if they are not adjacent)
#     so that the layout stays the same:
#       x: [5, B, 6, 7], [:, i_B, j] -> [:, arange, i_B, j] -> [5, B, 2], bdim 1
# Boolean masks are replaced beforehand by the integer indices of their True
# elements (`mask.nonzero().unbind(1)`): static once the mask is not
# batched.  A batched mask selects a different number of elements per
# example, which vmap cannot represent.
# --------------------------------------------------------------------------


def _expand_masks(op, x_shape, indices, index_bdims):
    """Replace boolean/uint8 masks by the integer indices of their True
    elements.  See NOTE [Advanced indexing under vmap]."""
    new_indices, new_bdims = [], []
    dim = 0
    for index, bdim in zip(indices, index_bdims):
        if index is None or index.dtype not in _MASK_DTYPES:
            new_indices.append(index)
            new_bdims.append(bdim)
            dim += 1
            continue
        if bdim is not None:
            raise _dynamic_shape_error(op, "a boolean mask index that is batched")
        if index.dtype is torch.uint8:
            warnings.warn("indexing with dtype torch.uint8 is now deprecated, please use a dtype torch.bool instead.")
        if dim + index.dim() > len(x_shape):
            raise IndexError(f"too many indices for tensor of dimension {len(x_shape)} (got {dim + index.dim()})")
        for j, size in enumerate(index.shape):
            if size != x_shape[dim + j]:
                raise IndexError(
                    f"The shape of the mask {list(index.shape)} at index {j} does not match the shape of "
                    f"the indexed tensor {list(x_shape)} at index {dim + j}"
                )
        positions = index.nonzero().unbind(1)
        new_indices.extend(positions)
        new_bdims.extend([None] * len(positions))
        dim += index.dim()
    return new_indices, new_bdims


def _batch_indices(op, x, x_bdim, indices, index_bdims):
    """Physical arguments for ``x[indices]``.  See NOTE [Advanced indexing under vmap].

    Returns ``(x, x_bdim, indices, out_bdim, indexed_rank)``: the physical
    self (possibly with its batch dim moved) and its bdim, the physical index
    list, where the batch lands in ``x[indices]``, and the logical rank of
    ``x[indices]``.  ``x`` may be unbatched only when an index is batched.
    """
    rank = x.dim() - (x_bdim is not None)
    if index_bdims is None:
        index_bdims = (None,) * len(indices)
    indices = list(indices)
    for index in indices:
        if index is not None and index.dtype in _MASK_DTYPES:
            indices, index_bdims = _expand_masks(op, _logical_shape(x, x_bdim), indices, index_bdims)
            break
    if len(indices) > rank:
        raise IndexError(f"too many indices for tensor of dimension {rank} (got {len(indices)})")
    advanced = [i for i, index in enumerate(indices) if index is not None]
    if not advanced:  # eager rejects this too; let the physical op say so
        if x_bdim is not None and x_bdim < len(indices):
            indices.insert(x_bdim, None)
        return x, x_bdim, indices, x_bdim, rank
    index_rank = 0
    any_batched = False
    for i in advanced:
        bdim = index_bdims[i]
        r = indices[i].dim() - (bdim is not None)
        any_batched = any_batched or bdim is not None
        if r > index_rank:
            index_rank = r
    first, last = advanced[0], advanced[-1]
    adjacent = last - first + 1 == len(advanced)
    indexed_rank = rank - len(advanced) + index_rank

    if not any_batched:
        bdim = x_bdim
        if adjacent and first < bdim <= last:  # the batch would split the group
            x = x.movedim(bdim, first)
            bdim = first
        if bdim < len(indices):
            indices.insert(bdim, None)
        if adjacent:
            out_bdim = bdim if bdim <= first else bdim - len(advanced) + index_rank
        else:
            out_bdim = index_rank + bdim - sum(1 for i in advanced if i < bdim)
        return x, bdim, indices, out_bdim, indexed_rank

    for i in advanced:
        if index_bdims[i] is not None:
            indices[i] = front_padded(indices[i], index_bdims[i], index_rank)
    target = first if adjacent else 0
    if x_bdim is None:
        return x, None, indices, target, indexed_rank
    if x_bdim != target:
        x = x.movedim(x_bdim, target)
    indices.insert(target, _arange_index(x.shape[target], index_rank, x))
    return x, target, indices, target, indexed_rank


def _align_values(values, values_bdim, out_bdim, indexed_rank):
    """``values`` for ``x[indices] = values`` broadcast against the physical
    ``x[indices]``, whose batch sits at ``out_bdim``.

    # indexed [2, B, 4] (bdim 1): values [4] stay; values [2, 4] -> [2, 1, 4];
    # batched values [B, 4] -> [B, 1, 4] -> [1, B, 4]
    """
    if values_bdim is None:
        # Logical dims of `values` right-align with the indexed shape; a
        # size-1 dim goes where the batch sits among them.
        at = out_bdim - indexed_rank + values.dim()
        return values.unsqueeze(at) if at > 0 else values
    values = front_padded(values, values_bdim, indexed_rank)
    return values.movedim(0, out_bdim) if out_bdim else values


# -- index / index_put ---------------------------------------------------------


@register_batching(aten.index.Tensor, *overloads(aten._unsafe_index, "Tensor"))
def index_batch(op, bdims, x, indices):
    x, _, indices, out_bdim, _ = _batch_indices(op, x, bdims[0], indices, bdims[1])
    return op(x, indices), out_bdim


def _index_put(op, x, x_bdim, indices, index_bdims, values, values_bdim, *args, inplace):
    """Shared by index_put and the index_* ops rewritten as one; returns the
    result and its bdim."""
    if x_bdim is None:  # out-of-place with a batched index or values
        batch = batch_size((indices, values), (tuple(index_bdims or ()), values_bdim))
        x, x_bdim = x.expand((batch,) + tuple(x.shape)), 0
    for i, index in enumerate(indices):
        if index is None or index.dtype not in _MASK_DTYPES:
            continue
        # A mask batched here, or possibly by an outer vmap (a tracer), where
        # nonzero would need one value per example.
        if (index_bdims and index_bdims[i] is not None) or isinstance(index, Tracer):
            out = _masked_put(op, x, x_bdim, indices, index_bdims, values, values_bdim, *args, inplace=inplace)
            if out is not None:
                return out
    x_phys, phys_bdim, indices, out_bdim, indexed_rank = _batch_indices(op, x, x_bdim, indices, index_bdims)
    values = _align_values(values, values_bdim, out_bdim, indexed_rank)
    out = op(x_phys, indices, values, *args)
    return (x, x_bdim) if inplace else (out, phys_bdim)


def _masked_put(op, x, x_bdim, indices, index_bdims, values, values_bdim, accumulate=False, *args, inplace):
    """``x[..., mask] = values`` with a batched mask.  Each example selects its
    own number of elements, but when ``values`` is the same for all of them
    (it broadcasts along the selected elements) the result has a static
    shape: ``where(mask, values, x)``.  Returns None where that does not
    apply and the mask is not batched here (then nonzero may still do).

    # x [B, 4, 5], mask [B, 5] at dim 1, values [4, 1] -> mask [B, 1, 5],
    # values [1, 4, 1]: the selected-elements dim of values, 1, becomes the
    # mask's dims
    """
    advanced = [i for i, index in enumerate(indices) if index is not None]
    position = advanced[0]
    mask = indices[position]
    mask_bdim = index_bdims[position] if index_bdims else None
    mask_rank = mask.dim() - (mask_bdim is not None)
    x_shape = _logical_shape(x, x_bdim)
    indexed_rank = len(x_shape) - mask_rank + 1
    values_shape = _logical_shape(values, values_bdim)
    selected = position - (indexed_rank - len(values_shape))  # values' dim along the selected elements
    if len(advanced) > 1 or mask_rank == 0 or (selected >= 0 and values_shape[selected] != 1):
        if mask_bdim is None:
            return None
        raise _dynamic_shape_error(op, "a boolean mask index that is batched")
    mask_shape = _logical_shape(mask, mask_bdim)
    for j, size in enumerate(mask_shape):
        if position + j >= len(x_shape) or size != x_shape[position + j]:
            raise IndexError(
                f"The shape of the mask {list(mask_shape)} at index {j} does not match the shape of the "
                f"indexed tensor {list(x_shape)} at index {position + j}"
            )
    if len(values_shape) > indexed_rank:
        raise RuntimeError(
            f"shape mismatch: value tensor of shape {list(values_shape)} cannot be broadcast to "
            f"an indexing result of {indexed_rank} dimensions"
        )
    if values.dtype != x.dtype:
        raise RuntimeError(
            f"Index put requires the source and destination dtypes match, got {x.dtype} for the "
            f"destination and {values.dtype} for the source."
        )
    x_front = move_bdim_to_front(x, x_bdim)
    if mask.dtype is not torch.bool:
        mask = mask.bool()
    # [B, *mask] (or unbatched [*mask]) -> [B, 1 * position, *mask, 1 * rest]
    mask = move_bdim_to_front(mask, mask_bdim)
    lead = mask.shape[:1] if mask_bdim is not None else ()
    mask = mask.view(lead + (1,) * position + tuple(mask_shape) + (1,) * (len(x_shape) - position - mask_rank))
    if values_bdim is None:
        values = values.view((1,) * (indexed_rank + 1 - values.dim()) + tuple(values.shape))
    else:
        values = front_padded(values, values_bdim, indexed_rank)
    shape = values.shape
    values = values.view(shape[: position + 1] + (1,) * mask_rank + shape[position + 2 :])
    out = torch.where(mask, x_front + values if accumulate else values, x_front)
    if inplace:
        x_front.copy_(out)
        return x, x_bdim
    return out, 0


def index_put_batch(op, bdims, x, indices, values, *args, inplace=False):
    # args: accumulate (and `unsafe` for _index_put_impl), defaults omitted.
    return _index_put(op, x, bdims[0], indices, bdims[1], values, bdims[2], *args, inplace=inplace)


register_batching_each(
    [
        aten.index_put.default,
        *overloads(aten._unsafe_index_put, "default"),
        *overloads(aten._index_put_impl, "default"),
    ],
    index_put_batch,
)
register_batching_each([aten.index_put_.default, aten._index_put_impl_.default], index_put_batch, inplace=True)


# -- gather / scatter ------------------------------------------------------------


def _front_vector(x, bdim, batch, rank):
    """``x`` batch-first (expanded if unbatched), a logical 0-dim tensor as a
    one-element vector (``[B] -> [B, 1]``): gather and scatter accept 0-dim
    tensors as such."""
    x = materialize(x, bdim, batch)
    return x.unsqueeze(-1) if rank == 0 else x


@register_batching(aten.gather.default)
def gather_batch(bdims, x, dim, index, *, sparse_grad=False):
    x_bdim, index_bdim = bdims[0], bdims[2]
    rank = logical_rank(x, x_bdim)
    index_rank = logical_rank(index, index_bdim)
    d = wrap_dim(dim, rank)
    if x_bdim == index_bdim and rank and index_rank:  # already aligned
        return torch.gather(x, _phys(d, x_bdim), index, sparse_grad=sparse_grad), x_bdim
    batch = batch_size((x, index), (x_bdim, index_bdim))
    x = _front_vector(x, x_bdim, batch, rank)
    out = torch.gather(x, d + 1, _front_vector(index, index_bdim, batch, index_rank), sparse_grad=sparse_grad)
    return (out.squeeze(-1) if index_rank == 0 else out), 0


def scatter_batch(op, bdims, x, dim, index, src, *args, inplace=False, **kwargs):
    """scatter / scatter_add / scatter_reduce (src a tensor or a Python scalar)."""
    x_bdim, index_bdim, src_bdim = bdims[0], bdims[2], bdims[3]
    rank = logical_rank(x, x_bdim)
    d = wrap_dim(dim, rank)
    src_is_tensor = isinstance(src, Tensor)
    index_rank = logical_rank(index, index_bdim)
    src_rank = logical_rank(src, src_bdim) if src_is_tensor else 1
    if x_bdim is not None and x_bdim == index_bdim and (src_bdim == x_bdim or not src_is_tensor):
        if rank and index_rank and src_rank:  # already aligned
            out = op(x, _phys(d, x_bdim), index, src, *args, **kwargs)
            return (x if inplace else out), x_bdim
    batch = batch_size((x, index, src), (x_bdim, index_bdim, src_bdim))
    # In place, self is batched: its front-batched form is a view, which the
    # write reaches.
    x_phys = _front_vector(x, x_bdim, batch, rank)
    index = _front_vector(index, index_bdim, batch, index_rank)
    if src_is_tensor:
        src = _front_vector(src, src_bdim, batch, src_rank)
    out = op(x_phys, d + 1, index, src, *args, **kwargs)
    if inplace:
        return x, x_bdim
    return (out.squeeze(-1) if rank == 0 else out), 0


_SCATTER_OPS = [
    *overloads(aten.scatter, "src", "value", "reduce", "value_reduce"),
    aten.scatter_add.default,
    *overloads(aten.scatter_reduce, "two"),
]
_SCATTER_INPLACE_OPS = [
    *overloads(aten.scatter_, "src", "value", "reduce", "value_reduce"),
    aten.scatter_add_.default,
    *overloads(aten.scatter_reduce_, "two"),
]
register_batching_each(_SCATTER_OPS, scatter_batch)
register_batching_each(_SCATTER_INPLACE_OPS, scatter_batch, inplace=True)


# -- index_select / index_add / index_copy / index_fill / index_reduce -------------
# With an unbatched index these run as themselves on the physical tensors,
# the batch kept where it is.  A batched index differs per example: it
# becomes an advanced index (index_select, index_copy, index_fill: same
# error types as eager) or a scatter with the index expanded (index_add,
# index_reduce).  A logical 0-dim self acts as a one-element vector.


def _per_example_index(index: Tensor, index_bdim: int) -> Tensor:
    """A batched dim index (logical rank 0 or 1) as ``[B, k]``."""
    index = move_bdim_to_front(index, index_bdim)
    return index.unsqueeze(-1) if index.dim() == 1 else index


def _check_index_dtype(name: str, index: Tensor) -> None:
    # Advanced indexing would take a bool index for a mask: check first.
    if index.dtype not in _INDEX_DTYPES:
        raise RuntimeError(f"{name}(): Expected dtype int32 or int64 for index, but got {index.dtype}")


def _expanded_dim_index(index: Tensor, d: int, like: Tensor) -> Tensor:
    """A ``[B, k]`` dim index as a scatter index shaped like front-batched
    ``like`` (k at logical dim ``d``).

    # index [B, 2], like [B, 5, 2, 4], d = 1 -> [B, 1, 2, 1] -> [B, 5, 2, 4]
    """
    shape = [index.shape[0]] + [1] * (like.dim() - 1)
    shape[d + 1] = index.shape[1]
    return index.view(shape).expand(like.shape)


def _squeeze_vector(out: Tensor, out_bdim: int):
    """Undo the one-element-vector view of a 0-dim self: ``[B, 1]`` or
    ``[1, B]`` -> ``[B]``."""
    return out.squeeze(1 - out_bdim), 0


@register_batching(aten.index_select.default)
def index_select_batch(bdims, x, dim, index):
    x_bdim, index_bdim = bdims[0], bdims[2]
    rank = logical_rank(x, x_bdim)
    d = wrap_dim(dim, rank)
    index_rank = logical_rank(index, index_bdim)
    if index_rank > 1:
        raise IndexError("index_select(): Index is supposed to be a vector")
    if rank == 0:
        count = _logical_numel(index, index_bdim)
        if count != 1:
            raise RuntimeError(f"index_select(): Index to scalar can have only 1 value, got {count} value(s)")
        return _squeeze_vector(*index_select_batch(bdims, x.unsqueeze(-1), 0, index))
    if index_bdim is None:
        return x.index_select(_phys(d, x_bdim), index), x_bdim
    _check_index_dtype("index_select", index)
    index = _reject_negative(_per_example_index(index, index_bdim), x.shape[_phys(d, x_bdim)])
    op = aten.index_select.default
    x, _, indices, out_bdim, _ = _batch_indices(op, x, x_bdim, [None] * d + [index], [None] * d + [0])
    try:
        return aten.index.Tensor(x, indices), out_bdim
    except IndexError:
        raise IndexError("index out of range in self") from None


# kind -> (eager's name in messages, error for a non-vector index, error
# type for a source of the wrong size)
_SOURCE_OPS = {
    "add": ("index_add_", "Index is supposed to be a vector, but got dim: {}", RuntimeError),
    "copy": ("index_copy_", "Index should have dimension 1 or 0 (got {})", IndexError),
    "reduce": ("index_reduce_", "Index is supposed to be a vector, but got dim: {}", RuntimeError),
}


def _check_source(kind, x_shape, d, count, source_shape):
    """Eager's shape checks of index_add / index_copy / index_reduce, which the
    scatter and index_put they become under vmap would not all make."""
    name, _, count_error = _SOURCE_OPS[kind]
    if len(source_shape) != len(x_shape):
        raise count_error(
            f"{name}(): When source and destination are not scalars, their dimensionality must "
            f"match. Source dimensionality ({len(source_shape)}), destination dimensionality ({len(x_shape)})"
        )
    if source_shape[d] != count:
        raise count_error(
            f"{name}(): Number of indices ({count}) should be equal to source.size(dim): "
            f"({source_shape[d]}), for dim: {d}"
        )
    if any(i != d and a != b for i, (a, b) in enumerate(zip(x_shape, source_shape))):
        raise RuntimeError(
            f"source tensor shape must match self tensor shape, excluding the specified dimension. "
            f"Got self.shape = {list(x_shape)} source.shape = {list(source_shape)}"
        )


def index_source_batch(op, bdims, x, dim, index, source, *args, kind, inplace=False, **kwargs):
    """index_add(x, dim, index, source, *, alpha), index_copy(x, dim, index,
    source), index_reduce(x, dim, index, source, reduce, *, include_self)."""
    x_bdim, index_bdim, source_bdim = bdims[0], bdims[2], bdims[3]
    rank = logical_rank(x, x_bdim)
    d = wrap_dim(dim, rank)
    if rank == 0 and logical_rank(source, source_bdim) == 0:
        out = index_source_batch(
            op, bdims, x.unsqueeze(-1), 0, index, source.unsqueeze(-1), *args, kind=kind, inplace=inplace, **kwargs
        )
        return (x, x_bdim) if inplace else _squeeze_vector(*out)
    batch = batch_size((x, index, source), (x_bdim, index_bdim, source_bdim))
    if index_bdim is None:
        target = source_bdim if x_bdim is None else x_bdim
        x_phys = x if x_bdim is not None else _at_bdim(x, None, target, batch)
        out = op(x_phys, _phys(d, target), index, _at_bdim(source, source_bdim, target, batch), *args, **kwargs)
        return (x, x_bdim) if inplace else (out, target)

    name, vector_message, _ = _SOURCE_OPS[kind]
    index_rank = logical_rank(index, index_bdim)
    if index_rank > 1:
        raise IndexError(f"{name}(): " + vector_message.format(index_rank))
    _check_index_dtype(name, index)
    index = _per_example_index(index, index_bdim)
    _check_source(kind, _logical_shape(x, x_bdim), d, index.shape[1], _logical_shape(source, source_bdim))
    if kind == "copy":  # an index_put: IndexError for a bad index, as eager
        size = x.shape[_phys(d, x_bdim)]
        index = _reject_negative(index, size)
        put = aten.index_put_.default if inplace else aten.index_put.default
        indices, index_bdims = [None] * d + [index], [None] * d + [0]
        try:
            return _index_put(put, x, x_bdim, indices, index_bdims, source, source_bdim, inplace=inplace)
        except IndexError as error:
            if "out of bounds" not in str(error):
                raise
            raise IndexError(f"index_copy_(): index out of bounds for dimension {d} with size {size}") from None
    x_phys = move_bdim_to_front(x, x_bdim) if inplace else materialize(x, x_bdim, batch)
    source = materialize(source, source_bdim, batch)
    index = _expanded_dim_index(index, d, source)
    if kind == "add":
        alpha = kwargs.get("alpha", 1)
        if alpha != 1:
            source = source * alpha
        scatter = aten.scatter_add_.default if inplace else aten.scatter_add.default
        out = scatter(x_phys, d + 1, index, source)
    else:
        reduce = args[0]
        if reduce not in ("prod", "mean", "amax", "amin"):
            raise RuntimeError(
                f"index_reduce(): Expected reduce to be one of prod, mean, amax or amin but got {reduce}."
            )
        scatter = aten.scatter_reduce_.two if inplace else aten.scatter_reduce.two
        out = scatter(x_phys, d + 1, index, source, reduce, **kwargs)
    return (x, x_bdim) if inplace else (out, 0)


for _kind, _packet, _inplace_packet in [
    ("add", aten.index_add, aten.index_add_),
    ("copy", aten.index_copy, aten.index_copy_),
    ("reduce", aten.index_reduce, aten.index_reduce_),
]:
    register_batching_each(overloads(_packet, "default"), index_source_batch, kind=_kind)
    register_batching_each(overloads(_inplace_packet, "default"), index_source_batch, kind=_kind, inplace=True)


def index_fill_batch(op, bdims, x, dim, index, value, inplace=False):
    x_bdim, index_bdim, value_bdim = bdims[0], bdims[2], bdims[3]
    rank = logical_rank(x, x_bdim)
    d = wrap_dim(dim, rank)
    if rank == 0:
        out = index_fill_batch(op, bdims, x.unsqueeze(-1), 0, index, value, inplace)
        return (x, x_bdim) if inplace else _squeeze_vector(*out)
    if index_bdim is None and value_bdim is None:
        return op(x, _phys(d, x_bdim), index, value), x_bdim
    # A per-example index or fill value: x[:, ..., index] = value.
    if logical_rank(index, index_bdim) > 1:
        raise RuntimeError("Index has to be a vector/scalar")
    _check_index_dtype("index_fill_", index)
    if isinstance(value, Tensor):
        value_rank = logical_rank(value, value_bdim)
        if value_rank:
            raise RuntimeError(
                f"index_fill_ only supports a 0-dimensional value tensor, but got tensor with "
                f"{value_rank} dimension(s)."
            )
        value = value.to(x.dtype)
    else:
        value = torch.tensor(value, dtype=x.dtype, device=x.device)
    if index_bdim is not None:
        index, index_bdim = _per_example_index(index, index_bdim), 0
    put = aten.index_put_.default if inplace else aten.index_put.default
    indices, index_bdims = [None] * d + [index], [None] * d + [index_bdim]
    return _index_put(put, x, x_bdim, indices, index_bdims, value, value_bdim, inplace=inplace)


register_batching_each(overloads(aten.index_fill, "int_Scalar", "int_Tensor"), index_fill_batch)
register_batching_each(overloads(aten.index_fill_, "int_Scalar", "int_Tensor"), index_fill_batch, inplace=True)


# -- take / put ---------------------------------------------------------------------
# Both address the flattened logical tensor: [B, ...] -> [B, N], then an
# advanced index ([:, index] or [arange, index]) wraps negative indices and
# raises IndexError out of range, as take and put do.


def _flat_indices(index, index_bdim, batch, like):
    """Index list addressing ``[B, N]`` with a (per-example or shared) flat index."""
    if index_bdim is None:
        return [None, index]
    index = move_bdim_to_front(index, index_bdim)
    return [_arange_index(batch, index.dim() - 1, like), index]


@register_batching(aten.take.default)
def take_batch(bdims, x, index):
    x_bdim, index_bdim = bdims
    if x_bdim is None:
        return torch.take(x, index), index_bdim
    x = move_bdim_to_front(x, x_bdim)
    batch = x.shape[0]
    return aten.index.Tensor(x.reshape(batch, -1), _flat_indices(index, index_bdim, batch, x)), 0


def put_batch(op, bdims, x, index, source, accumulate=False, inplace=False):
    x_bdim, index_bdim, source_bdim = bdims[0], bdims[1], bdims[2]
    count, source_count = _logical_numel(index, index_bdim), _logical_numel(source, source_bdim)
    if count != source_count:
        raise IndexError(
            f"put_(): Expected source and index to have the same number of elements, but got "
            f"source.numel() = {source_count}, index.numel() = {count}"
        )
    batch = batch_size((x, index, source), (x_bdim, index_bdim, source_bdim))
    x_front = move_bdim_to_front(x, x_bdim) if inplace else materialize(x, x_bdim, batch)
    if index_bdim is None:
        index = index.reshape(-1)
    else:
        index, index_bdim = move_bdim_to_front(index, index_bdim).reshape(batch, -1), 0
    source = source.reshape(-1) if source_bdim is None else move_bdim_to_front(source, source_bdim).reshape(batch, -1)
    flat = aten.index_put.default(
        x_front.reshape(batch, -1), _flat_indices(index, index_bdim, batch, x), source, accumulate
    ).view(x_front.shape)
    if inplace:
        x_front.copy_(flat)
        return x, x_bdim
    return flat, 0


register_batching_each([aten.put.default], put_batch)
register_batching_each([aten.put_.default], put_batch, inplace=True)


# -- masked_scatter ---------------------------------------------------------------
# Each example takes its source elements in order, from its own source:
# the k-th True of an example's mask reads element k of its source.  The
# rank of each True is a cumsum over the flattened mask; a zero slot in
# front of the source absorbs the False positions, so that a source too
# short for the mask still raises (the gather goes out of range).
#   mask [B, 4]: [[0, 1, 1, 0]] -> cumsum*mask [[0, 1, 2, 0]] -> gather from [0, s0, s1, ...]


def _mask_ranks(mask, mask_bdim, shape, batch):
    """The mask broadcast to ``[B, *shape]`` and, flattened, the 1-based rank
    of each True element (0 for False)."""
    mask = front_padded(mask, mask_bdim, len(shape)) if mask_bdim is not None else mask
    mask = mask.expand((batch,) + tuple(shape))
    flat = mask.reshape(batch, -1)
    return mask, flat.cumsum(1) * flat


def masked_scatter_batch(op, bdims, x, mask, source, inplace=False):
    x_bdim, mask_bdim, source_bdim = bdims
    if mask.dtype is not torch.bool:
        raise RuntimeError(f"masked_scatter_ only supports boolean masks, but got mask with dtype {mask.dtype}")
    if source.dtype != x.dtype:
        raise RuntimeError(
            f"masked_scatter: expected self and source to have same dtypes but got {x.dtype} and {source.dtype}"
        )
    batch = batch_size((x, mask, source), bdims)
    x_shape = _logical_shape(x, x_bdim)
    shape = x_shape if inplace else torch.broadcast_shapes(x_shape, _logical_shape(mask, mask_bdim))
    mask, ranks = _mask_ranks(mask, mask_bdim, shape, batch)
    source = materialize(source, source_bdim, batch).reshape(batch, -1)
    padded = torch.cat([torch.zeros((batch, 1), dtype=source.dtype, device=source.device), source], 1)
    try:
        picked = padded.gather(1, ranks).view(mask.shape)
    except RuntimeError as error:
        if "out of bounds" not in str(error):
            raise
        raise RuntimeError("Number of elements of source < number of ones in mask") from None
    if inplace:
        x_front = move_bdim_to_front(x, x_bdim)
        x_front.copy_(torch.where(mask, picked, x_front))
        return x, x_bdim
    x = front_padded(x, x_bdim, len(shape)) if x_bdim is not None else x
    return torch.where(mask, picked, x), 0


register_batching_each([aten.masked_scatter.default], masked_scatter_batch)
register_batching_each([aten.masked_scatter_.default], masked_scatter_batch, inplace=True)


@register_batching(*overloads(aten.masked_scatter_backward, "default"))
def masked_scatter_backward_batch(bdims, grad, mask, sizes):
    """The gradient of masked_scatter's source: the selected elements of
    ``grad`` in order, zero-padded to the source's size."""
    grad_bdim, mask_bdim = bdims[0], bdims[1]
    batch = batch_size((grad, mask), (grad_bdim, mask_bdim))
    shape = torch.broadcast_shapes(_logical_shape(grad, grad_bdim), _logical_shape(mask, mask_bdim))
    _, ranks = _mask_ranks(mask, mask_bdim, shape, batch)
    grad = front_padded(grad, grad_bdim, len(shape)) if grad_bdim is not None else grad
    grad = grad.expand((batch,) + tuple(shape)).reshape(batch, -1)
    numel = 1
    for size in sizes:
        numel *= size
    # Slot 0 collects the unselected elements and is dropped.
    buffer = torch.zeros((batch, numel + 1), dtype=grad.dtype, device=grad.device)
    out = buffer.scatter_add(1, ranks, grad)
    return out[:, 1:].reshape((batch,) + tuple(sizes)), 0


# -- embedding -----------------------------------------------------------------


@register_batching(aten.embedding.default)
def embedding_batch(bdims, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    # padding_idx, scale_grad_by_freq and sparse only concern the backward.
    weight_bdim, indices_bdim = bdims[0], bdims[1]
    if weight_bdim is None:
        return torch.embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse), indices_bdim
    if weight.dim() != 3:
        raise RuntimeError("'weight' must be 2-D")
    if indices.dtype not in _INDEX_DTYPES:
        raise RuntimeError(
            f"Expected tensor for argument #1 'indices' to have one of the following scalar types: "
            f"Long, Int; but got {indices.dtype} instead (while checking arguments for embedding)"
        )
    if indices_bdim is None:
        # One index_select along the vocabulary dim, kept at dim 0 as in eager
        # (its kernel, and error, differ along other dims):
        # weight [V, B, D], indices [2, 3] -> [6, B, D] -> [2, 3, B, D]
        if weight_bdim == 0:
            weight, weight_bdim = weight.movedim(0, 1), 1
        out = weight.index_select(0, indices.reshape(-1))
        return out.view(indices.shape + out.shape[1:]), weight_bdim - 1 + indices.dim()
    weight = move_bdim_to_front(weight, weight_bdim)  # [B, V, D]
    indices = _reject_negative(move_bdim_to_front(indices, indices_bdim), weight.shape[1])
    arange = _arange_index(weight.shape[0], indices.dim() - 1, weight)
    try:
        return aten.index.Tensor(weight, [arange, indices]), 0
    except IndexError:
        raise IndexError("index out of range in self") from None


@register_batching(aten.embedding_dense_backward.default)
def embedding_dense_backward_batch(bdims, grad, indices, num_weights, padding_idx, scale_grad_by_freq):
    """Each example's rows are a block of a ``[B * (V + 1), D]`` gradient:
    indices are offset by ``b * (V + 1)``; row V of each block collects the
    contributions eager drops (out-of-range and padding indices), so they
    cannot reach another example's rows, and is cut off."""
    grad_bdim, indices_bdim = bdims[0], bdims[1]
    batch = batch_size((grad, indices), (grad_bdim, indices_bdim))
    grad = materialize(grad, grad_bdim, batch)  # [B, *indices, D]
    indices = materialize(indices, indices_bdim, batch)  # [B, *indices]
    dropped = (indices < 0) | (indices >= num_weights)
    if 0 <= padding_idx < num_weights:
        dropped = dropped | (indices == padding_idx)
    block = num_weights + 1
    offsets = _arange_index(batch, indices.dim() - 1, indices) * block
    indices = torch.where(dropped, num_weights, indices) + offsets
    out = aten.embedding_dense_backward.default(grad, indices, batch * block, -1, scale_grad_by_freq)
    return out.view(batch, block, -1)[:, :num_weights], 0


@register_batching(aten.embedding_renorm_.default)
def embedding_renorm_batch(bdims, weight, indices, max_norm, norm_type):
    """Rescale, in place, the rows an example's indices refer to whose norm
    exceeds max_norm (eager: ``row *= max_norm / (norm + 1e-7)``)."""
    weight_bdim, indices_bdim = bdims[0], bdims[1]
    weight_front = move_bdim_to_front(weight, weight_bdim)  # [B, V, D]
    batch, vocab = weight_front.shape[0], weight_front.shape[1]
    indices = materialize(indices, indices_bdim, batch).reshape(batch, -1)
    referenced = torch.zeros((batch, vocab), dtype=torch.bool, device=weight.device).scatter(1, indices, True)
    norms = torch.linalg.vector_norm(weight_front, norm_type, dim=-1)
    scale = torch.where(referenced & (norms > max_norm), max_norm / (norms + 1e-7), 1.0)
    weight_front.mul_(scale.unsqueeze(-1).to(weight.dtype))
    return weight, weight_bdim


# -- searchsorted / bucketize ---------------------------------------------------------
# A batched 1-D sorted sequence becomes one row per example, searched with
# that example's values flattened to a row: [B, K] with [B, N] -> [B, N].
# The kernels copy non-contiguous inputs and warn: a moved batch dim is not
# the user's doing, so the rules pass contiguous tensors.


def _search_rows(sorted_sequence, values, batch, **kwargs):
    """searchsorted of front-batched ``values`` (any shape) in the rows of a
    ``[B, K]`` sequence; the result is shaped like ``values``."""
    out = torch.searchsorted(sorted_sequence.contiguous(), values.reshape(batch, -1).contiguous(), **kwargs)
    return out.view(values.shape), 0


def _scalar_value(value, like):
    """A Python scalar as the 0-dim tensor eager compares with: a wrapped
    number, so ``like``'s dtype wins (0.1 is compared in float32)."""
    return torch.full((), value, dtype=torch.result_type(like, value), device=like.device)


@register_batching(aten.searchsorted.Tensor, aten.searchsorted.Scalar)
def searchsorted_batch(op, bdims, sorted_sequence, values, *, sorter=None, **kwargs):
    seq_bdim, values_bdim = bdims[0], bdims[1]
    if op is aten.searchsorted.Scalar:
        values = _scalar_value(values, sorted_sequence)
    if logical_rank(sorted_sequence, seq_bdim) == 0:
        raise RuntimeError(
            "torch.searchsorted(): boundaries tensor should have positive dimension, but got 0 dimension"
        )
    if seq_bdim is None and sorted_sequence.dim() == 1:  # one sequence for every value
        return torch.searchsorted(sorted_sequence, values.contiguous(), sorter=sorter, **kwargs), values_bdim
    batch = batch_size((sorted_sequence, values), (seq_bdim, values_bdim))
    sorted_sequence = materialize(sorted_sequence, seq_bdim, batch)
    if sorter is not None:
        sorter = sorter.expand(sorted_sequence.shape).contiguous()
    values = materialize(values, values_bdim, batch)
    if sorted_sequence.dim() == 2:
        return _search_rows(sorted_sequence, values, batch, sorter=sorter, **kwargs)
    # N-D sequences: leading dims match the values' (checked by the op).
    return torch.searchsorted(sorted_sequence.contiguous(), values.contiguous(), sorter=sorter, **kwargs), 0


@register_batching(aten.bucketize.Tensor, aten.bucketize.Scalar)
def bucketize_batch(op, bdims, values, boundaries, *, out_int32=False, right=False):
    values_bdim, boundaries_bdim = bdims[0], bdims[1]
    boundaries_rank = logical_rank(boundaries, boundaries_bdim)
    if boundaries_rank != 1:
        raise RuntimeError(f"boundaries tensor must be 1 dimension, but got dim({boundaries_rank})")
    if boundaries_bdim is None:
        return torch.bucketize(values.contiguous(), boundaries, out_int32=out_int32, right=right), values_bdim
    if op is aten.bucketize.Scalar:
        values = _scalar_value(values, boundaries)
    batch = boundaries.shape[boundaries_bdim]
    boundaries = move_bdim_to_front(boundaries, boundaries_bdim)
    values = materialize(values, values_bdim, batch)
    # bucketize(v, b, right) is searchsorted(b, v, right).
    return _search_rows(boundaries, values, batch, out_int32=out_int32, right=right)


# -- isin ------------------------------------------------------------------------


@register_batching(*overloads(aten.isin, "Tensor_Tensor", "Tensor_Scalar", "Scalar_Tensor"))
def isin_batch(op, bdims, elements, test_elements, *, assume_unique=False, invert=False):
    elements_bdim, test_bdim = bdims[0], bdims[1]
    if test_bdim is None:  # one set for every example: elementwise
        return op(elements, test_elements, assume_unique=assume_unique, invert=invert), elements_bdim
    batch = test_elements.shape[test_bdim]
    test = move_bdim_to_front(test_elements, test_bdim).reshape(batch, -1)
    scalar_element = op is aten.isin.Scalar_Tensor
    dtype = torch.result_type(test, elements) if scalar_element else torch.promote_types(elements.dtype, test.dtype)
    if dtype is torch.bool or dtype.is_complex:
        raise RuntimeError(f"Unsupported input type encountered for isin(): {dtype}")
    if scalar_element:
        found = (test == elements).any(1)
        return (found.logical_not() if invert else found), 0
    # Per-example sets: search each example's elements in its sorted set.
    elements = materialize(elements, elements_bdim, batch)
    flat = elements.reshape(batch, -1).to(dtype).contiguous()
    if test.shape[1] == 0:
        found = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    else:
        ordered = test.to(dtype).sort(1).values
        position = torch.searchsorted(ordered, flat).clamp(max=ordered.shape[1] - 1)
        found = ordered.gather(1, position) == flat
    found = found.view(elements.shape)
    return (found.logical_not() if invert else found), 0


# -- repeat_interleave ----------------------------------------------------------
# repeat_interleave.self_int / self_Tensor are CompositeImplicit: they reach
# vmap as expand/clone/view, or as repeat_interleave.Tensor(repeats) and an
# index_select.  With repeats unbatched the indices are computed outside
# vmap; batched repeats give each example its own output length.


@register_batching(aten.repeat_interleave.Tensor, error=True)
def repeat_interleave_batch(bdims, repeats, *, output_size=None):
    raise _dynamic_shape_error(aten.repeat_interleave.Tensor, "batched `repeats`")


# -- select_scatter / slice_scatter / diagonal_scatter ---------------------------
# Write `src` into a view of a copy of self (the backward of select, slice and
# diagonal, and functionalized writes into views).  With both batch dims in
# front, the physical view (dims shifted by one) has the batch in front too,
# where `src` has it.  as_strided_scatter, whose result depends on self's
# storage, has its rule in view.py (NOTE [as_strided under vmap]).

# op -> (defaults of the arguments after `src`, positions among them that are dims)
_VIEW_SCATTERS = {
    aten.select_scatter.default: ((None, None), (0,)),
    aten.slice_scatter.default: ((0, None, None, 1), (0,)),
    aten.diagonal_scatter.default: ((0, 0, 1), (1, 2)),
}


def view_scatter_batch(op, bdims, x, src, *args):
    defaults, dim_positions = _VIEW_SCATTERS[op]
    batch = batch_size((x, src), bdims[:2])
    rank = logical_rank(x, bdims[0])
    args = list(args) + list(defaults[len(args) :])
    for position in dim_positions:
        args[position] = wrap_dim(args[position], rank) + 1
    return op(materialize(x, bdims[0], batch), materialize(src, bdims[1], batch), *args), 0


register_batching_each(_VIEW_SCATTERS, view_scatter_batch)


# ==========================================================================
# Derivatives (formulas from derivatives.yaml).  Reading at positions and
# writing at them are each other's transposes: the VJP of a read (index,
# index_select, gather, take, masked_select, embedding) accumulates the
# cotangent into zeros at the positions read; the VJP of a write gathers the
# cotangent back for the written source and zeroes the overwritten positions
# of self.  Rules use the forward ops of this family, whose VJP rules below
# serve each other's second order and whose batching rules above vmap them.
# Integer indices and masks get no gradient.
# ==========================================================================

class _Scattered:
    """The positions that scatter/gather's ``index`` addresses along ``dim``:
    element ``i`` of a source goes to ``index[i]`` along ``dim``."""

    def __init__(self, dim, index):
        self.dim, self.index = dim, index

    def take(self, t):
        return t.gather(self.dim, self.index)

    def add(self, base, t):
        return base.scatter_add(self.dim, self.index, t)

    def zero(self, t):
        return t.scatter(self.dim, self.index, 0)

    def reduce(self, base, source, reduce, include_self):
        return base.scatter_reduce(self.dim, self.index, source, reduce, include_self=include_self)

    def used(self, source):
        """The part of ``source`` the op reads: a source may be larger than
        index, its other elements are ignored."""
        for d, size in enumerate(self.index.shape):
            if source.shape[d] != size:
                source = source.narrow(d, 0, size)
        return source

    def source_grad(self, g, meta):
        """``g`` (index-shaped) as the gradient of a source of ``meta``: zero
        where the source was not read."""
        if g.shape == meta[0]:
            return g
        out = g.new_zeros(meta[0])
        region = out
        for d, size in enumerate(g.shape):
            region = region.narrow(d, 0, size)
        region.copy_(g)
        return out


class _Selected(_Scattered):
    """The slices along ``dim`` that the index_* ops address: slice ``i`` of a
    source goes to slice ``index[i]``."""

    def __init__(self, dim, index, source_meta):
        super().__init__(dim, index)
        self.source_shape = source_meta[0]

    def take(self, t):
        # A 0-dim source of a 0-dim self (one-element index): reshape.
        out = t.index_select(self.dim, self.index)
        return out if out.shape == self.source_shape else out.reshape(self.source_shape)

    def add(self, base, t):
        return base.index_add(self.dim, self.index, t)

    def zero(self, t):
        return t.index_fill(self.dim, self.index, 0)

    def reduce(self, base, source, reduce, include_self):
        return base.index_reduce(self.dim, self.index, source, reduce, include_self=include_self)

    def used(self, source):
        return source

    def source_grad(self, g, meta):
        return g


# -- reads: index, index_select, gather, take, masked_select, embedding ---------


@register_vjp(aten.index.Tensor, *overloads(aten._unsafe_index, "Tensor"))
def index_vjp(grad, inputs_meta, indices):
    return (aten.index_put.default(grad.new_zeros(inputs_meta[0][0]), indices, grad, True),)


@register_vjp(aten.index_select.default)
def index_select_vjp(grad, inputs_meta, dim, index):
    return (grad.new_zeros(inputs_meta[0][0]).index_add(dim, index, grad),)


@register_vjp(aten.gather.default)
def gather_vjp(grad, inputs_meta, dim, index):
    # sparse_grad=True still gets a dense gradient.
    return (grad.new_zeros(inputs_meta[0][0]).scatter_add(dim, index, grad),)


@register_vjp(aten.take.default)
def take_vjp(grad, inputs_meta, index):
    return (grad.new_zeros(inputs_meta[0][0]).put(index, grad, accumulate=True),)


@register_vjp(aten.masked_select.default)
def masked_select_vjp(grad, inputs_meta, mask):
    shape = torch.broadcast_shapes(inputs_meta[0][0], mask.shape)
    return (reduce_to(grad.new_zeros(shape).masked_scatter(mask, grad), inputs_meta[0]),)


@register_vjp(aten.embedding.default)
def embedding_vjp(grad, inputs_meta, indices, padding_idx=-1, scale_grad_by_freq=False):
    # sparse=True still gets a dense gradient.
    num_weights = inputs_meta[0][0][0]
    return (aten.embedding_dense_backward.default(grad, indices, num_weights, padding_idx, scale_grad_by_freq),)


@register_vjp(aten.embedding_dense_backward.default)
def embedding_dense_backward_vjp(grad, indices, num_weights, padding_idx, scale_grad_by_freq):
    """The weight gradient is linear in grad_output: row i of the result is
    row ``indices[i]`` of the cotangent, zero for padding_idx, divided by
    that index's count with scale_grad_by_freq (torch.autograd's double
    backward leaves the division out)."""
    flat = indices.reshape(-1)
    rows = grad.index_select(0, flat)
    if padding_idx >= 0:
        rows = rows.masked_fill((flat == padding_idx).unsqueeze(-1), 0)
    if scale_grad_by_freq:
        ones = torch.ones(flat.shape, dtype=grad.dtype, device=grad.device)
        counts = torch.zeros(num_weights, dtype=grad.dtype, device=grad.device).index_add(0, flat, ones)
        rows = rows / counts.index_select(0, flat).unsqueeze(-1)
    return (rows.view(tuple(indices.shape) + (grad.shape[-1],)),)


# embedding_bag: derivatives.yaml's _embedding_bag_backward and
# _embedding_bag_per_sample_weights_backward, written with index_select /
# index_add so that they batch and differentiate again.  Mode 0 sums each
# bag's rows (times per_sample_weights), 1 averages the non-padding ones,
# 2 takes each column's max (at result3, the argmax rows).
_EMBEDDING_BAG_SUM, _EMBEDDING_BAG_MEAN, _EMBEDDING_BAG_MAX = 0, 1, 2


@register_vjp(*overloads(aten._embedding_bag, "default"), *overloads(aten._embedding_bag_forward_only, "default"))
def embedding_bag_vjp(grad, weight, indices, result, needs, scale_grad_by_freq=False, mode=0, sparse=False,
                      per_sample_weights=None, include_last_offset=False, padding_idx=-1):
    grad = grad[0]
    if grad is None:
        return (None,)
    offset2bag, bag_size, max_indices = result[1], result[2], result[3]
    num_weights = weight.shape[0]
    weight_grad = psw_grad = None
    counts = None
    if scale_grad_by_freq:
        ones = torch.ones(indices.shape, dtype=grad.dtype, device=grad.device)
        counts = torch.zeros(num_weights, dtype=grad.dtype, device=grad.device).index_add(0, indices, ones)
    keep = (indices != padding_idx).to(grad.dtype).unsqueeze(1)  # [n, 1]; padding_idx -1: none
    if needs[0]:
        if mode == _EMBEDDING_BAG_MAX:
            # [bags, D]: each column's cotangent goes to its argmax row (none for empty bags)
            rows = grad * (bag_size > 0).to(grad.dtype).unsqueeze(1)
            if counts is not None:
                rows = rows / counts[max_indices].clamp(min=1)
            weight_grad = grad.new_zeros((num_weights,) + tuple(grad.shape[1:])).scatter_add(0, max_indices, rows)
        else:
            rows = grad.index_select(0, offset2bag) * keep  # [n, D]
            if mode == _EMBEDDING_BAG_MEAN:
                rows = rows / bag_size.index_select(0, offset2bag).clamp(min=1).to(grad.dtype).unsqueeze(1)
            if per_sample_weights is not None:
                rows = rows * per_sample_weights.unsqueeze(1)
            if counts is not None:
                rows = rows / counts.index_select(0, indices).unsqueeze(1)
            weight_grad = grad.new_zeros((num_weights,) + tuple(grad.shape[1:])).index_add(0, indices, rows)
    if len(needs) > 6 and needs[6] and per_sample_weights is not None:
        if mode != _EMBEDDING_BAG_SUM:
            raise RuntimeError("embedding_bag: per_sample_weights only supported with mode='sum'")
        rows = grad.index_select(0, offset2bag) * weight.index_select(0, indices) * keep
        psw_grad = rows.sum(1)
    return (weight_grad, None, None, None, None, None, psw_grad)


# -- writes: index_put, put, masked_scatter, scatter, index_add/copy/fill --------


@register_vjp(
    aten.index_put.default,
    aten.index_put_.default,
    *overloads(aten._unsafe_index_put, "default"),
    *overloads(aten._index_put_impl, "default"),
    aten._index_put_impl_.default,
)
def index_put_vjp(grad, needs, inputs_meta, indices, accumulate=False):
    grad_self = grad_values = None
    if needs[0]:
        grad_self = grad if accumulate else aten.index_put.default(grad, indices, grad.new_zeros(()), False)
    if needs[2]:
        grad_values = reduce_to(aten.index.Tensor(grad, indices), inputs_meta[2])
    return grad_self, None, grad_values


@register_vjp(aten.put.default, aten.put_.default)
def put_vjp(grad, needs, inputs_meta, index, accumulate=False):
    grad_self = grad_source = None
    if needs[0]:
        grad_self = grad if accumulate else grad.put(index, grad.new_zeros(inputs_meta[2][0]))
    if needs[2]:
        grad_source = grad.take(index).reshape(inputs_meta[2][0])
    return grad_self, None, grad_source


@register_vjp(aten.masked_scatter.default, aten.masked_scatter_.default)
def masked_scatter_vjp(grad, needs, inputs_meta, mask):
    grad_self = grad_source = None
    if needs[0]:
        grad_self = reduce_to(grad.masked_fill(mask, 0), inputs_meta[0])
    if needs[2]:
        grad_source = aten.masked_scatter_backward.default(grad, mask, inputs_meta[2][0])
    return grad_self, None, grad_source


@register_vjp(*overloads(aten.masked_scatter_backward, "default"))
def masked_scatter_backward_vjp(grad, inputs_meta, mask):
    return (grad.new_zeros(inputs_meta[0][0]).masked_scatter(mask, grad),)


def _write_vjp(positions, grad, needs, inputs_meta, *, accumulate, alpha=1):
    """Ops writing a source (position 3) at ``positions`` of self: self's
    gradient is grad (accumulated) or grad with the written positions zeroed
    (overwritten); the source's is grad read back at those positions."""
    grad_self = grad_source = None
    if needs[0]:
        grad_self = grad if accumulate else positions.zero(grad)
    if needs[3]:
        grad_source = positions.source_grad(positions.take(grad), inputs_meta[3])
        if alpha != 1:
            grad_source = grad_source * alpha
    return grad_self, None, None, grad_source


@register_vjp(*overloads(aten.scatter, "src", "value"), *overloads(aten.scatter_, "src", "value"))
def scatter_vjp(grad, needs, inputs_meta, dim, index):
    return _write_vjp(_Scattered(dim, index), grad, needs, inputs_meta, accumulate=False)


@register_vjp(aten.scatter_add.default, aten.scatter_add_.default)
def scatter_add_vjp(grad, needs, inputs_meta, dim, index):
    return _write_vjp(_Scattered(dim, index), grad, needs, inputs_meta, accumulate=True)


@register_vjp(*overloads(aten.index_add, "default"), *overloads(aten.index_add_, "default"))
def index_add_vjp(grad, needs, inputs_meta, dim, index, alpha=1):
    positions = _Selected(dim, index, inputs_meta[3])
    return _write_vjp(positions, grad, needs, inputs_meta, accumulate=True, alpha=alpha)


@register_vjp(*overloads(aten.index_copy, "default"), *overloads(aten.index_copy_, "default"))
def index_copy_vjp(grad, needs, inputs_meta, dim, index):
    return _write_vjp(_Selected(dim, index, inputs_meta[3]), grad, needs, inputs_meta, accumulate=False)


@register_vjp(
    *overloads(aten.index_fill, "int_Scalar", "int_Tensor"), *overloads(aten.index_fill_, "int_Scalar", "int_Tensor")
)
def index_fill_vjp(grad, needs, inputs_meta, dim, index):
    grad_self = grad.index_fill(dim, index, 0)
    grad_value = None
    if needs[3]:  # the filled positions, each once (repeated indices fill once)
        grad_value = reduce_to((grad - grad_self).sum(), inputs_meta[3])
    return (grad_self if needs[0] else None), None, None, grad_value


# -- scatter_reduce / index_reduce ---------------------------------------------------


def _prod_source_grad(positions, grad, self, source, result, reduce_again):
    """d result / d source_j is the product of everything else reduced into
    source_j's slot.  For a nonzero source that is result / source_j; for a
    zero one it is the result with the zero sources replaced by 1, times the
    other zero sources of the slot (1 when it is the only one; the other one
    when there are two; beyond two, zero with zero derivative).  Written so
    that the second derivative is exact too (torch.autograd raises for two
    zeros in one slot)."""
    is_zero = source == 0
    zeros_in_slot = positions.take(positions.add(torch.zeros_like(self), is_zero.to(self.dtype)))
    # The zero sources of the slot, summed: value 0, derivative 1 for each.
    zero_sum = positions.take(positions.add(torch.zeros_like(self), source * is_zero))
    others = torch.where(zeros_in_slot == 1, 1.0, torch.where(zeros_in_slot == 2, zero_sum - source, 0.0))
    without_zeros = positions.take(grad * reduce_again(self, source.masked_fill(is_zero, 1))) * others
    nonzero = positions.take(grad * result) / source.masked_fill(is_zero, 1)
    return torch.where(is_zero, without_zeros, nonzero)


def _reduce_vjp(positions, grad, needs, self, source, result, reduce, include_self):
    """FunctionsManual's scatter_reduce_backward / index_reduce_backward."""
    grad_self = grad_source = None
    if reduce == "sum":
        grad_self = grad
        grad_source = positions.take(grad) if needs[3] else None
    elif reduce == "mean":
        initial = torch.ones_like(self) if include_self else torch.zeros_like(self)
        counts = positions.add(initial, torch.ones_like(source))
        grad_self = grad / counts.clamp(min=1)
        grad_source = positions.take(grad_self) if needs[3] else None
    elif reduce in ("amax", "amin"):
        # Ties share the cotangent evenly.
        self_is = (self == result).to(grad.dtype)
        source_is = (source == positions.take(result)).to(grad.dtype)
        distributed = grad / positions.add(self_is, source_is)
        grad_self = self_is * distributed
        grad_source = source_is * positions.take(distributed) if needs[3] else None
    elif reduce == "prod":

        def reduce_again(base, values):
            return positions.reduce(base, values, reduce, include_self)

        # The product is holomorphic: its VJP is conj(J^T conj(grad)), the
        # real formulas below being J^T applied to a cotangent.
        complex_grad = grad.is_complex()
        grad = grad.conj() if complex_grad else grad
        if needs[0]:
            masked_self = self.masked_fill(self == 0, 1)
            grad_self = grad * reduce_again(masked_self, source) / masked_self
        if needs[3]:
            grad_source = _prod_source_grad(positions, grad, self, source, result, reduce_again)
        if complex_grad:
            grad_self = grad_self.conj() if grad_self is not None else None
            grad_source = grad_source.conj() if grad_source is not None else None
    if grad_self is not None and not include_self:
        grad_self = positions.zero(grad_self)
    return (grad_self if needs[0] else None), None, None, grad_source


@register_vjp(*overloads(aten.scatter_reduce, "two"), *overloads(aten.scatter_reduce_, "two"))
def scatter_reduce_vjp(grad, needs, inputs_meta, self, dim, index, src, reduce, result, include_self=True):
    positions = _Scattered(dim, index)
    used = positions.used(src)
    grad_self, _, _, grad_src = _reduce_vjp(positions, grad, needs, self, used, result, reduce, include_self)
    if grad_src is not None:
        grad_src = positions.source_grad(grad_src, inputs_meta[3])
    return grad_self, None, None, grad_src


@register_vjp(*overloads(aten.index_reduce, "default"), *overloads(aten.index_reduce_, "default"))
def index_reduce_vjp(grad, needs, inputs_meta, self, dim, index, source, reduce, result, include_self=True):
    positions = _Selected(dim, index, inputs_meta[3])
    return _reduce_vjp(positions, grad, needs, self, source, result, reduce, include_self)


# -- select_scatter / slice_scatter / diagonal_scatter --------------------------
# self: grad with the view region zeroed; src: the view of grad.


def _view_scatter_vjp(scatter, view, grad, needs, inputs_meta, *args):
    grad_self = scatter(grad, grad.new_zeros(inputs_meta[1][0]), *args) if needs[0] else None
    grad_src = view(grad, *args) if needs[1] else None
    return grad_self, grad_src


@register_vjp(aten.select_scatter.default)
def select_scatter_vjp(grad, needs, inputs_meta, dim, index):
    return _view_scatter_vjp(aten.select_scatter.default, aten.select.int, grad, needs, inputs_meta, dim, index)


@register_vjp(aten.slice_scatter.default)
def slice_scatter_vjp(grad, needs, inputs_meta, dim=0, start=None, end=None, step=1):
    args = (dim, start, end, step)
    return _view_scatter_vjp(aten.slice_scatter.default, aten.slice.Tensor, grad, needs, inputs_meta, *args)


@register_vjp(aten.diagonal_scatter.default)
def diagonal_scatter_vjp(grad, needs, inputs_meta, offset=0, dim1=0, dim2=1):
    args = (offset, dim1, dim2)
    return _view_scatter_vjp(aten.diagonal_scatter.default, aten.diagonal.default, grad, needs, inputs_meta, *args)


# -- integer and boolean outputs --------------------------------------------------

register_nondifferentiable(
    *overloads(aten.searchsorted, "Tensor", "Scalar"),
    *overloads(aten.bucketize, "Tensor", "Scalar"),
    *overloads(aten.isin, "Tensor_Tensor", "Tensor_Scalar", "Scalar_Tensor"),
    aten.nonzero.default,
    *overloads(aten.nonzero_static, "default"),
    aten.argwhere.default,
)


# ==========================================================================
# -- JVPs
# Every op of this family but scatter_reduce / index_reduce with amax, amin
# or prod is linear in its floating inputs (derivatives.yaml: auto_linear,
# `self_t.index_put(indices, values_t, accumulate)`, `self_t.scatter(dim,
# index, src_t)`, ...): the JVP is the op on the tangents, zeros standing in
# for inputs without one, 0 for a fill value.  In-place forms apply their
# functional op: a tangent is never written in place (it may be expanded,
# or the user's; see NOTE [Tangents of views]).
# ==========================================================================

def _inplace_linear_jvp(op, zero=()):
    """The JVP rule of an in-place ``op`` linear in its floating inputs: its
    functional op on the tangents.  The rule names every argument but self,
    so the interpreter keeps no copy of self from before the write; the
    written ``result`` has self's shape and dtype, all ``linear_jvp`` reads
    of self's primal."""
    functional, linear = functional_counterpart(op), linear_jvp(zero)
    arguments = op._schema.arguments
    positional = [a.name for a in arguments[1:] if not a.kwarg_only]
    keyword = [a.name for a in arguments if a.kwarg_only]

    def rule(tangents, result, **given):
        primals = [result] + [given[name] for name in positional]
        return linear(functional, primals, tangents, {name: given[name] for name in keyword}, result)

    rule.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in ("tangents", "result")]
        + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in positional + keyword]
    )
    rule.__qualname__ = f"inplace_linear_jvp({op})"
    return rule


def _register_linear_jvps(ops, zero=()):
    out_of_place = linear_jvp(zero)
    for op in ops:
        register_jvp(op)(_inplace_linear_jvp(op, zero) if mutates_self(op) else out_of_place)


_register_linear_jvps(
    [
        aten.index.Tensor,
        *overloads(aten._unsafe_index, "Tensor"),
        aten.index_put.default,
        aten.index_put_.default,
        *overloads(aten._unsafe_index_put, "default"),
        *overloads(aten._index_put_impl, "default"),
        aten._index_put_impl_.default,
        aten.index_select.default,
        aten.gather.default,
        aten.take.default,
        aten.put.default,
        aten.put_.default,
        *overloads(aten.scatter, "src"),
        *overloads(aten.scatter_, "src"),
        aten.scatter_add.default,
        aten.scatter_add_.default,
        *overloads(aten.index_add, "default"),
        *overloads(aten.index_add_, "default"),
        *overloads(aten.index_copy, "default"),
        *overloads(aten.index_copy_, "default"),
        aten.masked_scatter.default,
        aten.masked_scatter_.default,
        *overloads(aten.masked_scatter_backward, "default"),
        aten.embedding.default,
        aten.embedding_dense_backward.default,
        aten.select_scatter.default,
        aten.slice_scatter.default,
        aten.diagonal_scatter.default,
    ]
)
_register_linear_jvps(
    [
        *overloads(aten.scatter, "value"),
        *overloads(aten.scatter_, "value"),
        *overloads(aten.index_fill, "int_Scalar"),
        *overloads(aten.index_fill_, "int_Scalar"),
    ],
    zero=("value",),
)


@register_jvp(*overloads(aten.index_fill, "int_Tensor"), *overloads(aten.index_fill_, "int_Tensor"))
def index_fill_tensor_jvp(self_t, value_t, dim, index, result):
    """``self_t.index_fill(dim, index, value_t)``; a value without a tangent
    (an integer one too) fills 0."""
    base = self_t if self_t is not None else torch.zeros_like(result)
    return base.index_fill(dim, index, value_t if value_t is not None else 0)


@register_jvp(aten.masked_select.default)
def masked_select_jvp(self_t, mask):
    return aten.masked_select.default(self_t, mask)


# -- scatter_reduce / index_reduce: derivatives.yaml's scatter_reduce_jvp ------
# (index_reduce has no forward formula there; the same one serves).


def _reduce_jvp(positions, self, self_t, source, source_t, result, reduce, include_self):
    """sum and mean are linear; amax and amin average the tangents of the
    elements tied at the extreme (self only where it takes part); prod sums
    each factor's tangent times the product of the others, exact with zeros
    (see _prod_source_grad)."""
    if self_t is None:
        self_t = torch.zeros_like(result)
    if source_t is None:
        source_t = torch.zeros_like(source)
    if reduce in ("sum", "mean"):
        return positions.reduce(self_t, source_t, reduce, include_self)
    if reduce in ("amax", "amin"):
        self_is = (self == result).to(result.dtype)
        if not include_self:
            self_is = positions.zero(self_is)
        source_is = (source == positions.take(result)).to(result.dtype)
        count = positions.add(self_is, source_is)
        return positions.add(self_is * self_t, source_is * source_t) / count
    if reduce == "prod":

        def reduce_again(base, values):
            return positions.reduce(base, values, reduce, include_self)

        # d result / d self: the product of the sources (1 where none went);
        # self takes no part where include_self=False and a source went.
        self_part = self_t if include_self else positions.zero(self_t)
        self_term = self_part * positions.reduce(torch.ones_like(self), source, "prod", True)
        source_partials = _prod_source_grad(positions, 1, self, source, result, reduce_again)
        return positions.add(self_term, source_t * source_partials)
    raise RuntimeError(f"jvp: scatter_reduce/index_reduce: unknown reduce {reduce!r}")


@register_jvp(*overloads(aten.scatter_reduce, "two"), *overloads(aten.scatter_reduce_, "two"))
def scatter_reduce_jvp(self, self_t, dim, index, src, src_t, reduce, result, include_self=True):
    positions = _Scattered(dim, index)
    source_t = positions.used(src_t) if src_t is not None else None
    return _reduce_jvp(positions, self, self_t, positions.used(src), source_t, result, reduce, include_self)


@register_jvp(*overloads(aten.index_reduce, "default"), *overloads(aten.index_reduce_, "default"))
def index_reduce_jvp(self, self_t, dim, index, source, source_t, reduce, result, include_self=True):
    positions = _Selected(dim, index, (source.shape,))
    return _reduce_jvp(positions, self, self_t, source, source_t, result, reduce, include_self)
