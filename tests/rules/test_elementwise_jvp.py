"""Forward derivatives (JVPs) of the elementwise, view and reduction
families against torch.autograd.forward_ad: jvp, vmap over jvp and jvp over
vjp (tests/autograd_harness.py), on the same tables as the VJP tests."""

import pytest
import torch

from tests.autograd_harness import check_forward_derivatives
from tests.rules.test_elementwise_vjp import BINARY, INPLACE, NO_REFERENCE_SECOND_ORDER, TERNARY, UNARY, randn
from tests.rules.test_view_reduction_vjp import COMPLEX, REDUCTIONS, VIEWS


@pytest.mark.parametrize("name,fn,make", UNARY, ids=[u[0] for u in UNARY])
def test_unary(name, fn, make):
    check_forward_derivatives(fn, lambda: (make(2, 3),), over_reverse=name not in NO_REFERENCE_SECOND_ORDER, msg=name)


@pytest.mark.parametrize("name,fn", BINARY, ids=[b[0] for b in BINARY])
def test_binary(name, fn):
    check_forward_derivatives(fn, lambda: (randn(2, 3), randn(3)), msg=name)


@pytest.mark.parametrize("name,fn", TERNARY, ids=[t[0] for t in TERNARY])
def test_ternary(name, fn):
    check_forward_derivatives(fn, lambda: (randn(2, 3), randn(3), randn(2, 1)), msg=name)


@pytest.mark.parametrize("name,fn", INPLACE, ids=[i[0] for i in INPLACE])
def test_inplace(name, fn):
    check_forward_derivatives(fn, lambda: (randn(2, 3), randn(2, 3)), msg=name)


@pytest.mark.parametrize("name,fn", VIEWS, ids=[v[0] for v in VIEWS])
def test_views(name, fn):
    check_forward_derivatives(fn, lambda: (randn(2, 3, 4),), msg=name)


@pytest.mark.parametrize("name,fn", REDUCTIONS, ids=[r[0] for r in REDUCTIONS])
def test_reductions(name, fn):
    check_forward_derivatives(fn, lambda: (randn(2, 3, 4),), msg=name)


@pytest.mark.parametrize("name,fn", COMPLEX, ids=[c[0] for c in COMPLEX])
def test_complex(name, fn):
    check_forward_derivatives(fn, lambda: (torch.randn(3, 4, dtype=torch.complex128),), msg=name)


@pytest.mark.parametrize(
    "name, write",
    [
        ("masked_fill_", lambda y, m: y.masked_fill_(m, 0)),
        ("neg_", lambda y, m: y.neg_()),
        ("tril_", lambda y, m: y.tril_()),
        ("cumsum_", lambda y, m: y.cumsum_(1)),
    ],
)
def test_linear_inplace_ops_never_write_the_tangent(name, write):
    # An in-place linear op on a value whose tangent is an expanded view
    # (broadcast from x) and on the user's own tangent: the tangent must be
    # computed out of place, matching forward_ad.
    import torch.autograd.forward_ad as fwAD

    import torchxform

    x, t = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, False], [False] * 4, [False] * 4])
    f = lambda x: write(x + torch.zeros(3, 4, dtype=torch.float64), mask)  # noqa: E731
    out, tangent = torchxform.jvp(f, (x,), (t,))
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
    torch.testing.assert_close(tangent, expected, msg=name)
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    t_before = t.clone()
    torchxform.jvp(lambda x: write(x, mask), (x,), (t,))
    assert torch.equal(t, t_before), f"{name} wrote into the user's tangent"
