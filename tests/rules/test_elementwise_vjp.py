"""Derivatives of the elementwise family against torch.autograd: vjp,
vjp of vjp and vmap over vjp (tests/autograd_harness.py)."""

import pytest
import torch
import torch.nn.functional as F

from tests.autograd_harness import check_derivatives

D = torch.float64


def randn(*shape):
    return torch.randn(*shape, dtype=D)


def positive(*shape):
    return torch.rand(*shape, dtype=D) + 0.5


def unit(*shape):
    return torch.rand(*shape, dtype=D) * 1.6 - 0.8  # inside (-1, 1)


UNARY = [
    ("neg", torch.neg, randn),
    ("exp", torch.exp, randn),
    ("exp2", torch.exp2, randn),
    ("expm1", torch.expm1, randn),
    ("log", torch.log, positive),
    ("log2", torch.log2, positive),
    ("log10", torch.log10, positive),
    ("log1p", torch.log1p, positive),
    ("sqrt", torch.sqrt, positive),
    ("rsqrt", torch.rsqrt, positive),
    ("reciprocal", torch.reciprocal, positive),
    ("square", torch.square, randn),
    ("sin", torch.sin, randn),
    ("cos", torch.cos, randn),
    ("tan", torch.tan, unit),
    ("asin", torch.asin, unit),
    ("acos", torch.acos, unit),
    ("atan", torch.atan, randn),
    ("sinh", torch.sinh, randn),
    ("cosh", torch.cosh, randn),
    ("tanh", torch.tanh, randn),
    ("asinh", torch.asinh, randn),
    ("acosh", torch.acosh, lambda *s: positive(*s) + 1),
    ("atanh", torch.atanh, unit),
    ("sigmoid", torch.sigmoid, randn),
    ("logit", torch.logit, lambda *s: torch.rand(*s, dtype=D) * 0.8 + 0.1),
    ("logit_eps", lambda x: torch.logit(x, eps=0.2), lambda *s: torch.rand(*s, dtype=D)),
    ("erf", torch.erf, randn),
    ("erfc", torch.erfc, randn),
    ("erfinv", torch.erfinv, unit),
    ("lgamma", torch.lgamma, positive),
    ("digamma", torch.digamma, positive),
    ("polygamma1", lambda x: torch.polygamma(1, x), positive),
    ("mvlgamma", lambda x: torch.mvlgamma(x, 2), lambda *s: positive(*s) + 1),
    ("i0", torch.i0, randn),
    ("sinc", torch.sinc, randn),
    ("abs", torch.abs, randn),
    ("relu", torch.relu, randn),
    ("gelu", F.gelu, randn),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), randn),
    ("silu", F.silu, randn),
    ("mish", F.mish, randn),
    ("elu", lambda x: F.elu(x, alpha=0.7), randn),
    ("celu", lambda x: F.celu(x, alpha=1.3), randn),
    ("selu", F.selu, randn),
    ("leaky_relu", lambda x: F.leaky_relu(x, 0.2), randn),
    ("hardtanh", lambda x: F.hardtanh(x, -0.5, 0.7), randn),
    ("hardsigmoid", F.hardsigmoid, lambda *s: randn(*s) * 4),
    ("hardswish", F.hardswish, lambda *s: randn(*s) * 4),
    ("softplus", lambda x: F.softplus(x, beta=2, threshold=1.5), randn),
    ("softshrink", lambda x: F.softshrink(x, 0.3), randn),
    ("hardshrink", lambda x: F.hardshrink(x, 0.3), randn),
    ("threshold", lambda x: F.threshold(x, 0.1, 2.0), randn),
    ("clamp", lambda x: x.clamp(-0.3, 0.4), randn),
    ("clamp_min", lambda x: x.clamp(min=0.1), randn),
    ("nan_to_num", lambda x: torch.nan_to_num(x), randn),
    ("pow_scalar", lambda x: x**3, randn),
    ("pow_frac", lambda x: x**2.5, positive),
    ("rpow", lambda x: 2.0**x, randn),
    ("frac", torch.frac, randn),
    ("deg2rad", torch.deg2rad, randn),
    ("to_float32_and_back", lambda x: x.float().double() * 2, randn),
    ("floor_no_grad", lambda x: torch.floor(x) * x, randn),
    ("sign_no_grad", lambda x: torch.sign(x) * x, randn),
]


# torch.autograd itself has no double backward for these (so no reference).
NO_REFERENCE_SECOND_ORDER = {"hardsigmoid", "hardswish"}


@pytest.mark.parametrize("name,fn,make", UNARY, ids=[u[0] for u in UNARY])
def test_unary(name, fn, make):
    check_derivatives(fn, lambda: (make(2, 3),), second_order=name not in NO_REFERENCE_SECOND_ORDER, msg=name)


BINARY = [
    ("add", lambda x, y: torch.add(x, y, alpha=2.5)),
    ("sub", lambda x, y: torch.sub(x, y, alpha=0.5)),
    ("rsub", lambda x, y: torch.rsub(x, y, alpha=2)),
    ("mul", torch.mul),
    ("div", lambda x, y: x / (y.abs() + 0.5)),
    ("div_trunc_no_grad", lambda x, y: torch.div(x, y.abs() + 0.5, rounding_mode="trunc") + x * y),
    ("pow", lambda x, y: torch.pow(x.abs() + 0.5, y)),
    ("atan2", torch.atan2),
    ("hypot", torch.hypot),
    ("maximum", torch.maximum),
    ("minimum", torch.minimum),
    ("fmax", torch.fmax),
    ("fmin", torch.fmin),
    ("fmod", lambda x, y: torch.fmod(x, y.abs() + 0.5)),
    ("remainder", lambda x, y: torch.remainder(x, y.abs() + 0.5)),
    ("xlogy", lambda x, y: torch.xlogy(x, y.abs() + 0.1)),
    ("logaddexp", torch.logaddexp),
    ("logaddexp2", torch.logaddexp2),
    ("copysign", torch.copysign),
    ("where", lambda x, y: torch.where(x > y, x, y * 2)),
    ("lerp_scalar", lambda x, y: torch.lerp(x, y, 0.3)),
    ("clamp_tensor", lambda x, y: torch.clamp(x, min=y, max=y + 1)),
    ("masked_fill", lambda x, y: x.masked_fill(y > 0, 0.5)),
    ("masked_fill_tensor", lambda x, y: x.masked_fill(x > 0, y.sum())),
]


@pytest.mark.parametrize("shapes", [((2, 3), (2, 3)), ((2, 3), (3,)), ((1, 3), (2, 1))], ids=str)
@pytest.mark.parametrize("name,fn", BINARY, ids=[b[0] for b in BINARY])
def test_binary(name, fn, shapes):
    check_derivatives(fn, lambda: (randn(*shapes[0]), randn(*shapes[1])), msg=name)


TERNARY = [
    ("addcmul", lambda s, a, b: torch.addcmul(s, a, b, value=0.5)),
    ("addcdiv", lambda s, a, b: torch.addcdiv(s, a, b.abs() + 0.5, value=0.5)),
    ("lerp_tensor", lambda s, e, w: torch.lerp(s, e, w)),
    ("where", lambda c, x, y: torch.where(c > 0, x, y)),
]


@pytest.mark.parametrize("name,fn", TERNARY, ids=[t[0] for t in TERNARY])
def test_ternary(name, fn):
    check_derivatives(fn, lambda: (randn(2, 3), randn(3), randn(2, 1)), msg=name)


def test_mixed_dtypes_give_gradients_in_input_dtype():
    check_derivatives(
        lambda x, y: x * y, lambda: (torch.randn(2, 3, dtype=torch.float32), randn(3)), rtol=1e-5, atol=1e-6
    )


INPLACE = [
    ("mul_", lambda x, y: x.clone().mul_(y)),
    ("add_", lambda x, y: (x * 1).add_(y, alpha=3)),
    ("div_", lambda x, y: x.clone().div_(y.abs() + 1)),
    ("relu_", lambda x, y: (x + y).relu_()),
    ("sigmoid_", lambda x, y: (x * y).sigmoid_()),
    ("clamp_", lambda x, y: (x + y).clamp_(-0.2, 0.3)),
    ("copy_", lambda x, y: x.clone().copy_(y * 2)),
    ("zero_then_add", lambda x, y: x.clone().zero_().add_(y)),
    ("masked_fill_", lambda x, y: x.clone().masked_fill_(y > 0, 1.0)),
]


@pytest.mark.parametrize("name,fn", INPLACE, ids=[i[0] for i in INPLACE])
def test_inplace(name, fn):
    check_derivatives(fn, lambda: (randn(2, 3), randn(2, 3)), msg=name)
