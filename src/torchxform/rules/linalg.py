"""Matrix products and linear algebra.

Products (dot, mv, mm, bmm and their ``add*`` forms) have hand-written
rules that use the batch well: with one operand batched the batch is folded
into the rows (or columns) of a single matmul instead of a bmm over a
broadcast copy of the other operand.  ``matmul`` and ``linear`` are
CompositeImplicit and normally arrive decomposed into those; they get rules
too because ops issued by other rules (on lower-level tracers) reach us whole.

Linear-algebra ops that accept leading batch dims share one generic rule:
move the batch to the front (aligning the other arguments' batch dims) and
call the op; every output has the batch at 0.  Ops whose arguments pair up
in special ways (solve's vector right-hand side, lstsq) have their own rules.
"""

from __future__ import annotations

import functools

import torch

from .._core.registry import overloads, register_batching, register_batching_each
from ._batching import (
    InvalidArguments,
    batch_size,
    front_padded,
    materialize,
    move_bdim_to_front,
    with_eager_errors,
    wrap_dim,
)
from .elementwise import elementwise_batch

aten = torch.ops.aten
Tensor = torch.Tensor


def _register(ops, rule, **options):
    """Register ``rule(op, bdims, *args, **options, **kwargs)`` for each op,
    with eager's errors.  See NOTE [Errors as eager raises them]."""

    register_batching_each(ops, with_eager_errors(rule, **options))


def _rank(x, bdim) -> int:
    return x.dim() - (bdim is not None)


def _logical_shape(x, bdim):
    return x.shape if bdim is None else x.shape[:bdim] + x.shape[bdim + 1 :]


# The physical dims of the logical dims (0, 1) of a batched matrix, by bdim.
_MATRIX_DIMS = {0: (1, 2), 1: (0, 2), 2: (0, 1)}


# --------------------------------------------------------------------------
# Products.  NOTE [Folding the batch into a matmul]
# With one operand batched, the batch joins the rows of the left operand or
# the columns of the right one, so one mm/bmm with the other operand as it
# is does the work (no broadcast copy of the unbatched operand):
#   mm:  [B,n,k] @ [k,m]  -> [B*n,k] @ [k,m] -> [B,n,m]       (bdim kept)
#        [n,k] @ [k,B,m]  -> [n,k] @ [k,B*m] -> [n,B,m]       (bdim kept)
#   bmm: [b,B,n,k] @ [b,k,m] -> [b,B*n,k] @ [b,k,m] -> [b,B,n,m]
# The reshape is free when the folded dims are adjacent in memory (the usual
# layouts).  For mm, torch.matmul does the row fold itself, and with the
# batch at 0 of the right operand it runs a broadcast bmm instead (a stride-0
# view of the left operand, no copy).
# --------------------------------------------------------------------------


def _fold(product, ab, bb, a, b, lead):
    """``product(a, b)`` with exactly one operand batched, the batch folded
    into the rows of ``a`` or the columns of ``b``; ``lead`` is the number of
    logical batch dims in front of the matrices (0: mm, 1: bmm)."""
    if ab is not None:
        if ab < lead or ab == lead + 2:  # put the batch next to the rows
            a, ab = a.movedim(ab, lead), lead
        *front, rows, batch_or_rows, k = a.shape
        out = product(a.reshape(*front, rows * batch_or_rows, k), b)
        return out.view(*front, rows, batch_or_rows, out.shape[-1]), ab
    if bb <= lead:  # put the batch next to the columns
        b, bb = b.movedim(bb, lead + 1), lead + 1
    *front, k, cols, batch_or_cols = b.shape
    out = product(a, b.reshape(*front, k, cols * batch_or_cols))
    return out.view(*out.shape[:-1], cols, batch_or_cols), bb


def _mm_like(op, bdims, a, b, *, lead):
    """mm (lead=0) and bmm (lead=1)."""
    ab, bb = bdims
    if _rank(a, ab) != lead + 2 or _rank(b, bb) != lead + 2:
        raise InvalidArguments
    if ab is not None and bb is not None:
        a, b = move_bdim_to_front(a, ab), move_bdim_to_front(b, bb)
        if lead == 0:
            return torch.bmm(a, b), 0
        # [B,b,n,k] @ [B,b,k,m] -> [B*b,n,k] @ [B*b,k,m] (bmm never broadcasts b)
        out = torch.bmm(a.flatten(0, 1), b.flatten(0, 1))
        return out.view(a.shape[:2] + out.shape[1:]), 0
    if lead == 0 and (bb == 0 or ab is not None and ab != 2):
        # matmul folds [B,n,k] @ [k,m] itself (in C++, faster), and runs
        # [n,k] @ [B,k,m] as a broadcast bmm (a stride-0 view, no copy)
        return torch.matmul(a, b), 0 if bb == 0 else ab
    return _fold(torch.mm if lead == 0 else torch.bmm, ab, bb, a, b, lead)


def _mv(op, bdims, mat, vec):
    mb, vb = bdims
    if _rank(mat, mb) != 2 or _rank(vec, vb) != 1:
        raise InvalidArguments
    if mb is not None and vb is not None:
        # [B,n,k] @ [B,k,1] -> [B,n,1] -> [B,n]
        mat, vec = move_bdim_to_front(mat, mb), move_bdim_to_front(vec, vb)
        return torch.bmm(mat, vec.unsqueeze(-1)).squeeze(-1), 0
    if mb is not None:  # [B,n,k] @ [k]: matmul folds it into one mv
        if mb == 2:
            mat, mb = mat.movedim(2, 0), 0
        return torch.matmul(mat, vec), mb
    # [n,k] @ [k,B] -> [n,B]: the batched vectors are the columns of one mm
    return torch.mm(mat, vec if vb == 1 else vec.t()), 1


def _dot(op, bdims, a, b):
    ab, bb = bdims
    if _rank(a, ab) != 1 or _rank(b, bb) != 1:
        raise InvalidArguments
    if op is aten.vdot.default and a.is_complex():
        # Materialized: a rule restores the Conjugate dispatch key only for
        # conj-view inputs (NOTE [Autograd inside rules]), so mv would read a
        # conj view made here raw.
        a = torch.conj_physical(a)
    if ab is not None and bb is not None:
        # [B,1,n] @ [B,n,1] -> [B,1,1] -> [B]
        a, b = move_bdim_to_front(a, ab), move_bdim_to_front(b, bb)
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[:1]), 0
    if a.dtype != b.dtype or a.dtype is torch.bool:
        raise InvalidArguments  # mv would report another op
    if ab is not None:
        return torch.mv(a if ab == 0 else a.t(), b), 0
    return torch.mv(b if bb == 0 else b.t(), a), 0  # a.b == b.a (a already conjugated)


_register([aten.mm.default], _mm_like, lead=0)
_register([aten.bmm.default], _mm_like, lead=1)
_register([aten.mv.default], _mv)
_register([aten.dot.default, aten.vdot.default], _dot)


def _transpose_logical(x, bdim):
    """The logical transpose of a 2-D ``x`` (batched or not); bdim unchanged."""
    return x.t() if bdim is None else x.transpose(*_MATRIX_DIMS[bdim])


def _matmul(op, bdims, a, b):
    """torch.matmul on logical ranks, broadcasting included."""
    ab, bb = bdims
    ra, rb = _rank(a, ab), _rank(b, bb)
    if ra == 0 or rb == 0:
        raise InvalidArguments
    if ra <= 2 and rb <= 2:
        if ra == 2 and rb == 2:
            return _mm_like(op, bdims, a, b, lead=0)
        if ra == 2:
            return _mv(op, bdims, a, b)
        if rb == 2:  # v @ M = M^T v
            return _mv(op, (bb, ab), _transpose_logical(b, bb), a)
        return _dot(op, bdims, a, b)
    # Batched vectors become matrices, then the logical batch dims of both
    # sides are aligned after the vmap batch:
    # [B,k] @ [s,k,m] -> [B,1,1,k] @ [s,k,m] -> [B,s,1,m] -> [B,s,m]
    squeeze = None
    if ab is not None:
        a = move_bdim_to_front(a, ab)
        if ra == 1:
            a, ra, squeeze = a.unsqueeze(-2), 2, -2
    if bb is not None:
        b = move_bdim_to_front(b, bb)
        if rb == 1:
            b, rb, squeeze = b.unsqueeze(-1), 2, -1
    rank = max(ra, rb)
    if ab is not None and ra < rank:
        a = front_padded(a, 0, rank)
    if bb is not None and rb < rank:
        b = front_padded(b, 0, rank)
    out = torch.matmul(a, b)
    return (out if squeeze is None else out.squeeze(squeeze)), 0


def _linear(op, bdims, x, weight, bias=None):
    xb, wb = bdims[0], bdims[1]
    bias_bdim = bdims[2] if len(bdims) > 2 else None
    if _rank(x, xb) == 0:
        raise InvalidArguments
    if wb is None and bias_bdim is None:
        # Only the input is batched: one linear, the batch stays where it is
        # unless it is the feature dim.
        if xb == x.dim() - 1:
            x, xb = x.movedim(xb, 0), 0
        return torch.nn.functional.linear(x, weight, bias), xb
    if xb is None and wb is None:  # only the bias is batched
        out, out_bdim = torch.nn.functional.linear(x, weight), None
    else:
        rank = _rank(weight, wb)
        if rank > 2:
            raise InvalidArguments
        out, out_bdim = _matmul(op, (xb, wb), x, _transpose_logical(weight, wb) if rank == 2 else weight)
    if bias is None:
        return out, out_bdim
    result, result_bdim = elementwise_batch(aten.add.Tensor, (out_bdim, bias_bdim), out, bias)
    if _logical_shape(result, result_bdim) != _logical_shape(out, out_bdim):
        raise InvalidArguments  # eager adds the bias in place: it never broadcasts the output up
    return result, result_bdim


_register([aten.matmul.default], _matmul)
_register([aten.linear.default], _linear)


# -- beta * self + alpha * product ---------------------------------------------
# addmm, addmv, baddbmm and addbmm run on the kernels of addmm/baddbmm, which
# share their semantics (beta=0 ignores self, integer alpha/beta, dtype
# checks).  With one matrix batched and an unbatched self that broadcasts
# over the folded dim, the batch is folded (see NOTE [Folding the batch into
# a matmul]); otherwise one baddbmm over the batch:
#   addmm: self [n,m] or less, [B,n,k] @ [B,k,m] -> baddbmm -> [B,n,m]


def _self_operand(self, bdim, rank):
    """``self`` against the product's logical ``rank`` dims: batched, with
    the batch at 0 and right-aligned; unbatched, as is (it broadcasts)."""
    if _rank(self, bdim) > rank:
        raise InvalidArguments  # eager never broadcasts the product up to self
    return self if bdim is None else front_padded(self, bdim, rank)


def _foldable(self, sb, ab):
    """Whether an unbatched ``self`` broadcasts over the folded rows (left
    operand batched) or columns (right operand batched)."""
    if sb is not None:
        return False
    if ab is not None:
        return self.dim() < 2 or self.shape[-2] == 1
    return self.dim() == 0 or self.shape[-1] == 1


def _addmv(op, bdims, self, mat, vec, *, beta=1, alpha=1):
    sb, mb, vb = bdims
    if _rank(mat, mb) != 2 or _rank(vec, vb) != 1:
        raise InvalidArguments
    if sb is None and mb is None and self.dim() < 2:
        # [n,k] @ [k,B] + self[:, None] -> [n,B]: the vectors are the columns of one addmm
        self = self.unsqueeze(-1) if self.dim() == 1 else self
        return torch.addmm(self, mat, vec if vb == 1 else vec.t(), beta=beta, alpha=alpha), 1
    # [B,n,k] @ [B,k,1] + self [B,n,1] -> [B,n,1] -> [B,n]
    batch = batch_size((self, mat, vec), bdims)
    self = _self_operand(self, sb, 1).unsqueeze(-1)
    mat, vec = materialize(mat, mb, batch), materialize(vec, vb, batch).unsqueeze(-1)
    return torch.baddbmm(self, mat, vec, beta=beta, alpha=alpha).squeeze(-1), 0


def _add_product(op, bdims, self, mat1, mat2, *, beta=1, alpha=1, lead):
    """addmm (lead=0) and baddbmm (lead=1, a logical batch of matrices)."""
    sb, b1, b2 = bdims
    if _rank(mat1, b1) != lead + 2 or _rank(mat2, b2) != lead + 2:
        raise InvalidArguments
    if (b1 is None) != (b2 is None) and _foldable(self, sb, b1):
        # F.linear on a batched input: [B,n,k] -> [B*n,k] @ [k,m] + bias, one addmm
        kernel = torch.addmm if lead == 0 else torch.baddbmm
        return _fold(lambda x, y: kernel(self, x, y, beta=beta, alpha=alpha), b1, b2, mat1, mat2, lead)
    # One baddbmm; the vmap batch joins the logical one if there is one:
    # [B,b,n,k] @ [B,b,k,m] -> [B*b,n,k] @ [B*b,k,m] -> [B,b,n,m]
    batch = batch_size((self, mat1, mat2), bdims)
    mat1, mat2 = materialize(mat1, b1, batch), materialize(mat2, b2, batch)
    self = _self_operand(self, sb, lead + 2)
    if lead == 0:
        return torch.baddbmm(self, mat1, mat2, beta=beta, alpha=alpha), 0
    shape = mat1.shape[:-1] + mat2.shape[-1:]
    if self.dim() == 4 or self.dim() == 3 and self.shape[0] != 1:  # self must join the bmm batch
        self = self.expand(shape).flatten(0, 1)
    out = torch.baddbmm(self, mat1.flatten(0, 1), mat2.flatten(0, 1), beta=beta, alpha=alpha)
    return out.view(shape), 0


def _addbmm(op, bdims, self, batch1, batch2, *, beta=1, alpha=1):
    """The sum over b of batch1[b] @ batch2[b] is one product over the joined
    (b, k) dims: [B,b,n,k] -> [B,n,b*k] and [B,b,k,m] -> [B,b*k,m]."""
    sb, b1, b2 = bdims
    if _rank(batch1, b1) != 3 or _rank(batch2, b2) != 3:
        raise InvalidArguments
    batch = batch_size((self, batch1, batch2), bdims)
    batch1, batch2 = materialize(batch1, b1, batch), materialize(batch2, b2, batch)
    _, b, n, k = batch1.shape
    if batch2.shape[1:3] != (b, k):
        raise InvalidArguments
    left = batch1.transpose(1, 2).reshape(batch, n, b * k)
    right = batch2.reshape(batch, b * k, batch2.shape[3])
    return torch.baddbmm(_self_operand(self, sb, 2), left, right, beta=beta, alpha=alpha), 0


def _addr_scalar(value, dtype):
    """alpha or beta as eager's addr applies it to a result of ``dtype``:
    elementwise ops must not promote the result with it."""
    if type(value) is complex and not dtype.is_complex:
        if value.imag:
            raise InvalidArguments
        value = value.real
    if type(value) is float and not (dtype.is_floating_point or dtype.is_complex):
        raise InvalidArguments
    if dtype is torch.bool:
        return bool(value)  # bool * 2 would be int64
    if type(value) is bool:
        raise InvalidArguments
    return value


def _addr(op, bdims, self, vec1, vec2, *, beta=1, alpha=1):
    """addr is elementwise in eager (self expanded, then TensorIterator:
    plain type promotion, bool logic), so elementwise ops compute it:
    [B,n,1] * [B,1,m] -> [B,n,m]."""
    sb, b1, b2 = bdims
    if _rank(vec1, b1) != 1 or _rank(vec2, b2) != 1:
        raise InvalidArguments
    dtype = torch.promote_types(torch.promote_types(self.dtype, vec1.dtype), vec2.dtype)
    beta, alpha = _addr_scalar(beta, dtype), _addr_scalar(alpha, dtype)
    out = move_bdim_to_front(vec1, b1).unsqueeze(-1) * move_bdim_to_front(vec2, b2).unsqueeze(-2)
    shape = out.shape[-2:]
    if alpha != 1:
        out = out * alpha
    self = _self_operand(self, sb, 2)
    if beta:
        out = out + (self if beta == 1 else self * beta)
    elif torch.broadcast_shapes(self.shape[sb is not None :], shape) != shape:
        raise InvalidArguments
    if out.shape[-2:] != shape:
        raise InvalidArguments
    return out.to(dtype), (None if out.dim() == 2 else 0)


def _inplace(op, bdims, self, *args, functional, **kwargs):
    """``self.op_(...)``: the out-of-place result written into self."""
    out, out_bdim = functional(op, bdims, self, *args, **kwargs)
    self_front = move_bdim_to_front(self, bdims[0])  # a view: writes reach self
    out = move_bdim_to_front(out, out_bdim)
    if out.shape != (self_front.shape if out_bdim is not None else self_front.shape[1:]):
        raise InvalidArguments
    self_front.copy_(out)
    return self, bdims[0]


_addmm = functools.partial(_add_product, lead=0)
_baddbmm = functools.partial(_add_product, lead=1)
for _functional, _op, _inplace_op in [
    (_addmm, aten.addmm.default, aten.addmm_.default),
    (_addmv, aten.addmv.default, aten.addmv_.default),
    (_baddbmm, aten.baddbmm.default, aten.baddbmm_.default),
    (_addbmm, aten.addbmm.default, aten.addbmm_.default),
    (_addr, aten.addr.default, aten.addr_.default),
]:
    _register([_op], _functional)
    _register([_inplace_op], _inplace, functional=_functional)


# --------------------------------------------------------------------------
# Linear algebra on stacks of matrices.  NOTE [Leading batch dims]
# These ops already map over leading dims, so the vmap batch goes to the
# front and the op runs once; every output has the batch at 0.  Each tensor
# argument has `core` trailing dims (2 for a matrix, 1 for pivots or tau);
# the dims before them are its logical batch dims, which broadcast from the
# right between arguments.  Batched arguments get size-1 dims after the vmap
# batch so that all have as many batch dims as the widest:
#   solve_triangular: A [B,n,n], X [s,n,k] -> A [B,1,n,n] with X [s,n,k] -> [B,s,n,k]
# Arguments whose batch dims must agree rather than broadcast (LU and its
# pivots) form a group: when one member is batched, an unbatched member is
# expanded to the batch (a view), and the group is padded as a whole so the
# op's own checks between members see the logical shapes.
# --------------------------------------------------------------------------


def _output_bdims(out, batch):
    """0 for every output, but None for the empty placeholders ([0]) that
    eager returns for outputs it did not compute (U and Vh of svd with
    compute_uv=False, lstsq's residuals, ...): they have no batch."""
    if isinstance(out, Tensor):
        return 0
    return tuple(0 if o.dim() and o.shape[0] == batch else None for o in out)


def _matrix_unary(op, bdims, x, *args, contiguous=False, **kwargs):
    if x.dim() < 3:
        raise InvalidArguments  # the logical input is not a matrix
    x = move_bdim_to_front(x, bdims[0])
    if contiguous:
        x = x.contiguous()
    out = op(x, *args, **kwargs)
    return out, _output_bdims(out, x.shape[0])


def _matrix_nary(op, bdims, *args, cores, groups=None, expand=False, **kwargs):
    n = len(cores)
    batch = batch_size(args[:n], bdims)
    ranks = [x.dim() - (bdim is not None) - core for x, bdim, core in zip(args, bdims, cores)]
    if min(ranks) < 0:
        raise InvalidArguments
    widest = max(ranks)
    physical = list(args)
    for group in groups or [(i,) for i in range(n)]:
        if all(bdims[i] is None for i in group):
            continue  # unbatched: its batch dims broadcast from the right
        pad = widest - max(ranks[i] for i in group)
        for i in group:
            x, bdim = args[i], bdims[i]
            x = x.expand((batch,) + x.shape) if bdim is None else move_bdim_to_front(x, bdim)
            physical[i] = x.view(x.shape[:1] + (1,) * pad + x.shape[1:]) if pad else x
    if expand:  # the op needs every batch dim spelled out
        batch_shape = torch.broadcast_shapes(*(x.shape[: x.dim() - core] for x, core in zip(physical, cores)))
        physical[:n] = [x.expand(batch_shape + x.shape[x.dim() - core :]) for x, core in zip(physical, cores)]
    out = op(*physical, **kwargs)
    return out, _output_bdims(out, batch)


_register(
    [
        aten.linalg_inv_ex.default,
        aten.linalg_cholesky_ex.default,
        aten.cholesky.default,
        aten.cholesky_inverse.default,
        aten._linalg_det.default,
        aten._linalg_slogdet.default,
        aten.linalg_lu_factor_ex.default,
        aten.linalg_lu.default,
        aten._linalg_svd.default,
        aten._linalg_eigh.default,
        aten.linalg_eig.default,
        aten.linalg_qr.default,
        aten.geqrf.default,
        *overloads(aten._linalg_eigvals, "default"),
        *overloads(aten.linalg_ldl_factor_ex, "default"),
        *overloads(aten.linalg_pinv, "atol_rtol_tensor"),
    ],
    _matrix_unary,
)
# The kernel views the batch dims as one: it fails where they do not flatten.
_register([aten.linalg_matrix_exp.default], _matrix_unary, contiguous=True)
for _op, _spec in [
    (aten.linalg_solve_triangular.default, dict(cores=(2, 2))),
    (aten.triangular_solve.default, dict(cores=(2, 2))),
    (aten.cholesky_solve.default, dict(cores=(2, 2))),
    (aten._cholesky_solve_helper.default, dict(cores=(2, 2), groups=((0, 1),))),  # batch dims already equal
    (aten.linalg_lu_solve.default, dict(cores=(2, 1, 2), groups=((0, 1), (2,)))),
    (aten.lu_unpack.default, dict(cores=(2, 1), groups=((0, 1),))),
    (aten.linalg_householder_product.default, dict(cores=(2, 1), groups=((0, 1),))),
    (aten.ormqr.default, dict(cores=(2, 1, 2), groups=((0, 1, 2),))),
    # ldl_solve crashes (segfault, torch 2.13) when LD's batch dims broadcast.
    (aten.linalg_ldl_solve.default, dict(cores=(2, 1, 2), groups=((0, 1), (2,)), expand=True)),
]:
    _register([_op], _matrix_nary, **_spec)


def _solve_ex(op, bdims, A, B, *, left=True, check_errors=False):
    """linalg.solve.  Whether B is a vector (or a stack of them) is decided
    on the logical shapes, as eager decides it; a vector is solved as a
    one-column matrix, as eager solves it.  LU, pivots and info depend on A
    alone: with A unbatched they are computed once, unbatched."""
    ab, bb = bdims
    ra, rb = _rank(A, ab), _rank(B, bb)
    if ra < 2 or rb < 1:
        raise InvalidArguments
    vector = rb == 1 or (rb == ra - 1 and _logical_shape(B, bb) == _logical_shape(A, ab)[:-1])
    if vector:
        B, rb = B.unsqueeze(-1), rb + 1  # appending keeps the bdim
    rank = max(ra, rb)
    if ab is not None:
        A = front_padded(A, ab, rank)
    if bb is not None:
        B = front_padded(B, bb, rank)
    elif B.dim() < A.dim():  # else a B of rank A.dim() - 1 could pass for vectors
        B = B.view((1,) * (A.dim() - B.dim()) + B.shape)
    result, LU, pivots, info = op(A, B, left=left, check_errors=check_errors)
    if vector:
        result = result.squeeze(-1)
    if ab is None:
        return (result, LU, pivots, info), (0, None, None, None)
    if rank > ra:  # drop A's padding again: [B,1,n,n] -> [B,n,n]
        pad = rank - ra
        LU, pivots, info = (x.view(x.shape[:1] + x.shape[1 + pad :]) for x in (LU, pivots, info))
    return (result, LU, pivots, info), 0


def _lstsq(op, bdims, A, B, rcond=None, *, driver=None):
    """linalg.lstsq takes B as a stack of vectors when B.dim() == A.dim() - 1:
    decided on logical ranks, and solved as one-column matrices.  Both sides
    then have a batch dim (size 1 where unbatched: lstsq broadcasts it);
    rank and singular values depend on A alone."""
    ab, bb = bdims
    ra, rb = _rank(A, ab), _rank(B, bb)
    if ra < 2 or not 0 <= ra - rb <= 1:
        raise InvalidArguments
    vector = rb == ra - 1
    if vector:
        B = B.unsqueeze(-1)
    A = A.unsqueeze(0) if ab is None else move_bdim_to_front(A, ab)
    B = B.unsqueeze(0) if bb is None else move_bdim_to_front(B, bb)
    solution, residuals, rank, singular_values = op(A, B, rcond, driver=driver)
    if vector:
        solution = solution.squeeze(-1)  # residuals keep their size-1 dim, as in eager
    out_bdims = list(_output_bdims((solution, residuals, rank, singular_values), solution.shape[0]))
    if ab is None:  # computed once, with a leading 1 (unless an empty placeholder)
        rank, singular_values = (x.squeeze(0) if x.dim() and x.shape[0] == 1 else x for x in (rank, singular_values))
        out_bdims[2] = out_bdims[3] = None
    return (solution, residuals, rank, singular_values), tuple(out_bdims)


def _cross(op, bdims, a, b, *, dim=-1):
    ab, bb = bdims
    rank = _rank(a, ab)
    if _rank(b, bb) != rank:
        raise InvalidArguments
    # [B,...] with [...]: eager requires equal ranks, so the unbatched side
    # gets a size-1 batch (cross broadcasts it).
    a = a.unsqueeze(0) if ab is None else move_bdim_to_front(a, ab)
    b = b.unsqueeze(0) if bb is None else move_bdim_to_front(b, bb)
    return op(a, b, dim=wrap_dim(dim, rank) + 1), 0


def _trilinear(op, bdims, i1, i2, i3, expand1, expand2, expand3, sumdim, unroll_dim=1):
    """The batch is one more dim of all three inputs (expanded where
    unbatched: the op reads output sizes off its inputs), never summed."""
    if unroll_dim < 0:
        raise InvalidArguments
    batch = batch_size((i1, i2, i3), bdims)
    inputs = [materialize(x, bdim, batch) for x, bdim in zip((i1, i2, i3), bdims)]
    dims = [[d + 1 if d >= 0 else d for d in ds] for ds in (expand1, expand2, expand3, sumdim)]
    return op(*inputs, *dims, unroll_dim + 1), 0


def _trace(op, bdims, x):
    if x.dim() != 3 or x.dtype is torch.bool:
        raise InvalidArguments
    return x.diagonal(0, *_MATRIX_DIMS[bdims[0]]).sum(-1), 0


def _diag_embed(op, bdims, x, offset=0, dim1=-2, dim2=-1):
    rank = x.dim()  # the output's logical rank
    return op(move_bdim_to_front(x, bdims[0]), offset, wrap_dim(dim1, rank) + 1, wrap_dim(dim2, rank) + 1), 0


_register([aten._linalg_solve_ex.default], _solve_ex)
_register([aten.linalg_lstsq.default], _lstsq)
_register([aten.linalg_cross.default], _cross)
_register([aten._trilinear.default], _trilinear)
_register([aten.trace.default], _trace)
_register([aten.diag_embed.default], _diag_embed)


@register_batching(aten._linalg_check_errors.default)
def _check_errors(bdims, info, api_name, *, is_matrix):
    """A batched info holds one result per example: checked as a batch, so
    errors name the "(Batch element i)" that failed, as in torch.func."""
    aten._linalg_check_errors.default(move_bdim_to_front(info, bdims[0]).contiguous(), api_name, is_matrix=False)
    return None, None
