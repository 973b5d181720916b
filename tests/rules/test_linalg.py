"""Batching rules of matrix products and linear algebra against a Python loop."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import torchxform
from tests.harness import check_vmap, check_vmap_sampled, cpu_reference, no_fallback, skip_cpu_reference_rows
from tests.rules.test_linalg_vjp import LSTSQ_CPU_DRIVERS

DTYPES = [torch.float32, torch.float64]

# The legacy APIs are tested on purpose.
pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.chain_matmul is deprecated",
    "ignore:torch.cholesky is deprecated",
    "ignore:torch.triangular_solve is deprecated",
)


# -- input domains ------------------------------------------------------------


def _randn(*shape, dtype=torch.float64):
    return torch.randn(shape, dtype=dtype)


def _well_conditioned(n, dtype, *batch):
    return _randn(*batch, n, n, dtype=dtype) + n * torch.eye(n, dtype=dtype)


def _spd(n, dtype, *batch):
    a = _randn(*batch, n, n, dtype=dtype)
    return a @ a.mT + n * torch.eye(n, dtype=dtype)


def _shapes(*shapes):
    """A sampler of independent standard normal tensors of ``shapes``."""
    return lambda dtype: lambda: tuple(_randn(*s, dtype=dtype) for s in shapes)


def _with_nan_self(shapes):
    """Like _shapes, with a NaN ``self`` (beta=0 must ignore it)."""
    def sampler(dtype):
        def sample():
            args = _shapes(*shapes)(dtype)()
            return (torch.full_like(args[0], float("nan")),) + args[1:]
        return sample
    return sampler


# -- products -------------------------------------------------------------------

PRODUCTS = [
    ("mm", torch.mm, _shapes((2, 3), (3, 4))),
    ("mm_size1", torch.mm, _shapes((1, 3), (3, 1))),
    ("bmm", torch.bmm, _shapes((2, 2, 3), (2, 3, 4))),
    ("mv", torch.mv, _shapes((2, 3), (3,))),
    ("dot", torch.dot, _shapes((3,), (3,))),
    ("vdot", torch.vdot, _shapes((3,), (3,))),
    ("matmul_1x1", torch.matmul, _shapes((3,), (3,))),
    ("matmul_2x1", torch.matmul, _shapes((2, 3), (3,))),
    ("matmul_1x2", torch.matmul, _shapes((3,), (3, 4))),
    ("matmul_3x2", torch.matmul, _shapes((2, 2, 3), (3, 4))),
    ("matmul_2x3", torch.matmul, _shapes((2, 3), (2, 3, 4))),
    ("matmul_3x1", torch.matmul, _shapes((2, 2, 3), (3,))),
    ("matmul_1x3", torch.matmul, _shapes((3,), (2, 3, 4))),
    ("matmul_broadcast", torch.matmul, _shapes((2, 1, 2, 3), (4, 3, 2))),
    ("matmul_4x2", torch.matmul, _shapes((2, 2, 2, 3), (3, 4))),
    ("matmul_2x4", torch.matmul, _shapes((2, 3), (2, 2, 3, 4))),
    ("matmul_3x3", torch.matmul, _shapes((2, 2, 3), (2, 3, 4))),
    ("linear", F.linear, _shapes((2, 3), (4, 3), (4,))),
    ("linear_1d_input", F.linear, _shapes((3,), (4, 3), (4,))),
    ("linear_3d_input", F.linear, _shapes((2, 2, 3), (4, 3), (4,))),
    ("linear_no_bias", F.linear, _shapes((2, 3), (4, 3))),
    ("linear_vector_weight", F.linear, _shapes((2, 3), (3,))),
    ("addmm", lambda s, a, b: torch.addmm(s, a, b, beta=0.5, alpha=2.0), _shapes((4,), (2, 3), (3, 4))),
    ("addmm_full_self", torch.addmm, _shapes((2, 4), (2, 3), (3, 4))),
    ("addmm_column_self", lambda s, a, b: torch.addmm(s, a, b, alpha=-1), _shapes((2, 1), (2, 3), (3, 4))),
    ("addmm_0d_self", torch.addmm, _shapes((), (2, 3), (3, 4))),
    ("addmm_beta0", lambda s, a, b: torch.addmm(s, a, b, beta=0), _with_nan_self(((2, 4), (2, 3), (3, 4)))),
    ("addmv", lambda s, a, b: torch.addmv(s, a, b, beta=2, alpha=0.5), _shapes((2,), (2, 3), (3,))),
    ("addmv_0d_self", torch.addmv, _shapes((), (2, 3), (3,))),
    ("addr", lambda s, a, b: torch.addr(s, a, b, beta=0.5, alpha=2), _shapes((2, 4), (2,), (4,))),
    ("addr_row_self", torch.addr, _shapes((4,), (2,), (4,))),
    ("addr_beta0", lambda s, a, b: torch.addr(s, a, b, beta=0), _with_nan_self(((2, 1), (2,), (4,)))),
    ("baddbmm", lambda s, a, b: torch.baddbmm(s, a, b, beta=0.5, alpha=2), _shapes((2, 2, 4), (2, 2, 3), (2, 3, 4))),
    ("baddbmm_row_self", torch.baddbmm, _shapes((4,), (2, 2, 3), (2, 3, 4))),
    ("baddbmm_column_self", torch.baddbmm, _shapes((2, 1), (2, 2, 3), (2, 3, 4))),
    ("addbmm", lambda s, a, b: torch.addbmm(s, a, b, beta=0.5, alpha=2), _shapes((2, 4), (3, 2, 3), (3, 3, 4))),
    ("einsum", lambda a, b: torch.einsum("ij,jk->ik", a, b), _shapes((2, 3), (3, 4))),
    ("einsum_batched", lambda a, b: torch.einsum("bij,bkj->bik", a, b), _shapes((2, 2, 3), (2, 4, 3))),
    ("einsum_trace", lambda a: torch.einsum("ii", a), _shapes((3, 3))),
    ("einsum_outer", lambda a, b: torch.einsum("bi,bj->bij", a, b), _shapes((2, 3), (2, 4))),
    ("einsum_three", lambda a, b, c: torch.einsum("ij,jk,kl->il", a, b, c), _shapes((2, 3), (3, 4), (4, 2))),
    ("outer", torch.outer, _shapes((3,), (4,))),
    ("inner", torch.inner, _shapes((2, 3), (4, 3))),
    ("tensordot", lambda a, b: torch.tensordot(a, b, dims=([1, 2], [0, 1])), _shapes((2, 3, 4), (3, 4, 2))),
    ("kron", torch.kron, _shapes((2, 3), (2, 2))),
    ("chain_matmul", torch.chain_matmul, _shapes((2, 3), (3, 4), (4, 2))),
    ("multi_dot", lambda a, b, c: torch.linalg.multi_dot([a, b, c]), _shapes((3,), (3, 4), (4,))),
    ("vecdot", torch.linalg.vecdot, _shapes((2, 3), (2, 3))),
    ("bilinear", F.bilinear, _shapes((2, 3), (2, 4), (5, 3, 4), (5,))),
    ("matrix_power", lambda a: torch.linalg.matrix_power(a, 3), _shapes((3, 3))),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,fn,sampler", PRODUCTS, ids=[p[0] for p in PRODUCTS])
def test_products(name, fn, sampler, dtype):
    with no_fallback():
        check_vmap_sampled(fn, sampler(dtype))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("fn", [torch.vdot, torch.dot, torch.mv, torch.matmul], ids=lambda f: f.__name__)
def test_complex_products(fn, dtype):
    shapes = ((2, 3), (3,)) if fn is torch.mv else ((3,), (3,))
    with no_fallback():
        check_vmap_sampled(fn, _shapes(*shapes)(dtype))


@cpu_reference("CUDA has no integer matrix products (\"addmm_cuda\" not implemented for 'Long')")
def test_integer_products():
    # Integer alpha/beta semantics are the kernels' own (floats truncate).
    s, a, b = (torch.randint(-3, 4, shape) for shape in [(3, 2, 4), (3, 2, 3), (3, 4)])
    with no_fallback():
        check_vmap(torch.mm, a, b, in_dims=(0, None))
        check_vmap(lambda s, a, b: torch.addmm(s, a, b, beta=2, alpha=0.5), s, a, b, in_dims=(0, 0, None))
        check_vmap(lambda s, a, b: torch.addmm(s, a, b, beta=3), s[0], a, b, in_dims=(None, 0, None))
        check_vmap(torch.dot, a[:, 0], b[:, :3], in_dims=(0, 0))
        bools = torch.rand(3, 2) > 0.5
        check_vmap(lambda x, y: torch.addr(x[:, None] & y, x, y, beta=False), bools, bools[:, :1], in_dims=0)
        check_vmap(lambda x, y: torch.addr(x, y, y, beta=2, alpha=-1), s[:, :, :2].float(), a[:, :, 0], in_dims=0)


def test_matmul_and_linear_reaching_whole():
    """CompositeImplicit matmul/linear reach the interpreter whole below
    autograd (as they do from other rules): their own rules run."""

    def below_autograd(fn):
        def wrapped(*args):
            with torch._C._AutoDispatchBelowAutograd():
                return fn(*args)

        return wrapped

    cases = [
        (torch.matmul, ((3,), (3,))),
        (torch.matmul, ((2, 3), (3,))),
        (torch.matmul, ((3,), (3, 4))),
        (torch.matmul, ((2, 3), (3, 4))),
        (torch.matmul, ((2, 1, 2, 3), (4, 3, 2))),
        (torch.matmul, ((3,), (2, 3, 4))),
        (torch.matmul, ((2, 2, 3), (3,))),
        (F.linear, ((2, 3), (4, 3), (4,))),
        (F.linear, ((3,), (4, 3), (4,))),
        (F.linear, ((2, 2, 3), (4, 3))),
        (F.linear, ((2, 3), (3,))),
    ]
    with no_fallback():
        for fn, shapes in cases:
            check_vmap_sampled(below_autograd(fn), _shapes(*shapes)(torch.float64), msg=f"{fn.__name__}{shapes}")


INPLACE = [
    ("addmm_", lambda s, a, b: s.addmm_(a, b, beta=0.5, alpha=2), ((2, 4), (2, 3), (3, 4))),
    ("addmv_", lambda s, a, b: s.addmv_(a, b, alpha=2), ((2,), (2, 3), (3,))),
    ("addr_", lambda s, a, b: s.addr_(a, b, beta=0.5), ((2, 4), (2,), (4,))),
    ("baddbmm_", lambda s, a, b: s.baddbmm_(a, b, beta=0.5), ((2, 2, 4), (2, 2, 3), (2, 3, 4))),
    ("addbmm_", lambda s, a, b: s.addbmm_(a, b, alpha=2), ((2, 4), (3, 2, 3), (3, 3, 4))),
]


@pytest.mark.parametrize("name,fn,shapes", INPLACE, ids=[i[0] for i in INPLACE])
def test_inplace_products(name, fn, shapes):
    def cloned(s, *args):
        out = s.clone()
        assert fn(out, *args) is out
        return out

    samples = [_shapes(*shapes)(torch.float64)() for _ in range(3)]
    with no_fallback():
        for dims in itertools.product((0, -1), (0, -1, None), (0, -1, None)):
            args = [samples[0][i] if d is None else torch.stack([x[i] for x in samples], d) for i, d in enumerate(dims)]
            check_vmap(cloned, *args, in_dims=dims, msg=f"{name} in_dims={dims}")
        nested = [torch.stack([torch.stack([x[i] for x in samples])] * 2) for i in range(3)]
        expected = torch.stack([torch.stack([cloned(*(n[o][j] for n in nested)) for j in range(3)]) for o in range(2)])
        actual = torchxform.vmap(torchxform.vmap(cloned))(*nested)
        torch.testing.assert_close(actual, expected)


# -- linear algebra -------------------------------------------------------------


def _n(*shape):
    """A maker ``dtype -> tensor`` of standard normal entries."""
    return lambda dtype: _randn(*shape, dtype=dtype)


def _domain(*makers):
    """A sampler from makers ``dtype -> tensor``."""
    return lambda dtype: lambda: tuple(make(dtype) for make in makers)


def _factored(factor, make, *rest):
    """A sampler of the outputs of ``factor`` on ``make(dtype)``, then
    standard normal tensors of the ``rest`` shapes."""
    return lambda dtype: lambda: (*factor(make(dtype)), *(_randn(*s, dtype=dtype) for s in rest))


WC = lambda dtype: _well_conditioned(3, dtype)  # noqa: E731
WC_STACK = lambda dtype: _well_conditioned(3, dtype, 2)  # noqa: E731
SPD = lambda dtype: _spd(3, dtype)  # noqa: E731
UPPER = lambda dtype: _well_conditioned(3, dtype).triu()  # noqa: E731
LOWER = lambda dtype: _well_conditioned(3, dtype).tril()  # noqa: E731
CHOL = lambda dtype: torch.linalg.cholesky(_spd(3, dtype))  # noqa: E731


LINALG = [
    ("inv", torch.linalg.inv, _domain(WC)),
    ("inv_ex", torch.linalg.inv_ex, _domain(WC)),
    ("inverse_stack", torch.inverse, _domain(WC_STACK)),
    ("det", torch.linalg.det, _domain(WC)),
    ("det_stack", torch.det, _domain(WC_STACK)),
    ("slogdet", torch.linalg.slogdet, _domain(_n(3, 3))),
    ("logdet", torch.logdet, _domain(SPD)),
    ("cholesky", torch.linalg.cholesky, _domain(SPD)),
    ("cholesky_upper", lambda a: torch.linalg.cholesky(a, upper=True), _domain(SPD)),
    ("cholesky_ex", torch.linalg.cholesky_ex, _domain(SPD)),
    ("cholesky_legacy", torch.cholesky, _domain(SPD)),
    ("cholesky_inverse", torch.cholesky_inverse, _domain(CHOL)),
    ("cholesky_solve", torch.cholesky_solve, _domain(_n(3, 2), CHOL)),
    ("cholesky_solve_broadcast", lambda b, u: torch.cholesky_solve(b, u, upper=True),
     _domain(_n(2, 3, 2), lambda d: CHOL(d).mT)),
    ("lu_factor", torch.linalg.lu_factor, _domain(WC)),
    ("lu_factor_ex", torch.linalg.lu_factor_ex, _domain(WC)),
    ("lu", torch.linalg.lu, _domain(_n(3, 4))),
    ("lu_solve", torch.linalg.lu_solve, _factored(torch.linalg.lu_factor, WC, (3, 2))),
    ("lu_solve_right_adjoint", lambda LU, p, B: torch.linalg.lu_solve(LU, p, B, left=False, adjoint=True),
     _factored(torch.linalg.lu_factor, WC, (2, 3))),
    ("lu_unpack", torch.lu_unpack, _factored(torch.linalg.lu_factor, _n(3, 3))),
    ("lu_unpack_no_data", lambda LU, p: torch.lu_unpack(LU, p, unpack_data=False), _factored(torch.linalg.lu_factor, _n(3, 3))),
    ("svd", lambda a: torch.linalg.svd(a, full_matrices=False), _domain(_n(3, 4))),
    ("svd_full", torch.linalg.svd, _domain(_n(4, 3))),
    ("svdvals", torch.linalg.svdvals, _domain(_n(3, 4))),
    ("eigh", torch.linalg.eigh, _domain(SPD)),
    ("eigvalsh_upper", lambda a: torch.linalg.eigvalsh(a, UPLO="U"), _domain(SPD)),
    ("eig", torch.linalg.eig, _domain(SPD)),
    ("eigvals", torch.linalg.eigvals, _domain(SPD)),
    ("qr", torch.linalg.qr, _domain(_n(4, 3))),
    ("qr_complete", lambda a: torch.linalg.qr(a, mode="complete"), _domain(_n(4, 3))),
    ("qr_r", lambda a: torch.linalg.qr(a, mode="r"), _domain(_n(3, 4))),
    ("geqrf", torch.geqrf, _domain(_n(4, 3))),
    ("householder_product", torch.linalg.householder_product, _factored(torch.geqrf, _n(4, 3))),
    ("ormqr", lambda a, tau, c: torch.ormqr(a, tau, c, transpose=True), _factored(torch.geqrf, _n(3, 3), (3, 2))),
    ("ormqr_right", lambda a, tau, c: torch.ormqr(a, tau, c, left=False), _factored(torch.geqrf, _n(3, 3), (2, 3))),
    ("matrix_exp", torch.linalg.matrix_exp, _domain(_n(3, 3))),
    ("solve", torch.linalg.solve, _domain(WC, _n(3, 2))),
    ("solve_vector", torch.linalg.solve, _domain(WC, _n(3))),
    ("solve_stack_of_vectors", torch.linalg.solve, _domain(WC_STACK, _n(2, 3))),
    ("solve_broadcast_b", torch.linalg.solve, _domain(WC, _n(2, 3, 2))),
    ("solve_broadcast_vector", torch.linalg.solve, _domain(WC_STACK, _n(3))),
    ("solve_right", lambda a, b: torch.linalg.solve(a, b, left=False), _domain(WC, _n(2, 3))),
    ("solve_ex", torch.linalg.solve_ex, _domain(WC, _n(3, 2))),
    ("solve_triangular", lambda a, b: torch.linalg.solve_triangular(a, b, upper=True), _domain(UPPER, _n(3, 2))),
    ("solve_triangular_right_unit", lambda a, b: torch.linalg.solve_triangular(a, b, upper=False, left=False, unitriangular=True),
     _domain(LOWER, _n(2, 3))),
    ("solve_triangular_broadcast", lambda a, b: torch.linalg.solve_triangular(a, b, upper=True),
     _domain(UPPER, _n(2, 3, 2))),
    ("triangular_solve", lambda b, a: torch.triangular_solve(b, a, upper=False, transpose=True),
     _domain(_n(3, 2), LOWER)),
    ("ldl_factor", lambda a: torch.linalg.ldl_factor_ex(a, hermitian=True), _domain(SPD)),
    ("ldl_solve", torch.linalg.ldl_solve, _factored(torch.linalg.ldl_factor, SPD, (3, 2))),
    ("ldl_solve_broadcast", torch.linalg.ldl_solve, _factored(torch.linalg.ldl_factor, SPD, (2, 3, 2))),
    ("lstsq", lambda a, b: torch.linalg.lstsq(a, b), _domain(_n(4, 3), _n(4, 2))),
    ("lstsq_gelsd", lambda a, b: torch.linalg.lstsq(a, b, driver="gelsd"), _domain(_n(4, 3), _n(4, 2))),
    ("lstsq_vector_gelsd", lambda a, b: torch.linalg.lstsq(a, b, driver="gelss"), _domain(_n(4, 3), _n(4))),
    ("lstsq_broadcast", lambda a, b: torch.linalg.lstsq(a, b).solution, _domain(_n(1, 4, 3), _n(2, 4, 2))),
    ("pinv", torch.linalg.pinv, _domain(_n(3, 4))),
    ("pinv_hermitian_atol", lambda a: torch.linalg.pinv(a, atol=0.5, hermitian=True), _domain(SPD)),
    ("matrix_rank", torch.linalg.matrix_rank, _domain(_n(3, 4))),
    ("cond", torch.linalg.cond, _domain(WC)),
    ("matrix_norm_nuc", lambda a: torch.linalg.matrix_norm(a, "nuc"), _domain(_n(3, 4))),
    ("matrix_power_0", lambda a: torch.linalg.matrix_power(a, 0), _domain(_n(3, 3))),
    ("matrix_power_neg", lambda a: torch.linalg.matrix_power(a, -2), _domain(WC)),
    ("tensorinv", lambda a: torch.linalg.tensorinv(a.reshape(4, 2, 2), ind=1),
     _domain(lambda d: _well_conditioned(4, d))),
    ("tensorsolve", torch.linalg.tensorsolve, _domain(lambda d: _well_conditioned(6, d).reshape(2, 3, 6), _n(2, 3))),
    ("cross", torch.linalg.cross, _domain(_n(2, 3), _n(2, 3))),
    ("cross_dim0", lambda a, b: torch.linalg.cross(a, b, dim=0), _domain(_n(3, 2), _n(3, 2))),
    ("cross_broadcast", torch.linalg.cross, _domain(_n(1, 3), _n(2, 3))),
    ("cross_legacy", lambda a, b: torch.cross(a, b, dim=1), _domain(_n(2, 3), _n(2, 3))),
    ("diag_embed", torch.diag_embed, _domain(_n(2, 3))),
    ("diag_embed_offset_dims", lambda x: torch.diag_embed(x, offset=1, dim1=0, dim2=2), _domain(_n(2, 3))),
    ("diag_embed_negative", lambda x: torch.diag_embed(x, offset=-1, dim1=-1, dim2=0), _domain(_n(3))),
    ("trace", torch.trace, _domain(_n(3, 4))),
    ("diag_of_vector", torch.diag, _domain(_n(3))),
    ("diag_of_vector_offset", lambda x: torch.diag(x, -1), _domain(_n(3))),
    ("diag_of_matrix", lambda x: torch.diag(x, 1), _domain(_n(3, 4))),
    ("diagflat", torch.diagflat, _domain(_n(2, 2))),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,fn,sampler", LINALG, ids=[row[0] for row in LINALG])
def test_linalg(name, fn, sampler, dtype):
    skip_cpu_reference_rows(name, {"lstsq_gelsd": LSTSQ_CPU_DRIVERS, "lstsq_vector_gelsd": LSTSQ_CPU_DRIVERS})
    # float32 factorizations differ from a per-example call in the last bits
    tol = dict(rtol=1e-4, atol=1e-4) if dtype is torch.float32 else {}
    with no_fallback():
        check_vmap_sampled(fn, sampler(dtype), **tol)


@pytest.mark.parametrize(
    "fn", [torch.linalg.inv, torch.linalg.det, torch.linalg.eigvals, torch.linalg.svdvals], ids=lambda f: f.__name__
)
def test_complex_linalg(fn):
    with no_fallback():
        check_vmap_sampled(fn, lambda: (_well_conditioned(3, torch.complex128),))


def test_trace_integers():
    x = torch.randint(-5, 5, (4, 3, 3), dtype=torch.int32)
    with no_fallback():
        assert check_vmap(torch.trace, x).dtype == torch.int64


def test_solve_vector_case_is_decided_logically():
    # With batch size == n, physical shapes would be ambiguous.
    n = 3
    A, B = _well_conditioned(n, torch.float64, n), _randn(n, n)
    with no_fallback():
        check_vmap(torch.linalg.solve, A[0], B, in_dims=(None, 0))  # each B is a vector
        check_vmap(torch.linalg.solve, A, B, in_dims=(0, None))  # B is one n x n matrix
        check_vmap(torch.linalg.solve, A, B, in_dims=(0, 0))
        check_vmap(lambda a, b: torch.linalg.lstsq(a, b).solution, A, B, in_dims=(0, None))
        check_vmap(lambda a, b: torch.linalg.lstsq(a, b).solution, A[0], B, in_dims=(None, 0))


# -- efficiency: one kernel, the batch folded ------------------------------------


class _Log(TorchDispatchMode):
    """Records the plain ATen ops that rules issue."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # log what it decomposes into too
                return func.decompose(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))

    @property
    def names(self):
        return [op.__name__.split(".")[0] for op, _ in self.calls]


FOLDED = [
    ("mm_left", torch.mm, [(4, 2, 3), (3, 5)], (0, None), "mm"),
    ("mm_left_bdim1", torch.mm, [(2, 4, 3), (3, 5)], (1, None), "mm"),
    ("mm_right_bdim1", torch.mm, [(2, 3), (3, 4, 5)], (None, 1), "mm"),
    ("mm_right_last", torch.mm, [(2, 3), (3, 5, 4)], (None, -1), "mm"),
    ("mm_right_front", torch.mm, [(2, 3), (4, 3, 5)], (None, 0), "bmm"),  # broadcast, no copy
    ("mv_vector", torch.mv, [(2, 3), (4, 3)], (None, 0), "mm"),
    ("linear", F.linear, [(4, 2, 3), (5, 3), (5,)], (0, None, None), "addmm"),
    ("bmm_left", torch.bmm, [(2, 4, 2, 3), (2, 3, 5)], (1, None), "bmm"),
    ("addmv_vector", torch.addmv, [(2,), (2, 3), (4, 3)], (None, None, 0), "addmm"),
    ("baddbmm_left", torch.baddbmm, [(5,), (2, 4, 2, 3), (2, 3, 5)], (None, 1, None), "baddbmm"),
]


@pytest.mark.parametrize("name,fn,shapes,in_dims,kernel", FOLDED, ids=[f[0] for f in FOLDED])
def test_one_kernel_without_broadcast_copies(name, fn, shapes, in_dims, kernel):
    """NOTE [Folding the batch into a matmul]: the batch joins the rows or
    columns of one matmul; the unbatched operand is neither expanded nor copied."""
    args = [_randn(*s) for s in shapes]
    with no_fallback():
        check_vmap(fn, *args, in_dims=in_dims)
        with _Log() as log:
            torchxform.vmap(fn, in_dims)(*args)
    kernels = [n for n in log.names if n in ("mm", "bmm", "addmm", "baddbmm", "mv", "clone", "copy_", "contiguous")]
    assert kernels == [kernel], log.names


def test_solve_factorizes_unbatched_a_once():
    A, B = _well_conditioned(3, torch.float64), _randn(4, 3, 2)
    with no_fallback():
        check_vmap(torch.linalg.solve_ex, A, B, in_dims=(None, 0))
        with _Log() as log:
            torchxform.vmap(torch.linalg.solve_ex, (None, 0))(A, B)
    (shape,) = [args[0].shape for op, args in log.calls if op is torch.ops.aten._linalg_solve_ex.default]
    assert shape == (3, 3)


# -- errors: as eager raises them for one example --------------------------------

ERRORS = [
    ("mm_vector", torch.mm, [(4, 3), (3, 2)], (0, None)),
    ("mm_sizes", torch.mm, [(4, 2, 3), (4, 2)], (0, None)),
    ("mm_sizes_right", torch.mm, [(2, 3), (4, 2, 2)], (None, 0)),
    ("bmm_matrix", torch.bmm, [(4, 2, 3), (4, 3, 2)], (0, 0)),
    ("bmm_batch_mismatch", torch.bmm, [(4, 1, 2, 3), (4, 2, 3, 2)], (0, 0)),
    ("mv_rank", torch.mv, [(4, 3), (3,)], (0, None)),
    ("dot_matrix", torch.dot, [(4, 3, 3), (3,)], (0, None)),
    ("dot_sizes", torch.dot, [(4, 3), (2,)], (0, None)),
    ("matmul_0d", torch.matmul, [(4,), (3,)], (0, None)),
    ("linear_0d", F.linear, [(4,), (2, 3)], (0, None)),
    ("addmm_3d_self", torch.addmm, [(2, 2, 4), (4, 2, 3), (3, 4)], (None, 0, None)),
    ("addmm_self_shape", torch.addmm, [(3, 4), (4, 2, 3), (3, 4)], (None, 0, None)),
    ("addmm_inplace_broadcast", lambda s, a, b: s.clone().addmm_(a, b), [(4, 4), (4, 2, 3), (3, 4)], (0, 0, None)),
    ("baddbmm_batch_mismatch", torch.baddbmm, [(4,), (4, 2, 2, 3), (3, 3, 4)], (None, 0, None)),
    ("addbmm_batch_mismatch", torch.addbmm, [(4,), (4, 2, 2, 3), (3, 3, 4)], (None, 0, None)),
    ("addr_float_alpha_int", lambda s, a, b: torch.addr(s, a, b, alpha=0.5), [(2, 4), (4, 2), (4,)], (None, 0, None)),
    ("addr_bool_beta", lambda s, a, b: torch.addr(s, a, b, beta=True), [(2, 4), (4, 2), (4,)], (None, 0, None)),
    ("inv_vector", torch.linalg.inv, [(4, 3)], (0,)),
    ("inv_not_square", torch.linalg.inv, [(4, 3, 2)], (0,)),
    ("solve_0d_b", torch.linalg.solve, [(4, 3, 3), (4,)], (0, 0)),
    ("solve_sizes", torch.linalg.solve, [(4, 3, 3), (2, 2)], (0, None)),
    ("cholesky_solve_vector", torch.cholesky_solve, [(4, 3), (3, 3)], (0, None)),
    ("householder_tau_rank", torch.linalg.householder_product, [(4, 3, 3), (1, 3)], (0, None)),
    ("lu_solve_pivots", lambda LU, p, B: torch.linalg.lu_solve(LU, p.int(), B), [(4, 3, 3), (1, 3), (3, 2)],
     (0, None, None)),
    ("lstsq_ranks", torch.linalg.lstsq, [(4, 3), (3, 2)], (0, None)),
    ("cross_ranks", torch.linalg.cross, [(4, 3), (2, 3)], (0, None)),
    ("cross_size", torch.linalg.cross, [(4, 2), (4, 2)], (0, 0)),
    ("cross_dim", lambda a, b: torch.linalg.cross(a, b, dim=2), [(4, 3), (4, 3)], (0, 0)),
    ("trace_vector", torch.trace, [(4, 3)], (0,)),
    ("trace_bool", lambda x: torch.trace(x > 0), [(4, 3, 3)], (0,)),
    ("diag_embed_0d", torch.diag_embed, [(4,)], (0,)),
    ("diag_embed_same_dims", lambda x: torch.diag_embed(x, dim1=1, dim2=-1), [(4, 3)], (0,)),
    ("trilinear_dims", lambda a, b, w: F.bilinear(a, b, w), [(4, 2, 3), (2, 4), (5, 3, 3)], (0, None, None)),
]


@pytest.mark.parametrize("name,fn,shapes,in_dims", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_as_eager(name, fn, shapes, in_dims):
    """See NOTE [Errors as eager raises them]."""
    reasons = {"trace_bool": "eager torch.trace raises for a bool matrix on CPU only: no error to match"}
    skip_cpu_reference_rows(name, reasons)
    dtype = torch.int64 if name.startswith("addr") else torch.float64
    args = [torch.randn(s).to(dtype) for s in shapes]
    example = [a.select(d, 0) if d is not None else a for a, d in zip(args, in_dims)]
    with pytest.raises(Exception) as eager:
        fn(*example)
    with no_fallback(), pytest.raises(type(eager.value)) as batched:
        torchxform.vmap(fn, in_dims)(*args)
    assert str(batched.value) == str(eager.value)


def test_check_errors_names_the_batch_element():
    """A batched info is checked as a batch (is_matrix=False), so the error
    names the failing element, as torch.func's does."""
    A = _spd(3, torch.float64, 4)
    A[2] = 0
    with no_fallback():
        for fn in (torch.linalg.inv, torch.linalg.cholesky, lambda a: torch.linalg.solve(a, a[0])):
            with pytest.raises(RuntimeError, match=r"\(Batch element 2\)"):
                torchxform.vmap(fn)(A)
        check_vmap(torch.linalg.inv, A[:2])  # no error: nothing to report


def test_conjugate_view_inputs():
    """Batched lazy conj()/neg views reach kernels that rely on the Conjugate
    and Negative fallbacks (mv, mm, solve)."""
    a, v = _well_conditioned(3, torch.complex128, 4), _randn(4, 3).to(torch.complex128)
    with no_fallback():
        check_vmap(lambda a, v: torch.mv(a.conj(), v), a, v[0], in_dims=(0, None))
        check_vmap(lambda a, v: torch.mv(a, v.conj()), a[0], v, in_dims=(None, 0))
        check_vmap(lambda a, v: torch.vdot(v.conj(), v), a, v, in_dims=(None, 0))
        check_vmap(lambda a, v: torch.linalg.solve(a.conj(), v), a, v, in_dims=(0, 0))
        check_vmap(lambda a, v: torch.mm(a.mH, a), a, v, in_dims=(0, None))
