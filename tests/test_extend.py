"""The public extension API: a user's own op (torch.library.custom_op) with
rules registered in Python works under every transform, against stock
PyTorch references computed with the same math in ordinary torch ops; and
debug_unwrap."""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import torchxform
from torchxform import debug_unwrap, grad, hessian, jacfwd, jvp, vjp, vmap
from tests.harness import assert_close


@torch.library.custom_op("torchxform_tests::softcube", mutates_args=())
def softcube(x: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * x**3 / (1 + x**2), computed where torchxform cannot see inside."""
    x_np = x.detach().cpu().numpy()
    return torch.as_tensor(scale * x_np**3 / (1 + x_np**2), device=x.device)


@softcube.register_fake
def _(x, scale):
    return torch.empty_like(x)


def reference(x, scale):
    return scale * x**3 / (1 + x**2)


@torchxform.register_batch_rule(softcube)
def softcube_batch(in_dims, x, scale):
    return softcube(x, scale), in_dims[0]  # elementwise: the batch dim stays where it is


@torchxform.register_vjp(softcube)
def softcube_vjp(grad, x, scale):
    return (grad * scale * (x**4 + 3 * x**2) / (1 + x**2) ** 2,)


@torchxform.register_jvp(softcube)
def softcube_jvp(x, x_t, scale):
    return x_t * scale * (x**4 + 3 * x**2) / (1 + x**2) ** 2


D = torch.float64


def test_custom_op_per_sample_gradients_against_autograd_loop():
    w, xs = torch.randn(4, dtype=D), torch.randn(6, 4, dtype=D)
    loss = lambda w, x: softcube(w * x, 0.5).sum()  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchxform.SlowFallbackWarning)
        got = vmap(grad(loss), in_dims=(None, 0))(w, xs)
    leaf = w.clone().requires_grad_()
    expected = torch.stack([torch.autograd.grad(reference(leaf * x, 0.5).sum(), leaf)[0] for x in xs])
    assert_close(got, expected)


def test_custom_op_second_order_jvp_and_hessian():
    x, t = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    with fwAD.dual_level():
        expected_tangent = fwAD.unpack_dual(reference(fwAD.make_dual(x, t), 2.0)).tangent
    assert_close(jvp(lambda x: softcube(x, 2.0), (x,), (t,))[1], expected_tangent)
    assert_close(jacfwd(lambda x: softcube(x, 2.0))(x), torch.autograd.functional.jacobian(lambda x: reference(x, 2.0), x))
    assert_close(hessian(lambda x: softcube(x, 2.0).sum())(x),
                 torch.autograd.functional.hessian(lambda x: reference(x, 2.0).sum(), x))
    cotangents = torch.randn(3, 5, dtype=D)
    got = vmap(vjp(lambda x: softcube(x, 2.0), x)[1])(cotangents)[0]
    leaf = x.clone().requires_grad_()
    out = reference(leaf, 2.0)
    assert_close(got, torch.stack([torch.autograd.grad(out, leaf, c, retain_graph=True)[0] for c in cotangents]))


def test_register_rejects_what_is_not_an_op():
    with pytest.raises(TypeError, match="OpOverload"):
        torchxform.register_vjp(lambda x: x)
    with pytest.raises(TypeError, match="overloads, not packets"):
        torchxform.register_batch_rule(torch.ops.aten.add)


def test_debug_unwrap():
    x = torch.randn(3, 4)
    assert debug_unwrap(x) is x

    def inner(y):
        physical = debug_unwrap(y, recurse=False)
        assert physical.shape == (3, 4) and type(physical) is torch.Tensor
        return y

    vmap(inner)(x)

    def nested(y):  # a GradTensor over a BatchedTensor: one level, then all of them
        assert type(debug_unwrap(y, recurse=False)).__name__ == "BatchedTensor"
        assert type(debug_unwrap(y)) is torch.Tensor and debug_unwrap(y).shape == (3, 4)
        return y.sum()

    vmap(grad(nested))(x)
