"""Pooling ops (max, average, adaptive) and their backward ops, plus the
helpers the whole neural-network family shares: folding the vmap batch into
an op's own leading batch dim N, and raising eager's error for bad shapes.

NOTE [Folding the batch into N]
Most nn ops take ``[N, C, *spatial]`` and treat the N examples independently,
so a vmap batch can ride along in N: ``[B, N, C, H, W] -> [B*N, C, H, W]``,
run the op once, split the outputs' dim 0 back into ``[B, N]``.  Ops that also
accept an input without N (``[C, H, W]``) see the batch *as* N instead: no
reshape at all.  Per-example results are unchanged because the op never
mixes examples along N.  The logical rank must be checked first: a logical
``[H, W]`` input would otherwise pass as a physical ``[B, H, W]`` one and
return wrong numbers instead of eager's error.
"""

from __future__ import annotations

import torch

from .._core.registry import overloads, register_batching_each, register_jvp, register_vjp
from ._batching import batch_size, logical_rank, move_bdim_to_front, raise_as_eager
from ._derivatives import linear_jvp

aten = torch.ops.aten
Tensor = torch.Tensor


# -- shared helpers (used by conv.py, norm.py, loss.py and nn.py) -------------


def _materialize(x, bdim, batch):
    """``x`` with its batch dim at 0; an unbatched ``x`` is copied ``batch``
    times.  A copy, not an expanded view, because that goes to kernels and
    some CPU kernels crash on stride-0 inputs (adaptive_max_pool3d_backward
    segfaults on them in torch 2.13)."""
    if bdim is None:
        return x.expand((batch,) + tuple(x.shape)).contiguous()
    return move_bdim_to_front(x, bdim)


def _fold(x, bdim, batch):
    """Fold the batch of ``x`` into its leading logical dim (NOTE [Folding the
    batch into N]).  Returns the folded tensor and where the batch goes when
    an output's dim 0 is split again (0 or 1: a batch already at dim 1 folds
    as ``[N, B] -> [N*B]`` without moving).

    # [B, N, C, H, W] -> [B*N, C, H, W]    (bdim 0; also bdim 1: [N, B, ...] -> [N*B, ...])
    """
    if bdim is None:
        x, bdim = _materialize(x, None, batch), 0
    elif bdim > 1:
        x, bdim = x.movedim(bdim, 0), 0
    return x.flatten(0, 1), bdim


def _unfold(out, bdim, batch):
    """Split dim 0 of a folded output back: ``[B*N, ...] -> [B, N, ...]``
    (or ``[N, B, ...]`` when ``bdim`` is 1)."""
    if out is None:
        return None
    rest = out.shape[0] // batch if batch else 0
    lead = (batch, rest) if bdim == 0 else (rest, batch)
    return out.view(lead + tuple(out.shape[1:]))


def _unfold_all(out, bdim, batch):
    if isinstance(out, Tensor):
        return _unfold(out, bdim, batch)
    return tuple(_unfold(o, bdim, batch) for o in out)


def _channels_to_front(x, bdim, batch):
    """The batch folded into the channel dim, for ops whose examples are
    *not* independent along N: [B, N, C, *S] -> [N, B*C, *S]."""
    return _materialize(x, bdim, batch).movedim(0, 1).flatten(1, 2)


def fold_batch_rule(op, bdims, *args, spatial, without_n=True, tensors=(0,), **kwargs):
    """Batching rule of an op over ``[N, C, *spatial]`` inputs whose examples
    are independent along N (NOTE [Folding the batch into N]).

    ``spatial``: the number of spatial dims; ``without_n``: whether the op
    also takes ``[C, *spatial]``; ``tensors``: positions of the tensor
    arguments that share the leading N (the first decides the logical rank).
    """
    main = tensors[0]
    rank = logical_rank(args[main], bdims[main])
    if rank == spatial + 2:
        if len(tensors) == 1:  # the common case: one batched input
            x, bdim = args[main], bdims[main]
            batch = x.shape[bdim]
            x, out_bdim = _fold(x, bdim, batch)
            args = args[:main] + (x,) + args[main + 1 :]
            return _unfold_all(op(*args, **kwargs), out_bdim, batch), out_bdim
        batch = batch_size(args, bdims)
        args = list(args)
        for i in tensors:
            if args[i] is not None:
                args[i] = _materialize(args[i], bdims[i], batch).flatten(0, 1)
        return _unfold_all(op(*args, **kwargs), 0, batch), 0
    if without_n and rank == spatial + 1:
        # [B, C, H, W]: the batch is the op's N.
        batch = batch_size(args, bdims)
        args = list(args)
        for i in tensors:
            if args[i] is not None:
                args[i] = _materialize(args[i], bdims[i], batch)
        return op(*args, **kwargs), 0
    raise_as_eager(op, bdims, args, kwargs)


def register_fold(ops, spatial, **options):
    register_batching_each(ops, fold_batch_rule, spatial=spatial, **options)


# -- pooling --------------------------------------------------------------------
# max_pool{1,2,3}d and max_pool1d_with_indices are CompositeImplicit: user code
# reaches dispatch with the *_with_indices ops, but rules (running below
# autograd) see them whole.

register_fold(overloads(aten.max_pool1d, "default") + overloads(aten.max_pool1d_with_indices, "default"), 1)
register_fold(
    [aten.max_pool2d.default, aten.max_pool2d_with_indices.default, aten.avg_pool2d.default,
     aten.adaptive_max_pool2d.default, aten._adaptive_avg_pool2d.default],
    2,
)
register_fold(
    [aten.max_pool3d.default, aten.max_pool3d_with_indices.default, aten.avg_pool3d.default,
     aten.adaptive_max_pool3d.default, aten._adaptive_avg_pool3d.default],
    3,
)

# Backward ops take (grad_output, self, ..., [indices]), all with self's N;
# `self` (listed first) decides the logical rank.
register_fold([aten.avg_pool2d_backward.default, aten._adaptive_avg_pool2d_backward.default], 2, tensors=(1, 0))
register_fold([aten.avg_pool3d_backward.default, aten._adaptive_avg_pool3d_backward.default], 3, tensors=(1, 0))
register_fold([aten.max_pool2d_with_indices_backward.default], 2, tensors=(1, 0, 7))
register_fold([aten.max_pool3d_with_indices_backward.default], 3, tensors=(1, 0, 7))
register_fold([aten.adaptive_max_pool2d_backward.default], 2, tensors=(1, 0, 2))
register_fold([aten.adaptive_max_pool3d_backward.default], 3, tensors=(1, 0, 2))
register_fold([aten.fractional_max_pool2d_backward.default], 2, tensors=(1, 0, 4))
register_fold([aten.fractional_max_pool3d_backward.default], 3, tensors=(1, 0, 4))


# ==========================================================================
# Derivatives.  Each pooling op's VJP is its backward kernel; the backward
# ops are linear in grad_output, so their own VJPs (for second order) are the
# forward pooling of the cotangent (average pooling) or a gather of it at the
# saved argmax indices (max pooling).  The kernels only read the input's
# shape, so rules keep its metadata, not the input (an uninitialized tensor
# of that shape stands in for it).
# ==========================================================================


def _like_input(grad, meta):
    """A stand-in for an input a backward kernel reads only the shape of."""
    return grad.new_empty(meta[0])


def _gather_at(grad, indices, spatial):
    """``grad`` read at the argmax ``indices`` of a max pooling
    (max_pool_double_backward): [N, C, *S] gathered at [N, C, *S_out]."""
    return grad.flatten(-spatial).gather(-1, indices.flatten(-spatial)).view(indices.shape)


# forward op -> (its backward op, spatial dims)
_BACKWARD = {
    aten.max_pool2d_with_indices.default: (aten.max_pool2d_with_indices_backward.default, 2),
    aten.max_pool3d_with_indices.default: (aten.max_pool3d_with_indices_backward.default, 3),
    aten.adaptive_max_pool2d.default: (aten.adaptive_max_pool2d_backward.default, 2),
    aten.adaptive_max_pool3d.default: (aten.adaptive_max_pool3d_backward.default, 3),
    aten.avg_pool2d.default: (aten.avg_pool2d_backward.default, 2),
    aten.avg_pool3d.default: (aten.avg_pool3d_backward.default, 3),
    aten._adaptive_avg_pool2d.default: (aten._adaptive_avg_pool2d_backward.default, 2),
    aten._adaptive_avg_pool3d.default: (aten._adaptive_avg_pool3d_backward.default, 3),
    aten.fractional_max_pool2d.default: (aten.fractional_max_pool2d_backward.default, 2),
    aten.fractional_max_pool3d.default: (aten.fractional_max_pool3d_backward.default, 3),
}
# backward op -> (its forward op, spatial dims)
_FORWARD = {backward: (forward, spatial) for forward, (backward, spatial) in _BACKWARD.items()}


@register_vjp(aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default)
def max_pool_vjp(grad, op, inputs_meta, kernel_size, result, stride=(), padding=0, dilation=1, ceil_mode=False):
    if grad[0] is None:
        return (None,)
    backward = _BACKWARD[op][0]
    like = _like_input(grad[0], inputs_meta[0])
    return (backward(grad[0], like, kernel_size, stride, padding, dilation, ceil_mode, result[1]),)


@register_vjp(aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default)
def adaptive_max_pool_vjp(grad, op, inputs_meta, result):
    if grad[0] is None:
        return (None,)
    return (_BACKWARD[op][0](grad[0], _like_input(grad[0], inputs_meta[0]), result[1]),)


@register_vjp(aten.fractional_max_pool2d.default, aten.fractional_max_pool3d.default)
def fractional_max_pool_vjp(grad, op, inputs_meta, kernel_size, output_size, result):
    """random_samples only chose the windows: it gets no gradient."""
    if grad[0] is None:
        return (None,)
    like = _like_input(grad[0], inputs_meta[0])
    return (_BACKWARD[op][0](grad[0], like, kernel_size, output_size, result[1]),)


@register_vjp(
    aten.max_pool2d_with_indices_backward.default,
    aten.max_pool3d_with_indices_backward.default,
    aten.adaptive_max_pool2d_backward.default,
    aten.adaptive_max_pool3d_backward.default,
    aten.fractional_max_pool2d_backward.default,
    aten.fractional_max_pool3d_backward.default,
)
def max_pool_backward_vjp(grad, op, indices):
    return (_gather_at(grad, indices, _FORWARD[op][1]),)


@register_vjp(aten.avg_pool2d.default, aten.avg_pool3d.default)
def avg_pool_vjp(grad, op, inputs_meta, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
    like = _like_input(grad, inputs_meta[0])
    return (_BACKWARD[op][0](grad, like, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override),)


@register_vjp(aten.avg_pool2d_backward.default, aten.avg_pool3d_backward.default)
def avg_pool_backward_vjp(grad, op, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return (_FORWARD[op][0](grad, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override),)


@register_vjp(aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default)
def adaptive_avg_pool_vjp(grad, op, inputs_meta):
    return (_BACKWARD[op][0](grad, _like_input(grad, inputs_meta[0])),)


@register_vjp(aten._adaptive_avg_pool2d_backward.default, aten._adaptive_avg_pool3d_backward.default)
def adaptive_avg_pool_backward_vjp(grad, op, inputs_meta):
    forward, spatial = _FORWARD[op]
    return (forward(grad, list(inputs_meta[0][0][-spatial:])),)


# -- JVPs ---------------------------------------------------------------------


def linear_in_first_jvp(op, primals, tangents, kwargs, result):
    """A raw JVP rule for backward kernels, linear in their first argument
    (grad_output): the other arguments are the forward's input (read for
    its shape only), saved indices, sizes or statistics, whose tangents do
    not enter.  The tangent is the kernel applied to grad_output's."""
    if tangents[0] is None:
        return None
    return op(tangents[0], *primals[1:], **kwargs)


linear_in_first_jvp.raw_jvp = True


def _add(total, term):
    """A sum of tangent terms, None (zero) so far."""
    return term if total is None else total + term


_AVERAGE_POOLS = (
    aten.avg_pool2d.default, aten.avg_pool3d.default, aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default
)
register_jvp(*_AVERAGE_POOLS)(linear_jvp())  # linear: the op on the tangent
register_jvp(*_FORWARD)(linear_in_first_jvp)  # every backward kernel: linear in grad_output


@register_jvp(*(op for op in _BACKWARD if op not in _AVERAGE_POOLS))
def max_pool_jvp(op, self_t, result):
    """The tangent read at the argmax indices (derivatives.yaml: a gather
    of self_t at result1); the indices have none."""
    if self_t is None:  # e.g. only fractional max pooling's random_samples carry one
        return None, None
    return _gather_at(self_t, result[1], _BACKWARD[op][1]), None
