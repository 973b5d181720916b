"""Recurrent layers under vmap, grad and vmap(grad), against loops and
torch.autograd.  float32 nn.LSTM on CPU reaches oneDNN's mkldnn_rnn_layer,
which torchxform decomposes (rules/rnn.py)."""

import pytest
import torch
import torch.nn as nn

import torchxform
from tests.harness import assert_close, check_vmap, no_fallback


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("bidirectional,batch_first", [(False, True), (True, False)])
def test_rnn_vmap_grad_and_per_example_grad(cls, bidirectional, batch_first, dtype):
    torch.manual_seed(0)
    rnn = cls(4, 5, num_layers=2, batch_first=batch_first, bidirectional=bidirectional).to(dtype)
    x = torch.randn(3, 2, 3, 4, dtype=dtype)  # [examples, (batch, seq) or (seq, batch), features]

    def f(x):
        return rnn(x)[0].pow(2).sum()

    with no_fallback():
        with torch.no_grad():
            check_vmap(lambda b: rnn(b)[0], x, rtol=1e-5, atol=1e-6)
        got = torchxform.vmap(torchxform.grad(f))(x)
    expected = []
    for example in x:
        leaf = example.clone().requires_grad_()
        expected.append(torch.autograd.grad(f(leaf), leaf)[0])
    assert_close(got, torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_lstm_weight_gradients_match_autograd():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4)
    params = dict(lstm.named_parameters())
    x = torch.randn(5, 2, 3)

    def loss(p):
        out, _ = _call(lstm, p, x)
        return out.tanh().sum()

    with no_fallback():
        got = torchxform.grad(loss)({k: v.detach() for k, v in params.items()})
    expected = torch.autograd.grad(lstm(x)[0].tanh().sum(), list(params.values()))
    assert_close(list(got.values()), list(expected), rtol=1e-4, atol=1e-6)


def _call(module, params, x):
    saved = dict(module._parameters)
    try:
        module._parameters.update(params)
        return module(x)
    finally:
        module._parameters.update(saved)


def test_packed_sequence_under_vmap():
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    gru = nn.GRU(3, 4)
    x = torch.randn(2, 5, 3, 3)  # [examples, seq, batch, features]
    lengths = torch.tensor([5, 3, 2], device="cpu")  # pack_padded_sequence wants them on the CPU

    def f(x):
        return gru(pack_padded_sequence(x, lengths))[1]

    with no_fallback(), torch.no_grad():
        check_vmap(f, x, rtol=1e-5, atol=1e-6)


def test_vf_restored_after_transforms():
    import torch.nn.modules.rnn as rnn_module

    original = rnn_module._VF
    seen = []
    torchxform.vmap(lambda x: seen.append(rnn_module._VF) or x)(torch.ones(2))
    assert seen[0] is not original and rnn_module._VF is original
    with pytest.raises(ZeroDivisionError):
        torchxform.grad(lambda x: 1 / 0)(torch.ones(2))
    assert rnn_module._VF is original
