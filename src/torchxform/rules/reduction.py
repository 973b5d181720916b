"""Reductions, scans, sorting and softmax.

One generic batching rule serves every op of the shape "work along the dims
given by a ``dim`` argument, with optional ``keepdim``": it reads where
``dim`` and ``keepdim`` sit from the op's schema, maps logical dims to
physical ones and leaves the batch dim where it is.  Scans, softmax and
sorting are the same rule with ``keepdim`` always true (the rank does not
change).  Overloads without a ``dim`` (``sum.default``, ``max.default``,
...) run their dim overload over every logical dim.  Separate rules only
where the semantics differ: the median of everything, the softmax
backward ops (two tensors) and ``renorm``.
"""

from __future__ import annotations

import copy
import functools
import math

import torch

from .._core.registry import (
    overloads,
    register_batching,
    register_batching_each,
    register_decomposition,
    register_jvp,
    register_vjp,
)
from ._derivatives import linear_jvp
from ._batching import (  # See NOTE [Errors as eager raises them]
    InvalidArguments,
    logical_rank,
    materialize,
    move_bdim_to_front,
    with_eager_errors,
    wrap_dim,
)
from .elementwise import reduce_to

aten = torch.ops.aten


# --------------------------------------------------------------------------
# NOTE [Reducing a logical 0-dim tensor]
# Eager reductions, scans and sorts accept dim 0 or -1 on a 0-dim tensor and
# return a 0-dim result.  The physical tensor is [B], whose dim 0 is the
# batch, which must never be reduced.  So a size-1 dim is put after the
# batch, the op runs over it, and it is squeezed back out where the op kept
# it (keepdim=True, or ops that keep the rank):
#   keepdim=False:  [B] -> [B,1] -op(dim=1)-> [B]
#   keepdim=True:   [B] -> [B,1] -op(dim=1)-> [B,1] -> [B]
# Running the op (rather than returning the input) keeps its dtype rules,
# e.g. the sum of an int32 0-dim tensor is int64.
# --------------------------------------------------------------------------


class _DimSpec:
    """Where an op takes ``dim`` and ``keepdim``, read once from its schema.

    ``dim_pos`` indexes the positional args; for a keyword-only ``dim`` it
    is past the last argument, so the value is always read from kwargs.
    ``keepdim_pos`` is None for ops without a keepdim argument, which then
    behave as ``keepdim`` says (True for scans and sorts: same rank).
    ``empty`` says what ``dim=[]`` means: "all" dims, "keep" (all/any.dims
    reduce nothing) or "eager" (logsumexp: eager raises unless 0-dim).
    Full reductions (``sum.default``) run ``target``, their dim overload,
    with the args ``fill`` completes (see ``full``).
    """

    __slots__ = ("target", "dim_pos", "dim_default", "is_list", "keepdim_pos", "keepdim", "empty", "fill")

    def __init__(self, op, *, keepdim=False, empty="all"):
        arguments = op._schema.arguments
        positions = {a.name: (len(arguments) if a.kwarg_only else i) for i, a in enumerate(arguments)}
        dim_arg = arguments[[a.name for a in arguments].index("dim")]
        dim_type = dim_arg.type
        if isinstance(dim_type, torch.OptionalType):
            dim_type = dim_type.getElementType()
        self.target = op
        self.dim_pos = positions["dim"]
        self.dim_default = dim_arg.default_value
        self.is_list = isinstance(dim_type, torch.ListType)
        self.keepdim_pos = positions.get("keepdim")
        self.keepdim = keepdim
        self.empty = empty
        self.fill = None

    def full(self, op) -> _DimSpec:
        """This spec run as full reduction ``op`` (which has no dim): its
        args are completed with their defaults, then dim=None and
        keepdim=False where the target takes them positionally."""
        spec = copy.copy(self)
        fill = tuple(a.default_value for a in op._schema.arguments[1:] if not a.kwarg_only)
        if self.dim_pos == len(fill) + 1:
            assert self.keepdim_pos == self.dim_pos + 1, op
            fill += (None, False)
        spec.fill = fill
        return spec


def reduce_batch(spec, op, bdims, *args, **kwargs):
    """Batching rule of every dim-reducing, scanning and sorting op."""
    if spec.fill is not None:  # a full reduction: the dim overload over every dim
        args += spec.fill[len(args) - 1 :]
    return _reduce(spec, bdims[0], args, kwargs)


def _reduce(spec, bdim, args, kwargs):
    x = args[0]
    rank = x.dim() - 1
    pos = spec.dim_pos
    dim = args[pos] if pos < len(args) else kwargs.get("dim", spec.dim_default)
    kpos = spec.keepdim_pos
    if kpos is None:
        keepdim = spec.keepdim
    else:
        keepdim = args[kpos] if kpos < len(args) else kwargs.get("keepdim", False)

    if spec.is_list and dim is not None:
        if type(dim) is int:
            dim = (dim,)
        if len(dim) != 1:
            return _reduce_dims(spec, args, kwargs, x, bdim, rank, dim, keepdim)
        dim = dim[0]  # one dim, the common case: handled as an int dim
    if dim is None:
        if spec.is_list:
            return _every_dim(spec, args, kwargs, x, bdim, rank, keepdim)
        return _flat(spec, args, kwargs, x, bdim, rank, keepdim)  # int? dim: the flattened example
    d = wrap_dim(dim, rank)
    if rank == 0:
        return _scalar(spec, args, kwargs, x, [1] if spec.is_list else 1, keepdim)
    physical = d + (d >= bdim)
    out = _call(spec, args, kwargs, x, [physical] if spec.is_list else physical)
    return out, (bdim if keepdim else bdim - (d < bdim))


def _reduce_dims(spec, args, kwargs, x, bdim, rank, dims, keepdim):
    """A list of dims other than one: [] (see _DimSpec.empty) or several."""
    if not dims:
        if _empty_is_all(spec, args, kwargs, x, bdim, rank):
            return _every_dim(spec, args, kwargs, x, bdim, rank, keepdim)
        return _call(spec, args, kwargs, x, []), bdim  # all/any over no dims: nothing is reduced
    physical = []
    before = 0  # reduced dims before the batch dim
    for d in dims:
        d = wrap_dim(d, rank)
        p = d + (d >= bdim)
        if p in physical:
            raise RuntimeError(f"dim {d} appears multiple times in the list of dims")
        physical.append(p)
        before += d < bdim
    return _call(spec, args, kwargs, x, physical), (bdim if keepdim else bdim - before)


def _every_dim(spec, args, kwargs, x, bdim, rank, keepdim):
    """The op over every logical dim (dim=None): the batch is all that is left.
    # [B,2,3] (bdim 0) -op(dim=[1,2])-> [B]"""
    if rank == 0:
        return _scalar(spec, args, kwargs, x, [1], keepdim)
    every = [d for d in range(rank + 1) if d != bdim]
    return _call(spec, args, kwargs, x, every), (bdim if keepdim else 0)


def _empty_is_all(spec, args, kwargs, x, bdim, rank) -> bool:
    """Whether ``dim=[]`` means every dim.  For "eager" ops (logsumexp) eager
    raises on a tensor with dims: ask it with one example, then treat []
    as every dim should this torch accept it."""
    if spec.empty == "eager" and rank > 0 and x.shape[bdim] > 0:
        spec.target(x.select(bdim, 0), *args[1:], **kwargs)
    return spec.empty != "keep"


def _call(spec, args, kwargs, x, dim):
    """Run the target op on physical ``x`` with ``dim`` in place of the
    logical dim argument."""
    pos = spec.dim_pos
    if pos < len(args):
        args = list(args)
        args[0] = x
        args[pos] = dim
        return spec.target(*args, **kwargs)
    return spec.target(x, *args[1:], **{**kwargs, "dim": dim})


def _scalar(spec, args, kwargs, x, dim, keepdim):
    """See NOTE [Reducing a logical 0-dim tensor].  ``x`` is [B]."""
    out = _call(spec, args, kwargs, x.unsqueeze(1), dim)
    if keepdim:
        out = tuple(t.squeeze(1) for t in out) if type(out) is tuple else out.squeeze(1)
    return out, 0


def _flatten_front(x, bdim, rank):
    """Each example flattened: [B, numel of one example]."""
    x = move_bdim_to_front(x, bdim)
    return x.unsqueeze(1) if rank == 0 else x.flatten(1)


def _flat(spec, args, kwargs, x, bdim, rank, keepdim):
    """An int? dim given as None: the op over each flattened example, so
    indices (argmax) count into the flattened example as eager's do.
    # [B,2,3] -> [B,6] -op(dim=1)-> [B] (keepdim: [B,1] -> [B,1,1])"""
    out = _call(spec, args, kwargs, _flatten_front(x, bdim, rank), 1)
    if keepdim:
        kept = (1,) * rank
        out = tuple(t.view(t.shape[:1] + kept) for t in out) if type(out) is tuple else out.view(out.shape[:1] + kept)
    return out, 0


def _register(ops, rule):
    register_batching_each(ops, with_eager_errors(rule))


# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------

# Ops that reduce over their `dim` argument (rank drops unless keepdim=True).
_REDUCING = [
    aten.sum.dim_IntList,
    aten.nansum.default,
    aten.mean.dim,
    aten.prod.dim_int,
    aten.amax.default,
    aten.amin.default,
    aten.aminmax.default,
    *overloads(aten._aminmax, "dim"),
    aten.max.dim,
    aten.min.dim,
    aten.argmax.default,
    aten.argmin.default,
    aten.var.correction,
    aten.std.correction,
    aten.var_mean.correction,
    aten.std_mean.correction,
    aten.linalg_vector_norm.default,
    aten.norm.ScalarOpt_dim,
    aten.norm.ScalarOpt_dim_dtype,
    aten.all.dim,
    aten.any.dim,
    aten.count_nonzero.default,
    aten.count_nonzero.dim_IntList,
    aten.kthvalue.default,
    aten.median.dim,
    aten.nanmedian.dim,
    aten.mode.default,
]
# What dim=[] means where it is not "every dim".
_EMPTY_DIMS = {
    aten.logsumexp.default: "eager",
    **{op: "keep" for op in overloads(aten.all, "dims") + overloads(aten.any, "dims")},
}
# Ops that work along `dim` and keep the rank: scans, softmax, sorting.
_SAME_RANK = [
    aten.cumsum.default,
    aten.cumsum_.default,
    aten.cumprod.default,
    aten.cumprod_.default,
    aten.cummax.default,
    aten.cummin.default,
    aten.logcumsumexp.default,
    *overloads(aten._logcumsumexp, "default"),
    aten._softmax.default,
    aten._log_softmax.default,
    *overloads(aten._safe_softmax, "default"),
    aten.sort.default,
    *overloads(aten.sort, "stable"),
]
# Full reductions -> the dim overload they run over every dim.
_FULL = {
    aten.sum.default: aten.sum.dim_IntList,
    aten.mean.default: aten.mean.dim,
    aten.prod.default: aten.prod.dim_int,
    aten.max.default: aten.amax.default,  # both propagate nan; amax computes no indices
    aten.min.default: aten.amin.default,
    aten.all.default: aten.all.dims if overloads(aten.all, "dims") else aten.all.dim,
    aten.any.default: aten.any.dims if overloads(aten.any, "dims") else aten.any.dim,
    aten.norm.Scalar: aten.norm.ScalarOpt_dim,
    aten.norm.ScalarOpt_dtype: aten.norm.ScalarOpt_dim_dtype,
    **{op: aten.aminmax.default for op in overloads(aten._aminmax, "default")},
}

_SPECS = {op: _DimSpec(op) for op in _REDUCING}
_SPECS.update({op: _DimSpec(op, empty=empty) for op, empty in _EMPTY_DIMS.items()})
_SPECS.update({op: _DimSpec(op, keepdim=True) for op in _SAME_RANK})
_SPECS.update({op: _SPECS[target].full(op) for op, target in _FULL.items()})
for _op, _spec in _SPECS.items():
    _register([_op], functools.partial(reduce_batch, _spec))


def topk_batch(op, bdims, x, k, *args, **kwargs):
    # Eager's top 0 of a 0-dim tensor is the tensor itself, as its top 1.
    if k == 0 and x.dim() == 1:
        k = 1
    return reduce_batch(_TOPK, op, bdims, x, k, *args, **kwargs)


_TOPK = _DimSpec(aten.topk.default, keepdim=True)
_register([aten.topk.default], topk_batch)


def median_all_batch(op, bdims, x):
    """The median of each flattened example.  Eager gives an empty tensor a
    fill value (nan for floats) rather than an error: ask it for that."""
    batch = x.shape[bdims[0]]
    flat = _flatten_front(x, bdims[0], x.dim() - 1)
    if flat.shape[1] == 0 and batch > 0:
        return op(flat[0]).expand(batch).clone(), 0
    values, _ = _MEDIAN_DIM[op](flat, 1)
    return values, 0


_MEDIAN_DIM = {aten.median.default: aten.median.dim, aten.nanmedian.default: aten.nanmedian.dim}
_register(list(_MEDIAN_DIM), median_all_batch)


def softmax_backward_batch(op, bdims, grad_output, output, dim, input_dtype):
    """Both tensors batched at one physical dim: an unbatched one is expanded
    (a view), a differently batched one moved; the kernels accept strides."""
    grad_bdim, out_bdim = bdims[0], bdims[1]
    if grad_bdim is None:
        grad_output, bdim = grad_output.unsqueeze(out_bdim).expand(output.shape), out_bdim
    elif out_bdim is None:
        output, bdim = output.unsqueeze(grad_bdim).expand(grad_output.shape), grad_bdim
    else:
        output, bdim = (output if out_bdim == grad_bdim else output.movedim(out_bdim, grad_bdim)), grad_bdim
    rank = grad_output.dim() - 1
    d = wrap_dim(dim, rank)
    if rank == 0:  # See NOTE [Reducing a logical 0-dim tensor]
        return op(grad_output.unsqueeze(1), output.unsqueeze(1), 1, input_dtype).squeeze(1), 0
    return op(grad_output, output, d + (d >= bdim), input_dtype), bdim


_register([aten._softmax_backward_data.default, aten._log_softmax_backward_data.default], softmax_backward_batch)


def renorm_batch(op, bdims, x, p, dim, maxnorm):
    """Each slice along ``dim`` of each example is renormalized: the batch
    moves next to ``dim`` and merges with it, so the kernel sees B*n slices.
    # [B,2,3], dim=1 -> [2,B,3] -> [2,B*3] -renorm(dim=1)-> [2,B,3] (bdim 1)"""
    bdim = bdims[0]
    rank = x.dim() - 1
    if rank < 2:  # the physical tensor has one dim more, so the kernel would accept it
        raise RuntimeError(f"renorm: input needs at least 2 dimensions, got {rank} dimensions")
    d = wrap_dim(dim, rank)
    physical = d + (d >= bdim)
    merged = physical - 1 if bdim < physical else physical  # where the batch goes, just before `dim`
    x = x.movedim(bdim, merged)
    out = x.flatten(merged, merged + 1).renorm(p, merged, maxnorm)
    return out.unflatten(merged, x.shape[merged : merged + 2]), merged


_register([aten.renorm.default], renorm_batch)


def pdist_batch(op, bdims, x, p=2):
    """Distances between the rows of each example: cdist of the example with
    itself (mode 2: no matrix-product shortcut for p = 2, as pdist takes
    none), then its upper triangle, row-major as pdist lists the pairs.
    # [B, N, M] -> cdist [B, N, N] -> [B, N(N-1)/2]"""
    x = move_bdim_to_front(x, bdims[0])
    if x.dim() != 3 or p < 0:
        raise InvalidArguments
    n = x.shape[1]
    i, j = torch.triu_indices(n, n, 1, device=x.device)
    return aten._cdist_forward.default(x, x, p, 2)[:, i, j], 0


_register([aten._pdist_forward.default], pdist_batch)


# -- segment_reduce ------------------------------------------------------------
# Segments along ``axis``; lengths / offsets (keyword-only, possibly batched)
# have data's dims before ``axis`` in front of their segment dim.  The batch
# goes in front of all of them, so the kernel reduces every example's
# segments in one call.
# data [B, 5, 2], axis 0, lengths [4] -> data [B, 5, 2], axis 1, lengths [B, 4]


def _segment_batched(op, bdims, tensors, reduce, kwargs, kwarg_bdims):
    """Call ``op(*tensors, reduce, **kwargs)`` with the batch in front of the
    tensors (same logical shape as data) and of lengths / offsets."""
    kwarg_bdims = kwarg_bdims or {}
    tensor_bdims = bdims[: len(tensors)]
    first = next((t.shape[b] for t, b in zip(tensors, tensor_bdims) if b is not None), None)
    batch = first if first is not None else next(kwargs[k].shape[b] for k, b in kwarg_bdims.items())
    data_bdim = tensor_bdims[-1]
    axis = wrap_dim(kwargs.get("axis", 0), logical_rank(tensors[-1], data_bdim))
    physical = dict(kwargs, axis=axis + 1)
    for name in ("lengths", "offsets"):
        if physical.get(name) is not None:
            physical[name] = materialize(physical[name], kwarg_bdims.get(name), batch)
    try:
        return op(*(materialize(t, b, batch) for t, b in zip(tensors, tensor_bdims)), reduce, **physical), 0
    except Exception as error:  # See NOTE [Errors as eager raises them]
        example = {k: (v.select(kwarg_bdims[k], 0) if k in kwarg_bdims else v) for k, v in kwargs.items()}
        if batch:
            op(*(t if b is None else t.select(b, 0) for t, b in zip(tensors, tensor_bdims)), reduce, **example)
        raise error


@register_batching(aten.segment_reduce.default, batched_kwargs=True)
def segment_reduce_batch(bdims, data, reduce, *, kwarg_bdims=None, **kwargs):
    return _segment_batched(aten.segment_reduce.default, bdims, (data,), reduce, kwargs, kwarg_bdims)


@register_batching(aten._segment_reduce_backward.default, batched_kwargs=True)
def segment_reduce_backward_batch(bdims, grad, output, data, reduce, *, kwarg_bdims=None, **kwargs):
    return _segment_batched(
        aten._segment_reduce_backward.default, bdims, (grad, output, data), reduce, kwargs, kwarg_bdims
    )


@register_decomposition(aten.block_diag.default)
def block_diag_decomposition(tensors):
    """Each block (0-d: 1 x 1, 1-d: one row) padded with zeros to the full
    width, the rows concatenated: one construction every transform runs (the
    batch of vmap rides in front; its VJP slices the blocks back out, to any
    order).  (Here for want of a family of matrix constructions.)
    # [2, 3], [1, 2] -> pad [2, 3 + 2], [1, 3 + 2] -> cat rows: [3, 5]"""
    blocks = []
    for k, t in enumerate(tensors):
        if t.dim() > 2:
            raise RuntimeError(
                f"torch.block_diag: Input tensors must have 2 or fewer dimensions. Input {k} has {t.dim()} dimensions"
            )
        blocks.append(t.reshape(1, 1) if t.dim() == 0 else t.reshape(1, -1) if t.dim() == 1 else t)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    width = sum(b.shape[1] for b in blocks)
    rows, left = [], 0
    for b in blocks:
        right = width - left - b.shape[1]
        rows.append(aten.constant_pad_nd.default(b.to(dtype), [left, right], 0))
        left += b.shape[1]
    return aten.cat.default(rows, 0)


# ==========================================================================
# Derivatives (formulas from derivatives.yaml, written with torch ops so
# that they compose with every transform).
# ==========================================================================


def _reduced_dims(dim, rank):
    """The canonical dims a reduction with ``dim`` (None or [] = all) removed."""
    if dim is None:
        return list(range(rank))
    if isinstance(dim, int):
        dim = [dim]
    if len(dim) == 0:
        return list(range(rank))
    return sorted(wrap_dim(d, rank) for d in dim)


def _unreduce(grad, shape, dim, keepdim):
    """A reduced cotangent broadcast back to the input's shape."""
    rank = len(shape)
    if rank == 0:
        return grad.reshape(())
    if not keepdim:
        for d in _reduced_dims(dim, rank):
            grad = grad.unsqueeze(d)
    return grad.expand(shape)


def _count(shape, dim):
    if len(shape) == 0:
        return 1
    n = 1
    for d in _reduced_dims(dim, len(shape)):
        n *= shape[d]
    return n


@register_vjp(aten.sum.default)
def sum_vjp(grad, inputs_meta):
    return (reduce_to_dtype(grad.expand(inputs_meta[0][0]), inputs_meta[0]),)


@register_vjp(aten.sum.dim_IntList)
def sum_dim_vjp(grad, inputs_meta, dim, keepdim=False):
    return (reduce_to_dtype(_unreduce(grad, inputs_meta[0][0], dim, keepdim), inputs_meta[0]),)


@register_vjp(aten.nansum.default)
def nansum_vjp(grad, self, dim=None, keepdim=False):
    return (_unreduce(grad, self.shape, dim, keepdim) * ~self.isnan(),)


@register_vjp(aten.mean.default)
def mean_vjp(grad, inputs_meta):
    shape = inputs_meta[0][0]
    return (reduce_to_dtype(grad.expand(shape) / max(_count(shape, None), 1), inputs_meta[0]),)


@register_vjp(aten.mean.dim)
def mean_dim_vjp(grad, inputs_meta, dim, keepdim=False):
    shape = inputs_meta[0][0]
    return (reduce_to_dtype(_unreduce(grad, shape, dim, keepdim) / max(_count(shape, dim), 1), inputs_meta[0]),)


def reduce_to_dtype(grad, meta):
    """``grad`` in its input's dtype (reductions may accumulate in another)."""
    dtype = meta[1]
    if grad.dtype != dtype:
        grad = grad.real if grad.is_complex() and not dtype.is_complex else grad.to(dtype)
    return grad


def _product_of_others(x, dim):
    """For each element, the product of the others along ``dim`` (exact with
    zeros): exclusive cumulative products from both ends.
    # [a, b, c] -> [b*c, a*c, a*b]"""
    n = x.shape[dim]
    if n == 0:
        return x
    ones = torch.ones_like(x.narrow(dim, 0, 1))
    left = torch.cat([ones, x.narrow(dim, 0, n - 1)], dim).cumprod(dim)
    right = torch.cat([x.narrow(dim, 1, n - 1), ones], dim).flip(dim).cumprod(dim).flip(dim)
    return left * right


def _conj(x):
    """Complex partial derivatives enter VJPs conjugated (holomorphic ops)."""
    return x.conj() if x.is_complex() else x


@register_vjp(aten.prod.default)
def prod_vjp(grad, self):
    flat = self.reshape(-1)
    return ((grad * _conj(_product_of_others(flat, 0))).reshape(self.shape),)


@register_vjp(aten.prod.dim_int)
def prod_dim_vjp(grad, self, dim, keepdim=False):
    if self.dim() == 0:
        return (grad.reshape(()),)
    others = _product_of_others(self, wrap_dim(dim, self.dim()))
    return (_unreduce(grad, self.shape, dim, keepdim) * _conj(others),)


def _evenly_distributed(grad, self, result, dim, keepdim):
    """amax/amin/max()/min(): the cotangent split evenly among the elements
    equal to the result (ties share it, as torch.autograd does)."""
    expanded = _unreduce(result, self.shape, dim, keepdim)
    mask = (self == expanded) | (self.isnan() & expanded.isnan())
    mask = mask.to(grad.dtype)
    counts = mask.sum(_reduced_dims(dim, self.dim()), keepdim=True) if self.dim() else mask
    return _unreduce(grad, self.shape, dim, keepdim) * mask / counts


@register_vjp(aten.amax.default, aten.amin.default)
def amax_vjp(grad, self, result, dim=(), keepdim=False):
    return (_evenly_distributed(grad, self, result, dim, keepdim),)


@register_vjp(aten.max.default, aten.min.default)
def max_all_vjp(grad, self, result):
    return (_evenly_distributed(grad, self, result, None, False),)


def _select_back(grad, indices, shape, dim, keepdim):
    """Values picked at ``indices`` along ``dim`` (max.dim, sort, topk, ...):
    the cotangent scattered back to where they came from."""
    if len(shape) == 0:
        return grad.reshape(())
    dim = wrap_dim(dim, len(shape))
    if not keepdim:
        grad, indices = grad.unsqueeze(dim), indices.unsqueeze(dim)
    return grad.new_zeros(shape).scatter(dim, indices, grad)


@register_vjp(aten.max.dim, aten.min.dim, aten.kthvalue.default, aten.median.dim, aten.nanmedian.dim, aten.mode.default)
def select_along_dim_vjp(grad, inputs_meta, result, dim=-1, keepdim=False):
    values_grad = grad[0]
    if values_grad is None:
        return (None,)
    return (_select_back(values_grad, result[1], inputs_meta[0][0], dim, keepdim),)


@register_vjp(aten.sort.default, *overloads(aten.sort, "stable"), aten.topk.default)
def sort_vjp(grad, inputs_meta, result, dim=-1):
    if grad[0] is None:
        return (None,)
    return (_select_back(grad[0], result[1], inputs_meta[0][0], dim, True),)


@register_vjp(aten.median.default, aten.nanmedian.default)
def median_all_vjp(grad, self, result):
    return (_evenly_distributed(grad, self, result, None, False),)


def _centered(self, dim):
    mean = self.mean(_reduced_dims(dim, self.dim()), keepdim=True) if self.dim() else self
    return self - mean


def _dof(shape, dim, correction):
    correction = 1 if correction is None else correction
    return max(_count(shape, dim) - correction, 0)


@register_vjp(aten.var.correction)
def var_vjp(grad, self, dim=None, correction=None, keepdim=False):
    scale = 2.0 / _dof(self.shape, dim, correction) if _dof(self.shape, dim, correction) else math.inf
    return (_unreduce(grad, self.shape, dim, keepdim) * _centered(self, dim) * scale,)


@register_vjp(aten.std.correction)
def std_vjp(grad, self, result, dim=None, correction=None, keepdim=False):
    dof = _dof(self.shape, dim, correction)
    scale = 1.0 / dof if dof else math.inf
    inner = _centered(self, dim) * scale / _unreduce(result, self.shape, dim, keepdim)
    return (_unreduce(grad, self.shape, dim, keepdim) * inner,)


@register_vjp(aten.var_mean.correction)
def var_mean_vjp(grad, self, dim=None, correction=None, keepdim=False):
    var_grad, mean_grad = grad
    out = None
    if var_grad is not None:
        out = var_vjp(var_grad, self, dim, correction, keepdim)[0]
    if mean_grad is not None:
        m = _unreduce(mean_grad, self.shape, dim, keepdim) / max(_count(self.shape, dim), 1)
        out = m if out is None else out + m
    return (out,)


@register_vjp(aten.std_mean.correction)
def std_mean_vjp(grad, self, result, dim=None, correction=None, keepdim=False):
    std_grad, mean_grad = grad
    out = None
    if std_grad is not None:
        out = std_vjp(std_grad, self, result[0], dim, correction, keepdim)[0]
    if mean_grad is not None:
        m = _unreduce(mean_grad, self.shape, dim, keepdim) / max(_count(self.shape, dim), 1)
        out = m if out is None else out + m
    return (out,)


@register_vjp(aten.logsumexp.default)
def logsumexp_vjp(grad, self, result, dim, keepdim=False):
    weights = (self - _unreduce(result, self.shape, dim, keepdim)).exp()
    return (_unreduce(grad, self.shape, dim, keepdim) * _conj(weights),)


def _norm_vjp(grad, self, result, p, dim, keepdim):
    """derivatives.yaml's norm_backward for real inputs."""
    p = 2.0 if p is None else float(p)
    g = _unreduce(grad, self.shape, dim, keepdim)
    norm = _unreduce(result, self.shape, dim, keepdim)
    if p == 0.0:
        return None
    if p == 1.0:
        return g * self.sgn()
    # The zero-norm mask applies to the factor, not to the product with g:
    # the derivative in g stays 0 there (second order), as torch's.
    if p == 2.0:
        return g * torch.where(norm == 0, 0.0, self / norm)
    if math.isinf(p):
        mask = (self.abs() == norm).to(g.dtype)
        counts = mask.sum(_reduced_dims(dim, self.dim()), keepdim=True) if self.dim() else mask
        return g * self.sgn() * mask / counts
    if p < 1.0:
        scaled = torch.where(self == 0, 0.0, self.sgn() * self.abs().pow(p - 1))
        return scaled * g * norm.pow(1 - p)
    scaled = self.sgn() * self.abs().pow(p - 1) if p < 2.0 else self * self.abs().pow(p - 2)
    return scaled * torch.where(norm == 0, 0.0, g / norm.pow(p - 1))


@register_vjp(aten.linalg_vector_norm.default)
def vector_norm_vjp(grad, self, result, ord=2, dim=None, keepdim=False):
    return (_norm_vjp(grad, self, result, ord, dim, keepdim),)


@register_vjp(aten.norm.ScalarOpt_dim, aten.norm.ScalarOpt_dim_dtype)
def norm_dim_vjp(grad, self, result, p, dim, keepdim=False):
    return (_norm_vjp(grad, self, result, p, dim, keepdim),)


@register_vjp(aten.norm.Scalar, aten.norm.ScalarOpt_dtype)
def norm_all_vjp(grad, self, result, p=2):
    return (_norm_vjp(grad, self, result, p, None, False),)


def _renorm_parts(self, p, dim, maxnorm):
    """renorm's norm of each slice along ``dim`` (over every other dim,
    kept), where it exceeds ``maxnorm``, and the scale maxnorm / (norm +
    1e-7) the kernel applies there."""
    d = wrap_dim(dim, self.dim())
    dims = [i for i in range(self.dim()) if i != d]
    norm = torch.linalg.vector_norm(self, p, dims, keepdim=True)
    return dims, norm, norm > maxnorm, maxnorm / (norm + 1e-7)


@register_vjp(aten.renorm.default)
def renorm_vjp(grad, self, p, dim, maxnorm):
    """derivatives.yaml's renorm_backward: where a slice is rescaled,
    d(x * maxnorm / (|x| + eps)) = factor dx - x factor / (|x| + eps) d|x|."""
    dims, norm, over, factor = _renorm_parts(self, p, dim, maxnorm)
    inner = self.conj() * grad
    inner = (inner.real if inner.is_complex() else inner).sum(dims, keepdim=True)
    through_norm = _norm_vjp(inner, self, norm, p, dims, True)
    scaled = factor * grad
    if through_norm is not None:  # p = 0: the count of nonzeros is piecewise constant
        scaled = scaled - factor / (norm + 1e-7) * through_norm
    return (torch.where(over, scaled, grad),)


@register_jvp(aten.renorm.default)
def renorm_jvp(self, self_t, p, dim, maxnorm):
    dims, norm, over, factor = _renorm_parts(self, p, dim, maxnorm)
    norm_t = _norm_jvp(self, self_t, norm, p, dims, True)
    return torch.where(over, factor * self_t - self * (factor / (norm + 1e-7)) * norm_t, self_t)


@register_vjp(aten.segment_reduce.default)
def segment_reduce_vjp(grad, result, data, reduce, lengths=None, offsets=None, axis=0, initial=None):
    """The backward kernel (as derivatives.yaml; it has no derivative of its
    own, so neither has this one: second order names it missing)."""
    return (
        aten._segment_reduce_backward.default(
            grad.contiguous(), result, data, reduce, lengths=lengths, offsets=offsets, axis=axis, initial=initial
        ),
    )


# -- pairwise distances (cdist's batching rule is in fft.py) -------------------


def _distance_partial(diff, dist, p):
    """d dist / d diff for dist = ||diff||_p over the last dim (``dist``
    broadcast against ``diff``), as the _cdist_backward / _pdist_backward
    kernels define it: 0 where dist = 0 (and, for p < 1, where diff = 0);
    for p = inf every coordinate attaining the max gets its full sign.  None
    for p = 0 (a count of nonzeros: piecewise constant)."""
    if p == 0:
        return None
    if p == 1:
        return diff.sgn()
    if math.isinf(p):
        return diff.sgn() * (diff.abs() == dist).to(diff.dtype)
    zero = dist == 0
    if p < 1:
        zero = zero | (diff == 0)
    safe_dist = torch.where(dist == 0, 1.0, dist)  # the masked branch stays finite (second order)
    if p == 2:
        return torch.where(zero, 0.0, diff / safe_dist)
    magnitude = diff.abs()
    if p < 2:
        safe = torch.where(magnitude == 0, 1.0, magnitude)
        return torch.where(zero, 0.0, diff.sgn() * safe.pow(p - 1) / safe_dist.pow(p - 1))
    return torch.where(zero, 0.0, diff * magnitude.pow(p - 2) / safe_dist.pow(p - 1))


@register_vjp(aten._cdist_forward.default)
def cdist_vjp(grad, x1, x2, p, result, needs, inputs_meta):
    # x1 [..., P, M], x2 [..., R, M] -> diff [..., P, R, M]; batch dims broadcast
    partial = _distance_partial(x1.unsqueeze(-2) - x2.unsqueeze(-3), result.unsqueeze(-1), p)
    if partial is None:
        return (None, None)
    weighted = grad.unsqueeze(-1) * partial
    return (
        reduce_to(weighted.sum(-2), inputs_meta[0]) if needs[0] else None,
        reduce_to(-weighted.sum(-3), inputs_meta[1]) if needs[1] else None,
    )


@register_jvp(aten._cdist_forward.default)
def cdist_jvp(x1, x2, x1_t, x2_t, p, result):
    partial = _distance_partial(x1.unsqueeze(-2) - x2.unsqueeze(-3), result.unsqueeze(-1), p)
    if partial is None:
        return torch.zeros_like(result)
    if x1_t is None:
        diff_t = -x2_t.unsqueeze(-3)
    elif x2_t is None:
        diff_t = x1_t.unsqueeze(-2)
    else:
        diff_t = x1_t.unsqueeze(-2) - x2_t.unsqueeze(-3)
    return (partial * diff_t).sum(-1).expand(result.shape)


def _pdist_pairs(self, p, result):
    """The pairs (i < j, row-major) and d dist / d (x_i - x_j) for each."""
    n = self.shape[0]
    i, j = torch.triu_indices(n, n, 1, device=self.device)
    return i, j, _distance_partial(self.index_select(0, i) - self.index_select(0, j), result.unsqueeze(-1), p)


@register_vjp(aten._pdist_forward.default)
def pdist_vjp(grad, self, p, result):
    i, j, partial = _pdist_pairs(self, p, result)
    if partial is None:
        return (None,)
    weighted = grad.unsqueeze(-1) * partial  # [K, M]
    return (torch.zeros_like(self).index_add(0, i, weighted).index_add(0, j, -weighted),)


@register_jvp(aten._pdist_forward.default)
def pdist_jvp(self, self_t, p, result):
    i, j, partial = _pdist_pairs(self, p, result)
    if partial is None:
        return torch.zeros_like(result)
    return (partial * (self_t.index_select(0, i) - self_t.index_select(0, j))).sum(-1)


@register_vjp(aten.cumsum.default, aten.cumsum_.default)
def cumsum_vjp(grad, inputs_meta, dim):
    if len(inputs_meta[0][0]) == 0:
        return (reduce_to_dtype(grad, inputs_meta[0]),)
    return (reduce_to_dtype(grad.flip(dim).cumsum(dim).flip(dim), inputs_meta[0]),)


@register_vjp(aten.cumprod.default)
def cumprod_vjp(grad, self, dim):
    """Exact with zeros: d out_j / d x_k = prod_{i<k} x_i * prod_{k<i<=j} x_i
    for j >= k.  Built as an n x n table along ``dim`` (n = its size)."""
    if self.dim() == 0:
        return (grad,)
    dim = wrap_dim(dim, self.dim())
    x = self.movedim(dim, -1)  # [..., n]
    g = grad.movedim(dim, -1)
    n = x.shape[-1]
    if n == 0:
        return (grad,)
    upper = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)  # j > k
    # table[..., k, j] = x_j for j > k, else 1; its cumprod over j gives
    # prod_{k<i<=j} x_i (for j >= k)
    table = torch.where(upper, x.unsqueeze(-2), torch.ones((), dtype=x.dtype, device=x.device))
    partial = table.cumprod(-1) * upper.logical_or(torch.eye(n, dtype=torch.bool, device=x.device))
    left = torch.cat([torch.ones_like(x[..., :1]), x[..., :-1]], -1).cumprod(-1)  # prod_{i<k}
    out = _conj(left) * (_conj(partial) * g.unsqueeze(-2)).sum(-1)
    return (out.movedim(-1, dim),)


@register_vjp(aten.cummax.default, aten.cummin.default)
def cummax_vjp(grad, inputs_meta, result, dim):
    if grad[0] is None:
        return (None,)
    if len(inputs_meta[0][0]) == 0:
        return (grad[0],)
    return (grad[0].new_zeros(inputs_meta[0][0]).scatter_add(dim, result[1], grad[0]),)


@register_vjp(aten.logcumsumexp.default)
def logcumsumexp_vjp(grad, self, result, dim):
    """sum_{j>=k} grad_j exp(x_k - out_j), in log space for stability, the
    positive and negative parts of grad separately."""
    if self.dim() == 0:
        return (grad,)

    def reverse_logcumsumexp(t):
        return t.flip(dim).logcumsumexp(dim).flip(dim)

    lowest = torch.finfo(grad.dtype).min  # as torch does: -inf would make 0 * inf in second order
    log_pos = torch.where(grad > 0, grad.abs().log(), lowest)
    log_neg = torch.where(grad < 0, grad.abs().log(), lowest)
    pos = (reverse_logcumsumexp(log_pos - result) + self).exp()
    neg = (reverse_logcumsumexp(log_neg - result) + self).exp()
    return (pos - neg,)


def _fused_softmax_backward(grad, result, meta):
    """Whether the one-kernel backward op (autograd's choice) applies: real
    floating values of one dtype, at least 1-d."""
    return result.dim() > 0 and result.is_floating_point() and grad.dtype == result.dtype == meta[1]


@register_vjp(aten._softmax.default, *overloads(aten._safe_softmax, "default"))
def softmax_vjp(grad, inputs_meta, result, dim):
    if _fused_softmax_backward(grad, result, inputs_meta[0]):
        return (aten._softmax_backward_data.default(grad, result, dim, result.dtype),)
    g = grad * result
    out = g - result * g.sum(dim, keepdim=True) if result.dim() else g - result * g
    return (reduce_to_dtype(out, inputs_meta[0]),)


@register_vjp(aten._log_softmax.default)
def log_softmax_vjp(grad, inputs_meta, result, dim):
    if _fused_softmax_backward(grad, result, inputs_meta[0]):
        return (aten._log_softmax_backward_data.default(grad, result, dim, result.dtype),)
    total = grad.sum(dim, keepdim=True) if result.dim() else grad
    return (reduce_to_dtype(grad - result.exp() * total, inputs_meta[0]),)


@register_vjp(aten._softmax_backward_data.default)
def softmax_backward_data_vjp(grad, grad_output, output, dim):
    # out = output * (g - sum(g * output)): linear in g, bilinear overall.
    d_grad_output = output * (grad - (grad * output).sum(dim, keepdim=True))
    d_output = grad * (grad_output - (grad_output * output).sum(dim, keepdim=True)) - grad_output * (
        grad * output
    ).sum(dim, keepdim=True)
    return (d_grad_output, d_output)


@register_vjp(aten._log_softmax_backward_data.default)
def log_softmax_backward_data_vjp(grad, grad_output, output, dim):
    # out = g - exp(output) * sum(g)
    total = grad_output.sum(dim, keepdim=True)
    d_grad_output = grad - (grad * output.exp()).sum(dim, keepdim=True)
    d_output = -grad * output.exp() * total
    return (d_grad_output, d_output)


# -- JVPs ---------------------------------------------------------------------

# Linear reductions and scans: the op on the tangent.
register_jvp(
    aten.sum.default,
    aten.sum.dim_IntList,
    aten.mean.default,
    aten.mean.dim,
    aten.cumsum.default,
    aten.cumsum_.default,
)(linear_jvp())


@register_jvp(aten._softmax.default, *overloads(aten._safe_softmax, "default"))
def softmax_jvp(self_t, result, dim):
    if result.dim() == 0:
        return self_t * 0
    return result * (self_t - (result * self_t).sum(dim, keepdim=True))


@register_jvp(aten._log_softmax.default)
def log_softmax_jvp(self_t, result, dim):
    if result.dim() == 0:
        return self_t * 0
    return self_t - (result.exp() * self_t).sum(dim, keepdim=True)


@register_jvp(aten._softmax_backward_data.default)
def softmax_backward_data_jvp(grad_output, output, grad_output_t, output_t, dim, input_dtype):
    """out = y * (g - sum(g * y)): linear in g; in y, dy * (g - sum(g y)) - y * sum(g dy)."""
    tangent = None
    if grad_output_t is not None:
        tangent = aten._softmax_backward_data.default(grad_output_t, output, dim, input_dtype)
    if output_t is not None:
        moved = output_t * (grad_output - (grad_output * output).sum(dim, keepdim=True)) - output * (
            grad_output * output_t
        ).sum(dim, keepdim=True)
        tangent = moved if tangent is None else tangent + moved
    return tangent


@register_jvp(aten._log_softmax_backward_data.default)
def log_softmax_backward_data_jvp(grad_output, output, grad_output_t, output_t, dim, input_dtype):
    """out = g - exp(y) * sum(g): linear in g; in y, -exp(y) dy * sum(g)."""
    tangent = None
    if grad_output_t is not None:
        tangent = aten._log_softmax_backward_data.default(grad_output_t, output, dim, input_dtype)
    if output_t is not None:
        moved = -(output.exp() * output_t) * grad_output.sum(dim, keepdim=True)
        tangent = moved if tangent is None else tangent + moved
    return tangent


@register_jvp(aten.logsumexp.default)
def logsumexp_jvp(self, self_t, result, dim, keepdim=False):
    weights = (self - _unreduce(result, self.shape, dim, keepdim)).exp()
    return _reduce_like(self_t * weights, self.dim(), dim, keepdim)


def _reduce_like(x, rank, dim, keepdim):
    """``x.sum`` over the dims a reduction with ``dim`` removed."""
    if rank == 0:
        return x
    return x.sum(_reduced_dims(dim, rank), keepdim=keepdim)


@register_jvp(aten.amax.default, aten.amin.default)
def amax_jvp(self, self_t, result, dim=(), keepdim=False):
    """The tangent averaged over the elements tied at the extreme."""
    expanded = _unreduce(result, self.shape, dim, keepdim)
    mask = (self == expanded).to(self_t.dtype)
    return _reduce_like(self_t * mask, self.dim(), dim, keepdim) / _reduce_like(mask, self.dim(), dim, keepdim)


@register_jvp(aten.max.default, aten.min.default, aten.median.default, aten.nanmedian.default)
def max_all_jvp(self, self_t, result):
    mask = (self == result).to(self_t.dtype)
    return (self_t * mask).sum() / mask.sum()


def _take_along(tangent, indices, dim, keepdim, rank):
    """The tangent at the positions the op picked (max.dim, sort, topk, ...)."""
    if rank == 0:
        return tangent
    dim = wrap_dim(dim, rank)
    if not keepdim:
        return tangent.gather(dim, indices.unsqueeze(dim)).squeeze(dim)
    return tangent.gather(dim, indices)


@register_jvp(
    aten.max.dim, aten.min.dim, aten.kthvalue.default, aten.median.dim, aten.nanmedian.dim, aten.mode.default
)
def select_along_dim_jvp(self, self_t, result, dim=-1, keepdim=False):
    return _take_along(self_t, result[1], dim, keepdim, self.dim()), None


@register_jvp(aten.sort.default, *overloads(aten.sort, "stable"), aten.topk.default)
def sort_jvp(self, self_t, result, dim=-1):
    return _take_along(self_t, result[1], dim, True, self.dim()), None


@register_jvp(aten.cummax.default, aten.cummin.default)
def cummax_jvp(self, self_t, result, dim):
    return _take_along(self_t, result[1], dim, True, self.dim()), None


@register_jvp(aten.var.correction)
def var_jvp(self, self_t, dim=None, correction=None, keepdim=False):
    """d var = 2 Re(conj(x - mean) dx) / dof (the mean's own change sums to 0)."""
    dof = _dof(self.shape, dim, correction)
    centered = _centered(self, dim)
    inner = _real((centered.conj() if centered.is_complex() else centered) * self_t)
    return _reduce_like(2 * inner, self.dim(), dim, keepdim) / (dof if dof else 0.0)


@register_jvp(aten.std.correction)
def std_jvp(self, self_t, result, dim=None, correction=None, keepdim=False):
    return var_jvp(self, self_t, dim, correction, keepdim) / (2 * result)


@register_jvp(aten.var_mean.correction)
def var_mean_jvp(self, self_t, dim=None, correction=None, keepdim=False):
    mean_t = _reduce_like(self_t, self.dim(), dim, keepdim) / max(_count(self.shape, dim), 1)
    return var_jvp(self, self_t, dim, correction, keepdim), mean_t


@register_jvp(aten.std_mean.correction)
def std_mean_jvp(self, self_t, result, dim=None, correction=None, keepdim=False):
    mean_t = _reduce_like(self_t, self.dim(), dim, keepdim) / max(_count(self.shape, dim), 1)
    return std_jvp(self, self_t, result[0], dim, correction, keepdim), mean_t


@register_jvp(aten.prod.dim_int)
def prod_dim_jvp(self, self_t, dim, keepdim=False):
    if self.dim() == 0:
        return self_t
    d = wrap_dim(dim, self.dim())
    return (self_t * _product_of_others(self, d)).sum(d, keepdim=keepdim)


@register_jvp(aten.prod.default)
def prod_jvp(self, self_t):
    return (self_t.reshape(-1) * _product_of_others(self.reshape(-1), 0)).sum()


def _strict_upper_products(x):
    """For x [..., n]: table[..., k, j] = prod_{k<i<=j} x_i for j >= k, else
    0 (along the last dim): the products cumprod's derivatives need, exact
    with zeros."""
    n = x.shape[-1]
    upper = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
    table = torch.where(upper, x.unsqueeze(-2), torch.ones((), dtype=x.dtype, device=x.device))
    return table.cumprod(-1) * upper.logical_or(torch.eye(n, dtype=torch.bool, device=x.device))


@register_jvp(aten.cumprod.default)
def cumprod_jvp(self, self_t, dim):
    """out_j = prod_{i<=j} x_i: d out_j = sum_{k<=j} t_k prod_{i<k} x_i prod_{k<i<=j} x_i."""
    if self.dim() == 0:
        return self_t
    dim = wrap_dim(dim, self.dim())
    x, t = self.movedim(dim, -1), self_t.movedim(dim, -1)
    if x.shape[-1] == 0:
        return self_t
    left = torch.cat([torch.ones_like(x[..., :1]), x[..., :-1]], -1).cumprod(-1)
    out = ((left * t).unsqueeze(-1) * _strict_upper_products(x)).sum(-2)
    return out.movedim(-1, dim)


@register_jvp(aten.logcumsumexp.default)
def logcumsumexp_jvp(self, self_t, dim):
    """d out_j = sum_{k<=j} t_k exp(x_k - out_j) = cumsum(t e)_j / cumsum(e)_j
    with e = exp(x - max): derivatives.yaml's logcumsumexp_jvp, its 1e-13
    guard on the denominator included (so values match torch.func's)."""
    if self.dim() == 0 or self.numel() == 0:
        return self_t
    if self.is_complex():  # no max of complex numbers
        scaled = self.exp()
    else:
        scaled = (self - self.amax(dim, keepdim=True)).exp()
    return (scaled * self_t).cumsum(dim) / (scaled.cumsum(dim) + 1e-13)


def _norm_jvp(self, self_t, result, p, dim, keepdim):
    """derivatives.yaml's linalg_vector_norm_jvp: the real part of
    conj(d|x|^p / dx) t, reduced."""
    p = 2.0 if p is None else float(p)
    rank = self.dim()
    if p == 0.0:
        return torch.zeros_like(result)
    direction = self.sgn().conj() if self.is_complex() else self.sgn()
    if math.isinf(p):
        norm = _unreduce(result, self.shape, dim, keepdim)
        mask = (self.abs() == norm).to(result.dtype)
        numerator = _reduce_like(_real(direction * self_t) * mask, rank, dim, keepdim)
        return numerator / _reduce_like(mask, rank, dim, keepdim)
    if p == 1.0:
        return _reduce_like(_real(direction * self_t), rank, dim, keepdim)
    scaled = self.abs().pow(p - 1) * _real(direction * self_t)
    out = _reduce_like(scaled, rank, dim, keepdim) / result.pow(p - 1)
    return torch.where(result == 0, 0.0, out)


def _real(x):
    return x.real if x.is_complex() else x


@register_jvp(aten.linalg_vector_norm.default)
def vector_norm_jvp(self, self_t, result, ord=2, dim=None, keepdim=False):
    return _norm_jvp(self, self_t, result, ord, dim, keepdim)


@register_jvp(aten.norm.ScalarOpt_dim, aten.norm.ScalarOpt_dim_dtype)
def norm_dim_jvp(self, self_t, result, p, dim, keepdim=False):
    return _norm_jvp(self, self_t, result, p, dim, keepdim)


@register_jvp(aten.norm.Scalar, aten.norm.ScalarOpt_dtype)
def norm_all_jvp(self, self_t, result, p=2):
    return _norm_jvp(self, self_t, result, p, None, False)
