"""Losses: nll_loss (1d and 2d), the pointwise losses (mse, smooth_l1,
huber, soft_margin, binary_cross_entropy[_with_logits]) and the margin
losses that reach dispatch.  cross_entropy, l1_loss and kl_div are
CompositeImplicit (log_softmax + nll_loss, abs/sub/mean, xlogy/sub/mean) and
need no rule of their own.

NOTE [Per-example loss reductions]
A loss's 'mean' or 'sum' reduces over everything one example sees, so the
batched rule computes the unreduced loss (reduction='none') on the whole
batch in one call, then reduces each example's part: ``[B, ...] -> [B]``.
"""

from __future__ import annotations

import inspect

import torch

from .._core.registry import overloads, register_batching, register_batching_each, register_jvp, register_vjp
from ._batching import batch_size, logical_rank, move_bdim_to_front, raise_as_eager
from .elementwise import broadcast_batched, reduce_to
from .pooling import _add, _like_input, _materialize, linear_in_first_jvp

aten = torch.ops.aten

# at::Reduction
_NONE, _MEAN, _SUM = 0, 1, 2


def _reduce_per_example(loss, reduction):
    """Reduce a front-batched unreduced loss per example (NOTE [Per-example
    loss reductions]): [B, *dims] -> [B]."""
    if reduction == _NONE or loss.dim() == 1:  # a logical 0-dim loss is its own mean and sum
        return loss
    dims = list(range(1, loss.dim()))
    return loss.sum(dims) if reduction == _SUM else loss.mean(dims)


# -- pointwise losses -------------------------------------------------------------


def pointwise_loss_batch(op, bdims, *args, reduction_at, **kwargs):
    """Losses elementwise over broadcast (input, target, [weights]) that sit
    before the reduction argument at ``reduction_at``."""
    reduction = args[reduction_at] if len(args) > reduction_at else _MEAN
    tensors = list(args[:reduction_at]) + [None] * (reduction_at - len(args))
    tensor_bdims = list(bdims[:reduction_at]) + [None] * (reduction_at - len(bdims))
    physical = broadcast_batched(tensors, tensor_bdims)
    # Some kernels write the loss in place into an input-shaped buffer:
    # expand every argument to the common shape.
    # [B, 1, 3] (input) and [2, 3] (target) -> both [B, 2, 3]
    shape = torch.broadcast_shapes(*[t.shape for t in physical if t is not None])
    physical = [t if t is None or t.shape == shape else t.expand(shape) for t in physical]
    loss = op(*physical, _NONE, *args[reduction_at + 1 :], **kwargs)
    return _reduce_per_example(loss, reduction), 0


register_batching_each(
    [
        aten.mse_loss.default,
        aten.smooth_l1_loss.default,
        aten.huber_loss.default,
        aten.soft_margin_loss.default,
    ],
    pointwise_loss_batch,
    reduction_at=2,
)
register_batching_each([aten.binary_cross_entropy.default], pointwise_loss_batch, reduction_at=3)
register_batching_each([aten.binary_cross_entropy_with_logits.default], pointwise_loss_batch, reduction_at=4)


# -- nll_loss -----------------------------------------------------------------------


@register_batching(aten.nll_loss_forward.default, aten.nll_loss2d_forward.default)
def nll_loss_batch(op, bdims, x, target, weight=None, reduction=_MEAN, ignore_index=-100):
    """Per-example nll_loss: the unreduced loss of the folded batch, then
    each example's sum, divided for 'mean' by the example's own total weight
    (the sum of w[target] over its non-ignored targets), as eager does.

    # input [B, N, C], target [B, N] -> [B*N, C], [B*N] -> loss [B*N] -> [B, N] -> [B]
    """
    x_bdim, t_bdim, w_bdim = bdims[0], bdims[1], bdims[2]
    spatial = 2 if op is aten.nll_loss2d_forward.default else 0
    x_rank, t_rank = logical_rank(x, x_bdim), logical_rank(target, t_bdim)
    has_n = x_rank == spatial + 2
    if t_rank != x_rank - 1 or not (has_n or (spatial == 0 and x_rank == 1)):
        raise_as_eager(op, bdims, (x, target, weight, reduction, ignore_index))
    batch = batch_size((x, target, weight), bdims)
    x = _materialize(x, x_bdim, batch)
    target = _materialize(target, t_bdim, batch)
    class_weight = weight
    if w_bdim is not None:
        # Per-example class weights go into the input: -w[t] * x[t] == -(w * x)[t].
        # weight [B, C] -> [B, 1, C, 1, 1] against input [B, N, C, H, W]
        w = move_bdim_to_front(weight, w_bdim)
        class_weight = w.view((batch,) + (1,) * has_n + (w.shape[1],) + (1,) * spatial)
        x = x * class_weight
        weight = None
    if has_n:
        loss, total = op(x.flatten(0, 1), target.flatten(0, 1), weight, _NONE, ignore_index)
        loss = loss.unflatten(0, (batch, -1))
    else:
        loss, total = op(x, target, weight, _NONE, ignore_index)
    if reduction == _NONE:
        return (loss, total), (0, None)  # eager's total_weight is 0 without reduction
    loss_sum = _reduce_per_example(loss, _SUM)
    total = _reduce_per_example(_target_weights(op, x, target, weight, class_weight, ignore_index, has_n), _SUM)
    return (loss_sum / total if reduction == _MEAN else loss_sum, total), 0


@register_batching(aten.nll_loss_backward.default, aten.nll_loss2d_backward.default)
def nll_loss_backward_batch(op, bdims, grad_output, x, target, weight, reduction, ignore_index, total_weight):
    """The unreduced backward of the folded batch, one kernel call: each
    example's reduced grad_output (divided by its own total weight for
    'mean', as the kernel does) becomes a per-target grad_output.

    # mean: grad_output [B], total_weight [B] -> [B, N] (g / w_total per example)
    # input [B, N, C], target [B, N] -> [B*N, C], [B*N] -> grad_input [B*N, C] -> [B, N, C]
    """
    g_bdim, x_bdim, t_bdim, w_bdim, tw_bdim = bdims[0], bdims[1], bdims[2], bdims[3], bdims[6]
    args = (grad_output, x, target, weight, reduction, ignore_index, total_weight)
    spatial = 2 if op is aten.nll_loss2d_backward.default else 0
    x_rank, t_rank = logical_rank(x, x_bdim), logical_rank(target, t_bdim)
    has_n = x_rank == spatial + 2
    g_rank = logical_rank(grad_output, g_bdim)
    if (t_rank != x_rank - 1 or not (has_n or (spatial == 0 and x_rank == 1))
            or g_rank != (t_rank if reduction == _NONE else 0)
            or logical_rank(total_weight, tw_bdim) != 0):
        raise_as_eager(op, bdims, args)
    batch = batch_size(args, bdims)
    target = _materialize(target, t_bdim, batch)
    grad_output = _materialize(grad_output, g_bdim, batch)
    if reduction != _NONE:
        if reduction == _MEAN:
            grad_output = grad_output / move_bdim_to_front(total_weight, tw_bdim)
        # [B] -> [B, *target] (contiguous: not every loss kernel reads stride-0 inputs safely)
        grad_output = grad_output.view((batch,) + (1,) * (target.dim() - 1)).expand(target.shape).contiguous()
    if w_bdim is not None:
        # Per-example class weights: w[b, target] goes into grad_output, the kernel runs unweighted.
        w = move_bdim_to_front(weight, w_bdim)
        safe = torch.where(target == ignore_index, 0, target)
        grad_output = grad_output * w.gather(1, safe.reshape(batch, -1)).view(target.shape)
        weight = None
    x = _materialize(x, x_bdim, batch)
    scalar_weight = total_weight if tw_bdim is None else total_weight.select(tw_bdim, 0)
    if has_n:
        grad_input = op(grad_output.flatten(0, 1), x.flatten(0, 1), target.flatten(0, 1), weight, _NONE,
                        ignore_index, scalar_weight)
        return grad_input.unflatten(0, (batch, -1)), 0
    return op(grad_output, x, target, weight, _NONE, ignore_index, scalar_weight), 0


def _target_weights(op, x, target, weight, class_weight, ignore_index, has_n):
    """w[target] per target, 0 where ignored: eager's per-target weight.
    The loss op computes it itself from an input of ones (or of the weights)."""
    if class_weight is None:
        return (target != ignore_index).to(x.dtype)
    # Contiguous inputs: the CPU loss kernels are not all safe on stride-0 ones.
    if weight is None:  # batched class weights, already shaped like the input's class dim
        ones = class_weight.expand(x.shape).contiguous()
    else:
        ones = torch.ones(x.shape, dtype=x.dtype, device=x.device)
    if has_n:
        counted = op(ones.flatten(0, 1), target.flatten(0, 1), weight, _NONE, ignore_index)[0]
        counted = counted.unflatten(0, (x.shape[0], -1))
    else:
        counted = op(ones, target, weight, _NONE, ignore_index)[0]
    return -counted


# -- margin losses ------------------------------------------------------------------


@register_batching(aten.multi_margin_loss.default)
def multi_margin_loss_batch(bdims, x, target, p=1, margin=1, weight=None, reduction=_MEAN):
    """input [N, C] with target [N], or one row: input [C] or [] (C = 1) with
    a one-element target ([] or [1], the unreduced loss's shape).  Per-row
    losses of the folded batch, then per-example reductions.  The kernel
    multiplies each row's loss by weight[target], so a batched weight is
    applied afterwards."""
    op = aten.multi_margin_loss.default
    x_bdim, t_bdim, w_bdim = bdims[0], bdims[1], bdims[4] if len(bdims) > 4 else None
    args = (x, target, p, margin, weight, reduction)
    x_rank, t_rank = logical_rank(x, x_bdim), logical_rank(target, t_bdim)
    rows_form = x_rank == 2
    if x_rank > 2 or (rows_form and t_rank != 1) or (not rows_form and t_rank > 1):
        raise_as_eager(op, bdims, args)
    batch = batch_size((x, target, None, None, weight), bdims)
    x = _materialize(x, x_bdim, batch)
    target = _materialize(target, t_bdim, batch)
    one_row_shape = tuple(target.shape[1:])
    if not rows_form:
        if target[0].numel() != 1:
            raise_as_eager(op, bdims, args)
        # [B, C] or [B] -> [B, 1, C]; target [B] or [B, 1] -> [B, 1]
        x, target = x.reshape(batch, 1, -1), target.reshape(batch, 1)
    shared_weight = weight if w_bdim is None else None
    loss = op(x.flatten(0, 1), target.flatten(0, 1), p, margin, shared_weight, _NONE).unflatten(0, (batch, -1))
    if w_bdim is not None:
        # loss [B, N] * weight[b, target[b, n]]
        w = move_bdim_to_front(weight, w_bdim).unsqueeze(1).expand(x.shape)
        loss = loss * w.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if not rows_form:  # one row: the loss has the target's shape, or is a scalar
        loss = loss.reshape((batch,) + one_row_shape) if reduction == _NONE else loss.reshape(batch)
    return _reduce_per_example(loss, reduction), 0


@register_batching(*overloads(aten.multilabel_margin_loss_forward, "default"))
def multilabel_margin_loss_batch(bdims, x, target, reduction):
    """input and target [N, C], or one row: [C] or [] (C = 1), whose
    unreduced loss is a scalar.  Fold the batch into N, reduce per example.
    is_target has the target's shape."""
    op = aten.multilabel_margin_loss_forward.default
    x_rank = logical_rank(x, bdims[0])
    if x_rank > 2 or logical_rank(target, bdims[1]) != x_rank:
        raise_as_eager(op, bdims, (x, target, reduction))
    batch = batch_size((x, target), bdims)
    x = _materialize(x, bdims[0], batch)
    target = _materialize(target, bdims[1], batch)
    shape = x.shape
    if tuple(target.shape) != tuple(shape):
        raise_as_eager(op, bdims, (x, target, reduction))
    # [B, N, C] (a single row: [B, 1, C])
    rows = (batch, -1, shape[-1] if x_rank > 0 else 1)
    loss, is_target = op(x.reshape(rows).flatten(0, 1), target.reshape(rows).flatten(0, 1), _NONE)
    loss, is_target = loss.view(batch, -1), is_target.view(shape)
    if x_rank < 2:
        loss = loss.view(batch)
    return (_reduce_per_example(loss, reduction), is_target), 0


# ==========================================================================
# Derivatives.  The pointwise losses are written from their elementwise
# partial derivatives (so every order and vmap come from the elementwise
# rules); nll_loss runs its backward kernel, whose own VJP is nll_loss of
# the cotangent; the margin losses are written with one-hot masks.
#
# Where torch declares an argument non-differentiable but the derivative is
# elementary (binary_cross_entropy's weight, binary_cross_entropy_with_logits'
# weight and pos_weight, soft_margin_loss's target), it is given; where it
# is not (nll_loss's and multi_margin_loss's class weights), asking for it
# raises, rather than returning a silent zero.
# ==========================================================================


def _scaled_by_reduction(grad, like, reduction):
    """The cotangent of each loss element: ``grad`` for 'none' and 'sum'
    (a scalar broadcasts), divided by the element count for 'mean'."""
    if reduction == _MEAN:
        return grad / max(like.numel(), 1)
    return grad


def pointwise_loss_vjp(partials):
    """The VJP rule of a pointwise loss from ``partials(needs, ...)``: the
    derivatives of each (unreduced) loss element with respect to each
    positional argument whose gradient ``needs`` asks for, with the broadcast
    shape of the loss (None: not wanted, or not differentiable).  The rule's
    signature is partials' plus ``grad``, ``inputs_meta`` and ``reduction``,
    so the tape saves what partials name."""

    def rule(grad, needs, inputs_meta, reduction=_MEAN, **saved):
        ds = partials(needs, **saved)
        like = next(d for d in ds if d is not None)
        scaled = _scaled_by_reduction(grad, like, reduction)
        return tuple(
            None if d is None or not need or meta is None else reduce_to(scaled * d, meta)
            for d, need, meta in zip(ds, needs, inputs_meta)
        )

    return _naming_partials_arguments(rule, partials, ("grad", "needs", "inputs_meta"), "pointwise_loss_vjp")


def _naming_partials_arguments(rule, partials, own, maker):
    """Give ``rule`` the signature ``(*own, reduction, <partials' arguments
    after needs>)``, keyword-only, so the transform passes (and the tape
    saves) what partials name."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(name, keyword) for name in own]
    params.append(inspect.Parameter("reduction", keyword, default=_MEAN))
    named = list(inspect.signature(partials).parameters.values())[1:]  # after `needs`
    params += [p.replace(kind=keyword) for p in named]
    rule.__signature__ = inspect.Signature(params)
    rule.__qualname__ = f"{maker}({partials.__qualname__})"
    return rule


def _wanted(needs, position):
    return position < len(needs) and needs[position]


def _mse_partials(needs, self, target):
    d = 2 * (self - target)
    return d, -d if _wanted(needs, 1) else None


def _smooth_l1_partials(needs, self, target, beta=1.0):
    diff = self - target
    if beta == 0:
        # The kernel's convention: -1 at diff == 0, for the target too (its
        # derivative is the kernel called with self and target swapped).
        d_target = torch.where(diff < 0, 1.0, -1.0).to(diff.dtype) if _wanted(needs, 1) else None
        return torch.where(diff > 0, 1.0, -1.0).to(diff.dtype), d_target
    d = (diff / beta).clamp(-1, 1)
    return d, -d if _wanted(needs, 1) else None


def _huber_partials(needs, self, target, delta=1.0):
    d = (self - target).clamp(-delta, delta)
    return d, -d if _wanted(needs, 1) else None


def _soft_margin_partials(needs, self, target):
    # loss = log(1 + exp(-t x)):  d/dx = -t sigmoid(-t x), d/dt = -x sigmoid(-t x)
    s = (-target * self).sigmoid()
    return -target * s, -self * s if _wanted(needs, 1) else None


def _log_sigmoid(x):
    return -torch.nn.functional.softplus(-x)


def _bce_partials(needs, self, target, weight=None):
    # the kernel's EPSILON keeps d_self finite at 0 and 1
    d_self = (self - target) / (self * (1 - self)).clamp_min(1e-12) if needs[0] else None
    d_target = -torch.logit(self) if _wanted(needs, 1) else None
    d_weight = None
    if weight is not None:
        d_self = None if d_self is None else d_self * weight
        d_target = None if d_target is None else d_target * weight
        if _wanted(needs, 2):
            d_weight = aten.binary_cross_entropy.default(self, target, None, _NONE)
    return d_self, d_target, d_weight


def _bce_logits_partials(needs, self, target, weight=None, pos_weight=None):
    # loss = -w (p t log s(x) + (1 - t) log s(-x)), p = 1 without pos_weight
    d_self = d_target = d_weight = d_pos_weight = None
    if needs[0]:
        sig = self.sigmoid()
        d_self = sig - target if pos_weight is None else (pos_weight * target + 1 - target) * sig - pos_weight * target
    if _wanted(needs, 1):
        d_target = -self if pos_weight is None else _log_sigmoid(-self) - pos_weight * _log_sigmoid(self)
    if _wanted(needs, 3):
        d_pos_weight = -target * _log_sigmoid(self)
    if weight is not None:
        if _wanted(needs, 2):
            d_weight = aten.binary_cross_entropy_with_logits.default(self, target, None, pos_weight, _NONE)
        d_self, d_target, d_pos_weight = (None if d is None else d * weight for d in (d_self, d_target, d_pos_weight))
    return d_self, d_target, d_weight, d_pos_weight


# op -> its partials (the JVPs below come from the same)
_POINTWISE_LOSS_PARTIALS = {
    aten.mse_loss.default: _mse_partials,
    aten.smooth_l1_loss.default: _smooth_l1_partials,
    aten.huber_loss.default: _huber_partials,
    aten.soft_margin_loss.default: _soft_margin_partials,
    aten.binary_cross_entropy.default: _bce_partials,
    aten.binary_cross_entropy_with_logits.default: _bce_logits_partials,
}
for _op, _partials in _POINTWISE_LOSS_PARTIALS.items():
    register_vjp(_op)(pointwise_loss_vjp(_partials))


def _no_class_weight_gradient(op, needs, position, transform="grad"):
    if _wanted(needs, position):
        raise RuntimeError(
            f"{transform}: {op} is not differentiable with respect to its class weights (as in torch.autograd); "
            f"pass them detached, or compute the loss from its definition if their gradient is wanted."
        )


# -- nll_loss ---------------------------------------------------------------------


def _register_nll_loss(forward, backward):
    @register_vjp(forward)
    def nll_loss_vjp(grad, inputs_meta, target, weight, reduction, ignore_index, result, needs, op):
        _no_class_weight_gradient(op, needs, 2)
        if grad[0] is None:
            return (None,)
        like = _like_input(grad[0], inputs_meta[0])  # the kernel reads only its shape
        return (backward(grad[0], like, target, weight, reduction, ignore_index, result[1]),)

    @register_vjp(backward)
    def nll_loss_backward_vjp(grad, target, weight, reduction, ignore_index):
        # linear in grad_output: gI[n, t_n] = -w[t_n] grad_output (/ total_weight)
        return (forward(grad, target, weight, reduction, ignore_index)[0],)


_register_nll_loss(aten.nll_loss_forward.default, aten.nll_loss_backward.default)
_register_nll_loss(aten.nll_loss2d_forward.default, aten.nll_loss2d_backward.default)


# -- margin losses ------------------------------------------------------------------


def _rows(x, target, *, per_class: bool):
    """[N, C] view of a margin loss's input, with its target as [N]
    (multi_margin_loss) or, ``per_class``, [N, C] (multilabel_margin_loss).
    A [C] or [] input is one row (C = 1)."""
    if x.dim() < 2:
        x = x.reshape(1, -1)
    return x, target.reshape(x.shape if per_class else (-1,))


def _one_hot(index, classes, like):
    """[*, C] 0/1 mask of ``index`` [*] in ``like``'s dtype."""
    return (index.unsqueeze(-1) == torch.arange(classes, device=index.device)).to(like.dtype)


def _per_row_cotangent(grad, rows, reduction):
    """The cotangent of each row's loss, [N, 1]."""
    if reduction == _NONE:
        return grad.reshape(-1, 1)
    if reduction == _MEAN:
        return grad / rows
    return grad


def _multi_margin_row_gradients(x, y, p, margin, weight):
    """[N, C]: the gradient of each row's loss with respect to its row.
    loss_n = sum_{i != y} w_y max(0, margin - x_y + x_i)^p / C: each
    active i gets w_y p z^(p-1) / C, and x_y minus their sum."""
    classes = x.shape[1]
    hot = _one_hot(y, classes, x)
    z = margin - (x * hot).sum(1, keepdim=True) + x
    active = (z > 0).to(x.dtype) * (1 - hot)
    d = active if p == 1 else p * z.pow(p - 1) * active
    if weight is not None:
        d = d * (hot * weight).sum(1, keepdim=True)
    d = d / classes
    return d - hot * d.sum(1, keepdim=True)


def _multilabel_margin_row_gradients(x, y, is_target):
    """[N, C]: the gradient of each row's loss with respect to its row.
    loss_n = sum_{j valid} sum_{i not a target} max(0, 1 - x[y_j] + x[i]) / C,
    where the valid slots j are those before the first -1 of the target row.
    # pairs [N, slot j, class i]: active where the margin is violated
    """
    is_target = is_target.reshape(x.shape)
    classes = x.shape[1]
    valid = ((y < 0).cumsum(1) == 0).to(x.dtype)  # [N, S]
    slots = _one_hot(y.clamp_min(0), classes, x) * valid.unsqueeze(-1)  # [N, S, C]
    x_target = (slots * x.unsqueeze(1)).sum(2, keepdim=True)  # [N, S, 1]
    margins = 1 - x_target + x.unsqueeze(1)  # [N, S, C]
    active = (margins > 0).to(x.dtype) * valid.unsqueeze(-1) * (1 - is_target).unsqueeze(1)
    return (active.sum(1) - (slots * active.sum(2, keepdim=True)).sum(1)) / classes


@register_vjp(aten.multi_margin_loss.default)
def multi_margin_loss_vjp(grad, self, target, needs, p=1, margin=1, weight=None, reduction=_MEAN):
    _no_class_weight_gradient(aten.multi_margin_loss.default, needs, 4)
    x, y = _rows(self, target, per_class=False)
    d = _multi_margin_row_gradients(x, y, p, margin, weight) * _per_row_cotangent(grad, x.shape[0], reduction)
    return (d.reshape(self.shape),)


@register_vjp(aten.multilabel_margin_loss_forward.default)
def multilabel_margin_loss_vjp(grad, self, target, reduction, result):
    if grad[0] is None:
        return (None,)
    x, y = _rows(self, target, per_class=True)
    scale = _per_row_cotangent(grad[0], x.shape[0], reduction)  # [N, 1] or scalar
    return ((_multilabel_margin_row_gradients(x, y, result[1]) * scale).reshape(self.shape),)


# -- JVPs ---------------------------------------------------------------------
# derivatives.yaml's forward formulas: the pointwise losses' tangent is the
# sum over arguments of partial derivative times tangent, reduced as the loss
# is (apply_loss_reduction), from the same partials as their VJPs (so the
# arguments torch does not differentiate, but the VJPs do, get tangents too);
# nll_loss is linear in its input; the margin losses are piecewise linear,
# so each row's tangent is its gradient's inner product with the tangent.


def _reduced(loss, reduction):
    if reduction == _MEAN:
        return loss.mean()
    if reduction == _SUM:
        return loss.sum()
    return loss


def pointwise_loss_jvp(partials):
    """The JVP rule of a pointwise loss from ``partials`` (see
    :func:`pointwise_loss_vjp`): sum_i d_i t_i over the arguments with a
    tangent, then the loss's reduction."""

    def rule(tangents, reduction=_MEAN, **saved):
        ds = partials(tuple(t is not None for t in tangents), **saved)
        total = None
        for d, t in zip(ds, tangents):
            if d is not None and t is not None:
                total = _add(total, d * t)
        return None if total is None else _reduced(total, reduction)

    return _naming_partials_arguments(rule, partials, ("tangents",), "pointwise_loss_jvp")


for _op, _partials in _POINTWISE_LOSS_PARTIALS.items():
    register_jvp(_op)(pointwise_loss_jvp(_partials))


@register_jvp(aten.nll_loss_forward.default, aten.nll_loss2d_forward.default)
def nll_loss_jvp(op, self_t, weight_t, target, weight, reduction, ignore_index):
    """Linear in the input (total_weight, a sum of class weights, has no tangent)."""
    _no_class_weight_gradient(op, (False, False, weight_t is not None), 2, transform="jvp")
    if self_t is None:
        return None
    return op(self_t, target, weight, reduction, ignore_index)[0], None


register_jvp(aten.nll_loss_backward.default, aten.nll_loss2d_backward.default)(linear_in_first_jvp)


def _row_tangents(gradients, self_t, reduction, like):
    """A margin loss's tangent from each row's gradient [N, C]: the inner
    product with the row's tangent, reduced as the loss is (``like``: the
    unreduced loss's shape, [N] or [])."""
    rows = (gradients * self_t.reshape(gradients.shape)).sum(1)
    return rows.reshape(like.shape) if reduction == _NONE else _reduced(rows, reduction)


@register_jvp(aten.multi_margin_loss.default)
def multi_margin_loss_jvp(self, self_t, weight_t, target, result, p=1, margin=1, weight=None, reduction=_MEAN):
    _no_class_weight_gradient(aten.multi_margin_loss.default, (False,) * 4 + (weight_t is not None,), 4, "jvp")
    x, y = _rows(self, target, per_class=False)
    return _row_tangents(_multi_margin_row_gradients(x, y, p, margin, weight), self_t, reduction, result)


@register_jvp(aten.multilabel_margin_loss_forward.default)
def multilabel_margin_loss_jvp(self, self_t, target, reduction, result):
    x, y = _rows(self, target, per_class=True)
    return _row_tangents(_multilabel_margin_row_gradients(x, y, result[1]), self_t, reduction, result[0]), None


# -- ctc_loss -------------------------------------------------------------------
# derivatives.yaml: the backward kernel, from the saved negative
# log-likelihood and alphas.  torch has no derivative of that kernel, so
# second order raises (as a missing rule) like torch.autograd.


@register_vjp(aten._ctc_loss.default, *overloads(aten._ctc_loss, "Tensor"))
def ctc_loss_vjp(grad, op, log_probs, targets, input_lengths, target_lengths, result, blank=0, zero_infinity=False):
    if grad[0] is None:
        return (None,)
    backward = aten._ctc_loss_backward.Tensor if op is getattr(aten._ctc_loss, "Tensor", None) else aten._ctc_loss_backward.default
    return (backward(grad[0], log_probs, targets, input_lengths, target_lengths, result[0], result[1], blank,
                     zero_infinity),)


@register_jvp(aten._ctc_loss.default, *overloads(aten._ctc_loss, "Tensor"))
def ctc_loss_jvp(op, log_probs, log_probs_t, targets, input_lengths, target_lengths, result, blank=0,
                 zero_infinity=False):
    """Each example's loss depends on its own [T, C] slice of log_probs
    only: its tangent is the inner product of that slice's gradient (the
    backward kernel with unit cotangents) with the slice's tangent.  (torch
    has no forward formula.)  log_alpha, an internal output saved for the
    backward kernel, gets no tangent."""
    if log_probs_t is None:
        return None, None
    backward = aten._ctc_loss_backward.Tensor if op is getattr(aten._ctc_loss, "Tensor", None) else aten._ctc_loss_backward.default
    loss, log_alpha = result
    gradient = backward(torch.ones_like(loss), log_probs, targets, input_lengths, target_lengths, loss, log_alpha,
                        blank, zero_infinity)
    products = gradient * log_probs_t  # [T, N, C] or [T, C]
    return products.sum((0, 2)) if products.dim() == 3 else products.sum(), None
