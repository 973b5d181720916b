"""Recurrent layers.

On CPU, float32 ``nn.LSTM`` runs through oneDNN's fused
``mkldnn_rnn_layer`` kernel, which no transform can see into.  It is
decomposed here into the LSTM cell math (torch._decomp's own one-layer LSTM,
written in ATen ops), so vmap batches it, grad differentiates it and both
compose, like every other op; GRU and RNN already arrive as ATen ops.
"""

from __future__ import annotations

import torch
from torch._decomp.decompositions import one_layer_lstm

from .._core.registry import register_decomposition

aten = torch.ops.aten


@register_decomposition(aten.mkldnn_rnn_layer.default)
def mkldnn_rnn_layer(
    input,
    weight0,
    weight1,
    weight2,
    weight3,
    hx_,
    cx_,
    reverse,
    batch_sizes,
    mode,
    hidden_size,
    num_layers,
    has_biases,
    bidirectional,
    batch_first,
    train,
):
    """One LSTM layer over a time-major [seq, batch, input] tensor (oneDNN's
    mode 2, the only one torch uses): returns (output, h_n, c_n, workspace)
    as the kernel does.  The kernel ignores num_layers, bidirectional and
    batch_first (the caller handles them: each call is one direction of one
    layer, on a time-major input)."""
    if mode != 2 or len(batch_sizes):
        raise RuntimeError(
            f"mkldnn_rnn_layer: only the unpacked LSTM form (mode 2) that nn.LSTM uses is supported "
            f"under transforms (got mode={mode}, batch_sizes={list(batch_sizes)})"
        )
    params = [weight0, weight1, weight2, weight3] if has_biases else [weight0, weight1]
    output, (h, c) = one_layer_lstm(input, (hx_.squeeze(0), cx_.squeeze(0)), params, has_biases, reverse)
    workspace = input.new_empty(0)
    return output, h.unsqueeze(0), c.unsqueeze(0), workspace
