"""Batching rules of the indexing family (advanced indexing, gather/scatter,
index_*, take/put, masked_scatter, embedding, searchsorted/bucketize/isin,
repeat_interleave) against a Python loop over the batch."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import torchxform
from tests.harness import (
    check_autograd_through_vmap,
    assert_close,
    check_vmap,
    check_vmap_sampled,
    loop_reference,
    no_fallback,
    skip_cpu_reference_rows,
)

aten = torch.ops.aten


def _i(size, *shape):
    """Random indices into a dim of ``size``, negative ones included."""
    return torch.randint(-size, size, shape)


def _nonneg(size, *shape):
    return torch.randint(0, size, shape)


def _unique(size, *shape, negative=True):
    """Distinct positions (as indices, some negative) into a dim of ``size``:
    writes without accumulation must not collide."""
    n = 1
    for s in shape:
        n *= s
    positions = torch.randperm(size)[:n]
    if negative:
        positions = torch.where(torch.rand(n) < 0.5, positions - size, positions)
    return positions.view(shape)


def _unique_rows(rows, size, k):
    """[rows, k] indices, distinct within each row."""
    return torch.argsort(torch.rand(rows, size), dim=1)[:, :k]


def _sorted(*shape):
    return torch.randn(shape).sort(-1).values


def _ties(*shape):
    """Small integers as floats: plenty of equal values for left/right search."""
    return torch.randint(0, 5, shape).float()


def check_vmap_self_batched(fn, sample, batch_size=3):
    """check_vmap_sampled for in-place ops: the first argument (written in
    place) is always batched, the others at 0, -1 or not at all; plus
    vmap(vmap(fn)) with everything batched."""
    samples = [tuple(sample()) for _ in range(batch_size)]
    positions = [i for i, a in enumerate(samples[0]) if isinstance(a, torch.Tensor)]
    choices = [(0, -1) if i == 0 else (0, -1, None) for i in positions]
    for combo in itertools.product(*choices):
        dim_of = dict(zip(positions, combo))
        args = [
            torch.stack([s[i] for s in samples], dim=dim_of[i] % (s0.dim() + 1)) if dim_of.get(i) is not None else s0
            for i, s0 in enumerate(samples[0])
        ]
        in_dims = tuple(dim_of.get(i) for i in range(len(args)))
        check_vmap(fn, *args, in_dims=in_dims, msg=f"in_dims={in_dims}")
    grid = [[tuple(sample()) for _ in range(batch_size)] for _ in range(2)]
    args = [
        torch.stack([torch.stack([grid[r][c][i] for c in range(batch_size)]) for r in range(2)])
        if i in positions
        else a
        for i, a in enumerate(grid[0][0])
    ]
    in_dims = tuple(0 if i in positions else None for i in range(len(args)))
    expected = loop_reference(lambda *xs: loop_reference(fn, xs, in_dims), args, in_dims)
    actual = torchxform.vmap(torchxform.vmap(fn, in_dims), in_dims)(*args)
    assert_close(actual, expected, msg="nested")


# --------------------------------------------------------------------------
# Advanced indexing: x[indices]
# --------------------------------------------------------------------------

X3 = (4, 5, 6)
X4 = (4, 5, 6, 3)
# Masks are made when a test runs (on its default device), not at import.
def MASK4():
    return torch.tensor([True, False, True, True])


def MASK5():
    return torch.tensor([True, False, True, True, False])


def MASK45():
    return torch.tensor([[True, False, True, True, False]] * 2 + [[False, False, True, False, True]] * 2)

INDEX = [
    # (name, fn, sample)
    ("i", lambda x, i: x[i], lambda: (torch.randn(X3), _i(4, 2))),
    ("slice_i", lambda x, i: x[:, i], lambda: (torch.randn(X3), _i(5, 2))),
    ("slice_slice_i", lambda x, i: x[:, :, i], lambda: (torch.randn(X3), _i(6, 2))),
    ("i_j", lambda x, i, j: x[i, j], lambda: (torch.randn(X3), _i(4, 2), _i(5, 2))),
    ("slice_i_j", lambda x, i, j: x[:, i, j], lambda: (torch.randn(X3), _i(5, 2), _i(6, 2))),
    ("i_slice_j", lambda x, i, j: x[i, :, j], lambda: (torch.randn(X3), _i(4, 2), _i(6, 2))),
    ("slice_i_slice_j", lambda x, i, j: x[:, i, :, j], lambda: (torch.randn(X4), _i(5, 2), _i(3, 2))),
    ("i_slice_slice_j", lambda x, i, j: x[i, :, :, j], lambda: (torch.randn(X4), _i(4, 2), _i(3, 2))),
    ("i_j_slice_k", lambda x, i, j, k: x[i, j, :, k], lambda: (torch.randn(X4), _i(4, 2), _i(5, 2), _i(3, 2))),
    ("slice_i_j_slice", lambda x, i, j: x[:, i, j, :], lambda: (torch.randn(X4), _i(5, 2), _i(6, 2))),
    ("broadcast", lambda x, i, j: x[:, i, j], lambda: (torch.randn(X3), _i(5, 3, 1), _i(6, 2))),
    ("broadcast_apart", lambda x, i, j: x[i, :, j], lambda: (torch.randn(X3), _i(4, 3, 1), _i(6, 2))),
    ("index_2d", lambda x, i: x[:, i], lambda: (torch.randn(X3), _i(5, 2, 3))),
    ("index_2d_and_1d", lambda x, i, j: x[i, :, j], lambda: (torch.randn(X3), _i(4, 2, 3), _i(6, 3))),
    # 0-dim index tensors through aten.index: Python's x[i] reads a 0-dim
    # integer index with .item() (see test_python_zero_dim_index).
    ("zero_dim", lambda x, i: aten.index.Tensor(x, [None, i]), lambda: (torch.randn(X3), _i(5))),
    ("zero_dim_apart", lambda x, i, j: aten.index.Tensor(x, [i, None, j]), lambda: (torch.randn(X3), _i(4), _i(6, 2))),
    ("zero_dim_pair", lambda x, i, j: aten.index.Tensor(x, [i, j]), lambda: (torch.randn(X3), _i(4), _i(5))),
    ("size_one", lambda x, i: x[:, i], lambda: (torch.randn(4, 1, 6), _i(1, 3))),
    ("int32", lambda x, i, j: x[:, i.int(), j], lambda: (torch.randn(X3), _i(5, 2), _i(6, 2))),
    ("mask", lambda x: x[:, MASK5()], lambda: (torch.randn(X3),)),
    ("mask_2d", lambda x: x[MASK45()], lambda: (torch.randn(X3),)),
    ("mask_and_index", lambda x, j: x[MASK4(), :, j], lambda: (torch.randn(X3), _i(6, 3))),
    ("mask_uint8", lambda x: aten.index.Tensor(x, [None, MASK5().to(torch.uint8)]), lambda: (torch.randn(X3),)),
    ("lists", lambda x: x[[0, 2], :, [1, -1]], lambda: (torch.randn(X3),)),
    ("slice_then_index", lambda x, i: x[i, 1:4], lambda: (torch.randn(X3), _i(4, 2))),
    ("newaxis", lambda x, i: x[None, :, i], lambda: (torch.randn(X3), _i(5, 2))),
    (
        "unsafe_index",
        lambda x, i, j: aten._unsafe_index.Tensor(x, [i, None, j]),
        lambda: (torch.randn(X3), _i(4, 2), _i(6, 2)),
    ),
]


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, i: x[:, i],
        lambda x, i: x[i],
        lambda x, i: x[i, None, 1:],
        lambda x, i: x[..., i],
        lambda x, i: x[i, torch.tensor([0, 1])],
        lambda x, i: x[i][i],
    ],
)
def test_python_zero_dim_index(fn):
    # See NOTE [0-dim integer tracer as an index] in _core/tracer.py.
    check_vmap(fn, torch.randn(3, 4, 5), torch.tensor([0, -1, 2]))


def test_python_zero_dim_index_setitem():
    def set_column(x, i, v):
        x = x.clone()
        x[:, i] = v
        return x

    def set_row(x, i, v):
        x = x.clone()
        x[i] = v
        return x

    check_vmap(set_column, torch.randn(3, 4, 5), torch.tensor([0, -1, 2]), torch.randn(3, 4))
    check_vmap(set_row, torch.randn(3, 4, 5), torch.tensor([0, -1, 2]), torch.randn(3, 5))


def test_index_float64_and_bdim_inside_group():
    # The batch dim of x sits between two adjacent indexed dims.
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)  # examples [4, 5, 6] along dim 1
    i, j = _i(4, 2), _i(5, 2)
    with no_fallback():
        check_vmap(lambda a: a[i, j], x, in_dims=1)
        check_vmap(lambda a, b: a[b, j], x, torch.stack([_i(4, 2) for _ in range(3)], 1), in_dims=(1, 1))
        check_vmap(lambda a: a[:, j], x.movedim(1, 3), in_dims=3)  # batch trailing, after the index


# --------------------------------------------------------------------------
# index_put / index_put_ / _index_put_impl_ / x[indices] = values
# --------------------------------------------------------------------------

INDEX_PUT = [
    # (name, indices(i, j) -> list, sample(unique) -> (x, i[, j], values)); `unique`
    # asks for indices that never write one position twice.
    ("slice_i", lambda i: [None, i], lambda u: (torch.randn(X3), (_unique if u else _i)(5, 2), torch.randn(4, 2, 6))),
    ("slice_i_bcast", lambda i: [None, i], lambda u: (torch.randn(X3), (_unique if u else _i)(5, 2), torch.randn(6))),
    ("slice_i_scalar", lambda i: [None, i], lambda u: (torch.randn(X3), (_unique if u else _i)(5, 2), torch.randn(()))),
    (
        "i_j",
        lambda i, j: [i, j],
        lambda u: (torch.randn(X3), (_unique if u else _i)(4, 2), _i(5, 2), torch.randn(2, 6)),
    ),
    (
        "slice_i_j",
        lambda i, j: [None, i, j],
        lambda u: (torch.randn(X3), (_unique if u else _i)(5, 2), _i(6, 2), torch.randn(4, 2)),
    ),
    (
        "i_slice_j",
        lambda i, j: [i, None, j],
        lambda u: (torch.randn(X3), (_unique if u else _i)(4, 2), _i(6, 2), torch.randn(2, 5)),
    ),
    (
        "i_slice_j_bcast",
        lambda i, j: [i, None, j],
        lambda u: (torch.randn(X3), (_unique if u else _i)(4, 2), _i(6, 2), torch.randn(5)),
    ),
    (
        "slice_i_slice_j",
        lambda i, j: [None, i, None, j],
        lambda u: (torch.randn(X4), (_unique if u else _i)(5, 2), _i(3, 2), torch.randn(2, 4, 6)),
    ),
    (
        "broadcast",
        lambda i, j: [None, i, j],
        lambda u: (
            torch.randn(X3),
            (_unique if u else _i)(5, 3, 1),
            (_unique if u else _i)(6, 2),
            torch.randn(4, 3, 2),
        ),
    ),
    ("zero_dim", lambda i: [None, i], lambda u: (torch.randn(X3), _i(5), torch.randn(4, 6))),
    ("mask", lambda: [None, MASK5()], lambda u: (torch.randn(X3), torch.randn(4, 3, 6))),
    ("mask_bcast", lambda: [MASK45()], lambda u: (torch.randn(X3), torch.randn(6))),
]


def _index_put_fn(op, make_indices, accumulate, inplace=False):
    n = make_indices.__code__.co_argcount

    def fn(x, *rest):
        indices, values = make_indices(*rest[:n]), rest[n]
        if inplace:
            x = x.clone()
        return op(x, indices, values, accumulate)

    return fn


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("name,make_indices,sample", INDEX_PUT, ids=[row[0] for row in INDEX_PUT])
def test_index_put(name, make_indices, sample, accumulate):
    with no_fallback():
        fn = _index_put_fn(aten.index_put.default, make_indices, accumulate)
        check_vmap_sampled(fn, lambda: sample(not accumulate))


@pytest.mark.parametrize("op", [aten.index_put_.default, aten._index_put_impl_.default], ids=str)
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("name,make_indices,sample", INDEX_PUT[::2], ids=[row[0] for row in INDEX_PUT[::2]])
def test_index_put_inplace(name, make_indices, sample, accumulate, op):
    with no_fallback():
        fn = _index_put_fn(op, make_indices, accumulate, inplace=True)
        check_vmap_self_batched(fn, lambda: sample(not accumulate))


def test_index_put_variants_and_setitem():
    x, v = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 2, dtype=torch.float64)
    i = torch.stack([_unique(5, 2) for _ in range(3)])

    def setitem(a, b, c):
        a = a.clone()
        a[:, b] = c
        return a

    def setitem_mask(a):
        a = a.clone()
        a[:, MASK5()] = 0.0
        return a

    with no_fallback():
        check_vmap(setitem, x, i, v)
        check_vmap(setitem, x, i[0], v, in_dims=(0, None, 0))
        check_vmap(setitem_mask, x)
        check_vmap(lambda a, b, c: aten._unsafe_index_put.default(a, [None, b], c, True), x, i, v)
        check_vmap(lambda a, b, c: aten._index_put_impl.default(a, [None, b], c, True, True), x, i, v)
        # index_put returns a batched result for an unbatched self.
        check_vmap(lambda a, b, c: aten.index_put.default(a, [None, b], c), x[0], i, v, in_dims=(None, 0, 0))


# --------------------------------------------------------------------------
# gather / scatter
# --------------------------------------------------------------------------

GATHER_SCATTER = [
    ("gather", lambda x, i: torch.gather(x, 1, i), lambda: (torch.randn(4, 5), _nonneg(5, 4, 3))),
    ("gather_neg_dim", lambda x, i: torch.gather(x, -2, i), lambda: (torch.randn(4, 5), _nonneg(4, 2, 5))),
    ("gather_smaller", lambda x, i: torch.gather(x, 0, i), lambda: (torch.randn(4, 5), _nonneg(4, 2, 3))),
    ("gather_0d", lambda x, i: torch.gather(x, 0, i), lambda: (torch.randn(()), torch.tensor(0))),
    ("gather_0d_index", lambda x, i: torch.gather(x, 0, i), lambda: (torch.randn(5), _nonneg(5))),
    (
        "gather_0d_self",
        lambda x, i: torch.gather(x, -1, i),
        lambda: (torch.randn(()), torch.zeros(3, dtype=torch.long)),
    ),
    (
        "gather_sparse_grad_kw",
        lambda x, i: torch.gather(x, 1, i, sparse_grad=False),
        lambda: (torch.randn(4, 5), _nonneg(5, 4, 2)),
    ),
    ("take_along_dim", lambda x, i: torch.take_along_dim(x, i, 1), lambda: (torch.randn(4, 5), _i(5, 4, 3))),
    ("take_along_dim_bcast", lambda x, i: torch.take_along_dim(x, i, 0), lambda: (torch.randn(4, 5), _i(4, 2, 1))),
    ("take_along_dim_flat", lambda x, i: torch.take_along_dim(x, i), lambda: (torch.randn(4, 5), _nonneg(20, 6))),
    (
        "scatter_src",
        lambda x, i, s: torch.scatter(x, 1, i, s),
        lambda: (torch.randn(4, 5), _unique_rows(4, 5, 3), torch.randn(4, 3)),
    ),
    (
        "scatter_src_bigger",
        lambda x, i, s: torch.scatter(x, 1, i, s),
        lambda: (torch.randn(4, 5), _unique_rows(3, 5, 2), torch.randn(4, 6)),
    ),
    ("scatter_value", lambda x, i: torch.scatter(x, -1, i, 2.5), lambda: (torch.randn(4, 5), _nonneg(5, 4, 3))),
    (
        "scatter_reduce_add",
        lambda x, i, s: torch.scatter(x, 1, i, s, reduce="add"),
        lambda: (torch.randn(4, 5), _nonneg(5, 4, 3), torch.randn(4, 3)),
    ),
    (
        "scatter_reduce_multiply",
        lambda x, i, s: torch.scatter(x, 0, i, s, reduce="multiply"),
        lambda: (torch.randn(4, 5), _nonneg(4, 3, 5), torch.randn(3, 5)),
    ),
    (
        "scatter_value_reduce",
        lambda x, i: torch.scatter(x, 1, i, 1.5, reduce="multiply"),
        lambda: (torch.randn(4, 5), _nonneg(5, 4, 3)),
    ),
    (
        "scatter_0d",
        lambda x, i, s: torch.scatter(x, 0, i, s),
        lambda: (torch.randn(()), torch.tensor(0), torch.randn(())),
    ),
    (
        "scatter_add",
        lambda x, i, s: torch.scatter_add(x, 1, i, s),
        lambda: (torch.randn(4, 5), _nonneg(5, 4, 3), torch.randn(4, 3)),
    ),
    (
        "scatter_add_0d_index",
        lambda x, i, s: torch.scatter_add(x, 0, i, s),
        lambda: (torch.randn(5), _nonneg(5), torch.randn(())),
    ),
    *[
        (
            f"scatter_reduce_{reduce}{'' if include_self else '_exclude_self'}",
            lambda x, i, s, reduce=reduce, include_self=include_self: torch.scatter_reduce(
                x, 0, i, s, reduce, include_self=include_self
            ),
            lambda: (torch.randn(4, 5), _nonneg(4, 6, 5), torch.randn(6, 5)),
        )
        for reduce in ("sum", "prod", "mean", "amax", "amin")
        for include_self in (True, False)
    ],
]


SCATTER_INPLACE = [
    (
        "scatter_src_",
        lambda x, i, s: x.clone().scatter_(1, i, s),
        lambda: (torch.randn(4, 5), _unique_rows(4, 5, 3), torch.randn(4, 3)),
    ),
    ("scatter_value_", lambda x, i: x.clone().scatter_(1, i, -2.0), lambda: (torch.randn(4, 5), _nonneg(5, 4, 3))),
    (
        "scatter_reduce_",
        lambda x, i, s: x.clone().scatter_(1, i, s, reduce="add"),
        lambda: (torch.randn(4, 5), _nonneg(5, 4, 3), torch.randn(4, 3)),
    ),
    (
        "scatter_add_",
        lambda x, i, s: x.clone().scatter_add_(0, i, s),
        lambda: (torch.randn(4, 5), _nonneg(4, 3, 5), torch.randn(3, 5)),
    ),
    (
        "scatter_add_0d_",
        lambda x, i, s: x.clone().scatter_add_(0, i, s),
        lambda: (torch.randn(()), torch.tensor(0), torch.randn(())),
    ),
    (
        "scatter_reduce_two_",
        lambda x, i, s: x.clone().scatter_reduce_(1, i, s, "amax", include_self=False),
        lambda: (torch.randn(4, 5), _nonneg(5, 4, 3), torch.randn(4, 3)),
    ),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_scatter_dtypes(dtype):
    x, s = torch.randn(3, 4, 5, dtype=dtype), torch.randn(3, 4, 3, dtype=dtype)
    i = torch.stack([_nonneg(5, 4, 3) for _ in range(3)])
    with no_fallback():
        check_vmap(lambda a, b: torch.gather(a, 1, b), x, i)
        check_vmap(lambda a, b, c: torch.scatter_reduce(a, 1, b, c, "mean"), x, i, s)
        check_vmap(lambda a, b, c: torch.scatter_add(a, -1, b, c), x, i[0], s, in_dims=(0, None, 0))


# --------------------------------------------------------------------------
# index_select / index_add / index_copy / index_fill / index_reduce
# --------------------------------------------------------------------------

DIM_INDEX = [
    ("index_select", lambda x, i: torch.index_select(x, 1, i), lambda: (torch.randn(4, 5), _nonneg(5, 3))),
    ("index_select_dim0", lambda x, i: torch.index_select(x, 0, i), lambda: (torch.randn(4, 5), _nonneg(4, 6))),
    ("index_select_neg_dim", lambda x, i: torch.index_select(x, -1, i), lambda: (torch.randn(2, 3, 5), _nonneg(5, 2))),
    ("index_select_0d_index", lambda x, i: torch.index_select(x, 1, i), lambda: (torch.randn(4, 5), _nonneg(5))),
    ("index_select_0d_self", lambda x, i: torch.index_select(x, 0, i), lambda: (torch.randn(()), torch.tensor(0))),
    (
        "index_select_0d_self_vector",
        lambda x, i: torch.index_select(x, -1, i),
        lambda: (torch.randn(()), torch.tensor([0])),
    ),
    (
        "index_add",
        lambda x, i, s: torch.index_add(x, 0, i, s),
        lambda: (torch.randn(4, 5), _nonneg(4, 3), torch.randn(3, 5)),
    ),
    (
        "index_add_alpha",
        lambda x, i, s: torch.index_add(x, -1, i, s, alpha=2.5),
        lambda: (torch.randn(4, 5), _nonneg(5, 6), torch.randn(4, 6)),
    ),
    (
        "index_add_0d_index",
        lambda x, i, s: torch.index_add(x, 1, i, s),
        lambda: (torch.randn(4, 5), _nonneg(5), torch.randn(4, 1)),
    ),
    (
        "index_add_0d_self",
        lambda x, i, s: torch.index_add(x, 0, i, s),
        lambda: (torch.randn(()), torch.tensor(0), torch.randn(())),
    ),
    (
        "index_copy",
        lambda x, i, s: torch.index_copy(x, 1, i, s),
        lambda: (torch.randn(4, 5), _unique(5, 3, negative=False), torch.randn(4, 3)),
    ),
    (
        "index_copy_dim0",
        lambda x, i, s: torch.index_copy(x, 0, i, s),
        lambda: (torch.randn(4, 5), _unique(4, 2, negative=False), torch.randn(2, 5)),
    ),
    (
        "index_copy_0d_self",
        lambda x, i, s: torch.index_copy(x, 0, i, s),
        lambda: (torch.randn(()), torch.tensor(0), torch.randn(())),
    ),
    ("index_fill", lambda x, i: torch.index_fill(x, 1, i, -1.5), lambda: (torch.randn(4, 5), _i(5, 3))),
    (
        "index_fill_tensor",
        lambda x, i, v: torch.index_fill(x, 0, i, v),
        lambda: (torch.randn(4, 5), _i(4, 2), torch.randn(())),
    ),
    (
        "index_fill_tensor_f64",
        lambda x, i, v: torch.index_fill(x, -1, i, v),
        lambda: (torch.randn(4, 5), _i(5, 2), torch.randn((), dtype=torch.float64)),
    ),
    (
        "index_fill_0d_index",
        lambda x, i, v: torch.index_fill(x, 1, i, v),
        lambda: (torch.randn(4, 5), _i(5), torch.randn(())),
    ),
    (
        "index_fill_0d_self",
        lambda x, i, v: torch.index_fill(x, 0, i, v),
        lambda: (torch.randn(()), torch.tensor(-1), torch.randn(())),
    ),
    ("index_fill_int", lambda x, i: torch.index_fill(x, 1, i, 7), lambda: (torch.randint(0, 9, (4, 5)), _i(5, 3))),
    *[
        (
            f"index_reduce_{reduce}{'' if include_self else '_exclude_self'}",
            lambda x, i, s, reduce=reduce, include_self=include_self: torch.index_reduce(
                x, 0, i, s, reduce, include_self=include_self
            ),
            lambda: (torch.randn(4, 5), _nonneg(4, 6), torch.randn(6, 5)),
        )
        for reduce in ("prod", "mean", "amax", "amin")
        for include_self in (True, False)
    ],
]


DIM_INDEX_INPLACE = [
    (
        "index_add_",
        lambda x, i, s: x.clone().index_add_(1, i, s, alpha=-1),
        lambda: (torch.randn(4, 5), _nonneg(5, 3), torch.randn(4, 3)),
    ),
    (
        "index_copy_",
        lambda x, i, s: x.clone().index_copy_(0, i, s),
        lambda: (torch.randn(4, 5), _unique(4, 2, negative=False), torch.randn(2, 5)),
    ),
    ("index_fill_", lambda x, i: x.clone().index_fill_(1, i, 3.0), lambda: (torch.randn(4, 5), _i(5, 2))),
    (
        "index_fill_tensor_",
        lambda x, i, v: x.clone().index_fill_(-1, i, v),
        lambda: (torch.randn(4, 5), _i(5, 2), torch.randn(())),
    ),
    (
        "index_fill_0d_self_",
        lambda x, i, v: x.clone().index_fill_(0, i, v),
        lambda: (torch.randn(()), torch.tensor(0), torch.randn(())),
    ),
    (
        "index_reduce_",
        lambda x, i, s: x.clone().index_reduce_(0, i, s, "amin", include_self=False),
        lambda: (torch.randn(4, 5), _nonneg(4, 3), torch.randn(3, 5)),
    ),
    (
        "index_add_0d_self_",
        lambda x, i, s: x.clone().index_add_(0, i, s),
        lambda: (torch.randn(()), torch.tensor(0), torch.randn(())),
    ),
]


def test_index_fill_float64_and_repeated_indices():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    i = torch.tensor([[1, 1, -4], [0, 3, -1], [2, 2, 2]])
    v = torch.randn(3, dtype=torch.float64)
    with no_fallback():
        check_vmap(lambda a, b, c: a.index_fill(0, b, c), x, i, v)
        check_vmap(lambda a, c: a.index_fill(1, torch.tensor([0, -1]), c), x, v)
        # unbatched self, batched fill value (torch.func gets this one wrong)
        check_vmap(lambda a, c: a.index_fill(1, torch.tensor([0, -1]), c), x[0], v, in_dims=(None, 0))


# --------------------------------------------------------------------------
# take / put / masked_scatter
# --------------------------------------------------------------------------

FLAT = [
    ("take", lambda x, i: torch.take(x, i), lambda: (torch.randn(4, 5), _i(20, 2, 3))),
    ("take_0d", lambda x, i: torch.take(x, i), lambda: (torch.randn(()), _i(1))),
    ("take_3d", lambda x, i: torch.take(x, i), lambda: (torch.randn(2, 3, 4), _i(24, 5))),
    ("put", lambda x, i, s: torch.put(x, i, s), lambda: (torch.randn(4, 5), _unique(20, 2, 3), torch.randn(6))),
    (
        "put_accumulate",
        lambda x, i, s: torch.put(x, i, s, accumulate=True),
        lambda: (torch.randn(4, 5), _i(20, 7), torch.randn(7)),
    ),
    (
        "put_shapes_differ",
        lambda x, i, s: torch.put(x, i, s, accumulate=True),
        lambda: (torch.randn(4, 5), _i(20, 2, 3), torch.randn(3, 2)),
    ),
    (
        "masked_scatter",
        lambda x, m, s: x.masked_scatter(m > 0, s),
        lambda: (torch.randn(4, 5), torch.randn(4, 5), torch.randn(20)),
    ),
    (
        "masked_scatter_bcast",
        lambda x, m, s: x.masked_scatter(m > 0, s),
        lambda: (torch.randn(5), torch.randn(4, 5), torch.randn(5, 6)),
    ),
    (
        "masked_scatter_bcast_self",
        lambda x, m, s: x.masked_scatter(m > 0, s),
        lambda: (torch.randn(4, 1), torch.randn(5), torch.randn(21)),
    ),
    (
        "masked_scatter_0d",
        lambda x, m, s: x.masked_scatter(m > 0, s),
        lambda: (torch.randn(()), torch.randn(()), torch.randn(2)),
    ),
    (
        "masked_scatter_backward",
        lambda g, m: aten.masked_scatter_backward(g, m > 0, [4, 6]),
        lambda: (torch.randn(4, 5), torch.randn(4, 5)),
    ),
    (
        "masked_scatter_backward_bcast",
        lambda g, m: aten.masked_scatter_backward(g, m > 0, [21]),
        lambda: (torch.randn(4, 5), torch.randn(5)),
    ),
]


FLAT_INPLACE = [
    ("put_", lambda x, i, s: x.clone().put_(i, s), lambda: (torch.randn(4, 5), _unique(20, 2, 3), torch.randn(6))),
    (
        "put_accumulate_",
        lambda x, i, s: x.clone().put_(i, s, accumulate=True),
        lambda: (torch.randn(4, 5), _i(20, 9), torch.randn(9)),
    ),
    (
        "masked_scatter_",
        lambda x, m, s: x.clone().masked_scatter_(m > 0, s),
        lambda: (torch.randn(4, 5), torch.randn(5), torch.randn(20)),
    ),
]


def test_flat_float64_and_bdims():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    with no_fallback():
        check_vmap(lambda a: torch.take(a, torch.tensor([[0, -1], [7, 3]])), x, in_dims=1)
        check_vmap(lambda a, s: a.masked_scatter(a > 0, s), x, torch.randn(3, 20, dtype=torch.float64), in_dims=(1, 0))


# --------------------------------------------------------------------------
# embedding
# --------------------------------------------------------------------------

EMBEDDING = [
    ("embedding", lambda w, i: F.embedding(i, w), lambda: (torch.randn(7, 5), _nonneg(7, 2, 3))),
    ("embedding_0d", lambda w, i: F.embedding(i, w), lambda: (torch.randn(7, 5), _nonneg(7))),
    ("embedding_int32", lambda w, i: F.embedding(i.int(), w), lambda: (torch.randn(7, 5), _nonneg(7, 4))),
    (
        "embedding_options",
        lambda w, i: F.embedding(i, w, padding_idx=-2, scale_grad_by_freq=True, sparse=True),
        lambda: (torch.randn(7, 5), _nonneg(7, 4)),
    ),
    ("embedding_f64", lambda w, i: F.embedding(i, w), lambda: (torch.randn(7, 1, dtype=torch.float64), _nonneg(7, 3))),
    (
        "dense_backward",
        lambda g, i: aten.embedding_dense_backward(g, i, 7, -1, False),
        lambda: (torch.randn(2, 3, 5), _nonneg(7, 2, 3)),
    ),
    (
        "dense_backward_padding_scale",
        lambda g, i: aten.embedding_dense_backward(g, i, 7, 2, True),
        lambda: (torch.randn(6, 5), _nonneg(7, 6)),
    ),
    # eager drops out-of-range indices (with scale_grad_by_freq it reads out of bounds)
    (
        "dense_backward_out_of_range",
        lambda g, i: aten.embedding_dense_backward(g, i, 4, -1, False),
        lambda: (torch.randn(6, 2, dtype=torch.float64), torch.randint(-3, 7, (6,))),
    ),
    (
        "dense_backward_0d",
        lambda g, i: aten.embedding_dense_backward(g, i, 4, 0, False),
        lambda: (torch.randn(3), _nonneg(4)),
    ),
]


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_embedding_max_norm(norm_type):
    # F.embedding renormalizes the rows it reads in place (embedding_renorm_),
    # so the weight must be batched.
    def fn(w, i):
        w = w.clone()
        return F.embedding(i, w, max_norm=1.0, norm_type=norm_type), w

    with no_fallback():
        check_vmap_self_batched(fn, lambda: (torch.randn(7, 5), _nonneg(7, 2, 3)))


# --------------------------------------------------------------------------
# searchsorted / bucketize / isin
# --------------------------------------------------------------------------

def SEQ():
    return torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5, -0.2])


def SORTER():
    return SEQ().argsort()

SEARCH = [
    ("searchsorted", lambda s, v: torch.searchsorted(s, v), lambda: (_sorted(6), torch.randn(2, 3))),
    (
        "searchsorted_right_ties",
        lambda s, v: torch.searchsorted(s, v, right=True),
        lambda: (_ties(6).sort().values, _ties(2, 3)),
    ),
    (
        "searchsorted_side_int32",
        lambda s, v: torch.searchsorted(s, v, side="right", out_int32=True),
        lambda: (_ties(6).sort().values, _ties(4)),
    ),
    ("searchsorted_nd", lambda s, v: torch.searchsorted(s, v), lambda: (_sorted(2, 6), torch.randn(2, 3))),
    (
        "searchsorted_nd_ties_right",
        lambda s, v: torch.searchsorted(s, v, right=True),
        lambda: (_ties(2, 3, 6).sort().values, _ties(2, 3, 1)),
    ),
    ("searchsorted_0d_value", lambda s, v: torch.searchsorted(s, v), lambda: (_sorted(6), torch.randn(()))),
    (
        "searchsorted_f64",
        lambda s, v: torch.searchsorted(s, v),
        lambda: (_sorted(6).double(), torch.randn(5, dtype=torch.float64)),
    ),
    (
        "searchsorted_sorter",
        lambda s, v: torch.searchsorted(s, v, sorter=SORTER()),
        lambda: (SEQ() + torch.randn(()), torch.randn(4)),
    ),
    ("searchsorted_scalar", lambda s: torch.searchsorted(s, 0.25), lambda: (_sorted(6),)),
    ("searchsorted_scalar_right", lambda s: torch.searchsorted(s, 2, right=True), lambda: (_ties(6).sort().values,)),
    ("bucketize", lambda v, b: torch.bucketize(v, b), lambda: (torch.randn(2, 3), _sorted(6))),
    (
        "bucketize_right_int32",
        lambda v, b: torch.bucketize(v, b, right=True, out_int32=True),
        lambda: (_ties(2, 3), _ties(6).sort().values),
    ),
    ("bucketize_0d", lambda v, b: torch.bucketize(v, b), lambda: (torch.randn(()), _sorted(6))),
    ("bucketize_scalar", lambda b: torch.bucketize(1, b, right=True), lambda: (_ties(6).sort().values,)),
    ("isin", lambda e, t: torch.isin(e, t), lambda: (torch.randint(0, 8, (2, 3)), torch.randint(0, 8, (5,)))),
    (
        "isin_invert_2d",
        lambda e, t: torch.isin(e, t, invert=True),
        lambda: (torch.randint(0, 8, (4,)), torch.randint(0, 8, (2, 3))),
    ),
    (
        "isin_assume_unique",
        lambda e, t: torch.isin(e, t, assume_unique=True),
        lambda: (torch.randperm(8)[:4], torch.randperm(8)[:3]),
    ),
    (
        "isin_float_nan",
        lambda e, t: torch.isin(e, t),
        lambda: (
            torch.tensor([float("nan"), 1.0, 2.0]) * torch.randint(0, 2, (3,)),
            torch.tensor([float("nan"), 0.0, 2.0]),
        ),
    ),
    ("isin_mixed_dtypes", lambda e, t: torch.isin(e, t), lambda: (torch.randint(0, 4, (5,)), _ties(3) / 2)),
    ("isin_0d", lambda e, t: torch.isin(e, t), lambda: (torch.randint(0, 4, ()), torch.randint(0, 4, (2,)))),
    (
        "isin_empty_test",
        lambda e, t: torch.isin(e, t),
        lambda: (torch.randint(0, 4, (3,)), torch.zeros(0, dtype=torch.long)),
    ),
    ("isin_tensor_scalar", lambda e: torch.isin(e, 3, invert=True), lambda: (torch.randint(0, 5, (2, 3)),)),
    ("isin_scalar_tensor", lambda t: torch.isin(3, t), lambda: (torch.randint(0, 5, (2, 3)),)),
    ("isin_scalar_tensor_invert", lambda t: torch.isin(3, t, invert=True), lambda: (torch.randint(0, 5, (4,)),)),
]


# --------------------------------------------------------------------------
# repeat_interleave
# --------------------------------------------------------------------------

REPEAT_INTERLEAVE = [
    ("int_dim", lambda x: x.repeat_interleave(2, dim=1)),
    ("int_neg_dim", lambda x: x.repeat_interleave(3, dim=-2)),
    ("int_flat", lambda x: x.repeat_interleave(2)),
    ("tensor", lambda x: x.repeat_interleave(torch.tensor([1, 0, 2, 1]), dim=0)),
    ("tensor_one_element", lambda x: x.repeat_interleave(torch.tensor([2]), dim=1)),
    ("tensor_output_size", lambda x: x.repeat_interleave(torch.tensor([3, 1, 0, 1, 1]), dim=1, output_size=6)),
]


@pytest.mark.parametrize("name,fn", REPEAT_INTERLEAVE, ids=[row[0] for row in REPEAT_INTERLEAVE])
def test_repeat_interleave(name, fn):
    with no_fallback():
        check_vmap_sampled(fn, lambda: (torch.randn(4, 5),))


# --------------------------------------------------------------------------
# Errors: the same exception type as eager on one example, and the dynamic
# shape errors of vmap.
# --------------------------------------------------------------------------


def _eager_error(fn, args, in_dims):
    """The exception type eager raises for the first failing example."""
    batch = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    for b in range(batch):
        try:
            fn(*[a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)])
        except Exception as error:  # noqa: BLE001 - any type; vmap must match it
            return type(error)
    raise AssertionError("eager raised for no example")


ERRORS = [
    # (name, fn, args (made in the test), in_dims)
    ("index_out_of_range", lambda x: x[:, torch.tensor([5])], lambda: (torch.randn(3, 4, 5),), (0,)),
    (
        "index_batched_out_of_range",
        lambda x, i: x[i],
        lambda: (torch.randn(3, 4), torch.tensor([[1], [4], [0]])),
        (0, 0),
    ),
    (
        "index_too_many",
        lambda x: aten.index.Tensor(x, [torch.tensor([0]), torch.tensor([0])]),
        lambda: (torch.randn(4, 3),),
        (1,),
    ),
    ("index_float", lambda x: aten.index.Tensor(x, [torch.tensor([0.0])]), lambda: (torch.randn(3, 4),), (0,)),
    ("index_mask_shape", lambda x: x[:, torch.tensor([True, False])], lambda: (torch.randn(3, 4, 5),), (0,)),
    (
        "index_bcast",
        lambda x, i: x[i, torch.tensor([0, 1, 2])],
        lambda: (torch.randn(3, 4, 4), torch.tensor([[0, 1]] * 3)),
        (0, 0),
    ),
    (
        "index_put_out_of_range",
        lambda x, v: aten.index_put.default(x, [torch.tensor([9])], v),
        lambda: (torch.randn(3, 4), torch.randn(3)),
        (0, 0),
    ),
    (
        "index_put_shape",
        lambda x, v: aten.index_put.default(x, [torch.tensor([0, 1])], v),
        lambda: (torch.randn(3, 4), torch.randn(3, 3)),
        (0, 0),
    ),
    (
        "gather_out_of_range",
        lambda x, i: torch.gather(x, 0, i),
        lambda: (torch.randn(3, 4), torch.tensor([[4], [0], [1]])),
        (0, 0),
    ),
    (
        "gather_rank",
        lambda x, i: torch.gather(x, 0, i),
        lambda: (torch.randn(3, 4, 2), torch.tensor([[0]] * 3)),
        (0, 0),
    ),
    (
        "scatter_negative",
        lambda x, i: torch.scatter(x, 0, i, 1.0),
        lambda: (torch.randn(3, 4), torch.tensor([[-1], [0], [1]])),
        (0, 0),
    ),
    (
        "index_select_negative",
        lambda x, i: x.index_select(0, i),
        lambda: (torch.randn(3, 4), torch.tensor([[-1], [0], [1]])),
        (0, 0),
    ),
    (
        "index_select_2d_index",
        lambda x, i: x.index_select(0, i),
        lambda: (torch.randn(3, 4), torch.zeros(3, 1, 1, dtype=torch.long)),
        (0, 0),
    ),
    ("index_select_scalar_self", lambda x: x.index_select(0, torch.tensor([0, 0])), lambda: (torch.randn(3),), (0,)),
    (
        "index_copy_negative",
        lambda x, i: x.index_copy(0, i, torch.ones(1, 5)),
        lambda: (torch.randn(3, 4, 5), torch.tensor([[-1], [0], [1]])),
        (0, 0),
    ),
    (
        "index_copy_source",
        lambda x, i: x.index_copy(0, i, torch.ones(2, 5)),
        lambda: (torch.randn(3, 4, 5), torch.tensor([[2], [0], [1]])),
        (0, 0),
    ),
    (
        "index_add_out_of_range",
        lambda x, i: x.index_add(0, i, torch.ones(1, 5)),
        lambda: (torch.randn(3, 4, 5), torch.tensor([[4], [0], [1]])),
        (0, 0),
    ),
    (
        "index_add_source",
        lambda x, i: x.index_add(0, i, torch.ones(1, 3)),
        lambda: (torch.randn(3, 4, 5), torch.tensor([[2], [0], [1]])),
        (0, 0),
    ),
    (
        "index_add_2d_index",
        lambda x, i: x.index_add(0, i, torch.ones(1, 5)),
        lambda: (torch.randn(3, 4, 5), torch.zeros(3, 1, 1, dtype=torch.long)),
        (0, 0),
    ),
    (
        "index_fill_out_of_range",
        lambda x, i: x.index_fill(1, i, 0.0),
        lambda: (torch.randn(3, 4, 5), torch.tensor([[5], [0], [1]])),
        (0, 0),
    ),
    (
        "index_fill_value_rank",
        lambda x, v: x.index_fill(1, torch.tensor([0]), v),
        lambda: (torch.randn(3, 4, 5), torch.randn(3, 1)),
        (0, 0),
    ),
    (
        "take_out_of_range",
        lambda x, i: torch.take(x, i),
        lambda: (torch.randn(3, 4), torch.tensor([[4], [0], [-5]])),
        (0, 0),
    ),
    ("put_numel", lambda x: torch.put(x, torch.tensor([0, 1]), torch.ones(3)), lambda: (torch.randn(3, 4),), (0,)),
    (
        "masked_scatter_short_source",
        lambda x, s: x.masked_scatter(x > -10, s),
        lambda: (torch.randn(3, 4), torch.randn(3, 3)),
        (0, 0),
    ),
    (
        "masked_scatter_dtype",
        lambda x, s: x.masked_scatter(x > 0, s),
        lambda: (torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)),
        (0, 0),
    ),
    (
        "embedding_negative",
        lambda w, i: F.embedding(i, w),
        lambda: (torch.randn(3, 5, 2), torch.tensor([[-1], [0], [1]])),
        (0, 0),
    ),
    (
        "embedding_out_of_range",
        lambda w, i: F.embedding(i, w),
        lambda: (torch.randn(3, 5, 2), torch.tensor([5])),
        (0, None),
    ),
    (
        "embedding_weight_rank",
        lambda w, i: torch.embedding(w, i),
        lambda: (torch.randn(3, 5), torch.tensor([1])),
        (0, None),
    ),
    (
        "bucketize_boundaries_rank",
        lambda v, b: torch.bucketize(v, b),
        lambda: (torch.randn(3), torch.randn(3, 2, 2)),
        (0, 0),
    ),
    (
        "isin_bool",
        lambda e, t: torch.isin(e, t),
        lambda: (torch.ones(3, 2, dtype=torch.bool), torch.ones(3, 2, dtype=torch.bool)),
        (0, 0),
    ),
]


# Rows whose bad index CUDA kernels check on the device: a device-side assert
# (asynchronous, and fatal to the process's CUDA context), not an exception.
DEVICE_ASSERTS = (
    "index_out_of_range", "index_batched_out_of_range", "index_put_out_of_range", "gather_out_of_range", "scatter_negative", "index_select_negative",
    "index_copy_negative", "index_add_out_of_range", "index_fill_out_of_range", "take_out_of_range",
    "masked_scatter_short_source", "embedding_negative", "embedding_out_of_range",
)
DEVICE_ASSERT = "CUDA checks this index on the device: a device-side assert, not an exception to match"
OTHER_ERROR_ON_CUDA = {"index_select_2d_index": "CUDA's index_select raises RuntimeError for a 2-d index, CPU's IndexError"}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name,fn,args,in_dims", ERRORS, ids=[row[0] for row in ERRORS])
def test_errors_match_eager(name, fn, args, in_dims):
    skip_cpu_reference_rows(name, {**dict.fromkeys(DEVICE_ASSERTS, DEVICE_ASSERT), **OTHER_ERROR_ON_CUDA})
    args = args()
    expected = _eager_error(fn, args, in_dims)
    with pytest.raises(expected):
        torchxform.vmap(fn, in_dims)(*args)


DYNAMIC = [
    ("index_batched_mask", lambda x: x[x > 0]),
    ("index_put_batched_mask_values_vary", lambda x: aten.index_put.default(x, [x[:, 0] > 0], torch.ones(2, 4))),
    (
        "index_put_batched_mask_and_index",
        lambda x: aten.index_put.default(x, [x[:, 0] > 0, torch.tensor([0])], torch.tensor(0.0)),
    ),
    ("repeat_interleave_batched_repeats", lambda x: torch.arange(4.0).repeat_interleave((x > 0).long().sum(0))),
    (
        "repeat_interleave_batched_repeats_output_size",
        lambda x: torch.arange(4.0).repeat_interleave((x > 0).long().sum(0), output_size=3),
    ),
]


@pytest.mark.parametrize("name,fn", DYNAMIC, ids=[row[0] for row in DYNAMIC])
def test_dynamic_shape_errors(name, fn):
    with pytest.raises(RuntimeError, match="dynamic shape"):
        torchxform.vmap(fn)(torch.randn(3, 2, 4))


# x[mask] = values with a batched mask: static (a `where`) when values do not
# vary along the selected elements.
BATCHED_MASK_PUT = [
    # (name, fn(x, m, v), sample)
    (
        "scalar",
        lambda x, m, v: aten.index_put.default(x, [m > 0], v),
        lambda: (torch.randn(4, 5), torch.randn(4, 5), torch.randn(())),
    ),
    (
        "row_mask_bcast",
        lambda x, m, v: aten.index_put.default(x, [m > 0], v),
        lambda: (torch.randn(4, 5), torch.randn(4), torch.randn(5)),
    ),
    (
        "row_mask_one",
        lambda x, m, v: aten.index_put.default(x, [m > 0], v),
        lambda: (torch.randn(4, 5), torch.randn(4), torch.randn(1, 5)),
    ),
    (
        "after_slice",
        lambda x, m, v: aten.index_put.default(x, [None, m > 0], v, True),
        lambda: (torch.randn(3, 4, 5), torch.randn(4), torch.randn(3, 1, 5)),
    ),
    (
        "after_slice_2d",
        lambda x, m, v: aten.index_put.default(x, [None, m > 0], v),
        lambda: (torch.randn(3, 4, 5), torch.randn(4, 5), torch.randn(3, 1)),
    ),
]


def _setitem_mask(x, v):
    x = x.clone()
    x[x > 0] = v
    return x


def test_setitem_batched_mask():
    with no_fallback():
        check_vmap_self_batched(_setitem_mask, lambda: (torch.randn(4, 5), torch.randn(())))
        check_vmap_self_batched(
            lambda x: x.clone().masked_fill_(x > 0, 0.0).index_put_([x < -1], torch.tensor(-1.0), True),
            lambda: (torch.randn(4, 5),),
        )


def test_setitem_mask_batched_by_outer_vmap_only():
    # Unbatched at the inner level, the mask is still one per outer example.
    x, m = torch.randn(2, 3, 5), torch.randn(2, 5)
    inner = torchxform.vmap(lambda a, b: aten.index_put.default(a, [b > 0], torch.tensor(0.0)), in_dims=(0, None))
    expected = torch.stack([torch.stack([a.masked_fill(m[o] > 0, 0.0) for a in x[o]]) for o in range(2)])
    with no_fallback():
        assert_close(torchxform.vmap(inner)(x, m), expected)


def test_inplace_into_unbatched_self_raises():
    x, i, v = torch.randn(4, 5), torch.randint(0, 5, (3, 2)), torch.randn(3, 4, 2)
    with pytest.raises(RuntimeError, match="in-place"):
        torchxform.vmap(lambda a, b, c: aten.index_put_.default(a, [None, b], c), in_dims=(None, 0, 0))(x, i, v)
    with pytest.raises(RuntimeError, match="in-place"):
        torchxform.vmap(lambda a, c: a.index_fill_(1, torch.tensor([0]), c), in_dims=(None, 0))(x, torch.randn(3))


# --------------------------------------------------------------------------
# select_scatter / slice_scatter / diagonal_scatter
# --------------------------------------------------------------------------

VIEW_SCATTER = [
    ("select_scatter", lambda x, s: torch.select_scatter(x, s, 1, -2), lambda: (torch.randn(4, 5), torch.randn(4))),
    ("select_scatter_1d", lambda x, s: torch.select_scatter(x, s, 0, 3), lambda: (torch.randn(5), torch.randn(()))),
    (
        "slice_scatter",
        lambda x, s: torch.slice_scatter(x, s, 1, 1, 5, 2),
        lambda: (torch.randn(4, 5), torch.randn(4, 2)),
    ),
    ("slice_scatter_defaults", lambda x, s: torch.slice_scatter(x, s), lambda: (torch.randn(4, 5), torch.randn(4, 5))),
    (
        "slice_scatter_neg_dim",
        lambda x, s: torch.slice_scatter(x, s, dim=-1, start=-3),
        lambda: (torch.randn(2, 4, 5), torch.randn(2, 4, 3)),
    ),
    ("diagonal_scatter", lambda x, s: torch.diagonal_scatter(x, s), lambda: (torch.randn(4, 5), torch.randn(4))),
    (
        "diagonal_scatter_offset_dims",
        lambda x, s: torch.diagonal_scatter(x, s, -1, 2, 0),
        lambda: (torch.randn(4, 3, 5), torch.randn(3, 4)),
    ),
    ("select_backward", lambda g: aten.select_backward(g, [4, 5], 0, -1), lambda: (torch.randn(5),)),
    ("slice_backward", lambda g: aten.slice_backward(g, [4, 5], 1, 0, 4, 2), lambda: (torch.randn(4, 2),)),
    ("diagonal_backward", lambda g: aten.diagonal_backward(g, [4, 5], 1, 0, 1), lambda: (torch.randn(4),)),
]



# --------------------------------------------------------------------------
# The tables: every batched/unbatched combination of the tensor arguments
# (dims 0, -1, None) and vmap(vmap(fn)); in-place ops with self batched.
# --------------------------------------------------------------------------

SAMPLED = INDEX + GATHER_SCATTER + DIM_INDEX + FLAT + EMBEDDING + SEARCH + VIEW_SCATTER + BATCHED_MASK_PUT
INPLACE = SCATTER_INPLACE + DIM_INDEX_INPLACE + FLAT_INPLACE


@pytest.mark.filterwarnings("ignore:indexing with dtype torch.uint8")
@pytest.mark.filterwarnings("ignore:The reduce argument of torch.scatter")
@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta")
# The loop reference passes non-contiguous examples, which searchsorted warns about.
@pytest.mark.filterwarnings("ignore:torch.searchsorted.*non-contiguous")
@pytest.mark.parametrize("name,fn,sample", SAMPLED, ids=[row[0] for row in SAMPLED])
def test_sampled(name, fn, sample):
    with no_fallback():
        check_vmap_sampled(fn, sample)


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta")
@pytest.mark.parametrize("name,fn,sample", INPLACE, ids=[row[0] for row in INPLACE])
def test_inplace(name, fn, sample):
    with no_fallback():
        check_vmap_self_batched(fn, sample)


# --------------------------------------------------------------------------
# Outputs stay differentiable by torch.autograd through the rules.
# --------------------------------------------------------------------------

AUTOGRAD = [
    # (name, fn, args (made in the test; float ones get requires_grad), in_dims)
    ("index_batched_index", lambda x, i: x[:, i] * 2, lambda: (torch.randn(3, 4, 5), _i(5, 3, 2)), (0, 0)),
    (
        "index_put",
        lambda x, i, v: aten.index_put.default(x, [None, i], v, True),
        lambda: (torch.randn(3, 4, 5), _i(5, 3, 2), torch.randn(3, 4, 2)),
        (0, 0, 0),
    ),
    ("gather", lambda x, i: torch.gather(x, 1, i), lambda: (torch.randn(3, 4, 5), _nonneg(5, 3, 4, 2)), (0, 0)),
    (
        "scatter_add",
        lambda x, i, s: torch.scatter_add(x, 1, i, s),
        lambda: (torch.randn(3, 4, 5), _nonneg(5, 4, 2), torch.randn(3, 4, 2)),
        (0, None, 0),
    ),
    (
        "index_add_batched_index",
        lambda x, i, s: x.index_add(1, i, s),
        lambda: (torch.randn(3, 4, 5), _nonneg(5, 3, 2), torch.randn(4, 2)),
        (0, 0, None),
    ),
    (
        "masked_scatter",
        lambda x, m, s: x.masked_scatter(m > 0, s),
        lambda: (torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)),
        (0, 0, 0),
    ),
    ("embedding_both", lambda w, i: F.embedding(i, w), lambda: (torch.randn(3, 7, 2), _nonneg(7, 3, 4)), (0, 0)),
    ("take", lambda x, i: torch.take(x, i), lambda: (torch.randn(3, 4, 5), _i(20, 3, 6)), (0, 0)),
]


@pytest.mark.parametrize("name,fn,args,in_dims", AUTOGRAD, ids=[row[0] for row in AUTOGRAD])
def test_autograd_through_rules(name, fn, args, in_dims):
    check_autograd_through_vmap(fn, args(), in_dims, double=False, msg=name)


# -- data-dependent sizes that agree (NOTE [Data-dependent sizes that agree]) ----


def _stacked(fn, *batches):
    return torch.stack([fn(*example) for example in zip(*batches)])


def test_masked_select_batched_mask_with_equal_counts():
    x = torch.randn(3, 4, 5)
    mask = torch.argsort(torch.rand(3, 4, 5).flatten(1), 1).view(3, 4, 5) < 7  # 7 per example
    with no_fallback():
        out = torchxform.vmap(torch.masked_select)(x, mask)
        nested = torchxform.vmap(torchxform.vmap(torch.masked_select))(x.unsqueeze(0).expand(2, 3, 4, 5), mask.expand(2, 3, 4, 5))
    assert_close(out, _stacked(torch.masked_select, x, mask))
    assert_close(nested, out.expand(2, 3, 7))
    with pytest.raises(RuntimeError, match="dynamic shape"):
        torchxform.vmap(torch.masked_select)(x, torch.rand(3, 4, 5) > torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1))


def test_nonzero_and_bincount_when_sizes_agree():
    x = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 4.0]])
    with no_fallback():
        assert_close(torchxform.vmap(torch.nonzero)(x), _stacked(torch.nonzero, x))
        ints = torch.tensor([[0, 3, 3, 1], [2, 3, 0, 0]])
        weights = torch.randn(2, 4)
        assert_close(torchxform.vmap(torch.bincount)(ints), _stacked(torch.bincount, ints))
        assert_close(torchxform.vmap(lambda i, w: torch.bincount(i, w, minlength=6))(ints, weights),
                     _stacked(lambda i, w: torch.bincount(i, w, minlength=6), ints, weights))
    with pytest.raises(RuntimeError, match="dynamic shape"):
        torchxform.vmap(torch.nonzero)(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(RuntimeError, match="dynamic shape"):
        torchxform.vmap(torch.bincount)(torch.tensor([[0, 1], [0, 4]]))


@pytest.mark.parametrize("size", [0, 2, 5, 9])
def test_nonzero_static(size):
    x = torch.randn(3, 2, 3) * (torch.rand(3, 2, 3) > 0.5)
    fn = lambda t: torch.nonzero_static(t, size=size, fill_value=-7)  # noqa: E731
    with no_fallback():
        for dim in (0, 1, 2):
            assert_close(torchxform.vmap(fn, in_dims=dim)(x), _stacked(fn, x.movedim(dim, 0)))
