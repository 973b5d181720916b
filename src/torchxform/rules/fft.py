"""Fourier transforms (the `_fft_*` ops torch.fft reaches) and pairwise
distances.  Both accept leading batch dims, so the batch goes in front and
the transformed dims shift by one."""

from __future__ import annotations

import torch

from .._core.registry import register_batching, register_jvp, register_vjp
from ._batching import front_padded, logical_rank, move_bdim_to_front, wrap_dim
from ._derivatives import linear_jvp

aten = torch.ops.aten


@register_batching(aten._fft_c2c.default, aten._fft_r2c.default, aten._fft_c2r.default)
def fft_batch(op, bdims, x, dim, normalization, last):
    x = move_bdim_to_front(x, bdims[0])
    rank = x.dim() - 1
    return op(x, [wrap_dim(d, rank) + 1 for d in dim], normalization, last), 0


# The transforms are linear: the JVP is the op on the tangent, and the VJP
# its adjoint, which is the opposite-direction transform with the same
# normalization (derivatives.yaml: fft_r2c_backward, fft_c2r_backward).
register_jvp(aten._fft_c2c.default, aten._fft_r2c.default, aten._fft_c2r.default)(linear_jvp())


@register_vjp(aten._fft_c2c.default)
def fft_c2c_vjp(grad, dim, normalization, forward):
    return (aten._fft_c2c.default(grad, dim, normalization, not forward),)


@register_vjp(aten._fft_r2c.default)
def fft_r2c_vjp(grad, inputs_meta, dim, normalization, onesided):
    """A onesided r2c is a c2c of the real signal that drops the upper half
    of the last transformed dim: zero-pad the gradient back to the signal's
    length, inverse c2c, keep the real part."""
    if onesided:
        last = wrap_dim(dim[-1], grad.dim())
        missing = inputs_meta[0][0][last] - grad.shape[last]
        if missing > 0:  # pads are given from the last dim backwards
            grad = aten.constant_pad_nd.default(grad, [0, 0] * (grad.dim() - 1 - last) + [0, missing])
    return (torch.real(aten._fft_c2c.default(grad, dim, normalization, False)),)


@register_vjp(aten._fft_c2r.default)
def fft_c2r_vjp(grad, dim, normalization):
    """A c2r first fills the upper half of the last dim by conjugate symmetry
    from entries 1 .. n - half: those entries get their mirror's gradient
    too, so the onesided r2c of the gradient is doubled there."""
    out = aten._fft_r2c.default(grad, dim, normalization, True)
    last = wrap_dim(dim[-1], grad.dim())
    half = out.shape[last]
    doubled = grad.shape[last] - half
    if doubled > 0:
        # half = 4 (n = 6 or 7), doubled = 2 or 3: scale [1, 2, 2, 1] or [1, 2, 2, 2]
        scale = torch.ones(half, dtype=grad.dtype, device=grad.device)
        scale[1 : 1 + doubled] = 2
        out = out * scale.view((half,) + (1,) * (grad.dim() - 1 - last))
    return (out,)


@register_batching(aten._cdist_forward.default)
def cdist_batch(bdims, x1, x2, p, compute_mode=None):
    """x1 [.., P, M], x2 [.., R, M] with broadcasting batch dims: the vmap
    batch becomes one more leading batch dim of both.
    # x1 [B, P, M], x2 [R, M] -> [B, P, M], [1, R, M]"""
    rank = max(logical_rank(x1, bdims[0]), logical_rank(x2, bdims[1]))
    x1 = front_padded(x1, bdims[0], rank) if bdims[0] is not None else x1
    x2 = front_padded(x2, bdims[1], rank) if bdims[1] is not None else x2
    return aten._cdist_forward.default(x1, x2, p, compute_mode), 0
