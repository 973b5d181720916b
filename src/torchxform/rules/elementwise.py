"""Elementwise ops: unary, binary and ternary, with broadcasting and type
promotion.  One generic batching rule serves every op tagged
``torch.Tag.pointwise`` (and a few untagged ones listed below).
"""

from __future__ import annotations

import torch

from .._core.registry import overloads, register_batching, register_batching_each
from .._core.schema import is_out_variant, mutates_self
from ._batching import front_padded, move_bdim_to_front

aten = torch.ops.aten
Tensor = torch.Tensor


# --------------------------------------------------------------------------
# NOTE [Batched 0-dim tensors and type promotion]
# PyTorch promotes dimensioned tensors and 0-dim tensors differently: in
# `x_f32 + y_f64_0dim` the 0-dim tensor does not raise the result to float64.
# Batching turns a logical 0-dim tensor into a physical [B] tensor, which
# would then count as dimensioned.  When that could change the result
# dtype (tensor arguments of different dtypes), such arguments are cast to
# the dtype the op has logically, which the physical promotion then keeps.
# --------------------------------------------------------------------------


def _combine_categories(higher, lower):
    """c10's combine_categories: `higher` wins unless `lower` is of a higher
    category (bool < integral < floating < complex)."""
    if higher is None:
        return lower
    if lower is None:
        return higher
    if higher.is_complex:
        return higher
    if lower.is_complex:
        return higher.to_complex() if higher.is_floating_point else lower
    if higher.is_floating_point:
        return higher
    if higher is torch.bool or lower.is_floating_point:
        return torch.promote_types(higher, lower)
    return higher


def _promote(a, b):
    return b if a is None else torch.promote_types(a, b)


def logical_result_dtype(args, bdims, skip=()) -> torch.dtype:
    """The dtype type promotion gives for the logical (unbatched) arguments."""
    dimensioned = zero_dim = wrapped = None
    for i, (x, bdim) in enumerate(zip(args, bdims)):
        if i in skip:
            continue
        if isinstance(x, Tensor):
            if x.dim() - (bdim is not None) > 0:
                dimensioned = _promote(dimensioned, x.dtype)
            else:
                zero_dim = _promote(zero_dim, x.dtype)
        elif isinstance(x, bool):
            wrapped = _promote(wrapped, torch.bool)
        elif isinstance(x, int):
            wrapped = _promote(wrapped, torch.int64)
        elif isinstance(x, float):
            wrapped = _promote(wrapped, torch.get_default_dtype())
        elif isinstance(x, complex):
            wrapped = _promote(wrapped, torch.get_default_dtype().to_complex())
    return _combine_categories(dimensioned, _combine_categories(zero_dim, wrapped))


def _fix_zero_dim_promotion(physical, args, bdims, skip):
    """See NOTE [Batched 0-dim tensors and type promotion]."""
    dtypes = {x.dtype for i, x in enumerate(args) if isinstance(x, Tensor) and i not in skip}
    if len(dtypes) < 2:
        return
    target = logical_result_dtype(args, bdims, skip)
    for i, (x, bdim) in enumerate(zip(args, bdims)):
        if bdim is not None and i not in skip and x.dim() == 1 and x.dtype != target:
            physical[i] = physical[i].to(target)


def broadcast_batched(args, bdims, skip_promotion=()):
    """Align the batched tensor arguments of a broadcasting op: batch dim to
    the front, logical dims right-aligned against the unbatched arguments.

    # [B,3] + [2,5,3] -> [B,1,1,3] + [2,5,3]  (result [B,2,5,3], bdim 0)
    """
    rank = 0
    for x, bdim in zip(args, bdims):
        if isinstance(x, Tensor):
            r = x.dim() - (bdim is not None)
            if r > rank:
                rank = r
    physical = list(args)
    zero_dim_batched = False
    for i, (x, bdim) in enumerate(zip(args, bdims)):
        if bdim is not None:
            if x.dim() == 1:
                zero_dim_batched = True
            if bdim != 0 or x.dim() - 1 != rank:
                physical[i] = front_padded(x, bdim, rank)
    if zero_dim_batched:
        _fix_zero_dim_promotion(physical, args, bdims, skip_promotion)
    return physical


def _same_layout(args, bdims):
    """The common bdim when every tensor argument is batched with it and has
    the same rank (then the op can run on the physical values as they are)."""
    common = None
    ndim = None
    for x, bdim in zip(args, bdims):
        if isinstance(x, Tensor):
            if bdim is None:
                return None
            if common is None:
                common, ndim = bdim, x.dim()
            elif bdim != common or x.dim() != ndim:
                return None
    return common


def elementwise_batch(op, bdims, *args, skip_promotion=(), **kwargs):
    """Batching rule of a broadcasting elementwise op."""
    bdim = _same_layout(args, bdims)
    if bdim is not None:
        return op(*args, **kwargs), bdim
    return op(*broadcast_batched(args, bdims, skip_promotion), **kwargs), 0


def inplace_elementwise_batch(op, bdims, self, *args, skip_promotion=(), **kwargs):
    """Batching rule of an in-place elementwise op (``self`` is batched: the
    interpreter rejects a batched argument written into an unbatched self)."""
    self_front = move_bdim_to_front(self, bdims[0])  # a view: writes reach `self`
    rank = self.dim() - 1
    physical = [self_front]
    zero_dim_batched = self.dim() == 1
    for x, bdim in zip(args, bdims[1:]):
        if bdim is not None:
            zero_dim_batched = zero_dim_batched or x.dim() == 1
            x = front_padded(x, bdim, rank)
        physical.append(x)
    if zero_dim_batched:
        _fix_zero_dim_promotion(physical, (self,) + args, bdims, skip_promotion)
    op(*physical, **kwargs)
    return self, bdims[0]


# --------------------------------------------------------------------------
# Registration: every pointwise-tagged ATen op (its out= variants excepted),
# plus elementwise ops without the tag.
# --------------------------------------------------------------------------

# Ops with a rule of their own elsewhere, or arguments the generic rule must
# not promote.
_SPECIAL = {aten.clone.default, aten._to_copy.default}
_SKIP_PROMOTION = {
    aten.where.self: (0,),  # the condition stays bool
    aten.masked_fill.Scalar: (1,),  # the mask stays bool
    aten.masked_fill_.Scalar: (1,),
}
# Not tagged pointwise, but elementwise with broadcasting all the same.
_UNTAGGED = [
    *overloads(aten.abs_, "default"),
    *overloads(aten.copy_, "default"),
    *overloads(aten.masked_fill_, "Scalar"),
    *overloads(aten.hardswish, "default"),
    *overloads(aten.hardswish_, "default"),
    *overloads(aten.hardswish_backward, "default"),
    *overloads(aten.hardsigmoid_backward, "default"),
    *overloads(aten.hardtanh_backward, "default"),
    *overloads(aten.leaky_relu_backward, "default"),
    *overloads(aten.elu_backward, "default"),
    *overloads(aten.softplus_backward, "default"),
    *overloads(aten.softshrink_backward, "default"),
    *overloads(aten.hardshrink_backward, "default"),
    *overloads(aten.mish_backward, "default"),
    *overloads(aten.rrelu_with_noise_backward, "default"),
    *overloads(aten.fmod_, "Tensor", "Scalar"),
    *overloads(aten.zero_, "default"),
    *overloads(aten.fill_, "Scalar"),
    *overloads(aten.positive, "default"),
    *overloads(aten.conj_physical, "default"),
    *overloads(aten.isreal, "default"),
    *overloads(aten.sgn, "default"),
    *overloads(aten.float_power, "Tensor_Tensor", "Tensor_Scalar", "Scalar"),
    *overloads(aten.true_divide, "Scalar"),
    *overloads(aten.erfinv, "default"),
    *overloads(aten.logical_not, "default"),
]
# copy_ converts to self's dtype; promoting first could round twice.
_SKIP_PROMOTION[aten.copy_.default] = (0, 1)


def _pointwise_ops():
    ops = []
    for name in dir(aten):
        packet = getattr(aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if torch.Tag.pointwise in op.tags and not torch.Tag.nondeterministic_seeded in op.tags:
                ops.append(op)
    return ops


def _register_elementwise():
    for op in _pointwise_ops() + _UNTAGGED:
        if op in _SPECIAL or is_out_variant(op):
            continue
        skip = _SKIP_PROMOTION.get(op, ())
        rule = inplace_elementwise_batch if mutates_self(op) else elementwise_batch
        register_batching_each([op], rule, skip_promotion=skip)


_register_elementwise()


def _clone_front(x, memory_format):
    """Copy of front-batched ``x`` in ``memory_format``, applied per example:
    channels_last folds the batch into the leading logical dim.
    # [B,N,C,H,W] -> [B*N,C,H,W] -> clone -> [B,N,C,H,W]"""
    if memory_format is torch.contiguous_format:
        return x.clone(memory_format=memory_format)
    folded = x.reshape((-1,) + tuple(x.shape[2:])).clone(memory_format=memory_format)
    return folded.view(x.shape[:2] + folded.shape[1:])


@register_batching(aten.clone.default)
def clone_batch(bdims, x, *, memory_format=None):
    if memory_format is None or memory_format is torch.preserve_format:
        return x.clone(), bdims[0]
    return _clone_front(move_bdim_to_front(x, bdims[0]), memory_format), 0


@register_batching(aten._to_copy.default)
def to_copy_batch(bdims, x, *, memory_format=None, **kwargs):
    if memory_format is None or memory_format is torch.preserve_format:
        return aten._to_copy.default(x, memory_format=memory_format, **kwargs), bdims[0]
    converted = aten._to_copy.default(move_bdim_to_front(x, bdims[0]), **kwargs)
    return _clone_front(converted, memory_format), 0


@register_batching(*overloads(aten.masked_fill, "Tensor"), *overloads(aten.masked_fill_, "Tensor"))
def masked_fill_tensor_batch(op, bdims, x, mask, value):
    """masked_fill with a 0-dim tensor value; a batched value is one value
    per example, so it broadcasts as an elementwise `where` argument."""
    if bdims[2] is None:
        rule = inplace_elementwise_batch if op is aten.masked_fill_.Tensor else elementwise_batch
        return rule(op, bdims, x, mask, value, skip_promotion=(1,))
    if op is aten.masked_fill_.Tensor:
        x_front = move_bdim_to_front(x, bdims[0])
        rank = x.dim() - 1
        mask = front_padded(mask, bdims[1], rank) if bdims[1] is not None else mask
        value = front_padded(value, bdims[2], rank).to(x.dtype)
        x_front.copy_(torch.where(mask, value, x_front))
        return x, bdims[0]
    x_, mask_, value_ = broadcast_batched((x, mask, value), bdims, skip_promotion=(1,))
    return torch.where(mask_, value_.to(x.dtype), x_), 0


@register_batching(*overloads(aten.fill_, "Tensor"), *overloads(aten.fill, "Tensor"))
def fill_tensor_batch(op, bdims, x, value):
    """fill with a 0-dim tensor value (batched: one fill value per example)."""
    inplace = op is aten.fill_.Tensor
    if bdims[1] is None:
        return op(x, value), bdims[0]
    value = value.to(x.dtype)
    if inplace:
        x_front = move_bdim_to_front(x, bdims[0])  # a view: writes reach `x`
        x_front.copy_(front_padded(value, bdims[1], x_front.dim() - 1).expand_as(x_front))
        return x, bdims[0]
    logical_shape = tuple(move_bdim_to_front(x, bdims[0]).shape[1:]) if bdims[0] is not None else tuple(x.shape)
    value = move_bdim_to_front(value, bdims[1])
    return value.view((-1,) + (1,) * len(logical_shape)).expand((value.shape[0],) + logical_shape).clone(), 0
