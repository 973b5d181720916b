"""Ops whose result depends on tensor values in a way vmap cannot batch:
Python scalars read out of a tensor (``.item()``, ``bool(t)``) and outputs
whose shape depends on the data (``nonzero``, ``unique``, ...).  Each gets a
rule that raises a clear error naming the op, as torch.func does.
"""

from __future__ import annotations

import torch

from .._core.registry import ERROR_RULES, overloads, register_batching, register_batching_each
from ._batching import batch_size, front_padded, logical_rank, materialize, move_bdim_to_front, raise_as_eager

aten = torch.ops.aten


@register_batching(aten._local_scalar_dense.default, error=True)
def item_batch(bdims, x):
    raise RuntimeError(
        "vmap: It looks like you're calling .item() on a Tensor (or using it in Python control "
        "flow such as `if t:` / bool(t), which calls .item()). Inside vmap the tensor holds one "
        "value per batch element, so there is no single Python number to return. Rewrite with "
        "tensor operations (e.g. torch.where instead of if/else), or compute the value outside vmap."
    )


@register_batching(*overloads(aten.is_nonzero, "default"), error=True)
def is_nonzero_batch(bdims, x):
    raise RuntimeError(
        "vmap: It looks like you're attempting to use a Tensor in some data-dependent control "
        "flow (bool(t), `if t:`, `while t:`). Inside vmap the tensor holds one value per batch "
        "element, so Python cannot branch on it. Use torch.where or masking instead."
    )


_DYNAMIC_SHAPE_OPS = [
    *overloads(aten.unique_consecutive, "default"),
    *overloads(aten.unique_dim, "default"),
    *overloads(aten._unique, "default"),
    *overloads(aten._unique2, "default"),
    *overloads(aten.unique_dim_consecutive, "default"),
    *overloads(aten.nonzero_numpy, "default"),
]


def _dynamic_shape_error(op, detail=""):
    return RuntimeError(
        f"vmap: We do not support batching operators that can output dynamic shape. Attempted to "
        f"vmap over {op}: its output shape depends on the values of its input, so different batch "
        f"elements could need different shapes{detail}. Compute it outside vmap, or use a fixed-size "
        f"alternative (e.g. a boolean mask with torch.where instead of nonzero/masked_select)."
    )


def _dynamic_shape_batch(op, bdims, *args, **kwargs):
    raise _dynamic_shape_error(op)


register_batching_each(_DYNAMIC_SHAPE_OPS, _dynamic_shape_batch)
ERROR_RULES.update(_DYNAMIC_SHAPE_OPS)


# NOTE [Data-dependent sizes that agree]
# nonzero, masked_select with a batched mask, and bincount have output sizes
# that depend on the values.  When every example's output has the same size
# (as torch.func's per-example fallback requires too), the result has that
# size; when the sizes differ, the clear dynamic-shape error is raised.  The
# sizes are read as Python ints and the whole batch is computed at once;
# where the values cannot be read at this level (a lower vmap level batches
# them), the op runs once per example, one level down, and the results are
# stacked when their shapes agree.


class _Unreadable(Exception):
    """The per-example sizes cannot be read at this level."""


def _common_size(op, sizes: torch.Tensor) -> int:
    """The one value of the per-example ``sizes`` (a 1-D integer tensor), or
    the dynamic-shape error.  See NOTE [Data-dependent sizes that agree]."""
    try:
        values = sizes.tolist()
    except RuntimeError as error:
        raise _Unreadable() from error
    if any(v != values[0] for v in values):
        raise _dynamic_shape_error(op, f" (here: {values})")
    return int(values[0]) if values else 0


def _stacked_examples(op, bdims, args, kwargs):
    batch = batch_size(args, bdims)
    outs = [
        op(*[a if b is None else a.select(b, i) for a, b in zip(args, bdims)], **kwargs) for i in range(batch)
    ]
    shapes = [list(o.shape) for o in outs]
    if any(shape != shapes[0] for shape in shapes):
        raise _dynamic_shape_error(op, f" (here: {shapes})")
    return torch.stack(outs), 0


def _sizes_that_agree(rule):
    """See NOTE [Data-dependent sizes that agree]."""

    def checked(op, bdims, *args, **kwargs):
        try:
            return rule(op, bdims, *args, **kwargs)
        except _Unreadable:
            return _stacked_examples(op, bdims, args, kwargs)

    return checked


def nonzero_batch(op, bdims, x):
    """See NOTE [Data-dependent sizes that agree].
    # [B, *shape] -> nonzero rows (b, i...) sorted by b -> [B, count, rank]"""
    x = move_bdim_to_front(x, bdims[0])
    batch, rank = x.shape[0], x.dim() - 1
    count = _common_size(op, (x != 0).reshape(batch, -1).sum(1))
    return x.nonzero()[:, 1:].reshape(batch, count, rank), 0


def masked_select_batch(op, bdims, x, mask):
    """An unbatched mask selects the same positions of every example; a
    batched one is NOTE [Data-dependent sizes that agree]."""
    x_bdim, mask_bdim = bdims
    batch = batch_size((x, mask), bdims)
    rank = max(logical_rank(x, x_bdim), logical_rank(mask, mask_bdim))
    x = front_padded(x, x_bdim, rank) if x_bdim is not None else x
    try:
        shape = torch.broadcast_shapes(x.shape[1:] if x_bdim is not None else x.shape,
                                       mask.shape[1:] if mask_bdim is not None else mask.shape)
    except RuntimeError as error:
        raise_as_eager(op, bdims, (x, mask), error=error)
    x = materialize(x, x_bdim, batch).expand((batch,) + tuple(shape)).reshape(batch, -1)
    if mask_bdim is None:
        # [B, *shape] -> [B, N] -> the masked positions of each example
        positions = mask.expand(shape).reshape(-1).nonzero().squeeze(1)
        return x.index_select(1, positions), 0
    mask = front_padded(mask, mask_bdim, rank).expand((batch,) + tuple(shape)).reshape(batch, -1)
    count = _common_size(op, mask.sum(1))
    columns = mask.nonzero()[:, 1].reshape(batch, count)
    return x.gather(1, columns), 0


def bincount_batch(op, bdims, x, weights=None, minlength=0):
    """Each example's counts in its own block of one bincount.  See NOTE
    [Data-dependent sizes that agree]: the length is max(minlength, max + 1).
    # [B, n] + b * length -> bincount of B * length -> [B, length]"""
    batch = batch_size((x, weights), bdims)
    if (weights is not None and logical_rank(weights, bdims[1]) != 1) or logical_rank(x, bdims[0]) != 1:
        raise_as_eager(op, bdims, (x, weights, minlength))
    x = materialize(x, bdims[0], batch)
    if x.shape[1] == 0:
        length = minlength
    else:
        if _common_size(op, (x.amin(1) < 0).any().reshape(1)):
            raise_as_eager(op, bdims, (x, weights, minlength), error=RuntimeError("bincount only supports 1-d non-negative integral inputs."))
        length = max(minlength, _common_size(op, x.amax(1) + 1))
    offsets = torch.arange(batch, device=x.device, dtype=x.dtype).unsqueeze(1) * length
    if weights is not None:
        weights = materialize(weights, bdims[1], batch).reshape(-1)
    return op((x + offsets).reshape(-1), weights, batch * length).view(batch, length), 0


register_batching_each(overloads(aten.nonzero, "default"), _sizes_that_agree(nonzero_batch))
register_batching_each(overloads(aten.masked_select, "default"), _sizes_that_agree(masked_select_batch))
register_batching_each(overloads(aten.bincount, "default"), _sizes_that_agree(bincount_batch))


@register_batching(*overloads(aten.nonzero_static, "default"))
def nonzero_static_batch(bdims, x, *, size, fill_value=-1):
    """Each example's first ``size`` nonzero positions (row-major), padded
    with ``fill_value``: a static shape, computed without reading values.
    # [B, N]: rank of each nonzero among its example's -> scatter its flat
    # position to [B, size (+1 spill column)] -> unravel to [B, size, rank]"""
    x = move_bdim_to_front(x, bdims[0])
    batch, shape = x.shape[0], tuple(x.shape[1:])
    flat = (x != 0).reshape(batch, -1)
    device = x.device
    order = flat.long().cumsum(1) - 1  # rank of each nonzero within its example
    slot = torch.where(flat & (order < size), order, torch.full_like(order, size))
    positions = torch.arange(flat.shape[1], device=device).expand(batch, -1)
    found = torch.full((batch, size + 1), -1, dtype=torch.long, device=device).scatter(1, slot, positions)
    found = found[:, :size]
    coords = []
    remaining = found.clamp(min=0)
    for extent in reversed(shape):
        coords.append(remaining % extent)
        remaining = remaining // extent
    coords = torch.stack(coords[::-1], -1) if coords else found.new_zeros((batch, size, 0))
    return torch.where((found < 0).unsqueeze(-1), torch.full_like(coords, fill_value), coords), 0


@register_batching(*overloads(aten._assert_async, "default", "msg"))
def assert_async_batch(op, bdims, x, *msg):
    """An assertion on a batched value holds when it holds for every example."""
    op(x.all(), *msg)
    return None, None
