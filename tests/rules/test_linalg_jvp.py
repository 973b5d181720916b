"""Forward derivatives (JVPs) of matrix products and linear algebra: jvp,
vmap over jvp and jvp over vjp against torch.autograd
(tests/autograd_harness.py), on the VJP tests' tables plus complex rows;
jacfwd, forward over forward and Hessian-vector products against
torch.autograd.functional; every op of the family on a JVP rule of its own.

Where torch.autograd.forward_ad has no formula (ormqr, the legacy
torch.cholesky) or a wrong one, the reference is torch.autograd's backward
instead: the Jacobian from torch.autograd.functional.jacobian (reverse mode)
applied to the tangent.  Wrong forward formulas in torch 2.13:
triangular_solve's ignores that only A's triangle is read (its backward
projects onto the triangle), and cholesky_inverse's disagrees with finite
differences and with its own backward.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

import torchxform
from tests.autograd_harness import check_forward_derivatives, ours_jvp, reference_jvp, split_args
from tests.harness import assert_close, cpu_reference_row, no_fallback
from tests.rules.test_linalg_vjp import (  # noqa: F401  (the fixture and the marks apply here too)
    ALL_ROWS,
    LSTSQ_CPU_DRIVERS,
    _fixed_draws_one_thread,  # reproducible draws, one intra-op thread
    _tensor,
    args,
    crandn,
    cwell_conditioned,
    geqrf,
    hpd,
    pytestmark,  # the legacy APIs' deprecation warnings
    randn,
    row,
    spd,
    symmetric,
    well_conditioned,
)
from torchxform._core.registry import VJP_RULES, jvp_coverage

aten = torch.ops.aten


def crandn_lu(*shape):
    return tuple(torch.linalg.lu_factor(crandn(*shape) + 3 * torch.eye(*shape[-2:], dtype=torch.complex128)))


def _scalars(beta, alpha):
    return dict(beta=beta, alpha=alpha)


# Complex rows beyond the VJP tests' (first order and jvp over vjp).
COMPLEX = [
    row("complex_" + name, fn, sample)
    for name, fn, sample in [
        ("bmm", torch.bmm, args(lambda: crandn(2, 2, 3), lambda: crandn(2, 3, 4))),
        ("mv", torch.mv, args(lambda: crandn(2, 3), lambda: crandn(3))),
        ("dot", torch.dot, args(lambda: crandn(3), lambda: crandn(3))),
        ("addmv", lambda s, a, b: torch.addmv(s, a, b, **_scalars(1j, 0.5 - 2j)),
         args(lambda: crandn(2), lambda: crandn(2, 3), lambda: crandn(3))),
        ("baddbmm", lambda s, a, b: torch.baddbmm(s, a, b, **_scalars(2 - 1j, 1j)),
         args(lambda: crandn(4), lambda: crandn(2, 2, 3), lambda: crandn(2, 3, 4))),
        ("addbmm_", lambda s, a, b: s.clone().addbmm_(a, b, **_scalars(0.5j, 3)),
         args(lambda: crandn(2, 4), lambda: crandn(3, 2, 5), lambda: crandn(3, 5, 4))),
        ("addr", lambda s, a, b: torch.addr(s, a, b, **_scalars(-1j, 2 + 1j)),
         args(lambda: crandn(3, 4), lambda: crandn(3), lambda: crandn(4))),
        ("linear", F.linear, args(lambda: crandn(2, 4), lambda: crandn(3, 4), lambda: crandn(3))),
        ("trace", torch.trace, args(lambda: crandn(3, 3))),
        ("diag_embed", torch.diag_embed, args(lambda: crandn(2, 3))),
        ("solve_right_vector", lambda a, b: torch.linalg.solve(a, b, left=False),
         args(lambda: cwell_conditioned(3), lambda: crandn(2, 3))),
        ("solve_triangular_lower_right_unit",
         lambda a, b: torch.linalg.solve_triangular(a, b, upper=False, left=False, unitriangular=True),
         args(lambda: cwell_conditioned(3), lambda: crandn(2, 3))),
        ("cholesky_upper", lambda a: torch.linalg.cholesky(a, upper=True), args(lambda: hpd(3))),
        ("cholesky_solve", torch.cholesky_solve, args(lambda: crandn(3, 2), lambda: torch.linalg.cholesky(hpd(3)))),
        ("lu_factor_tall", lambda a: torch.linalg.lu_factor(a).LU, args(lambda: crandn(4, 3))),
        ("lu_tall", lambda a: torch.linalg.lu(a)[1:], args(lambda: crandn(4, 3))),
        ("lu_solve", torch.linalg.lu_solve, args(lambda: crandn_lu(3, 3), lambda: crandn(3, 2))),
        ("lu_solve_adjoint_right",
         lambda lu, p, b: torch.linalg.lu_solve(lu, p, b, left=False, adjoint=True),
         args(lambda: crandn_lu(3, 3), lambda: crandn(2, 3))),
        ("lu_unpack_wide", lambda lu, p: torch.lu_unpack(lu, p)[1:], args(lambda: crandn_lu(3, 5))),
        ("svd_projectors", lambda a: _svd_projectors(a), args(lambda: crandn(4, 3))),
        ("svd_projectors_wide", lambda a: _svd_projectors(a), args(lambda: crandn(3, 4))),
        ("eigh_projectors", lambda a: _eigh_projectors(a), args(lambda: hpd(3))),
        ("pinv", torch.linalg.pinv, args(lambda: crandn(3, 4))),
        ("pinv_tall", torch.linalg.pinv, args(lambda: crandn(4, 3))),
        ("lstsq", lambda a, b: torch.linalg.lstsq(a, b).solution, args(lambda: crandn(5, 3), lambda: crandn(5, 2))),
        ("lstsq_residuals", lambda a, b: torch.linalg.lstsq(a, b, driver="gelsd")[:2],
         args(lambda: crandn(5, 3), lambda: crandn(5, 2))),
        ("det_batched", torch.linalg.det, args(lambda: torch.stack([cwell_conditioned(3), cwell_conditioned(3)]))),
    ]
]
COMPLEX = [cpu_reference_row(p, LSTSQ_CPU_DRIVERS) if p.id == "complex_lstsq_residuals" else p for p in COMPLEX] + [
    # Complex singular and eigenvectors as returned (PyTorch's gauge): their
    # phase-dependent outputs make torch.autograd's backward (the jvp over
    # vjp reference) refuse, so first order only.
    row("complex_svd", lambda a: torch.linalg.svd(a, full_matrices=False), args(lambda: crandn(4, 3)),
        over_reverse=False),
    row("complex_svd_full_matrices_wide", torch.linalg.svd, args(lambda: crandn(3, 4)), over_reverse=False),
    row("complex_eigh", torch.linalg.eigh, args(lambda: hpd(3)), over_reverse=False),
    row("complex_eig", torch.linalg.eig, args(lambda: crandn(3, 3)), over_reverse=False),
]


def _svd_projectors(a):
    U, S, Vh = torch.linalg.svd(a, full_matrices=False)
    return U @ U.mH, S, Vh.mH @ Vh


def _eigh_projectors(a):
    values, vectors = torch.linalg.eigh(a)
    return values, vectors * vectors.conj()  # |V|^2, phase invariant



def _mat1():
    """Fixed, generic operands, made in the test on its default device."""
    return torch.arange(1, 7, dtype=torch.float64).reshape(2, 3).cos()


def _mat2():
    return torch.arange(1, 13, dtype=torch.float64).reshape(3, 4).sin()


# Real rows beyond the VJP tests' (outputs their backward tests leave out).
EXTRA = [
    row("eig", torch.linalg.eig, args((3, 3)), over_reverse=False),  # complex eigenvectors: see complex_eig
    row("svd_full_matrices_wide", torch.linalg.svd, args((3, 4))),
    row("lu_factor_ex_wide", lambda a: torch.linalg.lu_factor_ex(a).LU, args((2, 3, 5))),
    row("slogdet_sign_and_logabsdet", lambda a: torch.linalg.slogdet(a), args((2, 3, 3))),
    row("linear_bias_only_differentiable", lambda b, x, w: F.linear(x, w, b), args((5,), (3, 4), (5, 4))),
    row("addmm_self_only", lambda s: torch.addmm(s, _mat1(), _mat2(), beta=2.0), args((4,))),
    row("lu_solve_tall_batch_B", lambda lu, p, b: torch.linalg.lu_solve(lu, p, b, adjoint=True),
        args(lambda: tuple(torch.linalg.lu_factor(well_conditioned(3))), (2, 3, 2))),
    row("householder_product_wide_k", lambda v, tau: torch.linalg.householder_product(v[:, :2], tau[:2]),
        args(lambda: geqrf(4, 3))),
]

# Rows whose reference is torch.autograd's backward (see the module docstring).
_BY_BACKWARD = ("triangular_solve", "cholesky_legacy", "cholesky_inverse", "ormqr")


def _hermitian_part(a):
    """Cholesky and eigh read one triangle, and torch.autograd differentiates
    them as functions of Hermitian matrices: forward_ad applies its formula to
    any tangent, backward returns the Hermitian part of the gradient.  On
    tangents of a Hermitian argument the two agree."""
    return (a + a.mH) / 2


def _by_backward(param):
    return any(name in param.id for name in _BY_BACKWARD) and "solve_triangular" not in param.id


FORWARD_AD_ROWS = [p for p in ALL_ROWS + COMPLEX + EXTRA if not _by_backward(p)]
BACKWARD_ROWS = [p for p in ALL_ROWS if _by_backward(p) and "cholesky_legacy" not in p.id] + [
    row("cholesky_legacy", lambda a: torch.cholesky(_hermitian_part(a)), args(lambda: spd(3))),
    row("cholesky_legacy_upper", lambda a: torch.cholesky(_hermitian_part(a), upper=True), args(lambda: spd(3, 2))),
    row("complex_ormqr_right_transpose", lambda v, t, c: torch.ormqr(v, t, c, left=False, transpose=True),
        args(lambda: tuple(torch.geqrf(crandn(4, 3))), lambda: crandn(2, 4))),
    row("complex_triangular_solve_transpose", lambda b, a: torch.triangular_solve(b, a, transpose=True),
        args(lambda: crandn(3, 2), lambda: cwell_conditioned(3))),
    row("ormqr_tangent_of_C_only", lambda c, v, t: torch.ormqr(v.detach(), t.detach(), c),
        args((4, 2), lambda: geqrf(4, 3))),
]


@pytest.mark.parametrize("fn, sample, options", FORWARD_AD_ROWS)
def test_forward_derivatives(fn, sample, options):
    check_forward_derivatives(fn, sample, **{k: v for k, v in options.items() if k != "second_order"})


@pytest.mark.parametrize("fn, sample, options", FORWARD_AD_ROWS)
def test_vmap_over_primals_and_tangents(fn, sample, options):
    """Rules on batched primals too (vmap(jvp), per-example Jacobians),
    against a loop of torch.autograd.forward_ad."""
    tolerances = {k: v for k, v in options.items() if k in ("rtol", "atol")}
    samples = [tuple(sample()) for _ in range(3)]
    positions, _ = split_args(samples[0])
    tangents = [tuple(torch.randn_like(example[i]) for i in positions) for example in samples]

    def tangent_of(*arguments_and_tangents):
        arguments = arguments_and_tangents[: len(samples[0])]
        return ours_jvp(fn, arguments, arguments_and_tangents[len(samples[0]) :])[1]

    with no_fallback():
        actual = torchxform.vmap(tangent_of)(*(torch.stack(c) for c in zip(*samples)),
                                             *(torch.stack(c) for c in zip(*tangents)))
    expected = [tree_flatten(reference_jvp(fn, x, t)[1])[0] for x, t in zip(samples, tangents)]
    for j, tangent in enumerate(tree_flatten(actual)[0]):
        if expected[0][j] is not None:
            assert_close(tangent, torch.stack([e[j] for e in expected]), msg="vmap of jvp", **tolerances)


# -- the backward-based reference --------------------------------------------------------------


def _real_view(x):
    return torch.view_as_real(x) if x.is_complex() else x


def _complex_view(x, like):
    return torch.view_as_complex(x) if like.is_complex() else x


def _realified(fn, like):
    """fn on real views of the (complex) arguments ``like``, with real views
    of its differentiable outputs: the function torch.autograd.functional
    differentiates."""

    def real_fn(*reals):
        outputs = tree_flatten(fn(*(_complex_view(r, x) for r, x in zip(reals, like))))[0]
        return tuple(_real_view(o) for o in outputs if o.is_floating_point() or o.is_complex())

    return real_fn


def _apply_jacobian(jacobian, inputs, tangents):
    """J t for each output, from torch.autograd.functional.jacobian's
    blocks (output.shape + input.shape), on real views."""

    def one(row):
        total = None
        for block, x, t in zip(row, inputs, tangents):
            out_shape = block.shape[: block.dim() - x.dim()]
            term = (block.reshape(out_shape.numel(), -1) @ _real_view(t).reshape(-1)).reshape(out_shape)
            total = term if total is None else total + term
        return total

    return tuple(one(row) for row in jacobian)


def _differentiable_outputs(out):
    return [o for o in tree_flatten(out)[0] if o.is_floating_point() or o.is_complex()]


def check_against_backward(fn, sample, batch_size=3):
    """jvp, vmap over jvp and jvp over vjp of ``fn``, each against
    torch.autograd's backward (reverse-mode Jacobians applied to tangents,
    on real views of complex values)."""
    arguments = tuple(sample())
    positions, merge = split_args(arguments)
    primals = tuple(arguments[i] for i in positions)
    reals = tuple(_real_view(p) for p in primals)
    tangents = [tuple(torch.randn_like(p) for p in primals) for _ in range(batch_size)]

    def diff_fn(*diff):
        return fn(*merge(diff))

    jacobian = torch.autograd.functional.jacobian(_realified(diff_fn, primals), reals)
    expected = [_apply_jacobian(jacobian, reals, t) for t in tangents]
    with no_fallback():
        _, actual = ours_jvp(fn, arguments, tangents[0])
        batched = torchxform.vmap(lambda *ts: ours_jvp(fn, arguments, ts)[1])(
            *(torch.stack(column) for column in zip(*tangents))
        )
    assert_close(tuple(_real_view(a) for a in _differentiable_outputs(actual)), expected[0], msg="jvp")
    assert_close(tuple(_real_view(b) for b in _differentiable_outputs(batched)),
                 tuple(torch.stack(column) for column in zip(*expected)), msg="vmap over jvp")

    # jvp over vjp: the tangent of x -> J(x)^H u, against the Jacobian of
    # torch.autograd.grad(create_graph=True).
    with torch.no_grad():
        cotangent = tuple(torch.randn_like(o) for o in _differentiable_outputs(diff_fn(*primals)))
    real_fn = _realified(diff_fn, primals)

    def pulled_reference(*reals):
        grads = torch.autograd.grad(real_fn(*reals), reals, tuple(_real_view(c) for c in cotangent),
                                    create_graph=True, allow_unused=True)
        return tuple(torch.zeros_like(r) if g is None else g for g, r in zip(grads, reals))

    def pulled(*diff):
        out, pullback = torchxform.vjp(diff_fn, *diff)
        flat, spec = tree_flatten(out)
        remaining = iter(cotangent)
        return pullback(spec.unflatten([next(remaining) if o.is_floating_point() or o.is_complex() else None
                                        for o in flat]))

    expected_second = _apply_jacobian(torch.autograd.functional.jacobian(pulled_reference, reals), reals, tangents[0])
    with no_fallback():
        _, second = torchxform.jvp(pulled, primals, tangents[0])
    assert_close(tuple(_real_view(s) for s in second), expected_second, msg="jvp of vjp")


@pytest.mark.parametrize("fn, sample, options", BACKWARD_ROWS)
def test_forward_derivatives_against_backward(fn, sample, options):
    check_against_backward(fn, sample)


# -- every op of the family has a JVP rule of its own ------------------------------------------

FAMILY = sorted((op for op, rule in VJP_RULES.items() if rule.__module__ == "torchxform.rules.linalg"), key=str)


def test_family_is_listed():
    assert len(FAMILY) >= 44 and aten.addmm_.default in FAMILY and aten.linalg_eig.default in FAMILY


@pytest.mark.parametrize("op", FAMILY, ids=str)
def test_jvp_rule_of_its_own(op):
    assert jvp_coverage(op) == "rule"


# -- jacfwd against torch.autograd.functional.jacobian ---------------------------------------------


def _mlp(w1, b1, w2, x):
    return F.linear(torch.tanh(F.linear(x, w1, b1)), w2)


JACFWD = [
    pytest.param(_mlp, lambda: (randn(4, 3), randn(4), randn(2, 4), randn(5, 3)), (0, 1, 2), id="mlp"),
    pytest.param(lambda s, a, b: torch.addmm(s, a, b, beta=0.5), lambda: (randn(4), randn(2, 3), randn(3, 4)),
                 (0, 1, 2), id="addmm"),
    pytest.param(torch.linalg.det, lambda: (randn(3, 3),), 0, id="det"),
    pytest.param(torch.linalg.solve, lambda: (well_conditioned(3), randn(3, 2)), (0, 1), id="solve"),
    pytest.param(torch.linalg.qr, lambda: (randn(4, 3),), 0, id="qr"),
    pytest.param(lambda a: torch.linalg.eigh(_hermitian_part(a)), lambda: (symmetric(3),), 0, id="eigh"),
    pytest.param(lambda a: torch.linalg.svd(a, full_matrices=False), lambda: (randn(3, 4),), 0, id="svd"),
    pytest.param(torch.linalg.matrix_exp, lambda: (0.5 * randn(3, 3),), 0, id="matrix_exp"),
    pytest.param(lambda a: torch.linalg.cholesky(_hermitian_part(a)), lambda: (spd(3),), 0, id="cholesky"),
]


@pytest.mark.parametrize("fn, sample, argnums", JACFWD)
def test_jacfwd(fn, sample, argnums):
    inputs = sample()
    with no_fallback():
        actual = torchxform.jacfwd(fn, argnums=argnums)(*inputs)
    expected = torch.autograd.functional.jacobian(fn, inputs)  # [output][input], or [input] for one output

    def chosen(per_input):
        return per_input[argnums] if isinstance(argnums, int) else tuple(per_input[i] for i in argnums)

    if isinstance(fn(*inputs), tuple):
        actual, expected = tuple(actual), tuple(chosen(e) for e in expected)
    else:
        expected = chosen(expected)
    assert_close(actual, expected, msg="jacfwd")


# -- forward over forward: rules recompute what carries no tangent (no reused LU) -----------------

HESSIANS = [
    pytest.param(torch.linalg.det, id="det"),
    pytest.param(lambda a: torch.linalg.slogdet(a).logabsdet, id="slogdet"),
    pytest.param(lambda a: torch.linalg.inv(a).sum(), id="inv"),
    pytest.param(lambda a: torch.linalg.solve(a, torch.ones(3, dtype=a.dtype)).sum(), id="solve"),
    pytest.param(lambda a: torch.linalg.lu_factor(a).LU.sum(), id="lu_factor"),
    pytest.param(lambda a: torch.linalg.cholesky(a @ a.mT).sum(), id="cholesky"),
    pytest.param(lambda a: torch.linalg.qr(a).Q[0].sum(), id="qr"),
    pytest.param(lambda a: torch.linalg.svdvals(a).square().sum(), id="svdvals"),
    pytest.param(lambda a: torch.linalg.matrix_exp(0.3 * a).sum(), id="matrix_exp"),
]


@pytest.mark.parametrize("outer", [torchxform.jacfwd, torchxform.jacrev], ids=["jacfwd", "jacrev"])
@pytest.mark.parametrize("fn", HESSIANS)
def test_hessian_through_jacfwd(fn, outer):
    """jacfwd(jacfwd(f)) and jacrev(jacfwd(f)): forward over forward, and
    reverse over (batched) forward."""
    a = well_conditioned(3)
    with no_fallback():
        actual = outer(torchxform.jacfwd(fn))(a)
    assert_close(actual, torch.autograd.functional.hessian(fn, a), rtol=1e-6, atol=1e-6, msg="hessian")


def test_matmul_vjp_of_a_matrix_against_a_batch():
    """vmap's rule for mm with a batched right operand issues [n,k] @ [B,k,m]
    as one matmul, which reaches reverse mode whole under grad(vmap(jvp)):
    its left cotangent sums g_B b_B^H over the batch."""
    a, b, g = randn(2, 3), randn(4, 3, 5), randn(4, 2, 5)
    grad_a, grad_b = VJP_RULES[aten.matmul.default](grad=g, self=a, other=b, needs=(True, True))
    leaves = a.clone().requires_grad_(), b.clone().requires_grad_()
    expected = torch.autograd.grad(torch.matmul(*leaves), leaves, g)
    assert_close((grad_a, grad_b), expected, msg="matmul vjp")
    x, tangents = randn(3, 3), randn(5, 3, 3)

    def batched_tangent_norm(lib, x):
        return lib.vmap(lambda t: lib.jvp(lambda x: torch.mm(x, x), (x,), (t,))[1])(tangents).square().sum()

    with no_fallback():
        actual = torchxform.grad(lambda x: batched_tangent_norm(torchxform, x))(x)
    assert_close(actual, torch.func.grad(lambda x: batched_tangent_norm(torch.func, x))(x), msg="grad of vmap of jvp")


def test_hessian_vector_product_of_mlp():
    """Forward over reverse, the way HVPs are computed: jvp(grad(loss))."""
    w1, b1, w2, x, y = randn(4, 3), randn(4), randn(2, 4), randn(5, 3), randn(5, 2)
    params, tangents = (w1, b1, w2), (randn(4, 3), randn(4), randn(2, 4))

    def loss(w1, b1, w2):
        return (_mlp(w1, b1, w2, x) - y).square().sum()

    with no_fallback():
        _, actual = torchxform.jvp(torchxform.grad(loss, argnums=(0, 1, 2)), params, tangents)
    _, expected = torch.autograd.functional.hvp(lambda *p: loss(*p), params, tangents)
    assert_close(actual, expected, msg="hvp")


# -- det at singular matrices: the tangent is tr(adj(A) dA) -----------------------------------------


@pytest.mark.parametrize(
    "make_a",
    [
        pytest.param(lambda: _tensor([[1.0, 2.0], [2.0, 4.0]]), id="rank1_2x2"),
        pytest.param(lambda: _tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]), id="rank2_3x3"),
        pytest.param(lambda: torch.zeros(3, 3, dtype=torch.float64), id="zeros"),
        pytest.param(lambda: torch.stack([_tensor([[1.0, 2.0], [2.0, 4.0]]), 3 * torch.eye(2, dtype=torch.float64)]),
                     id="batch_singular_and_regular"),
    ],
)
def test_det_jvp_at_singular_matrices(make_a):
    """torch.autograd.forward_ad gives nan at exactly singular matrices; the
    derivative is tr(adj(A) dA), with adj(A)^T the gradient that
    torch.autograd computes with create_graph=True."""
    a = make_a()
    leaf = a.clone().requires_grad_()
    (adjugate_t,) = torch.autograd.grad(torch.linalg.det(leaf).sum(), leaf, create_graph=True)
    tangents = torch.randn((2, *a.shape), dtype=a.dtype)
    expected = (adjugate_t.detach() * tangents).sum((-2, -1))
    with no_fallback():
        _, actual = torchxform.jvp(torch.linalg.det, (a,), (tangents[0],))
        batched = torchxform.vmap(lambda t: torchxform.jvp(torch.linalg.det, (a,), (t,))[1])(tangents)
    assert_close(actual, expected[0], rtol=1e-6, atol=1e-6, msg="det jvp at a singular matrix")
    assert_close(batched, expected, rtol=1e-6, atol=1e-6, msg="vmap over jvp")


# -- beta = 0 ignores self, tangent included ---------------------------------------------------------

ADD_PRODUCTS = [
    pytest.param(torch.addmm, torch.mm, ((2, 4), (2, 3), (3, 4)), id="addmm"),
    pytest.param(torch.addmv, torch.mv, ((2,), (2, 3), (3,)), id="addmv"),
    pytest.param(torch.baddbmm, torch.bmm, ((2, 2, 4), (2, 2, 3), (2, 3, 4)), id="baddbmm"),
    pytest.param(torch.addbmm, lambda a, b: torch.bmm(a, b).sum(0), ((2, 4), (3, 2, 5), (3, 5, 4)), id="addbmm"),
    pytest.param(torch.addr, torch.outer, ((3, 4), (3,), (4,)), id="addr"),
]


@pytest.mark.parametrize("op, product, shapes", ADD_PRODUCTS)
@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
def test_add_product_beta0_ignores_self_tangent(op, product, shapes, inplace):
    self, a, b = (randn(*s) for s in shapes)
    nan = torch.full_like(self, float("nan"))
    ta, tb = torch.randn_like(a), torch.randn_like(b)

    def fn(s, a, b):
        if inplace:
            return getattr(s.clone(), op.__name__ + "_")(a, b, beta=0, alpha=2)
        return op(s, a, b, beta=0, alpha=2)

    with no_fallback():
        out, tangent = torchxform.jvp(fn, (nan, a, b), (nan, ta, tb))
    assert_close(out, 2 * product(a, b), msg="output")
    assert_close(tangent, 2 * (product(ta, b) + product(a, tb)), msg="tangent")


# -- errors ---------------------------------------------------------------------------------------------


def test_qr_mode_r_is_not_differentiable():
    a = randn(3, 3)
    with pytest.raises(RuntimeError, match="mode='r'"):
        torchxform.jvp(lambda a: torch.linalg.qr(a, mode="r").R, (a,), (a,))


def test_decompositions_without_vectors_raise():
    a = randn(3, 3)
    with pytest.raises(RuntimeError, match="compute_uv=False"):
        torchxform.jvp(lambda a: aten._linalg_svd.default(a, False, False)[1], (a,), (a,))
    with pytest.raises(RuntimeError, match="compute_v=False"):
        torchxform.jvp(lambda a: aten._linalg_eigh.default(a, "L", False)[0], (a,), (a,))
