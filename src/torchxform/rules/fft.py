"""Fourier transforms (the `_fft_*` ops torch.fft reaches) and pairwise
distances.  Both accept leading batch dims, so the batch goes in front and
the transformed dims shift by one."""

from __future__ import annotations

import torch

from .._core.registry import register_batching
from ._batching import front_padded, logical_rank, move_bdim_to_front, wrap_dim

aten = torch.ops.aten


@register_batching(aten._fft_c2c.default, aten._fft_r2c.default, aten._fft_c2r.default)
def fft_batch(op, bdims, x, dim, normalization, last):
    x = move_bdim_to_front(x, bdims[0])
    rank = x.dim() - 1
    return op(x, [wrap_dim(d, rank) + 1 for d in dim], normalization, last), 0


@register_batching(aten._cdist_forward.default)
def cdist_batch(bdims, x1, x2, p, compute_mode=None):
    """x1 [.., P, M], x2 [.., R, M] with broadcasting batch dims: the vmap
    batch becomes one more leading batch dim of both.
    # x1 [B, P, M], x2 [R, M] -> [B, P, M], [1, R, M]"""
    rank = max(logical_rank(x1, bdims[0]), logical_rank(x2, bdims[1]))
    x1 = front_padded(x1, bdims[0], rank) if bdims[0] is not None else x1
    x2 = front_padded(x2, bdims[1], rank) if bdims[1] is not None else x2
    return aten._cdist_forward.default(x1, x2, p, compute_mode), 0
