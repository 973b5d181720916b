"""Neural-network ops: padding, resampling (upsampling, pixel/channel
shuffle, im2col/col2im, grid sampling), PReLU, GLU and attention.

The rest of the family lives next door and is registered by importing it
here: conv.py (convolution), pooling.py (pooling, and the helpers the family
shares: see NOTE [Folding the batch into N]), norm.py (normalization) and
loss.py (losses).
"""

from __future__ import annotations

import inspect
import math

import torch

from .._core.interpreter import register_patch
from .._core.tracer import Tracer
from .._core.registry import overloads, register_batching, register_batching_each, register_jvp, register_vjp
from ._batching import batch_size, front_padded, logical_rank, move_bdim_to_front, raise_as_eager, wrap_dim
from ._derivatives import linear_jvp
from .elementwise import broadcast_batched, reduce_to
from .pooling import (
    _add, _channels_to_front, _fold, _like_input, _materialize, _unfold, linear_in_first_jvp, register_fold,
)
from ..transforms.vmap import RANDOMNESS_ERROR_MESSAGE, current_vmap

aten = torch.ops.aten


# -- padding --------------------------------------------------------------------


@register_batching(aten.constant_pad_nd.default)
def constant_pad_batch(bdims, x, pad, value=0):
    """Pads the trailing len(pad)/2 dims: the batch stays unless among them."""
    bdim = bdims[0]
    padded_dims = len(pad) // 2
    if padded_dims > x.dim() - 1:
        raise_as_eager(aten.constant_pad_nd.default, bdims, (x, pad, value))
    if bdim >= x.dim() - padded_dims:
        x, bdim = move_bdim_to_front(x, bdim), 0
    return aten.constant_pad_nd.default(x, pad, value), bdim


for _k in (1, 2, 3):
    register_fold([getattr(aten, f"reflection_pad{_k}d").default, getattr(aten, f"replication_pad{_k}d").default], _k)


# -- resampling -----------------------------------------------------------------

_UPSAMPLE = {
    1: ["upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_linear1d"],
    2: ["upsample_nearest2d", "_upsample_nearest_exact2d", "upsample_bilinear2d", "upsample_bicubic2d",
        "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa"],
    3: ["upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_trilinear3d"],
}
for _k, _names in _UPSAMPLE.items():
    # Upsampling takes only [N, C, *spatial]: no form without N.
    _ops = [op for name in _names for op in overloads(getattr(aten, name), "default", "vec")]
    register_fold(_ops, _k, without_n=False)

register_fold([aten.im2col.default], 2)  # [N, C, H, W] or [C, H, W] -> [N, C*kh*kw, L]
register_fold([aten.col2im.default], 1)  # [N, C*kh*kw, L] or [C*kh*kw, L]


@register_batching(aten.pixel_shuffle.default, aten.pixel_unshuffle.default)
def pixel_shuffle_batch(op, bdims, x, factor):
    """[*, C, H, W] with any leading dims: the batch may stay among them."""
    bdim = bdims[0]
    if x.dim() - 1 < 3:
        raise_as_eager(op, bdims, (x, factor))
    if bdim >= x.dim() - 3:
        x, bdim = move_bdim_to_front(x, bdim), 0
    return op(x, factor), bdim


@register_batching(aten.channel_shuffle.default, *overloads(aten.native_channel_shuffle, "default"))
def channel_shuffle_batch(op, bdims, x, groups):
    """[N, C, *]: channels must stay at dim 1, so the batch folds into N."""
    if x.dim() - 1 < 3:
        raise_as_eager(op, bdims, (x, groups))
    batch = x.shape[bdims[0]]
    folded, out_bdim = _fold(x, bdims[0], batch)
    return _unfold(op(folded, groups), out_bdim, batch), out_bdim


@register_batching(aten.grid_sampler_2d.default, aten.grid_sampler_3d.default)
def grid_sampler_batch(op, bdims, x, grid, *options):
    """input [N, C, *S], grid [N, *S_out, k].  Only the input batched: the
    batch joins the channels (each channel is sampled on its own).  Only the
    grid batched: the batch joins the first output dim (each output point
    is sampled on its own).  Both: fold into N."""
    x_bdim, g_bdim = bdims[0], bdims[1]
    rank = 4 if op is aten.grid_sampler_2d.default else 5
    if logical_rank(x, x_bdim) != rank or logical_rank(grid, g_bdim) != rank:
        raise_as_eager(op, bdims, (x, grid) + options)
    if g_bdim is None:
        # [B, N, C, H, W] -> [N, B*C, H, W]; out [N, B*C, Ho, Wo] -> [N, B, C, Ho, Wo]
        batch = x.shape[x_bdim]
        return op(_channels_to_front(x, x_bdim, batch), grid, *options).unflatten(1, (batch, -1)), 1
    if x_bdim is None:
        # grid [B, N, Ho, Wo, 2] -> [N, B*Ho, Wo, 2]; out [N, C, B*Ho, Wo] -> [N, C, B, Ho, Wo]
        batch = grid.shape[g_bdim]
        grid = move_bdim_to_front(grid, g_bdim).movedim(0, 1).flatten(1, 2)
        return op(x, grid, *options).unflatten(2, (batch, -1)), 2
    batch = x.shape[x_bdim]
    x = move_bdim_to_front(x, x_bdim).flatten(0, 1)
    grid = move_bdim_to_front(grid, g_bdim).flatten(0, 1)
    return _unfold(op(x, grid, *options), 0, batch), 0


@register_batching(aten.affine_grid_generator.default)
def affine_grid_batch(bdims, theta, size, align_corners):
    """theta [N, 2, 3] (or [N, 3, 4]) and size [N, C, *S]: fold into N."""
    op = aten.affine_grid_generator.default
    if logical_rank(theta, bdims[0]) != 3:
        raise_as_eager(op, bdims, (theta, size, align_corners))
    batch = theta.shape[bdims[0]]
    folded, out_bdim = _fold(theta, bdims[0], batch)
    return _unfold(op(folded, [size[0] * batch, *size[1:]], align_corners), out_bdim, batch), out_bdim


def _grid_sampler_3d(a, grid, interpolation_mode, padding_mode, align_corners):
    """grid_sampler_3d in differentiable ops (trilinear or nearest; zeros,
    border or reflection padding), as torch._decomp writes the 2-d one:
    input [N, C, D, H, W], grid [N, Do, Ho, Wo, 3] of (x, y, z)."""
    n, c, depth, height, width = a.shape

    def unnormalize(coords, size):
        scale = (size - 1) / 2 if align_corners else size / 2
        return coords * scale + (size - 1) / 2

    def reflect(coords, twice_low, twice_high):
        if twice_low == twice_high:
            return torch.zeros_like(coords)
        low, span = twice_low / 2, (twice_high - twice_low) / 2
        distance = (coords - low).abs()
        extra = torch.fmod(distance, span)
        flips = (distance / span).floor()
        return torch.where(torch.remainder(flips, 2) == 0, extra + low, span + low - extra)

    def source_index(coords, size):
        coords = unnormalize(coords, size)
        if padding_mode == 1:
            return coords.clamp(0, size - 1)
        if padding_mode == 2:
            bounds = (0, 2 * (size - 1)) if align_corners else (-1, 2 * size - 1)
            return reflect(coords, *bounds).clamp(0, size - 1)
        return coords

    batch_index = torch.arange(n, device=a.device).view(n, 1, 1, 1, 1)
    channel_index = torch.arange(c, device=a.device).view(1, c, 1, 1, 1)

    def corner(ix, iy, iz, weight):
        inside = (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height) & (iz >= 0) & (iz < depth)
        ix, iy, iz = (torch.where(inside, t, 0).long().unsqueeze(1) for t in (ix, iy, iz))
        weight = torch.where(inside, weight, 0).unsqueeze(1)
        return a[batch_index, channel_index, iz, iy, ix] * weight

    x = source_index(grid[..., 0], width)
    y = source_index(grid[..., 1], height)
    z = source_index(grid[..., 2], depth)
    if interpolation_mode == 1:  # nearest
        return corner(x.round(), y.round(), z.round(), torch.ones_like(x))
    if interpolation_mode != 0:
        raise RuntimeError("grid_sampler(): bicubic interpolation only supports 4D input")
    x0, y0, z0 = x.floor(), y.floor(), z.floor()
    total = None
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                wx = (x - x0) if dx else (x0 + 1 - x)
                wy = (y - y0) if dy else (y0 + 1 - y)
                wz = (z - z0) if dz else (z0 + 1 - z)
                term = corner(x0 + dx, y0 + dy, z0 + dz, wx * wy * wz)
                total = term if total is None else total + term
    return total


def _decomposed_grid_sampler_3d_vjp(*options):
    """(grad_output, input, grid) -> grid_sampler_3d's (grad_input,
    grad_grid), by this library's vjp of :func:`_grid_sampler_3d`."""
    from ..transforms.reverse import vjp

    def first_order(grad_output, input, grid):
        return vjp(lambda x, g: _grid_sampler_3d(x, g, *options), input, grid)[1](grad_output)

    return first_order


@register_vjp(aten.grid_sampler_3d_backward.default)
def grid_sampler_3d_backward_vjp(grad, grad_output, input, grid, interpolation_mode, padding_mode, align_corners):
    """Second order, as grid_sampler_2d_backward's: the VJP of the
    first-order VJP of :func:`_grid_sampler_3d` (the function the kernel
    computes), taken by this library's own vjp."""
    from ..transforms.reverse import vjp

    first_order = _decomposed_grid_sampler_3d_vjp(interpolation_mode, padding_mode, align_corners)
    cotangents = tuple(torch.zeros_like(like) if g is None else g for g, like in zip(grad, (input, grid)))
    _, pullback = vjp(first_order, grad_output, input, grid)
    return pullback(cotangents)


# -- activations with parameters ----------------------------------------------------

@register_batching(aten._prelu_kernel.default)
def prelu_batch(bdims, x, weight):
    """Elementwise with broadcasting (F.prelu shapes the weight [C, 1, ...]),
    but the kernel writes into a buffer shaped like `x`: a batched weight
    against an unbatched `x` needs `x` expanded to the result's shape.

    # x [N, C, L], weight [B, C, 1] -> [B, N, C, L], [B, 1, C, 1]
    """
    x_al, w_al = broadcast_batched((x, weight), bdims)
    shape = torch.broadcast_shapes(x_al.shape, w_al.shape)
    return aten._prelu_kernel.default(x_al.expand(shape), w_al), 0


@register_batching(aten.glu.default)
def glu_batch(bdims, x, dim=-1):
    bdim = bdims[0]
    rank = x.dim() - 1
    if rank == 0:
        raise_as_eager(aten.glu.default, bdims, (x, dim))
    d = wrap_dim(dim, rank)
    return aten.glu.default(x, d if d < bdim else d + 1), bdim


# -- attention ----------------------------------------------------------------------
# nn.MultiheadAttention and nn.TransformerEncoderLayer take a fused "fast
# path" kernel (_native_multi_head_attention, _transformer_encoder_layer_fwd)
# in eval mode without grad, chosen in Python because our tracers carry no
# __torch_function__.  While transforms run, the fast path is off: the
# modules then run their ordinary ops (linear, sdpa, layer_norm, ...), which
# have rules under every transform; torch.func too differentiates the slow
# path only.  See NOTE [Patches while transforms run].
register_patch(torch.backends.mha, "get_fastpath_enabled", lambda: False)


# NOTE [Attention off the CPU]
# F.scaled_dot_product_attention picks a fused kernel before any transform
# sees an op.  On the CPU that is _scaled_dot_product_flash_attention_for_cpu,
# which has rules below.  On accelerators it is a flash / memory-efficient /
# cuDNN kernel, tagged random (for its dropout) and without rules here; so
# while transforms run, attention on tracers off the CPU computes PyTorch's
# math formulation (softmax(q k^T * scale + mask) v, dropout on the weights)
# from ordinary ops, which every transform has rules for.  nn.MultiheadAttention
# and nn.TransformerEncoderLayer call it through the same name.
_original_sdpa = torch.nn.functional.scaled_dot_product_attention


def sdpa_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention from ordinary ops (PyTorch's math backend)."""
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        allowed = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, dropout_p, training=True)
    return torch.matmul(weights, value)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    tracked = any(isinstance(t, Tracer) for t in (query, key, value, attn_mask))
    run = sdpa_math if tracked and query.device.type != "cpu" else _original_sdpa
    return run(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
               enable_gqa=enable_gqa)


register_patch(torch.nn.functional, "scaled_dot_product_attention", _sdpa)


@register_batching(aten._scaled_dot_product_flash_attention_for_cpu.default, batched_kwargs=True)
def sdpa_flash_cpu_batch(
    bdims, q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None, kwarg_bdims=None
):
    """q [N, H, L, E], k/v [N, H, S, E] (4-d only), mask broadcastable to
    [N, H, L, S] (possibly batched: it is keyword-only, so its bdim comes in
    ``kwarg_bdims``).  Only q batched (and no causal mask, no per-query mask
    rows): each query row attends on its own, so the batch joins L and
    k/v are read once.  Otherwise the batch folds into N."""
    op = aten._scaled_dot_product_flash_attention_for_cpu.default
    if dropout_p > 0 and current_vmap().randomness == "error":
        # The op is tagged random for its dropout; only dropout draws.
        # (The CPU kernel then rejects dropout itself, as in eager.)
        raise RuntimeError(RANDOMNESS_ERROR_MESSAGE)
    mask_bdim = (kwarg_bdims or {}).get("attn_mask")
    kwargs = dict(attn_mask=attn_mask, scale=scale)
    if bdims[0] is None and bdims[1] is None and bdims[2] is None and mask_bdim is None:
        # Random ops reach vmap even without batched arguments.
        return op(q, k, v, dropout_p, is_causal, **kwargs), None
    if any(logical_rank(t, b) != 4 for t, b in zip((q, k, v), bdims)):
        raise_as_eager(op, bdims, (q, k, v, dropout_p, is_causal), kwargs)
    batch = batch_size((q, k, v, attn_mask), list(bdims[:3]) + [mask_bdim])
    mask_rows = attn_mask is None or attn_mask.dim() < 2 or attn_mask.shape[-2] == 1
    if bdims[1] is None and bdims[2] is None and mask_bdim is None and not is_causal and mask_rows:
        # q [B, N, H, L, E] -> [N, H, B*L, E]; out [N, H, B*L, E] -> [N, H, B, L, E]
        q = move_bdim_to_front(q, bdims[0]).permute(1, 2, 0, 3, 4).flatten(2, 3)
        out, lse = op(q, k, v, dropout_p, is_causal, **kwargs)
        return (out.unflatten(2, (batch, -1)), lse.unflatten(2, (batch, -1))), 2
    q, k, v = (_materialize(t, b, batch).flatten(0, 1) for t, b in zip((q, k, v), bdims))
    mask = _fold_mask(attn_mask, mask_bdim, batch, q.shape[0] // max(batch, 1))
    out, lse = op(q, k, v, dropout_p, is_causal, attn_mask=mask, scale=scale)
    return (_unfold(out, 0, batch), _unfold(lse, 0, batch)), 0


def _fold_mask(attn_mask, mask_bdim, batch, n):
    """The mask for inputs whose N holds the folded B*N.  An unbatched mask
    with its own N dim is repeated to follow the fold; a batched one gets
    its batch in front and N expanded, then folded the same way.

    # unbatched [N, H, L, S] -> [B*N, H, L, S];  [1, H, L, S] or [L, S] as they are
    # batched [B, L, S] -> [B, 1, 1, L, S] -> [B, N, 1, L, S] -> [B*N, 1, L, S]
    """
    if attn_mask is None:
        return None
    if mask_bdim is not None:
        mask = front_padded(attn_mask, mask_bdim, 4)
        return mask.expand((batch, n) + tuple(mask.shape[2:])).flatten(0, 1)
    if attn_mask.dim() == 4 and attn_mask.shape[0] != 1:
        return attn_mask.expand((batch,) + tuple(attn_mask.shape)).flatten(0, 1)
    return attn_mask


@register_batching(aten._scaled_dot_product_flash_attention_for_cpu_backward.default, batched_kwargs=True)
def sdpa_flash_cpu_backward_batch(bdims, *args, attn_mask=None, scale=None, kwarg_bdims=None):
    """(grad_out, q, k, v, out, logsumexp, dropout_p, is_causal): every
    tensor folds into N."""
    op = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    tensors, options = args[:6], args[6:]
    mask_bdim = (kwarg_bdims or {}).get("attn_mask")
    if any(logical_rank(t, b) != 4 for t, b in zip(tensors[:5], bdims)):
        raise_as_eager(op, bdims, args, dict(attn_mask=attn_mask, scale=scale))
    batch = batch_size(list(tensors) + [attn_mask], list(bdims[:6]) + [mask_bdim])
    folded = [_materialize(t, b, batch).flatten(0, 1) for t, b in zip(tensors, bdims)]
    mask = _fold_mask(attn_mask, mask_bdim, batch, folded[1].shape[0] // max(batch, 1))
    grads = op(*folded, *options, attn_mask=mask, scale=scale)
    return tuple(_unfold(g, 0, batch) for g in grads), 0


# ==========================================================================
# Derivatives.  Padding and resampling ops are linear: each VJP is the
# op's backward kernel (or the inverse op), and the backward kernel's own
# VJP is the forward op on the cotangent, so every order is covered.  The
# kernels only read the input's shape: rules keep its metadata, and an
# uninitialized tensor of that shape stands in for it where one is needed.
# ==========================================================================


def _naming_schema_args(rule, op, start):
    """``rule(grad, inputs_meta, args)`` as a VJP rule of ``op``: it names
    (so the tape saves) ``op``'s schema arguments from position ``start`` on
    and receives them, in order, as ``args``."""
    arguments = op._schema.arguments[start:]
    names = [a.name for a in arguments]

    def named(grad, inputs_meta, **saved):
        return rule(grad, inputs_meta, [saved[name] for name in names])

    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("grad", keyword), inspect.Parameter("inputs_meta", keyword)]
    params += [
        inspect.Parameter(a.name, keyword, default=a.default_value if a.has_default_value() else None)
        for a in arguments
    ]
    named.__signature__ = inspect.Signature(params)
    named.__qualname__ = rule.__qualname__
    return named


# -- padding --------------------------------------------------------------------


@register_vjp(aten.constant_pad_nd.default)
def constant_pad_vjp(grad, pad):
    # negative padding crops: the inverse of padding, and padding of cropping
    return (aten.constant_pad_nd.default(grad, [-p for p in pad]),)


def _register_pad(forward, backward, spatial):
    @register_vjp(forward)
    def pad_vjp(grad, inputs_meta, padding):
        return (backward(grad, _like_input(grad, inputs_meta[0]), padding),)

    @register_vjp(backward)
    def pad_backward_vjp(grad, padding):
        return (forward(grad, padding),)

    register_fold([backward], spatial, tensors=(1, 0))


for _k in (1, 2, 3):
    for _kind in ("reflection", "replication"):
        _register_pad(getattr(aten, f"{_kind}_pad{_k}d").default, getattr(aten, f"{_kind}_pad{_k}d_backward").default, _k)


# -- resampling -----------------------------------------------------------------


def _register_upsample(forward, backward, spatial):
    """forward(self, output_size, *options) and backward(grad_output,
    output_size, input_size, *options), with the options named alike."""

    def upsample_vjp(grad, inputs_meta, args):
        output_size, options = args[0], args[1:]
        return (backward(grad, output_size, list(inputs_meta[0][0]), *options),)

    def upsample_backward_vjp(grad, inputs_meta, args):
        output_size, options = args[0], args[1:]
        return (forward(grad, output_size, *options),)

    register_vjp(forward)(_naming_schema_args(upsample_vjp, forward, 1))
    register_vjp(backward)(_naming_schema_args(upsample_backward_vjp, forward, 1))
    register_batching_each([backward], upsample_backward_batch, spatial=spatial)


def upsample_backward_batch(op, bdims, grad_output, output_size, input_size, *options, spatial):
    """grad_output [N, C, *S_out] folds the batch into N; input_size follows.
    # grad_output [B, N, C, h, w] -> [B*N, C, h, w];  input_size [N, C, H, W] -> [B*N, C, H, W]"""
    if logical_rank(grad_output, bdims[0]) != spatial + 2:
        raise_as_eager(op, bdims, (grad_output, output_size, input_size, *options))
    batch = grad_output.shape[bdims[0]]
    folded, out_bdim = _fold(grad_output, bdims[0], batch)
    out = op(folded, output_size, [input_size[0] * batch, *input_size[1:]], *options)
    return _unfold(out, out_bdim, batch), out_bdim


for _k, _names in _UPSAMPLE.items():
    for _name in _names:
        _register_upsample(getattr(aten, _name).default, getattr(aten, f"{_name}_backward").default, _k)


@register_vjp(aten.pixel_shuffle.default)
def pixel_shuffle_vjp(grad, upscale_factor):
    return (aten.pixel_unshuffle.default(grad, upscale_factor),)


@register_vjp(aten.pixel_unshuffle.default)
def pixel_unshuffle_vjp(grad, downscale_factor):
    return (aten.pixel_shuffle.default(grad, downscale_factor),)


@register_vjp(aten.channel_shuffle.default, *overloads(aten.native_channel_shuffle, "default"))
def channel_shuffle_vjp(grad, op, groups):
    # shuffling C = g * k channels with g groups is undone with k groups
    return (op(grad, grad.shape[1] // groups),)


@register_vjp(aten.im2col.default)
def im2col_vjp(grad, inputs_meta, kernel_size, dilation, padding, stride):
    return (aten.col2im.default(grad, list(inputs_meta[0][0][-2:]), kernel_size, dilation, padding, stride),)


@register_vjp(aten.col2im.default)
def col2im_vjp(grad, kernel_size, dilation, padding, stride):
    return (aten.im2col.default(grad, kernel_size, dilation, padding, stride),)


@register_vjp(aten.affine_grid_generator.default)
def affine_grid_vjp(grad, size, align_corners):
    # CompositeImplicit: a bmm of the base grid with grad, differentiable and batchable
    return (aten.affine_grid_generator_backward.default(grad, size, align_corners),)


# -- grid sampling --------------------------------------------------------------


@register_vjp(aten.grid_sampler_2d.default, aten.grid_sampler_3d.default)
def grid_sampler_vjp(grad, op, input, grid, interpolation_mode, padding_mode, align_corners, needs):
    backward = _GRID_SAMPLER_BACKWARD[op]
    return backward(grad, input, grid, interpolation_mode, padding_mode, align_corners, [needs[0], needs[1]])


_GRID_SAMPLER_BACKWARD = {
    aten.grid_sampler_2d.default: aten.grid_sampler_2d_backward.default,
    aten.grid_sampler_3d.default: aten.grid_sampler_3d_backward.default,
}


@register_batching(aten.grid_sampler_2d_backward.default, aten.grid_sampler_3d_backward.default)
def grid_sampler_backward_batch(op, bdims, grad_output, input, grid, *options):
    """(grad_output, input, grid) all have N in front: fold the batch into it.
    # [B, N, C, Ho, Wo], [N, C, H, W], [B, N, Ho, Wo, 2] -> [B*N, ...] each"""
    rank = 4 if op is aten.grid_sampler_2d_backward.default else 5
    tensors = (grad_output, input, grid)
    if any(logical_rank(t, b) != rank for t, b in zip(tensors, bdims)):
        raise_as_eager(op, bdims, tensors + options)
    batch = batch_size(tensors, bdims)
    folded = [_materialize(t, b, batch).flatten(0, 1) for t, b in zip(tensors, bdims)]
    grads = op(*folded, *options)
    return tuple(_unfold(g, 0, batch) for g in grads), 0


def _decomposed_grid_sampler_2d_vjp(*options):
    """(grad_output, input, grid) -> grid_sampler_2d's (grad_input,
    grad_grid), by this library's vjp of torch._decomp's grid_sampler_2d
    (the function the kernel computes, in differentiable ops)."""
    from torch._decomp import decomposition_table

    from ..transforms.reverse import vjp

    sample = decomposition_table[aten.grid_sampler_2d.default]

    def first_order(grad_output, input, grid):
        return vjp(lambda x, g: sample(x, g, *options), input, grid)[1](grad_output)

    return first_order


@register_vjp(aten.grid_sampler_2d_backward.default)
def grid_sampler_2d_backward_vjp(grad, grad_output, input, grid, interpolation_mode, padding_mode, align_corners):
    """Second order: the VJP of (grad_output, input, grid) -> the first-order
    VJP of torch._decomp's grid_sampler_2d (the same function the kernel
    computes), taken by this library's own vjp.  Bilinear and bicubic
    weights have cross terms in the grid, which this gets for free."""
    from ..transforms.reverse import vjp

    first_order = _decomposed_grid_sampler_2d_vjp(interpolation_mode, padding_mode, align_corners)
    cotangents = tuple(torch.zeros_like(like) if g is None else g for g, like in zip(grad, (input, grid)))
    _, pullback = vjp(first_order, grad_output, input, grid)
    return pullback(cotangents)


# -- activations with parameters ----------------------------------------------------


@register_vjp(aten._prelu_kernel.default)
def prelu_vjp(grad, self, weight, needs, inputs_meta):
    """prelu(x, w) = x if x > 0 else w x (w broadcast against x)."""
    positive = self > 0
    grad_self = torch.where(positive, grad, grad * weight) if needs[0] else None
    grad_weight = reduce_to(torch.where(positive, 0.0, grad * self), inputs_meta[1]) if needs[1] else None
    return grad_self, grad_weight


@register_vjp(aten.glu.default)
def glu_vjp(grad, self, dim=-1):
    return (aten.glu_backward.default(grad, self, dim),)


# -- attention ----------------------------------------------------------------------


def _attention_probabilities(query, key, logsumexp, is_causal, attn_mask, scale):
    """The attention probabilities P = exp(S - logsumexp) of the scores
    S = scale q k^T + mask, and the scale."""
    factor = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = torch.matmul(query, key.transpose(-2, -1)) * factor
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
    return (scores - logsumexp.unsqueeze(-1)).exp().to(query.dtype), factor  # logsumexp may be kept in float


@register_vjp(aten._scaled_dot_product_flash_attention_for_cpu.default)
def sdpa_flash_cpu_vjp(
    grad, query, key, value, result, needs, is_causal=False, attn_mask=None, scale=None, kwarg_needs=None
):
    """Attention's VJP written with matmuls and elementwise ops, from the
    probabilities P = exp(S - logsumexp) of the scores S = scale q k^T + mask:

        dv = P^T dout,  dS = P * (dout v^T - rowsum(dout * out)) + P * dlogsumexp,
        dq = scale dS k,  dk = scale dS^T q

    logsumexp is treated as the differentiable output it is (torch marks it
    non-differentiable): one level up, this rule's own use of it must carry
    derivatives.  A float attention mask being differentiated gets dS (it is
    added to the scaled scores; it is keyword-only, so its gradient goes in
    the trailing dict).  The CPU kernel rejects dropout, so dropout_p plays
    no part."""
    mask_grad = bool(kwarg_needs) and kwarg_needs.get("attn_mask", False)
    grad_out, grad_lse = grad
    out, lse = result
    probs, factor = _attention_probabilities(query, key, lse, is_causal, attn_mask, scale)
    grad_scores = grad_value = None
    if grad_out is not None:
        if needs[2]:
            grad_value = torch.matmul(probs.transpose(-2, -1), grad_out)
        grad_probs = torch.matmul(grad_out, value.transpose(-2, -1))
        grad_scores = probs * (grad_probs - (grad_out * out).sum(-1, keepdim=True))
    if grad_lse is not None:
        term = probs * grad_lse.unsqueeze(-1)
        grad_scores = term if grad_scores is None else grad_scores + term
    kwarg_grads = {}
    if grad_scores is None:
        return (None, None, grad_value, kwarg_grads) if kwarg_needs else (None, None, grad_value)
    if mask_grad:
        kwarg_grads["attn_mask"] = grad_scores.sum_to_size(attn_mask.shape)
    grad_scores = grad_scores * factor
    grad_query = torch.matmul(grad_scores, key) if needs[0] else None
    grad_key = torch.matmul(grad_scores.transpose(-2, -1), query) if needs[1] else None
    if kwarg_needs:
        return grad_query, grad_key, grad_value, kwarg_grads
    return grad_query, grad_key, grad_value


# -- JVPs ---------------------------------------------------------------------

# reflection/replication padding and upsampling: op names, each with a `<name>_backward`
_RESAMPLING_NAMES = [f"{kind}_pad{k}d" for k in (1, 2, 3) for kind in ("reflection", "replication")]
_RESAMPLING_NAMES += [name for names in _UPSAMPLE.values() for name in names]

# Padding, resampling, shuffles, im2col/col2im and affine_grid are linear: the
# op on the tangent (a pad's fill value is data, with tangent 0).
register_jvp(aten.constant_pad_nd.default)(linear_jvp(zero=("value",)))
register_jvp(
    *(getattr(aten, name).default for name in _RESAMPLING_NAMES),
    aten.pixel_shuffle.default,
    aten.pixel_unshuffle.default,
    aten.channel_shuffle.default,
    *overloads(aten.native_channel_shuffle, "default"),
    aten.im2col.default,
    aten.col2im.default,
    aten.affine_grid_generator.default,
)(linear_jvp())
# Their backward kernels: linear in grad_output.
register_jvp(*(getattr(aten, f"{name}_backward").default for name in _RESAMPLING_NAMES))(linear_in_first_jvp)


@register_jvp(aten._prelu_kernel.default)
def prelu_jvp(self, weight, self_t, weight_t):
    """derivatives.yaml: where(x >= 0, dx, w dx + dw x)."""
    negative = None if self_t is None else weight * self_t
    if weight_t is not None:
        negative = _add(negative, weight_t * self)
    return torch.where(self >= 0, 0.0 if self_t is None else self_t, negative)


@register_jvp(aten.glu.default)
def glu_jvp(self, self_t, result, dim=-1):
    """derivatives.yaml's glu_jvp: glu = a sigmoid(b) for the halves (a, b)
    of self along dim, so d glu = da sigmoid(b) + glu (1 - sigmoid(b)) db."""
    a_t, b_t = self_t.chunk(2, dim)
    gate = self.chunk(2, dim)[1].sigmoid()
    return a_t * gate + result * (1 - gate) * b_t


@register_jvp(aten.grid_sampler_2d.default, aten.grid_sampler_3d.default)
def grid_sampler_jvp(op, input, grid, input_t, grid_t, interpolation_mode, padding_mode, align_corners):
    """Linear in the input: the op on its tangent.  In the grid, out[n, c, p]
    moves by d out[n, c, p] / d grid[n, p] . grid_t[n, p].  The backward
    kernel sums those slopes over channels, so each channel becomes an
    example of its own, and a cotangent of ones gets every slope in one call:

    # input [N, C, *S] -> [N*C, 1, *S];  grid [N, *So, k] -> [N*C, *So, k]
    # slopes [N*C, *So, k] -> [N, C, *So, k] . grid_t [N, 1, *So, k] -> [N, C, *So]
    """
    options = (interpolation_mode, padding_mode, align_corners)
    out = None if input_t is None else op(input_t, grid, *options)
    if grid_t is not None:
        n, c = input.shape[:2]
        per_point = tuple(grid.shape[1:])
        channels = input.reshape((n * c, 1) + tuple(input.shape[2:]))
        grids = grid.unsqueeze(1).expand((n, c) + per_point).reshape((n * c,) + per_point)
        ones = grid.new_ones((n * c, 1) + per_point[:-1])
        slopes = _GRID_SAMPLER_BACKWARD[op](ones, channels, grids, *options, [False, True])[1]
        out = _add(out, (slopes.view((n, c) + per_point) * grid_t.unsqueeze(1)).sum(-1))
    return out


@register_jvp(aten.grid_sampler_2d_backward.default, aten.grid_sampler_3d_backward.default)
def grid_sampler_backward_jvp(op, grad_output, input, grid, grad_output_t, input_t, grid_t, interpolation_mode,
                              padding_mode, align_corners, output_mask):
    """Linear in grad_output (both outputs); grad_grid is linear in the input
    too (grad_input does not depend on it).  The grid's tangent goes through
    the sampling's curvature: this library's jvp of the decomposed first
    derivative (as this op's VJP takes its vjp)."""
    from ..transforms.forward import jvp

    options = (interpolation_mode, padding_mode, align_corners)
    backward = op
    grads = [None, None]
    if grad_output_t is not None:
        grads = list(backward(grad_output_t, input, grid, *options, output_mask))
    if input_t is not None and output_mask[1]:
        grads[1] = _add(grads[1], backward(grad_output, input_t, grid, *options, [False, True])[1])
    if grid_t is not None:
        if op is aten.grid_sampler_2d_backward.default:
            first_order = _decomposed_grid_sampler_2d_vjp(*options)
        else:
            first_order = _decomposed_grid_sampler_3d_vjp(*options)
        _, curvature = jvp(lambda g: first_order(grad_output, input, g), (grid,), (grid_t,))
        grads = [_add(g, term) if wanted else g for g, term, wanted in zip(grads, curvature, output_mask)]
    return tuple(grads)


@register_jvp(aten._scaled_dot_product_flash_attention_for_cpu.default)
def sdpa_flash_cpu_jvp(query, key, value, query_t, key_t, value_t, result, is_causal=False, attn_mask=None,
                       scale=None):
    """From the probabilities P of the scores S = scale q k^T + mask (see
    the VJP above): dS = scale (dq k^T + q dk^T), and

        d logsumexp = rowsum(P * dS),  dP = P * (dS - d logsumexp),
        d out = dP v + P dv.

    logsumexp gets its tangent (torch marks it non-differentiable; see the
    VJP).  The mask is keyword-only, so it carries no tangent here."""
    out, lse = result
    probs, factor = _attention_probabilities(query, key, lse, is_causal, attn_mask, scale)
    out_t = None if value_t is None else torch.matmul(probs, value_t)
    scores_t = None
    if query_t is not None:
        scores_t = torch.matmul(query_t, key.transpose(-2, -1))
    if key_t is not None:
        scores_t = _add(scores_t, torch.matmul(query, key_t.transpose(-2, -1)))
    if scores_t is None:
        return _laid_out_like(out_t, out), None
    scores_t = scores_t * factor
    lse_t = (probs * scores_t).sum(-1, keepdim=True)
    out_t = _add(out_t, torch.matmul(probs * (scores_t - lse_t), value))
    return _laid_out_like(out_t, out), lse_t.squeeze(-1).to(lse.dtype)


def _laid_out_like(tangent, like):
    """``tangent`` in ``like``'s memory layout.  The kernel's output is
    [N, H, L, E] stored as [N, L, H, E], and callers view it as such
    (multi_head_attention_forward: ``.permute(2, 0, 1, 3).reshape(...)``
    is a view of the output): the tangent must allow the same views."""
    if tangent.stride() == like.stride():
        return tangent
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))  # outermost dim first
    inverse = sorted(range(like.dim()), key=order.__getitem__)
    return tangent.permute(order).contiguous().permute(inverse)
