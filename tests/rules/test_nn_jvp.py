"""Forward derivatives (JVPs) of the neural-network family (convolution,
pooling, normalization, losses, padding and resampling, attention, and the
modules built from them) against torch.autograd.forward_ad: jvp, vmap over
jvp and jvp over vjp (tests/autograd_harness.py), on the sample tables of
the VJP tests (tests/rules/test_nn_vjp.py); jacfwd against
torch.autograd.functional.jacobian; Hessians of a small CNN's loss."""

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch._decomp import decomposition_table
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchxform
from tests.autograd_harness import check_forward_derivatives, reference_jvp
from tests.harness import assert_close, cpu_reference_row, fixed_rand, fixed_randn, no_fallback
from tests.rules.test_nn_vjp import (
    CONVOLUTIONS,
    FLASH_CPU_ONLY,
    LOSSES,
    MODULES,
    MULTILABEL,
    NORMALIZATION,
    NOT_DIFFERENTIABLE_IN_TORCH,
    POOLING,
    RESAMPLING,
    RUNNING_MEAN,
    RUNNING_VAR,
    STATISTICS,
    TARGET,
    SmallCNN,
    _module_row,
    _one_thread,  # noqa: F401 (autouse fixtures: one intra-op thread, a fixed seed)
    _seed,  # noqa: F401
    grid,
    positive,
    randn,
)
from torchxform._core.registry import VJP_RULES, jvp_coverage

aten = torch.ops.aten
DOUBLE = torch.float64
COMPLEX = torch.complex128


# -- tables ----------------------------------------------------------------------------


def _is_reference_input(a):
    """A plain tensor that torch.autograd tracks: the oracle is running."""
    return type(a) is torch.Tensor and (a.requires_grad or fwAD.unpack_dual(a).tangent is not None)


def with_reference(fn, reference):
    """``fn`` for torchxform; ``reference`` (the same function, in ops that
    torch's forward AD differentiates) for torch.autograd's oracle."""

    def dispatch(*args):
        if any(_is_reference_input(a) for a in args):
            return reference(*args)
        return fn(*args)

    return dispatch


def forward_rows(table, reference=None, skip=(), xfail=None, over_reverse=None):
    """The VJP tests' rows as forward rows: their options mapped to
    check_forward_derivatives' (no second order there: no forward over
    reverse either, unless ``over_reverse`` says otherwise), ``reference``
    (fn -> oracle) for ops torch's forward AD lacks; ``xfail``: {row id:
    reason}."""
    rows = []
    for param in table:
        if param.id in skip:
            continue
        fn, sample, options = param.values
        options = dict(options)
        second_order = options.pop("second_order", True)
        options["over_reverse"] = second_order if over_reverse is None else over_reverse
        if reference is not None:
            fn = with_reference(fn, reference(fn))
        marks = [*param.marks]
        if param.id in (xfail or {}):
            marks.append(pytest.mark.xfail(reason=xfail[param.id], strict=True))
        rows.append(pytest.param(fn, sample, options, id=param.id, marks=marks))
    return rows


def row(name, fn, sample, **options):
    return pytest.param(fn, sample, {"msg": name, **options}, id=name)


def run(fn, sample, options):
    check_forward_derivatives(fn, sample, **options)


def crandn(*shape):
    return torch.randn(shape, dtype=COMPLEX)


# -- convolution ------------------------------------------------------------------------

COMPLEX_CONVOLUTIONS = [
    row("conv2d_complex", lambda x, w, b: F.conv2d(x, w, b, padding=1),
        lambda: (crandn(2, 3, 4, 4), crandn(2, 3, 3, 3), crandn(2))),
    row("conv_transpose1d_complex", lambda x, w: F.conv_transpose1d(x, w, stride=2),
        lambda: (crandn(2, 3, 4), crandn(3, 2, 3))),
]
# Constants that functions under test close over: made when a test runs (on its
# default device), the same values at each call.
CONV_INPUT = lambda: fixed_randn(2, 3, 5, 5, seed=3)
CONV_WEIGHT = lambda: fixed_randn(4, 3, 3, 3, seed=4)
CONVOLUTION_ONLY = [
    # one tangent at a time: the weight alone, the bias alone (the other arguments constants)
    row("conv2d_weight_only", lambda w: F.conv2d(CONV_INPUT(), w, padding=1), lambda: (randn(4, 3, 3, 3),)),
    row("conv2d_bias_only", lambda b: F.conv2d(CONV_INPUT(), CONV_WEIGHT(), b, stride=2), lambda: (randn(4),)),
]


@pytest.mark.parametrize("fn, sample, options", forward_rows(CONVOLUTIONS) + COMPLEX_CONVOLUTIONS + CONVOLUTION_ONLY)
def test_convolution(fn, sample, options):
    run(fn, sample, options)


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, True], [False, True, False]], ids=str)
def test_convolution_backward(mask):
    """convolution_backward's own JVP: grad_output, input and weight moving
    at once, every output (the masked-off ones are None)."""

    def fn(grad_output, x, w):
        grads = aten.convolution_backward.default(grad_output, x, w, [6], [2, 1], [1, 0], [1, 1], False, [0, 0], 2, mask)
        return tuple(g for g in grads if g is not None)

    run(fn, lambda: (randn(2, 6, 3, 3), randn(2, 4, 5, 5), randn(6, 2, 3, 3)), {"msg": f"convolution_backward {mask}"})


# -- pooling ----------------------------------------------------------------------------


@pytest.mark.parametrize("fn, sample, options", forward_rows(POOLING))
def test_pooling(fn, sample, options):
    run(fn, sample, options)


# -- normalization ----------------------------------------------------------------------

BN_INPUT = lambda: fixed_randn(4, 3, 5, seed=2)
NORMALIZATION_ONLY = [
    row("batch_norm_train_bias_only", lambda b: F.batch_norm(BN_INPUT(), None, None, None, b, training=True),
        lambda: (randn(3),)),
    row("batch_norm_eval_weight_only", lambda w: F.batch_norm(BN_INPUT(), RUNNING_MEAN(), RUNNING_VAR(), w, training=False),
        lambda: (randn(3),)),
    row("layer_norm_bias_only", lambda b: F.layer_norm(BN_INPUT(), (5,), None, b), lambda: (randn(5),)),
    row("group_norm_weight_only", lambda w: F.group_norm(BN_INPUT(), 3, w), lambda: (randn(3),)),
]


@pytest.mark.parametrize("fn, sample, options", forward_rows(NORMALIZATION) + NORMALIZATION_ONLY)
def test_normalization(fn, sample, options):
    run(fn, sample, options)


@pytest.mark.parametrize("op, definition, sample", STATISTICS)
def test_normalization_statistics_tangents(op, definition, sample):
    """NOTE [Normalization statistics]: group norm's mean and inverse
    standard deviation get tangents (reference: their definition); batch
    norm's and layer norm's zero ones, as torch's forward formulas give
    (reference: forward_ad on the op)."""
    x = sample()
    t = torch.randn_like(x)
    with no_fallback():
        out, tangents = torchxform.jvp(op, (x,), (t,))
    expected_out, expected = reference_jvp(definition or op, (x,), (t,))
    assert_close(out, expected_out)
    assert_close(tangents, expected)


# -- losses -----------------------------------------------------------------------------


def _multi_margin(x, target, p=1, margin=1, weight=None, reduction="mean"):
    rows, y = (x, target) if x.dim() == 2 else (x[None], target.reshape(1))
    picked = rows.gather(1, y[:, None])
    hot = F.one_hot(y, rows.shape[1]).to(rows.dtype)
    loss = (margin - picked + rows).clamp_min(0).pow(p) * (1 - hot)
    if weight is not None:
        loss = loss * weight[y][:, None]
    loss = loss.sum(1) / rows.shape[1]
    return _reduce(loss if x.dim() == 2 else loss[0], reduction)


def _multilabel_margin(x, target, reduction="mean"):
    rows, y = (x, target) if x.dim() == 2 else (x[None], target[None])
    valid = ((y < 0).cumsum(1) == 0)
    slots = F.one_hot(y.clamp_min(0), rows.shape[1]).to(rows.dtype) * valid[..., None]  # [N, S, C]
    others = 1 - slots.amax(1)  # the classes that are not targets
    picked = (slots * rows[:, None]).sum(2, keepdim=True)  # [N, S, 1]
    loss = ((1 - picked + rows[:, None]).clamp_min(0) * valid[..., None] * others[:, None]).sum((1, 2)) / rows.shape[1]
    return _reduce(loss if x.dim() == 2 else loss[0], reduction)


def _reduce(loss, reduction):
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


def _huber(x, t, reduction="mean", delta=1.0):
    d = (x - t).abs()
    return _reduce(torch.where(d < delta, 0.5 * d * d, delta * (d - 0.5 * delta)), reduction)


def _soft_margin(x, t, reduction="mean"):
    return _reduce((-t * x).exp().log1p(), reduction)


def by_definition(**definitions):
    """A ``reference`` for forward_rows: the row's function with the named
    torch.nn.functional functions replaced by their definitions (torch's
    forward AD, or its forward over reverse, lacks formulas for them)."""

    def reference(fn):
        def definition(*args):
            saved = {name: getattr(F, name) for name in definitions}
            try:
                for name, replacement in definitions.items():
                    setattr(F, name, replacement)
                return fn(*args)
            finally:
                for name, original in saved.items():
                    setattr(F, name, original)

        return definition

    return reference


# torch's forward AD has no formula for the margin losses, nor for the
# backward kernels of huber and soft margin loss (forward over reverse)
WRITTEN_OUT = {"multi_margin_loss": _multi_margin, "multilabel_margin_loss": _multilabel_margin,
               "huber_loss": _huber, "soft_margin_loss": _soft_margin}
BY_DEFINITION = [p for p in LOSSES if any(p.id.startswith(name) for name in WRITTEN_OUT)]
# the definitions are twice differentiable: forward over reverse too
DEFINITION_ROWS = forward_rows(BY_DEFINITION, reference=by_definition(**WRITTEN_OUT), over_reverse=True)
# torch's forward AD gives nan at 0 and 1 (0 * inf from the target's term): tested against reverse mode below
AT_BOUNDS = "binary_cross_entropy_at_bounds"


@pytest.mark.parametrize(
    "fn, sample, options", forward_rows(LOSSES, skip={p.id for p in BY_DEFINITION} | {AT_BOUNDS}) + DEFINITION_ROWS
)
@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")  # torch's own, broadcasting
def test_loss(fn, sample, options):
    run(fn, sample, options)


def test_binary_cross_entropy_at_bounds():
    """At 0 and 1 the kernel's EPSILON keeps the slope finite: the tangent is
    torch's (reverse-mode) gradient times the tangent."""
    (param,) = [p for p in LOSSES if p.id == AT_BOUNDS]
    fn, sample, _ = param.values
    (x,) = sample()
    t = torch.randn_like(x)
    with no_fallback():
        _, tangent = torchxform.jvp(fn, (x,), (t,))
    leaf = x.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(fn(leaf), leaf)
    assert_close(tangent, (gradient * t).sum())


@pytest.mark.parametrize("loss, definition, sample", NOT_DIFFERENTIABLE_IN_TORCH)
def test_loss_arguments_torch_does_not_differentiate(loss, definition, sample):
    """Weights and soft_margin_loss's target: tangents as the VJPs give
    gradients, against the losses' definitions."""
    args = sample()
    tangents = tuple(torch.randn_like(a) for a in args)
    with no_fallback():
        out, tangent = torchxform.jvp(loss, args, tangents)
    expected_out, expected = reference_jvp(definition, args, tangents)
    assert_close((out, tangent), (expected_out, expected))


@pytest.mark.parametrize(
    "loss",
    [lambda x, w: F.nll_loss(x, TARGET(), w), lambda x, w: F.multi_margin_loss(x, TARGET(), weight=w)],
    ids=["nll_loss", "multi_margin_loss"],
)
def test_class_weight_tangent_raises(loss):
    with pytest.raises(RuntimeError, match="jvp: .* not differentiable with respect to its class weights"):
        torchxform.jvp(loss, (randn(4, 3), positive(3)), (randn(4, 3), randn(3)))


# -- padding, resampling, sampling, activations -----------------------------------------

COMPLEX_RESAMPLING = [
    row("constant_pad_complex", lambda x: F.pad(x, (1, 2, 0, 1), value=0.5), lambda: (crandn(2, 3, 4),)),
    row("reflection_pad2d_complex", lambda x: F.pad(x, (2, 1, 1, 2), mode="reflect"), lambda: (crandn(2, 3, 5, 4),)),
    row("replication_pad1d_complex", lambda x: F.pad(x, (2, 1), mode="replicate"), lambda: (crandn(2, 3, 5),)),
    row("pixel_shuffle_complex", lambda x: F.pixel_shuffle(x, 2), lambda: (crandn(2, 8, 3, 3),)),
    row("channel_shuffle_complex", lambda x: F.channel_shuffle(x, 2), lambda: (crandn(2, 6, 3, 3),)),
    row("unfold_complex", lambda x: F.unfold(x, (2, 3), padding=1, stride=2), lambda: (crandn(2, 3, 5, 6),)),
    row("fold_complex", lambda x: F.fold(x, (4, 5), (2, 2)), lambda: (crandn(2, 12, 12),)),
]

GRID_MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
GRID_PADDING = {"zeros": 0, "border": 1, "reflection": 2}


def _grid_sample_by_decomposition(x, g, mode="bilinear", padding_mode="zeros", align_corners=None):
    """torch._decomp's grid_sampler_2d: the same function in differentiable ops."""
    sample = decomposition_table[aten.grid_sampler_2d.default]
    return sample(x, g, GRID_MODES[mode], GRID_PADDING[padding_mode], bool(align_corners))


GRID_2D = {p.id for p in RESAMPLING if p.id.startswith("grid_sample") and "3d" not in p.id}
GRID_ROWS = forward_rows(
    [p for p in RESAMPLING if p.id in GRID_2D], reference=by_definition(grid_sample=_grid_sample_by_decomposition)
)


@pytest.mark.parametrize(
    "fn, sample, options",
    forward_rows(RESAMPLING, skip=GRID_2D | {"grid_sample_3d"}) + COMPLEX_RESAMPLING + GRID_ROWS,
)
@pytest.mark.filterwarnings("ignore:Default grid_sample and affine_grid behavior")
def test_resampling(fn, sample, options):
    run(fn, sample, options)


def test_grid_sample_3d():
    """torch has no forward AD (and no decomposition) for grid_sampler_3d:
    the reference is the reverse-mode Jacobian times the tangents."""
    x, g = randn(1, 2, 3, 4, 3), grid(1, 2, 3, 2, 3)
    fn = lambda x, g: F.grid_sample(x, g, align_corners=False)
    out = fn(x, g)
    jx, jg = (j.flatten(out.dim()) for j in torch.autograd.functional.jacobian(fn, (x, g)))
    tx, tgs = torch.randn_like(x), torch.randn((3,) + g.shape, dtype=DOUBLE)
    expected = torch.stack([(jx @ tx.flatten() + jg @ tg.flatten()) for tg in tgs])
    with no_fallback():
        actual, tangent = torchxform.jvp(fn, (x, g), (tx, tgs[0]))
        batched = torchxform.vmap(lambda tg: torchxform.jvp(fn, (x, g), (tx, tg))[1])(tgs)
    assert_close((actual, tangent, batched), (out, expected[0], expected))


# -- attention --------------------------------------------------------------------------


def _math_backend(fn):
    """torch's forward AD has no formula for the CPU flash kernel: the
    oracle takes the math backend."""

    def reference(*args):
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*args)

    return reference


def _flash_with_logsumexp(q, k, v):
    return aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v)


def _flash_definition(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.softmax(-1) @ v, scores.logsumexp(-1)


QKV = lambda: (randn(2, 3, 4, 6), randn(2, 3, 5, 6), randn(2, 3, 5, 6))
FLOAT_MASK = lambda: fixed_randn(4, 5, seed=1, dtype=DOUBLE)
BOOL_MASK = lambda: fixed_rand(4, 5, seed=1, dtype=torch.float32) > 0.3

ATT_Q = lambda: fixed_randn(2, 3, 4, 6, seed=5)
ATT_K = lambda: fixed_randn(2, 3, 5, 6, seed=6)
ATTENTION = [
    row("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), QKV),
    row("sdpa_causal", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), QKV),
    row("sdpa_bool_mask_scale",
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=BOOL_MASK(), scale=0.3), QKV),
    row("sdpa_float_mask", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=FLOAT_MASK()), QKV),
    row("sdpa_self_attention", lambda x: F.scaled_dot_product_attention(x, x, x), lambda: (randn(2, 3, 4, 6),)),
    row("sdpa_value_only", lambda v: F.scaled_dot_product_attention(ATT_Q(), ATT_K(), v), lambda: (randn(2, 3, 5, 6),)),
]


@pytest.mark.parametrize(
    "fn, sample, options",
    forward_rows(ATTENTION, reference=_math_backend)
    + [
        cpu_reference_row(
            row("flash_logsumexp", with_reference(_flash_with_logsumexp, _flash_definition), QKV), FLASH_CPU_ONLY
        )
    ],
)
def test_attention(fn, sample, options):
    run(fn, sample, options)


# -- modules ----------------------------------------------------------------------------


def _transformer(train):
    def make():
        return torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0).train(train)

    return make


MODULE_ROWS = forward_rows(
    MODULES
    + [
        _module_row("conv2d", lambda: torch.nn.Conv2d(2, 3, 3, padding=1), lambda: (randn(2, 2, 5, 5),)),
        _module_row("batch_norm_train", lambda: torch.nn.BatchNorm2d(3), lambda: (randn(4, 3, 3, 3),)),
        _module_row("batch_norm_eval", lambda: torch.nn.BatchNorm2d(3).eval(), lambda: (randn(4, 3, 3, 3),)),
        _module_row("layer_norm", lambda: torch.nn.LayerNorm((3, 4)), lambda: (randn(2, 3, 4),)),
        _module_row("transformer_encoder_layer_train", _transformer(True), lambda: (randn(5, 2, 4),)),
        _module_row("transformer_encoder_layer_eval", _transformer(False), lambda: (randn(5, 2, 4),)),
    ],
    reference=_math_backend,
)


# torch.nn's recurrent modules take fused kernels on CUDA, which torch's forward AD (the oracle) lacks.
CUDA_RNN_KERNELS = {
    "lstm": "_cudnn_rnn", "lstm_two_layers_batch_first": "_cudnn_rnn", "gru": "_cudnn_rnn",
    "lstm_cell": "_thnn_fused_lstm_cell", "gru_cell": "_thnn_fused_gru_cell",
}
MODULE_ROWS = [
    cpu_reference_row(p, f"torch's forward AD has no formula for {CUDA_RNN_KERNELS[p.id]}, which CUDA runs")
    if p.id in CUDA_RNN_KERNELS else p
    for p in MODULE_ROWS
]


@pytest.mark.parametrize("fn, sample, options", MODULE_ROWS)
def test_module(fn, sample, options):
    run(fn, sample, options)


# -- Hessians of a small CNN's loss -------------------------------------------------------


def _cnn_loss():
    model = SmallCNN().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, target = randn(3, 1, 8, 8), torch.tensor([1, 4, 0])

    def loss(params):
        return F.cross_entropy(functional_call(model, params, (x,)), target)

    return loss, params


def test_small_cnn_hessian_vector_product():
    """jvp(grad(loss)): forward over reverse through every layer's backward
    ops, against torch.autograd double backward."""
    loss, params = _cnn_loss()
    vector = {k: torch.randn_like(v) for k, v in params.items()}
    with no_fallback():
        _, hvp = torchxform.jvp(torchxform.grad(loss), (params,), (vector,))
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    grads = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
    expected = torch.autograd.grad(grads, list(leaves.values()), list(vector.values()))
    assert_close(list(hvp.values()), list(expected))


def test_small_cnn_hessian():
    """torchxform.hessian (vmap of jvp over vjp) with respect to the first
    convolution's weight, against torch.autograd.functional.hessian."""
    loss, params = _cnn_loss()

    def of_weight(w):
        return loss({**params, "conv1.weight": w})

    w = params["conv1.weight"]
    with no_fallback():
        actual = torchxform.hessian(of_weight)(w)
    assert_close(actual, torch.autograd.functional.hessian(of_weight, w))


# -- jacfwd -------------------------------------------------------------------------------

JACOBIANS = [
    row("conv2d", lambda x, w: F.conv2d(x, w, stride=2, padding=1), lambda: (randn(1, 2, 4, 4), randn(3, 2, 3, 3))),
    row("max_pool2d", lambda x: F.max_pool2d(x, 2), lambda: (randn(1, 2, 4, 4),)),
    row("batch_norm_train", lambda x, w: F.batch_norm(x, None, None, w, training=True), lambda: (randn(3, 2, 3), randn(2))),
    row("layer_norm", lambda x, b: F.layer_norm(x, (4,), None, b), lambda: (randn(3, 4), randn(4))),
    row("cross_entropy", lambda x: F.cross_entropy(x, TARGET()), lambda: (randn(4, 3),)),
    row("multilabel_margin_loss", lambda x: F.multilabel_margin_loss(x, MULTILABEL(), reduction="none"),
        lambda: (randn(4, 3),)),
    row("grid_sample", lambda x, g: F.grid_sample(x, g, mode="bicubic", align_corners=True),
        lambda: (randn(1, 2, 3, 4), grid(1, 2, 3, 2))),
    row("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), lambda: (randn(1, 2, 3, 4),) * 3),
]


@pytest.mark.parametrize("fn, sample, options", JACOBIANS)
def test_jacfwd(fn, sample, options):
    args = sample()
    argnums = tuple(range(len(args)))
    with no_fallback():
        actual = torchxform.jacfwd(fn, argnums=argnums)(*args)
    assert_close(actual, torch.autograd.functional.jacobian(fn, args), msg=options["msg"])


# -- per-example jvp and forward over forward --------------------------------------------------

GRID_BICUBIC = with_reference(
    lambda x, g: F.grid_sample(x, g, mode="bicubic", align_corners=False),
    lambda x, g: _grid_sample_by_decomposition(x, g, "bicubic", "zeros", False),
)
CAUSAL = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
PER_EXAMPLE = [
    # (name, fn, one example's arguments): rules that reshape or expand their tangents
    row("conv2d", lambda x, w, b: F.conv2d(x, w, b, padding=1), lambda: (randn(2, 2, 4, 4), randn(3, 2, 3, 3), randn(3))),
    row("batch_norm_train", lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
        lambda: (randn(4, 3, 5), randn(3), randn(3))),
    row("group_norm", lambda x, w, b: F.group_norm(x, 2, w, b), lambda: (randn(2, 4, 5), randn(4), randn(4))),
    row("layer_norm", lambda x, w, b: F.layer_norm(x, (5,), w, b), lambda: (randn(4, 3, 5), randn(5), randn(5))),
    row("grid_sample_bicubic", GRID_BICUBIC, lambda: (randn(2, 2, 5, 4), grid(2, 3, 4, 2))),
    row("sdpa_causal", with_reference(CAUSAL, _math_backend(CAUSAL)), QKV),
]


@pytest.mark.parametrize("fn, sample, options", PER_EXAMPLE)
def test_vmap_of_jvp_over_examples(fn, sample, options):
    """vmap over primals and tangents together (the examples differ, not only
    the directions), against a loop of forward_ad."""
    examples = [sample() for _ in range(3)]
    tangents = [tuple(torch.randn_like(a) for a in args) for args in examples]
    stacked = [torch.stack(column) for column in zip(*examples)]
    stacked_tangents = [torch.stack(column) for column in zip(*tangents)]
    n = len(stacked)
    with no_fallback():
        actual = torchxform.vmap(lambda *a: torchxform.jvp(fn, a[:n], a[n:])[1])(*stacked, *stacked_tangents)
    expected = torch.stack([reference_jvp(fn, args, t)[1] for args, t in zip(examples, tangents)])
    assert_close(actual, expected, msg=options["msg"])


@pytest.mark.parametrize("fn, sample, options", PER_EXAMPLE)
def test_forward_over_forward(fn, sample, options):
    """jacfwd(jacfwd): the JVP rules are differentiable by themselves.  The
    reference is reverse over reverse (torch's forward formulas give the
    statistics outputs no tangent, so its own forward over forward is off)."""
    args = sample()

    def scalar(x):
        return fn(x, *args[1:]).pow(2).sum()

    with no_fallback():
        actual = torchxform.jacfwd(torchxform.jacfwd(scalar))(args[0])
    expected = torch.autograd.functional.hessian(scalar, args[0])  # its x requires grad: the oracle's branch
    assert_close(actual, expected, msg=options["msg"])


# -- coverage -------------------------------------------------------------------------------

FAMILY = ("conv", "pooling", "norm", "loss", "nn")
FAMILY_OPS = sorted(
    (op for op, rule in VJP_RULES.items() if getattr(rule, "__module__", "").rpartition(".")[2] in FAMILY), key=str
)


def test_every_op_with_a_vjp_rule_has_a_jvp_rule():
    """No op of the family is left to its decomposition or to the JVP
    derived from its VJP rule (NOTE [JVP from a VJP])."""
    assert len(FAMILY_OPS) > 80
    assert [op for op in FAMILY_OPS if jvp_coverage(op) != "rule"] == []
