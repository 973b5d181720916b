"""Derivatives of the neural-network family (convolution, pooling,
normalization, losses, padding and resampling, attention, and the modules
built from them): vjp, vjp of vjp and vmap over vjp, each against
torch.autograd (tests/autograd_harness.py), one row per op with samplers
drawn from its domain; per-example gradients (vmap of grad) against a loop
of torch.autograd.grad."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchxform
from tests.autograd_harness import check_derivatives
from tests.harness import assert_close, cpu_reference_row, fixed_rand, fixed_randn, no_fallback, skip_cpu_reference_rows

aten = torch.ops.aten
DOUBLE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny kernels: intra-op threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- input domains --------------------------------------------------------------------


def randn(*shape):
    return torch.randn(shape, dtype=DOUBLE)


def channels_last(*shape):
    """A non-contiguous [N, C, *S] tensor (its memory is [N, *S, C])."""
    return randn(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def prob(*shape):
    return torch.rand(shape, dtype=DOUBLE) * 0.9 + 0.05


def positive(*shape):
    return torch.rand(shape, dtype=DOUBLE) + 0.5


def ties(*shape):
    """Small integers: max pooling windows with tied maxima."""
    return torch.randint(0, 3, shape).to(DOUBLE)


def grid(*shape):
    """Sampling locations, some outside [-1, 1] (padding modes matter)."""
    return torch.rand(shape, dtype=DOUBLE) * 2.4 - 1.2


def row(name, fn, sample, **options):
    """A table row: ``check_derivatives(fn, sample, **options)``."""
    return pytest.param(fn, sample, {"msg": name, **options}, id=name)


def case(name, *values):
    return pytest.param(*values, id=name)


def run(fn, sample, options):
    check_derivatives(fn, sample, **options)


# -- convolution ------------------------------------------------------------------

CONVOLUTIONS = [
    row("conv1d", lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=1), lambda: (randn(2, 3, 8), randn(4, 3, 3), randn(4))),
    row("conv1d_no_bias", lambda x, w: F.conv1d(x, w, dilation=2), lambda: (randn(2, 3, 9), randn(4, 3, 2))),
    row("conv2d", lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), lambda: (randn(2, 4, 6, 6), randn(6, 4, 3, 3), randn(6))),
    row("conv2d_groups_dilation", lambda x, w, b: F.conv2d(x, w, b, padding=2, dilation=2, groups=2),
        lambda: (randn(2, 4, 7, 7), randn(6, 2, 3, 3), randn(6))),
    row("conv2d_padding_same", lambda x, w: F.conv2d(x, w, padding="same"), lambda: (randn(2, 3, 5, 5), randn(2, 3, 3, 1))),
    row("conv2d_unbatched", lambda x, w, b: F.conv2d(x, w, b), lambda: (randn(3, 5, 5), randn(2, 3, 3, 3), randn(2))),
    row("conv2d_noncontiguous", lambda x, w: F.conv2d(x, w, padding=1), lambda: (channels_last(2, 3, 5, 5), randn(4, 3, 3, 3))),
    row("conv2d_depthwise", lambda x, w, b: F.conv2d(x, w, b, groups=3), lambda: (randn(2, 3, 5, 5), randn(6, 1, 3, 3), randn(6))),
    row("conv2d_empty_batch", lambda x, w, b: F.conv2d(x, w, b), lambda: (randn(0, 3, 5, 5), randn(2, 3, 3, 3), randn(2)),
        batched=False),
    row("conv3d", lambda x, w, b: F.conv3d(x, w, b, padding=1), lambda: (randn(1, 2, 4, 4, 4), randn(3, 2, 2, 2, 2), randn(3))),
    row("conv_transpose1d", lambda x, w, b: F.conv_transpose1d(x, w, b, stride=2), lambda: (randn(2, 3, 5), randn(3, 2, 3), randn(2))),
    row("conv_transpose2d", lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1, groups=2),
        lambda: (randn(2, 4, 4, 4), randn(4, 3, 3, 3), randn(6))),
    row("conv_transpose3d", lambda x, w: F.conv_transpose3d(x, w, stride=(1, 2, 1), dilation=2),
        lambda: (randn(1, 2, 3, 3, 3), randn(2, 3, 2, 2, 2))),
    row("_convolution", lambda x, w, b: aten._convolution.default(x, w, b, [1, 1], [1, 0], [1, 1], False, [0, 0], 1,
                                                                    False, False, True, True),
        lambda: (randn(2, 3, 5, 5), randn(4, 3, 3, 2), randn(4))),
]


@pytest.mark.parametrize("fn, sample, options", CONVOLUTIONS)
def test_convolution(fn, sample, options):
    run(fn, sample, options)


def test_convolution_backward_third_order():
    """convolution_backward's VJP uses convolution_backward again: a third
    derivative goes through it twice."""
    x, w = randn(1, 2, 5, 5), randn(3, 2, 3, 3)

    def third(fn):
        return fn(lambda x: fn(lambda x: fn(lambda x: F.conv2d(x, w).pow(3).sum())(x).pow(2).sum())(x).sum())(x)

    expected = third(lambda f: lambda x: torch.func.grad(f)(x))
    assert_close(third(torchxform.grad), expected)


# -- pooling --------------------------------------------------------------------------

POOLING = [
    row("max_pool1d", lambda x: F.max_pool1d(x, 2), lambda: (randn(2, 3, 8),)),
    row("max_pool1d_with_indices", lambda x: F.max_pool1d(x, 3, stride=2, padding=1, return_indices=True)[0],
        lambda: (randn(3, 9),)),
    row("max_pool2d", lambda x: F.max_pool2d(x, 2), lambda: (randn(2, 3, 6, 6),)),
    row("max_pool2d_options", lambda x: F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True), lambda: (randn(2, 3, 7, 7),)),
    row("max_pool2d_dilation_unbatched", lambda x: F.max_pool2d(x, 2, dilation=2), lambda: (randn(3, 7, 7),)),
    row("max_pool2d_ties", lambda x: F.max_pool2d(x, 2, stride=1), lambda: (ties(2, 3, 4, 4),)),
    row("max_pool2d_noncontiguous", lambda x: F.max_pool2d(x, 2), lambda: (channels_last(2, 3, 4, 4),)),
    row("max_pool3d", lambda x: F.max_pool3d(x, 2, padding=1), lambda: (randn(1, 2, 4, 4, 4),)),
    row("max_pool3d_ties", lambda x: F.max_pool3d(x, (2, 1, 2)), lambda: (ties(1, 2, 4, 3, 4),)),
    row("avg_pool1d", lambda x: F.avg_pool1d(x, 3, stride=2, padding=1), lambda: (randn(2, 3, 8),)),
    row("avg_pool2d", lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        lambda: (randn(2, 3, 7, 7),)),
    row("avg_pool2d_divisor_unbatched", lambda x: F.avg_pool2d(x, 2, divisor_override=3), lambda: (randn(3, 6, 6),)),
    row("avg_pool3d", lambda x: F.avg_pool3d(x, 2, stride=1, padding=1), lambda: (randn(1, 2, 4, 4, 4),)),
    row("adaptive_avg_pool1d", lambda x: F.adaptive_avg_pool1d(x, 3), lambda: (randn(2, 3, 7),)),
    row("adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, (3, 2)), lambda: (randn(2, 3, 7, 5),)),
    row("adaptive_avg_pool3d", lambda x: F.adaptive_avg_pool3d(x, 2), lambda: (randn(1, 2, 5, 4, 3),)),
    row("adaptive_max_pool1d", lambda x: F.adaptive_max_pool1d(x, 3), lambda: (randn(2, 3, 7),)),
    row("adaptive_max_pool2d", lambda x: F.adaptive_max_pool2d(x, (3, 2)), lambda: (randn(2, 3, 7, 5),)),
    row("adaptive_max_pool2d_ties", lambda x: F.adaptive_max_pool2d(x, 2), lambda: (ties(3, 4, 4),)),
    row("adaptive_max_pool3d", lambda x: F.adaptive_max_pool3d(x, 2), lambda: (randn(1, 2, 5, 4, 3),)),
    row("lp_pool2d", lambda x: F.lp_pool2d(x, 2, 2), lambda: (positive(2, 3, 6, 6),)),
]


@pytest.mark.parametrize("fn, sample, options", POOLING)
def test_pooling(fn, sample, options):
    run(fn, sample, options)


# -- normalization ----------------------------------------------------------------------

# Constants that functions under test close over are made when a test runs (on
# its default device): call them.
RUNNING_MEAN = lambda: torch.tensor([0.3, -0.2, 0.1], dtype=DOUBLE)
RUNNING_VAR = lambda: torch.tensor([0.7, 1.3, 0.9], dtype=DOUBLE)


def batch_norm_train(x, w, b):
    # fresh running statistics each call: the op updates them in place
    return F.batch_norm(x, torch.zeros(3, dtype=DOUBLE), torch.ones(3, dtype=DOUBLE), w, b, training=True)


NORMALIZATION = [
    row("batch_norm_train", batch_norm_train, lambda: (randn(4, 3, 5, 5), randn(3), randn(3))),
    row("batch_norm_train_2d", batch_norm_train, lambda: (randn(6, 3), randn(3), randn(3))),
    row("batch_norm_no_stats", lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
        lambda: (randn(4, 3, 5), randn(3), randn(3))),
    row("batch_norm_no_affine", lambda x: F.batch_norm(x, None, None, training=True, eps=1e-3), lambda: (randn(4, 3, 5),)),
    row("batch_norm_eval", lambda x, w, b: F.batch_norm(x, RUNNING_MEAN(), RUNNING_VAR(), w, b, training=False),
        lambda: (randn(4, 3, 5, 5), randn(3), randn(3))),
    row("_native_batch_norm_legit",
        lambda x, w, b: aten._native_batch_norm_legit.default(
            x, w, b, torch.zeros(3, dtype=DOUBLE), torch.ones(3, dtype=DOUBLE), True, 0.1, 1e-5)[0],
        lambda: (randn(4, 3, 5), randn(3), randn(3))),
    row("_native_batch_norm_legit_no_stats",
        lambda x, w, b: aten._native_batch_norm_legit.no_stats(x, w, b, True, 0.1, 1e-5)[0],
        lambda: (randn(4, 3, 5), randn(3), randn(3))),
    row("_native_batch_norm_legit_no_training",
        lambda x, w, b: aten._native_batch_norm_legit_no_training.default(x, w, b, RUNNING_MEAN(), RUNNING_VAR(), 0.1, 1e-5)[0],
        lambda: (randn(4, 3, 5), randn(3), randn(3))),
    row("instance_norm", lambda x, w, b: F.instance_norm(x, weight=w, bias=b), lambda: (randn(2, 3, 6), randn(3), randn(3))),
    row("layer_norm", lambda x, w, b: F.layer_norm(x, (4, 5), w, b), lambda: (randn(3, 4, 5), randn(4, 5), randn(4, 5))),
    row("layer_norm_no_affine", lambda x: F.layer_norm(x, (5,)), lambda: (randn(3, 4, 5),)),
    row("layer_norm_weight_only", lambda x, w: F.layer_norm(x, (5,), w, eps=1e-3), lambda: (randn(3, 4, 5), randn(5))),
    row("layer_norm_noncontiguous", lambda x, w, b: F.layer_norm(x, (3,), w, b),
        lambda: (randn(4, 3, 5).transpose(1, 2), randn(3), randn(3))),
    row("layer_norm_empty_rows", lambda x, w, b: F.layer_norm(x, (5,), w, b), lambda: (randn(0, 5), randn(5), randn(5)),
        batched=False),
    row("group_norm", lambda x, w, b: F.group_norm(x, 2, w, b), lambda: (randn(3, 4, 5, 2), randn(4), randn(4))),
    row("group_norm_no_affine", lambda x: F.group_norm(x, 2), lambda: (randn(3, 4, 5),)),
    row("group_norm_one_group", lambda x, w, b: F.group_norm(x, 1, w, b, eps=1e-3), lambda: (randn(2, 3, 4), randn(3), randn(3))),
    row("native_group_norm_all_outputs", lambda x, w, b: aten.native_group_norm.default(x, w, b, 3, 4, 5, 2, 1e-5),
        lambda: (randn(3, 4, 5), randn(4), randn(4))),
]


@pytest.mark.parametrize("fn, sample, options", NORMALIZATION)
def test_normalization(fn, sample, options):
    run(fn, sample, options)


def _statistics(x, dims, eps):
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    return mean, (var + eps).rsqrt()


STATISTICS = [
    # (op on x, the same statistics from their definition, or None where
    # torch gives them no derivative (the reference is then torch on the op), x)
    case("batch_norm", lambda x: aten.native_batch_norm.default(x, None, None, None, None, True, 0.1, 1e-5)[1:],
        None, lambda: randn(4, 3, 5)),
    case("layer_norm", lambda x: aten.native_layer_norm.default(x, [4, 5], None, None, 1e-5)[1:],
        None, lambda: randn(3, 4, 5)),
    case("group_norm", lambda x: aten.native_group_norm.default(x, None, None, 3, 4, 5, 2, 1e-5)[1:],
        lambda x: tuple(s.reshape(3, 2) for s in _statistics(x.reshape(3, 2, 10), 2, 1e-5)), lambda: randn(3, 4, 5)),
]


@pytest.mark.parametrize("op, definition, sample", STATISTICS)
def test_normalization_statistics(op, definition, sample):
    """NOTE [Normalization statistics]: group norm's mean and inverse
    standard deviation outputs carry their derivatives (reference: their
    definition); batch norm's and layer norm's none, as in torch (their
    cotangents are dropped; reference: torch.autograd on the op)."""
    x = sample()
    reference = definition or op
    cotangents = tuple(torch.randn_like(s) for s in reference(x))
    out, pullback = torchxform.vjp(op, x)
    leaf = x.clone().requires_grad_()
    if definition is None:  # torch's statistics outputs do not even require grad
        assert not any(s.requires_grad for s in op(leaf))
        expected = (torch.zeros_like(x),)
    else:
        expected = torch.autograd.grad(reference(leaf), leaf, cotangents)
    assert_close(out, tuple(s.detach() for s in reference(x)))
    assert_close(pullback(cotangents), expected)


def test_batch_norm_module_twice_in_training():
    """The running statistics are written in place by every call: a module
    used twice must still differentiate (as in torch.autograd)."""
    bn = torch.nn.BatchNorm2d(3).double()
    params = dict(bn.named_parameters())
    x = randn(4, 3, 3, 3)

    def loss(params, x):
        return functional_call(bn, params, (functional_call(bn, params, (x,)) * 2,)).pow(3).sum()

    actual = torchxform.grad(loss, argnums=(0, 1))(params, x)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    xl = x.clone().requires_grad_()
    expected = torch.autograd.grad(loss(leaves, xl), [*leaves.values(), xl])
    assert_close((list(actual[0].values()), actual[1]), (list(expected[:-1]), expected[-1]))


# -- losses -----------------------------------------------------------------------------

# (called in the test, as the constants above)
TARGET = lambda: torch.tensor([0, 2, 1, 2])
TARGET_IGNORED = lambda: torch.tensor([0, -100, 1, 2])
TARGET_2D = lambda: torch.tensor([[[0, 1, 2, 1, 7], [2, 2, 0, 1, 1]], [[7, 7, 0, 0, 1], [1, 2, 2, 0, 1]]])
TARGET_ALL_IGNORED = lambda: torch.tensor([-100, -100])
CLASS_WEIGHT = lambda: torch.tensor([0.5, 2.0, 1.5], dtype=DOUBLE)
POS_WEIGHT = lambda: torch.tensor([0.7, 1.8, 1.1], dtype=DOUBLE)
SIGNS = lambda: torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0], [-1.0, 1.0, 1.0]], dtype=DOUBLE)
BCE_TARGET = lambda: torch.tensor([0.3, 0.6, 1.0, 1.0], dtype=DOUBLE)
MULTILABEL = lambda: torch.tensor([[0, 2, -1], [1, -1, 2], [2, 2, 0], [-1, 0, 1]])

LOSSES = [
    row("nll_loss", lambda x: F.nll_loss(x, TARGET()), lambda: (randn(4, 3),)),
    row("nll_loss_sum_weight", lambda x: F.nll_loss(x, TARGET(), CLASS_WEIGHT(), reduction="sum"), lambda: (randn(4, 3),)),
    row("nll_loss_mean_weight_ignore", lambda x: F.nll_loss(x, TARGET_IGNORED(), CLASS_WEIGHT()), lambda: (randn(4, 3),)),
    row("nll_loss_none_ignore", lambda x: F.nll_loss(x, TARGET_IGNORED(), reduction="none"), lambda: (randn(4, 3),)),
    row("nll_loss_all_ignored_sum", lambda x: F.nll_loss(x, TARGET_ALL_IGNORED(), reduction="sum"), lambda: (randn(2, 3),)),
    row("nll_loss_all_ignored_mean", lambda x: F.nll_loss(x, TARGET_ALL_IGNORED()), lambda: (randn(2, 3),)),
    row("nll_loss_unbatched", lambda x: F.nll_loss(x, torch.tensor(1)), lambda: (randn(3),)),
    row("nll_loss2d", lambda x: F.nll_loss(x, TARGET_2D(), CLASS_WEIGHT(), ignore_index=7), lambda: (randn(2, 3, 2, 5),)),
    row("nll_loss2d_none", lambda x: F.nll_loss(x, TARGET_2D(), ignore_index=7, reduction="none"), lambda: (randn(2, 3, 2, 5),)),
    row("cross_entropy", lambda x: F.cross_entropy(x, TARGET()), lambda: (randn(4, 3),)),
    row("cross_entropy_weight_smoothing", lambda x: F.cross_entropy(x, TARGET_IGNORED(), CLASS_WEIGHT(), label_smoothing=0.2),
        lambda: (randn(4, 3),)),
    row("cross_entropy_smoothing_sum", lambda x: F.cross_entropy(x, TARGET(), label_smoothing=0.1, reduction="sum"),
        lambda: (randn(4, 3),)),
    row("cross_entropy_probabilities", lambda x, t: F.cross_entropy(x, t), lambda: (randn(4, 3), prob(4, 3).softmax(-1))),
    row("cross_entropy_probabilities_weight_smoothing", lambda x, t: F.cross_entropy(x, t, CLASS_WEIGHT(), label_smoothing=0.3),
        lambda: (randn(4, 3), prob(4, 3).softmax(-1))),
    row("cross_entropy_2d", lambda x: F.cross_entropy(x, TARGET_2D(), ignore_index=7), lambda: (randn(2, 3, 2, 5),)),
    row("mse_loss", lambda x, t: F.mse_loss(x, t), lambda: (randn(4, 3), randn(4, 3))),
    row("mse_loss_sum_broadcast", lambda x, t: aten.mse_loss.default(x, t, 2), lambda: (randn(4, 3), randn(3))),
    row("mse_loss_none", lambda x, t: F.mse_loss(x, t, reduction="none"), lambda: (randn(4, 3), randn(4, 3))),
    row("mse_loss_empty", lambda x, t: F.mse_loss(x, t, reduction="sum"), lambda: (randn(0, 3), randn(0, 3)), batched=False),
    row("l1_loss", lambda x, t: F.l1_loss(x, t), lambda: (randn(4, 3), randn(4, 3))),
    row("smooth_l1_loss", lambda x, t: F.smooth_l1_loss(x, t, beta=0.5), lambda: (randn(4, 3), randn(4, 3))),
    row("smooth_l1_loss_beta0", lambda x, t: aten.smooth_l1_loss.default(x, t, 1, 0.0), lambda: (randn(4, 3), randn(4, 3))),
    cpu_reference_row(
        row("smooth_l1_loss_beta0_equal", lambda x, t: aten.smooth_l1_loss.default(x, t, 2, 0.0),
            lambda: (torch.zeros(3, dtype=DOUBLE), torch.zeros(3, dtype=DOUBLE))),
        "CUDA's smooth_l1_loss_backward is nan (0 / beta) where input == target and beta == 0, CPU's is not",
    ),
    row("smooth_l1_loss_none", lambda x, t: F.smooth_l1_loss(x, t, reduction="none"), lambda: (randn(4, 3), randn(4, 3))),
    row("huber_loss", lambda x, t: F.huber_loss(x, t, delta=0.7, reduction="sum"), lambda: (randn(4, 3), randn(4, 3))),
    row("huber_loss_none", lambda x, t: F.huber_loss(x, t, reduction="none"), lambda: (randn(4, 3), randn(4, 3))),
    row("soft_margin_loss", lambda x: F.soft_margin_loss(x, SIGNS()), lambda: (randn(4, 3),)),
    row("soft_margin_loss_none", lambda x: F.soft_margin_loss(x, SIGNS(), reduction="none"), lambda: (randn(4, 3),)),
    row("binary_cross_entropy", lambda x, t: F.binary_cross_entropy(x, t), lambda: (prob(4, 3), prob(4, 3))),
    row("binary_cross_entropy_weight_sum", lambda x, t: F.binary_cross_entropy(x, t, CLASS_WEIGHT(), reduction="sum"),
        lambda: (prob(4, 3), prob(4, 3))),
    row("binary_cross_entropy_none", lambda x, t: F.binary_cross_entropy(x, t, reduction="none"), lambda: (prob(4, 3), prob(4, 3))),
    # at 0 and 1 the kernel's EPSILON keeps the input gradient finite (first order only: the log clamps)
    row("binary_cross_entropy_at_bounds", lambda x: F.binary_cross_entropy(x, BCE_TARGET(), reduction="sum"),
        lambda: (torch.tensor([0.0, 1.0, 0.5, 1.0], dtype=DOUBLE),), second_order=False),
    row("binary_cross_entropy_with_logits", lambda x, t: F.binary_cross_entropy_with_logits(x, t),
        lambda: (randn(4, 3), prob(4, 3))),
    row("binary_cross_entropy_with_logits_weights",
        lambda x, t: F.binary_cross_entropy_with_logits(x, t, CLASS_WEIGHT(), pos_weight=POS_WEIGHT()),
        lambda: (randn(4, 3), prob(4, 3))),
    row("binary_cross_entropy_with_logits_pos_weight_none",
        lambda x, t: F.binary_cross_entropy_with_logits(x, t, pos_weight=POS_WEIGHT(), reduction="none"),
        lambda: (randn(4, 3), prob(4, 3))),
    row("kl_div_batchmean", lambda x, t: F.kl_div(x, t, reduction="batchmean"), lambda: (randn(4, 3).log_softmax(-1), prob(4, 3))),
    row("kl_div_log_target", lambda x, t: F.kl_div(x, t, reduction="sum", log_target=True), lambda: (randn(4, 3), randn(4, 3))),
    # torch has no second derivative for the margin losses
    row("multi_margin_loss", lambda x: F.multi_margin_loss(x, TARGET()), lambda: (randn(4, 3),), second_order=False),
    row("multi_margin_loss_p2_weight", lambda x: F.multi_margin_loss(x, TARGET(), p=2, margin=0.5, weight=CLASS_WEIGHT(),
                                                                      reduction="sum"),
        lambda: (randn(4, 3),), second_order=False),
    row("multi_margin_loss_none", lambda x: F.multi_margin_loss(x, TARGET(), reduction="none"), lambda: (randn(4, 3),),
        second_order=False),
    row("multi_margin_loss_unbatched", lambda x: F.multi_margin_loss(x, torch.tensor(1), reduction="none"),
        lambda: (randn(3),), second_order=False),
    row("multilabel_margin_loss", lambda x: F.multilabel_margin_loss(x, MULTILABEL()), lambda: (randn(4, 3),),
        second_order=False),
    row("multilabel_margin_loss_none", lambda x: F.multilabel_margin_loss(x, MULTILABEL(), reduction="none"),
        lambda: (randn(4, 3),), second_order=False),
    row("multilabel_margin_loss_unbatched_sum",
        lambda x: F.multilabel_margin_loss(x, torch.tensor([3, 0, -1, 1]), reduction="sum"),
        lambda: (randn(4),), second_order=False),
]


@pytest.mark.parametrize("fn, sample, options", LOSSES)
@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")  # torch's own, broadcasting
def test_loss(fn, sample, options):
    run(fn, sample, options)


def _bce(x, t, w):
    return -(w * (t * x.log() + (1 - t) * (1 - x).log())).mean()


def _bce_logits(x, t, w, p):
    return -(w * (p * t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))).sum()


NOT_DIFFERENTIABLE_IN_TORCH = [
    # (loss, the same loss from its definition, sample): torch refuses these
    # derivatives (weights, soft_margin_loss's target); the reference is the definition.
    case("binary_cross_entropy_weight", lambda x, t, w: F.binary_cross_entropy(x, t, w), _bce,
        lambda: (prob(4, 3), prob(4, 3), positive(3))),
    case("binary_cross_entropy_with_logits_weights",
        lambda x, t, w, p: F.binary_cross_entropy_with_logits(x, t, w, pos_weight=p, reduction="sum"), _bce_logits,
        lambda: (randn(4, 3), prob(4, 3), positive(4, 1), positive(3))),
    case("soft_margin_loss_target", lambda x, t: F.soft_margin_loss(x, t), lambda x, t: (-t * x).exp().log1p().mean(),
        lambda: (randn(4, 3), randn(4, 3))),
]


@pytest.mark.parametrize("loss, definition, sample", NOT_DIFFERENTIABLE_IN_TORCH)
def test_loss_arguments_torch_does_not_differentiate(loss, definition, sample):
    args = sample()
    leaves = [a.clone().requires_grad_() for a in args]
    expected = torch.autograd.grad(definition(*leaves), leaves, create_graph=True)
    actual = torchxform.grad(loss, argnums=tuple(range(len(args))))(*args)
    assert_close(actual, tuple(e.detach() for e in expected))
    # second order too: the gradient of the summed gradients
    second = torchxform.grad(lambda *a: sum(g.sum() for g in torchxform.grad(loss, tuple(range(len(a))))(*a)),
                             argnums=tuple(range(len(args))))(*args)
    assert_close(second, torch.autograd.grad(sum(e.sum() for e in expected), leaves))


@pytest.mark.parametrize(
    "loss",
    [
        lambda x, w: F.nll_loss(x, TARGET(), w),
        lambda x, w: F.cross_entropy(x, TARGET(), w),
        lambda x, w: F.multi_margin_loss(x, TARGET(), weight=w),
    ],
    ids=["nll_loss", "cross_entropy", "multi_margin_loss"],
)
def test_class_weight_gradient_raises(loss):
    with pytest.raises(RuntimeError, match="not differentiable with respect to its class weights"):
        torchxform.grad(loss, argnums=1)(randn(4, 3), positive(3))


# -- padding, resampling, sampling, activations -----------------------------------------

UP = {"align_corners": False}

RESAMPLING = [
    row("constant_pad", lambda x: F.pad(x, (1, 2, 0, 1), value=0.5), lambda: (randn(2, 3, 4),)),
    row("constant_pad_crop", lambda x: F.pad(x, (-1, 2, 1, -2)), lambda: (randn(2, 3, 4, 5),)),
    row("reflection_pad1d", lambda x: F.pad(x, (2, 1), mode="reflect"), lambda: (randn(2, 3, 5),)),
    row("reflection_pad2d_unbatched", lambda x: F.pad(x, (2, 1, 1, 2), mode="reflect"), lambda: (randn(3, 5, 4),)),
    row("reflection_pad3d", lambda x: F.pad(x, (1, 1, 1, 0, 0, 1), mode="reflect"), lambda: (randn(1, 2, 3, 3, 3),)),
    row("replication_pad1d", lambda x: F.pad(x, (2, 1), mode="replicate"), lambda: (randn(2, 3, 5),)),
    row("replication_pad2d", lambda x: F.pad(x, (2, 1, 1, 2), mode="replicate"), lambda: (randn(2, 3, 5, 4),)),
    row("replication_pad3d_unbatched", lambda x: F.pad(x, (1, 1, 1, 0, 0, 1), mode="replicate"), lambda: (randn(2, 3, 3, 3),)),
    row("circular_pad", lambda x: F.pad(x, (1, 2, 2, 1), mode="circular"), lambda: (randn(2, 3, 4, 4),)),
    row("upsample_nearest1d", lambda x: F.interpolate(x, scale_factor=2), lambda: (randn(2, 3, 4),)),
    row("upsample_nearest2d", lambda x: F.interpolate(x, size=(5, 7)), lambda: (randn(2, 3, 4, 3),)),
    row("upsample_nearest3d", lambda x: F.interpolate(x, scale_factor=(2, 1.5, 1)), lambda: (randn(1, 2, 2, 2, 3),)),
    row("upsample_nearest_exact1d", lambda x: F.interpolate(x, scale_factor=1.7, mode="nearest-exact"), lambda: (randn(2, 3, 4),)),
    row("upsample_nearest_exact2d", lambda x: F.interpolate(x, size=(5, 7), mode="nearest-exact"), lambda: (randn(2, 3, 4, 3),)),
    row("upsample_nearest_exact3d", lambda x: F.interpolate(x, size=(3, 3, 3), mode="nearest-exact"),
        lambda: (randn(1, 2, 2, 2, 2),)),
    row("upsample_linear1d_align_corners", lambda x: F.interpolate(x, scale_factor=2.5, mode="linear", align_corners=True),
        lambda: (randn(2, 3, 4),)),
    row("upsample_bilinear2d", lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", **UP), lambda: (randn(2, 3, 4, 3),)),
    row("upsample_bilinear2d_downsample", lambda x: F.interpolate(x, size=(3, 2), mode="bilinear", align_corners=True),
        lambda: (randn(2, 3, 7, 5),)),
    row("upsample_bilinear2d_antialias", lambda x: F.interpolate(x, size=(3, 2), mode="bilinear", antialias=True, **UP),
        lambda: (randn(2, 3, 6, 5),)),
    row("upsample_bicubic2d", lambda x: F.interpolate(x, scale_factor=1.5, mode="bicubic", **UP), lambda: (randn(2, 3, 4, 4),)),
    row("upsample_bicubic2d_antialias", lambda x: F.interpolate(x, size=(3, 3), mode="bicubic", antialias=True, **UP),
        lambda: (randn(1, 2, 6, 5),)),
    row("upsample_trilinear3d", lambda x: F.interpolate(x, scale_factor=2, mode="trilinear", **UP), lambda: (randn(1, 2, 2, 3, 2),)),
    row("upsample_bilinear2d_vec", lambda x: aten.upsample_bilinear2d.vec(x, None, False, [2.0, 1.5]), lambda: (randn(2, 3, 4, 4),)),
    row("upsample_nearest2d_vec", lambda x: aten.upsample_nearest2d.vec(x, [6, 5], None), lambda: (randn(2, 3, 4, 4),)),
    row("pixel_shuffle", lambda x: F.pixel_shuffle(x, 2), lambda: (randn(2, 8, 3, 3),)),
    row("pixel_unshuffle", lambda x: F.pixel_unshuffle(x, 2), lambda: (randn(2, 2, 4, 6),)),
    row("channel_shuffle", lambda x: F.channel_shuffle(x, 2), lambda: (randn(2, 6, 3, 3),)),
    row("unfold", lambda x: F.unfold(x, (2, 3), padding=1, stride=2), lambda: (randn(2, 3, 5, 6),)),
    row("unfold_unbatched_dilation", lambda x: F.unfold(x, 2, dilation=2), lambda: (randn(3, 5, 5),)),
    row("fold", lambda x: F.fold(x, (4, 5), (2, 2)), lambda: (randn(2, 12, 12),)),
    row("grid_sample_bilinear", lambda x, g: F.grid_sample(x, g, align_corners=False), lambda: (randn(2, 3, 5, 4), grid(2, 3, 4, 2))),
    row("grid_sample_nearest_border", lambda x, g: F.grid_sample(x, g, mode="nearest", padding_mode="border", align_corners=True),
        lambda: (randn(2, 3, 5, 4), grid(2, 3, 4, 2))),
    row("grid_sample_bicubic_reflection",
        lambda x, g: F.grid_sample(x, g, mode="bicubic", padding_mode="reflection", align_corners=False),
        lambda: (randn(1, 2, 5, 4), grid(1, 3, 2, 2))),
    row("grid_sample_bilinear_reflection_align",
        lambda x, g: F.grid_sample(x, g, padding_mode="reflection", align_corners=True),
        lambda: (randn(1, 2, 4, 4), grid(1, 3, 3, 2))),
    # grid_sampler_3d_backward has no VJP rule: first order and vmap only
    row("grid_sample_3d", lambda x, g: F.grid_sample(x, g, align_corners=False),
        lambda: (randn(1, 2, 3, 4, 3), grid(1, 2, 3, 2, 3)), second_order=False),
    row("affine_grid", lambda t: F.affine_grid(t, (2, 3, 4, 5), align_corners=False), lambda: (randn(2, 2, 3),)),
    row("affine_grid_3d", lambda t: F.affine_grid(t, (2, 3, 2, 4, 3), align_corners=True), lambda: (randn(2, 3, 4),)),
    row("prelu", lambda x, w: F.prelu(x, w), lambda: (randn(2, 3, 4), randn(3))),
    row("prelu_shared_weight", lambda x, w: F.prelu(x, w), lambda: (randn(2, 3, 4), randn(1))),
    # torch's second derivative takes x >= 0 where its first takes x > 0:
    # at exact zeros only the first order is comparable
    row("prelu_zeros", lambda x, w: F.prelu(x, w), lambda: (torch.tensor([[0.0, -1.0, 2.0]], dtype=DOUBLE), randn(1)),
        second_order=False),
    row("glu", lambda x: F.glu(x, 1), lambda: (randn(2, 4, 3),)),
    row("glu_last_dim", lambda x: F.glu(x), lambda: (randn(3, 6),)),
]


GRID_SAMPLE_2D = ("grid_sample_bilinear", "grid_sample_nearest_border", "grid_sample_bicubic_reflection",
                  "grid_sample_bilinear_reflection_align")


@pytest.mark.parametrize("fn, sample, options", RESAMPLING)
@pytest.mark.filterwarnings("ignore:Default grid_sample and affine_grid behavior")
def test_resampling(fn, sample, options):
    # (not in the table: the forward tests, without this second order, run there)
    reason = "torch.autograd has no derivative of grid_sampler_2d_backward on CUDA (the second-order reference)"
    skip_cpu_reference_rows(options["msg"], dict.fromkeys(GRID_SAMPLE_2D, reason))
    run(fn, sample, options)


def test_native_channel_shuffle():
    """torch has no derivative for native_channel_shuffle: it is the same
    permutation as channel_shuffle."""
    x = randn(2, 6, 3, 3)
    ct = randn(2, 6, 3, 3)
    _, pullback = torchxform.vjp(lambda x: aten.native_channel_shuffle.default(x, 3), x)
    leaf = x.clone().requires_grad_()
    assert_close(pullback(ct), torch.autograd.grad(F.channel_shuffle(leaf, 3), leaf, ct))


# -- attention --------------------------------------------------------------------------

FLASH = aten._scaled_dot_product_flash_attention_for_cpu.default
FLASH_CPU_ONLY = "aten._scaled_dot_product_flash_attention_for_cpu has only a CPU kernel"
def attention(q, k, v, **kwargs):
    """F.scaled_dot_product_attention; torch.autograd's reference (leaves
    requiring grad) takes the math backend, whose second derivative exists,
    where torchxform's tracers take the CPU flash kernel."""
    if q.requires_grad or k.requires_grad or v.requires_grad:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _flash_with_logsumexp(q, k, v):
    if q.requires_grad:
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return attention(q, k, v), scores.logsumexp(-1)
    return FLASH(q, k, v)


BOOL_MASK = lambda: fixed_rand(4, 5, seed=3, dtype=torch.float32) > 0.3
FLOAT_MASK = lambda: fixed_randn(4, 5, seed=4, dtype=DOUBLE)

ATTENTION = [
    row("sdpa", lambda q, k, v: attention(q, k, v), lambda: (randn(2, 3, 4, 6), randn(2, 3, 5, 6), randn(2, 3, 5, 6))),
    row("sdpa_causal", lambda q, k, v: attention(q, k, v, is_causal=True),
        lambda: (randn(2, 3, 4, 6), randn(2, 3, 5, 6), randn(2, 3, 5, 6))),
    row("sdpa_bool_mask_scale", lambda q, k, v: attention(q, k, v, attn_mask=BOOL_MASK(), scale=0.3),
        lambda: (randn(2, 3, 4, 6), randn(2, 3, 5, 6), randn(2, 3, 5, 6))),
    row("sdpa_float_mask", lambda q, k, v: attention(q, k, v, attn_mask=FLOAT_MASK()),
        lambda: (randn(2, 3, 4, 6), randn(2, 3, 5, 6), randn(2, 3, 5, 6))),
    row("sdpa_self_attention", lambda x: attention(x, x, x), lambda: (randn(2, 3, 4, 6),)),
    # logsumexp is differentiable here (torch marks it not): the reference is its definition
    cpu_reference_row(
        row("flash_logsumexp", _flash_with_logsumexp, lambda: (randn(2, 3, 4, 6), randn(2, 3, 5, 6), randn(2, 3, 5, 6))),
        FLASH_CPU_ONLY,
    ),
]


@pytest.mark.parametrize("fn, sample, options", ATTENTION)
def test_attention(fn, sample, options):
    run(fn, sample, options)


def test_attention_float_mask_gradient():
    # The mask is keyword-only: its gradient travels in the rule's kwarg dict.
    q = lambda: torch.randn(2, 3, 4, 8, dtype=torch.float64)  # noqa: E731
    m = lambda: torch.randn(4, 4, dtype=torch.float64)  # noqa: E731
    check_derivatives(lambda q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m), lambda: (q(), m()))


# -- modules ----------------------------------------------------------------------------


def _module_row(name, make, inputs, **options):
    """A module's output as a function of (inputs..., parameters...).  The
    module is built when a test first samples it, on the test's default
    device (once per device)."""
    modules = {}

    def module():
        device = torch.get_default_device()
        if device not in modules:
            modules[device] = make().double()
        return modules[device]

    def fn(*args):
        m = module()
        names = [n for n, _ in m.named_parameters()]
        n_inputs = len(args) - len(names)
        params = dict(zip(names, args[n_inputs:]))
        out = functional_call(m, params, args[:n_inputs])
        return out[0] if isinstance(out, tuple) else out

    def sample():
        return (*inputs(), *[p.detach().clone() for p in module().parameters()])

    return row(name, fn, sample, **options)


MODULES = [
    _module_row("linear", lambda: torch.nn.Linear(4, 3), lambda: (randn(5, 4),)),
    _module_row("linear_3d_input", lambda: torch.nn.Linear(4, 3), lambda: (randn(2, 5, 4),)),
    _module_row("bilinear", lambda: torch.nn.Bilinear(3, 2, 4), lambda: (randn(5, 3), randn(5, 2))),
    _module_row("lstm", lambda: torch.nn.LSTM(3, 4), lambda: (randn(5, 2, 3),)),
    _module_row("lstm_two_layers_batch_first", lambda: torch.nn.LSTM(3, 2, num_layers=2, batch_first=True),
                lambda: (randn(2, 3, 3),)),
    _module_row("gru", lambda: torch.nn.GRU(3, 4, bidirectional=True), lambda: (randn(4, 2, 3),)),
    _module_row("lstm_cell", lambda: torch.nn.LSTMCell(3, 4), lambda: (randn(2, 3),)),
    _module_row("gru_cell", lambda: torch.nn.GRUCell(3, 4), lambda: (randn(2, 3),)),
    _module_row("multihead_attention", lambda: torch.nn.MultiheadAttention(4, 2), lambda: (randn(5, 2, 4),) * 3),
]


@pytest.mark.parametrize("fn, sample, options", MODULES)
def test_module(fn, sample, options):
    reason = "torch.autograd has no double backward for cuDNN RNNs (_cudnn_rnn_backward): the second-order reference"
    skip_cpu_reference_rows(options["msg"], dict.fromkeys(("lstm", "lstm_two_layers_batch_first", "gru"), reason))
    run(fn, sample, options)


def _transformer_row(name, train):
    def make():
        layer = torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0)
        return layer.train(train)

    # torch.autograd's reference goes through the flash kernel, which has no second derivative
    return _module_row(name, make, lambda: (randn(5, 2, 4),), second_order=False)


@pytest.mark.parametrize("fn, sample, options", [_transformer_row("train", True), _transformer_row("eval", False)])
def test_transformer_encoder_layer(fn, sample, options):
    run(fn, sample, options)


# -- per-example gradients ----------------------------------------------------------------


def check_per_example_grads(loss, params, *batch):
    """vmap(grad(loss), in_dims=(None, 0, ...)) against a loop of
    torch.autograd.grad over the examples."""
    with no_fallback():
        actual = torchxform.vmap(torchxform.grad(loss), in_dims=(None,) + (0,) * len(batch))(params, *batch)
    flat, spec = torch.utils._pytree.tree_flatten(params)
    per_example = []
    for i in range(batch[0].shape[0]):
        leaves = [p.detach().clone().requires_grad_() for p in flat]
        value = loss(torch.utils._pytree.tree_unflatten(leaves, spec), *(b[i] for b in batch))
        per_example.append(torch.autograd.grad(value, leaves))
    expected = torch.utils._pytree.tree_unflatten([torch.stack(g) for g in zip(*per_example)], spec)
    assert_close(actual, expected)


PER_EXAMPLE = [
    # (loss of (params, one example...), params, batch of examples); the nn
    # ops want a leading N, so each example gets one (x[None])
    case("conv2d", lambda p, x: F.conv2d(x[None], p[0], p[1], padding=1, groups=2).tanh().sum(),
         lambda: ((randn(4, 1, 3, 3), randn(4)), randn(3, 2, 5, 5))),
    case("conv_transpose2d", lambda w, x: F.conv_transpose2d(x[None], w, stride=2).pow(2).sum(),
         lambda: (randn(2, 3, 3, 3), randn(3, 2, 4, 4))),
    case("max_pool2d", lambda w, x: F.max_pool2d(x[None] * w, 2).pow(2).sum(), lambda: (randn(3, 1, 1), randn(3, 3, 4, 4))),
    case("avg_adaptive_pool", lambda w, x: F.adaptive_avg_pool2d(F.avg_pool2d(x[None] * w, 2), 1).pow(2).sum(),
         lambda: (randn(3, 1, 1), randn(3, 3, 4, 4))),
    case("layer_norm", lambda p, x: F.layer_norm(x, (4,), p[0], p[1]).pow(3).sum(),
         lambda: ((randn(4), randn(4)), randn(3, 2, 4))),
    case("group_norm", lambda p, x: F.group_norm(x[None], 2, p[0], p[1]).pow(3).sum(),
         lambda: ((randn(4), randn(4)), randn(3, 4, 5))),
    case("batch_norm_train", lambda p, x: F.batch_norm(x, None, None, p[0], p[1], training=True).pow(3).sum(),
         lambda: ((randn(4), randn(4)), randn(3, 5, 4, 2))),
    case("nll_loss2d_weight", lambda w, x, t: F.nll_loss((x * w)[None], t[None], CLASS_WEIGHT(), ignore_index=2),
         lambda: (randn(3, 1, 1), randn(4, 3, 2, 2), torch.randint(0, 3, (4, 2, 2)))),
    case("cross_entropy_smoothing", lambda w, x, t: F.cross_entropy(x @ w, t, label_smoothing=0.1),
         lambda: (randn(4, 3), randn(5, 2, 4), torch.randint(0, 3, (5, 2)))),
    case("mse_loss", lambda w, x, t: F.mse_loss(x * w, t), lambda: (randn(4), randn(3, 4), randn(3, 4))),
    case("upsample_pad", lambda w, x: F.pad(F.interpolate(x[None] * w, scale_factor=2, mode="bilinear"), (1, 1, 1, 1),
                                            mode="replicate").pow(2).sum(),
         lambda: (randn(2, 1, 1), randn(3, 2, 3, 3))),
    case("grid_sample", lambda w, x, g: F.grid_sample(x[None] * w, g[None], align_corners=False).pow(2).sum(),
         lambda: (randn(2, 1, 1), randn(3, 2, 4, 4), grid(3, 3, 3, 2))),
]


@pytest.mark.parametrize("loss, sample", PER_EXAMPLE)
@pytest.mark.filterwarnings("ignore:Default grid_sample and affine_grid behavior")
def test_per_example_grads(loss, sample):
    params, *batch = sample()
    check_per_example_grads(loss, params, *batch)


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 8, 3, stride=2, groups=2)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x), inplace=True), 2)
        x = F.gelu(self.norm(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_per_example_grads_small_cnn():
    """The classic torch.func example: per-sample gradients of a CNN's cross
    entropy, one example at a time inside vmap."""
    model = SmallCNN().double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(params, x, target):
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return F.cross_entropy(logits, target.unsqueeze(0))

    check_per_example_grads(loss, params, randn(6, 1, 10, 10), torch.randint(0, 5, (6,)))


def test_per_example_gradient_penalty():
    """vmap of grad of grad (per-example gradient penalties): the second-order
    rules (convolution_backward, max pooling's backward, the normalization
    kernels' decompositions, nll_loss_backward) under vmap."""
    w = randn(3, 2, 3, 3)
    target = torch.tensor([1])

    def loss(x):
        features = F.max_pool2d(F.conv2d(x[None], w, padding=1), 2).tanh()
        logits = F.layer_norm(features.flatten(1), (12,))[:, :3]
        return F.cross_entropy(logits, target) + F.group_norm(x[None], 2).pow(3).sum()

    def penalty(x):
        return torchxform.grad(loss)(x).pow(2).sum()

    xs = randn(4, 2, 4, 4)
    with no_fallback():
        actual = torchxform.vmap(torchxform.grad(penalty))(xs)
    expected = []
    for x in xs:
        leaf = x.clone().requires_grad_()
        (first,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
        expected.append(torch.autograd.grad(first.pow(2).sum(), leaf)[0])
    assert_close(actual, torch.stack(expected))
