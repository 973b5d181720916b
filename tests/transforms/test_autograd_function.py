"""torch.autograd.Function under the transforms: vmap batches its forward
(against a loop); grad and jvp refuse to differentiate it rather than
silently ignore its custom derivative; torch.autograd.Function is intact
after transforms ran."""

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


@pytest.mark.parametrize(
    "call",
    [
        lambda x: grad(lambda x: StraightThroughRound.apply(x).sum())(x),
        lambda x: jvp(lambda x: StraightThroughRound.apply(x), (x,), (x,)),
        lambda x: vmap(grad(lambda x: StraightThroughRound.apply(x).sum()))(x.expand(2, 3)),
    ],
    ids=["grad", "jvp", "vmap-grad"],
)
def test_differentiating_a_function_raises_instead_of_ignoring_its_backward(call):
    with pytest.raises(RuntimeError, match="StraightThroughRound is a torch.autograd.Function"):
        call(torch.randn(3))


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
