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

Their VJP rules follow the batching rules (see NOTE [Linear algebra
derivatives]), and their JVP rules close the file (see NOTE [Linear algebra
JVPs]).
"""

from __future__ import annotations

import functools

import torch

from .._core.registry import overloads, register_batching, register_batching_each, register_jvp, register_vjp
from ._batching import (
    InvalidArguments,
    batch_size,
    front_padded,
    materialize,
    move_bdim_to_front,
    with_eager_errors,
    wrap_dim,
)
from ._derivatives import linear_jvp, multilinear_jvp
from .elementwise import elementwise_batch, reduce_to

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


def _bmm(a, b):
    """torch.bmm of two [B, n, k] @ [B, k, m] stacks.  With k == 1 (the outer
    products that per-sample weight gradients are made of) a broadcasting
    mul gives the same values (one product per entry, nothing summed) and
    runs 1.5-3x faster than the gemm kernel, which is memory bound there."""
    if (a.shape[-1] == 1 and b.shape[-2] == 1 and a.shape[0] == b.shape[0] and a.dtype == b.dtype
            and a.is_floating_point()):
        return a * b
    return torch.bmm(a, b)


def _mm_like(op, bdims, a, b, *, lead):
    """mm (lead=0) and bmm (lead=1)."""
    ab, bb = bdims
    if _rank(a, ab) != lead + 2 or _rank(b, bb) != lead + 2:
        raise InvalidArguments
    if ab is not None and bb is not None:
        a, b = move_bdim_to_front(a, ab), move_bdim_to_front(b, bb)
        if lead == 0:
            return _bmm(a, b), 0
        # [B,b,n,k] @ [B,b,k,m] -> [B*b,n,k] @ [B*b,k,m] (bmm never broadcasts b)
        out = _bmm(a.flatten(0, 1), b.flatten(0, 1))
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
    if ra >= 3 and rb <= 2 and bb is not None:
        return _matmul_fold_stack(a, ab, b, bb, rb)
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


def _matmul_fold_stack(a, ab, b, bb, rb):
    """A stack of matrices against one batched matrix (or vector): the stack
    folds into the rows, as torch.matmul folds it, so one bmm (or a
    broadcast matmul over an unbatched stack) does the work instead of a
    bmm over B * s copies of the right operand.

    # [B,s,n,k] @ [B,k,m] -> [B,s*n,k] @ [B,k,m] -> [B,s*n,m] -> [B,s,n,m]
    # [s,n,k]   @ [B,k]   -> [s*n,k] @ [B,k,1] -> [B,s*n,1] -> [B,s,n]
    """
    b = move_bdim_to_front(b, bb)
    if rb == 1:
        b = b.unsqueeze(-1)
    if ab is None:
        stack = a.shape[:-1]
        rows = a.reshape(-1, a.shape[-1])
    else:
        a = move_bdim_to_front(a, ab)
        stack = a.shape[1:-1]
        rows = a.reshape(a.shape[0], -1, a.shape[-1])
    out = _bmm(rows, b) if rows.dim() == 3 else torch.matmul(rows, b)
    shape = (out.shape[0], *stack) if rb == 1 else (out.shape[0], *stack, out.shape[-1])
    return out.view(shape), 0


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


# ==========================================================================
# Derivatives.  Formulas from derivatives.yaml and PyTorch's
# FunctionsManual.cpp, written with torch ops on the values a rule gets, so
# that they compose with every transform (grad of grad, vmap of grad).
# NOTE [Linear algebra derivatives]
# * Adjoints are spelled `_adjoint(x)`: for complex values the conjugate is
#   materialized (conj_physical), since a lazy conj view made inside a rule
#   may be read raw below (see NOTE [Autograd inside rules]).
# * Arguments that broadcast (addmm's self, the batch dims of solve, cross,
#   lu_solve, ...) get their gradient summed back to their shape (reduce_to).
# * The LU factors that det, slogdet and solve return are not reused: det's
#   and slogdet's factor A or A^T depending on A's physical layout (an eager
#   optimisation a rule cannot see under vmap or nested levels), and none of
#   them carries a derivative, which second order needs.  Backward factors A
#   again (lu_factor_ex, or solve on A^H), as torch.autograd does whenever
#   higher-order gradients are wanted.
# * Decompositions whose outputs are defined up to a phase or sign (svd, eigh,
#   eig) differentiate the representative the forward returned, as PyTorch
#   does; PyTorch's check that a complex loss is phase invariant reads values
#   (allclose) and is not made here.
# ==========================================================================


def _conj(x):
    return x.conj_physical() if x.is_complex() else x


def _adjoint(x):
    return _conj(x.mT)


def _scaled(t, scalar):
    """``t`` times the conjugate of a Python scalar (maybe_multiply)."""
    if scalar == 1:
        return t
    return t * (scalar.conjugate() if isinstance(scalar, complex) else scalar)


def _eye_like(x, n=None, m=None):
    """The identity of ``x``'s last dims (or n x m), in x's real dtype."""
    n = x.shape[-1] if n is None else n
    return torch.eye(n, n if m is None else m, dtype=x.dtype.to_real(), device=x.device)


def _set_diagonal(x, diagonal):
    """``x`` with its diagonal replaced (out of place, batched-safe)."""
    return x - torch.diag_embed(x.diagonal(0, -2, -1)) + torch.diag_embed(diagonal)


def _tri(x, upper, unitriangular=False):
    """The triangle a triangular solver reads (its tangent space)."""
    return x.triu(int(unitriangular)) if upper else x.tril(-int(unitriangular))


def _reduced(grad, meta, need=True):
    return reduce_to(grad, meta) if need and grad is not None else None


def _is_vector_rhs(A_shape, B_shape):
    """linalg_solve_is_vector_rhs: B is a (batch of) vector(s) against A."""
    return len(B_shape) == 1 or (len(B_shape) == len(A_shape) - 1 and tuple(B_shape) == tuple(A_shape[:-1]))


# -- matrix products ------------------------------------------------------------
# d(a @ b) = da @ b + a @ db: the cotangent of a is grad @ b^H, of b a^H @ grad,
# each computed only when wanted (per-sample gradients of a linear layer need
# the weight's alone).


def _product_grads(product, grad, a, b, need_a, need_b, alpha=1):
    """Cotangents of ``a`` and ``b`` in ``alpha * product(a, b)``."""
    grad_a = _scaled(product(grad, _adjoint(b)), alpha) if need_a else None
    grad_b = _scaled(product(_adjoint(a), grad), alpha) if need_b else None
    return grad_a, grad_b


def _column_major(x):
    """Whether a matrix is laid out as the transpose of a contiguous one, as
    ``weight.t()`` in F.linear's ``addmm(bias, input, weight.t())``."""
    return x.stride(0) == 1 and x.stride(1) == x.shape[0]


def _mm_grads(grad, a, b, need_a, need_b, alpha=1):
    """Cotangents of ``a`` and ``b`` in ``alpha * (a @ b)``, each in the
    layout of its primal, as autograd's mm_mat1_backward/mm_mat2_backward:
    the cotangent of a column-major operand is computed transposed,
    ``(a^H @ g) = (g^T @ a^*)^T``, so it comes out column-major.  For
    F.linear's ``weight.t()`` that makes the weight's gradient contiguous
    (a per-sample [B, out, in] without a copy) and, under vmap, puts the
    batched cotangent on the left of the product, where the batch folds
    into the rows (NOTE [Folding the batch into a matmul]) instead of
    broadcasting the other operand."""
    grad_a = grad_b = None
    if need_a:
        if _column_major(a):  # (g @ b^H)^T = b^* @ g^T
            grad_a = torch.mm(_conj(b), grad.mT).mT
        else:
            grad_a = torch.mm(grad, _adjoint(b))
        grad_a = _scaled(grad_a, alpha)
    if need_b:
        if _column_major(b):  # (a^H @ g)^T = g^T @ a^*
            grad_b = torch.mm(grad.mT, _conj(a)).mT
        else:
            grad_b = torch.mm(_adjoint(a), grad)
        grad_b = _scaled(grad_b, alpha)
    return grad_a, grad_b


@register_vjp(aten.mm.default)
def mm_vjp(grad, self, mat2, needs):
    return _mm_grads(grad, self, mat2, needs[0], needs[1])


@register_vjp(aten.bmm.default)
def bmm_vjp(grad, self, mat2, needs):
    return _product_grads(torch.bmm, grad, self, mat2, needs[0], needs[1])


@register_vjp(aten.addmm.default, aten.addmm_.default)
def addmm_vjp(grad, mat1, mat2, needs, inputs_meta, beta=1, alpha=1):
    return (_reduced(_scaled(grad, beta), inputs_meta[0], needs[0]),
            *_mm_grads(grad, mat1, mat2, needs[1], needs[2], alpha))


@register_vjp(aten.baddbmm.default, aten.baddbmm_.default)
def baddbmm_vjp(grad, batch1, batch2, needs, inputs_meta, beta=1, alpha=1):
    return (_reduced(_scaled(grad, beta), inputs_meta[0], needs[0]),
            *_product_grads(torch.bmm, grad, batch1, batch2, needs[1], needs[2], alpha))


@register_vjp(aten.addbmm.default, aten.addbmm_.default)
def addbmm_vjp(grad, batch1, batch2, needs, inputs_meta, beta=1, alpha=1):
    # sum_b batch1[b] @ batch2[b]: every b sees the same cotangent
    expanded = grad.unsqueeze(0).expand(batch1.shape[0], *grad.shape)
    return (_reduced(_scaled(grad, beta), inputs_meta[0], needs[0]),
            *_product_grads(torch.bmm, expanded, batch1, batch2, needs[1], needs[2], alpha))


def _mv_grads(grad, mat, vec, need_mat, need_vec, alpha=1):
    grad_mat = _scaled(grad.unsqueeze(-1) * _conj(vec), alpha) if need_mat else None  # outer(grad, vec^*)
    grad_vec = _scaled(torch.mv(_adjoint(mat), grad), alpha) if need_vec else None
    return grad_mat, grad_vec


@register_vjp(aten.mv.default)
def mv_vjp(grad, self, vec, needs):
    return _mv_grads(grad, self, vec, needs[0], needs[1])


@register_vjp(aten.addmv.default, aten.addmv_.default)
def addmv_vjp(grad, mat, vec, needs, inputs_meta, beta=1, alpha=1):
    return (_reduced(_scaled(grad, beta), inputs_meta[0], needs[0]),
            *_mv_grads(grad, mat, vec, needs[1], needs[2], alpha))


@register_vjp(aten.dot.default)
def dot_vjp(grad, self, tensor, needs):
    return (grad * _conj(tensor) if needs[0] else None, grad * _conj(self) if needs[1] else None)


@register_vjp(aten.vdot.default)
def vdot_vjp(grad, self, other, needs):
    return (_conj(grad) * other if needs[0] else None, grad * self if needs[1] else None)


@register_vjp(aten.addr.default, aten.addr_.default)
def addr_vjp(grad, vec1, vec2, needs, inputs_meta, beta=1, alpha=1):
    # addr promotes like an elementwise op: the products run in grad's dtype
    # and reduce_to casts back.
    grad_vec1 = grad_vec2 = None
    if needs[1]:
        grad_vec1 = reduce_to(_scaled(torch.mv(grad, _conj(vec2).to(grad.dtype)), alpha), inputs_meta[1])
    if needs[2]:
        grad_vec2 = reduce_to(_scaled(torch.mv(grad.mT, _conj(vec1).to(grad.dtype)), alpha), inputs_meta[2])
    return _reduced(_scaled(grad, beta), inputs_meta[0], needs[0]), grad_vec1, grad_vec2


def _flatten_rows(x):
    """[..., n, k] -> [N, k]: the batch folded into the rows."""
    return x.reshape(-1, x.shape[-1])


@register_vjp(aten.matmul.default)
def matmul_vjp(grad, self, other, needs):
    """matmul with numpy semantics: vectors become one-row (left) or
    one-column (right) matrices, then broadcast batch dims are summed away.
    A 2-D operand against a batch gets the batch folded into one mm:
    [B,n,k] @ [k,m]: grad_other = [B*n,k]^H @ [B*n,m]."""
    a, b, g = self, other, grad
    if b.dim() == 1:
        b, g = b.unsqueeze(-1), g.unsqueeze(-1)
    if a.dim() == 1:
        a, g = a.unsqueeze(0), g.unsqueeze(-2)
    grad_a = grad_b = None
    if needs[0]:
        if a.dim() == 2 and b.dim() > 2:  # [n,k] @ [B,k,m]: sum_B g_B b_B^H = [n,B*m] @ [B*m,k]
            grad_a = g.movedim(-2, 0).reshape(g.shape[-2], -1).mm(_flatten_rows(_adjoint(b)))
        else:
            grad_a = torch.matmul(g, _adjoint(b))
        grad_a = grad_a.sum_to_size(a.shape).reshape(self.shape)
    if needs[1]:
        if b.dim() == 2 and a.dim() > 2:
            grad_b = _adjoint(_flatten_rows(a)).mm(_flatten_rows(g))
        else:
            grad_b = torch.matmul(_adjoint(a), g)
        grad_b = grad_b.sum_to_size(b.shape).reshape(other.shape)
    return grad_a, grad_b


@register_vjp(aten.linear.default)
def linear_vjp(grad, input, weight, needs, inputs_meta):
    """input @ weight^T + bias: grad_input = grad @ weight^*, grad_weight =
    grad^T @ input^* over the flattened batch."""
    grad_input = grad_weight = grad_bias = None
    if weight.dim() == 1:  # [..., k] @ [k] -> [...]
        if needs[0]:
            grad_input = grad.unsqueeze(-1) * _conj(weight)
        if needs[1]:
            grad_weight = (grad.unsqueeze(-1) * _conj(input)).sum_to_size(weight.shape)
    else:
        if needs[0]:
            grad_input = torch.matmul(grad, _conj(weight))
        if needs[1]:
            if input.dim() == 1:
                grad_weight = grad.unsqueeze(-1) * _conj(input)
            else:
                grad_weight = _flatten_rows(grad).mT.mm(_conj(_flatten_rows(input)))
    if len(needs) > 2 and needs[2]:
        grad_bias = reduce_to(grad, inputs_meta[2])
    return grad_input, grad_weight, grad_bias


@register_vjp(aten._trilinear.default)
def trilinear_vjp(grad, i1, i2, i3, expand1, expand2, expand3, sumdim, needs):
    """_trilinear_backward: each input's cotangent is the trilinear product
    of the cotangent with the other two, the roles of its expanded and summed
    dims swapped."""
    trilinear = aten._trilinear.default
    return (
        trilinear(grad, i2, i3, sumdim, expand2, expand3, expand1) if needs[0] else None,
        trilinear(i1, grad, i3, expand1, sumdim, expand3, expand2) if needs[1] else None,
        trilinear(i1, i2, grad, expand1, expand2, sumdim, expand3) if needs[2] else None,
    )


@register_vjp(aten.trace.default)
def trace_vjp(grad, inputs_meta):
    shape = inputs_meta[0][0]
    return (reduce_to(grad * _eye_like(grad, shape[0], shape[1]), inputs_meta[0]),)


@register_vjp(aten.diag_embed.default)
def diag_embed_vjp(grad, offset=0, dim1=-2, dim2=-1):
    return (grad.diagonal(offset, dim1, dim2),)


@register_vjp(aten.linalg_cross.default)
def cross_vjp(grad, self, other, needs, inputs_meta, dim=-1):
    return (
        _reduced(torch.linalg.cross(_conj(other), grad, dim=dim), inputs_meta[0], needs[0]),
        _reduced(torch.linalg.cross(grad, _conj(self), dim=dim), inputs_meta[1], needs[1]),
    )


# -- inverses, determinants, solvers ------------------------------------------------


@register_vjp(aten.linalg_inv_ex.default)
def inv_ex_vjp(grad, result):
    grad_inverse = grad[0]
    if grad_inverse is None:
        return (None,)
    inverse_h = _adjoint(result[0])
    return (-torch.matmul(inverse_h, torch.matmul(grad_inverse, inverse_h)),)


def _solve_adjoint(A, rhs):
    """A^{-H} rhs from a fresh LU of A (see NOTE [Linear algebra derivatives])."""
    LU, pivots, _ = torch.linalg.lu_factor_ex(A)
    return torch.linalg.lu_solve(LU, pivots, rhs, adjoint=True)


def _scaled_identity(scale, n):
    """diag_embed of ``scale`` repeated n times: [..., n, n]."""
    return torch.diag_embed(scale.unsqueeze(-1).expand(*scale.shape, n))


@register_vjp(aten._linalg_det.default)
def det_vjp(grad, A):
    """d det = tr(adj(A) dA), so grad_A = grad adj(A)^H = (grad det^*) A^{-H},
    computed from a fresh LU of A whose exact zero pivots are nudged to eps,
    det taken from the same nudged factors.  adj is a polynomial in A, so at
    a singular A this is adj(A) up to O(eps): torch.autograd's create_graph
    path (an SVD formula) gives the same; its first-order backward gives 0."""
    grad_det = grad[0]
    if grad_det is None or A.numel() == 0:
        return (None,)
    n = A.shape[-1]
    LU, pivots, _ = torch.linalg.lu_factor_ex(A)
    diagonal = LU.diagonal(0, -2, -1)
    nudge = (diagonal == 0).to(A.dtype.to_real()) * torch.finfo(A.dtype).eps
    LU = LU + torch.diag_embed(nudge)
    swaps = (pivots != torch.arange(1, n + 1, dtype=pivots.dtype, device=pivots.device)).sum(-1)
    det = (diagonal + nudge).prod(-1) * (1 - 2 * (swaps % 2))
    scale = grad_det * _conj(det)
    return (torch.linalg.lu_solve(LU, pivots, _scaled_identity(scale, n), adjoint=True),)


@register_vjp(aten._linalg_slogdet.default)
def slogdet_vjp(grad, A, result):
    """d logabsdet = Re tr(A^{-1} dA); d sign = i sign Im tr(A^{-1} dA):
    grad_A = (g_logabsdet - i Im(g_sign^* sign)) A^{-H}."""
    grad_sign, grad_logabsdet = grad[0], grad[1]
    if A.is_complex():
        if grad_sign is None and grad_logabsdet is None:
            return (None,)
        scale = torch.zeros_like(result[1]) if grad_logabsdet is None else grad_logabsdet
        if grad_sign is not None:
            scale = scale - 1j * (_conj(grad_sign) * result[0]).imag
        scale = scale.to(A.dtype)
    else:  # the sign of a real matrix is locally constant
        if grad_logabsdet is None:
            return (None,)
        scale = grad_logabsdet
    return (_solve_adjoint(A, _scaled_identity(scale, A.shape[-1])),)


@register_vjp(aten._linalg_solve_ex.default)
def solve_ex_vjp(grad, A, result, needs, inputs_meta, left=True):
    """X = A^{-1} B: grad_B = A^{-H} grad_X, grad_A = -grad_B X^H (left=False:
    X = B A^{-1}, grad_A = -X^H grad_B).  A vector B is solved as a column."""
    grad_x = grad[0]
    if grad_x is None:
        return (None, None)
    X = result[0]
    vector = _is_vector_rhs(A.shape, X.shape)
    if vector:
        X, grad_x = X.unsqueeze(-1), grad_x.unsqueeze(-1)
    grad_b = torch.linalg.solve_ex(_adjoint(A), grad_x, left=left)[0]
    grad_a = None
    if needs[0]:
        grad_a = reduce_to(-(grad_b @ _adjoint(X) if left else _adjoint(X) @ grad_b), inputs_meta[0])
    if needs[1]:
        grad_b = reduce_to(grad_b.squeeze(-1) if vector else grad_b, inputs_meta[1])
    return grad_a, grad_b if needs[1] else None


@register_vjp(aten.linalg_solve_triangular.default)
def solve_triangular_vjp(grad, self, result, needs, inputs_meta, upper, left=True, unitriangular=False):
    """X = A^{-1} B for triangular A: grad_B = A^{-H} grad, grad_A = -grad_B X^H
    on A's triangle (the tangent space of triangular matrices)."""
    grad_b = torch.linalg.solve_triangular(
        _adjoint(self), grad, upper=not upper, left=left, unitriangular=unitriangular
    )
    grad_a = None
    if needs[0]:
        x_h = _adjoint(result)
        grad_a = reduce_to(_tri(-(grad_b @ x_h if left else x_h @ grad_b), upper, unitriangular), inputs_meta[0])
    return grad_a, _reduced(grad_b, inputs_meta[1], needs[1])


@register_vjp(aten.triangular_solve.default)
def triangular_solve_vjp(grad, A, result, needs, inputs_meta, upper=True, transpose=False, unitriangular=False):
    """triangular_solve(B, A) -> (X, clone of A): as solve_triangular, plus
    the cloned coefficient's cotangent passed straight to A."""
    grad_x, grad_clone = grad
    grad_b = grad_a = None
    if grad_x is not None:
        grad_b = torch.triangular_solve(grad_x, _conj(A), upper, not transpose, unitriangular)[0]
        if needs[1]:
            x = result[0]
            grad_a = _tri(-(_conj(x) @ grad_b.mT if transpose else grad_b @ _adjoint(x)), upper, unitriangular)
    if needs[1] and grad_clone is not None:
        grad_a = grad_clone if grad_a is None else grad_a + grad_clone
    return _reduced(grad_b, inputs_meta[0], needs[0]), _reduced(grad_a, inputs_meta[1], needs[1])


# -- Cholesky --------------------------------------------------------------------------


def _cholesky_backward(grad_l, L, upper):
    """grad_A = L^{-H} Phi(L^H grad_L) L^{-1}, Phi taking the lower triangle
    with half the diagonal, symmetrized: the gradient is Hermitian."""
    if upper:
        L, grad_l = _adjoint(L), _adjoint(grad_l)
    L_h = _adjoint(L)
    phi = (L_h @ grad_l).tril()
    phi = 0.5 * (phi + _adjoint(phi.tril(-1)))
    grad_a = torch.linalg.solve_triangular(L_h, phi, upper=True, left=True)
    return torch.linalg.solve_triangular(L, grad_a, upper=False, left=False)


@register_vjp(aten.linalg_cholesky_ex.default)
def cholesky_ex_vjp(grad, result, upper=False):
    return (None if grad[0] is None else _cholesky_backward(grad[0], result[0], upper),)


@register_vjp(aten.cholesky.default)
def cholesky_vjp(grad, result, upper=False):
    return (_cholesky_backward(grad, result, upper),)


@register_vjp(aten.cholesky_solve.default)
def cholesky_solve_vjp(grad, input2, result, needs, inputs_meta, upper=False):
    """X = (L L^H)^{-1} B: grad_B = (L L^H)^{-1} grad, grad_L = -(S + S^H) L
    with S = grad_B X^H (upper: -U (S + S^H))."""
    grad_b = torch.cholesky_solve(grad, input2, upper)
    grad_factor = None
    if needs[1]:
        common = grad_b @ _adjoint(result)
        common = common + _adjoint(common)
        grad_factor = reduce_to(-(input2 @ common) if upper else -(common @ input2), inputs_meta[1])
    return _reduced(grad_b, inputs_meta[0], needs[0]), grad_factor


@register_vjp(aten.cholesky_inverse.default)
def cholesky_inverse_vjp(grad, self, result, upper=False):
    common = grad + _adjoint(grad)
    common = result @ common @ result
    return (-(self @ common) if upper else -(common @ self),)


# -- LU ------------------------------------------------------------------------------------


def _lu_backward(grad_l, grad_u, P, L, U, pivot):
    """linalg_lu_backward: A = P L U (L unit lower m x k, U upper k x n).
    Square: grad_A = P L^{-H} [tril_-1(L^H grad_L) + triu(grad_U U^H)] U^{-H};
    a wide (tall) A also carries the extra block of U (L) through."""
    m, n = L.shape[-2], U.shape[-1]
    k = min(m, n)
    grad_l = torch.zeros_like(L) if grad_l is None else grad_l
    grad_u = torch.zeros_like(U) if grad_u is None else grad_u
    L_h, U_h = _adjoint(L), _adjoint(U)
    lower = L_h @ grad_l.tril(-1)  # [k, k]
    upper = grad_u.triu() @ U_h  # [k, k]
    solve = torch.linalg.solve_triangular
    if m == n:
        grad_a = solve(U_h, lower.tril(-1) + upper.triu(), upper=False, left=False)
        grad_a = solve(L_h, grad_a, upper=True, left=True, unitriangular=True)
    elif m < n:  # wide: U = [U1 | U2]
        grad_a = solve(_adjoint(U.narrow(-1, 0, k)), (lower - upper).tril(-1), upper=False, left=False)
        grad_a = torch.cat([grad_a + grad_u.narrow(-1, 0, k).triu(), grad_u.narrow(-1, k, n - k)], -1)
        grad_a = solve(L_h, grad_a, upper=True, left=True, unitriangular=True)
    else:  # tall: L = [L1; L2]
        grad_a = solve(_adjoint(L.narrow(-2, 0, k)), (upper - lower).triu(), upper=True, left=True, unitriangular=True)
        grad_a = torch.cat([grad_a + grad_l.narrow(-2, 0, k).tril(-1), grad_l.narrow(-2, k, m - k)], -2)
        grad_a = solve(U_h, grad_a, upper=False, left=False)
    return P @ grad_a if pivot else grad_a


@register_vjp(aten.linalg_lu.default)
def lu_vjp(grad, result, pivot=True):
    _, grad_l, grad_u = grad
    if grad_l is None and grad_u is None:
        return (None,)
    P, L, U = result
    return (_lu_backward(grad_l, grad_u, P, L, U, pivot),)


@register_vjp(aten.linalg_lu_factor_ex.default)
def lu_factor_ex_vjp(grad, result, pivot=True):
    """The packed LU's cotangent is L's below the diagonal and U's on and above."""
    grad_lu = grad[0]
    if grad_lu is None:
        return (None,)
    LU, pivots = result[0], result[1]
    P, L, U = torch.lu_unpack(LU, pivots, unpack_data=True, unpack_pivots=pivot)
    k = min(LU.shape[-2], LU.shape[-1])
    return (_lu_backward(grad_lu.narrow(-1, 0, k), grad_lu.narrow(-2, 0, k), P, L, U, pivot),)


def _lu_solve_lu_grad(grad_x, LU, pivots, X, left, adjoint):
    """linalg_lu_solve_LU: the cotangent of the packed LU of a solve."""
    P, L, U = torch.lu_unpack(LU, pivots, unpack_data=True, unpack_pivots=left == adjoint)
    L_h, U_h = _adjoint(L), _adjoint(U)
    if left != adjoint:
        # gR = U^{-H} op(-grad_X) op(X)^H;  grad_LU = tril_-1(L^{-H} gR U^H) + triu(gR)
        rhs = -(grad_x @ _adjoint(X)) if left else -(_adjoint(grad_x) @ X)
        g_r = torch.linalg.solve_triangular(U_h, rhs, upper=False)
        g_l = torch.linalg.solve_triangular(L_h, g_r @ U_h, upper=True, left=True, unitriangular=True)
        return g_l.tril(-1) + g_r.triu()
    # gR = -P^T op(X) op(grad_X)^H P L^{-H};  grad_LU = tril_-1(gR) + triu(L^H gR U^{-H})
    g_r = -(P.mT @ (X if left else _adjoint(X)) @ (_adjoint(grad_x) if left else grad_x) @ P)
    g_r = torch.linalg.solve_triangular(L_h, g_r, upper=True, left=False, unitriangular=True)
    g_u = torch.linalg.solve_triangular(U_h, L_h @ g_r, upper=False, left=False)
    return g_r.tril(-1) + g_u.triu()


@register_vjp(aten.linalg_lu_solve.default)
def lu_solve_vjp(grad, LU, pivots, result, needs, inputs_meta, left=True, adjoint=False):
    grad_lu = grad_b = None
    if needs[0]:
        grad_lu = reduce_to(_lu_solve_lu_grad(grad, LU, pivots, result, left, adjoint), inputs_meta[0])
    if needs[2]:
        grad_b = reduce_to(torch.linalg.lu_solve(LU, pivots, grad, left=left, adjoint=not adjoint), inputs_meta[2])
    return grad_lu, None, grad_b


@register_vjp(aten.lu_unpack.default)
def lu_unpack_vjp(grad, inputs_meta, unpack_data=True):
    """L and U read the packed LU's strict lower and upper triangles; wide or
    tall LU: U or L also reads the extra block."""
    _, grad_l, grad_u = grad
    if not unpack_data or (grad_l is None and grad_u is None):
        return (None, None)
    m, n = inputs_meta[0][0][-2:]
    k = min(m, n)
    pieces = []
    if grad_l is not None:
        lower = grad_l.narrow(-2, 0, k).tril(-1)
        if m > n:
            lower = torch.cat([lower, grad_l.narrow(-2, k, m - k)], -2)
        elif m < n:
            lower = torch.cat([lower, lower.new_zeros(lower.shape[:-1] + (n - m,))], -1)
        pieces.append(lower)
    if grad_u is not None:
        upper = grad_u.narrow(-1, 0, k).triu()
        if n > m:
            upper = torch.cat([upper, grad_u.narrow(-1, k, n - k)], -1)
        elif n < m:
            upper = torch.cat([upper, upper.new_zeros(upper.shape[:-2] + (m - n, n))], -2)
        pieces.append(upper)
    return (pieces[0] if len(pieces) == 1 else pieces[0] + pieces[1], None)


# -- QR and Householder products ----------------------------------------------------------


@register_vjp(aten.linalg_qr.default)
def qr_vjp(grad, result, mode="reduced"):
    """linalg_qr_backward.  m >= n: grad_A = (grad_Q + Q syminvadj(triu(M)))
    R^{-H}, M = grad_R R^H - Q^H grad_Q; m < n: the leading square block, then
    grad_A += Q grad_R."""
    if mode == "r":
        raise RuntimeError(
            "The derivative of linalg.qr depends on Q, which is not computed when mode='r'. Please use "
            "linalg.qr(A, mode='reduced') if you are going to differentiate through linalg.qr."
        )
    grad_q, grad_r = grad
    Q, R = result
    m, n = Q.shape[-2], R.shape[-1]
    if mode == "complete" and m > n:
        raise RuntimeError("The QR decomposition is not differentiable when mode='complete' and nrows > ncols.")
    if grad_q is None and grad_r is None:
        return (None,)
    if grad_q is None:
        M = grad_r @ _adjoint(R)
    elif grad_r is None:
        M = -(_adjoint(Q) @ grad_q)
    else:
        M = grad_r @ _adjoint(R) - _adjoint(Q) @ grad_q
    if m >= n:
        upper = M.triu(1)
        diagonal = M.diagonal(0, -2, -1)
        # syminvadj(triu(M)) = triu_1 + triu_1^H + Re(diag)
        sym = upper + _adjoint(upper) + torch.diag_embed(diagonal.real if diagonal.is_complex() else diagonal)
        grad_a = Q @ sym
        if grad_q is not None:
            grad_a = grad_a + grad_q
        return (torch.linalg.solve_triangular(_adjoint(R), grad_a, upper=False, left=False),)
    # trilImInvAdjSkew(-M): (X - X^H).tril() with half the (imaginary) diagonal, X = -M
    skew = -_skew(M).tril(-1)
    if M.is_complex():
        skew = skew + torch.diag_embed(-1j * M.diagonal(0, -2, -1).imag)
    grad_a = torch.linalg.solve_triangular(_adjoint(R.narrow(-1, 0, m)), Q @ skew, upper=False, left=False)
    grad_a = torch.cat([grad_a, grad_a.new_zeros(grad_a.shape[:-1] + (n - m,))], -1)
    if grad_r is not None:
        grad_a = grad_a + Q @ grad_r
    return (grad_a,)


def _reflect(v, t, K, left):
    """(I - t v v^H) K (left) or K (I - t v v^H); v [..., m, 1], t [..., 1]."""
    t = t.unsqueeze(-1)
    if left:
        return K - (t * v) * (_adjoint(v) @ K)
    return K - (K @ (t * v)) * _adjoint(v)


def _householder_backward(grad, result, input, tau, flip_order=False):
    """householder_product_backward: Q = H_1 ... H_k with H_i = I - tau_i v_i v_i^H.
    K_i = H_{i+1..k} Q grad^H H_{1..i-1} is updated by one reflector on each
    side per step, H_i^{-1} being H_i(sigma_i), sigma = tau / (tau |v|^2 - 1)."""
    m, n = input.shape[-2], input.shape[-1]
    k = tau.shape[-1]
    V = input.tril(-1) + _eye_like(input, m, n).to(input.dtype)
    first_k = V.narrow(-1, 0, k)
    sigma = tau / (tau * (first_k * _conj(first_k)).sum(-2) - 1.0)
    K = result @ _adjoint(grad)
    order = list(range(k))[::-1] if flip_order else list(range(k))

    def column(x, i):
        return x.narrow(-1, i, 1)

    K = _reflect(column(V, order[0]), column(sigma, order[0]), K, left=not flip_order)
    grads_v, grads_tau = [None] * k, [None] * k
    for step, i in enumerate(order):
        v, t = column(V, i), column(tau, i)
        tail = v.narrow(-2, i, m - i)
        vHK = _adjoint(tail) @ K.narrow(-2, i, m - i)  # [..., 1, m]
        Kv = K.narrow(-1, i, m - i) @ tail  # [..., m, 1]
        t_ = t.unsqueeze(-1)
        grads_v[i] = (_conj(-t_ * vHK).squeeze(-2) - (t_ * Kv).squeeze(-1)).unsqueeze(-1)
        grads_tau[i] = -_conj(vHK.narrow(-1, i, m - i) @ tail).squeeze(-1)
        if step + 1 < k:
            following = order[step + 1]
            K = _reflect(column(V, following), column(sigma, following), K, left=not flip_order)
            K = _reflect(v, t, K, left=flip_order)
    if k < n:
        grads_v.append(input.new_zeros(input.shape[:-1] + (n - k,)))
    return torch.cat(grads_v, -1).tril(-1), torch.cat(grads_tau, -1)


@register_vjp(aten.linalg_householder_product.default)
def householder_product_vjp(grad, input, tau, result, needs):
    if input.numel() == 0 or tau.numel() == 0:
        return (None, None)
    grad_input, grad_tau = _householder_backward(grad, result, input, tau)
    return (grad_input if needs[0] else None, grad_tau if needs[1] else None)


@register_vjp(aten.ormqr.default)
def ormqr_vjp(grad, self, input2, result, needs, left=True, transpose=False):
    """ormqr(V, tau, C) = op(Q) C or C op(Q): C's cotangent applies the
    adjoint; V's and tau's come from the Householder backward with the roles
    of grad and result swapped when Q acts from the other side."""
    grad_v = grad_tau = grad_c = None
    if needs[2]:
        grad_c = torch.ormqr(self, input2, grad, left, not transpose)
    if (needs[0] or needs[1]) and self.numel() and input2.numel():
        if left != transpose:
            pair = (grad, result) if not transpose else (_adjoint(grad), _adjoint(result))
            grad_v, grad_tau = _householder_backward(*pair, self, input2)
        else:
            pair = (_adjoint(result), _adjoint(grad)) if not transpose else (result, grad)
            grad_v, grad_tau = _householder_backward(*pair, self, input2, flip_order=True)
    return (grad_v if needs[0] else None, grad_tau if needs[1] else None, grad_c)


# -- spectral decompositions ------------------------------------------------------------------


def _off_diagonal_gaps(values):
    """E[j, k] = values[k] - values[j], with 1 on the diagonal (a safe divisor)."""
    return values.unsqueeze(-2) - values.unsqueeze(-1) + _eye_like(values)


def _skew(x):
    return x - _adjoint(x)


def _svd_backward(grad_u, grad_s, grad_vh, U, S, Vh):
    """svd_backward (reduced U [m,k], S [k], Vh [k,n]): with skew(X) = X - X^H
    and E the gaps of S^2, grad_A = U [(skew(U^H gU)/E) S + S (skew(V^H gV)/E)
    + diag(gS)] V^H, plus the parts of gU (m > n) or gV (m < n) outside the
    span of U or V."""
    if grad_u is None and grad_s is None and grad_vh is None:
        return None
    m, n = U.shape[-2], Vh.shape[-1]
    if grad_u is None and grad_vh is None:  # singular values only: U diag(gS) V^H
        return U @ (grad_s.unsqueeze(-1) * Vh) if m >= n else (U * grad_s.unsqueeze(-2)) @ Vh
    uh_gu = _skew(_adjoint(U) @ grad_u) if grad_u is not None else None
    vh_gv = _skew(Vh @ _adjoint(grad_vh)) if grad_vh is not None else None
    gaps = _off_diagonal_gaps(S * S)
    if uh_gu is not None and vh_gv is not None:
        inner = (uh_gu * S.unsqueeze(-2) + S.unsqueeze(-1) * vh_gv) / gaps
    elif uh_gu is not None:
        inner = (uh_gu / gaps) * S.unsqueeze(-2)
    else:
        inner = S.unsqueeze(-1) * (vh_gv / gaps)
    if grad_s is not None:
        inner = inner + torch.diag_embed(grad_s)
    if U.is_complex() and uh_gu is not None and vh_gv is not None:
        inner = inner + torch.diag_embed(uh_gu.diagonal(0, -2, -1) / (2 * S))
    if m > n and grad_u is not None:
        grad_a = U @ inner
        gu_sinv = grad_u / S.unsqueeze(-2)
        grad_a = grad_a + gu_sinv - U @ (_adjoint(U) @ gu_sinv)
        return grad_a @ Vh
    if m < n and grad_vh is not None:
        grad_a = inner @ Vh
        sinv_gvh = grad_vh / S.unsqueeze(-1)
        grad_a = grad_a + sinv_gvh - (sinv_gvh @ _adjoint(Vh)) @ Vh
        return U @ grad_a
    return U @ (inner @ Vh) if m >= n else (U @ inner) @ Vh


def _needs_vectors(name, computed):
    if not computed:
        raise RuntimeError(
            f"grad: {name} was called without computing the vectors its derivative needs; call the "
            f"public API (torch.linalg.svd / svdvals, eigh / eigvalsh), which computes them under grad."
        )


@register_vjp(aten._linalg_svd.default)
def svd_vjp(grad, result, full_matrices=False, compute_uv=True):
    grad_u, grad_s, grad_vh = grad
    if grad_u is None and grad_s is None and grad_vh is None:
        return (None,)
    _needs_vectors("_linalg_svd(compute_uv=False)", compute_uv)
    U, S, Vh = result
    if full_matrices:  # only the leading k singular vectors are determined
        k = S.shape[-1]
        U, Vh = U.narrow(-1, 0, k), Vh.narrow(-2, 0, k)
        grad_u = None if grad_u is None else grad_u.narrow(-1, 0, k)
        grad_vh = None if grad_vh is None else grad_vh.narrow(-2, 0, k)
    return (_svd_backward(grad_u, grad_s, grad_vh, U, S, Vh),)


@register_vjp(aten._linalg_eigh.default)
def eigh_vjp(grad, result, compute_v=True):
    """A = V diag(L) V^H: grad_A = V [diag(gL) + skew(V^H gV)/2 / E] V^H."""
    grad_values, grad_vectors = grad
    if grad_values is None and grad_vectors is None:
        return (None,)
    _needs_vectors("_linalg_eigh(compute_v=False)", compute_v)
    values, V = result
    if grad_vectors is None:
        return ((V * grad_values.unsqueeze(-2)) @ _adjoint(V),)
    vh_gv = _adjoint(V) @ grad_vectors
    inner = 0.5 * _skew(vh_gv) / _off_diagonal_gaps(values)
    if grad_values is not None:
        inner = _set_diagonal(inner, grad_values)
    return (V @ (inner @ _adjoint(V)),)


@register_vjp(aten.linalg_eig.default)
def eig_vjp(grad, result, inputs_meta):
    """A = V diag(L) V^{-1}, unit-norm columns: grad_A = V^{-H} [diag(gL) +
    (V^H gV - V^H V Re diag(V^H gV)) / E^*] V^H (real part for a real A)."""
    grad_values, grad_vectors = grad
    if grad_values is None and grad_vectors is None:
        return (None,)
    values, V = result
    V_h = _adjoint(V)
    if grad_vectors is None:
        inner_v_h = grad_values.unsqueeze(-1) * V_h
    else:
        vh_gv = V_h @ grad_vectors
        vh_gv = vh_gv - V_h @ (V * vh_gv.diagonal(0, -2, -1).real.unsqueeze(-2))
        inner = vh_gv / _off_diagonal_gaps(_conj(values))
        if grad_values is not None:
            inner = _set_diagonal(inner, grad_values)
        inner_v_h = inner @ V_h
    return (reduce_to(torch.linalg.solve(V_h, inner_v_h), inputs_meta[0]),)


# -- matrix functions, pseudo-inverse, least squares -------------------------------------------


@register_vjp(aten.linalg_matrix_exp.default)
def matrix_exp_vjp(grad, self):
    """Mathias' block trick: exp([[A^H, G], [0, A^H]]) holds the adjoint of
    the differential at A applied to G in its upper-right block."""
    A = _adjoint(self)
    n = A.shape[-1]
    block = torch.cat([torch.cat([A, grad], -1), torch.cat([torch.zeros_like(A), A], -1)], -2)
    return (torch.linalg.matrix_exp(block).narrow(-2, 0, n).narrow(-1, n, n),)


def _pinv_backward(grad, pinv, A):
    m, n = A.shape[-2], A.shape[-1]
    pinv_h, grad_h = _adjoint(pinv), _adjoint(grad)
    if m <= n:
        K = grad_h @ pinv
        K_pinv_h = K @ pinv_h
        return (-_adjoint(pinv @ K) + K_pinv_h - (A @ pinv) @ K_pinv_h
                + (pinv_h @ pinv) @ (grad_h - K @ A))
    K = pinv @ grad_h
    pinv_h_K = pinv_h @ K
    return (-_adjoint(K @ pinv) + ((grad_h - A @ K) @ pinv) @ pinv_h + pinv_h_K
            - (pinv_h_K @ pinv) @ A)


@register_vjp(aten.linalg_pinv.atol_rtol_tensor)
def pinv_vjp(grad, self, result):
    return (_pinv_backward(grad, result, self),)


@register_vjp(aten.linalg_lstsq.default)
def lstsq_vjp(grad, self, b, result, needs, inputs_meta):
    """X = pinv(A) B: through pinv's backward; the residuals |A X - B|^2 add
    2 (A X - B) terms (Danskin: X is optimal)."""
    grad_x, grad_res = grad[0], grad[1]
    if grad_res is not None and grad_res.numel() == 0:
        grad_res = None
    if grad_x is None and grad_res is None:
        return (None, None)
    vector = _is_vector_rhs(self.shape, b.shape)
    B = b.unsqueeze(-1) if vector else b
    grad_a = grad_b = None
    if grad_x is not None:
        grad_x = grad_x.unsqueeze(-1) if vector else grad_x
        pinv = torch.linalg.pinv(self)
        if needs[0]:
            grad_a = _pinv_backward(grad_x @ _adjoint(B), pinv, self)
        if needs[1]:
            grad_b = _adjoint(pinv) @ grad_x
    if grad_res is not None:
        X = result[0].unsqueeze(-1) if vector else result[0]
        residual = grad_res.unsqueeze(-2) * (self @ X - B)
        if needs[0]:
            term = 2 * residual @ _adjoint(X)
            grad_a = term if grad_a is None else grad_a + term
        if needs[1]:
            grad_b = -2 * residual if grad_b is None else grad_b - 2 * residual
    if grad_b is not None and vector:
        grad_b = grad_b.squeeze(-1)
    return _reduced(grad_a, inputs_meta[0], needs[0]), _reduced(grad_b, inputs_meta[1], needs[1])


# ==========================================================================
# -- JVPs
# Forward derivatives from derivatives.yaml's `result:` formulas (and
# FunctionsManual.cpp's *_jvp functions), run at forward time on the values
# of the level below.  NOTE [Linear algebra JVPs]
# * Products are multilinear: the op with one argument replaced by its
#   tangent, summed over the arguments that have one.
# * As the VJPs do (NOTE [Linear algebra derivatives]), no rule reuses the
#   LU factors det, slogdet and solve return: they carry no tangent, which
#   forward-over-forward would need.  Rules factor again (or invert) instead.
# * Where an unbatched matrix meets a batch of tangents (jacfwd), rules
#   prefer forms whose expensive part depends on the primal alone (det's
#   adjugate, slogdet's inverse), so it is computed once for the batch.
# * Decompositions with a gauge (svd, eigh, eig) pick PyTorch's: the tangent
#   of the representative the forward returned.
# * Ops that read one triangle: triangular solvers count only the tangent in
#   that triangle (as their VJPs and finite differences do; forward_ad's
#   triangular_solve formula does not); cholesky and eigh apply PyTorch's
#   formulas, which take the tangent as Hermitian, to any tangent.
# ==========================================================================

register_jvp(
    aten.mm.default,
    aten.bmm.default,
    aten.mv.default,
    aten.dot.default,
    aten.vdot.default,  # conj-linear in self: vdot(self_t, other) is still its derivative
    aten.matmul.default,
    aten.linalg_cross.default,
)(multilinear_jvp((0, 1)))
register_jvp(aten.linear.default)(multilinear_jvp((0, 1), affine=(2,)))
register_jvp(aten._trilinear.default)(multilinear_jvp((0, 1, 2)))
register_jvp(aten.trace.default, aten.diag_embed.default)(linear_jvp())


def _times(t, scalar):
    """``t`` times a Python scalar (maybe_multiply, unconjugated)."""
    return t if scalar == 1 else t * scalar


def _plus(x, y):
    """x + y, with None for a zero ``x``."""
    return y if x is None else x + y


def _minus(x, y):
    """x - y, with None for a zero ``x``."""
    return -y if x is None else x - y


def _add_product_jvp(kernel, product, self_t, terms, beta, alpha, result):
    """beta * self_t + alpha * (sum of product(x, y) over ``terms``) for the
    ``add*`` ops, with ``kernel`` (the op itself) fusing each addition into
    one call.  beta == 0 ignores self, as the forward does (a nan or inf in
    its tangent must not leak through 0 * nan)."""
    terms = [(x, y) for x, y in terms if x is not None and y is not None]
    use_self = self_t is not None and beta != 0
    if not terms:
        return _times(self_t, beta).expand(result.shape).to(result.dtype) if use_self else None
    (x, y), rest = terms[0], terms[1:]
    out = kernel(self_t, x, y, beta=beta, alpha=alpha) if use_self else _times(product(x, y), alpha)
    for x, y in rest:
        out = kernel(out, x, y, alpha=alpha)
    return out


def _add_product_rule(kernel, product):
    """The raw JVP rule of ``kernel(self, a, b, *, beta, alpha)`` (addmm, its
    in-place form, ...): d out = beta self_t + alpha (product(a_t, b) +
    product(a, b_t))."""

    def rule(op, primals, tangents, kwargs, result):
        a, b = primals[1], primals[2]
        self_t, a_t, b_t = tangents[:3]
        terms = ((a_t, b), (a, b_t))
        return _add_product_jvp(kernel, product, self_t, terms, kwargs.get("beta", 1), kwargs.get("alpha", 1), result)

    rule.raw_jvp = True
    return rule


def _summed_bmm(a, b):
    return torch.bmm(a, b).sum(0)


def _outer(a, b):
    """addr's product: elementwise, so it promotes as addr does."""
    return a.unsqueeze(-1) * b.unsqueeze(-2)


for _kernel, _product, _ops in [
    (torch.addmm, torch.mm, (aten.addmm.default, aten.addmm_.default)),
    (torch.addmv, torch.mv, (aten.addmv.default, aten.addmv_.default)),
    (torch.baddbmm, torch.bmm, (aten.baddbmm.default, aten.baddbmm_.default)),
    (torch.addbmm, _summed_bmm, (aten.addbmm.default, aten.addbmm_.default)),
    (torch.addr, _outer, (aten.addr.default, aten.addr_.default)),
]:
    register_jvp(*_ops)(_add_product_rule(_kernel, _product))


# -- inverses, determinants, solvers --------------------------------------------------


@register_jvp(aten.linalg_inv_ex.default)
def inv_ex_jvp(A_t, result):
    inverse = result[0]
    return -torch.matmul(inverse, torch.matmul(A_t, inverse)), None


@register_jvp(aten._linalg_det.default)
def det_jvp(A, A_t):
    """d det = tr(adj(A) dA).  adj(A)^H is det's VJP for a unit cotangent,
    exact at singular A as well (see det_vjp); it depends on A alone."""
    if A.numel() == 0:
        return None
    (adjugate_h,) = det_vjp((torch.ones(A.shape[:-2], dtype=A.dtype, device=A.device),), A)
    return (_conj(adjugate_h) * A_t).sum((-2, -1)), None, None


@register_jvp(aten._linalg_slogdet.default)
def slogdet_jvp(A, A_t, result):
    """d logabsdet = Re tr(A^{-1} dA); d sign = i sign Im tr(A^{-1} dA) (0
    for a real A)."""
    trace = (torch.linalg.inv_ex(A)[0].mT * A_t).sum((-2, -1))  # elementwise, once A^{-1} is known
    if not A.is_complex():
        return None, trace, None, None
    return result[0] * (1j * trace.imag), trace.real, None, None


def _matrix_rhs(x, vector):
    return x.unsqueeze(-1) if vector and x is not None else x


@register_jvp(aten._linalg_solve_ex.default)
def solve_ex_jvp(A, B, A_t, B_t, result, left=True):
    """X = A^{-1} B: dX = A^{-1} (dB - dA X); left=False: X = B A^{-1},
    dX = (dB - X dA) A^{-1}.  A vector B is solved as a column."""
    vector = _is_vector_rhs(A.shape, B.shape)
    X, rhs = _matrix_rhs(result[0], vector), _matrix_rhs(B_t, vector)
    if A_t is not None:
        rhs = _minus(rhs, A_t @ X if left else X @ A_t)
    dX = torch.linalg.solve_ex(A, rhs, left=left)[0]
    return dX.squeeze(-1) if vector else dX, None, None, None


def _triangular_rhs(B_t, A_t, X, upper, unitriangular, apply):
    """dB - apply(tri(dA), X): a triangular solve's right-hand side for its
    tangent; only A's triangle is read, so only its tangent there counts."""
    return B_t if A_t is None else _minus(B_t, apply(_tri(A_t, upper, unitriangular), X))


def _matmul_flipped(a, b):
    return torch.matmul(b, a)


@register_jvp(aten.linalg_solve_triangular.default)
def solve_triangular_jvp(self, self_t, B_t, result, upper, left=True, unitriangular=False):
    rhs = _triangular_rhs(B_t, self_t, result, upper, unitriangular, torch.matmul if left else _matmul_flipped)
    return torch.linalg.solve_triangular(self, rhs, upper=upper, left=left, unitriangular=unitriangular)


@register_jvp(aten.triangular_solve.default)
def triangular_solve_jvp(A, self_t, A_t, result, upper=True, transpose=False, unitriangular=False):
    """op(A) X = B (op: transpose or not, never conjugate); the cloned
    coefficient's tangent is A's."""

    def apply(dA, X):
        return (dA.mT if transpose else dA) @ X

    rhs = _triangular_rhs(self_t, A_t, result[0], upper, unitriangular, apply)
    solution_t = torch.triangular_solve(rhs, A, upper, transpose, unitriangular)[0]
    clone_t = None if A_t is None else A_t.expand(result[1].shape)
    return solution_t, clone_t


# -- Cholesky --------------------------------------------------------------------------


def _cholesky_jvp(A_t, L, upper):
    """L^{-1} dA L^{-H} = 2 sym(L^{-1} dL): dL = L Phi(L^{-1} dA L^{-H}), Phi
    taking the lower triangle with half the diagonal."""
    if upper:
        L = _adjoint(L)
    inner = torch.linalg.solve_triangular(L, A_t, upper=False, left=True)
    inner = torch.linalg.solve_triangular(_adjoint(L), inner, upper=True, left=False)
    dL = L @ (inner.tril() - 0.5 * torch.diag_embed(inner.diagonal(0, -2, -1)))
    return _adjoint(dL) if upper else dL


@register_jvp(aten.linalg_cholesky_ex.default)
def cholesky_ex_jvp(self_t, result, upper=False):
    return _cholesky_jvp(self_t, result[0], upper), None


@register_jvp(aten.cholesky.default)
def cholesky_jvp(self_t, result, upper=False):
    return _cholesky_jvp(self_t, result, upper)


def _gram_tangent(factor, factor_t, upper):
    """d(L L^H) = dL L^H + L dL^H (upper: d(U^H U))."""
    half = _adjoint(factor_t) @ factor if upper else factor_t @ _adjoint(factor)
    return half + _adjoint(half)


@register_jvp(aten.cholesky_solve.default)
def cholesky_solve_jvp(input2, self_t, input2_t, result, upper=False):
    """X = K^{-1} B with K = L L^H: dX = K^{-1} (dB - dK X)."""
    rhs = self_t if input2_t is None else _minus(self_t, _gram_tangent(input2, input2_t, upper) @ result)
    return torch.cholesky_solve(rhs, input2, upper)


@register_jvp(aten.cholesky_inverse.default)
def cholesky_inverse_jvp(self, self_t, result, upper=False):
    return -(result @ _gram_tangent(self, self_t, upper) @ result)


# -- LU ------------------------------------------------------------------------------------


def _lu_jvp(A_t, P, L, U, pivot):
    """linalg_lu_jvp: A = P L U, so L^{-1} P^T dA U^{-1} = L^{-1} dL + dU U^{-1}
    (strictly lower + upper) on the leading square block; a wide A's extra
    columns of U (a tall A's extra rows of L) follow from dA's.
    Wide or square: dK = L^{-1} P^T dA, dL = L tril_-1(dK_1 U_1^{-1}),
    dU = dK - tril_-1(dK_1 U_1^{-1}) U.  Tall: dK = P^T dA U^{-1},
    dU = triu(L_1^{-1} dK_1) U, dL = dK - L triu(L_1^{-1} dK_1)."""
    m, n = L.shape[-2], U.shape[-1]
    k = min(m, n)
    rotated = P.mT @ A_t if pivot else A_t
    solve = torch.linalg.solve_triangular
    if m <= n:
        dK = solve(L, rotated, upper=False, unitriangular=True)
        lower = solve(U.narrow(-1, 0, k), dK.narrow(-1, 0, k), upper=True, left=False).tril(-1)
        return L @ lower, (dK - lower @ U).triu()
    dK = solve(U, rotated, upper=True, left=False)
    upper = solve(L.narrow(-2, 0, k), dK.narrow(-2, 0, k), upper=False, unitriangular=True).triu()
    return (dK - L @ upper).tril(-1), upper @ U


@register_jvp(aten.linalg_lu.default)
def lu_jvp(A_t, result, pivot=True):
    P, L, U = result
    return (None, *_lu_jvp(A_t, P, L, U, pivot))


@register_jvp(aten.linalg_lu_factor_ex.default)
def lu_factor_ex_jvp(A_t, result, pivot=True):
    """The packed LU's tangent: dL below the diagonal, dU on and above."""
    LU, pivots = result[0], result[1]
    P, L, U = torch.lu_unpack(LU, pivots, unpack_data=True, unpack_pivots=pivot)
    dL, dU = _lu_jvp(A_t, P, L, U, pivot)
    m, n = LU.shape[-2], LU.shape[-1]
    if m == n:
        packed = dL + dU
    elif m < n:  # dL [m, m], dU [m, n]
        packed = torch.cat([dL + dU.narrow(-1, 0, m), dU.narrow(-1, m, n - m)], -1)
    else:  # dL [m, n], dU [n, n]
        packed = torch.cat([dL.narrow(-2, 0, n) + dU, dL.narrow(-2, n, m - n)], -2)
    return packed, None, None


@register_jvp(aten.linalg_lu_solve.default)
def lu_solve_jvp(LU, pivots, LU_t, B_t, result, left=True, adjoint=False):
    """With A = P L U and X as a solution of A X = B (left != adjoint; for
    left=False this is A X^H = B^H) or A^H X = B (left == adjoint):
      A^{-1} dA X = U^{-1} (L^{-1} dL U X + dU X),
      A^{-H} dA^H X = P L^{-H} (dL^H + U^{-H} dU^H L^H) P^T X,
    with dL, dU the strict lower and upper triangles of dLU; dX is the solve
    of dB minus that term."""
    out = None if B_t is None else torch.linalg.lu_solve(LU, pivots, B_t, left=left, adjoint=adjoint)
    if LU_t is None:
        return out
    P, L, U = torch.lu_unpack(LU, pivots, unpack_data=True, unpack_pivots=left == adjoint)
    dL, dU = LU_t.tril(-1), LU_t.triu()
    X = result if left else _adjoint(result)
    solve = torch.linalg.solve_triangular
    if left != adjoint:
        inner = solve(L, dL @ (U @ X), upper=False, unitriangular=True) + dU @ X
        term = solve(U, inner, upper=True)
    else:
        L_h, rotated = _adjoint(L), P.mT @ X
        inner = _adjoint(dL) @ rotated + solve(_adjoint(U), _adjoint(dU) @ (L_h @ rotated), upper=False)
        term = P @ solve(L_h, inner, upper=True, unitriangular=True)
    return _minus(out, term if left else _adjoint(term))


@register_jvp(aten.lu_unpack.default)
def lu_unpack_jvp(LU_data, LU_data_t, unpack_data=True):
    """L and U read the packed LU's strict lower and upper triangles (and the
    extra rows or columns of a tall or wide LU)."""
    if not unpack_data:
        return None, None, None
    m, n = LU_data.shape[-2], LU_data.shape[-1]
    k = min(m, n)
    L_t = LU_data_t.narrow(-1, 0, k).tril(-1)
    U_t = LU_data_t.narrow(-2, 0, k).triu()
    return None, L_t, U_t


# -- QR and Householder products ----------------------------------------------------------


@register_jvp(aten.linalg_qr.default)
def qr_jvp(A_t, result, mode="reduced"):
    """linalg_qr_jvp.  m >= n: with dX = dA R^{-1}, Q^H dX = (skew-Hermitian
    Q^H dQ) + (upper dR R^{-1}, real diagonal), so dR R^{-1} = M is the upper
    triangle of sym(Q^H dX) = Q^H dX + dX^H Q with half its diagonal;
    dQ = dX - Q M, dR = M R.  m < n: on the leading square block,
    Q^H dQ = Omega is the skew-Hermitian matrix with the strictly lower
    triangle (and imaginary diagonal) of Q^H dA_1 R_1^{-1}; dQ = Q Omega,
    dR = Q^H dA - Omega R."""
    Q, R = result
    m, n = A_t.shape[-2], A_t.shape[-1]
    if mode == "r":
        raise RuntimeError(
            "The derivative of linalg.qr depends on Q, which is not computed when mode='r'. Please use "
            "linalg.qr(A, mode='reduced') if you are going to differentiate through linalg.qr."
        )
    if mode == "complete" and m > n:
        raise RuntimeError("The QR decomposition is not differentiable when mode='complete' and nrows > ncols.")
    solve = torch.linalg.solve_triangular
    Q_h = _adjoint(Q)
    if m >= n:
        dX = solve(R, A_t, upper=True, left=False)
        sym = Q_h @ dX
        sym = sym + _adjoint(sym)
        M = sym.triu() - 0.5 * torch.diag_embed(sym.diagonal(0, -2, -1))
        return dX - Q @ M, M @ R
    C = Q_h @ solve(R.narrow(-1, 0, m), A_t.narrow(-1, 0, m), upper=True, left=False)
    omega = _skew(C.tril(-1))
    if C.is_complex():
        omega = omega + torch.diag_embed(1j * C.diagonal(0, -2, -1).imag)
    return Q @ omega, Q_h @ A_t - omega @ R


def _reflectors_jvp(V, tau, V_t, tau_t, C, C_t, left, adjoint):
    """The tangent of op(Q) C (left) or C op(Q), Q = H_1 ... H_k with
    H_i = I - tau_i v_i v_i^H (v_i: column i of V below a unit diagonal),
    op(Q) = Q or Q^H.  The reflectors are applied to C one at a time, the one
    nearest C first: X <- H X carries dX <- H dX + dH X, with
    dH = -dtau v v^H - tau (dv v^H + v dv^H): O(k m c) for C of c columns."""
    if not left:  # C op(Q) = (op(Q)^H C^H)^H
        dX = _reflectors_jvp(V, tau, V_t, tau_t, _adjoint(C), None if C_t is None else _adjoint(C_t), True, not adjoint)
        return None if dX is None else _adjoint(dX)
    k = tau.shape[-1]
    V = V.tril(-1) + _eye_like(V, V.shape[-2], V.shape[-1]).to(V.dtype)
    dV = None if V_t is None else V_t.tril(-1)
    if adjoint:  # H^H = I - conj(tau) v v^H; Q^H = H_k^H ... H_1^H
        tau, tau_t = _conj(tau), None if tau_t is None else _conj(tau_t)
    X, dX = C, C_t
    for i in range(k) if adjoint else reversed(range(k)):
        v, t = V.narrow(-1, i, 1), tau.narrow(-1, i, 1).unsqueeze(-1)
        v_h = _adjoint(v)
        vh_x = v_h @ X
        new = None if dX is None else dX - (t * v) @ (v_h @ dX)  # H dX
        if tau_t is not None:  # - dtau v v^H X
            new = _minus(new, (tau_t.narrow(-1, i, 1).unsqueeze(-1) * v) @ vh_x)
        if dV is not None:  # - tau (dv v^H + v dv^H) X
            dv = dV.narrow(-1, i, 1)
            new = _minus(new, (t * dv) @ vh_x + (t * v) @ (_adjoint(dv) @ X))
        X, dX = X - (t * v) @ vh_x, new
    return dX


@register_jvp(aten.linalg_householder_product.default)
def householder_product_jvp(input, tau, input_t, tau_t):
    m, n = input.shape[-2], input.shape[-1]
    return _reflectors_jvp(input, tau, input_t, tau_t, _eye_like(input, m, n).to(input.dtype), None, True, False)


@register_jvp(aten.ormqr.default)
def ormqr_jvp(self, input2, self_t, input2_t, input3_t, input3, left=True, transpose=False):
    if self_t is None and input2_t is None:  # linear in C
        return torch.ormqr(self, input2, input3_t, left, transpose)
    return _reflectors_jvp(self, input2, self_t, input2_t, input3, input3_t, left, transpose)


# -- spectral decompositions ------------------------------------------------------------------


def _off_diagonal(x):
    return x - torch.diag_embed(x.diagonal(0, -2, -1))


def _vectors_not_computed(call, api):
    return RuntimeError(
        f"jvp: {call} was called without computing the vectors its derivative needs; call the public API "
        f"({api}), which computes them under jvp."
    )


@register_jvp(aten._linalg_svd.default)
def svd_jvp(A_t, result, full_matrices=False, compute_uv=True):
    """linalg_svd_jvp.  With dP = U^H dA V, sym(X) = X + X^H and E the gaps
    of S^2: dS = Re diag(dP); U^H dU = sym(dP S) / E and dVh Vh^H =
    -sym(S dP) / E off the diagonal; for complex A the phase Im diag(dP) / S
    is split evenly between U and Vh.  A tall (wide) A adds the part of dA V
    S^{-1} (S^{-1} U^H dA) outside the span of U (Vh).  The extra columns of
    full_matrices' U or rows of Vh get no tangent, as in PyTorch."""
    if not compute_uv:
        raise _vectors_not_computed("_linalg_svd(compute_uv=False)", "torch.linalg.svd / svdvals")
    U, S, Vh = result
    m, n = A_t.shape[-2], A_t.shape[-1]
    k = S.shape[-1]
    if full_matrices:
        U, Vh = U.narrow(-1, 0, k), Vh.narrow(-2, 0, k)
    U_h, V = _adjoint(U), _adjoint(Vh)
    dP = U_h @ (A_t @ V) if m >= n else (U_h @ A_t) @ V
    dS = dP.diagonal(0, -2, -1)
    dS = dS.real if dS.is_complex() else dS
    dP = dP - torch.diag_embed(dS)  # the imaginary diagonal is left (complex A)
    gaps = _off_diagonal_gaps(S * S)
    inner_u = dP * S.unsqueeze(-2)
    inner_vh = dP * -S.unsqueeze(-1)
    inner_u, inner_vh = (inner_u + _adjoint(inner_u)) / gaps, (inner_vh + _adjoint(inner_vh)) / gaps
    if dP.is_complex():
        phase = torch.diag_embed(dP.diagonal(0, -2, -1) / (2 * S))
        inner_u, inner_vh = inner_u + phase, inner_vh + phase
    dU, dVh = U @ inner_u, inner_vh @ Vh
    if m > n:
        scaled = A_t @ (V / S.unsqueeze(-2))
        dU = dU + scaled - U @ (U_h @ scaled)
        if full_matrices:
            dU = torch.cat([dU, dU.new_zeros(dU.shape[:-1] + (m - n,))], -1)
    elif m < n:
        scaled = (U_h / S.unsqueeze(-1)) @ A_t
        dVh = dVh + scaled - (scaled @ V) @ Vh
        if full_matrices:
            dVh = torch.cat([dVh, dVh.new_zeros(dVh.shape[:-2] + (n - m, n))], -2)
    return dU, dS, dVh


@register_jvp(aten._linalg_eigh.default)
def eigh_jvp(A_t, result, UPLO="L", compute_v=True):
    """A = V diag(L) V^H: with dP = V^H dA V, dL = diag(dP) and
    dV = V (dP / E) off the diagonal (E_jk = L_k - L_j)."""
    if not compute_v:
        raise _vectors_not_computed("_linalg_eigh(compute_v=False)", "torch.linalg.eigh / eigvalsh")
    values, V = result
    dP = _adjoint(V) @ A_t @ V
    dL = dP.diagonal(0, -2, -1)
    return (dL.real if dL.is_complex() else dL), V @ (_off_diagonal(dP) / _off_diagonal_gaps(values))


@register_jvp(aten.linalg_eig.default)
def eig_jvp(self_t, result):
    """A = V diag(L) V^{-1}: with dP = V^{-1} dA V, dL = diag(dP) and
    dV = dX - V Re diag(V^H dX), dX = V (dP / E) off the diagonal (keeping
    the columns of V at unit norm)."""
    values, V = result
    dP = torch.linalg.solve(V, self_t.to(V.dtype) @ V)
    dX = V @ (_off_diagonal(dP) / _off_diagonal_gaps(values))
    return dP.diagonal(0, -2, -1), dX - V * (_conj(V) * dX).sum(-2, keepdim=True).real


# -- matrix functions, pseudo-inverse, least squares -------------------------------------------


@register_jvp(aten.linalg_matrix_exp.default)
def matrix_exp_jvp(self, self_t):
    """The upper-right block of exp([[A, dA], [0, A]]) (Mathias): the VJP's
    block trick at A^H, whose adjoint differential is the differential at A."""
    return matrix_exp_vjp(self_t, _adjoint(self))[0]


def _pinv_jvp(A, pinv, dA):
    """pinv_jvp: d A^+ = -A^+ dA A^+ + A^+ A^{+H} dA^H (I - A A^+)
    + (I - A^+ A) dA^H A^{+H} A^+, grouped to keep the products small."""
    pinv_h, dA_h = _adjoint(pinv), _adjoint(dA)
    if A.shape[-2] <= A.shape[-1]:
        K = pinv_h @ dA_h
        return pinv @ (K - _adjoint(K) - K @ (A @ pinv)) + (dA_h - pinv @ (A @ dA_h)) @ (pinv_h @ pinv)
    K = pinv @ dA
    K_h = _adjoint(K)
    return (K_h - K - (pinv @ A) @ K_h) @ pinv + (pinv @ pinv_h) @ (dA_h - (dA_h @ A) @ pinv)


@register_jvp(aten.linalg_pinv.atol_rtol_tensor)
def pinv_jvp(self, self_t, result):
    return _pinv_jvp(self, result, self_t)


@register_jvp(aten.linalg_lstsq.default)
def lstsq_jvp(self, b, self_t, b_t, result):
    """X = A^+ B: dX = dA^+ B + A^+ dB.  The residuals |A X - B|^2 (when
    computed) change by 2 Re(r^H (dA X - dB)), r = A X - B: A dX drops out
    as A^H r = 0 at the optimum."""
    vector = b.dim() == self.dim() - 1  # decided on ranks, as eager decides it
    B, dB, X = _matrix_rhs(b, vector), _matrix_rhs(b_t, vector), _matrix_rhs(result[0], vector)
    pinv = torch.linalg.pinv(self)
    dX = None if dB is None else pinv @ dB
    if self_t is not None:
        dX = _plus(dX, _pinv_jvp(self, pinv, self_t) @ B)
    residuals_t = None
    if result[1].numel():
        dr = None if self_t is None else self_t @ X
        if dB is not None:
            dr = _minus(dr, dB)
        product = _conj(self @ X - B) * dr
        residuals_t = 2 * (product.real if product.is_complex() else product).sum(-2)
    return (dX.squeeze(-1) if vector else dX), residuals_t, None, None
