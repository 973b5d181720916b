"""Derivatives of matrix products and linear algebra: vjp, vjp of vjp and
vmap over vjp, each against torch.autograd (tests/autograd_harness.py), one
row per op (or composite op that decomposes into them) with samplers drawn
from the op's domain; per-example gradients (vmap of grad) against a loop of
torch.autograd.grad."""

import pytest
import torch
import torch.nn.functional as F

import torchxform
from tests.autograd_harness import check_derivatives
from tests.harness import assert_close, cpu_reference_row, no_fallback
from torchxform._core.registry import VJP_RULES

aten = torch.ops.aten

# The legacy APIs are tested on purpose.
pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.chain_matmul is deprecated",
    "ignore:torch.cholesky is deprecated",
    "ignore:torch.triangular_solve is deprecated",
    "ignore:torch.svd is deprecated",
)


@pytest.fixture(autouse=True)
def _fixed_draws_one_thread():
    """Reproducible samples; one intra-op thread, as these tiny kernels only
    contend for a shared machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# Why rows with these ops skip on an accelerator: PyTorch has no CUDA kernel.
LSTSQ_CPU_DRIVERS = "torch.linalg.lstsq: drivers other than 'gels' (residuals need 'gelsd' or 'gelss') are CPU-only"


# -- input domains --------------------------------------------------------------------


def randn(*shape):
    return torch.randn(shape, dtype=torch.float64)


def eye(n):
    return torch.eye(n, dtype=torch.float64)


def well_conditioned(n, *batch):
    return randn(*batch, n, n) + n * eye(n)


def spd(n, *batch):
    a = randn(*batch, n, n)
    return a @ a.mT + n * eye(n)


def symmetric(n, *batch):
    a = randn(*batch, n, n)
    return a + a.mT


def cholesky_factor(n, *batch, upper=False):
    return torch.linalg.cholesky(spd(n, *batch), upper=upper)


def lu_factor(*shape):
    return tuple(torch.linalg.lu_factor(randn(*shape) + (torch.eye(*shape[-2:], dtype=torch.float64) * 3)))


def geqrf(*shape):
    return tuple(torch.geqrf(randn(*shape)))


def args(*specs):
    """A sampler: a tuple spec draws randn of that shape, a callable is called,
    anything else is passed as is; a tuple result of a callable is spliced."""

    def sample():
        out = []
        for spec in specs:
            if isinstance(spec, tuple):
                out.append(randn(*spec))
            elif callable(spec):
                value = spec()
                out.extend(value if isinstance(value, tuple) else (value,))
            else:
                out.append(spec)
        return tuple(out)

    return sample


def row(name, fn, sample, **options):
    return pytest.param(fn, sample, options, id=name)


# -- products ----------------------------------------------------------------------------

PRODUCTS = [
    row("mm", torch.mm, args((2, 3), (3, 4))),
    row("mm_size1", torch.mm, args((1, 3), (3, 1))),
    row("mm_empty_inner", torch.mm, args((2, 0), (0, 3))),
    row("mm_noncontiguous", lambda a, b: torch.mm(a.mT, b.mT), args((3, 2), (4, 3))),
    row("bmm", torch.bmm, args((2, 2, 3), (2, 3, 4))),
    row("addmm", lambda s, a, b: torch.addmm(s, a, b, beta=0.5, alpha=2.0), args((2, 4), (2, 3), (3, 4))),
    row("addmm_broadcast_self", torch.addmm, args((4,), (2, 3), (3, 4))),
    row("addmm_beta0", lambda s, a, b: torch.addmm(s, a, b, beta=0), args((1, 4), (2, 3), (3, 4))),
    row("addmm_", lambda s, a, b: s.clone().addmm_(a, b, beta=2, alpha=-1), args((2, 4), (2, 3), (3, 4))),
    row("baddbmm", lambda s, a, b: torch.baddbmm(s, a, b, beta=0.5, alpha=3), args((1, 4), (2, 2, 3), (2, 3, 4))),
    row("baddbmm_", lambda s, a, b: s.clone().baddbmm_(a, b), args((2, 2, 4), (2, 2, 3), (2, 3, 4))),
    row("addbmm", lambda s, a, b: torch.addbmm(s, a, b, alpha=0.5), args((2, 4), (3, 2, 5), (3, 5, 4))),
    row("addbmm_", lambda s, a, b: s.clone().addbmm_(a, b, beta=3), args((2, 4), (3, 2, 5), (3, 5, 4))),
    row("mv", torch.mv, args((2, 3), (3,))),
    row("addmv", lambda s, a, b: torch.addmv(s, a, b, beta=0.5, alpha=2), args((2,), (2, 3), (3,))),
    row("addmv_scalar_self", torch.addmv, args((), (2, 3), (3,))),
    row("addmv_", lambda s, a, b: s.clone().addmv_(a, b, alpha=3), args((2,), (2, 3), (3,))),
    row("dot", torch.dot, args((3,), (3,))),
    row("vdot", torch.vdot, args((3,), (3,))),
    row("addr", lambda s, a, b: torch.addr(s, a, b, beta=0.5, alpha=2), args((3, 4), (3,), (4,))),
    row("addr_broadcast_self", torch.addr, args((4,), (3,), (4,))),
    row("addr_", lambda s, a, b: s.clone().addr_(a, b, alpha=-2), args((3, 4), (3,), (4,))),
    row("outer", torch.outer, args((3,), (4,))),
    row("inner", torch.inner, args((2, 3), (4, 3))),
    row("kron", torch.kron, args((2, 3), (2, 2))),
    row("tensordot", lambda a, b: torch.tensordot(a, b, dims=([0, 2], [1, 0])), args((2, 3, 4), (4, 2, 5))),
    row("einsum_mm", lambda a, b: torch.einsum("ij,jk->ik", a, b), args((2, 3), (3, 4))),
    row("einsum_batched", lambda a, b: torch.einsum("bij,bjk->bik", a, b), args((2, 2, 3), (2, 3, 4))),
    row("einsum_chain", lambda a, b, c: torch.einsum("ij,jk,kl->il", a, b, c), args((2, 3), (3, 4), (4, 2))),
    row("einsum_diag_trace", lambda a, b: torch.einsum("ii,ij->j", a, b), args((3, 3), (3, 2))),
    row("multi_dot", lambda a, b, c: torch.linalg.multi_dot([a, b, c]), args((2, 3), (3, 4), (4, 2))),
    row("chain_matmul", lambda a, b: torch.chain_matmul(a, b), args((2, 3), (3, 4))),
    row("bilinear", F.bilinear, args((2, 4), (2, 3), (5, 4, 3), (5,))),
    row("bilinear_no_bias", F.bilinear, args((3, 2), (3, 2), (2, 2, 2))),
]

MATMULS = [
    row("matmul_dot", torch.matmul, args((3,), (3,))),
    row("matmul_mv", torch.matmul, args((2, 3), (3,))),
    row("matmul_vm", torch.matmul, args((3,), (3, 4))),
    row("matmul_batched_left", torch.matmul, args((2, 2, 3), (3, 4))),
    row("matmul_batched_right", torch.matmul, args((2, 3), (4, 3, 5))),
    row("matmul_broadcast", torch.matmul, args((2, 1, 2, 3), (3, 3, 2))),
    row("matmul_vector_batch", torch.matmul, args((3,), (2, 3, 4))),
    row("matmul_batch_vector", torch.matmul, args((2, 2, 3), (3,))),
    row("linear", F.linear, args((2, 3, 4), (5, 4), (5,))),
    row("linear_1d", F.linear, args((4,), (5, 4), (5,))),
    row("linear_no_bias", F.linear, args((3, 4), (5, 4))),
]

SMALL = [
    row("trace", torch.trace, args((3, 3))),
    row("trace_wide", torch.trace, args((2, 4))),
    row("diag_embed", torch.diag_embed, args((2, 3))),
    row("diag_embed_offset_dims", lambda x: torch.diag_embed(x, offset=1, dim1=0, dim2=2), args((2, 3))),
    row("diagflat", lambda x: torch.diagflat(x, -1), args((3,))),
    row("cross", torch.linalg.cross, args((4, 3), (4, 3))),
    row("cross_broadcast", torch.linalg.cross, args((1, 3), (4, 3))),
    row("cross_dim0", lambda a, b: torch.cross(a, b, dim=0), args((3, 2), (3, 2))),
]

# -- inverses, determinants, solvers -------------------------------------------------------

SOLVERS = [
    row("inv", torch.linalg.inv, args(lambda: well_conditioned(3))),
    row("inv_batched", torch.linalg.inv, args(lambda: well_conditioned(3, 2))),
    row("inv_ex", lambda a: torch.linalg.inv_ex(a).inverse, args(lambda: well_conditioned(3))),
    row("matrix_power_3", lambda a: torch.linalg.matrix_power(a, 3), args((3, 3))),
    row("matrix_power_-2", lambda a: torch.linalg.matrix_power(a, -2), args(lambda: well_conditioned(3))),
    row("tensorinv", lambda a: torch.linalg.tensorinv(a, ind=1), args(lambda: well_conditioned(4).reshape(4, 2, 2))),
    row("det", torch.linalg.det, args((3, 3))),
    row("det_batched", torch.linalg.det, args((2, 3, 3))),
    row("det_noncontiguous", lambda a: torch.linalg.det(a.mT), args((3, 3))),
    row("det_1x1", torch.linalg.det, args((1, 1))),
    row("slogdet", torch.linalg.slogdet, args(lambda: well_conditioned(3, 2))),
    row("slogdet_negative", torch.linalg.slogdet, args(lambda: -well_conditioned(3))),
    row("logdet", torch.logdet, args(lambda: spd(3))),
    row("solve", torch.linalg.solve, args(lambda: well_conditioned(3), (3, 2))),
    row("solve_vector", torch.linalg.solve, args(lambda: well_conditioned(3), (3,))),
    row("solve_batched_vector", torch.linalg.solve, args(lambda: well_conditioned(3, 2), (3,))),
    row("solve_stacked_vectors", torch.linalg.solve, args(lambda: well_conditioned(3, 2), (2, 3))),
    row("solve_broadcast_A", torch.linalg.solve, args(lambda: well_conditioned(3), (2, 3, 2))),
    row("solve_broadcast_B", torch.linalg.solve, args(lambda: well_conditioned(3, 2), (3, 2))),
    row("solve_right", lambda a, b: torch.linalg.solve(a, b, left=False), args(lambda: well_conditioned(3), (2, 3))),
    row("solve_ex", lambda a, b: torch.linalg.solve_ex(a, b).result, args(lambda: well_conditioned(3), (3, 2))),
    row("tensorsolve", torch.linalg.tensorsolve, args(lambda: well_conditioned(4).reshape(2, 2, 4), (2, 2))),
    row("solve_triangular_upper", lambda a, b: torch.linalg.solve_triangular(a, b, upper=True),
        args(lambda: well_conditioned(3), (3, 2))),
    row("solve_triangular_lower_right", lambda a, b: torch.linalg.solve_triangular(a, b, upper=False, left=False),
        args(lambda: well_conditioned(3), (2, 3))),
    row("solve_triangular_unit", lambda a, b: torch.linalg.solve_triangular(a, b, upper=False, unitriangular=True),
        args(lambda: well_conditioned(3), (3, 2))),
    row("solve_triangular_broadcast", lambda a, b: torch.linalg.solve_triangular(a, b, upper=True),
        args(lambda: well_conditioned(3), (2, 3, 2))),
    row("triangular_solve", torch.triangular_solve, args((3, 2), lambda: well_conditioned(3))),
    row("triangular_solve_lower_transpose_unit",
        lambda b, a: torch.triangular_solve(b, a, upper=False, transpose=True, unitriangular=True),
        args((2, 3, 2), lambda: well_conditioned(3, 2))),
    row("triangular_solve_transpose", lambda b, a: torch.triangular_solve(b, a, transpose=True).solution,
        args((3, 2), lambda: well_conditioned(3))),
]

FACTORIZATIONS = [
    row("cholesky", torch.linalg.cholesky, args(lambda: spd(3))),
    row("cholesky_upper_batched", lambda a: torch.linalg.cholesky(a, upper=True), args(lambda: spd(3, 2))),
    row("cholesky_ex", lambda a: torch.linalg.cholesky_ex(a).L, args(lambda: spd(3))),
    row("cholesky_legacy", torch.cholesky, args(lambda: spd(3))),
    row("cholesky_legacy_upper", lambda a: torch.cholesky(a, upper=True), args(lambda: spd(3))),
    row("cholesky_solve", torch.cholesky_solve, args((3, 2), lambda: cholesky_factor(3))),
    row("cholesky_solve_upper_broadcast", lambda b, u: torch.cholesky_solve(b, u, upper=True),
        args((2, 3, 2), lambda: cholesky_factor(3, upper=True))),
    row("cholesky_inverse", torch.cholesky_inverse, args(lambda: cholesky_factor(3))),
    row("cholesky_inverse_upper", lambda u: torch.cholesky_inverse(u, upper=True),
        args(lambda: cholesky_factor(3, upper=True))),
    row("lu_factor", lambda a: torch.linalg.lu_factor(a).LU, args((3, 3))),
    row("lu_factor_wide", lambda a: torch.linalg.lu_factor(a).LU, args((3, 5))),
    row("lu_factor_tall_batched", lambda a: torch.linalg.lu_factor(a).LU, args((2, 5, 3))),
    row("lu_factor_ex", lambda a: torch.linalg.lu_factor_ex(a).LU, args((3, 3))),
    row("lu", torch.linalg.lu, args((3, 3))),
    row("lu_wide", torch.linalg.lu, args((3, 5))),
    row("lu_tall", torch.linalg.lu, args((5, 3))),
    row("lu_wide_U_only", lambda a: torch.linalg.lu(a).U, args((3, 5))),
    row("lu_tall_L_only", lambda a: torch.linalg.lu(a).L, args((5, 3))),
    row("lu_solve", torch.linalg.lu_solve, args(lambda: lu_factor(3, 3), (3, 2))),
    row("lu_solve_adjoint", lambda lu, p, b: torch.linalg.lu_solve(lu, p, b, adjoint=True),
        args(lambda: lu_factor(3, 3), (3, 2))),
    row("lu_solve_right", lambda lu, p, b: torch.linalg.lu_solve(lu, p, b, left=False),
        args(lambda: lu_factor(3, 3), (2, 3))),
    row("lu_solve_right_adjoint", lambda lu, p, b: torch.linalg.lu_solve(lu, p, b, left=False, adjoint=True),
        args(lambda: lu_factor(3, 3), (2, 3))),
    row("lu_solve_broadcast", torch.linalg.lu_solve, args(lambda: lu_factor(3, 3), (2, 3, 2))),
    row("lu_unpack", lambda lu, p: torch.lu_unpack(lu, p)[1:], args(lambda: lu_factor(3, 3))),
    row("lu_unpack_wide", lambda lu, p: torch.lu_unpack(lu, p)[1:], args(lambda: lu_factor(3, 5))),
    row("lu_unpack_tall_U", lambda lu, p: torch.lu_unpack(lu, p).U, args(lambda: lu_factor(5, 3))),
    row("lu_unpack_wide_L", lambda lu, p: torch.lu_unpack(lu, p).L, args(lambda: lu_factor(3, 5))),
    row("qr", torch.linalg.qr, args((4, 3))),
    row("qr_square_batched", torch.linalg.qr, args((2, 3, 3))),
    row("qr_wide", torch.linalg.qr, args((3, 5))),
    row("qr_complete_wide", lambda a: torch.linalg.qr(a, mode="complete"), args((3, 4))),
    row("qr_R_only", lambda a: torch.linalg.qr(a).R, args((4, 3))),
    row("qr_Q_only_wide", lambda a: torch.linalg.qr(a).Q, args((3, 4))),
    row("householder_product", torch.linalg.householder_product, args(lambda: geqrf(4, 3))),
    row("householder_product_k_lt_n", lambda v, tau: torch.linalg.householder_product(v, tau[:2]),
        args(lambda: geqrf(4, 3))),
    row("householder_product_batched", torch.linalg.householder_product, args(lambda: geqrf(2, 3, 3))),
    row("orgqr", torch.orgqr, args(lambda: geqrf(4, 3))),
    row("ormqr", torch.ormqr, args(lambda: geqrf(4, 3), (4, 2))),
    row("ormqr_right", lambda v, t, c: torch.ormqr(v, t, c, left=False), args(lambda: geqrf(4, 3), (2, 4))),
    row("ormqr_transpose", lambda v, t, c: torch.ormqr(v, t, c, transpose=True), args(lambda: geqrf(4, 3), (4, 2))),
    row("ormqr_right_transpose", lambda v, t, c: torch.ormqr(v, t, c, left=False, transpose=True),
        args(lambda: geqrf(4, 3), (2, 4))),
]

SPECTRAL = [
    row("svd", lambda a: torch.linalg.svd(a, full_matrices=False), args((3, 3))),
    row("svd_tall", lambda a: torch.linalg.svd(a, full_matrices=False), args((4, 3))),
    row("svd_wide_batched", lambda a: torch.linalg.svd(a, full_matrices=False), args((2, 3, 4))),
    row("svd_full_matrices_tall", torch.linalg.svd, args((4, 3))),
    row("svd_U_only", lambda a: torch.linalg.svd(a, full_matrices=False).U, args((4, 3))),
    row("svd_Vh_only_wide", lambda a: torch.linalg.svd(a, full_matrices=False).Vh, args((3, 4))),
    row("svd_legacy", torch.svd, args((4, 3))),
    row("svdvals", torch.linalg.svdvals, args((3, 4))),
    row("eigh", torch.linalg.eigh, args(lambda: symmetric(3))),
    row("eigh_upper_batched", lambda a: torch.linalg.eigh(a, UPLO="U"), args(lambda: symmetric(3, 2))),
    row("eigh_vectors_only", lambda a: torch.linalg.eigh(a).eigenvectors, args(lambda: symmetric(3))),
    row("eigvalsh", torch.linalg.eigvalsh, args(lambda: symmetric(4))),
    # Second order through eig's complex backward needs a VJP rule for
    # aten._conj_physical (elementwise family), which is not there yet.
    row("eigvals", torch.linalg.eigvals, args((3, 3)), second_order=False),
    row("eig_phase_invariant", lambda a: _phase_invariant_eig(a), args((3, 3)), second_order=False),
    row("matrix_exp", torch.linalg.matrix_exp, args(lambda: 0.5 * randn(3, 3))),
    row("matrix_exp_batched", torch.linalg.matrix_exp, args(lambda: 0.5 * randn(2, 3, 3))),
    row("pinv_wide", torch.linalg.pinv, args((3, 5))),
    row("pinv_tall", torch.linalg.pinv, args((5, 3))),
    row("pinv_hermitian", lambda a: torch.linalg.pinv(a, hermitian=True), args(lambda: spd(3))),
    row("lstsq", lambda a, b: torch.linalg.lstsq(a, b).solution, args((5, 3), (5, 2))),
    cpu_reference_row(
        row("lstsq_residuals", lambda a, b: torch.linalg.lstsq(a, b, driver="gelsd")[:2], args((5, 3), (5, 2))),
        LSTSQ_CPU_DRIVERS,
    ),
    row("lstsq_vector", lambda a, b: torch.linalg.lstsq(a, b).solution, args((2, 5, 3), (2, 5))),
]


def _phase_invariant_eig(a):
    values, vectors = torch.linalg.eig(a)
    return values, vectors.abs()  # eigenvectors are defined up to a phase


NORMS = [
    row("matrix_norm_fro", torch.linalg.matrix_norm, args((3, 4))),
    row("matrix_norm_nuc", lambda a: torch.linalg.matrix_norm(a, "nuc"), args((3, 4))),
    row("matrix_norm_2", lambda a: torch.linalg.matrix_norm(a, 2), args((2, 3, 4))),
    row("matrix_norm_-2", lambda a: torch.linalg.matrix_norm(a, -2), args((3, 3))),
    row("matrix_norm_1", lambda a: torch.linalg.matrix_norm(a, 1), args((3, 4))),
    row("matrix_norm_-inf", lambda a: torch.linalg.matrix_norm(a, -float("inf")), args((3, 4))),
    row("norm_nuc", lambda a: torch.linalg.norm(a, "nuc"), args((3, 4))),
    row("cond", torch.linalg.cond, args((3, 3))),
]

EDGES = [
    row("mm_empty_rows", torch.mm, args((0, 3), (3, 4))),
    row("bmm_empty_batch", torch.bmm, args((0, 2, 3), (0, 3, 4))),
    row("matmul_empty_batch", torch.matmul, args((2, 0, 2, 3), (3, 4))),
    row("det_0x0", torch.linalg.det, args((0, 0))),
    row("det_empty_batch", torch.linalg.det, args((0, 3, 3))),
    row("inv_empty_batch", torch.linalg.inv, args((0, 3, 3))),
    row("solve_empty_rhs", torch.linalg.solve, args(lambda: well_conditioned(3), (3, 0))),
    row("cholesky_empty_batch", torch.linalg.cholesky, args(lambda: spd(3, 0))),
    row("mm_float32", torch.mm, args(lambda: randn(2, 3).float(), lambda: randn(3, 4).float())),
    row("solve_float32", torch.linalg.solve, args(lambda: well_conditioned(3).float(), lambda: randn(3, 2).float())),
    row("eigh_float32", torch.linalg.eigh, args(lambda: symmetric(3).float()), rtol=1e-4, atol=1e-4),
]



def crandn(*shape):
    return torch.randn(shape, dtype=torch.complex128)


def cwell_conditioned(n):
    return crandn(n, n) + n * torch.eye(n, dtype=torch.complex128)


def hpd(n):
    a = crandn(n, n)
    return a @ a.mH + n * torch.eye(n, dtype=torch.complex128)


# Complex inputs: first order, second order and vmap over vjp.
COMPLEX = [
    row("complex_" + name, fn, sample)
    for name, fn, sample in [
        ("mm", torch.mm, args(lambda: crandn(2, 3), lambda: crandn(3, 4))),
        ("addmm", lambda s, a, b: torch.addmm(s, a, b, beta=0.5 + 1j, alpha=2 - 1j),
         args(lambda: crandn(2, 4), lambda: crandn(2, 3), lambda: crandn(3, 4))),
        ("matmul", torch.matmul, args(lambda: crandn(3), lambda: crandn(2, 3, 4))),
        ("vdot", torch.vdot, args(lambda: crandn(3), lambda: crandn(3))),
        ("cross", torch.linalg.cross, args(lambda: crandn(2, 3), lambda: crandn(2, 3))),
        ("inv", torch.linalg.inv, args(lambda: cwell_conditioned(3))),
        ("det", torch.linalg.det, args(lambda: cwell_conditioned(3))),
        ("slogdet", torch.linalg.slogdet, args(lambda: cwell_conditioned(3))),
        ("solve", torch.linalg.solve, args(lambda: cwell_conditioned(3), lambda: crandn(3, 2))),
        ("solve_triangular", lambda a, b: torch.linalg.solve_triangular(a, b, upper=True),
         args(lambda: cwell_conditioned(3), lambda: crandn(3, 2))),
        ("cholesky", torch.linalg.cholesky, args(lambda: hpd(3))),
        ("cholesky_inverse", torch.cholesky_inverse, args(lambda: torch.linalg.cholesky(hpd(3)))),
        ("lu", lambda a: torch.linalg.lu(a)[1:], args(lambda: crandn(3, 4))),
        ("qr", torch.linalg.qr, args(lambda: crandn(4, 3))),
        ("qr_wide", torch.linalg.qr, args(lambda: crandn(3, 4))),
        ("householder_product", torch.linalg.householder_product, args(lambda: tuple(torch.geqrf(crandn(4, 3))))),
        ("svdvals", torch.linalg.svdvals, args(lambda: crandn(3, 4))),
        ("eigvalsh", torch.linalg.eigvalsh, args(lambda: hpd(3))),
        ("matrix_exp", torch.linalg.matrix_exp, args(lambda: 0.3 * crandn(3, 3))),
    ]
]

ALL_ROWS = PRODUCTS + MATMULS + SMALL + SOLVERS + FACTORIZATIONS + SPECTRAL + NORMS + EDGES + COMPLEX


def test_complex_pinv():
    check_derivatives(torch.linalg.pinv, args(lambda: crandn(3, 4)), second_order=False)


@pytest.mark.parametrize("fn, sample, options", ALL_ROWS)
def test_derivatives(fn, sample, options):
    check_derivatives(fn, sample, **options)


# -- det at singular matrices: the gradient is the adjugate ---------------------------------------


def _tensor(rows):
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize(
    "make_a",
    [
        pytest.param(lambda: _tensor([[1.0, 2.0], [2.0, 4.0]]), id="rank1_2x2"),
        pytest.param(lambda: _tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]), id="rank2_3x3"),
        pytest.param(lambda: _tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 1.0, 1.0]]).mT, id="rank2_noncontiguous"),
        pytest.param(lambda: torch.ones(3, 3, dtype=torch.float64), id="rank1_3x3"),
        pytest.param(lambda: torch.zeros(3, 3, dtype=torch.float64), id="zeros"),
        pytest.param(lambda: torch.zeros(1, 1, dtype=torch.float64), id="zeros_1x1"),
        pytest.param(lambda: torch.stack([_tensor([[1.0, 2.0], [2.0, 4.0]]), 3 * torch.eye(2, dtype=torch.float64)]),
                     id="batch_singular_and_regular"),
    ],
)
def test_det_at_singular_matrices(make_a):
    """torch.autograd's first-order det backward returns 0 at exactly singular
    matrices; with create_graph it computes the adjugate (an SVD formula),
    which is the derivative.  We compare with the latter."""
    a = make_a()
    cotangent = torch.randn(a.shape[:-2], dtype=torch.float64)
    leaf = a.clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch.linalg.det(leaf), leaf, cotangent, create_graph=True)
    with no_fallback():
        _, pullback = torchxform.vjp(torch.linalg.det, a)
        (actual,) = pullback(cotangent)
        batched = torchxform.vmap(pullback)(torch.stack([cotangent, 2 * cotangent]))[0]
    assert_close(actual, expected.detach(), rtol=1e-6, atol=1e-6, msg="det vjp at a singular matrix")
    assert_close(batched, torch.stack([expected, 2 * expected]).detach(), rtol=1e-6, atol=1e-6, msg="vmap over vjp")


# -- third order: the rules' own ops are differentiated by the rules again -----------------------

THIRD_ORDER = [
    pytest.param(lambda m: torch.linalg.det(m), id="det"),
    pytest.param(lambda m: torch.linalg.slogdet(m).logabsdet, id="slogdet"),
    pytest.param(lambda m: torch.linalg.inv(m).sum(), id="inv"),
    pytest.param(lambda m: torch.linalg.solve(m, torch.ones(3, dtype=m.dtype)).sum(), id="solve"),
    pytest.param(lambda m: torch.linalg.solve_triangular(m, m.mT, upper=True).sum(), id="solve_triangular"),
    pytest.param(lambda m: torch.linalg.cholesky(m @ m.mT).sum(), id="cholesky"),
    pytest.param(lambda m: torch.linalg.lu_factor(m).LU.sum(), id="lu_factor"),
    pytest.param(lambda m: torch.linalg.qr(m).R.sum() + torch.linalg.qr(m).Q[0].sum(), id="qr"),
    pytest.param(lambda m: torch.linalg.svdvals(m).square().sum(), id="svdvals"),
    pytest.param(lambda m: torch.linalg.eigh(m + m.mT).eigenvectors[0].sum(), id="eigh"),
    pytest.param(lambda m: torch.linalg.matrix_exp(0.3 * m).sum(), id="matrix_exp"),
    pytest.param(lambda m: torch.linalg.pinv(m).sum(), id="pinv"),
]


@pytest.mark.parametrize("fn", THIRD_ORDER)
def test_third_order(fn):
    a, b = well_conditioned(3), randn(3, 3)
    t = torch.tensor(0.1, dtype=torch.float64)

    def f(t):
        return fn(a + t * b)

    with no_fallback():
        actual = torchxform.grad(torchxform.grad(torchxform.grad(f)))(t)
    leaf = t.clone().requires_grad_()
    d1 = torch.autograd.grad(f(leaf), leaf, create_graph=True)[0]
    d2 = torch.autograd.grad(d1, leaf, create_graph=True)[0]
    d3 = torch.autograd.grad(d2, leaf)[0]
    assert_close(actual, d3, rtol=1e-6, atol=1e-6, msg="third derivative")


# -- rules applied by other rules: matmul and linear arrive whole ------------------------------
# vmap's batching rules call torch.matmul / F.linear on the grad level's
# tracers, so under grad(vmap(f)) these ops reach the grad level undecomposed.


@pytest.mark.parametrize(
    "fn, shapes",
    [
        pytest.param(lambda x, w: torch.matmul(x, w), ((5, 2, 3), (3, 4)), id="matmul"),
        pytest.param(lambda x, w: torch.matmul(w.mT, x), ((5, 3), (3, 4)), id="matmul_vector"),
        pytest.param(lambda x, w: F.linear(x, w.mT), ((5, 2, 3), (3, 4)), id="linear"),
        pytest.param(lambda x, w: F.linear(x, w.mT, w[0]), ((5, 3), (3, 4)), id="linear_bias"),
    ],
)
def test_grad_of_vmap_whole_matmul(fn, shapes):
    x, w = randn(*shapes[0]), randn(*shapes[1])

    def loss(x, w):
        return torchxform.vmap(lambda xi: fn(xi, w).sin().sum())(x).sum()

    with no_fallback():
        actual = torchxform.grad(loss, argnums=(0, 1))(x, w)
        second = torchxform.grad(lambda w: torchxform.grad(loss)(x, w).square().sum())(w)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    reference = sum(fn(xi, wr).sin().sum() for xi in xr)
    expected = torch.autograd.grad(reference, (xr, wr), create_graph=True)
    expected_second = torch.autograd.grad(expected[0].square().sum(), wr)[0]
    assert_close(actual, tuple(e.detach() for e in expected), msg="grad of vmap")
    assert_close(second, expected_second, msg="grad of grad of vmap")


# -- per-example gradients: vmap(grad(loss)) against a loop of torch.autograd.grad ---------------


def _mlp_loss(w1, b1, w2, x, y):
    hidden = torch.tanh(F.linear(x, w1, b1))
    return (F.linear(hidden, w2) - y).square().sum()


def _bilinear_loss(weight, bias, x1, x2):
    return F.bilinear(x1, x2, weight, bias).square().sum()


def _solve_loss(a, b):
    return torch.linalg.solve(a, b).square().sum() + torch.linalg.slogdet(a).logabsdet


def _factorization_loss(a, b):
    q, r = torch.linalg.qr(a)
    return torch.linalg.svdvals(a).sum() + (q @ torch.linalg.cholesky(r.mT @ r + torch.eye(3)) @ b).sum()


PER_EXAMPLE = [
    pytest.param(_mlp_loss, ((4, 3), (4,), (2, 4)), ((3,), (2,)), 0, id="mlp"),
    pytest.param(_mlp_loss, ((4, 3), (4,), (2, 4)), ((5, 3), (5, 2)), 0, id="mlp_sequence"),
    pytest.param(_mlp_loss, ((4, 3), (4,), (2, 4)), ((5, 3), (5, 2)), -1, id="mlp_sequence_batch_last"),
    pytest.param(_bilinear_loss, ((2, 3, 4), (2,)), ((3,), (4,)), 0, id="bilinear"),
    pytest.param(_solve_loss, (), ((3, 3), (3,)), 0, id="solve_slogdet"),
    pytest.param(_solve_loss, (), ((3, 3), (3,)), 1, id="solve_slogdet_batch_dim1"),
    pytest.param(_factorization_loss, (), ((3, 3), (3,)), 0, id="qr_cholesky_svdvals"),
]


@pytest.mark.parametrize("loss, param_shapes, example_shapes, batch_dim", PER_EXAMPLE)
def test_per_example_gradients(loss, param_shapes, example_shapes, batch_dim):
    batch = 4
    params = [randn(*s) for s in param_shapes]
    examples = [[randn(*s) for s in example_shapes] for _ in range(batch)]
    if loss is _solve_loss or loss is _factorization_loss:
        for example in examples:
            example[0] = example[0] + 3 * eye(3)  # well conditioned
    data = [torch.stack(column, batch_dim) for column in zip(*examples)]
    argnums = tuple(range(len(params))) if params else (0,)
    in_dims = (None,) * len(params) + (batch_dim,) * len(data)
    with no_fallback():
        actual = torchxform.vmap(torchxform.grad(loss, argnums=argnums), in_dims=in_dims)(*params, *data)
    expected = []
    for example in examples:
        leaves = [p.clone().requires_grad_() for p in params] + [d.clone().requires_grad_() for d in example]
        wanted = [leaves[j] for j in argnums]
        expected.append(torch.autograd.grad(loss(*leaves), wanted))
    expected = tuple(torch.stack(column) for column in zip(*expected))
    assert_close(actual, expected, msg="vmap(grad)")


# -- the rules themselves ----------------------------------------------------------------------------


def test_products_compute_only_wanted_cotangents():
    x, w, g = randn(2, 3), randn(3, 4), randn(2, 4)
    grad_x, grad_w = VJP_RULES[aten.mm.default](grad=g, self=x, mat2=w, needs=(False, True))
    assert grad_x is None
    assert_close(grad_w, x.T @ g)
    rule = VJP_RULES[aten.addmm.default]
    bias_meta = (torch.Size([4]), g.dtype, g.device)
    grads = rule(grad=g, mat1=x, mat2=w, needs=(True, False, False), inputs_meta=(bias_meta, None, None), beta=2)
    assert grads[1] is None and grads[2] is None
    assert_close(grads[0], 2 * g.sum(0))


def test_qr_mode_r_is_not_differentiable():
    with pytest.raises(RuntimeError, match="mode='r'"):
        torchxform.grad(lambda a: torch.linalg.qr(a, mode="r").R.sum())(randn(3, 3))


def test_cond_fro_raises_like_autograd():
    # torch.linalg.cond(A, 'fro') writes in place into the inverse that
    # linalg_inv_ex's backward needs: torch.autograd refuses, and so do we.
    a = well_conditioned(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(torch.linalg.cond(a.requires_grad_(), "fro"), a)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torchxform.grad(lambda a: torch.linalg.cond(a, "fro"))(a.detach())


def test_in_place_product_on_saved_input_raises_like_autograd():
    def f(a, b):
        out = torch.mm(a, b)
        a.mul_(2)
        return out.sum()

    a, b = randn(2, 3), randn(3, 4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torchxform.grad(lambda b: f(a.clone(), b))(b)
