"""torch.autograd.Function under the transforms: vmap batches its forward
(against a loop); grad runs its own backward (against torch.autograd on the
same Function); jvp refuses rather than ignore its custom derivative;
torch.autograd.Function is intact after transforms ran."""

import pytest
import torch

import torchxform
from torchxform import grad, jvp, vmap
from tests.harness import assert_close


class StraightThroughRound(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.round()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def test_vmap_batches_the_forward():
    x = torch.randn(4, 3) * 3
    got = vmap(lambda t: StraightThroughRound.apply(t) * 2)(x)
    assert_close(got, torch.stack([StraightThroughRound.apply(t) * 2 for t in x]))


class SavedExp(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.exp()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_output):
        (result,) = ctx.saved_tensors
        return grad_output * result


class OldStyle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output * 2


def reference_grad(fn, x, create_graph=False):
    leaf = x.clone().requires_grad_()
    return torch.autograd.grad(fn(leaf).sum(), leaf, create_graph=create_graph)[0], leaf


def test_grad_runs_the_functions_own_backward():
    x = torch.randn(5) * 3
    # The straight-through estimator: its backward, not round's zero derivative.
    f = lambda x: StraightThroughRound.apply(x * 2)  # noqa: E731
    assert_close(grad(lambda x: f(x).sum())(x), reference_grad(f, x)[0])
    assert_close(grad(lambda x: SavedExp.apply(x).sum())(x), reference_grad(SavedExp.apply, x)[0])


def test_second_order_and_per_sample_through_a_function():
    x = torch.randn(4, dtype=torch.float64)
    first, leaf = reference_grad(SavedExp.apply, x, create_graph=True)
    second = torch.autograd.grad(first.sum(), leaf)[0]
    assert_close(grad(lambda x: grad(lambda y: SavedExp.apply(y).sum())(x).sum())(x), second)
    xs = torch.randn(3, 4, dtype=torch.float64)
    got = vmap(grad(lambda x: (SavedExp.apply(x) * x).sum()))(xs)
    assert_close(got, torch.stack([reference_grad(lambda t: SavedExp.apply(t) * t, x)[0] for x in xs]))


def test_jvp_of_a_function_raises_instead_of_ignoring_its_derivative():
    with pytest.raises(RuntimeError, match="StraightThroughRound is a torch.autograd.Function"):
        jvp(lambda x: StraightThroughRound.apply(x), (torch.randn(3),), (torch.randn(3),))


def test_a_function_without_setup_context_gets_torch_funcs_error():
    with pytest.raises(RuntimeError, match="must override the setup_context staticmethod"):
        grad(lambda x: OldStyle.apply(x).sum())(torch.randn(3))


def test_a_function_on_constants_inside_grad_is_fine():
    x = torch.randn(3)
    got = grad(lambda x: (x * StraightThroughRound.apply(torch.full((3,), 1.6))).sum())(x)
    assert_close(got, torch.full((3,), 2.0))


def test_autograd_function_intact_after_transforms():
    # Patches are restored as they were: a classmethod stays a classmethod
    # (bound to each subclass), so torch.autograd keeps working.
    vmap(torch.sin)(torch.randn(2, 3))
    assert isinstance(vars(torch.autograd.Function)["apply"], classmethod)
    leaf = torch.randn(3, requires_grad=True)
    StraightThroughRound.apply(leaf).sum().backward()
    assert_close(leaf.grad, torch.ones(3))
    assert torchxform.vmap(StraightThroughRound.apply)(torch.randn(2, 3)).shape == (2, 3)
