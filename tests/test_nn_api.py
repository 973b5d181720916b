"""functional_call, stack_module_state and replace_all_batch_norm_modules_:
torch.func's contract, against plain module calls and loops."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

from torchxform import functional_call, grad, replace_all_batch_norm_modules_, stack_module_state, vmap
from tests.harness import assert_close, no_fallback


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.head = nn.Linear(4, 2)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x, shift=0.0):
        return self.head(self.body(x)) * self.scale + shift


def test_functional_call_replaces_parameters_and_buffers():
    torch.manual_seed(0)
    net, other = Net(), Net()
    x = torch.randn(5, 3)
    state = dict(other.named_parameters()) | {"scale": torch.tensor(3.0)}
    other.scale.fill_(3.0)
    assert_close(functional_call(net, state, (x,)), other(x))
    assert_close(functional_call(net, state, x, {"shift": 1.0}), other(x, shift=1.0))  # a single tensor arg
    assert net.scale.item() == 2.0  # the module's own state is untouched


def test_functional_call_several_dicts_and_repeated_keys():
    net = Net()
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    x = torch.randn(2, 3)
    assert_close(functional_call(net, (params, buffers), (x,)), net(x))
    with pytest.raises(ValueError, match="appeared in multiple dictionaries"):
        functional_call(net, (params, {"head.bias": torch.zeros(2)}), (x,))
    with pytest.raises(ValueError, match="to be a dict, or a list/tuple of dicts"):
        functional_call(net, 3, (x,))


def test_functional_call_strict():
    net = Net()
    with pytest.raises(RuntimeError, match="Missing key\\(s\\): 'head.bias'"):
        functional_call(net, {k: v for k, v in net.named_parameters() if k != "head.bias"}, (torch.randn(1, 3),), strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key\\(s\\): 'nope'"):
        functional_call(net, dict(net.named_parameters()) | dict(net.named_buffers()) | {"nope": torch.ones(1)},
                        (torch.randn(1, 3),), strict=True)


def test_functional_call_restores_state_when_the_call_raises():
    net = Net()
    before = {k: v for k, v in net.named_parameters()}
    with pytest.raises(RuntimeError):
        functional_call(net, {"head.weight": torch.zeros(2, 4)}, (torch.randn(2, 5),))  # wrong input width
    assert all(net.get_parameter(k) is v for k, v in before.items())


def test_functional_call_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2, bias=False)
            self.b = nn.Linear(2, 2, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    tied = Tied()
    x = torch.randn(3, 2)
    w = torch.randn(2, 2)
    assert_close(functional_call(tied, {"a.weight": w}, (x,)), x @ w.t() @ w.t())  # tying honoured
    untied = functional_call(tied, {"a.weight": w}, (x,), tie_weights=False)
    assert_close(untied, x @ w.t() @ tied.a.weight.detach().t())
    with pytest.raises(ValueError, match="which are tied"):
        functional_call(tied, {"a.weight": w, "b.weight": w + 1}, (x,))


def test_functional_call_with_parametrization():
    class Symmetric(nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).t()

    layer = nn.Linear(3, 3, bias=False)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    x = torch.randn(2, 3)
    raw = torch.randn(3, 3)
    sym = raw.triu() + raw.triu(1).t()
    out = functional_call(layer, {"parametrizations.weight.original": raw}, (x,))
    assert_close(out, x @ sym.t())
    # grad through the parametrization
    g = grad(lambda w: functional_call(layer, {"parametrizations.weight.original": w}, (x,)).sum())(raw)
    rw = raw.clone().requires_grad_()
    (expected,) = torch.autograd.grad((x @ (rw.triu() + rw.triu(1).t()).t()).sum(), rw)
    assert_close(g, expected)


def test_functional_call_under_vmap_and_grad():
    torch.manual_seed(0)
    net = Net()
    params = {k: v.detach() for k, v in net.named_parameters()}
    xs, ys = torch.randn(6, 3), torch.randn(6, 2)

    def loss(p, x, y):
        return F.mse_loss(functional_call(net, p, (x,)), y)

    with no_fallback():
        got = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    for i in range(6):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        expected = torch.autograd.grad(loss(leaves, xs[i], ys[i]), list(leaves.values()))
        assert_close([got[k][i] for k in params], list(expected))


def test_stack_module_state():
    torch.manual_seed(0)
    models = [Net() for _ in range(3)]
    params, buffers = stack_module_state(models)
    assert list(params) == [k for k, _ in models[0].named_parameters()]
    for k, v in params.items():
        assert v.shape == (3,) + models[0].get_parameter(k).shape
        assert v.is_leaf and v.requires_grad
        assert_close(v.detach(), torch.stack([m.get_parameter(k).detach() for m in models]))
    assert_close(buffers["scale"], torch.full((3,), 2.0))
    x = torch.randn(4, 3)
    with no_fallback():
        out = vmap(lambda p, b: functional_call(models[0], (p, b), (x,)))(params, buffers)
    assert_close(out, torch.stack([m(x) for m in models]))


def test_stack_module_state_errors():
    with pytest.raises(RuntimeError, match="Expected at least one model"):
        stack_module_state([])
    with pytest.raises(RuntimeError, match="same training/eval mode"):
        stack_module_state([Net(), Net().eval()])
    with pytest.raises(RuntimeError, match="same class"):
        stack_module_state([Net(), nn.Linear(3, 2)])
    with pytest.raises(RuntimeError, match="same structure"):
        stack_module_state([nn.Linear(3, 2), nn.Linear(3, 4)])


def test_batch_norm_training_under_vmap():
    bn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    x = torch.randn(4, 5, 2, 6, 6)  # [ensemble/batch, N, C, H, W]
    with pytest.raises(RuntimeError, match="running_mean or running_var"):
        vmap(bn)(x)
    assert replace_all_batch_norm_modules_(bn) is bn
    assert bn[1].running_mean is None and not bn[1].track_running_stats
    with no_fallback():
        assert_close(vmap(bn)(x), torch.stack([bn(b) for b in x]), rtol=1e-5, atol=1e-5)


# -- functorch's make_functional family -----------------------------------------


def test_make_functional_matches_the_module_and_its_gradients():
    from torchxform import make_functional

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    fmodel, params = make_functional(model)
    assert [p.shape for p in params] == [p.shape for p in model.parameters()]
    assert_close(fmodel(params, x), model(x))
    expected = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    assert_close(list(grad(lambda p: fmodel(p, x).square().sum())(params)), list(expected))
    _, detached = make_functional(model, disable_autograd_tracking=True)
    assert not any(p.requires_grad for p in detached)
    with pytest.raises(RuntimeError, match="has buffers. Please use make_functional_with_buffers"):
        make_functional(Net())


def test_make_functional_with_buffers_uses_the_given_buffers():
    from torchxform import make_functional_with_buffers

    net = Net()
    fmodel, params, buffers = make_functional_with_buffers(net)
    x = torch.randn(5, 3)
    assert_close(fmodel(params, buffers, x, shift=1.0), net(x, shift=1.0))
    assert_close(fmodel(params, (torch.tensor(3.0),), x), net(x) / 2 * 3)


def test_combine_state_for_ensemble_against_a_loop_over_models():
    from torchxform import combine_state_for_ensemble

    torch.manual_seed(0)
    models = [Net() for _ in range(4)]
    x = torch.randn(5, 3)
    fmodel, params, buffers = combine_state_for_ensemble(models)
    assert all(p.shape[0] == 4 for p in params) and all(b.shape[0] == 4 for b in buffers)
    with no_fallback():
        got = vmap(fmodel, in_dims=(0, 0, None))(params, buffers, x)
    assert_close(got, torch.stack([m(x) for m in models]))
    with pytest.raises(RuntimeError, match="Expected all models to have the same training/eval mode"):
        combine_state_for_ensemble([Net(), Net().eval()])
    with pytest.raises(RuntimeError, match="Expected all models to be of the same class"):
        combine_state_for_ensemble([Net(), nn.Linear(3, 2)])
    with pytest.raises(RuntimeError, match="Expected at least one model"):
        combine_state_for_ensemble([])
