"""Normalization: batch norm (every ATen variant), layer norm, group norm.
Instance norm is CompositeImplicit over batch norm and needs no rule.

Each example is normalized with its own statistics, as in a loop over the
batch.  Batch norm in training mode computes statistics over N and the
spatial dims, so the vmap batch cannot join N: it joins the channels instead
(``[B, N, C, H, W] -> [N, B*C, H, W]``), which gives every example its own
per-channel statistics in one call.
"""

from __future__ import annotations

import torch

from .._core.tracer import Tracer
from .._core.registry import register_batching, register_batching_each, register_jvp, register_vjp
from ._batching import batch_size, front_padded, logical_rank, move_bdim_to_front, raise_as_eager
from .pooling import _add, _channels_to_front, _fold, _like_input, _materialize, _unfold

aten = torch.ops.aten

# torch.func's message, then where torchxform's tools are.
BATCH_NORM_RUNNING_STATS_MESSAGE = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will be "
    "updated in place, were not batched.\nIf you are using a module and do not need eval mode, please "
    "set `track_running_stats` to be False.If you are using a prebuilt module and do not need eval "
    "mode, please see the functorch website for resources on how to patch your module to work with "
    "vmap. (replace_all_batch_norm_modules_ patches a model's batch norm modules so; otherwise pass "
    "running_mean and running_var batched like the input, one set of running statistics per example.)"
)


def _affine_after(out, out_bdim, rank, trailing, weight, w_bdim, bias, b_bdim):
    """``out * weight + bias`` for the affine parameters the op could not
    take itself (a batched weight, and the bias that must follow it).  The
    parameters' logical dims align with ``out``'s dims counted from the
    right, skipping ``trailing`` spatial dims.

    # group norm, out [N, C, H, W], weight [B, C] -> [B, 1, C, 1, 1]: result [B, N, C, H, W]
    # layer norm, out [B, N, D] (batched), weight [D] -> [D]: result [B, N, D]
    """
    if out_bdim is not None:
        out = move_bdim_to_front(out, out_bdim)

    def align(p, bdim):
        p = p.view(tuple(p.shape) + (1,) * trailing)
        return p if bdim is None else front_padded(p, bdim, rank)

    if weight is not None:
        out = out * align(weight, w_bdim)
    if bias is not None:
        out = out + align(bias, b_bdim)
    return out


def _split_affine(weight, w_bdim, bias, b_bdim):
    """Which affine parameters the op applies itself (unbatched ones, and a
    bias only if the weight goes in too) and which are applied afterwards."""
    w_in = weight if w_bdim is None else None
    b_in = bias if b_bdim is None and w_bdim is None else None
    w_after = None if w_in is not None else weight
    b_after = None if b_in is not None else bias
    return w_in, b_in, w_after, b_after


# -- batch norm -------------------------------------------------------------------


def batch_norm_batch(op, bdims, *args, stats, training_at, updates_stats, training=False, opaque=()):
    """Every batch-norm variant: ``args`` start (input, weight, bias); running
    statistics sit at positions ``stats``; ``training_at`` is the position
    of the training flag (None: the op always runs as ``training`` says);
    ``updates_stats`` says the op writes the running statistics in place.
    Outputs at positions ``opaque`` (``_batch_norm_with_update``'s cuDNN
    reserve buffer) pass through unbatched."""
    x, weight, bias = args[0], args[1], args[2]
    x_bdim, w_bdim, b_bdim = bdims[0], bdims[1], bdims[2]
    if training_at is not None:
        training = args[training_at]
    rank = logical_rank(x, x_bdim)
    if rank < 2:
        raise_as_eager(op, bdims, args)
    stats_batched = any(bdims[i] is not None for i in stats)
    if training and updates_stats and x_bdim is not None:
        if any(args[i] is not None and bdims[i] is None for i in stats):
            raise RuntimeError(BATCH_NORM_RUNNING_STATS_MESSAGE)
    batch = batch_size(args, bdims)
    original, args = args, list(args)

    if not training and w_bdim is None and b_bdim is None and not stats_batched:
        # Eval with shared parameters: examples are independent along N.
        folded, out_bdim = _fold(x, x_bdim, batch)
        results = op(folded, *args[1:])
        return (_unfold(results[0], out_bdim, batch),) + tuple(results[1:]), (out_bdim,) + (None,) * (len(results) - 1)

    if x_bdim is None and not stats_batched:
        # Only the affine parameters differ per example: normalize once
        # (running statistics are updated once, as torch.func does).
        w_in, b_in, w_after, b_after = _split_affine(weight, w_bdim, bias, b_bdim)
        args[1], args[2] = w_in, b_in
        results = op(*args)
        out = _affine_after(results[0], None, rank, rank - 2, w_after, w_bdim, b_after, b_bdim)
        return (out,) + tuple(results[1:]), (0,) + (None,) * (len(results) - 1)

    # Per-example statistics: the batch joins the channels.
    # [B, N, C, *S] -> [N, B*C, *S];  per-channel [B, C] (or shared [C]) -> [B*C]
    args[0] = _channels_to_front(x, x_bdim, batch)
    for i in (1, 2, *stats):
        if args[i] is not None:
            args[i] = _materialize(args[i], bdims[i], batch).flatten()
    results = op(*args)
    if training and updates_stats:
        for i in stats:  # `flatten` copied unless the batch was at dim 0: write back
            if args[i] is not None:
                front = move_bdim_to_front(original[i], bdims[i])
                front.copy_(args[i].view(front.shape))
    outs = [results[0].unflatten(1, (batch, -1))]
    out_bdims = [1]
    for i, r in enumerate(results[1:], 1):
        if r.numel() == 0 or i in opaque:  # eval-mode save_mean / save_invstd are empty
            outs.append(r)
            out_bdims.append(None)
        else:
            outs.append(r.unflatten(0, (batch, -1)))
            out_bdims.append(0)
    return tuple(outs), tuple(out_bdims)


_BATCH_NORMS = [
    # (op, running-stat positions, training-flag position or the fixed mode, updates stats in place)
    (aten.native_batch_norm.default, (3, 4), 5, True),
    (aten._native_batch_norm_legit.default, (3, 4), 5, True),
    (aten._native_batch_norm_legit.no_stats, (), 3, False),
    (aten._native_batch_norm_legit_no_training.default, (3, 4), False, False),
    (aten._native_batch_norm_legit_functional.default, (3, 4), 5, False),
    (aten._batch_norm_with_update.default, (3, 4), True, True),
    (aten._batch_norm_no_update.default, (3, 4), False, False),
]
for _op, _stats, _training, _updates in _BATCH_NORMS:
    _mode = dict(training_at=None, training=_training) if type(_training) is bool else dict(training_at=_training)
    _opaque = (3,) if len(_op._schema.returns) == 4 else ()  # the reserve buffer of *_update ops
    register_batching_each([_op], batch_norm_batch, stats=_stats, updates_stats=_updates, opaque=_opaque, **_mode)


# -- layer norm and group norm ------------------------------------------------------


@register_batching(aten.native_layer_norm.default)
def layer_norm_batch(bdims, x, normalized_shape, weight, bias, eps):
    """Normalizes the trailing dims: the batch stays where it is unless it
    sits among them.  mean and rstd keep the input's layout."""
    x_bdim, w_bdim, b_bdim = bdims[0], bdims[2], bdims[3]
    k = len(normalized_shape)
    if x_bdim is not None:
        if x.dim() - 1 < k:
            raise_as_eager(aten.native_layer_norm.default, bdims, (x, normalized_shape, weight, bias, eps))
        if x_bdim >= x.dim() - k:
            x, x_bdim = move_bdim_to_front(x, x_bdim), 0
    w_in, b_in, w_after, b_after = _split_affine(weight, w_bdim, bias, b_bdim)
    out, mean, rstd = aten.native_layer_norm.default(x, normalized_shape, w_in, b_in, eps)
    if w_after is None and b_after is None:
        return (out, mean, rstd), x_bdim
    rank = x.dim() - (x_bdim is not None)
    out = _affine_after(out, x_bdim, rank, 0, w_after, w_bdim, b_after, b_bdim)
    return (out, mean, rstd), (0, x_bdim, x_bdim)


@register_batching(aten.native_group_norm.default)
def group_norm_batch(bdims, x, weight, bias, n, channels, hxw, group, eps):
    """Statistics per (example, group): the batch folds into N."""
    op = aten.native_group_norm.default
    x_bdim, w_bdim, b_bdim = bdims[0], bdims[1], bdims[2]
    rank = logical_rank(x, x_bdim)
    w_in, b_in, w_after, b_after = _split_affine(weight, w_bdim, bias, b_bdim)
    if x_bdim is None:
        results, out_bdim = op(x, w_in, b_in, n, channels, hxw, group, eps), None
    else:
        batch = x.shape[x_bdim]
        if rank >= 2:
            folded, out_bdim = _fold(x, x_bdim, batch)
        else:  # the kernel reads any shape as [N, C, HxW]: keep the batch in front
            front = move_bdim_to_front(x, x_bdim)
            folded, out_bdim = front.reshape(-1), 0
        out, mean, rstd = op(folded, w_in, b_in, n * batch, channels, hxw, group, eps)
        out = _unfold(out, out_bdim, batch) if rank >= 2 else out.view(front.shape)
        results = (out, _unfold(mean, out_bdim, batch), _unfold(rstd, out_bdim, batch))
    if w_after is None and b_after is None:
        return results, out_bdim
    out = _affine_after(results[0], out_bdim, rank, rank - 2, w_after, w_bdim, b_after, b_bdim)
    return (out,) + tuple(results[1:]), (0, out_bdim, out_bdim)


# ==========================================================================
# Derivatives.  First order runs each op's backward kernel; higher orders
# and vmap run the kernels' torch._decomp decompositions (their coverage is
# "decomposition"), which are ordinary differentiable ops.
#
# NOTE [Normalization statistics]
# Batch norm and layer norm also return the mean and inverse standard
# deviation they normalized with.  PyTorch (derivatives.yaml) gives those
# outputs no derivative: their tangents are zero and cotangents sent to them
# are dropped, and so they are here.  The backward kernels read them,
# though, and differentiated again (forward-over-reverse, second order, a
# JVP rule under another transform) the backward must see them as functions
# of the input: when the input is a tracer of a lower level, the statistics
# are recomputed from it (``_statistics``); on plain tensors the forward's
# saved ones are used.  Group norm's statistics are differentiable outputs
# in PyTorch (their cotangents reach the input: ``_plus_statistics``).
# ==========================================================================


def _statistics(input, mean, rstd, dims, eps):
    """The statistics the forward saved (``mean``, ``rstd``), or, when
    ``input`` is a lower level's tracer, the same recomputed from it over
    ``dims`` (biased variance) in their shapes.  See NOTE [Normalization
    statistics]."""
    if not isinstance(input, Tracer) or input.numel() == 0:  # empty: nothing to recompute
        return mean, rstd
    x = input.to(mean.dtype)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    var, m = torch.var_mean(x, dims, correction=0, keepdim=True)
    return m.to(mean.dtype).reshape(mean.shape), (var + eps).rsqrt().to(rstd.dtype).reshape(rstd.shape)


def _plus_statistics(grads, grad, needs, input, result, count, stats_shape, grouped_shape=None):
    """``grads`` (the kernel's, for the output's cotangent) with the input
    cotangent of the statistics outputs added: d mean = 1/count, d invstd =
    -invstd^3 (x - mean) / count (group norm; see NOTE [Normalization
    statistics]).  Statistics are reshaped to ``stats_shape`` to broadcast
    against the input (viewed as ``grouped_shape`` if given)."""
    _, grad_mean, grad_invstd = grad
    if not needs[0] or (grad_mean is None and grad_invstd is None):
        return grads
    x = input if grouped_shape is None else input.reshape(grouped_shape)
    total = None
    if grad_mean is not None:
        total = (grad_mean.reshape(stats_shape) / count).expand(x.shape)
    if grad_invstd is not None:
        mean, invstd = result[1].reshape(stats_shape), result[2].reshape(stats_shape)
        term = -grad_invstd.reshape(stats_shape) * invstd.pow(3) * (x - mean) / count
        total = term if total is None else total + term
    total = total.reshape(input.shape).to(input.dtype)  # low-precision inputs keep float statistics
    return (total if grads[0] is None else grads[0] + total,) + tuple(grads[1:])


def _batch_norm_dims(input):
    """Batch norm's reduction dims, and the shape that broadcasts its
    per-channel vectors: [C] -> [1, C, 1, ...] against input [N, C, *S]."""
    return (0,) + tuple(range(2, input.dim())), (1, -1) + (1,) * (input.dim() - 2)


def _batch_norm_vjp(grad, input, weight, running_mean, running_var, result, training, eps, needs):
    # Cotangents of the statistics outputs are dropped: see NOTE [Normalization statistics]
    if grad[0] is None:
        return (None, None, None)
    mean, invstd = result[1], result[2]
    if training:
        mean, invstd = _statistics(input, mean, invstd, _batch_norm_dims(input)[0], eps)
    return aten.native_batch_norm_backward.default(
        grad[0], input, weight, running_mean, running_var, mean, invstd, training, eps,
        [needs[0], needs[1], needs[2]],
    )


@register_vjp(aten.native_batch_norm.default, aten._native_batch_norm_legit.default)
def batch_norm_vjp(grad, input, weight, running_mean, running_var, training, eps, result, needs):
    return _batch_norm_vjp(grad, input, weight, running_mean, running_var, result, training, eps, needs)


@register_vjp(aten._native_batch_norm_legit.no_stats)
def batch_norm_no_stats_vjp(grad, input, weight, training, eps, result, needs):
    return _batch_norm_vjp(grad, input, weight, None, None, result, training, eps, needs)


@register_vjp(aten._native_batch_norm_legit_no_training.default)
def batch_norm_no_training_vjp(grad, input, weight, running_mean, running_var, eps, result, needs):
    return _batch_norm_vjp(grad, input, weight, running_mean, running_var, result, False, eps, needs)


@register_vjp(aten._batch_norm_with_update.default)
def batch_norm_with_update_vjp(grad, input, weight, running_mean, running_var, eps, result, needs):
    return _batch_norm_vjp(grad, input, weight, running_mean, running_var, result, True, eps, needs)


@register_vjp(aten._batch_norm_no_update.default)
def batch_norm_no_update_vjp(grad, input, weight, running_mean, running_var, eps, result, needs):
    return _batch_norm_vjp(grad, input, weight, running_mean, running_var, result, False, eps, needs)


@register_vjp(aten.native_layer_norm.default)
def layer_norm_vjp(grad, input, normalized_shape, weight, eps, result, needs, inputs_meta):
    # Cotangents of mean and rstd are dropped: see NOTE [Normalization statistics]
    if grad[0] is None:
        return (None, None, None, None)
    bias_meta = inputs_meta[3]
    bias = None if bias_meta is None else _like_input(grad[0], bias_meta)  # only its shape is read
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    mean, rstd = _statistics(input, result[1], result[2], dims, eps)
    g_input, g_weight, g_bias = aten.native_layer_norm_backward.default(
        grad[0], input, normalized_shape, mean, rstd, weight, bias, [needs[0], needs[2], needs[3]]
    )
    return (g_input, None, g_weight, g_bias)


@register_vjp(aten.native_group_norm.default)
def group_norm_vjp(grad, input, weight, N, C, HxW, group, result, needs):
    grads = (None, None, None)
    if grad[0] is not None:
        grads = aten.native_group_norm_backward.default(
            grad[0].contiguous(), input.contiguous(), result[1], result[2], weight, N, C, HxW, group,
            [needs[0], needs[1], needs[2]],
        )
    # statistics [N, group] -> [N, group, 1] against input [N, group, C/group * HxW]
    count = (C // group) * HxW
    return _plus_statistics(grads, grad, needs, input, result, count, (N, group, 1), (N, group, count))


# -- JVPs ---------------------------------------------------------------------
# derivatives.yaml's batch_norm_jvp, layer_norm_jvp and group_norm_jvp.  The
# statistics outputs of batch norm and layer norm get no tangent; group
# norm's do (NOTE [Normalization statistics]).


def _normalization_jvp(x, x_t, mean, rstd, dims, weight, weight_t, bias_t, param_shape, out_shape, statistics=True):
    """Tangents of out = x_hat * weight + bias, x_hat = (x - mean) * rstd.

    ``x``, ``x_t``, ``mean`` and ``rstd`` come in the layout the statistics
    are taken in (over ``dims``, biased variance; mean and rstd broadcast
    against x); ``out_shape`` is the output's shape and ``param_shape`` how
    the affine parameters broadcast against it.  With ``statistics`` the
    statistics are functions of x:

        d mean = mean(dx),  d rstd = -rstd^3 mean((x - mean) dx)
        d x_hat = (dx - d mean) rstd + (x - mean) d rstd

    (else, eval-mode batch norm, they are constants).  Returns (out_t,
    mean_t, rstd_t), the last two in mean's layout (None without them).
    """
    dtype = x.dtype  # statistics may be kept in float for low-precision inputs
    out_t = mean_t = rstd_t = None
    if x_t is not None:
        if statistics:
            mean_t = x_t.mean(dims, keepdim=True)
            rstd_t = -rstd.pow(3) * ((x - mean) * x_t).mean(dims, keepdim=True)
            out_t = (x_t - mean_t) * rstd + (x - mean) * rstd_t
            mean_t, rstd_t = mean_t.to(mean.dtype), rstd_t.to(rstd.dtype)
        else:
            out_t = x_t * rstd
        out_t = out_t.reshape(out_shape)
        if weight is not None:
            out_t = out_t * weight.reshape(param_shape)
    if weight_t is not None:
        out_t = _add(out_t, ((x - mean) * rstd).reshape(out_shape) * weight_t.reshape(param_shape))
    if bias_t is not None:
        bias_t = bias_t.reshape(param_shape)
        out_t = bias_t.expand(out_shape) if out_t is None else out_t + bias_t
    return None if out_t is None else out_t.to(dtype), mean_t, rstd_t


def _batch_norm_jvp(input, input_t, weight, weight_t, bias_t, running_mean, running_var, result, training, eps):
    dims, shape = _batch_norm_dims(input)
    if training:
        mean, rstd = _statistics(input, result[1], result[2], dims, eps)
        mean, rstd = mean.view(shape), rstd.view(shape)
    else:  # eval mode: the running statistics, constants; the statistics outputs are empty
        mean, rstd = running_mean.view(shape), (running_var + eps).rsqrt().view(shape)
    out_t, _, _ = _normalization_jvp(
        input, input_t, mean, rstd, dims, weight, weight_t, bias_t, shape, input.shape, statistics=training
    )
    return out_t, None, None


@register_jvp(aten.native_batch_norm.default, aten._native_batch_norm_legit.default)
def batch_norm_jvp(input, input_t, weight, weight_t, bias_t, running_mean, running_var, training, eps, result):
    return _batch_norm_jvp(input, input_t, weight, weight_t, bias_t, running_mean, running_var, result, training, eps)


@register_jvp(aten._native_batch_norm_legit.no_stats)
def batch_norm_no_stats_jvp(input, input_t, weight, weight_t, bias_t, training, eps, result):
    return _batch_norm_jvp(input, input_t, weight, weight_t, bias_t, None, None, result, training, eps)


@register_jvp(aten._native_batch_norm_legit_no_training.default)
def batch_norm_no_training_jvp(input, input_t, weight, weight_t, bias_t, running_mean, running_var, eps, result):
    return _batch_norm_jvp(input, input_t, weight, weight_t, bias_t, running_mean, running_var, result, False, eps)


@register_jvp(aten._batch_norm_with_update.default)
def batch_norm_with_update_jvp(input, input_t, weight, weight_t, bias_t, running_mean, running_var, eps, result):
    return _batch_norm_jvp(input, input_t, weight, weight_t, bias_t, running_mean, running_var, result, True, eps) + (None,)


@register_jvp(aten._batch_norm_no_update.default)
def batch_norm_no_update_jvp(input, input_t, weight, weight_t, bias_t, running_mean, running_var, eps, result):
    return _batch_norm_jvp(input, input_t, weight, weight_t, bias_t, running_mean, running_var, result, False, eps) + (None,)


@register_jvp(aten.native_layer_norm.default)
def layer_norm_jvp(input, input_t, normalized_shape, weight, weight_t, bias_t, eps, result):
    # statistics over the trailing dims, kept as size 1: they broadcast as they are
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    mean, rstd = _statistics(input, result[1], result[2], dims, eps)
    out_t, _, _ = _normalization_jvp(
        input, input_t, mean, rstd, dims, weight, weight_t, bias_t, tuple(normalized_shape), input.shape
    )
    return out_t, None, None


@register_jvp(aten.native_group_norm.default)
def group_norm_jvp(input, input_t, weight, weight_t, bias_t, N, C, HxW, group, result):
    # input [N, C, *S] -> [N, group, C/group * HxW];  statistics [N, group] -> [N, group, 1]
    grouped = (N, group, C // group * HxW)
    mean, rstd = result[1].view(N, group, 1), result[2].view(N, group, 1)
    x_t = None if input_t is None else input_t.reshape(grouped)
    out_t, mean_t, rstd_t = _normalization_jvp(
        input.reshape(grouped), x_t, mean, rstd, 2, weight, weight_t, bias_t, (C,) + (1,) * (input.dim() - 2),
        input.shape,
    )
    if mean_t is None:
        return out_t, None, None
    return out_t, mean_t.view(N, group), rstd_t.view(N, group)
