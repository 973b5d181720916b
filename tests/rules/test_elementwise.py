"""Batching rules of the elementwise family against a Python loop."""

import pytest
import torch

import torchxform
from tests.harness import check_vmap, check_vmap_sampled, no_fallback

UNARY = [
    ("sin", torch.sin, None),
    ("exp", torch.exp, None),
    ("log", torch.log, "positive"),
    ("sqrt", torch.sqrt, "positive"),
    ("tanh", torch.tanh, None),
    ("sigmoid", torch.sigmoid, None),
    ("relu", torch.relu, None),
    ("neg", torch.neg, None),
    ("abs", torch.abs, None),
    ("erf", torch.erf, None),
    ("floor", torch.floor, None),
    ("gelu", torch.nn.functional.gelu, None),
    ("silu", torch.nn.functional.silu, None),
    ("softplus", torch.nn.functional.softplus, None),
    ("leaky_relu", lambda x: torch.nn.functional.leaky_relu(x, 0.1), None),
    ("elu", torch.nn.functional.elu, None),
    ("hardtanh", torch.nn.functional.hardtanh, None),
    ("hardswish", torch.nn.functional.hardswish, None),
    ("isnan", torch.isnan, None),
    ("to_float64", lambda x: x.to(torch.float64), None),
    ("pow_scalar", lambda x: x**2, None),
    ("rsub", lambda x: 1 - x, None),
    ("clamp", lambda x: x.clamp(-0.5, 0.5), None),
    ("nan_to_num", lambda x: torch.nan_to_num(x / 0.0), None),
]


def _sampler(shape, domain, dtype):
    def sample():
        x = torch.randn(shape, dtype=dtype)
        if domain == "positive":
            x = x.abs() + 0.1
        return (x,)

    return sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,fn,domain", UNARY, ids=[u[0] for u in UNARY])
def test_unary(name, fn, domain, dtype):
    with no_fallback():
        check_vmap_sampled(fn, _sampler((2, 3), domain, dtype))
        check_vmap_sampled(fn, _sampler((), domain, dtype))


BINARY = [
    ("add", torch.add),
    ("add_alpha", lambda x, y: torch.add(x, y, alpha=2.5)),
    ("sub", torch.sub),
    ("mul", torch.mul),
    ("div", torch.div),
    ("div_floor", lambda x, y: torch.div(x, y, rounding_mode="floor")),
    ("pow", lambda x, y: torch.pow(x.abs() + 0.5, y)),
    ("maximum", torch.maximum),
    ("atan2", torch.atan2),
    ("lt", torch.lt),
    ("eq", torch.eq),
    ("logical_and", lambda x, y: torch.logical_and(x > 0, y > 0)),
    ("hypot", torch.hypot),
    ("fmod", torch.fmod),
    ("xlogy", lambda x, y: torch.xlogy(x, y.abs())),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,fn", BINARY, ids=[b[0] for b in BINARY])
@pytest.mark.parametrize("shapes", [((2, 3), (2, 3)), ((3,), (2, 3)), ((2, 1), (1, 3)), ((), (2, 3))], ids=str)
def test_binary_broadcasting(name, fn, shapes, dtype):
    def sample():
        return torch.randn(shapes[0], dtype=dtype), torch.randn(shapes[1], dtype=dtype)

    with no_fallback():
        check_vmap_sampled(fn, sample)


TERNARY = [
    ("where", lambda c, x, y: torch.where(c > 0, x, y)),
    ("lerp", lambda s, e, w: torch.lerp(s, e, w.sigmoid())),
    ("addcmul", lambda s, a, b: torch.addcmul(s, a, b, value=0.5)),
    ("addcdiv", lambda s, a, b: torch.addcdiv(s, a, b.abs() + 1, value=0.5)),
    ("clamp_tensor", lambda x, lo, hi: torch.clamp(x, lo, lo + hi.abs())),
]


@pytest.mark.parametrize("name,fn", TERNARY, ids=[t[0] for t in TERNARY])
def test_ternary(name, fn):
    def sample():
        return torch.randn(2, 3), torch.randn(3), torch.randn(2, 1)

    with no_fallback():
        check_vmap_sampled(fn, sample)


def test_python_scalars_and_promotion():
    x = torch.randn(4, 3)
    check_vmap(lambda a: a * 2 + 1, x)
    check_vmap(lambda a: a.to(torch.int64) * 2.5, x)  # int tensor times a float scalar
    check_vmap(lambda a: (a > 0) + 1, x)  # bool plus int


@pytest.mark.parametrize(
    "x_dtype,y_dtype", [(torch.float32, torch.float64), (torch.int64, torch.float32), (torch.float64, torch.int32)]
)
def test_batched_zero_dim_promotion(x_dtype, y_dtype):
    # A batched 0-dim tensor must not promote like a dimensioned one.
    # See NOTE [Batched 0-dim tensors and type promotion].
    x = torch.randn(4, 3).to(x_dtype)
    y0 = torch.randn(4).to(y_dtype)  # 0-dim per example
    out = check_vmap(torch.add, x, y0)
    assert out.dtype == torch.add(x[0], y0[0]).dtype
    out = check_vmap(torch.mul, y0, x[0], in_dims=(0, None))
    assert out.dtype == torch.mul(y0[0], x[0]).dtype
    # both 0-dim: ordinary promotion
    check_vmap(torch.add, y0, torch.randn(4, dtype=torch.float64))


def test_inplace_on_batched():
    def f(x, y):
        z = x.clone()
        z.mul_(y)
        z.add_(1.0)
        z.clamp_(min=-1.0)
        return z

    check_vmap(f, torch.randn(4, 2, 3), torch.randn(4, 3))
    check_vmap(f, torch.randn(2, 4, 3), torch.randn(3), in_dims=(1, None))


def test_inplace_returns_self():
    def f(x):
        y = x.clone()
        assert y.add_(1) is y
        return y

    check_vmap(f, torch.randn(3, 2))


def test_masked_fill_and_fill():
    x = torch.randn(4, 3)
    v = torch.randn(4)
    check_vmap(lambda a: a.masked_fill(a > 0, 0.5), x)
    check_vmap(lambda a, val: a.masked_fill(a > 0, val), x, v)
    check_vmap(lambda a, val: a.clone().masked_fill_(a > 0, val), x, v)
    check_vmap(lambda a, val: a.clone().fill_(val), x, v)
    check_vmap(lambda a, val: a.clone().fill_(2.0) * val, x, v)


def test_clone_memory_formats():
    check_vmap(lambda a: a.clone(memory_format=torch.channels_last), torch.randn(3, 2, 4, 5, 6))
    check_vmap(lambda a: a.t().contiguous(), torch.randn(4, 3, 5), in_dims=1)
    out = torchxform.vmap(lambda a: a.clone(memory_format=torch.channels_last))(torch.randn(3, 2, 4, 5, 6))
    assert out[0].is_contiguous(memory_format=torch.channels_last)
