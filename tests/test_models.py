"""vmap over small real models against a Python loop."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.harness import check_vmap, no_fallback


def mlp():
    return nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv1(x))), 2)
        x = self.pool(F.silu(self.conv2(x)))
        return F.log_softmax(self.fc(x.flatten(1)), -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp_eval_over_ensemble_dim(dtype):
    model = mlp().to(dtype).eval()
    with no_fallback(), torch.no_grad():
        check_vmap(model, torch.randn(6, 4, 20, dtype=dtype))  # [ensemble, batch, features]
        check_vmap(model, torch.randn(4, 6, 20, dtype=dtype), in_dims=1)
        check_vmap(model, torch.randn(6, 20, dtype=dtype))  # per-example: no batch dim inside


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cnn_eval_over_ensemble_dim(dtype):
    torch.manual_seed(0)
    model = CNN().to(dtype).eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2)
    with no_fallback(), torch.no_grad():
        check_vmap(model, torch.randn(3, 2, 3, 12, 12, dtype=dtype))
        check_vmap(model, torch.randn(2, 3, 3, 12, 12, dtype=dtype), in_dims=1)


def test_cnn_nested_vmap():
    model = CNN().eval()
    from torchxform import vmap
    from tests.harness import assert_close

    x = torch.randn(2, 3, 2, 3, 12, 12)
    with no_fallback(), torch.no_grad():
        expected = torch.stack([torch.stack([model(b) for b in a]) for a in x])
        assert_close(vmap(vmap(model))(x), expected)


def test_model_outputs_differentiable_by_autograd():
    model = mlp().eval()
    x = torch.randn(6, 4, 20)
    from torchxform import vmap

    out = vmap(model)(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    ref = torch.stack([model(b) for b in x])
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


# -- per-sample gradients (vmap over grad) against a loop of torch.autograd ----


def _functional_loss(model):
    names = [n for n, _ in model.named_parameters()]

    def loss(params, x, y):
        # A functional call written out by hand (functional_call is the nn
        # issue's): temporarily swap the parameters in.
        saved = {n: p for n, p in model.named_parameters()}
        try:
            for n, p in zip(names, params):
                _set(model, n, p)
            out = model(x.unsqueeze(0))
        finally:
            for n in names:
                _set(model, n, saved[n])
        return F.cross_entropy(out, y.unsqueeze(0))

    return loss, [p.detach() for _, p in model.named_parameters()]


def _set(module, dotted, value):
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    module._parameters[leaf] = value


@pytest.mark.parametrize("make", [mlp, CNN], ids=["mlp", "cnn"])
def test_per_sample_gradients(make):
    from torchxform import grad, vmap
    from tests.harness import assert_close

    torch.manual_seed(0)
    model = make().double().eval()
    loss, params = _functional_loss(model)
    if make is mlp:
        xs, ys = torch.randn(6, 20, dtype=torch.float64), torch.randint(0, 5, (6,))
    else:
        xs, ys = torch.randn(4, 3, 12, 12, dtype=torch.float64), torch.randint(0, 10, (4,))
    with no_fallback():
        got = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    expected = []
    for x, y in zip(xs, ys):
        leaves = [p.clone().requires_grad_() for p in params]
        expected.append(torch.autograd.grad(loss(leaves, x, y), leaves))
    expected = [torch.stack(column) for column in zip(*expected)]
    assert_close(got, expected)


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_and_transformer_layer_over_a_batch_of_minibatches(batch_first):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first).train()
    x = torch.randn(3, 5, 4, 8)  # [minibatches, then the module's own (seq, batch) or (batch, seq), features]
    mask = torch.triu(torch.full((5, 5) if not batch_first else (4, 4), float("-inf")), diagonal=1)
    with no_fallback(), torch.no_grad():
        check_vmap(lambda q: attention(q, q, q)[0], x)
        check_vmap(lambda q: attention(q, q, q, attn_mask=mask if not batch_first else None)[0], x)
        check_vmap(layer, x)
        check_vmap(lambda src: layer(src, src_mask=mask, is_causal=True), x)
        layer.eval()  # eval without grad: the modules' fused fast path, off while transforms run
        check_vmap(layer, x)
    assert torch.backends.mha.get_fastpath_enabled()  # and back on afterwards


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_recurrent_modules_over_a_batch_of_minibatches(cls):
    torch.manual_seed(0)
    module = cls(4, 6, num_layers=2, batch_first=True)
    with no_fallback(), torch.no_grad():
        check_vmap(lambda x: module(x)[0], torch.randn(3, 2, 5, 4))
        check_vmap(lambda x: module(x)[0], torch.randn(2, 5, 3, 4), in_dims=2)
