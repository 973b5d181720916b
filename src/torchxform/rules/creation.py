"""Creation ops that take a tensor: ``*_like``, ``new_*``, ``lift_fresh_copy``
and linspace/logspace with tensor endpoints.

Factories without tensor arguments (``zeros``, ``arange``, ``eye``, ...) never
reach a batching rule: inside vmap they run plain and give unbatched
tensors.  The random ``*_like`` ops live in ``random.py``.
"""

from __future__ import annotations

import torch

from .._core.registry import overloads, register_batching, register_nondifferentiable, register_vjp
from ._batching import move_bdim_to_front

aten = torch.ops.aten


# --------------------------------------------------------------------------
# *_like: batched like their input, in the requested memory format.
# --------------------------------------------------------------------------

# memory format -> (logical rank it needs, its name in eager's error, the
# permutation of the front-batched physical tensor that puts the channel dim
# last, and its inverse).
_CHANNELS_LAST = {
    torch.channels_last: (4, "channels_last", (0, 1, 3, 4, 2), (0, 1, 4, 2, 3)),
    torch.channels_last_3d: (5, "channels_last_3d", (0, 1, 3, 4, 5, 2), (0, 1, 5, 2, 3, 4)),
}


def like_batch_call(call, x, bdim, memory_format, args=(), kwargs=None):
    """``call(x, *args, memory_format=..., **kwargs)`` for a ``*_like`` op on
    physical ``x`` batched at ``bdim``, with every example laid out in
    ``memory_format`` as the eager op lays out the logical result.

    Returns ``(out, out_bdim)``.  ``memory_format=None`` is not passed on
    (some random ``*_like``-style ops have no such argument).
    """
    kwargs = kwargs or {}
    if memory_format is None or memory_format is torch.preserve_format:
        # Preserving the physical strides preserves each example's strides.
        if memory_format is not None:
            kwargs["memory_format"] = memory_format
        return call(x, *args, **kwargs), bdim
    x = move_bdim_to_front(x, bdim)
    if memory_format is torch.contiguous_format:
        return call(x, *args, memory_format=memory_format, **kwargs), 0
    rank, name, to_last, from_last = _CHANNELS_LAST.get(memory_format, (None, str(memory_format), None, None))
    if rank != x.dim() - 1:
        raise RuntimeError(f"required rank {rank} tensor to use {name} format")
    # Allocate each example channels-last: the batch stays outermost and the
    # channel dim innermost in memory.
    # [B,N,C,H,W] -> permute [B,N,H,W,C] -> contiguous result -> permute back
    out = call(x.permute(to_last), *args, memory_format=torch.contiguous_format, **kwargs)
    return out.permute(from_last), 0


@register_batching(aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default)
def like_batch(op, bdims, x, *args, memory_format=None, **kwargs):
    return like_batch_call(op, x, bdims[0], memory_format, args, kwargs)


# --------------------------------------------------------------------------
# new_*: a batched, materialized tensor of the requested logical shape (as in
# torch.func), so that later in-place writes of batched values into it work:
# `buf = x.new_zeros(3); buf[0] = x.sum()`.
# --------------------------------------------------------------------------


@register_batching(aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default)
def new_batch(op, bdims, x, size, *args, **kwargs):
    return op(x, (x.shape[bdims[0]], *size), *args, **kwargs), 0


@register_batching(aten.new_empty_strided.default)
def new_empty_strided_batch(bdims, x, size, stride, **kwargs):
    if len(size) != len(stride):
        raise RuntimeError(
            f"dimensionality of sizes ({len(size)}) must match dimensionality of strides ({len(stride)})"
        )
    # Each example keeps the requested strides; examples sit one storage span
    # apart: size [2,3], stride [1,2] -> span 1+1*1+2*2 = 6 -> [B,2,3], (6,1,2)
    span = 1 + sum((s - 1) * st for s, st in zip(size, stride)) if all(s > 0 for s in size) else 0
    return x.new_empty_strided((x.shape[bdims[0]], *size), (max(span, 1), *stride), **kwargs), 0


@register_batching(aten.lift_fresh_copy.default)
def lift_fresh_copy_batch(bdims, x):
    return x.clone(), bdims[0]


# --------------------------------------------------------------------------
# linspace / logspace with 0-dim tensor endpoints (one pair per example).
# Eager reads the endpoints with .item() and fills on the CPU kernel's
# formula; this rule evaluates that formula for the whole batch at once.
# --------------------------------------------------------------------------


def _endpoint(value, bdim, dtype, device):
    """An endpoint converted to the result dtype as eager converts the Scalar
    it reads: a batched one as a column [B, 1], an unbatched one 0-dim."""
    if not isinstance(value, torch.Tensor):
        return torch.tensor(value, dtype=dtype, device=device)
    if bdim is not None:
        value = move_bdim_to_front(value, bdim).unsqueeze(1)
    return value.to(device=device, dtype=dtype)


def _range_factory(name, bdims, start, end, steps, base, dtype, device):
    rank_start, rank_end = (
        v.dim() - (b is not None) if isinstance(v, torch.Tensor) else 0 for v, b in zip((start, end), bdims)
    )
    if rank_start or rank_end:
        raise RuntimeError(
            f"{name} only supports 0-dimensional start and end tensors, but got start with "
            f"{rank_start} dimension(s) and end with {rank_end} dimension(s)."
        )
    if steps < 0:
        raise RuntimeError("number of steps must be non-negative")
    if dtype is None:
        dtype = torch.get_default_dtype()
        if any(isinstance(v, complex) or isinstance(v, torch.Tensor) and v.is_complex() for v in (start, end)):
            dtype = dtype.to_complex()
    batch = next(v.shape[b] for v, b in zip((start, end), bdims) if b is not None)
    if device is None:  # eager reads the endpoints as Scalars: the result's device is the default
        device = torch.device("cpu")
    start = _endpoint(start, bdims[0], dtype, device)
    end = _endpoint(end, bdims[1], dtype, device)
    # The CPU kernels compute in double for integral results and for logspace
    # of real results, in the result dtype otherwise.
    if not dtype.is_complex and (base is not None or not dtype.is_floating_point):
        start, end = start.double(), end.double()
    if steps <= 1:  # eager fills `start` (logspace: base ** start)
        out = start if base is None else torch.pow(base, start)
        return out.to(dtype).expand(batch, steps).contiguous(), 0
    step = (end - start) / (steps - 1)
    index = torch.arange(steps, device=device, dtype=start.dtype)
    # The first half counts up from `start`, the second half down from `end`,
    # so that both endpoints are exact.
    # start [B,1], end [B,1], index [steps] -> [B, steps]
    out = torch.where(index < steps // 2, start + step * index, end - step * (steps - 1 - index))
    if base is not None:
        out = torch.pow(base, out)
    return out.to(dtype), 0


@register_batching(*overloads(aten.linspace, "Tensor_Tensor", "Tensor_Scalar", "Scalar_Tensor"))
def linspace_batch(op, bdims, start, end, steps, *, dtype=None, layout=None, device=None, pin_memory=None):
    return _range_factory("linspace", bdims, start, end, steps, None, dtype, device)


@register_batching(*overloads(aten.logspace, "Tensor_Tensor", "Tensor_Scalar", "Scalar_Tensor"))
def logspace_batch(op, bdims, start, end, steps, base=10.0, *, dtype=None, layout=None, device=None, pin_memory=None):
    return _range_factory("logspace", bdims, start, end, steps, base, dtype, device)


# -- derivatives: the values of these outputs do not depend on the inputs' ---
register_nondifferentiable(
    aten.empty_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.new_empty.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.new_empty_strided.default,
    *overloads(aten.linspace, "Tensor_Tensor", "Tensor_Scalar", "Scalar_Tensor"),
    *overloads(aten.logspace, "Tensor_Tensor", "Tensor_Scalar", "Scalar_Tensor"),
)


# -- layout conversion: the gradient of to_sparse is the cotangent, dense ----
# (derivatives.yaml's to_sparse_backward for a strided input).


@register_vjp(*overloads(aten._to_sparse, "default", "sparse_dim"))
def to_sparse_vjp(grad):
    return (grad.to_dense() if grad.layout != torch.strided else grad,)


@register_vjp(*overloads(aten._to_dense, "default"))
def to_dense_vjp(grad, self, masked_grad=None):
    """derivatives.yaml's to_dense_backward: the dense cotangent restricted
    to the input's sparsity pattern (``masked_grad``, the default), or all of it."""
    if self.layout == torch.strided:
        return (grad,)
    if masked_grad is None or masked_grad:
        return (grad.sparse_mask(self.coalesce()),)
    return (grad.to_sparse(),)


@register_vjp(*overloads(aten.sparse_mask, "default"))
def sparse_mask_vjp(grad, self):
    """derivatives.yaml's sparse_mask_backward for a strided ``self``: the
    (already masked) cotangent, dense."""
    return (grad.to_dense() if self.layout == torch.strided and grad.layout != torch.strided else grad, None)
