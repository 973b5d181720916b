"""Forward derivatives (JVPs) of indexing, gathering and scattering against
torch.autograd.forward_ad: jvp, vmap over jvp and jvp over vjp
(tests/autograd_harness.py), on the tables of the VJP tests, in float64 and
complex128; in-place forms (tangents are never written in place); reverse
over forward (jacrev of jacfwd) and jacfwd against torch.autograd.functional.

Where torch.autograd has no exact forward answer, a row is checked against
an equivalent function it does differentiate exactly: forward_ad has no
formula for index_reduce (a scatter_reduce with the index expanded stands
in), gives scatter_reduce(..., "prod") no tangent at all (a dense product
over a [slot, source] table), and no complex embedding, select_scatter,
slice_scatter or scatter_reduce."""

import pytest
import torch
import torch.nn.functional as F

import torchxform
from tests.autograd_harness import (
    check_forward_derivatives,
    ours_jvp,
    reference_jvp,
    reference_jvp_of_vjp,
    split_args,
)
from tests.harness import assert_close, cpu_reference, no_fallback, skip_cpu_reference_rows
from tests.rules.test_indexing_vjp import (
    _LARGER_SRC,
    INPLACE,
    MASK,
    READS,
    REDUCES,
    WRITES,
    _zero_first,
    idx,
    randn,
    with_zeros,
)
from tests.rules.test_indexing_vjp import FAMILY as VJP_FAMILY
from torchxform._core.registry import jvp_coverage

aten = torch.ops.aten
C = torch.complex128

# -- rows whose reference is an equivalent function --------------------------


def _dense_prod(x, dim, index, src, include_self):
    """scatter_reduce(x, dim, index, src, "prod") as a product over a
    [slot, source] table, which forward_ad differentiates exactly."""
    x_, index_, src_ = x.movedim(dim, -1), index.movedim(dim, -1), src.movedim(dim, -1)
    hits = index_[..., None, :] == torch.arange(x_.shape[-1])[:, None]  # [..., slot, source]
    table = torch.where(hits, src_[..., None, :], torch.ones((), dtype=x.dtype))
    own = x_ if include_self else torch.where(hits.any(-1), torch.ones((), dtype=x.dtype), x_)
    return (own * table.prod(-1)).movedim(-1, dim)


def _reduce_reference(name):
    """The forward_ad reference of a REDUCES row (its ops: scatter_reduce
    along dim 1, index_reduce along dim 0), or None where its own is exact."""
    op_name, reduce = name.split("_")[0] + "_reduce", name.split("_")[2]
    include_self = "_self_" in name
    if op_name == "scatter_reduce":
        if reduce != "prod":
            return None
        return lambda x, i, s: _dense_prod(x, 1, i, s, include_self)
    if reduce == "prod":
        return lambda x, i, s: _dense_prod(x, 0, i[:, None].expand_as(s), s, include_self)
    return lambda x, i, s: x.scatter_reduce(0, i[:, None].expand_as(s), s, reduce, include_self=include_self)


def _scatter_inplace_reference(x, s):
    x = x.clone()
    x.scatter_(1, idx([2, 0, 1]), s)
    x = torch.cat([x[:1], s.expand(2, 3).prod(0, keepdim=True)])  # index_reduce_ prod, include_self=False
    return x.put_(idx(0, 4, 4), s.reshape(-1), accumulate=True)


REFERENCES = {name: _reduce_reference(name) for name, _, _ in REDUCES}
REFERENCES["scatter_index_reduce_put"] = _scatter_inplace_reference


def check_forward_against(fn, reference, sample, *, over_reverse=True, batch_size=3, msg=""):
    """``check_forward_derivatives`` with the expected values taken from
    ``reference`` (the same function, written so that forward_ad gets it)."""
    args = tuple(sample())
    positions, merge = split_args(args)
    primals = tuple(args[i] for i in positions)
    tangents, *batch = [tuple(torch.randn_like(p) for p in primals) for _ in range(batch_size + 1)]
    cotangent = torch.randn_like(fn(*args))
    with no_fallback():
        actual_out, actual = ours_jvp(fn, args, tangents)
        expected_out, expected = reference_jvp(reference, args, tangents)
        assert_close(actual_out, expected_out, msg=f"{msg}: jvp output")
        assert_close(actual, expected, msg=f"{msg}: jvp tangent")
        stacked = tuple(torch.stack(column) for column in zip(*batch))
        batched = torchxform.vmap(lambda *ts: torchxform.jvp(lambda *d: fn(*merge(d)), primals, ts)[1])(*stacked)
        expected = torch.stack([reference_jvp(reference, args, ts)[1] for ts in batch])
        assert_close(batched, expected, msg=f"{msg}: vmap over jvp")
        if not over_reverse:
            return

        def pulled(*diff):
            return torchxform.vjp(lambda *d: fn(*merge(d)), *diff)[1](cotangent)

        _, actual = torchxform.jvp(pulled, primals, tangents)
        expected = reference_jvp_of_vjp(reference, args, cotangent, tangents)
        assert_close(tuple(actual), expected, msg=f"{msg}: jvp of vjp")


# -- the tables ----------------------------------------------------------------


def _broadcast_setitem(x, i, v):
    # x's tangent is an expanded view here: the write must not go into it.
    y = x + torch.zeros(5, 3, dtype=x.dtype)
    y[i] = v
    return y


def _broadcast_view_writes(x, s):
    y = x + torch.zeros(3, 3, dtype=x.dtype)
    y[1].scatter_add_(0, idx(2, 0, 2), s)
    y[:, :2].index_fill_(0, idx(0), 0.5)
    return y


def _reduces_inplace(x, s):
    x = x.clone()
    x.scatter_reduce_(0, idx([1, 0, 1], [2, 2, 3]), s, "amin", include_self=False)
    x = x * 1
    x.scatter_reduce_(1, idx([0, 0, 1]), s[:1], "mean")
    return x


EXTRA_INPLACE = [
    ("setitem_into_broadcast", _broadcast_setitem, lambda: (randn(3), idx(4, 0), randn(2, 3))),
    ("broadcast_view_writes", _broadcast_view_writes, lambda: (randn(3), randn(3))),
    ("reduces_inplace", _reduces_inplace, lambda: (randn(4, 3), randn(2, 3))),
    (
        "index_fill_integer_value",
        lambda x: x.index_fill(1, idx(0, 2), torch.tensor(3)),
        lambda: (randn(2, 4),),
    ),
]

TABLE = [
    (f"{group}-{name}", fn, sample)
    for group, rows in [
        ("read", READS),
        ("write", WRITES),
        ("reduce", REDUCES),
        ("inplace", INPLACE + EXTRA_INPLACE),
    ]
    for name, fn, sample in rows
]


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta")
@pytest.mark.parametrize("name,fn,sample", TABLE, ids=[r[0] for r in TABLE])
def test_forward_derivatives(name, fn, sample):
    reference = REFERENCES.get(name.split("-", 1)[1])
    if reference is None:
        check_forward_derivatives(fn, sample, msg=name)
    else:
        check_forward_against(fn, reference, sample, msg=name)


def _complex(sample):
    """``sample`` with its float64 tensors made complex128 (imaginary parts drawn anew)."""

    def draw():
        return tuple(
            torch.complex(a, torch.randn_like(a)) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in sample()
        )

    return draw


def _select_scatter_reference(x, s):
    x = x.clone()
    x[:, -1] = s
    return x


def _slice_scatter_reference(x, s):
    x = x.clone()
    x[1::2] = s
    return x


# Complex embedding rows: their VJP is embedding_dense_backward, for which CUDA
# (unlike CPU) has no complex kernel, as torch.autograd's own backward finds.
COMPLEX_EMBEDDING_ROWS = ("read-embedding", "read-embedding_padding", "read-embedding_padding_negative")
NO_COMPLEX_EMBEDDING_BACKWARD_ON_CUDA = "CUDA's embedding_dense_backward has no complex kernel"
# Rows whose op torch.autograd rejects for complex outputs: an equivalent function.
COMPLEX_REFERENCES = {
    "read-embedding": lambda w, i: w[i],
    "read-embedding_padding": lambda w, i: w[i],
    "read-embedding_padding_negative": lambda w, i: w[i],
    "write-select_scatter": _select_scatter_reference,
    "write-slice_scatter": _slice_scatter_reference,
}
# scatter_reduce / index_reduce: no complex autograd in torch, no complex
# amax / amin at all (test_reduce_complex has the others).
COMPLEX = [
    (name, fn, _complex(sample))
    for name, fn, sample in TABLE
    if not name.startswith("reduce-")
    and not any(word in name for word in ("chain", "scatter_index_reduce_put", "reduces_inplace"))
]


@pytest.mark.parametrize("name,fn,sample", COMPLEX, ids=[r[0] for r in COMPLEX])
def test_forward_derivatives_complex(name, fn, sample):
    skip_cpu_reference_rows(name, dict.fromkeys(COMPLEX_EMBEDDING_ROWS, NO_COMPLEX_EMBEDDING_BACKWARD_ON_CUDA))
    reference = COMPLEX_REFERENCES.get(name)
    if reference is None:
        check_forward_derivatives(fn, sample, msg=name)
    else:
        check_forward_against(fn, reference, sample, msg=name)


def _scatter_sum_reference(x, index, s, include_self):
    return (x if include_self else x.scatter(0, index, 0)).scatter_add(0, index, s)


NO_COMPLEX_PROD_ON_CUDA = "CUDA's scatter_reduce and index_reduce kernels have no complex 'prod'"
_COMPLEX_REDUCES = [
    ("scatter_reduce", "sum", True),
    ("scatter_reduce", "sum", False),
    pytest.param("scatter_reduce", "prod", True, marks=cpu_reference(NO_COMPLEX_PROD_ON_CUDA)),
    pytest.param("scatter_reduce", "prod", False, marks=cpu_reference(NO_COMPLEX_PROD_ON_CUDA)),
    # index_reduce has no complex kernel without self
    pytest.param("index_reduce", "prod", True, marks=cpu_reference(NO_COMPLEX_PROD_ON_CUDA)),
]


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta")
@pytest.mark.parametrize("op_name,reduce,include_self", _COMPLEX_REDUCES)
def test_reduce_complex(op_name, reduce, include_self):
    # Without jvp over vjp: the VJP rules of scatter_reduce / index_reduce do
    # not conjugate (torch.autograd has no complex scatter_reduce to follow).
    i = idx(0, 2, 0, 0)
    index = i[:, None].expand(4, 3).clone()
    if op_name == "scatter_reduce":
        fn = lambda x, s: x.scatter_reduce(0, index, s, reduce, include_self=include_self)
    else:
        fn = lambda x, s: x.index_reduce(0, i, s, reduce, include_self=include_self)
    if reduce == "sum":
        reference = lambda x, s: _scatter_sum_reference(x, index, s, include_self)
    else:
        reference = lambda x, s: _dense_prod(x, 0, index, s, include_self)
    source = torch.randn(4, 3, dtype=C)
    source[0] = 0
    sample = lambda: (torch.randn(4, 3, dtype=C), source)
    check_forward_against(fn, reference, sample, over_reverse=False, msg=f"{op_name} {reduce} complex")


@pytest.mark.parametrize("name,op", _LARGER_SRC, ids=[r[0] for r in _LARGER_SRC])
def test_scatter_src_larger_than_index(name, op):
    # Only the leading index-shaped part of src is read; the reference
    # narrows src first (a dense product for prod, the other rows as they are).
    index = idx([1, 3], [0, 2])
    if name == "scatter_reduce_prod":
        reference = lambda x, s: torch.cat([_dense_prod(x[:2], 1, index, s[:2, :2], False), x[2:]])
    else:
        reference = lambda x, s: op(x, index, s[:2, :2])
    check_forward_against(lambda x, s: op(x, index, s), reference, lambda: (randn(3, 4), randn(3, 4)), msg=name)


# -- the backward ops of this family, which jvp over vjp meets --------------------

def _EDB_INDICES():
    """Made when a test runs, on its default device (as are the constants below)."""
    return idx([0, 3, 3], [2, 0, 1])


def _masked_scatter_backward_reference(g, mask, sizes):
    # forward_ad's own formula for masked_scatter_backward gives a tangent of
    # grad's shape instead of `sizes` (it reads grad_output_t.sizes()).
    picked = g.masked_select(mask)
    numel = torch.Size(sizes).numel()
    return torch.cat([picked, picked.new_zeros(numel - picked.numel())]).reshape(sizes)


@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_embedding_dense_backward(scale_grad_by_freq):
    def fn(g):
        return aten.embedding_dense_backward(g, _EDB_INDICES(), 5, 3, scale_grad_by_freq)

    check_forward_derivatives(fn, lambda: (randn(2, 3, 4),), msg="embedding_dense_backward")


def test_masked_scatter_backward():
    def fn(g):
        return aten.masked_scatter_backward(g, MASK(), [3, 4])

    def reference(g):
        return _masked_scatter_backward_reference(g, MASK(), [3, 4])

    check_forward_against(fn, reference, lambda: (randn(2, 5),), msg="masked_scatter_backward")


# -- reverse over forward: the rules' own ops differentiated ----------------------

def _WEIGHTS():
    return torch.linspace(-1, 2, 12, dtype=torch.float64)


SECOND_ORDER = [
    (
        "scatter_reduce_prod",
        lambda x, s: x.scatter_reduce(1, idx([0, 2, 0, 3], [1, 1, 1, 0], [2, 2, 3, 2]), s, "prod"),
        lambda: (with_zeros(3, 4), _zero_first(randn(3, 4), 1)),
    ),
    (
        "index_reduce_prod_noself",
        lambda x, s: x.index_reduce(0, idx(0, 2, 0, 0), s, "prod", include_self=False),
        lambda: (with_zeros(4, 3), _zero_first(randn(4, 3), 0)),
    ),
    (
        "scatter_reduce_amin",
        lambda x, s: x.scatter_reduce(0, idx([1, 0, 1], [2, 2, 3]), s, "amin").exp(),
        lambda: (randn(4, 3), randn(2, 3)),
    ),
    ("index_put", lambda x, v: x.index_put((idx(2, 0),), v.sin()), lambda: (randn(4, 3), randn(2, 3))),
]


def _check_hessian(fn, reference, args, msg):
    """Reverse over forward: jacrev(jacfwd) of a weighted sum of ``fn``'s
    output, against torch.autograd's Hessian of ``reference``'s."""

    def weighted(f):
        def loss(*a):
            out = f(*a)
            return (out * _WEIGHTS()[: out.numel()].reshape(out.shape)).sum()

        return loss

    argnums = tuple(range(len(args)))
    with no_fallback():
        actual = torchxform.jacrev(torchxform.jacfwd(weighted(fn), argnums=argnums), argnums=argnums)(*args)
    assert_close(actual, torch.autograd.functional.hessian(weighted(reference), args), msg=msg)


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta")
@pytest.mark.parametrize("name,fn,sample", SECOND_ORDER, ids=[r[0] for r in SECOND_ORDER])
def test_jacrev_of_jacfwd(name, fn, sample):
    _check_hessian(fn, fn, sample(), name)


@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_reduce_prod_repeated_zeros(include_self):
    # Two, then three zeros reduced into slot 0 (forward_ad's reference, a
    # dense product, is exact there; torch's scatter_reduce double backward raises).
    index = idx([0, 0, 0, 1, 0, 2])

    def fn(x, s):
        return x.scatter_reduce(1, index, s, "prod", include_self=include_self)

    def reference(x, s):
        return _dense_prod(x, 1, index, s, include_self)

    x = randn(1, 3)
    two = torch.tensor([[0.0, 1.5, 0.0, 0.0, -2.0, 0.7]], dtype=torch.float64)
    three = two.clone()
    three[0, 1] = 0.0
    for src in (two, three):
        check_forward_against(fn, reference, lambda src=src: (x, src), msg=f"prod zeros {src}")
        _check_hessian(fn, reference, (x, src), f"prod zeros {src}")


# -- jacfwd against torch.autograd.functional.jacobian ------------------------------

def _I():
    return idx(3, 0, 3)


JACOBIANS = [
    ("index", lambda x: x[_I(), 1:], lambda: (randn(4, 3),)),
    ("gather", lambda x: x.gather(1, idx([2, 2], [0, 1])), lambda: (randn(2, 3),)),
    ("index_put_accumulate", lambda x, v: x.index_put((_I(),), v, accumulate=True), lambda: (randn(4, 2), randn(3, 2))),
    ("scatter_reduce_amax", lambda x, s: x.scatter_reduce(0, idx(1, 1, 2), s, "amax"), lambda: (randn(3), randn(3))),
    ("index_reduce_prod", lambda x, s: x.index_reduce(0, _I(), s, "prod"), lambda: (randn(4, 2), randn(3, 2))),
    # Without padding_idx: torch's forward mode gives the padding row a
    # tangent (auto_linear), its reverse mode no gradient.
    ("embedding", lambda w: F.embedding(idx([1, 3], [3, 3]), w), lambda: (randn(4, 2),)),
    ("masked_scatter", lambda x, s: x.masked_scatter(MASK(), s), lambda: (randn(2, 5), randn(7))),
]


@pytest.mark.filterwarnings("ignore:index_reduce\\(\\) is in beta")
@pytest.mark.parametrize("name,fn,sample", JACOBIANS, ids=[r[0] for r in JACOBIANS])
def test_jacfwd(name, fn, sample):
    args = sample()
    with no_fallback():
        actual = torchxform.jacfwd(fn, argnums=tuple(range(len(args))))(*args)
    expected = torch.autograd.functional.jacobian(fn, args)
    assert_close(actual, expected, msg=name)


# -- coverage: every op of the family has its own JVP rule --------------------------

# The ops with VJP rules, and the in-place / functional forms beside them.
FAMILY = VJP_FAMILY["rule"] + [aten.scatter_.value, aten.index_fill_.int_Scalar, aten._index_put_impl.default]


def test_coverage():
    assert {str(op): jvp_coverage(op) for op in FAMILY} == {str(op): "rule" for op in FAMILY}


def test_inplace_tangent_not_written():
    # A tangent is never written in place: the user's tangent stays as given.
    x, t, v = randn(4, 3), randn(4, 3), randn(2, 3)
    saved = t.clone()
    _, tangent = torchxform.jvp(lambda x: x.index_put_((idx(0, 2),), v), (x.clone(),), (t,))
    assert_close(t, saved, msg="user tangent")
    expected = saved.clone()
    expected[idx(0, 2)] = 0
    assert_close(tangent, expected, msg="tangent")
