"""Derivatives of indexing, gathering and scattering against torch.autograd:
vjp, vjp of vjp and vmap over vjp (tests/autograd_harness.py), in-place
forms under grad, and vmap(grad) per-example gradients against a loop."""

import pytest
import torch
import torch.nn.functional as F

import torchxform
from tests.autograd_harness import check_derivatives, check_vjp, reference_vjp
from tests.harness import assert_close, cpu_reference, no_fallback
from torchxform._core.registry import vjp_coverage

D = torch.float64
aten = torch.ops.aten


def randn(*shape):
    return torch.randn(shape, dtype=D)


def ties(*shape):
    """Small integers as floats: equal values (ties) are common."""
    return torch.randint(0, 3, shape).to(D)


def with_zeros(*shape):
    """Values with about a third of them exactly zero."""
    x = randn(*shape)
    return x * (torch.rand(shape) > 0.35)


def idx(*values):
    return torch.tensor(values)


def distinct(n, size):
    """n distinct indices below size (writes without accumulation must not
    repeat a position: which write wins is unspecified)."""
    return torch.randperm(size)[:n]


def MASK():
    """Made when a test runs, on its default device (as are the constants below)."""
    return torch.tensor([True, False, True, True, False])

# (name, fn, sampler): the sampler draws every argument (integer and boolean
# tensors are constants; floating ones are differentiated).
READS = [
    ("index_repeated", lambda x, i: x[i], lambda: (randn(4, 3), idx(0, 2, 2, -1))),
    ("index_adjacent", lambda x, i, j: x[:, i, j], lambda: (randn(2, 4, 5, 3), idx(0, 3, 3), idx(1, 4, 1))),
    ("index_separated", lambda x, i, j: x[i, :, j], lambda: (randn(4, 2, 5), idx(0, 3, 0), idx(4, 4, 1))),
    ("index_broadcast", lambda x, i, j: x[i[:, None], j], lambda: (randn(4, 5), idx(1, 1, 3), idx(0, 4))),
    ("index_mask", lambda x, m: x[m], lambda: (randn(5, 3), MASK())),
    ("index_mask_inner", lambda x, m: x[:, m], lambda: (randn(2, 5, 2), MASK())),
    ("index_mask_2d", lambda x, m: x[m], lambda: (randn(3, 4), torch.rand(3, 4) > 0.5)),
    ("index_noncontiguous", lambda x, i: x.t()[i, 1:], lambda: (randn(3, 4), idx(3, 0, 3))),
    ("index_empty", lambda x, i: x[:, i], lambda: (randn(3, 4), torch.zeros(0, dtype=torch.long))),
    ("unsafe_index", lambda x, i: aten._unsafe_index.Tensor(x, [None, i]), lambda: (randn(3, 4), idx(3, 0, 3))),
    ("index_select", lambda x, i: x.index_select(0, i), lambda: (randn(4, 3), idx(1, 1, 3, 0))),
    ("index_select_last", lambda x, i: x.index_select(-1, i), lambda: (randn(2, 3, 4), idx(2, 0, 2))),
    ("index_select_0dim", lambda x, i: x.index_select(0, i), lambda: (randn(), idx(0))),
    ("gather", lambda x, i: x.gather(1, i), lambda: (randn(3, 4), torch.randint(0, 4, (3, 6)))),
    ("gather_smaller", lambda x, i: x.gather(0, i), lambda: (randn(4, 5), torch.randint(0, 4, (2, 3)))),
    ("gather_negative_dim", lambda x, i: x.gather(-2, i), lambda: (randn(2, 3, 4), torch.randint(0, 3, (2, 2, 4)))),
    ("gather_empty", lambda x, i: x.gather(1, i), lambda: (randn(3, 4), torch.zeros(3, 0, dtype=torch.long))),
    ("gather_0dim", lambda x, i: x.gather(0, i), lambda: (randn(), idx(0).reshape(()))),
    ("take", lambda x, i: x.take(i), lambda: (randn(3, 4), idx([0, -1], [5, 5]))),
    ("take_along_dim", lambda x, i: torch.take_along_dim(x, i, 1), lambda: (randn(3, 4), torch.randint(0, 4, (1, 5)))),
    ("take_along_dim_flat", lambda x, i: torch.take_along_dim(x, i), lambda: (randn(3, 4), idx(11, 0, 11))),
    ("masked_select", lambda x, m: x.masked_select(m), lambda: (randn(3, 5), torch.rand(3, 5) > 0.5)),
    ("masked_select_bcast_mask", lambda x, m: x.masked_select(m), lambda: (randn(2, 5), MASK())),
    ("masked_select_bcast_self", lambda x, m: x.masked_select(m), lambda: (randn(5), MASK().expand(3, 5).clone())),
    ("embedding", lambda w, i: F.embedding(i, w), lambda: (randn(6, 3), idx([0, 5, 5], [2, 0, 1]))),
    ("embedding_padding", lambda w, i: F.embedding(i, w, padding_idx=2), lambda: (randn(6, 3), idx(2, 0, 2, 4, 0))),
    ("embedding_padding_negative", lambda w, i: F.embedding(i, w, padding_idx=-1), lambda: (randn(4, 2), idx(3, 1, 3))),
]

def _PUT():
    return idx(0, 3, 1)

WRITES = [
    ("index_put", lambda x, i, v: x.index_put((i,), v), lambda: (randn(5, 3), distinct(2, 5), randn(2, 3))),
    (
        "index_put_bcast_values",
        lambda x, i, v: aten.index_put(x, [None, i], v),
        lambda: (randn(3, 4), distinct(2, 4), randn(2)),
    ),
    (
        "index_put_accumulate",
        lambda x, i, v: x.index_put((i,), v, accumulate=True),
        lambda: (randn(4, 3), idx(1, 1, 0), randn(3, 3)),
    ),
    ("index_put_mask", lambda x, m, v: x.index_put((m,), v), lambda: (randn(5, 2), MASK(), randn(1, 2))),
    ("index_put_scalar_value", lambda x, i, v: x.index_put((i, i), v), lambda: (randn(4, 4), distinct(3, 4), randn())),
    (
        "unsafe_index_put",
        lambda x, i, v: aten._unsafe_index_put(x, [i], v, True),
        lambda: (randn(4, 2), idx(0, 0), randn(2, 2)),
    ),
    (
        "index_put_impl",
        lambda x, i, v: aten._index_put_impl_(x.clone(), [i], v),
        lambda: (randn(4, 2), distinct(2, 4), randn(2, 2)),
    ),
    ("put", lambda x, s: x.put(_PUT(), s), lambda: (randn(2, 3), randn(3))),
    (
        "put_accumulate",
        lambda x, s: x.put(idx([0, -1], [0, 2]), s, accumulate=True),
        lambda: (randn(2, 3), randn(2, 2)),
    ),
    ("masked_scatter", lambda x, m, s: x.masked_scatter(m, s), lambda: (randn(2, 5), MASK(), randn(8))),
    (
        "masked_scatter_bcast_self",
        lambda x, m, s: x.masked_scatter(m, s),
        lambda: (randn(5), torch.rand(2, 5) > 0.5, randn(3, 4)),
    ),
    (
        "scatter",
        lambda x, i, s: x.scatter(1, i, s),
        lambda: (randn(3, 5), torch.randperm(5)[:3].expand(3, 3).clone(), randn(3, 3)),
    ),
    ("scatter_value", lambda x, i: x.scatter(0, i, 1.5), lambda: (randn(4, 3), torch.randint(0, 4, (2, 3)))),
    (
        "scatter_add",
        lambda x, i, s: x.scatter_add(0, i, s),
        lambda: (randn(3, 4), torch.randint(0, 3, (5, 4)), randn(5, 4)),
    ),
    (
        "scatter_add_last",
        lambda x, i, s: x.scatter_add(-1, i, s),
        lambda: (randn(2, 3), torch.randint(0, 3, (2, 4)), randn(2, 4)),
    ),
    ("index_add", lambda x, i, s: x.index_add(1, i, s), lambda: (randn(2, 4), idx(3, 0, 3), randn(2, 3))),
    (
        "index_add_alpha",
        lambda x, i, s: x.index_add(0, i, s, alpha=-2.5),
        lambda: (randn(3, 2), idx(2, 2), randn(2, 2)),
    ),
    (
        "index_add_empty",
        lambda x, i, s: x.index_add(0, i, s),
        lambda: (randn(3, 2), torch.zeros(0, dtype=torch.long), randn(0, 2)),
    ),
    ("index_add_0dim", lambda x, i, s: x.index_add(0, i, s), lambda: (randn(), idx(0), randn())),
    ("index_copy", lambda x, i, s: x.index_copy(0, i, s), lambda: (randn(4, 3), distinct(2, 4), randn(2, 3))),
    ("index_copy_last", lambda x, i, s: x.index_copy(-1, i, s), lambda: (randn(2, 5), distinct(3, 5), randn(2, 3))),
    ("index_fill", lambda x, i: x.index_fill(1, i, -1.0), lambda: (randn(3, 4), idx(0, 2, 2))),
    ("index_fill_tensor", lambda x, i, v: x.index_fill(0, i, v), lambda: (randn(4, 3), idx(3, 1, 3), randn())),
    ("select_scatter", lambda x, s: x.select_scatter(s, 1, -1), lambda: (randn(3, 4), randn(3))),
    ("slice_scatter", lambda x, s: x.slice_scatter(s, 0, 1, None, 2), lambda: (randn(5, 2), randn(2, 2))),
    ("diagonal_scatter", lambda x, s: x.diagonal_scatter(s, 1, 0, 1), lambda: (randn(3, 4), randn(3))),
]


def _reduce_fn(op_name, reduce, include_self):
    if op_name == "scatter_reduce":
        return lambda x, i, s: x.scatter_reduce(1, i, s, reduce, include_self=include_self)
    return lambda x, i, s: x.index_reduce(0, i, s, reduce, include_self=include_self)


def _zero_first(x, dim):
    """``x`` with its first slice along ``dim`` zeroed (one zero source per
    slot at most: torch.autograd's double backward of prod raises beyond)."""
    x = x.clone()
    x.select(dim, 0).zero_()
    return x


# kind -> sampler, per op; `ties` draws equal values (nonzero ones for prod,
# whose zeros are the `zeros` rows), `zeros` exact zeros in self and source.
_SAMPLES = {
    "scatter_reduce": {
        "ties": lambda: (ties(3, 4) + 1, torch.randint(0, 4, (3, 5)), ties(3, 5) + 1),
        "zeros": lambda: (with_zeros(3, 4), torch.randint(0, 4, (3, 6)), _zero_first(randn(3, 6), 1)),
    },
    "index_reduce": {
        "ties": lambda: (ties(4, 3) + 1, idx(1, 3, 1, 1), ties(4, 3) + 1),
        "zeros": lambda: (with_zeros(4, 3), idx(0, 2, 0, 0), _zero_first(randn(4, 3), 0)),
    },
}
REDUCES = [
    (
        f"{op_name}_{reduce}_{'self' if include_self else 'noself'}_{kind}",
        _reduce_fn(op_name, reduce, include_self),
        make,
    )
    for op_name, reduces in [
        ("scatter_reduce", ("sum", "mean", "amax", "amin", "prod")),
        ("index_reduce", ("mean", "amax", "amin", "prod")),
    ]
    for reduce in reduces
    for include_self in (True, False)
    for kind, make in _SAMPLES[op_name].items()
]


def _assign(x, i, y):
    x = x.clone()
    x[i] = y
    return x


def _assign_mask(x, m):
    x = x * 1
    x[m] = 0.0
    return x


def _add_at(x, i, y):
    x = x.clone()
    x[:, i] += y
    return x


def _chain_inplace(x, i, s):
    x = x.clone()
    x.index_add_(0, i, s, alpha=2)
    x.index_copy_(0, i[:1], s[:1] * 3)
    x.index_fill_(1, idx(1), 0.5)
    x.scatter_add_(0, idx([3, 0, 1], [0, 3, 2]), s)
    x.scatter_reduce_(0, idx([1, 0, 1], [2, 2, 3]), s, "amax")
    x = x * 1  # scatter_reduce_ saved its result: writing into it would fail backward
    return x.masked_fill_(x > 1, -1.0)


def _scatter_inplace(x, s):
    x = x.clone()
    x.scatter_(1, idx([2, 0, 1]), s)
    x.index_reduce_(0, idx(1, 1), s.expand(2, 3), "prod", include_self=False)
    x = x * 1
    return x.put_(idx(0, 4, 4), s.reshape(-1), accumulate=True)


def _masked_scatter_inplace(x, s):
    x = x.clone()
    x[1:].masked_scatter_(MASK()[:3], s)  # into a view: written back to x
    return x


def _index_writes_into_views(x, y):
    x = x.clone()
    x[0][idx(2, 0)] = y
    x[:, 1].index_add_(0, idx(1, 1), y)
    return x


def _view_writes(x, y):
    # Writes into views under grad record select/slice/diagonal scatters;
    # their VJPs take part in the second order.
    x = x * 1
    x[1] = y
    x[:, 0] *= 2
    x.diagonal().mul_(y)
    return x


def _CONSTANT():
    return torch.arange(10, dtype=D).reshape(5, 2)

INPLACE = [
    # A constant made inside the function (a captured one may not be written
    # into under grad, as in torch.func).
    (
        "setitem_into_constant",
        lambda y, i: _assign(y.new_zeros(5, 2) + _CONSTANT(), i, y),
        lambda: (randn(2, 2), distinct(2, 5)),
    ),
    ("setitem", _assign, lambda: (randn(5, 2), distinct(2, 5), randn(2, 2))),
    ("setitem_mask", _assign_mask, lambda: (randn(5, 3), MASK())),
    ("setitem_add", _add_at, lambda: (randn(2, 4), idx(3, 1, 0), randn(2, 3))),  # distinct: see distinct()
    (
        "index_put_",
        lambda x, i, v: x.clone().index_put_((i,), v, accumulate=True),
        lambda: (randn(3), idx(0, 0, 2), randn(3)),
    ),
    ("chain", _chain_inplace, lambda: (randn(4, 3), idx(3, 0), randn(2, 3))),
    ("scatter_index_reduce_put", _scatter_inplace, lambda: (randn(2, 3), randn(1, 3))),
    ("masked_scatter_", _masked_scatter_inplace, lambda: (randn(4, 3), randn(6))),
    ("masked_fill_", lambda x, m: x.clone().masked_fill_(m, 2.0), lambda: (randn(2, 5), MASK())),
    ("index_writes_into_views", _index_writes_into_views, lambda: (randn(2, 3), randn(2))),
    ("view_writes", _view_writes, lambda: (randn(4, 4), randn(4))),
]


TABLE = [
    (f"{group}-{name}", fn, sample)
    for group, rows in [("read", READS), ("write", WRITES), ("reduce", REDUCES), ("inplace", INPLACE)]
    for name, fn, sample in rows
]


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta")
@pytest.mark.parametrize("name,fn,sample", TABLE, ids=[r[0] for r in TABLE])
def test_derivatives(name, fn, sample):
    check_derivatives(fn, sample, msg=name)


FAMILY = {
    "rule": [
        aten.index.Tensor,
        aten._unsafe_index.Tensor,
        aten.index_put.default,
        aten.index_put_.default,
        aten._index_put_impl_.default,
        aten._unsafe_index_put.default,
        aten.index_select.default,
        aten.gather.default,
        aten.scatter.src,
        aten.scatter.value,
        aten.scatter_.src,
        aten.scatter_add.default,
        aten.scatter_add_.default,
        aten.scatter_reduce.two,
        aten.scatter_reduce_.two,
        aten.index_add.default,
        aten.index_add_.default,
        aten.index_copy.default,
        aten.index_copy_.default,
        aten.index_fill.int_Scalar,
        aten.index_fill.int_Tensor,
        aten.index_fill_.int_Tensor,
        aten.index_reduce.default,
        aten.index_reduce_.default,
        aten.take.default,
        aten.put.default,
        aten.put_.default,
        aten.masked_scatter.default,
        aten.masked_scatter_.default,
        aten.masked_scatter_backward.default,
        aten.masked_select.default,
        aten.embedding.default,
        aten.embedding_dense_backward.default,
        aten.select_scatter.default,
        aten.slice_scatter.default,
        aten.diagonal_scatter.default,
    ],
    "nondifferentiable": [
        aten.searchsorted.Tensor,
        aten.searchsorted.Scalar,
        aten.bucketize.Tensor,
        aten.bucketize.Scalar,
        aten.isin.Tensor_Tensor,
        aten.isin.Tensor_Scalar,
        aten.isin.Scalar_Tensor,
        aten.nonzero.default,
        aten.argwhere.default,
    ],
    # No derivative in derivatives.yaml: grad raises, as torch.autograd does.
    "missing": [aten.scatter.reduce, aten.scatter.value_reduce],
}


@pytest.mark.parametrize("kind", FAMILY)
def test_coverage(kind):
    assert {str(op): vjp_coverage(op) for op in FAMILY[kind]} == {str(op): kind for op in FAMILY[kind]}


def test_saved_result_overwritten_raises():
    # prod saves its result; writing into it afterwards breaks backward, as in
    # torch.autograd.
    def fn(x, s):
        x = x.clone()
        x.scatter_reduce_(0, idx(0, 1), s, "prod")
        return x.mul_(2)

    x, s = randn(3), randn(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        reference_vjp(fn, (x, s), torch.ones(3))
    _, pullback = torchxform.vjp(fn, x, s)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        pullback(torch.ones(3))


# -- where torch.autograd has no exact answer: an equivalent function's --------


def _ours_second_order(fn, primals, cotangent, second):
    """vjp of (primals, cotangent) -> vjp(fn)(cotangent), applied to ``second``."""

    def first(*args):
        *diff, ct = args
        return torchxform.vjp(fn, *diff)[1](ct)

    return torchxform.vjp(first, *primals, cotangent)[1](second)


def _reference_second_order(fn, primals, cotangent, second):
    leaves = [p.clone().requires_grad_() for p in primals + [cotangent]]
    grads = torch.autograd.grad(fn(*leaves[:-1]), leaves[:-1], leaves[-1], create_graph=True)
    used = [(g, s) for g, s in zip(grads, second) if g.requires_grad]
    out = torch.autograd.grad([g for g, _ in used], leaves, [s for _, s in used], allow_unused=True)
    return tuple(torch.zeros_like(leaf) if o is None else o for o, leaf in zip(out, leaves))


def _check_against(fn, reference, primals):
    """``fn`` under torchxform against ``reference`` (the same function
    written so that torch.autograd gets it right) under torch.autograd:
    output, vjp and vjp of vjp."""
    with torch.no_grad():
        out = fn(*primals)
    cotangent = torch.randn_like(out)
    second = tuple(torch.randn_like(p) for p in primals)
    with no_fallback():
        actual_out, pullback = torchxform.vjp(fn, *primals)
        expected_out, expected, _ = reference_vjp(reference, tuple(primals), cotangent)
        assert_close(actual_out, expected_out.detach(), msg="output")
        assert_close(pullback(cotangent), tuple(e.detach() for e in expected), msg="vjp")
        actual = _ours_second_order(fn, list(primals), cotangent, second)
    assert_close(actual, _reference_second_order(reference, list(primals), cotangent, second), msg="vjp of vjp")


def test_embedding_scale_grad_by_freq():
    # torch.autograd's double backward of embedding drops the 1/count factor
    # that scale_grad_by_freq puts in the weight gradient; the reference gets
    # the same gradient from w[i] * s + (w[i] * (1 - s)).detach().
    indices = idx([0, 3, 3], [3, 1, 3])
    scale = 1 / torch.bincount(indices.reshape(-1), minlength=5)[indices].to(D).unsqueeze(-1)

    def reference(w):
        rows = w[indices]
        return rows * scale + (rows * (1 - scale)).detach()

    _check_against(lambda w: F.embedding(indices, w, scale_grad_by_freq=True), reference, [randn(5, 2)])
    with no_fallback():
        check_vjp(lambda w: F.embedding(indices, w, scale_grad_by_freq=True), randn(5, 2))


def test_embedding_empty_indices():
    # torch.autograd's double backward of embedding fails on empty indices
    # (it reshapes to [0, 3, -1]); the reference is w[indices].
    indices = torch.zeros(0, 3, dtype=torch.long)
    _check_against(lambda w: F.embedding(indices, w), lambda w: w[indices], [randn(4, 2)])


@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_reduce_prod_repeated_zeros(include_self):
    # Two and three zeros reduced into one slot: torch.autograd's double
    # backward raises there; the reference is a dense product over a
    # [slot, source] table, whose prod backward is exact.
    index = idx([0, 0, 0, 1, 0, 2])
    x = randn(1, 3)
    src = torch.tensor([[0.0, 1.5, 0.0, 0.0, -2.0, 0.7]], dtype=D)

    def fn(x, s):
        return x.scatter_reduce(1, index, s, "prod", include_self=include_self)

    def reference(x, s):
        hits = index[0][None, :] == torch.arange(3)[:, None]  # [slot, source]
        table = torch.where(hits, s[0][None, :], torch.ones((), dtype=D))
        if include_self:
            table = torch.cat([x[0][:, None], table], 1)
        else:
            table = torch.cat([torch.where(hits.any(1), 1.0, x[0])[:, None], table], 1)
        return table.prod(1)[None]

    _check_against(fn, reference, [x, src])
    three = src.clone()
    three[0, 1] = 0.0
    _check_against(fn, reference, [x, three])


_LARGER_SRC = [
    ("scatter", lambda x, i, s: x.scatter(1, i, s)),
    ("scatter_add", lambda x, i, s: x.scatter_add(1, i, s)),
    ("scatter_reduce_amax", lambda x, i, s: x.scatter_reduce(1, i, s, "amax")),
    ("scatter_reduce_prod", lambda x, i, s: x.scatter_reduce(1, i, s, "prod", include_self=False)),
]


@pytest.mark.parametrize("name,op", _LARGER_SRC, ids=[r[0] for r in _LARGER_SRC])
def test_scatter_src_larger_than_index(name, op):
    # Only the leading index-shaped part of src is read; torch.autograd
    # rejects the index-shaped gradient, the reference narrows src first.
    index = idx([1, 3], [0, 2])
    _check_against(lambda x, s: op(x, index, s), lambda x, s: op(x, index, s[:2, :2]), [randn(3, 4), randn(3, 4)])


# -- integer and boolean outputs ------------------------------------------------


def _through_integer_ops(x, boundaries):
    buckets = torch.bucketize(x.detach(), boundaries) + torch.searchsorted(boundaries, x)
    found = torch.isin(x, x[:2])
    rows = torch.nonzero(x > 0)[:, 0]
    where = torch.argwhere(x < 0)[:, 1]
    return x * buckets + x * found + x[rows].sum() + x[:, where].sum()


def test_integer_outputs_carry_no_gradient():
    for op in [aten.searchsorted.Tensor, aten.bucketize.Tensor, aten.isin.Tensor_Tensor, aten.nonzero.default]:
        assert vjp_coverage(op) == "nondifferentiable", op
    with no_fallback():
        check_vjp(_through_integer_ops, randn(3, 4), torch.linspace(-1, 1, 5, dtype=D))


@pytest.mark.filterwarnings("ignore:The reduce argument of torch.scatter")
def test_scatter_reduce_error_matches_torch():
    # scatter(..., reduce=) has no derivative in derivatives.yaml: both raise.
    x, index, src = randn(2, 3), idx([0, 1, 0]), randn(1, 3)
    with pytest.raises(RuntimeError, match="scatter.reduce"):
        torchxform.grad(lambda x: x.scatter(0, index, src, reduce="add").sum())(x)


# -- vmap(grad): per-example gradients -------------------------------------------


def _embed_loss(w, i, y):
    return ((F.embedding(i, w, padding_idx=0) - y) ** 2).sum()


def _gather_loss(w, i, y):
    return (w.gather(1, i).sin() * y).sum()


def _scatter_loss(w, i, y):
    return (torch.zeros(3, 4, dtype=D).scatter_add(1, i, w[:, :2] * y).square()).sum()


def _amax_loss(w, i, y):
    return w.scatter_reduce(1, i, y, "amax", include_self=False).square().sum()


def _setitem_loss(w, i, y):
    z = w * y[:, 4:]  # batched, so that writing batched values into it is allowed
    z[i] = y[:2, :4].tanh()
    return z.relu().sum() + z.index_select(1, i).pow(2).sum()


PER_EXAMPLE = [
    ("embedding", _embed_loss, lambda: (randn(5, 4), torch.randint(0, 5, (6, 3)), randn(6, 3, 4))),
    ("gather", _gather_loss, lambda: (randn(3, 4), torch.randint(0, 4, (6, 3, 5)), randn(6, 3, 5))),
    ("scatter_add", _scatter_loss, lambda: (randn(3, 4), torch.randint(0, 4, (6, 3, 2)), randn(6, 3, 2))),
    ("scatter_reduce_amax", _amax_loss, lambda: (ties(3, 4), torch.randint(0, 4, (6, 3, 5)), ties(6, 3, 5))),
    ("setitem", _setitem_loss, lambda: (randn(3, 4), torch.stack([distinct(2, 3) for _ in range(6)]), randn(6, 3, 5))),
]


@pytest.mark.parametrize("name,loss,sample", PER_EXAMPLE, ids=[r[0] for r in PER_EXAMPLE])
def test_vmap_grad_per_example(name, loss, sample):
    """vmap(grad(loss)) over examples (index, target) with shared weights,
    against a loop of torch.autograd.grad."""
    w, indices, targets = sample()
    expected = []
    for i, y in zip(indices, targets):
        leaf = w.clone().requires_grad_()
        expected.append(torch.autograd.grad(loss(leaf, i, y), leaf)[0])
    with no_fallback():
        actual = torchxform.vmap(torchxform.grad(loss), in_dims=(None, 0, 0))(w, indices, targets)
    assert_close(actual, torch.stack(expected), msg=name)


@cpu_reference("CUDA's scatter_reduce kernel has no complex 'prod'")
@pytest.mark.parametrize("include_self", [True, False])
def test_complex_scatter_reduce_prod_vjp(include_self):
    # torch.autograd has no complex scatter_reduce (and eager no complex
    # index_reduce); the reference is the same product written with
    # torch.where and torch.prod, which it does differentiate.
    import torchxform

    x = torch.randn(6, dtype=torch.complex128)
    x[2] = 0  # a zero source: the partials of its slot take the other branch
    base = torch.randn(3, dtype=torch.complex128)
    index = torch.tensor([0, 1, 0, 1, 2, 0])
    cotangent = torch.randn(3, dtype=torch.complex128)

    def reference(base, x):
        members = index[None, :] == torch.arange(3)[:, None]  # [slot, source]
        products = torch.where(members, x[None, :], torch.ones((), dtype=x.dtype)).prod(1)
        return base * products if include_self else products + 0 * base

    leaves = (base.clone().requires_grad_(), x.clone().requires_grad_())
    expected = torch.autograd.grad(reference(*leaves), leaves, cotangent)
    _, pullback = torchxform.vjp(lambda b, x: b.scatter_reduce(0, index, x, "prod", include_self=include_self), base, x)
    for got, want in zip(pullback(cotangent), expected):
        torch.testing.assert_close(got, want)
