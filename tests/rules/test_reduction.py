"""Batching rules of reductions, scans, sorting and softmax against a Python loop."""

import math
import warnings

import pytest
import torch

import torchxform
from tests.harness import (
    ON_ACCELERATOR,
    assert_close,
    check_vmap,
    check_vmap_sampled,
    loop_reference,
    no_fallback,
    skip_cpu_reference_rows,
)

aten = torch.ops.aten
inf = math.inf

FLOATS = [torch.float32, torch.float64]
ANY_RANK = [(2, 3), (1, 4), (3,), ()]  # rows whose dims are 0, -1 or none accept any rank
MATRIX = [(2, 3), (1, 4), (2, 1, 3)]


def _draw(shape, dtype, domain=None):
    """One example from the op's domain."""
    if dtype is torch.bool:
        return torch.rand(shape) > 0.5
    if not dtype.is_floating_point:
        low = 0 if dtype is torch.uint8 else -3
        return torch.randint(low, 4, shape, dtype=dtype)  # small ints: ties on purpose
    x = torch.randn(shape, dtype=dtype)
    if domain == "nan":  # some nans, for the nan-ignoring ops
        x = x.masked_fill(torch.rand(shape) < 0.3, math.nan)
    elif domain == "zeros":  # some exact zeros, for count_nonzero
        x = x * (torch.rand(shape) > 0.4)
    elif domain == "small":  # products of many values stay in range
        x = 0.5 + torch.rand(shape, dtype=dtype)
    return x


# (name, fn, shapes, dtypes, domain)
ROWS = [
    # sum, nansum, mean, prod
    ("sum", lambda x: x.sum(), ANY_RANK, FLOATS, None),
    ("sum_dim", lambda x: x.sum(0), ANY_RANK, FLOATS, None),
    ("sum_keepdim", lambda x: x.sum(-1, keepdim=True), ANY_RANK, FLOATS, None),
    ("sum_empty_list", lambda x: torch.sum(x, []), ANY_RANK, FLOATS, None),
    ("sum_none_keepdim", lambda x: aten.sum.dim_IntList(x, None, True), ANY_RANK, FLOATS, None),
    ("sum_dtype", lambda x: x.sum(-1, dtype=torch.float64), ANY_RANK, [torch.float32], None),
    ("sum_list", lambda x: x.sum([0, -1]), MATRIX, FLOATS, None),
    ("sum_list_keepdim", lambda x: x.sum((1, 0), keepdim=True), MATRIX, FLOATS, None),
    ("sum_middle", lambda x: x.sum(1), MATRIX, FLOATS, None),
    ("nansum", lambda x: x.nansum(), ANY_RANK, FLOATS, "nan"),
    ("nansum_dim", lambda x: x.nansum(-1, keepdim=True), ANY_RANK, FLOATS, "nan"),
    ("mean", lambda x: x.mean(), ANY_RANK, FLOATS, None),
    ("mean_dim", lambda x: x.mean(-1, keepdim=True), ANY_RANK, FLOATS, None),
    ("mean_list_dtype", lambda x: x.mean([0, 1], dtype=torch.float64), MATRIX, [torch.float32], None),
    ("nanmean", lambda x: x.nanmean(0), ANY_RANK, FLOATS, "nan"),
    ("prod", lambda x: x.prod(), ANY_RANK, FLOATS, "small"),
    ("prod_dim", lambda x: x.prod(0), ANY_RANK, FLOATS, "small"),
    ("prod_keepdim_dtype", lambda x: x.prod(-1, keepdim=True, dtype=torch.float64), ANY_RANK, FLOATS, "small"),
    # max / min family
    ("amax", lambda x: x.amax(), ANY_RANK, FLOATS, None),
    ("amax_dim", lambda x: x.amax(0), ANY_RANK, FLOATS, None),
    ("amin_keepdim", lambda x: x.amin(-1, keepdim=True), ANY_RANK, FLOATS, None),
    ("amax_list", lambda x: x.amax((1, 0)), MATRIX, FLOATS, None),
    ("aminmax", lambda x: tuple(torch.aminmax(x)), ANY_RANK, FLOATS, None),
    ("aminmax_keepdim", lambda x: tuple(torch.aminmax(x, keepdim=True)), ANY_RANK, FLOATS, None),
    ("aminmax_dim", lambda x: tuple(torch.aminmax(x, dim=-1, keepdim=True)), ANY_RANK, FLOATS, None),
    ("_aminmax", lambda x: aten._aminmax.default(x), ANY_RANK, FLOATS, None),
    ("_aminmax_dim", lambda x: aten._aminmax.dim(x, 0), ANY_RANK, FLOATS, None),
    ("max", lambda x: x.max(), ANY_RANK, FLOATS, "nan"),
    ("min", lambda x: x.min(), ANY_RANK, FLOATS, None),
    ("max_dim", lambda x: tuple(x.max(0)), ANY_RANK, FLOATS, None),
    ("min_dim_keepdim", lambda x: tuple(x.min(-1, keepdim=True)), ANY_RANK, FLOATS, None),
    ("max_dim_middle", lambda x: tuple(x.max(-2)), MATRIX, FLOATS, None),
    ("argmax", lambda x: x.argmax(), ANY_RANK, FLOATS, None),
    ("argmax_keepdim", lambda x: x.argmax(keepdim=True), ANY_RANK, FLOATS, None),
    ("argmin_dim", lambda x: x.argmin(0), ANY_RANK, FLOATS, None),
    ("argmin_dim_keepdim", lambda x: x.argmin(-1, keepdim=True), ANY_RANK, FLOATS, None),
    # var / std
    ("var", lambda x: x.var(), [(2, 3), (1, 4), (3,)], FLOATS, None),
    ("std_unbiased_false", lambda x: x.std(unbiased=False), ANY_RANK, FLOATS, None),
    ("var_dim_correction", lambda x: x.var(-1, correction=0, keepdim=True), ANY_RANK, FLOATS, None),
    ("std_list", lambda x: x.std([0, -1], correction=0.5), MATRIX, FLOATS, None),
    ("var_mean", lambda x: tuple(torch.var_mean(x, correction=0)), ANY_RANK, FLOATS, None),
    ("std_mean_dim", lambda x: tuple(torch.std_mean(x, 0, keepdim=True, correction=0)), ANY_RANK, FLOATS, None),
    ("var_mean_list", lambda x: tuple(torch.var_mean(x, [1, 0])), MATRIX, FLOATS, None),
    # logsumexp and norms
    ("logsumexp", lambda x: torch.logsumexp(x, 0), ANY_RANK, FLOATS, None),
    ("logsumexp_keepdim", lambda x: torch.logsumexp(x, -1, keepdim=True), ANY_RANK, FLOATS, None),
    ("logsumexp_list", lambda x: torch.logsumexp(x, [0, -1]), MATRIX, FLOATS, None),
    ("vector_norm", lambda x: torch.linalg.vector_norm(x), ANY_RANK, FLOATS, None),
    ("vector_norm_inf_keepdim", lambda x: torch.linalg.vector_norm(x, inf, -1, True), ANY_RANK, FLOATS, None),
    ("vector_norm_l1_dtype", lambda x: torch.linalg.vector_norm(x, 1, 0, dtype=torch.float64), ANY_RANK, [torch.float32], None),
    ("vector_norm_list", lambda x: torch.linalg.vector_norm(x, 3, [-1, 0], True), MATRIX, FLOATS, None),
    ("vector_norm_empty_list", lambda x: torch.linalg.vector_norm(x, 2, []), ANY_RANK, FLOATS, None),
    ("norm_Scalar", lambda x: aten.norm.Scalar(x), ANY_RANK, FLOATS, None),
    ("norm_Scalar_p", lambda x: aten.norm.Scalar(x, 1), ANY_RANK, FLOATS, None),
    ("norm_ScalarOpt_dim", lambda x: aten.norm.ScalarOpt_dim(x, None, [0]), ANY_RANK, FLOATS, None),
    ("norm_ScalarOpt_dim_dtype", lambda x: aten.norm.ScalarOpt_dim_dtype(x, 3, [-1], True, dtype=torch.float64), ANY_RANK, [torch.float32], None),
    ("norm_ScalarOpt_dtype", lambda x: aten.norm.ScalarOpt_dtype(x, 1, dtype=torch.float64), ANY_RANK, [torch.float32], None),
    ("norm_public", lambda x: x.norm(p=2, dim=[0, 1]), MATRIX, FLOATS, None),
    ("dist", lambda x: torch.dist(x, x.flip(0), 3), [(2, 3), (3,)], FLOATS, None),
    # all / any / count_nonzero
    ("all", lambda x: (x > 0).all(), ANY_RANK, FLOATS, None),
    ("any_dim", lambda x: (x > 0).any(0), ANY_RANK, FLOATS, None),
    ("all_dim_keepdim", lambda x: x.all(-1, keepdim=True), ANY_RANK, FLOATS, "zeros"),
    ("all_dims_none", lambda x: aten.all.dims(x > 0, None, True), ANY_RANK, FLOATS, None),
    ("any_dims_empty", lambda x: aten.any.dims(x > 0, []), ANY_RANK, FLOATS, None),
    ("all_dims_list", lambda x: aten.all.dims(x > -1, [0, -1]), MATRIX, FLOATS, None),
    ("count_nonzero", lambda x: torch.count_nonzero(x), ANY_RANK, FLOATS, "zeros"),
    ("count_nonzero_dim", lambda x: torch.count_nonzero(x, -1), ANY_RANK, FLOATS, "zeros"),
    ("count_nonzero_empty_list", lambda x: aten.count_nonzero.dim_IntList(x, []), ANY_RANK, FLOATS, "zeros"),
    ("count_nonzero_list", lambda x: torch.count_nonzero(x, [1, 0]), MATRIX, FLOATS, "zeros"),
    # scans
    ("cumsum", lambda x: x.cumsum(0), ANY_RANK, FLOATS, None),
    ("cumsum_dtype", lambda x: x.cumsum(-1, dtype=torch.float64), ANY_RANK, [torch.float32], None),
    ("cumsum_middle", lambda x: x.cumsum(1), MATRIX, FLOATS, None),
    ("cumsum_", lambda x: x.clone().cumsum_(-1), ANY_RANK, FLOATS, None),
    ("cumprod", lambda x: x.cumprod(-1), ANY_RANK, FLOATS, None),
    ("cumprod_", lambda x: x.clone().cumprod_(0), ANY_RANK, FLOATS, None),
    ("cummax", lambda x: tuple(x.cummax(0)), ANY_RANK, FLOATS, None),
    ("cummin", lambda x: tuple(x.cummin(-1)), ANY_RANK, FLOATS, None),
    ("logcumsumexp", lambda x: x.logcumsumexp(0), ANY_RANK, FLOATS, None),
    ("_logcumsumexp", lambda x: aten._logcumsumexp.default(x, -1), ANY_RANK, FLOATS, None),
    # softmax
    ("softmax", lambda x: x.softmax(0), ANY_RANK, FLOATS, None),
    ("log_softmax", lambda x: x.log_softmax(-1), ANY_RANK, FLOATS, None),
    ("softmax_dtype", lambda x: torch.softmax(x, -1, dtype=torch.float64), ANY_RANK, [torch.float32], None),
    ("softmax_middle", lambda x: torch.nn.functional.softmax(x, 1), MATRIX, FLOATS, None),
    ("_safe_softmax", lambda x: aten._safe_softmax.default(x, 0), ANY_RANK, FLOATS, None),
    ("_softmax", lambda x: aten._softmax.default(x, -1, False), ANY_RANK, FLOATS, None),
    # sorting and order statistics
    ("sort", lambda x: tuple(x.sort()), ANY_RANK, FLOATS, None),
    ("sort_descending", lambda x: tuple(x.sort(0, descending=True)), ANY_RANK, FLOATS, None),
    ("sort_stable", lambda x: tuple(torch.sort(x, stable=True, dim=0)), ANY_RANK, FLOATS, None),
    ("sort_middle", lambda x: tuple(x.sort(-2)), MATRIX, FLOATS, None),
    ("argsort", lambda x: x.argsort(-1, descending=True), ANY_RANK, FLOATS, None),
    ("msort", lambda x: torch.msort(x), ANY_RANK, FLOATS, None),
    ("topk", lambda x: tuple(x.topk(1)), ANY_RANK, FLOATS, None),
    ("topk_k0", lambda x: tuple(x.topk(0, 0)), ANY_RANK, FLOATS, None),
    ("topk_smallest_unsorted", lambda x: tuple(x.topk(1, 0, largest=False, sorted=False)), ANY_RANK, FLOATS, None),
    ("topk_middle", lambda x: tuple(x.topk(2, -1)), [(2, 3), (3, 2, 2)], FLOATS, None),
    ("kthvalue", lambda x: tuple(x.kthvalue(1)), ANY_RANK, FLOATS, None),
    ("kthvalue_dim_keepdim", lambda x: tuple(x.kthvalue(1, 0, keepdim=True)), ANY_RANK, FLOATS, None),
    ("kthvalue_middle", lambda x: tuple(x.kthvalue(2, -1)), [(2, 3), (3, 2, 2)], FLOATS, None),
    ("median", lambda x: x.median(), ANY_RANK, FLOATS, None),
    ("median_dim", lambda x: tuple(x.median(0)), ANY_RANK, FLOATS, None),
    ("median_dim_keepdim", lambda x: tuple(x.median(-1, keepdim=True)), ANY_RANK, FLOATS, None),
    ("nanmedian", lambda x: x.nanmedian(), ANY_RANK, FLOATS, "nan"),
    ("nanmedian_dim", lambda x: tuple(x.nanmedian(-1)), ANY_RANK, FLOATS, "nan"),
    ("mode", lambda x: tuple(x.mode()), ANY_RANK, FLOATS, None),
    ("mode_dim_keepdim", lambda x: tuple(x.mode(0, keepdim=True)), ANY_RANK, FLOATS, None),
    # renorm
    ("renorm", lambda x: x.renorm(2, 0, 1.0), MATRIX, FLOATS, None),
    ("renorm_last", lambda x: x.renorm(1, -1, 0.5), MATRIX, FLOATS, None),
    ("renorm_", lambda x: x.clone().renorm_(2, 1, 0.5), MATRIX, FLOATS, None),
    # overloads that decompose into the ones above (inside rules they arrive whole)
    ("var_dim_overload", lambda x: aten.var.dim(x, [0], False, True), ANY_RANK, FLOATS, None),
    ("std_default_overload", lambda x: aten.std.default(x, False), ANY_RANK, FLOATS, None),
    ("var_mean_dim_overload", lambda x: aten.var_mean.dim(x, [-1], True), [(2, 3), (1, 4), (3,)], FLOATS, None),
    ("softmax_int_overload", lambda x: aten.softmax.int(x, 0), ANY_RANK, FLOATS, None),
    ("log_softmax_int_overload", lambda x: aten.log_softmax.int(x, -1, torch.float64), ANY_RANK, FLOATS, None),
    ("special_logsumexp", lambda x: torch.special.logsumexp(x, [0]), ANY_RANK, FLOATS, None),
    # integer and bool inputs: promotion (sum of ints is int64) and ties
    ("int_sum", lambda x: x.sum(), ANY_RANK, [torch.int32, torch.bool], None),
    ("int_sum_dim", lambda x: x.sum(-1), ANY_RANK, [torch.int16, torch.bool], None),
    ("int_prod", lambda x: x.prod(), ANY_RANK, [torch.int32, torch.bool], None),
    ("int_prod_dim", lambda x: x.prod(0, keepdim=True), ANY_RANK, [torch.int32], None),
    ("int_mean_dtype", lambda x: x.mean(dtype=torch.float64), ANY_RANK, [torch.int64], None),
    ("int_cumsum", lambda x: x.cumsum(0), ANY_RANK, [torch.int32, torch.bool], None),
    ("int_cumprod", lambda x: x.cumprod(-1), ANY_RANK, [torch.int32], None),
    ("int_max", lambda x: x.max(), ANY_RANK, [torch.int64, torch.bool], None),
    ("int_amin", lambda x: x.amin(0), ANY_RANK, [torch.int64, torch.bool], None),
    ("int_max_dim_ties", lambda x: tuple(x.max(-1)), ANY_RANK, [torch.int64], None),
    ("int_argmax_ties", lambda x: x.argmax(), ANY_RANK, [torch.int64], None),
    ("int_argmin_dim_ties", lambda x: x.argmin(0), ANY_RANK, [torch.int64], None),
    ("int_all", lambda x: x.all(), ANY_RANK, [torch.uint8, torch.int64], None),
    ("int_any_dim", lambda x: x.any(-1), ANY_RANK, [torch.uint8, torch.int64], None),
    ("int_count_nonzero", lambda x: torch.count_nonzero(x, 0), ANY_RANK, [torch.int64, torch.bool], None),
    ("int_sort_stable_ties", lambda x: tuple(x.sort(stable=True)), ANY_RANK, [torch.int64], None),
    ("int_median_ties", lambda x: tuple(x.median(-1)), ANY_RANK, [torch.int64], None),
    ("int_mode_ties", lambda x: tuple(x.mode(-1)), ANY_RANK, [torch.int64], None),
    ("int_cummax_ties", lambda x: tuple(x.cummax(0)), ANY_RANK, [torch.int64], None),
    ("int_logsumexp", lambda x: torch.logsumexp(x, 0), ANY_RANK, [torch.int64], None),
]


ZERO_DIM_TOPK0 = "CUDA's topk(0) of a 0-dim tensor returns 0, CPU's the tensor itself"


@pytest.mark.parametrize("name,fn,shapes,dtypes,domain", ROWS, ids=[r[0] for r in ROWS])
def test_reduction(name, fn, shapes, dtypes, domain):
    skip_cpu_reference_rows(name, {"topk_k0": ZERO_DIM_TOPK0})
    with no_fallback(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "var.*degrees of freedom")
        for dtype in dtypes:
            for shape in shapes:
                check_vmap_sampled(
                    fn, lambda: (_draw(shape, dtype, domain),), msg=f"{name} {dtype} {shape}"
                )


# The batch at a middle physical dim: the output batch dim moves by the
# number of reduced dims before it.
MIDDLE = [
    ("sum_list", lambda x: x.sum([0, 2])),
    ("sum_list_keepdim", lambda x: x.sum([2, 0], keepdim=True)),
    ("mean_last", lambda x: x.mean(-1)),
    ("var_first", lambda x: x.var(0)),
    ("amax_all_keepdim", lambda x: x.amax(keepdim=True)),
    ("max_dim", lambda x: tuple(x.max(1))),
    ("argmax_flat", lambda x: x.argmax()),
    ("argmin_keepdim", lambda x: x.argmin(2, keepdim=True)),
    ("logsumexp", lambda x: torch.logsumexp(x, [1, -1])),
    ("count_nonzero", lambda x: torch.count_nonzero(x > 0, [0, 1])),
    ("sort", lambda x: tuple(x.sort(0))),
    ("topk", lambda x: tuple(x.topk(2, 1))),
    ("cumsum", lambda x: x.cumsum(2)),
    ("softmax", lambda x: x.softmax(0)),
    ("median_all", lambda x: x.median()),
    ("prod_all", lambda x: x.prod()),
    ("renorm", lambda x: x.renorm(2, 1, 1.0)),
    ("renorm_first", lambda x: x.renorm(2, 0, 1.0)),
]


@pytest.mark.parametrize("name,fn", MIDDLE, ids=[m[0] for m in MIDDLE])
@pytest.mark.parametrize("in_dim", [1, 2, 3])
def test_batch_dim_in_the_middle(name, fn, in_dim):
    x = torch.randn(2, 3, 4, 5).movedim(0, in_dim)  # a batch of 2 at in_dim; logical [3, 4, 5]
    with no_fallback():
        check_vmap(fn, x.contiguous(), in_dims=in_dim)
        check_vmap(fn, x, in_dims=in_dim)  # non-contiguous physical layout


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op", [aten._softmax_backward_data.default, aten._log_softmax_backward_data.default])
@pytest.mark.parametrize("shape,dim", [((2, 3), 1), ((2, 3), -2), ((1, 4), 0), ((3,), -1), ((), 0)], ids=str)
def test_softmax_backward(op, shape, dim, dtype):
    forward = torch.softmax if op is aten._softmax_backward_data.default else torch.log_softmax

    def sample():
        return torch.randn(shape, dtype=dtype), forward(torch.randn(shape, dtype=dtype), dim)

    with no_fallback():
        check_vmap_sampled(lambda g, y: op(g, y, dim, dtype), sample)


# Inputs on which eager raises: vmap raises the same exception and message.
ERRORS = [
    ("sum_dim_out_of_range", lambda x: x.sum(2), (2, 3)),
    ("sum_0d_dim_out_of_range", lambda x: x.sum(1), ()),
    ("sum_repeated_dim", lambda x: x.sum([0, -2]), (2, 3)),
    ("sum_0d_repeated_dim", lambda x: x.sum([0, -1]), ()),
    ("cumsum_0d_dim", lambda x: x.cumsum(1), ()),
    ("max_empty", lambda x: x.max(), (0, 3)),
    ("min_empty", lambda x: x.min(), (0, 3)),
    ("amax_empty_dim", lambda x: x.amax(0), (0, 3)),
    ("argmax_empty", lambda x: x.argmax(), (0, 3)),
    ("argmin_empty_dim", lambda x: x.argmin(0), (0, 3)),
    ("aminmax_empty", lambda x: torch.aminmax(x), (0, 3)),
    ("max_dim_empty", lambda x: x.max(0), (0, 3)),
    ("median_dim_empty", lambda x: x.median(0), (0, 3)),
    ("mode_empty", lambda x: x.mode(0), (0, 3)),
    ("kthvalue_k_too_large", lambda x: x.kthvalue(5, 1), (2, 3)),
    ("kthvalue_0d_k2", lambda x: x.kthvalue(2), ()),
    ("topk_k_too_large", lambda x: x.topk(4), (2, 3)),
    ("vector_norm_inf_empty", lambda x: torch.linalg.vector_norm(x, inf), (0, 3)),
    ("vector_norm_inf_empty_dim", lambda x: torch.linalg.vector_norm(x, inf, 0), (0, 3)),
    ("logsumexp_empty_list", lambda x: torch.logsumexp(x, []), (2, 3)),
    ("mean_int", lambda x: x.long().mean(), (2, 3)),
    ("var_int", lambda x: x.long().var(0), (2, 3)),
    ("renorm_1d", lambda x: x.renorm(2, 0, 1.0), (3,)),
    ("max_complex", lambda x: x.to(torch.complex64).max(), (2, 3)),
]


@pytest.mark.parametrize("name,fn,shape", ERRORS, ids=[e[0] for e in ERRORS])
def test_raises_like_eager(name, fn, shape):
    x = torch.randn((3,) + shape)
    with pytest.raises(Exception) as eager:
        fn(x[0])
    with no_fallback():
        for in_dim in (0, -1):
            with pytest.raises(type(eager.value)) as batched:
                torchxform.vmap(fn, in_dims=in_dim)(x.movedim(0, in_dim))
            assert str(batched.value) == str(eager.value)
        with pytest.raises(type(eager.value)) as nested:
            torchxform.vmap(torchxform.vmap(fn))(x.unsqueeze(0).expand(2, *x.shape))
        assert str(nested.value) == str(eager.value)


# Empty inputs on which eager does not raise: the same values, never an error.
BOTH = [torch.float32, torch.int64]
EMPTY = [
    ("sum_empty_dim", lambda x: x.sum(0), BOTH),
    ("prod_empty", lambda x: x.prod(), BOTH),
    ("amax_nonempty_dim", lambda x: x.amax(1), BOTH),
    ("median_empty", lambda x: x.median(), BOTH),
    ("nanmedian_empty", lambda x: x.nanmedian(), BOTH),
    ("all_empty", lambda x: x.all(), BOTH),
    ("sort_empty", lambda x: tuple(x.sort(0)), BOTH),
    ("cumsum_empty", lambda x: x.cumsum(0), BOTH),
    ("logsumexp_empty_dim", lambda x: torch.logsumexp(x, 0), [torch.float32]),
    ("softmax_empty", lambda x: x.softmax(0), [torch.float32]),
]


@pytest.mark.parametrize("name,fn,dtypes", EMPTY, ids=[e[0] for e in EMPTY])
def test_empty_examples(name, fn, dtypes):
    for dtype in dtypes:
        x = torch.zeros(3, 0, 2, dtype=dtype)
        with no_fallback():
            check_vmap(fn, x, msg=f"{name} {dtype}")
            check_vmap(fn, x.movedim(0, -1), in_dims=-1, msg=f"{name} {dtype}")


# Every op of the family has a real rule; the listed ones decompose into them.
RULE_OPS = [
    aten.sum.default, aten.sum.dim_IntList, aten.nansum.default, aten.mean.default, aten.mean.dim,
    aten.prod.default, aten.prod.dim_int, aten.amax.default, aten.amin.default, aten.aminmax.default,
    aten._aminmax.default, aten._aminmax.dim, aten.max.default, aten.max.dim, aten.min.default, aten.min.dim,
    aten.argmax.default, aten.argmin.default, aten.var.correction, aten.std.correction,
    aten.var_mean.correction, aten.std_mean.correction, aten.logsumexp.default, aten.linalg_vector_norm.default,
    aten.norm.Scalar, aten.norm.ScalarOpt_dim, aten.norm.ScalarOpt_dim_dtype, aten.norm.ScalarOpt_dtype,
    aten.all.default, aten.all.dim, aten.all.dims, aten.any.default, aten.any.dim, aten.any.dims,
    aten.count_nonzero.default, aten.count_nonzero.dim_IntList, aten.cumsum.default, aten.cumsum_.default,
    aten.cumprod.default, aten.cumprod_.default, aten.cummax.default, aten.cummin.default,
    aten.logcumsumexp.default, aten._logcumsumexp.default, aten._softmax.default, aten._log_softmax.default,
    aten._safe_softmax.default, aten._softmax_backward_data.default, aten._log_softmax_backward_data.default,
    aten.sort.default, aten.sort.stable, aten.topk.default, aten.kthvalue.default, aten.median.default,
    aten.median.dim, aten.nanmedian.default, aten.nanmedian.dim, aten.mode.default, aten.renorm.default,
]
DECOMPOSED_OPS = [
    aten.var.default, aten.var.dim, aten.std.default, aten.std.dim, aten.var_mean.default, aten.var_mean.dim,
    aten.std_mean.default, aten.std_mean.dim, aten.softmax.int, aten.log_softmax.int, aten.argsort.default,
    aten.argsort.stable, aten.msort.default, aten.nanmean.default, aten.special_logsumexp.default,
    aten.dist.default, aten.renorm_.default,
]


def test_coverage():
    from torchxform._core.registry import batching_coverage

    assert {op: batching_coverage(op) for op in RULE_OPS} == {op: "rule" for op in RULE_OPS}
    assert {op: batching_coverage(op) for op in DECOMPOSED_OPS} == {op: "decomposition" for op in DECOMPOSED_OPS}


def test_inplace_scans_return_self():
    def f(a):
        b = a.clone()
        assert b.cumsum_(-1) is b
        assert b.cumprod_(0) is b
        return b

    with no_fallback():
        check_vmap(f, torch.randn(4, 2, 3), in_dims=1)
        check_vmap(f, torch.randn(4))


def test_zero_dim_special_cases():
    x = torch.randn(4)
    with no_fallback():
        check_vmap(lambda a: torch.logsumexp(a, []), x)  # eager accepts [] on a 0-dim tensor
        if not ON_ACCELERATOR:  # ZERO_DIM_TOPK0
            check_vmap(lambda a: tuple(a.topk(0)), x)  # and returns the tensor as its top 0
        check_vmap(lambda a: a.sum(-1, dtype=torch.float64), x)
        check_vmap(lambda a: a.int().sum(0), x)  # int32 -> int64 through the size-1 dim


def test_unbatched_argument_and_kwargs():
    x = torch.randn(4, 2, 3)
    with no_fallback():
        check_vmap(lambda a, b: (a * b).sum(dim=-1, keepdim=True), x, x[0], in_dims=(0, None))
        check_vmap(lambda a, b: torch.softmax(a + b, dim=0), x[:, 0], x, in_dims=(None, 1))
        check_vmap(lambda a: torch.var(a, dim=[0], correction=0, keepdim=True), x, in_dims=2)


def test_outputs_keep_named_tuples():
    x = torch.randn(4, 2, 3)
    with no_fallback():
        out = torchxform.vmap(lambda a: a.max(1))(x)
    assert isinstance(out, torch.return_types.max)
    assert_close(tuple(out), tuple(loop_reference(lambda a: a.max(1), [x], 0)))


GRAD_FNS = [
    ("sum_list", lambda a: a.sum([0, -1])),
    ("amax", lambda a: a.amax(1)),
    ("max_all", lambda a: a.max()),
    ("softmax", lambda a: a.softmax(0)),
    ("log_softmax", lambda a: a.log_softmax(-1)),
    ("var", lambda a: a.var(1)),
    ("logsumexp", lambda a: torch.logsumexp(a, 0)),
    ("vector_norm", lambda a: torch.linalg.vector_norm(a, 3)),
    ("sort_values", lambda a: a.sort(0)[0]),
    ("cumsum", lambda a: a.cumsum(-1)),
    ("median", lambda a: a.median()),
    ("renorm", lambda a: a.renorm(2, 0, 0.5)),
]


@pytest.mark.parametrize("name,fn", GRAD_FNS, ids=[g[0] for g in GRAD_FNS])
def test_outputs_stay_differentiable(name, fn):
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    weight = torch.randn_like(torch.stack([fn(e) for e in x]))
    with no_fallback():
        for in_dim in (0, 2):
            leaf = x.movedim(0, in_dim).clone().requires_grad_()
            out = torchxform.vmap(fn, in_dims=in_dim)(leaf)
            (grad,) = torch.autograd.grad((out * weight).sum(), leaf)
            ref_leaf = x.clone().requires_grad_()
            ref = torch.stack([fn(e) for e in ref_leaf])
            (ref_grad,) = torch.autograd.grad((ref * weight).sum(), ref_leaf)
            assert_close(grad.movedim(in_dim, 0), ref_grad, msg=name)


# -- pairwise distances and segments: what the OpInfo samples do not reach -------------

DISTANCE_P = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, inf]


def _cdist(a, b, p):
    return torch.cdist(a, b, p=p, compute_mode="donot_use_mm_for_euclid_dist")


@pytest.mark.parametrize("p", DISTANCE_P)
def test_distance_derivatives(p):
    """cdist / pdist: the JVP against torch's reverse-mode Jacobian (torch has
    no forward formula), forward over reverse against reverse over reverse,
    and both against central differences of torch's gradient (torch has no
    double backward); vmap of pdist against a loop."""
    torch.manual_seed(0)
    x1, x2, x = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    for fn, args in [(lambda a, b: _cdist(a, b, p), (x1, x2)), (lambda a: torch.pdist(a, p), (x,))]:
        tangents = tuple(torch.randn_like(a) for a in args)
        with no_fallback():
            _, tangent = torchxform.jvp(fn, args, tangents)
        jac = torch.autograd.functional.jacobian(fn, args)
        expected = sum((j.reshape(tangent.numel(), -1) @ t.reshape(-1)).reshape(tangent.shape) for j, t in zip(jac, tangents))
        assert_close(tangent, expected, msg=f"jvp p={p}")

        def scalar(a):
            return fn(a, *args[1:]).sin().sum()

        def torch_grad(a):
            a = a.clone().requires_grad_()
            return torch.autograd.grad(scalar(a), a)[0]

        a0, eps = args[0], 1e-6
        basis = torch.eye(a0.numel(), dtype=a0.dtype).reshape(-1, *a0.shape)
        differences = torch.stack([(torch_grad(a0 + eps * e) - torch_grad(a0 - eps * e)) / (2 * eps) for e in basis], -1)
        with no_fallback():
            fwd_rev = torchxform.jacfwd(torchxform.jacrev(scalar))(a0)
            rev_rev = torchxform.jacrev(torchxform.jacrev(scalar))(a0)
        assert_close(fwd_rev, rev_rev, msg=f"forward over reverse p={p}")
        assert_close(fwd_rev, differences.reshape(fwd_rev.shape), atol=1e-4, rtol=1e-4, msg=f"second order p={p}")
    xs = torch.randn(3, 6, 3, dtype=torch.float64)
    with no_fallback():
        assert_close(torchxform.vmap(lambda a: torch.pdist(a, p))(xs), loop_reference(lambda a: torch.pdist(a, p), (xs,), 0))


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "prod"])
def test_segment_reduce_batched_lengths(reduce):
    """Per-example lengths (a batched keyword argument), and vmap of grad."""
    data = torch.randn(3, 5, 2, dtype=torch.float64)
    lengths = torch.tensor([[0, 1, 2, 2], [2, 0, 3, 0], [5, 0, 0, 0]])

    def fn(x, lens):
        return aten.segment_reduce(x, reduce, lengths=lens, axis=0, initial=1)

    def loss(x, lens):
        return fn(x, lens).sin().sum()

    with no_fallback():
        actual = torchxform.vmap(fn)(data, lengths)
        grads = torchxform.vmap(torchxform.grad(loss))(data, lengths)
    assert_close(actual, loop_reference(fn, (data, lengths), 0))
    leaves = [d.clone().requires_grad_() for d in data]
    expected = torch.stack([torch.autograd.grad(loss(d, lens), d)[0] for d, lens in zip(leaves, lengths)])
    assert_close(grads, expected)
