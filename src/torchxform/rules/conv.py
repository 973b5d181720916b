"""Convolution (1d/2d/3d, strided, dilated, grouped, transposed) and its
backward op.

A batched input alone folds into N (NOTE [Folding the batch into N] in
pooling.py).  A batched weight (model ensembles) uses the grouped-convolution
trick: the B weights become B times as many output channels, or B times as
many groups when the input is batched too, so one convolution computes every
example without a loop.
"""

from __future__ import annotations

import torch

from .._core.registry import register_batching, register_jvp, register_vjp
from ._batching import batch_size, logical_rank, move_bdim_to_front, raise_as_eager
from .pooling import _add, _channels_to_front, _fold, _materialize, _unfold

aten = torch.ops.aten


def _bias_batch_major(bias, bdim, batch):
    """Bias of B*O channels ordered (B, O)."""
    if bias is None:
        return None
    if bdim is None:
        return bias.repeat(batch)
    return move_bdim_to_front(bias, bdim).flatten()


def _bias_group_major(bias, bdim, batch, groups):
    """Bias of B*O channels ordered (groups, B, O/groups)."""
    if bias is None:
        return None
    if bdim is None:
        per_group = bias.view(groups, 1, -1)
        return per_group.expand(groups, batch, per_group.shape[2]).flatten()
    return move_bdim_to_front(bias, bdim).unflatten(1, (groups, -1)).transpose(0, 1).flatten()


def _batched_weight_only(conv, x, w, bias, bias_bdim, batch, transposed, groups):
    """Unbatched input, weights [B, ...]: the B weights become extra output
    channels of each group, so the input is read once, not copied B times.

    # non-transposed: [B, O, C/g, *K] -> [g, B, O/g, C/g, *K] -> [g*B*O/g, C/g, *K]
    # transposed:     [B, C, O/g, *K] -> [g, C/g, B, O/g, *K] -> [C, B*O/g, *K]
    # output [N, (g, B, O/g), *S] -> [N, B, g, O/g, *S] -> [N, B, O, *S]
    """
    if transposed:
        w = w.unflatten(1, (groups, -1))  # [B, g, C/g, O/g, *K]
        w = w.permute(1, 2, 0, *range(3, w.dim())).flatten(0, 1).flatten(1, 2)
    else:
        w = w.unflatten(1, (groups, -1)).transpose(0, 1).flatten(0, 2)
    out = conv(x, w, _bias_group_major(bias, bias_bdim, batch, groups), groups)
    return out.unflatten(1, (groups, batch, -1)).transpose(1, 2).flatten(2, 3), 1


@register_batching(aten.convolution.default)
def convolution_batch(bdims, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    x_bdim, w_bdim, b_bdim = bdims[0], bdims[1], bdims[2]
    args = (x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    rank = logical_rank(weight, w_bdim)
    if rank < 3 or logical_rank(x, x_bdim) != rank:
        raise_as_eager(aten.convolution.default, bdims, args)

    def conv(x, w, b, groups):
        return aten.convolution.default(x, w, b, stride, padding, dilation, transposed, output_padding, groups)

    try:
        if w_bdim is not None:
            batch = weight.shape[w_bdim]
            w = move_bdim_to_front(weight, w_bdim)
            if x_bdim is None:
                return _batched_weight_only(conv, x, w, bias, b_bdim, batch, transposed, groups)
            # Both batched: each example is a group of its own.
            # [B, N, C, *S] -> [N, B*C, *S];  weights [B, O, C/g, *K] -> [B*O, C/g, *K]
            x = _channels_to_front(x, x_bdim, batch)
            out = conv(x, w.flatten(0, 1), _bias_batch_major(bias, b_bdim, batch), groups * batch)
            return out.unflatten(1, (batch, -1)), 1
        if x_bdim is None:  # only the bias is batched: [N, O, *S] + [B, 1, O, 1...]
            out = conv(x, weight, None, groups)
            return out + _bias_like_output(bias, b_bdim, 0, out.dim() + 1), 0
        batch = x.shape[x_bdim]
        folded, out_bdim = _fold(x, x_bdim, batch)
        out = _unfold(conv(folded, weight, bias if b_bdim is None else None, groups), out_bdim, batch)
        if b_bdim is not None:
            out = out + _bias_like_output(bias, b_bdim, out_bdim, out.dim())
        return out, out_bdim
    except RuntimeError as error:
        raise_as_eager(aten.convolution.default, bdims, args, error=error)


def _bias_like_output(bias, bdim, out_bdim, out_rank):
    """A batched bias [B, O] shaped to broadcast against a batched output.

    # out [B, N, O, H, W] (out_bdim 0): bias -> [B, 1, O, 1, 1]
    # out [N, B, O, H, W] (out_bdim 1): bias -> [B, O, 1, 1]
    """
    bias = move_bdim_to_front(bias, bdim)
    shape = list(bias.shape) + [1] * (out_rank - 3)
    if out_bdim == 0:
        shape.insert(1, 1)
    return bias.view(shape)


@register_batching(aten._convolution.default)
def _convolution_batch(bdims, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, *flags):
    """The backend-selecting variant: the same math as ``convolution``."""
    return convolution_batch(bdims[:9], x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)


@register_batching(aten.convolution_backward.default)
def convolution_backward_batch(bdims, grad_output, x, weight, bias_sizes, *conv_args):
    """Per-example gradients of a convolution, each output from the kernel
    call that is cheapest for it (torch.func's choice too):

    * grad_input with the weight shared: the batch folds into N, one
      ungrouped call (cheaper than the grouped one below);
    * grad_weight (and grad_input with per-example weights): the grouped
      trick, each example a group of its own;
    * grad_bias: grad_output summed over all but its channels, which costs a
      tenth of what the convolution kernel spends on it.

    # fold:    grad_output [B, N, O, *S'] -> [B*N, O, *S'];  input [B, N, C, *S] -> [B*N, C, *S]
    # grouped: grad_output [B, N, O, *S'] -> [N, B*O, *S'];  input [B, N, C, *S] -> [N, B*C, *S]
    #          weight [B, O, C/g, *K] -> [B*O, C/g, *K];  groups g -> B*g
    """
    op = aten.convolution_backward.default
    stride_to_output_padding, groups, output_mask = conv_args[:5], conv_args[5], conv_args[6]
    g_bdim, x_bdim, w_bdim = bdims[0], bdims[1], bdims[2]
    args = (grad_output, x, weight, bias_sizes, *conv_args)
    rank = logical_rank(weight, w_bdim)
    if rank < 3 or logical_rank(x, x_bdim) != rank or logical_rank(grad_output, g_bdim) != rank:
        raise_as_eager(op, bdims, args)
    batch = batch_size(args, bdims)

    def backward(grad_output, x, weight, groups, mask):
        return op(grad_output, x, weight, None, *stride_to_output_padding, groups, mask)

    grad_input = grad_weight = grad_bias = None
    out_bdims = [1, 0, 0]
    fold_input = output_mask[0] and w_bdim is None
    grouped_mask = [output_mask[0] and not fold_input, output_mask[1], False]
    try:
        if fold_input:
            folded = backward(
                _materialize(grad_output, g_bdim, batch).flatten(0, 1),
                _materialize(x, x_bdim, batch).flatten(0, 1),
                weight, groups, [True, False, False],
            )[0]
            grad_input, out_bdims[0] = _unfold(folded, 0, batch), 0
        if grouped_mask[0] or grouped_mask[1]:
            grouped_input, grad_weight, _ = backward(
                _channels_to_front(grad_output, g_bdim, batch),
                _channels_to_front(x, x_bdim, batch),
                _materialize(weight, w_bdim, batch).flatten(0, 1),
                groups * batch, grouped_mask,
            )
            if grouped_input is not None:
                grad_input = grouped_input.unflatten(1, (batch, -1))
            if grad_weight is not None:
                grad_weight = grad_weight.unflatten(0, (batch, -1))
        if output_mask[2]:
            # [B, N, O, *S'] -> [B, O]  (unbatched: [N, O, *S'] -> [O])
            if g_bdim is None:
                grad_bias, out_bdims[2] = grad_output.sum([0, *range(2, grad_output.dim())]), None
            else:
                grad_output = move_bdim_to_front(grad_output, g_bdim)
                grad_bias = grad_output.sum([1, *range(3, grad_output.dim())])
    except RuntimeError as error:
        raise_as_eager(op, bdims, args, error=error)
    return (grad_input, grad_weight, grad_bias), tuple(out_bdims)


# ==========================================================================
# Derivatives.  A convolution is bilinear in (input, weight): its VJP is
# convolution_backward (one kernel for all three gradients), and the VJP of
# convolution_backward is made of convolutions and convolution_backward
# again, so every order of derivative and vmap over each reuse the rules
# above.
# ==========================================================================


@register_vjp(aten.convolution.default, aten._convolution.default)
def convolution_vjp(grad, input, weight, needs, inputs_meta, stride, padding, dilation, transposed,
                    output_padding, groups):
    bias_meta = inputs_meta[2]
    mask = [needs[0], needs[1], bias_meta is not None and needs[2]]
    return aten.convolution_backward.default(
        grad, input, weight, None if bias_meta is None else list(bias_meta[0]), stride, padding, dilation,
        transposed, output_padding, groups, mask,
    )


@register_vjp(aten.convolution_backward.default)
def convolution_backward_vjp(grad, grad_output, input, weight, needs, stride, padding, dilation, transposed,
                             output_padding, groups):
    """convolution_backward maps grad_output to (L_w^T g, L_x^T g, sum g),
    where L_w = conv(., w) and L_x = conv(x, .).  So, for the cotangents
    (gg_input, gg_weight, gg_bias) of its outputs:

        d grad_output = conv(gg_input, w) + conv(x, gg_weight) + gg_bias
        d input       = L_{gg_weight}^T grad_output   (convolution_backward's grad_input with gg_weight)
        d weight      = L_{gg_input}^T grad_output    (convolution_backward's grad_weight of gg_input)
    """
    gg_input, gg_weight, gg_bias = grad
    rest = (stride, padding, dilation, transposed, output_padding, groups)
    d_grad_output = d_input = d_weight = None
    if needs[0]:
        terms = []
        if gg_input is not None:
            terms.append(aten.convolution.default(gg_input, weight, None, *rest))
        if gg_weight is not None:
            terms.append(aten.convolution.default(input, gg_weight, None, *rest))
        if gg_bias is not None:
            # [O] -> [O, 1, ..., 1] against grad_output [N, O, *S]
            bias = gg_bias.view((-1,) + (1,) * (grad_output.dim() - 2))
            terms.append(bias.expand(grad_output.shape).contiguous() if not terms else bias)
        for term in terms:
            d_grad_output = term if d_grad_output is None else d_grad_output + term
    if needs[1] and gg_weight is not None:
        d_input = aten.convolution_backward.default(grad_output, input, gg_weight, None, *rest, [True, False, False])[0]
    if needs[2] and gg_input is not None:
        d_weight = aten.convolution_backward.default(grad_output, gg_input, weight, None, *rest, [False, True, False])[1]
    return d_grad_output, d_input, d_weight


# -- JVPs ---------------------------------------------------------------------


@register_jvp(aten.convolution.default, aten._convolution.default)
def convolution_jvp(input, weight, input_t, weight_t, bias_t, result, stride, padding, dilation, transposed,
                    output_padding, groups):
    """derivatives.yaml's convolution_jvp: conv(dx, w) + conv(x, dw) + db
    (bilinear in input and weight, affine in the bias, whose tangent rides
    along in the first convolution)."""
    rest = (stride, padding, dilation, transposed, output_padding, groups)
    out = None
    for x, w, moved in ((input_t, weight, input_t), (input, weight_t, weight_t)):
        if moved is not None:
            out = _add(out, aten.convolution.default(x, w, bias_t, *rest))
            bias_t = None
    if bias_t is not None:  # only the bias moves: [O] -> [O, 1, ..., 1] against the output
        out = bias_t.view((-1,) + (1,) * (weight.dim() - 2)).expand(result.shape)
    return out


@register_jvp(aten.convolution_backward.default)
def convolution_backward_jvp(grad_output, input, weight, grad_output_t, input_t, weight_t, bias_sizes, stride, padding,
                             dilation, transposed, output_padding, groups, output_mask):
    """Linear in grad_output (all three outputs), and multilinear overall:
    grad_input = L_w^T g depends on the weight only, grad_weight = L_x^T g
    on the input only, grad_bias on neither (derivatives.yaml's result0..2).
    Each tangent term asks the kernel for only the output it changes."""
    rest = (stride, padding, dilation, transposed, output_padding, groups)
    backward = aten.convolution_backward.default
    grads = [None, None, None]
    if grad_output_t is not None:
        grads = list(backward(grad_output_t, input, weight, bias_sizes, *rest, output_mask))
    if weight_t is not None and output_mask[0]:
        grads[0] = _add(grads[0], backward(grad_output, input, weight_t, None, *rest, [True, False, False])[0])
    if input_t is not None and output_mask[1]:
        grads[1] = _add(grads[1], backward(grad_output, input_t, weight, None, *rest, [False, True, False])[1])
    return tuple(grads)
