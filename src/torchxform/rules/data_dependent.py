"""Ops whose result depends on tensor values in a way vmap cannot batch:
Python scalars read out of a tensor (``.item()``, ``bool(t)``) and outputs
whose shape depends on the data (``nonzero``, ``unique``, ...).  Each gets a
rule that raises a clear error naming the op, as torch.func does.
"""

from __future__ import annotations

import torch

from .._core.registry import ERROR_RULES, overloads, register_batching, register_batching_each

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
    *overloads(aten.nonzero, "default"),
    *overloads(aten.masked_select, "default"),
    *overloads(aten.unique_consecutive, "default"),
    *overloads(aten.unique_dim, "default"),
    *overloads(aten._unique, "default"),
    *overloads(aten._unique2, "default"),
    *overloads(aten.unique_dim_consecutive, "default"),
    *overloads(aten.bincount, "default"),
    *overloads(aten.nonzero_numpy, "default"),
]


def _dynamic_shape_batch(op, bdims, *args, **kwargs):
    raise RuntimeError(
        f"vmap: We do not support batching operators that can output dynamic shape. Attempted to "
        f"vmap over {op}: its output shape depends on the values of its input, so different batch "
        f"elements could need different shapes. Compute it outside vmap, or use a fixed-size "
        f"alternative (e.g. a boolean mask with torch.where instead of nonzero/masked_select)."
    )


register_batching_each(_DYNAMIC_SHAPE_OPS, _dynamic_shape_batch)
ERROR_RULES.update(_DYNAMIC_SHAPE_OPS)


@register_batching(*overloads(aten._assert_async, "default", "msg"))
def assert_async_batch(op, bdims, x, *msg):
    """An assertion on a batched value holds when it holds for every example."""
    op(x.all(), *msg)
    return None, None
