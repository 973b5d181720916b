"""Batching rules of the neural-network family (convolution, pooling,
normalization, losses, padding and resampling, attention) against a Python
loop over the batch."""

import pytest
import torch
import torch.nn.functional as F

import torchxform
from tests.harness import (
    check_autograd_through_vmap,
    assert_close,
    check_vmap,
    check_vmap_sampled,
    cpu_reference,
    loop_reference,
    no_fallback,
    skip_cpu_reference_rows,
)

aten = torch.ops.aten


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These ops are tiny: with other processes on the machine, intra-op
    threads only contend (5x slower here).  Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FLOATS = [torch.float32, torch.float64]
SOME_DIMS = (0, None)  # for rows with many tensor arguments: 2**n - 1 combinations


# -- argument specs: a shape draws randn; these draw from an op's domain ------------


def positive(*shape):
    return lambda dtype: torch.rand(shape, dtype=dtype) + 0.5


def prob(*shape):
    return lambda dtype: torch.rand(shape, dtype=dtype) * 0.9 + 0.05


def sign(*shape):
    return lambda dtype: torch.randint(0, 2, shape).to(dtype) * 2 - 1


def index(high, *shape):
    return lambda dtype: torch.randint(0, high, shape)


def log_probs(*shape):
    return lambda dtype: torch.randn(shape, dtype=dtype).log_softmax(1 if len(shape) > 1 else 0)


def sampler(dtype, specs):
    def sample():
        return tuple(s(dtype) if callable(s) else torch.randn(s, dtype=dtype) for s in specs)

    return sample


# -- convolution ------------------------------------------------------------------

# (name, fn(x, w, b), (x, w, b) specs)
CONV = [
    ("conv1d", lambda x, w, b: F.conv1d(x, w, b), [(2, 4, 7), (6, 4, 3), (6,)]),
    (
        "conv1d_stride_pad_dil",
        lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=2, dilation=2),
        [(2, 4, 9), (6, 4, 3), (6,)],
    ),
    ("conv1d_same", lambda x, w, b: F.conv1d(x, w, b, padding="same", dilation=2), [(1, 4, 7), (3, 4, 4), (3,)]),
    ("conv1d_no_n", lambda x, w, b: F.conv1d(x, w, b, padding=1), [(4, 7), (6, 4, 3), (6,)]),
    ("conv2d", lambda x, w, b: F.conv2d(x, w, b, padding=(1, 0)), [(2, 4, 6, 5), (6, 4, 3, 2), (6,)]),
    ("conv2d_groups", lambda x, w, b: F.conv2d(x, w, b, stride=2, groups=2), [(2, 4, 6, 5), (6, 2, 3, 3), (6,)]),
    (
        "conv2d_depthwise",
        lambda x, w, b: F.conv2d(x, w, b, padding="same", groups=4),
        [(1, 4, 5, 5), (8, 1, 3, 3), (8,)],
    ),
    ("conv2d_valid_no_bias", lambda x, w: F.conv2d(x, w, padding="valid"), [(2, 3, 5, 5), (2, 3, 2, 2)]),
    ("conv2d_no_n", lambda x, w, b: F.conv2d(x, w, b, groups=2), [(4, 6, 5), (6, 2, 3, 3), (6,)]),
    (
        "conv3d",
        lambda x, w, b: F.conv3d(x, w, b, stride=(1, 2, 1), padding=1),
        [(2, 2, 4, 4, 3), (4, 2, 2, 3, 2), (4,)],
    ),
    (
        "conv_transpose1d",
        lambda x, w, b: F.conv_transpose1d(x, w, b, stride=2, output_padding=1),
        [(2, 4, 5), (4, 3, 3), (3,)],
    ),
    (
        "conv_transpose2d_groups",
        lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1, groups=2, dilation=2),
        [(2, 4, 4, 5), (4, 3, 3, 2), (6,)],
    ),
    (
        "conv_transpose2d_no_n",
        lambda x, w, b: F.conv_transpose2d(x, w, b, stride=(2, 1)),
        [(4, 3, 3), (4, 2, 3, 3), (2,)],
    ),
    (
        "conv_transpose3d",
        lambda x, w, b: F.conv_transpose3d(x, w, b, stride=2),
        [(1, 2, 3, 2, 3), (2, 2, 2, 2, 2), (2,)],
    ),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name,fn,specs", CONV, ids=[r[0] for r in CONV])
def test_convolution(name, fn, specs, dtype):
    with no_fallback():
        check_vmap_sampled(fn, sampler(dtype, specs), msg=name)


def _conv_backward(stride, padding, dilation, transposed, output_padding, groups, mask, bias=True):
    def fn(grad_output, x, w):
        out_channels = w.shape[1] * groups if transposed else w.shape[0]
        bias_sizes = [out_channels] if bias else None
        grads = aten.convolution_backward.default(
            grad_output, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask
        )
        assert [g is not None for g in grads] == [m and (i < 2 or bias) for i, m in enumerate(mask)]
        return tuple(g for g in grads if g is not None)  # the loop reference cannot stack None

    return fn


# (name, fn(grad_output, x, w), specs)
CONV_BACKWARD = [
    (
        "all",
        _conv_backward([1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True]),
        [(2, 6, 5, 4), (2, 4, 5, 4), (6, 4, 3, 3)],
    ),
    (
        "input_only",
        _conv_backward([2], [0], [1], False, [0], 1, [True, False, False]),
        [(2, 6, 3), (2, 4, 7), (6, 4, 3)],
    ),
    (
        "weight_bias",
        _conv_backward([1, 2], [0, 1], [1, 1], False, [0, 0], 2, [False, True, True]),
        [(2, 6, 3, 2), (2, 4, 5, 4), (6, 2, 3, 3)],
    ),
    (
        "no_bias",
        _conv_backward([1], [1], [2], False, [0], 1, [True, True, False], bias=False),
        [(2, 3, 3), (2, 4, 5), (3, 4, 3)],
    ),
    (
        "transposed",
        _conv_backward([2, 2], [1, 0], [1, 1], True, [1, 0], 2, [True, True, True]),
        [(2, 6, 8, 7), (2, 4, 4, 3), (4, 3, 3, 3)],
    ),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name,fn,specs", CONV_BACKWARD, ids=[r[0] for r in CONV_BACKWARD])
def test_convolution_backward(name, fn, specs, dtype):
    with no_fallback():
        check_vmap_sampled(fn, sampler(dtype, specs), msg=name)


def test_convolution_backward_matches_autograd():
    # The per-example gradients of an ensemble: one conv per (input, weight) pair.
    x, w, b = torch.randn(3, 2, 4, 6, 6), torch.randn(3, 5, 4, 3, 3), torch.randn(3, 5)
    go = torch.randn(3, 2, 5, 4, 4)
    fn = _conv_backward([1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, True])
    with no_fallback():
        gi, gw, gb = torchxform.vmap(fn)(go, x, w)
    for i in range(3):
        xi, wi, bi = (t[i].clone().requires_grad_() for t in (x, w, b))
        expected = torch.autograd.grad(F.conv2d(xi, wi, bi), (xi, wi, bi), go[i])
        assert_close((gi[i], gw[i], gb[i]), expected)


def test_convolution_errors_match_eager():
    x, w = torch.randn(3, 2, 4, 5, 5), torch.randn(6, 3, 3, 3)  # 4 input channels, weight wants 3
    with pytest.raises(RuntimeError) as eager:
        F.conv2d(x[0], w)
    with pytest.raises(RuntimeError) as batched:
        torchxform.vmap(F.conv2d, (0, None))(x, w)
    assert str(batched.value) == str(eager.value)
    with pytest.raises(RuntimeError) as batched:  # the batched-weight path
        torchxform.vmap(F.conv2d, (None, 0))(x[0], w.expand(3, *w.shape))
    assert str(batched.value) == str(eager.value)
    with pytest.raises(RuntimeError, match="Expected 4-dimensional input"):  # logical [5, 5]
        torchxform.vmap(lambda a: aten.convolution(a, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1))(x[:, 0, 0])


# -- pooling ------------------------------------------------------------------------

POOL = [
    ("max_pool1d", lambda x: F.max_pool1d(x, 3, stride=2, padding=1), [(2, 3, 8)]),
    ("max_pool1d_no_n", lambda x: F.max_pool1d(x, 2, return_indices=True), [(3, 8)]),
    ("max_pool2d", lambda x: F.max_pool2d(x, (3, 2), stride=2, ceil_mode=True), [(2, 3, 7, 6)]),
    ("max_pool2d_indices_dilation", lambda x: F.max_pool2d(x, 2, dilation=2, return_indices=True), [(2, 3, 7, 6)]),
    ("max_pool2d_no_n", lambda x: F.max_pool2d(x, 2, return_indices=True), [(3, 4, 4)]),
    ("max_pool3d", lambda x: F.max_pool3d(x, 2, stride=1, return_indices=True), [(1, 2, 4, 3, 4)]),
    ("max_pool3d_no_n", lambda x: F.max_pool3d(x, 2), [(2, 4, 4, 4)]),
    ("avg_pool1d", lambda x: F.avg_pool1d(x, 3, padding=1, count_include_pad=False), [(2, 3, 8)]),
    ("avg_pool2d", lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True), [(2, 3, 7, 6)]),
    ("avg_pool2d_divisor_no_n", lambda x: F.avg_pool2d(x, 2, divisor_override=3), [(3, 4, 4)]),
    ("avg_pool3d", lambda x: F.avg_pool3d(x, 2, count_include_pad=False, padding=1), [(1, 2, 4, 3, 4)]),
    ("adaptive_avg_pool1d", lambda x: F.adaptive_avg_pool1d(x, 3), [(2, 3, 8)]),
    ("adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, (3, 2)), [(2, 3, 7, 6)]),
    ("adaptive_avg_pool2d_no_n", lambda x: F.adaptive_avg_pool2d(x, 3), [(3, 5, 5)]),
    ("adaptive_avg_pool3d", lambda x: F.adaptive_avg_pool3d(x, 2), [(1, 2, 4, 3, 4)]),
    ("adaptive_max_pool1d", lambda x: F.adaptive_max_pool1d(x, 3, return_indices=True), [(2, 3, 8)]),
    ("adaptive_max_pool2d", lambda x: F.adaptive_max_pool2d(x, (3, 2), return_indices=True), [(2, 3, 7, 6)]),
    ("adaptive_max_pool3d_no_n", lambda x: F.adaptive_max_pool3d(x, 2, return_indices=True), [(2, 4, 3, 4)]),
    ("lp_pool2d", lambda x: F.lp_pool2d(x, 2, 2), [(2, 3, 4, 4)]),
]


def _max_pool2d_backward(go, x):
    indices = F.max_pool2d(x, 2, stride=1, return_indices=True)[1]
    return aten.max_pool2d_with_indices_backward(go, x, [2, 2], [1, 1], [0, 0], [1, 1], False, indices)


def _adaptive_max_pool3d_backward(go, x):
    return aten.adaptive_max_pool3d_backward(go, x, F.adaptive_max_pool3d(x, 2, return_indices=True)[1])


POOL_BACKWARD = [
    (
        "avg_pool2d_backward",
        lambda go, x: aten.avg_pool2d_backward(go, x, [2, 2], [2, 2], [1, 1], False, True, None),
        [(2, 3, 3, 3), (2, 3, 4, 4)],
    ),
    (
        "avg_pool3d_backward_no_n",
        lambda go, x: aten.avg_pool3d_backward(go, x, [2, 2, 2], [2, 2, 2], [0, 0, 0], False, True, 3),
        [(3, 2, 1, 2), (3, 4, 3, 4)],
    ),
    ("max_pool2d_backward", _max_pool2d_backward, [(2, 3, 3, 3), (2, 3, 4, 4)]),
    (
        "adaptive_avg_pool2d_backward",
        lambda go, x: aten._adaptive_avg_pool2d_backward(go, x),
        [(2, 3, 2, 3), (2, 3, 5, 5)],
    ),
    ("adaptive_max_pool3d_backward", _adaptive_max_pool3d_backward, [(1, 2, 2, 2, 2), (1, 2, 4, 3, 4)]),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name,fn,specs", POOL + POOL_BACKWARD, ids=[r[0] for r in POOL + POOL_BACKWARD])
def test_pooling(name, fn, specs, dtype):
    with no_fallback():
        check_vmap_sampled(fn, sampler(dtype, specs), msg=name)


@pytest.mark.parametrize(
    "fn,shape",
    [
        (lambda x: aten.max_pool1d(x, [2]), (2, 3, 5)),
        (lambda x: aten.max_pool1d_with_indices(x, [2], [1]), (3, 5)),
        (lambda x: aten.max_pool2d(x, [2, 2], [1, 2], [1, 0]), (2, 3, 4, 5)),
        (lambda x: aten.max_pool3d(x, [2, 1, 2]), (2, 3, 4, 5)),
        (lambda x: aten.convolution(x, torch.ones(2, 3, 2, 2), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
         (2, 3, 4, 5)),
        (lambda x: aten._convolution(x, torch.ones(2, 3, 2), None, [1], [0], [1], False, [0], 1, *[True] * 4),
         (1, 3, 4)),
        (lambda x: aten.native_channel_shuffle(x, 3), (2, 6, 2)),
    ],
)
def test_composite_forms_inside_rules(fn, shape):
    # CompositeImplicit ops decompose above dispatch in user code; a rule
    # runs below autograd, where they arrive whole.
    with no_fallback(), torch._C._AutoDispatchBelowAutograd():
        check_vmap_sampled(fn, lambda: (torch.randn(shape),), nested=False)


@pytest.mark.parametrize(
    "fn,shape",
    [
        (lambda x: F.max_pool2d(x, 2), (4, 4)),  # logical 2-d: the batch must not pass for C
        (lambda x: F.avg_pool2d(x, 2), (2, 3, 4, 4, 4)),
        (lambda x: F.interpolate(x, scale_factor=2.0), (3, 4)),  # upsampling has no form without N
        (lambda x: aten.upsample_nearest2d(x, [4, 4]), (3, 4, 4)),
        (lambda x: F.pad(x, (1, 1), mode="reflect"), (4,)),
        (lambda x: F.pixel_shuffle(x, 2), (4, 4)),
        (lambda x: aten.native_layer_norm(x, [3, 4], None, None, 1e-5), (4,)),
    ],
)
def test_bad_logical_rank_raises_like_eager(fn, shape):
    x = torch.randn(shape)
    with pytest.raises(Exception) as eager:
        fn(x)
    with pytest.raises(type(eager.value)) as batched:
        torchxform.vmap(fn)(torch.randn((4,) + shape))
    assert str(batched.value) == str(eager.value)


# -- normalization -------------------------------------------------------------------

NORM = [
    (
        "batch_norm_eval",
        lambda x, m, v, w, b: F.batch_norm(x, m, v, w, b, training=False, eps=1e-3),
        [(2, 3, 4), (3,), positive(3), (3,), (3,)],
    ),
    ("batch_norm_eval_2d_no_affine", lambda x, m, v: F.batch_norm(x, m, v), [(4, 3), (3,), positive(3)]),
    (
        "batch_norm_train_no_stats",
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
        [(3, 2, 3, 2), (2,), (2,)],
    ),
    ("instance_norm", lambda x, w, b: F.instance_norm(x, weight=w, bias=b), [(2, 3, 5), (3,), (3,)]),
    ("instance_norm_2d", lambda x: F.instance_norm(x), [(2, 3, 4, 3)]),
    (
        "instance_norm_eval_stats",
        lambda x, m, v: F.instance_norm(x, m, v, use_input_stats=False),
        [(2, 3, 5), (3,), positive(3)],
    ),
    ("layer_norm", lambda x, w, b: F.layer_norm(x, (4,), w, b), [(2, 3, 4), (4,), (4,)]),
    ("layer_norm_two_dims", lambda x, w, b: F.layer_norm(x, (3, 4), w, b, eps=1e-3), [(2, 3, 4), (3, 4), (3, 4)]),
    ("layer_norm_1d_weight_only", lambda x, w: F.layer_norm(x, (5,), w), [(5,), (5,)]),
    ("layer_norm_bias_only", lambda x, b: F.layer_norm(x, (4,), None, b), [(3, 4), (4,)]),
    ("group_norm", lambda x, w, b: F.group_norm(x, 2, w, b), [(2, 4, 3), (4,), (4,)]),
    ("group_norm_2d_spatial", lambda x, w: F.group_norm(x, 4, w), [(2, 4, 3, 3), (4,)]),
    ("group_norm_no_spatial", lambda x: F.group_norm(x, 2), [(3, 4)]),
    ("native_layer_norm_stats", lambda x, w: aten.native_layer_norm(x, [4], w, None, 1e-5), [(2, 3, 4), (4,)]),
    # eager native_group_norm wants a contiguous input, and reads a strided bias wrongly
    # (torch 2.13); the loop's examples are strided views: give it contiguous copies
    (
        "native_group_norm_stats",
        lambda x, b: aten.native_group_norm(x.contiguous(), None, b.contiguous(), 2, 4, 3, 2, 1e-5),
        [(2, 4, 3), (4,)],
    ),
    ("native_group_norm_1d", lambda x: aten.native_group_norm(x.contiguous(), None, None, 1, 4, 1, 2, 1e-5), [(4,)]),
    (
        "native_batch_norm_train_no_stats",
        lambda x, w: aten.native_batch_norm(x, w, None, None, None, True, 0.1, 1e-5),
        [(3, 2, 4), (2,)],
    ),
    (
        "legit_no_stats",
        lambda x, b: aten._native_batch_norm_legit.no_stats(x, None, b, True, 0.1, 1e-5),
        [(3, 2, 4), (2,)],
    ),
    (
        "legit_eval",
        lambda x, m, v: aten._native_batch_norm_legit(x, None, None, m, v, False, 0.1, 1e-5),
        [(3, 2, 4), (2,), positive(2)],
    ),
    (
        "legit_no_training",
        lambda x, w, m, v: aten._native_batch_norm_legit_no_training(x, w, None, m, v, 0.1, 1e-5),
        [(3, 2, 4), (2,), (2,), positive(2)],
    ),
    (
        "legit_functional_train",
        lambda x, m, v: aten._native_batch_norm_legit_functional(x, None, None, m, v, True, 0.1, 1e-5),
        [(3, 2, 4), (2,), positive(2)],
    ),
    (
        "legit_functional_eval",
        lambda x, w, m, v: aten._native_batch_norm_legit_functional(x, w, None, m, v, False, 0.1, 1e-5),
        [(3, 2, 4), (2,), (2,), positive(2)],
    ),
    (  # the reserve buffer left out
        "no_update",
        lambda x, w, m, v: aten._batch_norm_no_update(x, w, None, m, v, 0.1, 1e-5)[:3],
        [(3, 2, 4), (2,), (2,), positive(2)],
    ),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name,fn,specs", NORM, ids=[r[0] for r in NORM])
def test_normalization(name, fn, specs, dtype):
    skip_cpu_reference_rows(name, {"no_update": "aten._batch_norm_no_update runs only batch_norm_cpu"})
    with no_fallback():
        check_vmap_sampled(fn, sampler(dtype, specs), dims=(0, -1, None) if len(specs) < 4 else SOME_DIMS, msg=name)


def _batch_norm_with_update(x, m, v):  # the reserve buffer left out
    return aten._batch_norm_with_update(x, None, None, m, v, 0.3, 1e-5)[:3]


@pytest.mark.parametrize("in_dims", [(0, 0, 0), (0, 1, 1), (1, 0, 0), (None, 0, 0)])
@pytest.mark.parametrize("op", ["batch_norm", "with_update"])
def test_batch_norm_training_updates_batched_running_stats(in_dims, op):
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    x = x.movedim(0, 1) if in_dims[0] == 1 else (x[0] if in_dims[0] is None else x)
    mean, var = torch.randn(3, 2, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64) + 0.5
    if in_dims[1] == 1:
        mean, var = mean.t().contiguous(), var.t().contiguous()

    def fn(x, m, v):
        if op == "with_update":
            return _batch_norm_with_update(x, m, v)
        return F.batch_norm(x, m, v, training=True, momentum=0.3)

    stats = (mean.clone(), var.clone())
    expected = loop_reference(fn, (x,) + stats, in_dims)
    batched_stats = (mean.clone(), var.clone())
    with no_fallback():
        actual = torchxform.vmap(fn, in_dims)(x, *batched_stats)
    assert_close(actual, expected)
    assert_close(batched_stats, stats, msg="running stats")  # updated in place, per example


def test_batch_norm_training_running_stats_nested():
    x = torch.randn(2, 3, 4, 2, 5)
    mean, var = torch.randn(2, 3, 2), torch.rand(2, 3, 2) + 0.5

    def fn(x, m, v):
        return F.batch_norm(x, m, v, training=True, momentum=0.3)

    stats = (mean.clone(), var.clone())
    expected = loop_reference(lambda *a: loop_reference(fn, a, 0), (x,) + stats, 0)
    batched_stats = (mean.clone(), var.clone())
    with no_fallback():
        actual = torchxform.vmap(torchxform.vmap(fn))(x, *batched_stats)
    assert_close(actual, expected)
    assert_close(batched_stats, stats, msg="running stats")


def test_batch_norm_training_with_unbatched_running_stats_raises():
    x = torch.randn(3, 4, 2, 5)
    with pytest.raises(RuntimeError, match="Batch norm got a batched tensor as input while the running_mean"):
        torchxform.vmap(lambda x: F.batch_norm(x, torch.zeros(2), torch.ones(2), training=True))(x)
    with pytest.raises(RuntimeError, match="replace_all_batch_norm_modules_"):
        torchxform.vmap(lambda x: F.batch_norm(x, torch.zeros(2), torch.ones(2), training=True))(x)


def test_batch_norm_training_batched_weight_shared_input():
    # Only the affine parameters differ: the output is per example; the
    # running statistics are updated once (torch.func does the same; a loop
    # would update them once per example).
    x, w = torch.randn(4, 2, 5), torch.randn(3, 2)
    mean, var = torch.zeros(2), torch.ones(2)
    with no_fallback():
        out = torchxform.vmap(lambda w: F.batch_norm(x, mean, var, w, None, training=True, momentum=0.5))(w)
    ref_mean, ref_var = torch.zeros(2), torch.ones(2)
    normalized = F.batch_norm(x, ref_mean, ref_var, None, None, training=True, momentum=0.5)
    assert_close(out, normalized * w[:, None, :, None])
    assert_close((mean, var), (ref_mean, ref_var))


# -- losses -----------------------------------------------------------------------------

REDUCTIONS = ["none", "mean", "sum"]


def _loss_rows(reduction):
    r = reduction
    return [
        ("nll", lambda x, t: F.nll_loss(x, t, reduction=r), [log_probs(4, 5), index(5, 4)]),
        ("nll_weight", lambda x, t, w: F.nll_loss(x, t, w, reduction=r), [log_probs(4, 5), index(5, 4), positive(5)]),
        (
            "nll_ignore",
            lambda x, t, w: F.nll_loss(x, t, w, ignore_index=1, reduction=r),
            [log_probs(6, 3), index(3, 6), positive(3)],
        ),
        ("nll_no_n", lambda x, t: F.nll_loss(x, t, ignore_index=0, reduction=r), [log_probs(5), index(5)]),
        (
            "nll2d",
            lambda x, t, w: F.nll_loss(x, t, w, ignore_index=2, reduction=r),
            [log_probs(2, 3, 2, 2), index(3, 2, 2, 2), positive(3)],
        ),
        ("cross_entropy", lambda x, t: F.cross_entropy(x, t, reduction=r), [(4, 5), index(5, 4)]),
        (
            "cross_entropy_probs",
            lambda x, p: F.cross_entropy(x, p.softmax(-1), label_smoothing=0.1, reduction=r),
            [(4, 5), (4, 5)],
        ),
        ("cross_entropy_2d", lambda x, t: F.cross_entropy(x, t, reduction=r), [(2, 3, 2, 2), index(3, 2, 2, 2)]),
        ("bce", lambda x, t, w: F.binary_cross_entropy(x, t, w, reduction=r), [prob(2, 3), prob(2, 3), positive(3)]),
        ("bce_0dim", lambda x, t: F.binary_cross_entropy(x, t, reduction=r), [prob(), prob()]),
        (
            "bce_with_logits",
            lambda x, t, w, pw: F.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw, reduction=r),
            [(2, 3), prob(2, 3), positive(2, 1), positive(3)],
        ),
        ("mse", lambda x, t: F.mse_loss(x, t, reduction=r), [(2, 3), (2, 3)]),
        ("mse_0dim", lambda x, t: F.mse_loss(x, t, reduction=r), [(), ()]),
        ("l1", lambda x, t: F.l1_loss(x, t, reduction=r), [(2, 3), (2, 3)]),
        ("smooth_l1", lambda x, t: F.smooth_l1_loss(x, t, reduction=r, beta=0.5), [(2, 3), (2, 3)]),
        ("huber", lambda x, t: F.huber_loss(x, t, reduction=r, delta=0.7), [(4,), (4,)]),
        ("soft_margin", lambda x, t: F.soft_margin_loss(x, t, reduction=r), [(2, 3), sign(2, 3)]),
        ("kl_div", lambda x, t: F.kl_div(x, t, reduction=r), [log_probs(3, 4), prob(3, 4)]),
        (
            "kl_div_batchmean",
            lambda x, t: F.kl_div(x, t, reduction="batchmean" if r == "mean" else r),
            [log_probs(3, 4), prob(3, 4)],
        ),
        (
            "kl_div_log_target",
            lambda x, t: F.kl_div(x, t, reduction=r, log_target=True),
            [log_probs(3, 4), log_probs(3, 4)],
        ),
        ("multi_margin", lambda x, t: F.multi_margin_loss(x, t, reduction=r), [(4, 5), index(5, 4)]),
        (
            "multi_margin_p2_weight",
            lambda x, t, w: F.multi_margin_loss(x, t, p=2, margin=0.5, weight=w, reduction=r),
            [(4, 5), index(5, 4), positive(5)],
        ),
        (
            "multi_margin_no_n",
            lambda x, t, w: F.multi_margin_loss(x, t, weight=w, reduction=r),
            [(5,), index(5), positive(5)],
        ),
        (
            "multilabel_margin",
            lambda x, t: F.multilabel_margin_loss(x, t, reduction=r),
            [(3, 4), lambda d: _multilabel(3, 4)],
        ),
        (
            "multilabel_margin_no_n",
            lambda x, t: F.multilabel_margin_loss(x, t, reduction=r),
            [(4,), lambda d: _multilabel(1, 4)[0]],
        ),
    ]


def _multilabel(n, c):
    """Targets: class indices, ended by -1 where fewer than c labels apply."""
    target = torch.randint(0, c, (n, c))
    target[torch.rand(n, c) < 0.3] = -1
    return target


_LOSS_NAMES = [row[0] for row in _loss_rows("none")]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("row", range(len(_LOSS_NAMES)), ids=_LOSS_NAMES)
def test_loss(row, reduction, dtype):
    name, fn, specs = _loss_rows(reduction)[row]
    with no_fallback():
        check_vmap_sampled(fn, sampler(dtype, specs), dims=(0, -1, None) if len(specs) < 4 else SOME_DIMS, msg=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_label_smoothing_with_class_targets(reduction):
    def fn(x, t, w):
        return F.cross_entropy(x, t, w, ignore_index=0, label_smoothing=0.2, reduction=reduction)

    x, t, w = torch.randn(3, 4, 5), torch.randint(0, 5, (3, 4)), torch.rand(3, 5) + 0.5
    with no_fallback():
        for in_dims in [(0, 0, 0), (0, None, None), (0, 0, None), (1, None, 0), (0, 1, None)]:
            args = [a.movedim(0, d) if d is not None else a[0] for a, d in zip((x, t, w), in_dims)]
            check_vmap(fn, *args, in_dims=in_dims)
    # The composite smooths in place into a tensor derived from the input
    # (masked_fill_): an unbatched input with batched targets cannot be
    # batched, and torch.func raises the same way.
    with pytest.raises(RuntimeError, match="in-place"):
        torchxform.vmap(fn, (None, 0, None))(x[0], t, w[0])


def test_nll_loss_mean_with_every_target_ignored_is_nan():
    x = torch.randn(3, 4, 5).log_softmax(-1)
    t = torch.randint(0, 5, (3, 4))
    t[1] = 2  # example 1 has only ignored targets: 0 / 0
    with no_fallback():
        out = check_vmap(lambda x, t: F.nll_loss(x, t, ignore_index=2), x, t)
    assert out[1].isnan() and not out[0].isnan()


def test_nll_loss_total_weight_output():
    x, t, w = torch.randn(3, 4, 5).log_softmax(-1), torch.randint(0, 5, (3, 4)), torch.rand(3, 5)
    with no_fallback():
        for reduction in (0, 1, 2):
            check_vmap(lambda x, t, w: aten.nll_loss_forward(x, t, w, reduction, 3), x, t, w)


# -- padding and resampling --------------------------------------------------------------

RESAMPLE = [
    ("pad_constant", lambda x: F.pad(x, (1, 2), value=0.5), [(2, 3, 4)]),
    ("pad_constant_negative", lambda x: F.pad(x, (1, -1, 0, 2)), [(2, 3, 4)]),
    ("pad_constant_all_dims", lambda x: F.pad(x, (1, 1, 2, 0)), [(2, 3)]),
    ("pad_reflect1d", lambda x: F.pad(x, (2, 1), mode="reflect"), [(2, 3, 4)]),
    ("pad_reflect1d_no_n", lambda x: F.pad(x, (2, 1), mode="reflect"), [(3, 4)]),
    ("pad_reflect2d", lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect"), [(2, 3, 4, 4)]),
    ("pad_reflect3d", lambda x: F.pad(x, (1, 1, 1, 0, 0, 1), mode="reflect"), [(2, 3, 3, 3)]),
    ("pad_replicate1d", lambda x: F.pad(x, (2, 1), mode="replicate"), [(2, 3, 4)]),
    ("pad_replicate2d", lambda x: F.pad(x, (1, 2, 0, 3), mode="replicate"), [(3, 4, 4)]),
    ("pad_replicate3d", lambda x: F.pad(x, (1, 1, 1, 0, 0, 1), mode="replicate"), [(1, 2, 3, 3, 3)]),
    ("pad_circular", lambda x: F.pad(x, (1, 2, 1, 0), mode="circular"), [(2, 3, 4, 4)]),
    ("nearest1d", lambda x: F.interpolate(x, scale_factor=2.0), [(2, 3, 4)]),
    ("nearest2d_size", lambda x: F.interpolate(x, size=(5, 7)), [(2, 3, 4, 4)]),
    ("nearest3d", lambda x: F.interpolate(x, scale_factor=(1.5, 2.0, 1.0)), [(1, 2, 3, 3, 2)]),
    ("nearest_exact2d", lambda x: F.interpolate(x, scale_factor=1.7, mode="nearest-exact"), [(2, 3, 4, 4)]),
    ("linear1d", lambda x: F.interpolate(x, size=7, mode="linear"), [(2, 3, 4)]),
    ("bilinear", lambda x: F.interpolate(x, scale_factor=2.0, mode="bilinear"), [(2, 3, 4, 4)]),
    ("bilinear_align", lambda x: F.interpolate(x, size=(5, 3), mode="bilinear", align_corners=True), [(2, 3, 4, 4)]),
    ("bilinear_antialias", lambda x: F.interpolate(x, size=(3, 2), mode="bilinear", antialias=True), [(2, 3, 5, 5)]),
    ("bicubic", lambda x: F.interpolate(x, scale_factor=1.5, mode="bicubic"), [(2, 3, 4, 4)]),
    ("bicubic_antialias", lambda x: F.interpolate(x, size=(3, 3), mode="bicubic", antialias=True), [(1, 2, 5, 5)]),
    (
        "trilinear",
        lambda x: F.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=True),
        [(1, 2, 3, 2, 3)],
    ),
    ("area", lambda x: F.interpolate(x, size=(2, 3), mode="area"), [(2, 3, 4, 6)]),
    ("upsample_nearest2d_vec", lambda x: aten.upsample_nearest2d.vec(x, None, [2.0, 1.5]), [(2, 3, 4, 4)]),
    ("upsample_bilinear2d_vec", lambda x: aten.upsample_bilinear2d.vec(x, [5, 6], False, None), [(2, 3, 4, 4)]),
    ("pixel_shuffle", lambda x: F.pixel_shuffle(x, 2), [(2, 8, 3, 3)]),
    ("pixel_shuffle_no_n", lambda x: F.pixel_shuffle(x, 2), [(4, 3, 2)]),
    ("pixel_shuffle_more_dims", lambda x: F.pixel_shuffle(x, 2), [(2, 1, 4, 3, 2)]),
    ("pixel_unshuffle", lambda x: F.pixel_unshuffle(x, 2), [(2, 2, 4, 6)]),
    ("channel_shuffle", lambda x: F.channel_shuffle(x, 2), [(2, 4, 3, 3)]),
    ("channel_shuffle_1d", lambda x: torch.nn.ChannelShuffle(3)(x), [(2, 6, 3)]),
    ("unfold", lambda x: F.unfold(x, (2, 3), dilation=1, padding=1, stride=2), [(2, 3, 4, 5)]),
    ("unfold_no_n", lambda x: F.unfold(x, 2), [(3, 4, 4)]),
    ("fold", lambda x: F.fold(x, (4, 5), (2, 2), padding=1, stride=2), [(2, 12, 9)]),
    ("fold_no_n", lambda x: F.fold(x, (3, 3), 2), [(8, 4)]),
    ("glu", lambda x: F.glu(x), [(2, 4)]),
    ("glu_dim0", lambda x: F.glu(x, 0), [(4, 3)]),
    ("prelu", lambda x, w: F.prelu(x, w), [(2, 3, 4), (3,)]),
    ("prelu_shared", lambda x, w: F.prelu(x, w), [(2, 3), (1,)]),
    ("grid_sample", lambda x, g: F.grid_sample(x, g, align_corners=False), [(2, 3, 4, 5), (2, 3, 2, 2)]),
    (
        "grid_sample_nearest_border",
        lambda x, g: F.grid_sample(x, g * 1.2, mode="nearest", padding_mode="border", align_corners=True),
        [(1, 2, 4, 4), (1, 3, 3, 2)],
    ),
    (
        "grid_sample_3d",
        lambda x, g: F.grid_sample(x, g, padding_mode="reflection", align_corners=False),
        [(1, 2, 3, 4, 3), (1, 2, 2, 3, 3)],
    ),
    ("affine_grid", lambda t: F.affine_grid(t, [2, 3, 4, 5], align_corners=False), [(2, 2, 3)]),
    ("affine_grid_3d", lambda t: F.affine_grid(t, [1, 3, 2, 3, 4], align_corners=True), [(1, 3, 4)]),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name,fn,specs", RESAMPLE, ids=[r[0] for r in RESAMPLE])
def test_padding_and_resampling(name, fn, specs, dtype):
    with no_fallback():
        check_vmap_sampled(fn, sampler(dtype, specs), msg=name)


# -- attention ----------------------------------------------------------------------------

ATTENTION = [
    # (name, kwargs (made in the test))
    ("plain", lambda: dict()),
    ("causal", lambda: dict(is_causal=True)),
    ("scale", lambda: dict(scale=0.3)),
    ("mask_2d", lambda: dict(attn_mask=torch.randn(4, 5))),
    ("mask_row_broadcast", lambda: dict(attn_mask=torch.randn(1, 5))),
    ("mask_per_n", lambda: dict(attn_mask=torch.randn(2, 1, 4, 5))),
    ("bool_mask", lambda: dict(attn_mask=torch.rand(4, 5) > 0.3)),
]


def _attention_sample(dtype):
    def sample():
        return tuple(torch.randn(shape, dtype=dtype) for shape in [(2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 5, 8)])

    return sample


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name,kwargs", ATTENTION, ids=[r[0] for r in ATTENTION])
def test_scaled_dot_product_attention(name, kwargs, dtype):
    kwargs = kwargs()
    kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    with no_fallback():
        check_vmap_sampled(fn, _attention_sample(dtype), dims=(0, None), msg=name)


def test_attention_nested():
    q, k = torch.randn(2, 3, 1, 2, 4, 8), torch.randn(2, 3, 1, 2, 5, 8)
    fn = torchxform.vmap(lambda q, k: F.scaled_dot_product_attention(q, k, k, is_causal=True))
    with no_fallback():
        check_vmap(fn, q, k)
        check_vmap(torchxform.vmap(fn, (0, None)), q, k[0, 0], in_dims=(0, None))


@cpu_reference("aten._scaled_dot_product_flash_attention_for_cpu(_backward) has only a CPU kernel")
@pytest.mark.parametrize("name,kwargs", [r for r in ATTENTION if r[0] in ("plain", "causal", "mask_per_n")])
def test_scaled_dot_product_attention_backward(name, kwargs):
    forward = aten._scaled_dot_product_flash_attention_for_cpu.default
    backward = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    kwargs = kwargs()
    causal = kwargs.get("is_causal", False)
    mask = {"attn_mask": kwargs["attn_mask"].double()} if "attn_mask" in kwargs else {}

    def fn(grad_out, q, kv):
        out, lse = forward(q, kv, kv, 0.0, causal, **mask)
        return backward(grad_out, q, kv, kv, out, lse, 0.0, causal, **mask)

    def sample():
        return torch.randn(2, 3, 4, 8).double(), torch.randn(2, 3, 4, 8).double(), torch.randn(2, 3, 5, 8).double()

    with no_fallback():
        check_vmap_sampled(fn, sample, dims=(0, None), msg=name)


@cpu_reference("aten._scaled_dot_product_flash_attention_for_cpu has only a CPU kernel")
def test_attention_dropout_is_random():
    # The CPU kernel is tagged random for its dropout: with dropout_p > 0
    # vmap's randomness='error' applies (and then the kernel's own error).
    q = torch.randn(3, 1, 2, 4, 8)
    op = aten._scaled_dot_product_flash_attention_for_cpu.default
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torchxform.vmap(lambda q: op(q, q, q, 0.5))(q)
    with pytest.raises(RuntimeError, match="dropout"):
        torchxform.vmap(lambda q: op(q, q, q, 0.5), randomness="different")(q)


def test_attention_batched_mask():
    q, mask = torch.randn(3, 2, 3, 4, 8), torch.randn(3, 4, 4)
    k = torch.randn(2, 3, 4, 8)
    with no_fallback():
        check_vmap(lambda q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m), q, mask)
        check_vmap(lambda m: F.scaled_dot_product_attention(k, k, k, attn_mask=m), mask)
        check_vmap(lambda q, m: F.scaled_dot_product_attention(q, k, k, attn_mask=m), q, mask, in_dims=(0, None))
        bool_mask = torch.rand(3, 2, 1, 4, 4) > 0.3
        check_vmap(lambda q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m), q, bool_mask, in_dims=(0, 0))


# -- outputs stay differentiable by torch.autograd through the rules ----------------------

AUTOGRAD = [
    # (name, fn, args (made in the test; floating ones get requires_grad), in_dims)
    (
        "conv_input",
        lambda x, w: F.conv2d(x, w, padding=1),
        lambda: (torch.randn(3, 2, 4, 5, 5), torch.randn(6, 4, 3, 3)),
        (0, None),
    ),
    (
        "conv_weight_groups",
        lambda x, w, b: F.conv2d(x, w, b, groups=2),
        lambda: (torch.randn(2, 4, 5, 5), torch.randn(3, 6, 2, 3, 3), torch.randn(6)),
        (None, 0, None),
    ),
    (
        "conv_transpose_both",
        lambda x, w: F.conv_transpose1d(x, w, stride=2),
        lambda: (torch.randn(3, 2, 4, 5), torch.randn(3, 4, 2, 3)),
        (0, 0),
    ),
    (
        "batch_norm_train",
        lambda x, w: F.batch_norm(x, None, None, w, None, training=True),
        lambda: (torch.randn(3, 4, 2, 5), torch.randn(3, 2)),
        (0, 0),
    ),
    (
        "layer_norm_weight",
        lambda x, w, b: F.layer_norm(x, (5,), w, b),
        lambda: (torch.randn(3, 4, 5), torch.randn(3, 5), torch.randn(5)),
        (0, 0, None),
    ),
    ("group_norm", lambda x, w: F.group_norm(x, 2, w), lambda: (torch.randn(3, 2, 4, 5), torch.randn(3, 4)), (0, 0)),
    ("max_pool", lambda x: F.max_pool2d(x, 2), lambda: (torch.randn(3, 2, 4, 4, 4),), (0,)),
    # eager nll_loss is not differentiable in its class weights
    (
        "nll_loss_weight",
        lambda x, t, w: F.nll_loss(x, t, w.detach()),
        lambda: (torch.randn(3, 4, 5), torch.randint(0, 5, (3, 4)), torch.rand(3, 5)),
        (0, 0, 0),
    ),
    ("mse", lambda x, y: F.mse_loss(x, y), lambda: (torch.randn(3, 4), torch.randn(4)), (0, None)),
    (
        "grid_sample",
        lambda x, g: F.grid_sample(x, g, align_corners=False),
        lambda: (torch.randn(3, 1, 2, 4, 4), torch.randn(1, 3, 3, 2)),
        (0, None),
    ),
    (
        "bilinear",
        lambda x: F.interpolate(x, scale_factor=2.0, mode="bilinear"),
        lambda: (torch.randn(3, 1, 2, 3, 3),),
        (0,),
    ),
    (
        "attention",
        lambda q, k: F.scaled_dot_product_attention(q, k, k),
        lambda: (torch.randn(3, 1, 2, 4, 8), torch.randn(3, 1, 2, 5, 8)),
        (0, 0),
    ),
]


@pytest.mark.parametrize("name,fn,args,in_dims", AUTOGRAD, ids=[row[0] for row in AUTOGRAD])
def test_autograd_through_rules(name, fn, args, in_dims):
    # float64: float32 kernels on a folded batch reassociate sums too much for the check
    check_autograd_through_vmap(fn, args(), in_dims, double=True, msg=name)


# -- a small CNN ---------------------------------------------------------------------------


def _cnn(x, conv_w, conv_b, bn_mean, bn_var, bn_w, bn_b, fc_w, fc_b):
    """conv - batch norm (eval) - relu - max pool - linear, on [N, 3, 8, 8]."""
    h = F.conv2d(x, conv_w, conv_b, padding=1)
    h = F.batch_norm(h, bn_mean, bn_var, bn_w, bn_b, training=False)
    h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.flatten(1), fc_w, fc_b)


def _cnn_params(models=None):
    lead = () if models is None else (models,)
    return (
        torch.randn(lead + (4, 3, 3, 3)) * 0.3, torch.randn(lead + (4,)),
        torch.randn(lead + (4,)), torch.rand(lead + (4,)) + 0.5, torch.randn(lead + (4,)), torch.randn(lead + (4,)),
        torch.randn(lead + (5, 64)) * 0.1, torch.randn(lead + (5,)),
    )


def test_cnn_over_a_batch_of_inputs():
    x = torch.randn(4, 2, 3, 8, 8)  # an extra leading batch of inputs
    params = _cnn_params()
    with no_fallback():
        check_vmap(_cnn, x, *params, in_dims=(0,) + (None,) * 8)


def test_cnn_ensemble_of_stacked_weights():
    x = torch.randn(2, 3, 8, 8)
    params = _cnn_params(models=5)  # 5 models, weights stacked: F.conv2d(x, w[i]) per model
    with no_fallback():
        check_vmap(_cnn, x, *params, in_dims=(None,) + (0,) * 8)
        # each model on its own minibatch, and nested: models x inputs
        check_vmap(_cnn, torch.randn(5, 2, 3, 8, 8), *params)
        inner = torchxform.vmap(_cnn, in_dims=(0,) + (None,) * 8)
        xs = torch.randn(4, 2, 3, 8, 8)
        check_vmap(inner, xs, *params, in_dims=(None,) + (0,) * 8)
