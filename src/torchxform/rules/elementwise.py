"""Elementwise ops: unary, binary and ternary, with broadcasting and type
promotion.  One generic batching rule serves every op tagged
``torch.Tag.pointwise`` (and a few untagged ones listed below).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

from .._core.registry import (
    aten_overloads,
    overloads,
    register_batching,
    register_batching_each,
    register_jvp,
    register_nondifferentiable,
    register_vjp,
)
from .._core.dispatch import call_on_tracers
from .._core.tracer import Tracer
from ._derivatives import linear_jvp
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
    *overloads(aten.rsub, "Tensor"),
    *overloads(aten._add_relu, "Tensor", "Scalar"),
    *overloads(aten.polar, "default"),
    *overloads(aten.complex, "default"),
    *overloads(aten.copy, "default"),
    *overloads(aten.zero, "default"),
]
# copy_ converts to self's dtype; promoting first could round twice.
_SKIP_PROMOTION[aten.copy_.default] = (0, 1)


def _pointwise_ops():
    return [
        op
        for op in aten_overloads()
        if torch.Tag.pointwise in op.tags and torch.Tag.nondeterministic_seeded not in op.tags
    ]


def _inplace_variant(op):
    """``aten.add_.Tensor`` for ``aten.add.Tensor``, if it exists."""
    packet = getattr(aten, op._schema.name.split("::")[-1] + "_", None)
    if packet is None or op._overloadname not in packet.overloads():
        return None
    return getattr(packet, op._overloadname)


def _register_elementwise():
    ops = _pointwise_ops() + _UNTAGGED
    # In-place variants are not always tagged (eq_, gcd_, threshold_, ...).
    ops += [v for v in map(_inplace_variant, ops) if v is not None and v not in ops]
    for op in ops:
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


# ==========================================================================
# Derivatives.  An elementwise op's derivative is its partial derivatives
# with respect to each input, written once per op (from derivatives.yaml):
# the VJP multiplies the cotangent by each partial (conjugated for complex)
# and sums away broadcast dims; the JVP sums tangent times partial.
# ==========================================================================


_MUL = aten.mul.Tensor
_NEG = aten.neg.default


def reduce_to(grad, meta):
    """``grad`` summed over the dims its input was broadcast along, in the
    input's dtype and device (``meta`` is ``(shape, dtype, device)``)."""
    shape, dtype, device = meta
    if grad.shape != shape:
        grad = grad.sum_to_size(shape)
    if grad.dtype != dtype:
        if grad.is_complex() and not dtype.is_complex:
            grad = grad.real
        if grad.dtype != dtype:  # complex64 -> float64 (cfloat of a double): .real is float32
            grad = grad.to(dtype)
    if grad.device != device:
        grad = grad.to(device)
    return grad


def elementwise_vjp(partials: Callable, *, conjugate: bool = True) -> Callable:
    """The VJP rule of an elementwise op from its ``partials`` function.

    ``partials`` names the values it needs (schema argument names and/or
    ``result``) and returns one partial derivative per positional argument
    (a tensor or Python number; None: no derivative).  The rule's signature
    is partials' plus ``grad``, ``needs`` and ``inputs_meta``, so the tape
    saves exactly what the formula uses.
    """

    def rule(grad, needs, inputs_meta, **saved):
        grads = []
        for d, need, meta in zip(partials(**saved), needs, inputs_meta):
            if d is None or not need or meta is None:
                grads.append(None)
                continue
            kind = type(d)
            if kind is int or kind is float:  # real: its own conjugate
                # A partial of exactly 1 passes the cotangent on, as
                # autograd's AddBackward does (no op); -1 negates it.
                if d == 1:
                    g = grad
                elif d == -1:
                    g = call_on_tracers(_NEG, (grad,)) if isinstance(grad, Tracer) else -grad
                else:
                    g = call_on_tracers(_MUL, (grad, d)) if isinstance(grad, Tracer) else grad * d
            else:
                if conjugate:
                    if isinstance(d, Tensor):
                        if d.is_complex():
                            d = d.conj()
                    elif isinstance(d, complex):
                        d = d.conjugate()
                if isinstance(grad, Tracer) or isinstance(d, Tracer):
                    g = call_on_tracers(_MUL, (grad, d))
                else:
                    g = grad * d
            grads.append(reduce_to(g, meta))
        return tuple(grads)

    params = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in ("grad", "needs", "inputs_meta")
    ] + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(partials).parameters.values()]
    rule.__signature__ = inspect.Signature(params)
    rule.__qualname__ = f"elementwise_vjp({partials.__qualname__})"
    rule.partials = partials  # the JVP derives from the same partials
    return rule


def elementwise_jvp(partials: Callable) -> Callable:
    """The JVP rule of an elementwise op from its ``partials``: the sum of
    tangent times partial over the inputs, broadcast to the output."""

    partial_params = inspect.signature(partials).parameters
    wants_result = "result" in partial_params

    def rule(tangents, result, **saved):
        if wants_result:
            saved["result"] = result
        total = None
        for d, t in zip(partials(**saved), tangents):
            if d is None or t is None:
                continue
            term = t * d
            total = term if total is None else total + term
        if total is None:
            return None
        if total.shape != result.shape:
            total = total.expand(result.shape)
        if total.dtype != result.dtype:
            if total.is_complex() and not result.dtype.is_complex:
                total = total.real
            if total.dtype != result.dtype:
                total = total.to(result.dtype)
        return total

    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in ("tangents", "result")] + [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for name, p in partial_params.items() if name != "result"
    ]
    rule.__signature__ = inspect.Signature(params)
    rule.__qualname__ = f"elementwise_jvp({partials.__qualname__})"
    return rule


def derivative(ops, partials, *, conjugate: bool = True, vjp=None) -> None:
    """Register the derivatives (VJP and JVP) of elementwise ``ops`` and
    their in-place variants (found by name) from ``partials``.  See
    :func:`elementwise_vjp`.  ``conjugate=False`` marks functions that are
    not holomorphic for complex inputs (``abs``): their JVP is written apart.
    ``vjp``: a VJP rule to use instead of the partials' (a fused backward
    kernel, see :func:`fused_backward`)."""
    targets = []
    for op in ops:
        targets.append(op)
        inplace = _inplace_variant(op)
        if inplace is not None:
            targets.append(inplace)
    register_vjp(*targets)(vjp if vjp is not None else elementwise_vjp(partials, conjugate=conjugate))
    if conjugate:
        register_jvp(*targets)(elementwise_jvp(partials))


def fused_backward(kernel, *constants):
    """A VJP rule ``grad -> kernel(grad, result, *constants)`` for a unary op
    whose gradient has one ATen kernel (``tanh_backward``, ...), as autograd
    computes it: one kernel instead of the partial's several ops."""

    def vjp(grad, result):
        if isinstance(grad, Tracer) or isinstance(result, Tracer):
            return (call_on_tracers(kernel, (grad, result, *constants)),)
        return (kernel(grad, result, *constants),)

    return vjp


def _mask(condition, like):
    """A 0/1 tensor of ``like``'s dtype (multiplying by a bool mask would
    promote integer-valued partials differently)."""
    return condition.to(like.dtype)


_LN2 = math.log(2.0)
_LN10 = math.log(10.0)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946

# -- arithmetic ---------------------------------------------------------------
derivative([aten.add.Tensor], lambda alpha=1: (1, alpha))
derivative([aten.add.Scalar, aten.positive.default, aten.clone.default, aten._to_copy.default], lambda: (1,))
derivative([aten.sub.Tensor], lambda alpha=1: (1, -alpha))
derivative([aten.sub.Scalar], lambda: (1,))
derivative([aten.rsub.Tensor], lambda alpha=1: (-alpha, 1))
derivative([aten.rsub.Scalar], lambda alpha=1: (-alpha,))
derivative([aten.neg.default], lambda: (-1,))
derivative([aten.mul.Tensor], lambda self, other: (other, self))
derivative([aten.mul.Scalar], lambda other: (other,))
# `other` may be a Python number (`x / 2.0` reaches div.Tensor).
derivative([aten.div.Tensor], lambda self, other: (1 / other, -self / (other * other)))
derivative([aten.div.Scalar], lambda other: (1.0 / other,))
derivative(
    [aten.div.Tensor_mode],
    lambda self, other, rounding_mode=None: (
        (1 / other, -self / (other * other)) if rounding_mode is None else (None, None)
    ),
)
derivative([aten.div.Scalar_mode], lambda other, rounding_mode=None: (1.0 / other if rounding_mode is None else None,))
derivative([aten.square.default], lambda self: (2 * self,))
derivative(
    [aten.pow.Tensor_Scalar],
    lambda self, exponent: (None if exponent == 0 else exponent * self.pow(exponent - 1),),
)
derivative(
    [aten.pow.Tensor_Tensor],
    lambda self, exponent, result: (
        torch.where(exponent == 0, 0.0, exponent * self.pow(exponent - 1)),
        torch.where((self == 0) & (exponent >= 0), 0.0, result * self.log()),
    ),
)
derivative(
    [aten.pow.Scalar],
    lambda self, exponent, result: (
        None,
        torch.where(exponent >= 0, 0.0, result * math.log(self)) if self == 0 else result * math.log(self),
    ),
)
derivative([aten.reciprocal.default], lambda result: (-result * result,))
derivative([aten.sqrt.default], lambda result: (0.5 / result,))
derivative([aten.rsqrt.default], lambda result: (-0.5 * result * result * result,))
derivative([aten.fmod.Tensor], lambda self, other: (1, -self.div(other, rounding_mode="trunc")))
derivative([aten.fmod.Scalar, aten.frac.default], lambda: (1,))
derivative([aten.remainder.Tensor], lambda self, other: (1, -self.div(other, rounding_mode="floor")))
derivative([aten.remainder.Scalar], lambda: (1,))
derivative([aten.remainder.Scalar_Tensor], lambda self, other: (None, -torch.div(self, other, rounding_mode="floor")))
derivative([aten.lerp.Scalar], lambda weight: (1 - weight, weight))
derivative([aten.lerp.Tensor], lambda self, end, weight: (1 - weight, weight, end - self))
derivative([aten.addcmul.default], lambda tensor1, tensor2, value=1: (1, value * tensor2, value * tensor1))
derivative(
    [aten.addcdiv.default],
    lambda tensor1, tensor2, value=1: (1, value / tensor2, -value * tensor1 / (tensor2 * tensor2)),
)
derivative([aten.hypot.default], lambda self, other, result: (self / result, other / result))
derivative([aten.atan2.default], lambda self, other: (other / (self * self + other * other), -self / (self * self + other * other)))
derivative(
    [aten.copysign.Tensor],
    lambda self, result: (torch.where(self == 0, 0.0, self.sgn() * result.sgn()), None),
)
derivative([aten.copysign.Scalar], lambda self, result: (torch.where(self == 0, 0.0, self.sgn() * result.sgn()),))
derivative(
    [aten.xlogy.Tensor],
    lambda self, other: (torch.where((self == 0) & (other <= 0), 0.0, other.log()), self / other),
)
derivative([aten.xlogy.Scalar_Other], lambda self, other: (math.log(other) if other > 0 else torch.where(self == 0, 0.0, math.log(other)),))
derivative([aten.xlogy.Scalar_Self], lambda self, other: (None, self / other))
derivative(
    [aten.special_xlog1py.default],
    lambda self, other: (torch.where((self == 0) & (other <= -1), 0.0, other.log1p()), self / (other + 1)),
)
# derivatives.yaml's form, not the equal sigmoid(self - other): its second
# derivative is nan where an input is -inf (masked reductions), as torch's is
derivative(
    [aten.logaddexp.default],
    lambda self, other: (1 / (1 + (other - self).exp()), 1 / (1 + (self - other).exp())),
)
derivative(
    [aten.logaddexp2.default],
    lambda self, other: (1 / (1 + torch.pow(2, other - self)), 1 / (1 + torch.pow(2, self - other))),
)

# -- comparisons that select an input ----------------------------------------
derivative(
    [aten.maximum.default, aten.max.other],
    lambda self, other: (
        torch.where(self == other, 0.5, _mask(self > other, self)),
        torch.where(self == other, 0.5, _mask(other > self, other)),
    ),
)
derivative(
    [aten.minimum.default, aten.min.other],
    lambda self, other: (
        torch.where(self == other, 0.5, _mask(self < other, self)),
        torch.where(self == other, 0.5, _mask(other < self, other)),
    ),
)
derivative(
    [aten.fmax.default],
    lambda self, other: (_mask((self >= other) | other.isnan(), self), _mask(~((self >= other) | other.isnan()), other)),
)
derivative(
    [aten.fmin.default],
    lambda self, other: (_mask((self <= other) | other.isnan(), self), _mask(~((self <= other) | other.isnan()), other)),
)


def _clamp_partials(self, min=None, max=None):
    inside = torch.ones_like(self, dtype=torch.bool)
    if min is not None:
        inside = inside & (self >= min)
    if max is not None:
        inside = inside & (self <= max)
    d_self = _mask(inside, self)
    if not isinstance(min, Tensor) and not isinstance(max, Tensor):
        return (d_self, None, None)
    # clamp(x, lo, hi) = min(max(x, lo), hi): lo wins below it unless it
    # exceeds hi, hi wins above it (and wherever lo > hi).
    d_min = d_max = None
    if isinstance(min, Tensor):
        below = self < min
        if max is not None:
            below = below & (min <= max)
        d_min = _mask(below, min)
    if isinstance(max, Tensor):
        above = self > max
        if min is not None:
            above = above | (min > max)
        d_max = _mask(above, max)
    return (d_self, d_min, d_max)


derivative([aten.clamp.default, aten.clamp.Tensor], _clamp_partials)
derivative([aten.clamp_min.default], lambda self, min: (_mask(self >= min, self),))
derivative([aten.clamp_max.default], lambda self, max: (_mask(self <= max, self),))
derivative([aten.clamp_min.Tensor], lambda self, min: (_mask(self >= min, self), _mask(self < min, min)))
derivative([aten.clamp_max.Tensor], lambda self, max: (_mask(self <= max, self), _mask(self > max, max)))


# Selections select the cotangent (torch.where), never multiply it by a 0/1
# mask: a nan or inf cotangent at a position not selected must give 0 there,
# as derivatives.yaml's where(condition, grad, 0) does.
@register_vjp(aten.where.self)
def where_vjp(grad, condition, needs, inputs_meta):
    return (
        None,
        reduce_to(torch.where(condition, grad, 0), inputs_meta[1]) if needs[1] and inputs_meta[1] else None,
        reduce_to(torch.where(condition, 0, grad), inputs_meta[2]) if needs[2] and inputs_meta[2] else None,
    )


@register_vjp(aten.masked_fill.Scalar, aten.masked_fill_.Scalar)
def masked_fill_vjp(grad, mask, needs, inputs_meta):
    return (reduce_to(grad.masked_fill(mask, 0), inputs_meta[0]) if needs[0] else None,)


@register_vjp(aten.masked_fill.Tensor, aten.masked_fill_.Tensor)
def masked_fill_tensor_vjp(grad, mask, needs, inputs_meta):
    return (
        reduce_to(grad.masked_fill(mask, 0), inputs_meta[0]) if needs[0] else None,
        None,
        reduce_to(torch.where(mask, grad, 0), inputs_meta[2]) if needs[2] else None,
    )


@register_jvp(aten.masked_fill.Tensor, aten.masked_fill_.Tensor)
def masked_fill_tensor_jvp(self, mask, self_t, value_t):
    if self_t is None and value_t is None:
        return None
    base = self_t if self_t is not None else torch.zeros_like(self)
    return base.masked_fill(mask, 0 if value_t is None else value_t)


derivative([aten.nan_to_num.default], lambda self: (self.isfinite(),))

# -- exponentials, logs, powers -------------------------------------------------
derivative([aten.exp.default], lambda result: (result,))
derivative([aten.exp2.default], lambda result: (result * _LN2,))
derivative([aten.expm1.default], lambda result: (result + 1,))
derivative([aten.log.default], lambda self: (self.reciprocal(),))
derivative([aten.log2.default], lambda self: ((self * _LN2).reciprocal(),))
derivative([aten.log10.default], lambda self: ((self * _LN10).reciprocal(),))
derivative([aten.log1p.default], lambda self: ((self + 1).reciprocal(),))
derivative(
    [aten.logit.default],
    lambda self, eps=None: (
        torch.where((self < 0) | (self > 1), math.nan, (self * (1 - self)).reciprocal())
        if eps is None
        else torch.where((self < eps) | (self > 1 - eps), 0.0, (self * (1 - self)).reciprocal()),
    ),
)

# -- trigonometric and hyperbolic ------------------------------------------------
derivative([aten.sin.default], lambda self: (self.cos(),))
derivative([aten.cos.default], lambda self: (-self.sin(),))
derivative([aten.tan.default], lambda result: (1 + result * result,))
derivative([aten.asin.default], lambda self: ((1 - self * self).rsqrt(),))
derivative([aten.acos.default], lambda self: (-(1 - self * self).rsqrt(),))
derivative([aten.atan.default], lambda self: ((1 + self * self).reciprocal(),))
derivative([aten.sinh.default], lambda self: (self.cosh(),))
derivative([aten.cosh.default], lambda self: (self.sinh(),))
derivative([aten.tanh.default], lambda result: (1 - result * result,), vjp=fused_backward(aten.tanh_backward.default))
derivative([aten.asinh.default], lambda self: ((self * self + 1).rsqrt(),))
derivative([aten.acosh.default], lambda self: ((self * self - 1).rsqrt(),))
derivative([aten.atanh.default], lambda self: ((1 - self * self).reciprocal(),))
derivative([aten.deg2rad.default], lambda: (math.pi / 180,))
derivative([aten.rad2deg.default], lambda: (180 / math.pi,))
derivative(
    [aten.sinc.default],
    lambda self: (
        torch.where(
            self == 0,
            0.0,
            ((math.pi * self) * (math.pi * self).cos() - (math.pi * self).sin()) / (math.pi * self * self),
        ),
    ),
)

# -- special functions ----------------------------------------------------------
derivative([aten.erf.default], lambda self: (_TWO_OVER_SQRT_PI * (-self * self).exp(),))
derivative([aten.erfc.default], lambda self: (-_TWO_OVER_SQRT_PI * (-self * self).exp(),))
derivative([aten.erfinv.default], lambda result: (0.5 * math.sqrt(math.pi) * (result * result).exp(),))
derivative([aten.lgamma.default], lambda self: (self.digamma(),))
derivative([aten.digamma.default], lambda self: (torch.polygamma(1, self),))
derivative([aten.polygamma.default], lambda n, self: (None, torch.polygamma(n + 1, self)))
derivative([aten.mvlgamma.default], lambda self, p: (sum((self - i / 2).digamma() for i in range(p)),))
derivative([aten.i0.default], lambda self: (torch.special.i1(self),))
derivative([aten.special_i0e.default], lambda self, result: (torch.special.i1e(self) - self.sgn() * result,))
derivative(
    [aten.special_i1.default],
    lambda self, result: (torch.where(self == 0, 0.5, torch.special.i0(self) - result / self),),
)
derivative(
    [aten.special_i1e.default],
    lambda self, result: (torch.where(self == 0, 0.5, torch.special.i0e(self) - result * (self.sgn() + 1 / self)),),
)
derivative([aten.special_ndtri.default], lambda result: (math.sqrt(2 * math.pi) * (0.5 * result * result).exp(),))
derivative(
    [aten.special_log_ndtr.default],
    lambda self, result: ((-0.5 * self * self - result).exp() / math.sqrt(2 * math.pi),),
)
derivative([aten.special_erfcx.default], lambda self, result: (2 * self * result - _TWO_OVER_SQRT_PI,))
derivative([aten.special_entr.default], lambda self: (-(1 + self.log()),))
derivative([aten.abs.default], lambda self: (self.sgn(),), conjugate=False)


# -- ops with an integer-valued output or argument ----------------------------


@register_vjp(aten.frexp.Tensor)
def frexp_vjp(grad, result):
    """mantissa = self / 2^exponent, the exponent piecewise constant."""
    if grad[0] is None:
        return (None,)
    return (grad[0] / result[1].to(grad[0].dtype).exp2(),)  # exp2 in the input's precision


@register_jvp(aten.frexp.Tensor)
def frexp_jvp(self_t, result):
    return self_t / result[1].to(self_t.dtype).exp2(), None


@register_vjp(aten.nextafter.default, *overloads(aten.nextafter_, "default"))
def nextafter_vjp(grad, self, other, needs, inputs_meta):
    """The next representable value after self: slope 1 in self (0 where it
    equals other and the result is other), none in other."""
    return (reduce_to(torch.where(self != other, grad, 0), inputs_meta[0]) if needs[0] else None, None)


@register_jvp(aten.nextafter.default, *overloads(aten.nextafter_, "default"))
def nextafter_jvp(self, other, self_t):
    return None if self_t is None else torch.where(self != other, self_t, 0)


# -- complex plumbing: conjugation and real/complex views ----------------------


@register_vjp(aten._conj.default, *overloads(aten.conj, "default"))
def conj_vjp(grad):
    return (grad.conj(),)


@register_vjp(*overloads(aten._conj_physical, "default"), aten.conj_physical.default, aten.conj_physical_.default)
def conj_physical_vjp(grad):
    return (grad.conj_physical(),)


@register_vjp(*overloads(aten._neg_view, "default"))
def neg_view_vjp(grad):
    return (-grad,)


@register_vjp(*overloads(aten.resolve_conj, "default"), *overloads(aten.resolve_neg, "default"))
def resolve_vjp(grad):
    return (grad,)


@register_vjp(aten.view_as_real.default)
def view_as_real_vjp(grad):
    return (torch.view_as_complex(grad.contiguous()),)


@register_vjp(aten.view_as_complex.default)
def view_as_complex_vjp(grad):
    return (torch.view_as_real(grad.contiguous().resolve_conj()),)


@register_vjp(aten.complex.default)
def complex_vjp(grad, needs, inputs_meta):
    # real and imag broadcast against each other: sum back to each one's shape
    return (
        reduce_to(grad.real, inputs_meta[0]) if needs[0] else None,
        reduce_to(grad.imag, inputs_meta[1]) if needs[1] else None,
    )


@register_vjp(aten.polar.default)
def polar_vjp(grad, result, needs, inputs_meta):
    conj = grad.conj()
    return (
        reduce_to((conj * result.sgn()).real, inputs_meta[0]) if needs[0] else None,
        reduce_to((conj * result * 1j).real, inputs_meta[1]) if needs[1] else None,
    )


@register_vjp(aten.angle.default)
def angle_vjp(grad, self):
    if not self.is_complex():
        return (None,)  # the angle of a real number is piecewise constant
    return (torch.where(self == 0, 0.0, grad * self / (self.abs() ** 2) * 1j),)


@register_vjp(aten.sgn.default, aten.sgn_.default)
def sgn_vjp(grad, self, result):
    """Zero for real inputs (sign).  For complex z, sgn(z) = z/|z| is not
    holomorphic: derivatives.yaml's sgn_backward,
    (g - Re(g * conj(sgn)) * sgn) / |z|, and 0 at z = 0."""
    if not self.is_complex():
        return (None,)
    magnitude = self.abs()
    tangential = (grad - (grad * result.conj()).real * result) / magnitude
    return (torch.where(magnitude == 0, 0.0, tangential),)
derivative(
    [aten.sigmoid.default], lambda result: (result * (1 - result),), vjp=fused_backward(aten.sigmoid_backward.default)
)

# -- activations ------------------------------------------------------------------
derivative(
    [aten.relu.default], lambda result: (_mask(result > 0, result),), vjp=fused_backward(aten.threshold_backward.default, 0)
)
derivative([aten.threshold.default], lambda self, threshold: (_mask(self > threshold, self),))
derivative([aten.leaky_relu.default], lambda self, negative_slope=0.01: (torch.where(self > 0, 1.0, negative_slope),))
derivative(
    [aten.hardtanh.default],
    lambda self, min_val=-1, max_val=1: (_mask((self > min_val) & (self < max_val), self),),
)
derivative([aten.hardsigmoid.default], lambda self: (torch.where((self > -3) & (self < 3), 1.0 / 6, 0.0),))
derivative(
    [aten.hardswish.default],
    lambda self: (torch.where(self < -3, 0.0, torch.where(self <= 3, self / 3 + 0.5, 1.0)),),
)
derivative([aten.softshrink.default, aten.hardshrink.default], lambda self, lambd=0.5: (_mask(self.abs() > lambd, self),))


def _elu_partial(self, alpha, scale, input_scale):
    return torch.where(self > 0, scale, input_scale * alpha * scale * (self * input_scale).exp())


derivative([aten.elu.default], lambda self, alpha=1, scale=1, input_scale=1: (_elu_partial(self, alpha, scale, input_scale),))
derivative([aten.celu.default], lambda self, alpha=1.0: (_elu_partial(self, alpha, 1, 1.0 / alpha),))
derivative([aten.selu.default], lambda self: (_elu_partial(self, _SELU_ALPHA, _SELU_SCALE, 1),))
derivative(
    [aten.softplus.default],
    lambda self, beta=1, threshold=20: (torch.where(self * beta > threshold, 1.0, (self * beta).sigmoid()),),
)


def _silu_partial(self):
    sig = self.sigmoid()
    return sig * (1 + self * (1 - sig))


def _gelu_partial(self, approximate="none"):
    if approximate == "tanh":
        k = math.sqrt(2 / math.pi)
        inner = k * (self + 0.044715 * self * self * self)
        t = inner.tanh()
        return 0.5 * (1 + t) + 0.5 * self * (1 - t * t) * k * (1 + 3 * 0.044715 * self * self)
    cdf = 0.5 * (1 + (self * math.sqrt(0.5)).erf())
    pdf = (-0.5 * self * self).exp() / math.sqrt(2 * math.pi)
    return cdf + self * pdf


def _mish_partial(self):
    t = torch.nn.functional.softplus(self).tanh()
    return t + self * self.sigmoid() * (1 - t * t)


derivative([aten.silu.default], lambda self: (_silu_partial(self),))
derivative([aten.gelu.default], lambda self, approximate="none": (_gelu_partial(self, approximate),))
derivative([aten.mish.default], lambda self: (_mish_partial(self),))

# -- backward ops (reached when derivatives are taken of derivatives) ----------
derivative([aten.tanh_backward.default], lambda grad_output, output: (1 - output * output, -2 * grad_output * output))
derivative(
    [aten.sigmoid_backward.default],
    lambda grad_output, output: (output * (1 - output), grad_output * (1 - 2 * output)),
)
derivative([aten.threshold_backward.default], lambda self, threshold: (_mask(self > threshold, self), None))

# -- writes ---------------------------------------------------------------------
derivative([aten.copy_.default, aten.copy.default], lambda: (None, 1))
derivative([aten.fill_.Scalar, aten.zero_.default, aten.zero.default], lambda: (None,))
derivative([aten.fill_.Tensor], lambda: (None, 1))
derivative([aten.fill.Tensor], lambda: (None, 1))

register_nondifferentiable(
    *(
        op
        for packet, names in [
            (aten.sign, ("default",)),
            (aten.sign_, ("default",)),
            (aten.ceil, ("default",)),
            (aten.ceil_, ("default",)),
            (aten.floor, ("default",)),
            (aten.floor_, ("default",)),
            (aten.round, ("default", "decimals")),
            (aten.round_, ("default", "decimals")),
            (aten.trunc, ("default",)),
            (aten.trunc_, ("default",)),
            (aten.heaviside, ("default",)),
            (aten.fill, ("Scalar",)),
        ]
        for op in overloads(packet, *names)
    )
)



# -- JVPs not given by a partials table ----------------------------------------


@register_jvp(aten.abs.default, aten.abs_.default)
def abs_jvp(self, self_t):
    """d|z| = Re(conj(sgn z) dz) (for real x: sgn(x) dx)."""
    if self.is_complex():
        return (self.sgn().conj() * self_t).real
    return self_t * self.sgn()


@register_jvp(aten.sgn.default, aten.sgn_.default)
def sgn_jvp(self, self_t, result):
    """sgn is piecewise constant on reals; for complex z, d(z/|z|) =
    (dz - Re(conj(sgn) dz) sgn) / |z|, 0 at z = 0."""
    if not self.is_complex():
        return None
    magnitude = self.abs()
    return torch.where(magnitude == 0, 0.0, (self_t - (result.conj() * self_t).real * result) / magnitude)


@register_jvp(aten.angle.default)
def angle_jvp(self, self_t):
    if not self.is_complex():
        return None
    return torch.where(self == 0, 0.0, (self.conj() * self_t).imag / (self.abs() ** 2))


@register_jvp(aten.polar.default)
def polar_jvp(abs, angle, abs_t, angle_t, result):
    out = None
    if abs_t is not None:
        out = abs_t * torch.polar(torch.ones_like(abs), angle)
    if angle_t is not None:
        term = angle_t * result * 1j
        out = term if out is None else out + term
    return out


# Ops linear in their inputs (over the reals): the JVP is the op on the tangents.
register_jvp(
    aten.clone.default,
    aten._to_copy.default,
    aten.positive.default,
    aten.neg.default,
    aten.neg_.default,
    aten.complex.default,
    aten.conj_physical.default,
    aten.conj_physical_.default,
    *overloads(aten._conj_physical, "default"),
    aten._conj.default,
    *overloads(aten.conj, "default"),
    *overloads(aten._neg_view, "default"),
    *overloads(aten.resolve_conj, "default"),
    *overloads(aten.resolve_neg, "default"),
    aten.view_as_real.default,
    aten.view_as_complex.default,
    aten.where.self,
)(linear_jvp())
register_jvp(aten.masked_fill.Scalar, aten.masked_fill_.Scalar, aten.fill_.Scalar, aten.fill.Scalar)(linear_jvp(zero=("value",)))
