"""Recurrent layers.

nn.LSTM/GRU/RNN call ``torch._VF.lstm`` / ``gru`` / ``rnn_tanh`` /
``rnn_relu``, C++ composites that decompose above ``__torch_dispatch__``
into code adding batched values in place into unbatched temporaries (fatal
under vmap).  While transforms run, nn's ``_VF`` is replaced by one whose
RNN functions are torch._decomp's ATen-op implementations (see NOTE
[Patches while transforms run]).  Those run float32 LSTM layers through
oneDNN's fused ``mkldnn_rnn_layer`` kernel, which is decomposed here into
the LSTM cell math, so every transform sees and composes through it.  The
single-step cells (``lstm_cell``, ``gru_cell``, ``rnn_*_cell``) are replaced
the same way: off the CPU they call fused kernels without rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.nn.modules.rnn
from torch._decomp import decompositions as _decomps
from torch._decomp.decompositions import one_layer_lstm

from .._core.interpreter import register_patch
from .._core.registry import register_batching, register_decomposition, register_jvp, register_vjp
from ._derivatives import linear_jvp

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


# The single-step cells (nn.LSTMCell, GRUCell, RNNCell) in ATen ops: off the
# CPU their C++ composites call fused kernels (_thnn_fused_lstm_cell, ...)
# that have no rules; these are PyTorch's cell formulas.
def _lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    h, c = hx
    gates = F.linear(input, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, -1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def _gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    input_r, input_z, input_n = F.linear(input, w_ih, b_ih).chunk(3, -1)
    hidden_r, hidden_z, hidden_n = F.linear(hx, w_hh, b_hh).chunk(3, -1)
    reset = torch.sigmoid(input_r + hidden_r)
    update = torch.sigmoid(input_z + hidden_z)
    new = torch.tanh(input_n + reset * hidden_n)
    return new + update * (hx - new)


def _rnn_cell(activation):
    def cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
        return activation(F.linear(input, w_ih, b_ih) + F.linear(hx, w_hh, b_hh))

    return cell


class _TransformVF:
    """nn's ``_VF`` with the RNN entry points written in ATen ops; anything
    else is the real ``_VF``'s."""

    def __init__(self, original) -> None:
        self._original = original

    def __getattr__(self, name):
        return getattr(self._original, name)

    @staticmethod
    def _route(input_impl, data_impl):
        def run(*args, **kwargs):
            # The .data overloads (PackedSequence) pass batch_sizes second.
            if len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].dim() == 1 and not args[1].is_floating_point():
                return data_impl(*args, **kwargs)
            return input_impl(*args, **kwargs)

        return staticmethod(run)

    lstm = _route(_decomps.lstm_impl, _decomps.lstm_data_impl)
    gru = _route(_decomps.gru_impl, _decomps.gru_impl_data)
    rnn_tanh = _route(_decomps.rnn_tanh_input, _decomps.rnn_tanh_data)
    rnn_relu = _route(_decomps.rnn_relu_input, _decomps.rnn_relu_data)
    lstm_cell = staticmethod(_lstm_cell)
    gru_cell = staticmethod(_gru_cell)
    rnn_tanh_cell = staticmethod(_rnn_cell(torch.tanh))
    rnn_relu_cell = staticmethod(_rnn_cell(torch.relu))


register_patch(torch.nn.modules.rnn, "_VF", _TransformVF(torch.nn.modules.rnn._VF))


# -- packed sequences ---------------------------------------------------------


@register_batching(aten._pack_padded_sequence.default)
def pack_padded_sequence_batch(bdims, input, lengths, batch_first):
    """Packing moves (time, sequence) pairs and carries the other dims as
    features, so the vmap batch rides along as one more feature dim.
    # input [T, N, F] batched at 0: [B, T, N, F] -> [T, N, F, B] -> [T, N, F*B] -pack-> [S, F*B] -> [S, F, B]"""
    if bdims[1] is not None:
        raise RuntimeError(
            "vmap: pack_padded_sequence with lengths that differ per batch element gives packed data of a "
            "different size for each; vmap needs one size. Pad instead, or pack outside vmap."
        )
    x = input.movedim(bdims[0], -1)
    data, batch_sizes = aten._pack_padded_sequence.default(x.flatten(-2), lengths, batch_first)
    return (data.unflatten(-1, x.shape[-2:]), batch_sizes), (data.dim(), None)


@register_vjp(aten._pack_padded_sequence.default)
def pack_padded_sequence_vjp(grad, inputs_meta, result, batch_first):
    if grad[0] is None:
        return (None,)
    return (aten._pack_padded_sequence_backward.default(grad[0], inputs_meta[0][0], result[1], batch_first),)


register_jvp(aten._pack_padded_sequence.default)(linear_jvp())
