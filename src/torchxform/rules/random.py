"""Random ops: every ATen op tagged ``torch.Tag.nondeterministic_seeded``
that user code reaches, under vmap's three ``randomness`` modes.

NOTE [vmap randomness]
Random ops reach their rule even without batched arguments (``bind`` routes
them to the top of the stack), with ``current_vmap()`` giving the mode:

* ``'error'``: every random op raises (torch.func's message).
* ``'same'``: one draw of the logical shape, shared by the whole batch: the
  result is unbatched; an in-place op on a batched ``self`` writes that one
  draw into every example.  Where parameters are batched (``bernoulli(p)``,
  ``normal(mean, std)``), the examples share the underlying uniform/normal
  draws and each applies its own parameters; where no such formulation
  exists (poisson, gamma, dirichlet, binomial, multinomial) this raises
  torch.func's error.
* ``'different'``: independent draws per example: the op draws the physical
  ``[B, *shape]`` tensor at once (unbatched parameters are expanded to the
  batch first), so for a seeded RNG the result equals the plain op drawing
  ``[B, *shape]``.  An in-place op on an unbatched ``self`` raises.

Every draw goes through ``lower``: it binds the op one level down, so an
outer vmap sees it and applies its own mode (nested 'different' gives B1*B2
independent draws; 'same' inside 'different' shares draws across the inner
batch only).  Deterministic ops (``new_empty``, ``select``, ...) on lower
values route by themselves.
"""

from __future__ import annotations

import torch

from .._core.dispatch import lower
from .._core.registry import (
    aten_overloads,
    overloads,
    register_batching,
    register_batching_each,
    register_nondifferentiable,
    register_vjp,
)
from .._core.schema import is_out_variant
from .._core.tracer import Tracer
from ..transforms.vmap import RANDOMNESS_ERROR_MESSAGE, current_vmap
from ._batching import front_padded, materialize, move_bdim_to_front
from .creation import like_batch_call
from .elementwise import broadcast_batched

aten = torch.ops.aten
Tensor = torch.Tensor

_SAME_WITH_BATCHED_INPUT = (
    "Vmap does not currently support same randomness with a batched tensor input. "
    "Please file an issue with functorch"
)
_DIFFERENT_INPLACE_ON_UNBATCHED = (
    "vmap: Cannot ask for different inplace randomness on an unbatched tensor. This will appear like same "
    "randomness. If this is necessary for your usage, please file an issue with functorch."
)
_BERNOULLI_P_RANGE = (
    "Expected p_in >= 0 && p_in <= 1 to be true, but got false.  (Could this error message be improved?  "
    "If so, please report an enhancement request to PyTorch.)"
)


def _randomness():
    """The running vmap interpreter; raises in randomness='error' mode."""
    interp = current_vmap()
    if interp.randomness == "error":
        raise RuntimeError(RANDOMNESS_ERROR_MESSAGE)
    return interp


def _logical_shape(x, bdim):
    shape = x.shape
    return shape if bdim is None else shape[:bdim] + shape[bdim + 1 :]


def _draw(packet, shape, dtype, device, generator=None):
    """``torch.rand``/``torch.randn`` of ``shape``, one level down."""
    if generator is None:
        return lower(packet.default, shape, dtype=dtype, device=device)
    return lower(packet.generator, shape, generator=generator, dtype=dtype, device=device)


def _check_all(ok, message):
    """Raise RuntimeError(message) unless every element of ``ok`` holds.

    For parameters eager validates by value (bernoulli's p, normal's std)
    where a 'same' rule does not run the eager op: vmap must not return
    numbers where eager raises.  One check covers the whole batch: on plain
    values it is read on the host, as eager's normal does (a device-side
    assert on an accelerator would poison the whole process); under nested
    vmap, where no value can be read, ``_assert_async`` runs at the lower
    levels (a RuntimeError on the CPU)."""
    ok = ok.all()
    if isinstance(ok, Tracer):
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise RuntimeError(message)


def _require_floating(name, dtype):
    if not dtype.is_floating_point:
        raise NotImplementedError(f'"{name}" not implemented for \'{dtype}\'')


# --------------------------------------------------------------------------
# Factories: rand, randn, randint, normal(float, float, size), randperm.
# --------------------------------------------------------------------------


def factory_batch(op, bdims, *args, size_at, **kwargs):
    """'different' draws [B, *size] at once; 'same' draws size once."""
    interp = _randomness()
    if interp.randomness == "same":
        return lower(op, *args, **kwargs), None
    args = list(args)
    args[size_at] = (interp.batch_size, *args[size_at])
    return lower(op, *args, **kwargs), 0


for _packet, _names, _size_at in [
    (aten.rand, ("default", "generator"), 0),
    (aten.randn, ("default", "generator"), 0),
    (aten.randint, ("default", "generator"), 1),
    (aten.randint, ("low", "low_generator"), 2),
    (aten.normal, ("float_float",), 2),
]:
    register_batching_each(overloads(_packet, *_names), factory_batch, size_at=_size_at)
del _packet, _names, _size_at

# randperm(n) values that do not fit the dtype: eager's checks (the 'different'
# rule below computes in int64 and would not notice).
_C_TYPE_NAMES = {torch.int8: "int8_t", torch.uint8: "uint8_t", torch.int16: "int16_t", torch.int32: "int"}


def _check_randperm(n, dtype):
    if n < 0:
        raise RuntimeError(f"Trying to create tensor with negative dimension {n}: [{n}]")
    if dtype is torch.bool:
        raise NotImplementedError("\"randperm\" not implemented for 'Bool'")
    if dtype in _C_TYPE_NAMES and n - 1 > torch.iinfo(dtype).max:
        raise RuntimeError(f"value cannot be converted to type {_C_TYPE_NAMES[dtype]} without overflow")
    if dtype is torch.float16 and n > 2049:
        raise RuntimeError("n cannot be greater than 2049 for Half type.")


@register_batching(aten.randperm.default, aten.randperm.generator)
def randperm_batch(op, bdims, n, **kwargs):
    """'different': one permutation per example, vectorized as the argsort
    of i.i.d. uniform keys [B, n] (float64: ties have probability ~n^2/2^53),
    which is a uniformly random permutation of each row."""
    interp = _randomness()
    if interp.randomness == "same":
        return lower(op, n, **kwargs), None
    dtype = kwargs.get("dtype") or torch.int64
    _check_randperm(n, dtype)
    keys = _draw(aten.rand, (interp.batch_size, n), torch.float64, kwargs.get("device"), kwargs.get("generator"))
    return keys.argsort(dim=1).to(dtype), 0


# --------------------------------------------------------------------------
# Ops whose tensor argument only gives the shape (rand_like, randint_like,
# bernoulli(x, p=float), and the out-of-place forms of the in-place ops).
# --------------------------------------------------------------------------


def like_random_batch(op, bdims, x, *args, memory_format=None, **kwargs):
    interp = _randomness()
    bdim = bdims[0]
    if interp.randomness == "same" and (bdim is None or interp.batch_size):
        if bdim is not None:
            x = x.select(bdim, 0)  # any example: only its shape and strides matter
        if memory_format is not None:
            kwargs["memory_format"] = memory_format
        return lower(op, x, *args, **kwargs), None
    # 'different' (or 'same' over an empty batch, where it makes no difference)
    if bdim is None:
        x, bdim = x.expand(interp.batch_size, *x.shape), 0
    return like_batch_call(lambda *a, **k: lower(op, *a, **k), x, bdim, memory_format, args, kwargs)


register_batching_each(
    [
        *overloads(aten.rand_like, "default", "generator"),
        *overloads(aten.randn_like, "default", "generator"),
        *overloads(aten.randint_like, "default", "generator", "low_dtype", "low_generator_dtype"),
        aten.bernoulli.p,
        *overloads(aten.uniform, "default"),
        *overloads(aten.normal_functional, "default"),
        *overloads(aten.exponential, "default"),
        *overloads(aten.geometric, "default"),
        *overloads(aten.log_normal, "default"),
        *overloads(aten.cauchy, "default"),
        *overloads(aten.random, "default", "from", "to"),
    ],
    like_random_batch,
)


@register_batching(*overloads(aten.randint_like, "Tensor", "Tensor_generator"))
def randint_like_tensor_batch(op, bdims, x, high, *, generator=None, memory_format=None, **kwargs):
    """randint_like(x, high) with a 0-dim tensor ``high``, which may differ
    per example: uniform int64 draws reduced modulo each example's high
    (bias ~high/2^63).  Under 'same' the examples share the draws."""
    if bdims[1] is None:
        if generator is not None:
            kwargs["generator"] = generator
        return like_random_batch(op, bdims, x, high, memory_format=memory_format, **kwargs)
    interp = _randomness()
    high = move_bdim_to_front(high, bdims[1])
    if high.dim() != 1:
        raise RuntimeError("high must be a scalar tensor and on CPU")
    high = high.to(torch.int64)  # eager reads high.item<int64_t>()
    _check_all(high > 0, "random_ expects 'from' to be less than 'to', but got from=0 >= to=high (<= 0)")
    x = materialize(x, bdims[0], interp.batch_size)
    shape = x.shape[1:]
    draw_shape = shape if interp.randomness == "same" else x.shape
    draw_kwargs = dict(dtype=torch.int64, device=x.device)
    if generator is not None:
        draw_kwargs["generator"] = generator
    draw_op = aten.randint.low if generator is None else aten.randint.low_generator
    bits = lower(draw_op, 0, 2**63 - 1, draw_shape, **draw_kwargs)
    # [B] highs against [B, *shape] (or shared [*shape]) draws -> [B, *shape]
    values = bits.remainder(high.view((-1,) + (1,) * len(shape)))
    out, bdim = like_batch_call(aten.empty_like.default, x, 0, memory_format, (), kwargs)
    move_bdim_to_front(out, bdim).copy_(values)
    return out, bdim


# --------------------------------------------------------------------------
# In-place random ops: uniform_, normal_, bernoulli_(float), random_, ...
# --------------------------------------------------------------------------


def inplace_random_batch(op, bdims, x, *args, **kwargs):
    interp = _randomness()
    bdim = bdims[0]
    if bdim is None:
        if interp.randomness == "different":
            raise RuntimeError(_DIFFERENT_INPLACE_ON_UNBATCHED)
        lower(op, x, *args, **kwargs)
        return x, None
    if interp.randomness == "different":
        lower(op, x, *args, **kwargs)  # every physical element: its own draw
        return x, bdim
    # 'same': one draw of the logical shape, written into every example.  The
    # draw buffer comes from x.new_empty so that it is batched wherever x is
    # at lower levels (an outer 'different' then draws per outer example).
    front = move_bdim_to_front(x, bdim)
    draw = front.new_empty(front.shape[1:])
    lower(op, draw, *args, **kwargs)
    front.copy_(draw)
    return x, bdim


register_batching_each(
    [
        aten.uniform_.default,
        aten.normal_.default,
        aten.exponential_.default,
        aten.geometric_.default,
        aten.log_normal_.default,
        aten.cauchy_.default,
        *overloads(aten.random_, "default", "from", "to"),
        aten.bernoulli_.float,
    ],
    inplace_random_batch,
)


# --------------------------------------------------------------------------
# Ops with tensor parameters that broadcast elementwise: normal(mean, std),
# bernoulli(p), poisson(rate), _standard_gamma(alpha), binomial(count, prob).
# --------------------------------------------------------------------------


def param_random_batch(op, bdims, *args, same=None, **kwargs):
    """'different': the op on the broadcast physical parameters (expanded to
    the batch when none is batched).  'same': the plain op when no parameter
    is batched, else the op's ``same`` rule, else torch.func's error."""
    interp = _randomness()
    if not any(b is not None for b in bdims):
        if interp.randomness == "same":
            return lower(op, *args, **kwargs), None
        # Independent draws: give one parameter the batch, the rest broadcast.
        args, bdims = list(args), list(bdims)
        i = next(i for i, a in enumerate(args) if isinstance(a, Tensor))
        args[i], bdims[i] = args[i].expand(interp.batch_size, *args[i].shape), 0
    elif interp.randomness == "same":
        if same is None:
            raise RuntimeError(_SAME_WITH_BATCHED_INPUT)
        return same(bdims, *args, **kwargs)
    tensors = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
    if len(tensors) == 1:  # elementwise in one tensor: the batch stays where it is
        return lower(op, *args, **kwargs), bdims[tensors[0]]
    # [B,3] mean, [2,3] std -> [B,1,3], [2,3] -> both [B,2,3] (binomial
    # sizes its result from `count`, so every parameter gets the full shape)
    args = broadcast_batched(args, bdims, skip_promotion=range(len(args)))
    for i, t in zip(tensors, torch.broadcast_tensors(*(args[i] for i in tensors))):
        args[i] = t
    return lower(op, *args, **kwargs), 0


def _detached(v):
    return v.detach() if isinstance(v, Tensor) else v


def _normal_same(bdims, mean, std=1.0, *, generator=None):
    """normal(mean, std) under 'same' with a batched mean or std: one
    standard-normal draw z of the logical shape shared by the batch, and
    mean + std * z per example (how eager samples normal too).  Detached,
    as eager's normal has zero derivative in mean and std."""
    params = [v for v in (mean, std) if isinstance(v, Tensor)]
    dtype = params[0].dtype  # eager: mean's dtype, else std's
    _require_floating("normal_kernel_cpu", dtype)
    if isinstance(std, Tensor):
        _check_all(std >= 0, "normal expects all elements of std >= 0.0")
    elif std < 0:
        raise RuntimeError(f"normal expects std >= 0.0, but found std {std:g}")
    shapes = [_logical_shape(v, b) for v, b in zip((mean, std), bdims) if isinstance(v, Tensor)]
    shape = torch.broadcast_shapes(*shapes)
    mean, std = broadcast_batched((_detached(mean), _detached(std)), bdims, skip_promotion=(0, 1))
    z = _draw(aten.randn, shape, dtype, params[0].device, generator)
    # [B,1,3] mean + [2,3] std * [2,3] z -> [B,2,3]
    return (mean + std * z).to(dtype), 0


def _bernoulli_same(p, shape, generator):
    """bernoulli(p) under 'same' with a batched p (batch in front,
    broadcasting against ``shape``): one uniform draw u of the logical shape
    shared by the batch, compared with each example's p (eager samples
    u < p too).  Returns a bool tensor [B, *shape]."""
    _require_floating("bernoulli_tensor_cpu_p_", p.dtype)
    _check_all((p >= 0) & (p <= 1), _BERNOULLI_P_RANGE)
    dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
    return _draw(aten.rand, shape, dtype, p.device, generator) < p


def _bernoulli_default_same(bdims, p, *, generator=None):
    p = move_bdim_to_front(p, bdims[0])
    return _bernoulli_same(p, p.shape[1:], generator).to(p.dtype), 0


register_batching_each(
    overloads(aten.normal, "Tensor_float", "float_Tensor", "Tensor_Tensor"), param_random_batch, same=_normal_same
)
register_batching_each([aten.bernoulli.default], param_random_batch, same=_bernoulli_default_same)
register_batching_each(
    [aten.poisson.default, aten._standard_gamma.default, aten.binomial.default], param_random_batch
)


@register_batching(aten.bernoulli.Tensor)
def bernoulli_tensor_batch(bdims, x, p, *, generator=None):
    """bernoulli(x, p): x gives the shape and dtype, p broadcasts to x."""
    interp = _randomness()
    x_bdim, p_bdim = bdims[0], bdims[1]
    if p_bdim is None and interp.randomness == "same":
        return like_random_batch(aten.bernoulli.Tensor, bdims, x, p, generator=generator)
    x = materialize(x, x_bdim, interp.batch_size)  # [B, *shape]: p broadcasts from the right
    if p_bdim is not None:
        p = front_padded(p, p_bdim, x.dim() - 1)  # [B,3] p for [B,2,3] x -> [B,1,3]
    if interp.randomness == "different":
        return lower(aten.bernoulli.Tensor, x, p, generator=generator), 0
    return _bernoulli_same(p, x.shape[1:], generator).to(x.dtype), 0


@register_batching(aten.bernoulli_.Tensor)
def bernoulli_inplace_tensor_batch(bdims, x, p, *, generator=None):
    """x.bernoulli_(p).  A batched p comes with a batched x (the interpreter
    rejects writing batched values into an unbatched x)."""
    interp = _randomness()
    x_bdim, p_bdim = bdims[0], bdims[1]
    if x_bdim is None or p_bdim is None and interp.randomness == "same":
        return inplace_random_batch(aten.bernoulli_.Tensor, bdims, x, p, generator=generator)
    front = move_bdim_to_front(x, x_bdim)  # a view: writes reach x
    if p_bdim is not None:
        p = front_padded(p, p_bdim, front.dim() - 1)
    if interp.randomness == "different":
        lower(aten.bernoulli_.Tensor, front, p, generator=generator)
    else:
        front.copy_(_bernoulli_same(p, front.shape[1:], generator))
    return x, x_bdim


@register_batching(aten._sample_dirichlet.default)
def sample_dirichlet_batch(bdims, alpha, generator=None):
    """Like the elementwise parameters, but each sample is normalized over
    the last logical dim, which therefore must not hold the batch."""
    interp = _randomness()
    bdim = bdims[0]
    if interp.randomness == "same":
        if bdim is not None:
            raise RuntimeError(_SAME_WITH_BATCHED_INPUT)
        return lower(aten._sample_dirichlet.default, alpha, generator), None
    if bdim is None or bdim == alpha.dim() - 1:
        alpha, bdim = materialize(alpha, bdim, interp.batch_size), 0
    if alpha.dim() == 1:  # logical 0-dim: a distribution over one category per example
        return lower(aten._sample_dirichlet.default, alpha.unsqueeze(1), generator).squeeze(1), 0
    return lower(aten._sample_dirichlet.default, alpha, generator), bdim


@register_batching(aten.multinomial.default)
def multinomial_batch(bdims, probs, num_samples, replacement=False, *, generator=None):
    interp = _randomness()
    bdim = bdims[0]
    if probs.dim() - (bdim is not None) not in (1, 2):
        raise RuntimeError("prob_dist must be 1 or 2 dim")
    if interp.randomness == "same":
        if bdim is not None:
            raise RuntimeError(_SAME_WITH_BATCHED_INPUT)
        return lower(aten.multinomial.default, probs, num_samples, replacement, generator=generator), None
    # The op takes at most one batch-like dim: fold ours into it.
    # [B,N,C] -> [B*N,C] -> [B*N,num_samples] -> [B,N,num_samples]
    probs = materialize(probs, bdim, interp.batch_size)
    flat = probs if probs.dim() == 2 else probs.reshape(-1, probs.shape[-1])
    out = lower(aten.multinomial.default, flat, num_samples, replacement, generator=generator)
    return out.view(probs.shape[:-1] + out.shape[-1:]), 0


# --------------------------------------------------------------------------
# Dropout and rrelu.  F.dropout itself arrives as empty_like + bernoulli_ +
# div_ + mul (rules above); native_dropout is what decompositions emit.
# --------------------------------------------------------------------------


@register_batching(aten.native_dropout.default)
def native_dropout_batch(bdims, x, p, train):
    op = aten.native_dropout.default
    bdim = bdims[0]
    if train is not None and not train:  # eval: a copy and an all-true mask, no randomness
        return lower(op, x, p, train), bdim
    interp = _randomness()
    if interp.randomness == "same" and (bdim is None or interp.batch_size):
        if bdim is None:
            return lower(op, x, p, train), None
        # One mask of the logical shape for every example; the output as the
        # eager kernel computes it.
        _, mask = lower(op, x.select(bdim, 0), p, train)
        p1m = 1.0 - p
        scale = 0.0 if p1m == 0 else 1.0 / p1m
        return (move_bdim_to_front(x, bdim).mul(mask).mul_(scale), mask), (0, None)
    if bdim is None:
        x, bdim = x.expand(interp.batch_size, *x.shape), 0
    return lower(op, x, p, train), bdim


_RRELU_INPLACE = aten.rrelu_with_noise_.default
_RRELU_FUNCTIONAL = aten.rrelu_with_noise_functional.default


@register_batching(aten.rrelu_with_noise.default, _RRELU_INPLACE, _RRELU_FUNCTIONAL)
def rrelu_with_noise_batch(
    op, bdims, x, noise, lower_bound=0.125, upper_bound=1.0 / 3.0, training=False, generator=None
):
    """rrelu writes the slopes it draws into ``noise`` (except the functional
    variant, which returns them), so under vmap ``noise`` must be batched
    whenever the slopes differ per example."""
    x_bdim, noise_bdim = bdims[0], bdims[1]
    x_shape, noise_shape = _logical_shape(x, x_bdim), _logical_shape(noise, noise_bdim)
    if x_shape != noise_shape:
        raise RuntimeError(
            f"noise tensor shape must match self tensor shape. Got self.shape = {list(x_shape)} "
            f"noise.shape = {list(noise_shape)}"
        )
    if not training:  # eval: leaky_relu with the mean slope, no randomness
        slope = (lower_bound + upper_bound) / 2
        if op is _RRELU_INPLACE:
            x.leaky_relu_(slope)
            return x, x_bdim
        out = torch.nn.functional.leaky_relu(x, slope)
        return ((out, noise.clone()), (x_bdim, noise_bdim)) if op is _RRELU_FUNCTIONAL else (out, x_bdim)
    if lower_bound > upper_bound:
        raise RuntimeError(
            "Expected from <= to to be true, but got false.  (Could this error message be improved?  If so, "
            "please report an enhancement request to PyTorch.)"
        )
    interp = _randomness()
    same = interp.randomness == "same"
    args = (lower_bound, upper_bound, training, generator)
    if x_bdim is None and (noise_bdim is None or op is _RRELU_FUNCTIONAL) and same:
        out = lower(op, x, noise, *args)
        return (out, None) if op is not _RRELU_INPLACE else (x, None)
    if noise_bdim is None and op is not _RRELU_FUNCTIONAL:
        if x_bdim is None:
            raise RuntimeError(_DIFFERENT_INPLACE_ON_UNBATCHED)
        raise RuntimeError(
            f"vmap: {op} writes the slopes it draws into its `noise` argument, which is not batched while "
            f"`self` is, so the slopes cannot be stored. Make `noise` batched too (e.g. torch.empty_like(self)), "
            f"or use torch.nn.functional.rrelu."
        )
    if not same:
        batch = interp.batch_size
        x_front = materialize(x, x_bdim, batch)  # a view of x: in-place writes reach it
        out = lower(op, x_front, materialize(noise, noise_bdim, batch), *args)
        return (x, x_bdim) if op is _RRELU_INPLACE else (out, 0)
    # 'same': one slope per logical element, shared by the batch; each example
    # applies it where its own input is <= 0 (as the eager kernel does).
    x_front = move_bdim_to_front(x, x_bdim)
    u = _draw(aten.rand, x_shape, x.dtype, x.device, generator)
    slope = u * (upper_bound - lower_bound) + lower_bound
    negative = x_front <= 0
    out = torch.where(negative, x_front * slope, x_front)
    slopes = torch.where(negative, slope, 1.0).to(noise.dtype)
    out_bdim = None if x_bdim is None else 0
    if op is _RRELU_FUNCTIONAL:
        return (out, slopes), out_bdim
    move_bdim_to_front(noise, noise_bdim).copy_(slopes)
    if op is _RRELU_INPLACE:
        x_front.copy_(out)
        return x, x_bdim
    return out, out_bdim


# --------------------------------------------------------------------------
# out= variants: the draw must go into an unbatched `out` (a batched one is
# rejected by the interpreter), which only 'same' without batched inputs
# allows.
# --------------------------------------------------------------------------


def out_variant_batch(op, bdims, *args, **kwargs):
    interp = _randomness()
    if interp.randomness == "different" or any(b is not None for b in bdims):
        raise RuntimeError(
            f"vmap: {op} writes a random result that differs per batch element into an `out=` tensor "
            f"that is not batched. Use the functional form (e.g. torch.rand(size) instead of "
            f"torch.rand(size, out=t)) and assign its result."
        )
    return lower(op, *args, **kwargs), None


def _random_out_variants():
    packets = [
        aten.rand, aten.randn, aten.randint, aten.randperm, aten.rand_like, aten.randn_like, aten.randint_like,
        aten.normal, aten.uniform, aten.exponential, aten.geometric, aten.log_normal, aten.cauchy, aten.random,
        aten.bernoulli, aten.multinomial, aten.native_dropout, aten.poisson, aten._standard_gamma,
        aten._sample_dirichlet, aten.binomial, aten.rrelu_with_noise, aten._fused_dropout,
    ]  # fmt: skip
    ops = []
    for packet in packets:
        for name in packet.overloads():
            op = getattr(packet, name)
            composite = torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")
            if is_out_variant(op) and not composite:
                ops.append(op)
    return ops


register_batching_each(_random_out_variants(), out_variant_batch)


# ==========================================================================
# Derivatives.  Most draws do not depend differentiably on their inputs
# (derivatives.yaml gives them zero gradients, normal(mean, std) with tensor
# parameters included: no reparameterization gradient); dropout and rrelu do.
# ==========================================================================


@register_vjp(aten.native_dropout.default)
def native_dropout_vjp(grad, result, p, train):
    if grad[0] is None:
        return (None,)
    scale = (0.0 if p == 1 else 1.0 / (1.0 - p)) if train else 1.0
    return (grad[0] * result[1] * scale,)


@register_vjp(aten.rrelu_with_noise.default, *overloads(aten.rrelu_with_noise_functional, "default"))
def rrelu_with_noise_vjp(grad, self, noise, lower=0.125, upper=1.0 / 3, training=False):
    if isinstance(grad, tuple):  # the functional form also returns the new noise
        grad = grad[0]
        if grad is None:
            return (None,)
    if training:
        return (grad * noise,)
    return (grad * torch.where(self > 0, 1.0, (lower + upper) / 2),)


def _zero_derivative_random_ops():
    differentiable = {
        aten.native_dropout.default,
        aten.rrelu_with_noise.default,
        *overloads(aten.rrelu_with_noise_, "default"),
        *overloads(aten.rrelu_with_noise_functional, "default"),
        *overloads(aten._standard_gamma, "default"),
        *overloads(aten._sample_dirichlet, "default"),
    }
    return [op for op in aten_overloads() if torch.Tag.nondeterministic_seeded in op.tags and op not in differentiable]


register_nondifferentiable(*_zero_derivative_random_ops())
