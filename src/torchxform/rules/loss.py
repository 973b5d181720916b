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

import torch

from .._core.registry import overloads, register_batching, register_batching_each
from ._batching import batch_size, logical_rank, move_bdim_to_front, raise_as_eager
from .elementwise import broadcast_batched
from .pooling import _materialize

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
    """input [N, C] or [C], target [N] or []: per-row losses of the folded
    batch, then per-example reductions.  The kernel multiplies each row's
    loss by weight[target], so a batched weight is applied afterwards."""
    op = aten.multi_margin_loss.default
    x_bdim, t_bdim, w_bdim = bdims[0], bdims[1], bdims[4] if len(bdims) > 4 else None
    x_rank = logical_rank(x, x_bdim)
    if x_rank not in (1, 2) or logical_rank(target, t_bdim) != x_rank - 1:
        raise_as_eager(op, bdims, (x, target, p, margin, weight, reduction))
    batch = batch_size((x, target, None, None, weight), bdims)
    x = _materialize(x, x_bdim, batch)
    target = _materialize(target, t_bdim, batch)
    shared_weight = weight if w_bdim is None else None
    if x_rank == 2:
        loss = op(x.flatten(0, 1), target.flatten(0, 1), p, margin, shared_weight, _NONE).unflatten(0, (batch, -1))
    else:
        loss = op(x, target, p, margin, shared_weight, _NONE)
    if w_bdim is not None:
        # loss [B, N] * weight[b, target[b, n]]
        w = move_bdim_to_front(weight, w_bdim)
        if x_rank == 2:
            w = w.unsqueeze(1).expand(x.shape)
        loss = loss * w.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return _reduce_per_example(loss, reduction), 0


@register_batching(*overloads(aten.multilabel_margin_loss_forward, "default"))
def multilabel_margin_loss_batch(bdims, x, target, reduction):
    """input and target [N, C] or [C]: fold the batch into N, reduce per
    example.  is_target has the target's shape."""
    op = aten.multilabel_margin_loss_forward.default
    x_rank = logical_rank(x, bdims[0])
    if x_rank not in (1, 2) or logical_rank(target, bdims[1]) != x_rank:
        raise_as_eager(op, bdims, (x, target, reduction))
    batch = batch_size((x, target), bdims)
    x = _materialize(x, bdims[0], batch)
    target = _materialize(target, bdims[1], batch)
    if x_rank == 2:
        loss, is_target = op(x.flatten(0, 1), target.flatten(0, 1), _NONE)
        loss, is_target = loss.unflatten(0, (batch, -1)), is_target.unflatten(0, (batch, -1))
    else:
        loss, is_target = op(x, target, _NONE)
    return (_reduce_per_example(loss, reduction), is_target), 0
