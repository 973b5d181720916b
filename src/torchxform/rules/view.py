"""Shape and view ops: view/reshape, permute/transpose, expand, squeeze,
slicing, splitting, concatenation, and their `*_copy` variants.

View rules return physical views of their input, so writes through a view
of a batched tensor reach its base, as in eager PyTorch.  Where possible a
rule keeps the batch dim where it is (one op, no extra movedim).
"""

from __future__ import annotations

import torch

from .._core.interpreter import register_patch
from .._core.tracer import Tracer
from .._core.registry import (
    BATCH_RULES,
    overloads,
    register_batching,
    register_batching_each,
    register_jvp,
    register_nondifferentiable,
    register_vjp,
)
from ._derivatives import linear_jvp
from ._batching import batch_size, front_padded, materialize, move_bdim_to_front, raise_as_eager, wrap_dim

aten = torch.ops.aten


def _phys(dim: int, bdim: int) -> int:
    """Physical position of canonical logical ``dim`` when the batch sits at
    ``bdim``: dims at or after the batch shift right by one."""
    return dim if dim < bdim else dim + 1


def _after_removing(dim: int, bdim: int) -> int:
    """bdim after physical ``dim`` (not the batch dim) is removed."""
    return bdim - 1 if dim < bdim else bdim


# -- view / reshape -----------------------------------------------------------


@register_batching(aten.view.default, *overloads(aten.reshape, "default"))
def view_batch(op, bdims, x, size):
    x = move_bdim_to_front(x, bdims[0])
    return op(x, (x.shape[0],) + tuple(size)), 0


@register_batching(aten._unsafe_view.default)
def unsafe_view_batch(bdims, x, size):
    # _unsafe_view only ever gets fresh temporaries (logically contiguous),
    # but the physical value's layout around the batch dim may not flatten.
    x = move_bdim_to_front(x, bdims[0])
    return x.reshape((x.shape[0],) + tuple(size)), 0


@register_batching(*overloads(aten.view, "dtype"))
def view_dtype_batch(bdims, x, dtype):
    bdim = bdims[0]
    if bdim == x.dim() - 1:  # the reinterpreted dim must be a logical one
        x, bdim = move_bdim_to_front(x, bdim), 0
    return x.view(dtype), bdim


# -- permutations -------------------------------------------------------------


@register_batching(aten.permute.default)
def permute_batch(bdims, x, dims):
    bdim = bdims[0]
    rank = x.dim() - 1
    if len(dims) != rank:
        raise RuntimeError(
            f"permute(sparse_coo): number of dimensions in the tensor input does not match the "
            f"length of the desired ordering of dimensions i.e. input.dim() = {rank} is not equal "
            f"to len(dims) = {len(dims)}"
        )
    return x.permute([bdim] + [_phys(wrap_dim(d, rank), bdim) for d in dims]), 0


@register_batching(aten.transpose.int)
def transpose_batch(bdims, x, dim0, dim1):
    bdim = bdims[0]
    rank = x.dim() - 1
    dim0, dim1 = wrap_dim(dim0, rank), wrap_dim(dim1, rank)
    if rank == 0:
        return aten.alias.default(x), bdim
    return x.transpose(_phys(dim0, bdim), _phys(dim1, bdim)), bdim


@register_batching(aten.t.default)
def t_batch(bdims, x):
    bdim = bdims[0]
    rank = x.dim() - 1
    if rank > 2:
        raise RuntimeError(f"t() expects a tensor with <= 2 dimensions, but self is {rank}D")
    return (aten.alias.default(x) if rank < 2 else x.transpose(_phys(0, bdim), _phys(1, bdim))), bdim


# -- expand / squeeze / unsqueeze ---------------------------------------------


@register_batching(aten.expand.default)
def expand_batch(bdims, x, size, *, implicit=False):
    rank = x.dim() - 1
    if len(size) < rank:
        raise RuntimeError(
            f"expand: the number of sizes provided ({len(size)}) must be greater or equal to the "
            f"number of dimensions in the tensor ({rank})"
        )
    x = front_padded(x, bdims[0], len(size))
    return x.expand((x.shape[0],) + tuple(size)), 0


@register_batching(aten.squeeze.default, aten.squeeze.dim, *overloads(aten.squeeze, "dims"))
def squeeze_batch(op, bdims, x, dim=None):
    bdim = bdims[0]
    rank = x.dim() - 1
    if dim is None:
        logical = range(rank)
    elif isinstance(dim, int):
        logical = [wrap_dim(dim, rank)]
    else:
        logical = [wrap_dim(d, rank) for d in dim]
    # Never squeeze the batch dim, even when the batch size is 1.
    physical = [_phys(d, bdim) for d in logical if rank > 0 and x.shape[_phys(d, bdim)] == 1]
    return aten.squeeze.dims(x, physical), bdim - sum(1 for d in physical if d < bdim)


@register_batching(aten.unsqueeze.default)
def unsqueeze_batch(bdims, x, dim):
    bdim = bdims[0]
    d = wrap_dim(dim, x.dim())  # logical rank + 1 dims after unsqueezing
    phys = d if d < bdim else d + 1
    return x.unsqueeze(phys), (bdim + 1 if phys <= bdim else bdim)


# -- slicing and selecting ----------------------------------------------------


@register_batching(aten.slice.Tensor)
def slice_batch(bdims, x, dim=0, start=None, end=None, step=1):
    bdim = bdims[0]
    return aten.slice.Tensor(x, _phys(wrap_dim(dim, x.dim() - 1), bdim), start, end, step), bdim


@register_batching(aten.select.int)
def select_batch(bdims, x, dim, index):
    bdim = bdims[0]
    d = _phys(wrap_dim(dim, x.dim() - 1), bdim)
    return x.select(d, index), _after_removing(d, bdim)


@register_batching(aten.narrow.default)
def narrow_batch(bdims, x, dim, start, length):
    bdim = bdims[0]
    return x.narrow(_phys(wrap_dim(dim, x.dim() - 1), bdim), start, length), bdim


# NOTE [narrow with a tensor start]
# aten.narrow.Tensor is CompositeImplicit: it reads its start with .item()
# before any transform sees an op, which cannot work when a vmap batches the
# start.  While transforms run, torch.narrow and Tensor.narrow given a tracer
# start take positions start .. start+length-1 with index_select instead,
# which every transform has rules for (the result is then a copy, not a view).
_original_narrow = torch.narrow


def _narrow(input, dim, start, length):
    if not isinstance(start, Tracer):
        return _original_narrow(input, dim, start, length)
    dim = wrap_dim(dim, input.dim())
    start = torch.where(start < 0, start + input.shape[dim], start)
    return input.index_select(dim, start + torch.arange(length, device=start.device))


register_patch(torch, "narrow", _narrow)
register_patch(torch.Tensor, "narrow", _narrow)


# tensor_split with a tensor of indices is CompositeImplicit too, and reads the
# indices' data: a tracer of them (batched by vmap) gets a clear error.
_original_tensor_split = torch.tensor_split


def _tensor_split(input, indices_or_sections=None, dim=0, **kwargs):
    for value in (indices_or_sections, *kwargs.values()):
        if isinstance(value, Tracer):
            raise RuntimeError(
                "tensor_split: the indices or sections are a tensor tracked by a transform (e.g. batched by vmap); "
                "their values decide the output shapes, which must be the same for every example. Pass Python "
                "ints or a tensor from outside the transform."
            )
    if indices_or_sections is None:
        return _original_tensor_split(input, dim=dim, **kwargs)
    return _original_tensor_split(input, indices_or_sections, dim, **kwargs)


register_patch(torch, "tensor_split", _tensor_split)
register_patch(torch.Tensor, "tensor_split", _tensor_split)


@register_batching(
    aten.split.Tensor,
    aten.split_with_sizes.default,
    *overloads(aten.unsafe_split, "Tensor"),
    *overloads(aten.unsafe_split_with_sizes, "default"),
)
def split_batch(op, bdims, x, split, dim=0):
    bdim = bdims[0]
    return list(op(x, split, _phys(wrap_dim(dim, x.dim() - 1), bdim))), bdim


@register_batching(aten.unbind.int)
def unbind_batch(bdims, x, dim=0):
    bdim = bdims[0]
    d = _phys(wrap_dim(dim, x.dim() - 1), bdim)
    return list(x.unbind(d)), _after_removing(d, bdim)


@register_batching(aten.diagonal.default)
def diagonal_batch(bdims, x, offset=0, dim1=0, dim2=1):
    bdim = bdims[0]
    rank = x.dim() - 1
    d1, d2 = _phys(wrap_dim(dim1, rank), bdim), _phys(wrap_dim(dim2, rank), bdim)
    return x.diagonal(offset, d1, d2), bdim - (d1 < bdim) - (d2 < bdim)


@register_batching(aten.unfold.default)
def unfold_batch(bdims, x, dimension, size, step):
    bdim = bdims[0]
    rank = x.dim() - 1
    dimension = wrap_dim(dimension, rank)
    if rank == 0:
        # A 0-dim tensor unfolds as a 1-element vector whose one window is
        # squeezed away: the result is [size] (size 0 or 1).
        # [B] -> [B, 1] -> [B, size]
        if size > 1 or step <= 0:
            raise_as_eager(aten.unfold.default, bdims, (x, dimension, size, step))
        return move_bdim_to_front(x, bdim).unsqueeze(1).narrow(1, 0, size), 0
    return x.unfold(_phys(dimension, bdim), size, step), bdim


# NOTE [as_strided under vmap]
# as_strided addresses an example's *storage*.  The semantics vmap gives it:
# each example behaves as a tensor of its own whose storage holds its
# elements, starting at storage offset 0 (a tracer reports offset 0, so
# `storage_offset` is relative to the example).  With the batch in front:
# - a plain physical tensor whose examples lie in disjoint chunks
#   (`x.stride(0)` >= the span of one example, e.g. in_dims=0): example i's
#   storage starts at its first element and its strides are the physical
#   ones, which its tracer reports; the result is a view of x;
# - otherwise (examples interleave, e.g. in_dims=-1; or the physical value
#   is a lower level's tracer, whose reported strides need not describe how
#   that level lays out its storage) each example's storage is its elements
#   in their memory order, densely: a copy, read at the addressed positions
#   (the result is then not a view of x).
# A read past the end of an example's storage raises, as eager does for a
# read past the end of a storage.


def _span(sizes, strides) -> int:
    """Elements from the first to the last one addressed, inclusive (0 when
    there are none)."""
    if any(n == 0 for n in sizes):
        return 0
    return 1 + sum((n - 1) * abs(st) for n, st in zip(sizes, strides))


def _memory_order(xf: torch.Tensor) -> list[int]:
    """The logical dims of front-batched ``xf``, outermost in memory first."""
    strides = xf.stride()[1:]
    return sorted(range(len(strides)), key=lambda d: -strides[d])


def _check_bounds(op, size, stride, offset, storage_size):
    if _span(size, stride) > 0 and offset + _span(size, stride) > storage_size:
        raise RuntimeError(
            f"vmap: {op}(size={list(size)}, stride={list(stride)}, storage_offset={offset}) reaches "
            f"element {offset + _span(size, stride) - 1} of each example's storage, which holds "
            f"{storage_size} elements: out of bounds (each example is addressed as a tensor of its "
            f"own; see NOTE [as_strided under vmap])"
        )


def _positions(size, stride, offset, device) -> torch.Tensor:
    """Storage positions that as_strided(size, stride, offset) addresses,
    flattened: offset + sum_d arange(size[d]) * stride[d]."""
    index = torch.full((), offset, dtype=torch.long, device=device)
    for d, (n, st) in enumerate(zip(size, stride)):
        shape = [1] * len(size)
        shape[d] = n
        index = index + (torch.arange(n, device=device) * st).view(shape)
    return index.expand(tuple(size)).reshape(-1)


def _flat_storage(xf: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Each example of front-batched ``xf`` as its dense storage, [B, N]:
    its elements in memory order.  Also the order (for putting back)."""
    order = _memory_order(xf)
    return xf.permute([0] + [d + 1 for d in order]).reshape(xf.shape[0], -1), order


def _is_chunked(xf: torch.Tensor) -> bool:
    if isinstance(xf, Tracer):
        return False
    return xf.shape[0] <= 1 or (xf.stride(0) > 0 and xf.stride(0) >= _span(xf.shape[1:], xf.stride()[1:]))


@register_batching(aten.as_strided.default)
def as_strided_batch(bdims, x, size, stride, storage_offset=None):
    """See NOTE [as_strided under vmap]."""
    op = aten.as_strided.default
    xf = move_bdim_to_front(x, bdims[0])
    offset = storage_offset or 0
    if _is_chunked(xf):
        if xf.shape[0] > 1:
            _check_bounds(op, size, stride, offset, xf.stride(0))
        return xf.as_strided((xf.shape[0],) + tuple(size), (xf.stride(0),) + tuple(stride), xf.storage_offset() + offset), 0
    flat, _ = _flat_storage(xf)
    _check_bounds(op, size, stride, offset, flat.shape[1])
    index = _positions(size, stride, offset, flat.device)
    return flat.index_select(1, index).view((flat.shape[0],) + tuple(size)), 0


@register_batching(*overloads(aten.as_strided_scatter, "default"))
def as_strided_scatter_batch(bdims, x, src, size, stride, storage_offset=None):
    """A copy of each example of ``x`` (as eager clones a dense ``x``,
    keeping its memory order) with ``src`` written at the positions
    as_strided addresses.  See NOTE [as_strided under vmap]."""
    op = aten.as_strided_scatter.default
    batch = batch_size((x, src), bdims[:2])
    xf = materialize(x, bdims[0], batch)
    src = materialize(src, bdims[1], batch)
    if tuple(src.shape[1:]) != tuple(size):
        raise_as_eager(op, bdims, (x, src, size, stride, storage_offset))
    offset = storage_offset or 0
    flat, order = _flat_storage(xf)
    _check_bounds(op, size, stride, offset, flat.shape[1])
    index = _positions(size, stride, offset, flat.device)
    flat = flat.index_copy(1, index, src.reshape(batch, -1))
    permuted = [xf.shape[0]] + [xf.shape[d + 1] for d in order]
    inverse = [0] * len(order)
    for position, d in enumerate(order):
        inverse[d] = position + 1
    return flat.view(permuted).permute([0] + inverse), 0


@register_batching(*overloads(aten.resize_, "default"))
def resize_batch(bdims, x, size, *, memory_format=None):
    """resize_ to the tensor's own shape changes nothing; any other resize
    would give the tracer new sizes, which a rule cannot do."""
    logical = tuple(x.shape[: bdims[0]] + x.shape[bdims[0] + 1 :])
    if tuple(size) == logical and memory_format is None:
        return x, bdims[0]
    raise RuntimeError(
        f"vmap: resize_ of a batched tensor of shape {list(logical)} to {list(size)} is not "
        f"supported: it would change the shape of a tensor vmap is tracking in place. Use an "
        f"out-of-place op instead, e.g. x = x.reshape({list(size)}) (same number of elements) or "
        f"x = x.new_empty({list(size)})."
    )


# -- aliases ------------------------------------------------------------------


@register_batching(
    aten.alias.default,
    aten.detach.default,
    *overloads(aten.conj, "default"),
    *overloads(aten._conj, "default"),
    *overloads(aten._neg_view, "default"),
    *overloads(aten.resolve_conj, "default"),
    *overloads(aten.resolve_neg, "default"),
    *overloads(aten.real, "default"),
    *overloads(aten.imag, "default"),
    *overloads(aten.lift_fresh, "default"),
    *overloads(aten._conj_physical, "default"),
)
def alias_batch(op, bdims, x):
    return op(x), bdims[0]


@register_batching(*overloads(aten.view_as_real, "default"), *overloads(aten.view_as_complex, "default"))
def view_as_real_complex_batch(op, bdims, x):
    bdim = bdims[0]
    if bdim == x.dim() - 1:  # the last dim is reinterpreted: keep the batch out of it
        x, bdim = move_bdim_to_front(x, bdim), 0
    return op(x), bdim


# -- joining ------------------------------------------------------------------


def _is_legacy_empty(t, bdim) -> bool:
    if bdim is None:
        return t.dim() == 1 and t.shape[0] == 0
    return t.dim() == 2 and t.shape[1 - bdim] == 0


@register_batching(aten.cat.default)
def cat_batch(bdims, tensors, dim=0):
    tensor_bdims = bdims[0]
    batch = next(t.shape[b] for t, b in zip(tensors, tensor_bdims) if b is not None)
    # Legacy behaviour: cat skips 1-D empty tensors whatever the other shapes.
    parts = [materialize(t, b, batch) for t, b in zip(tensors, tensor_bdims) if not _is_legacy_empty(t, b)]
    if not parts:
        return materialize(tensors[0], tensor_bdims[0], batch), 0
    rank = max(p.dim() - 1 for p in parts)
    return torch.cat(parts, wrap_dim(dim, rank) + 1), 0


@register_batching(aten.stack.default)
def stack_batch(bdims, tensors, dim=0):
    tensor_bdims = bdims[0]
    batch = next(t.shape[b] for t, b in zip(tensors, tensor_bdims) if b is not None)
    parts = [materialize(t, b, batch) for t, b in zip(tensors, tensor_bdims)]
    return torch.stack(parts, wrap_dim(dim, parts[0].dim()) + 1), 0


@register_batching(aten.repeat.default)
def repeat_batch(bdims, x, repeats):
    rank = x.dim() - 1
    if len(repeats) < rank:
        raise RuntimeError(
            "Number of dimensions of repeat dims can not be smaller than number of dimensions of tensor"
        )
    x = front_padded(x, bdims[0], len(repeats))
    return x.repeat((1,) + tuple(repeats)), 0


@register_batching(aten.flip.default)
def flip_batch(bdims, x, dims):
    bdim = bdims[0]
    rank = x.dim() - 1
    return x.flip([_phys(wrap_dim(d, rank), bdim) for d in dims]), bdim


@register_batching(aten.roll.default)
def roll_batch(bdims, x, shifts, dims=()):
    bdim = bdims[0]
    rank = x.dim() - 1
    if len(dims) == 0:  # roll the flattened tensor
        x = move_bdim_to_front(x, bdim)
        return x.flatten(1).roll(shifts, 1).view(x.shape), 0
    return x.roll(shifts, [_phys(wrap_dim(d, rank), bdim) for d in dims]), bdim


@register_batching(aten.rot90.default)
def rot90_batch(bdims, x, k=1, dims=(0, 1)):
    bdim = bdims[0]
    rank = x.dim() - 1
    return x.rot90(k, [_phys(wrap_dim(d, rank), bdim) for d in dims]), bdim


@register_batching(aten.tril.default, aten.triu.default, aten.tril_.default, aten.triu_.default)
def tril_triu_batch(op, bdims, x, diagonal=0):
    # Both act on the last two dims: keep the batch in front of them (a
    # view, so the in-place forms write into x).
    return op(move_bdim_to_front(x, bdims[0]), diagonal), 0


@register_batching(*overloads(aten._reshape_copy, "default"))
def reshape_copy_batch(bdims, x, size):
    x = move_bdim_to_front(x, bdims[0])
    return x.reshape((x.shape[0],) + tuple(size)).clone(), 0


# -- `*_copy` variants: the view rule, then a copy --------------------------


def _copy_of_view(op, bdims, *args, view_rule, **kwargs):
    out, bdim = view_rule(bdims, *args, **kwargs)
    if isinstance(out, list):
        return [o.clone() for o in out], bdim
    return out.clone(), bdim


def _register_copy_variants():
    for copy_name, view_name in [
        ("view_copy", "view"), ("permute_copy", "permute"), ("transpose_copy", "transpose"),
        ("t_copy", "t"), ("expand_copy", "expand"), ("squeeze_copy", "squeeze"),
        ("unsqueeze_copy", "unsqueeze"), ("slice_copy", "slice"), ("select_copy", "select"),
        ("narrow_copy", "narrow"), ("split_copy", "split"), ("split_with_sizes_copy", "split_with_sizes"),
        ("unbind_copy", "unbind"), ("diagonal_copy", "diagonal"), ("as_strided_copy", "as_strided"),
        ("alias_copy", "alias"), ("detach_copy", "detach"), ("view_as_real_copy", "view_as_real"),
        ("view_as_complex_copy", "view_as_complex"), ("unfold_copy", "unfold"),
    ]:
        copy_packet, view_packet = getattr(aten, copy_name, None), getattr(aten, view_name, None)
        if copy_packet is None or view_packet is None:
            continue
        for name in copy_packet.overloads():
            view_op = getattr(view_packet, name, None) if name in view_packet.overloads() else None
            if view_op is not None and view_op in BATCH_RULES:
                register_batching_each([getattr(copy_packet, name)], _copy_of_view, view_rule=BATCH_RULES[view_op])


_register_copy_variants()


# ==========================================================================
# Derivatives.  A view's VJP puts the cotangent back where the view took its
# elements from: the inverse view where there is one, else a copy into the
# matching view of zeros (new_zeros of a batched cotangent is batched, so
# this composes with vmap).
# ==========================================================================


def _into_zeros(grad, shape, view):
    """Zeros of ``shape`` with ``view(zeros)`` set to ``grad``."""
    out = grad.new_zeros(shape)
    view(out).copy_(grad)
    return out


@register_vjp(aten.view.default, aten._unsafe_view.default, aten.reshape.default, *overloads(aten.view_copy, "default"),
              aten.squeeze.default, aten.squeeze.dim, *overloads(aten.squeeze, "dims"),
              *overloads(aten.squeeze_copy, "default", "dim", "dims"), *overloads(aten._reshape_alias, "default"))
def reshape_vjp(grad, inputs_meta):
    return (grad.reshape(inputs_meta[0][0]),)


@register_vjp(aten.unsqueeze.default, *overloads(aten.unsqueeze_copy, "default"))
def unsqueeze_vjp(grad, dim):
    return (grad.squeeze(dim),)


@register_vjp(aten.permute.default, *overloads(aten.permute_copy, "default"))
def permute_vjp(grad, dims):
    rank = len(dims)
    inverse = [0] * rank
    for i, d in enumerate(dims):
        inverse[wrap_dim(d, rank)] = i
    return (grad.permute(inverse),)


@register_vjp(aten.transpose.int, *overloads(aten.transpose_copy, "int"))
def transpose_vjp(grad, dim0, dim1):
    return (grad.transpose(dim0, dim1),)


@register_vjp(aten.t.default, *overloads(aten.t_copy, "default"))
def t_vjp(grad):
    return (grad.t(),)


@register_vjp(aten.expand.default, *overloads(aten.expand_copy, "default"))
def expand_vjp(grad, inputs_meta):
    return (grad.sum_to_size(inputs_meta[0][0]),)


@register_vjp(
    aten.alias.default,
    *overloads(aten.alias_copy, "default"),
    *overloads(aten.lift_fresh, "default"),
    *overloads(aten.lift_fresh_copy, "default"),
)
def alias_vjp(grad):
    return (grad,)


@register_vjp(aten.slice.Tensor, *overloads(aten.slice_copy, "Tensor"))
def slice_vjp(grad, inputs_meta, dim=0, start=None, end=None, step=1):
    return (_into_zeros(grad, inputs_meta[0][0], lambda z: aten.slice.Tensor(z, dim, start, end, step)),)


@register_vjp(aten.select.int, *overloads(aten.select_copy, "int"))
def select_vjp(grad, inputs_meta, dim, index):
    return (_into_zeros(grad, inputs_meta[0][0], lambda z: z.select(dim, index)),)


@register_vjp(aten.diagonal.default, *overloads(aten.diagonal_copy, "default"))
def diagonal_vjp(grad, inputs_meta, offset=0, dim1=0, dim2=1):
    return (_into_zeros(grad, inputs_meta[0][0], lambda z: z.diagonal(offset, dim1, dim2)),)


@register_vjp(aten.narrow.default, *overloads(aten.narrow_copy, "default"))
def narrow_vjp(grad, inputs_meta, dim, start, length):
    return (_into_zeros(grad, inputs_meta[0][0], lambda z: z.narrow(dim, start, length)),)


def _join_pieces(grad, metas, join):
    pieces = [g if g is not None else torch.zeros(m[0], dtype=m[1], device=m[2]) for g, m in zip(grad, metas)]
    return join(pieces)


@register_vjp(
    aten.split.Tensor,
    aten.split_with_sizes.default,
    *overloads(aten.unsafe_split, "Tensor"),
    *overloads(aten.unsafe_split_with_sizes, "default"),
    *overloads(aten.split_copy, "Tensor"),
    *overloads(aten.split_with_sizes_copy, "default"),
)
def split_vjp(grad, result, dim=0):
    metas = [(r.shape, r.dtype, r.device) for r in result]
    return (_join_pieces(grad, metas, lambda pieces: torch.cat(pieces, dim)),)


@register_vjp(aten.unbind.int, *overloads(aten.unbind_copy, "int"))
def unbind_vjp(grad, result, dim=0):
    metas = [(r.shape, r.dtype, r.device) for r in result]
    return (_join_pieces(grad, metas, lambda pieces: torch.stack(pieces, dim)),)


@register_vjp(aten.cat.default)
def cat_vjp(grad, inputs_meta, dim=0):
    metas = inputs_meta[0]
    kept = [m for m in metas if not (len(m[0]) == 1 and m[0][0] == 0)]  # legacy: 1-D empties are skipped
    dim = wrap_dim(dim, len(kept[0][0])) if kept else 0
    pieces = iter(grad.split([m[0][dim] for m in kept], dim)) if kept else iter(())
    return ([next(pieces) if m in kept else None for m in metas],)


@register_vjp(aten.stack.default)
def stack_vjp(grad, dim=0):
    return (list(grad.unbind(dim)),)


@register_vjp(aten.repeat.default)
def repeat_vjp(grad, inputs_meta, repeats):
    shape = inputs_meta[0][0]
    padded = (1,) * (len(repeats) - len(shape)) + tuple(shape)
    # [r0*s0, r1*s1] -> [r0, s0, r1, s1] -> sum over the r dims
    split = [x for r, s in zip(repeats, padded) for x in (r, s)]
    summed = grad.reshape(split).sum(list(range(0, 2 * len(repeats), 2)))
    return (summed.reshape(shape),)


@register_vjp(aten.flip.default)
def flip_vjp(grad, dims):
    return (grad.flip(dims),)


@register_vjp(aten.roll.default)
def roll_vjp(grad, shifts, dims=()):
    return (grad.roll([-s for s in shifts], dims),)


@register_vjp(aten.rot90.default)
def rot90_vjp(grad, k=1, dims=(0, 1)):
    return (grad.rot90(-k, dims),)


@register_vjp(aten.tril.default)
def tril_vjp(grad, diagonal=0):
    return (grad.tril(diagonal),)


@register_vjp(aten.triu.default)
def triu_vjp(grad, diagonal=0):
    return (grad.triu(diagonal),)


@register_vjp(aten.unfold.default, *overloads(aten.unfold_copy, "default"))
def unfold_vjp(grad, inputs_meta, dimension, size, step):
    return (aten.unfold_backward.default(grad, inputs_meta[0][0], dimension, size, step),)


@register_batching(aten.unfold_backward.default)
def unfold_backward_batch(bdims, grad_in, input_sizes, dim, size, step):
    grad_in = move_bdim_to_front(grad_in, bdims[0])
    rank = len(input_sizes)
    if rank == 0:  # a 0-dim input's one window: [B, size] -> [B]
        return grad_in.sum(1), 0
    return aten.unfold_backward.default(
        grad_in, [grad_in.shape[0], *input_sizes], wrap_dim(dim, rank) + 1, size, step
    ), 0


@register_vjp(aten.unfold_backward.default)
def unfold_backward_vjp(grad, dim, size, step):
    return (grad.unfold(dim, size, step),)


# -- as_strided: a read at storage positions -----------------------------------
# derivatives.yaml's as_strided_backward, with storage positions as index
# tensors: the cotangent is accumulated into a zero storage at the positions
# the output read (overlapping outputs add up), and the input's gradient is
# read back at the input's positions; an input whose elements overlap in
# memory shares each position's gradient among them.


def _maybe_overlaps(sizes, strides) -> bool:
    """False when no two elements of this geometry can share a position."""
    dims = sorted((abs(st), n) for n, st in zip(sizes, strides) if n > 1)
    reach = 0  # the largest position offset the inner dims reach
    for st, n in dims:
        if st <= reach:
            return True
        reach += (n - 1) * st
    return False


@register_vjp(aten.as_strided.default, *overloads(aten.as_strided_copy, "default"))
def as_strided_vjp(grad, self, size, stride, storage_offset=None):
    in_size, in_stride, in_offset = tuple(self.shape), tuple(self.stride()), self.storage_offset()
    out_offset = in_offset if storage_offset is None else storage_offset
    shared = min(in_offset, out_offset)
    in_offset, out_offset = in_offset - shared, out_offset - shared
    length = max(in_offset + _span(in_size, in_stride), out_offset + _span(size, stride))
    device = grad.device
    storage = grad.new_zeros(length).index_add(0, _positions(size, stride, out_offset, device), grad.reshape(-1))
    in_positions = _positions(in_size, in_stride, in_offset, device)
    if _maybe_overlaps(in_size, in_stride):
        ones = grad.new_ones(()).expand(in_positions.shape)
        storage = storage / grad.new_zeros(length).index_add(0, in_positions, ones)
    return (storage.index_select(0, in_positions).view(in_size),)


# -- as_strided_scatter: a write at storage positions of a copy of self ----------
# The copy keeps self's memory order when self is dense (as eager's clone
# does), else it is contiguous; positions address that order.


def _storage_order(t: torch.Tensor) -> list[int]:
    if t.dim() == 0 or not _maybe_overlaps(t.shape, t.stride()) and _span(t.shape, t.stride()) == t.numel():
        return sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return list(range(t.dim()))


def _in_storage_order(t: torch.Tensor, order) -> torch.Tensor:
    return t.permute(order).reshape(-1)


def _from_storage_order(flat: torch.Tensor, shape, order) -> torch.Tensor:
    inverse = [0] * len(order)
    for position, d in enumerate(order):
        inverse[d] = position
    return flat.view([shape[d] for d in order]).permute(inverse)


@register_vjp(*overloads(aten.as_strided_scatter, "default"))
def as_strided_scatter_vjp(grad, self, needs, size, stride, storage_offset=None):
    order = _storage_order(self)
    flat = _in_storage_order(grad, order)
    positions = _positions(size, stride, storage_offset or 0, grad.device)
    self_grad = _from_storage_order(flat.index_fill(0, positions, 0), self.shape, order) if needs[0] else None
    src_grad = flat.index_select(0, positions).view(tuple(size)) if needs[1] else None
    return self_grad, src_grad


@register_jvp(*overloads(aten.as_strided_scatter, "default"))
def as_strided_scatter_jvp(self, src, self_t, src_t, size, stride, storage_offset=None):
    order = _storage_order(self)
    flat = _in_storage_order(self_t if self_t is not None else torch.zeros_like(self), order)
    positions = _positions(size, stride, storage_offset or 0, self.device)
    values = src_t.reshape(-1) if src_t is not None else src.new_zeros(positions.shape)
    return _from_storage_order(flat.index_copy(0, positions, values), self.shape, order)


register_nondifferentiable(aten.detach.default, *overloads(aten.detach_copy, "default"))



# -- JVPs: every view and joining op here is linear: the op on the tangents ---
# (the tangent of a view is the same view of the tangent).
register_jvp(
    aten.view.default,
    aten._unsafe_view.default,
    *overloads(aten.reshape, "default"),
    *overloads(aten._reshape_alias, "default"),
    *overloads(aten._reshape_copy, "default"),
    aten.permute.default,
    aten.transpose.int,
    aten.t.default,
    aten.expand.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    *overloads(aten.squeeze, "dims"),
    aten.unsqueeze.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.narrow.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    *overloads(aten.unsafe_split, "Tensor"),
    *overloads(aten.unsafe_split_with_sizes, "default"),
    aten.unbind.int,
    aten.diagonal.default,
    aten.unfold.default,
    aten.unfold_backward.default,
    aten.as_strided.default,
    aten.alias.default,
    *overloads(aten.lift_fresh_copy, "default"),
    *overloads(aten.real, "default"),
    *overloads(aten.imag, "default"),
    aten.cat.default,
    aten.stack.default,
    aten.repeat.default,
    aten.flip.default,
    aten.roll.default,
    aten.rot90.default,
    aten.tril.default,
    aten.triu.default,
    aten.tril_.default,
    aten.triu_.default,
    *(op for op in BATCH_RULES if op._schema.name.split("::")[-1].endswith("_copy") and op is not aten.copy_.default),
)(linear_jvp())
