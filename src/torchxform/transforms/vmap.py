"""vmap: the vectorizing map, as an interpreter over ATen ops.

Inside ``vmap(f)``, each input batched over dim ``d`` becomes a
:class:`BatchedTensor` whose physical value keeps the batch along ``bdim``
while user code sees the logical tensor without it.  Every ATen op on one
reaches :meth:`VmapInterpreter.process`, which runs the op's batching rule
on the physical values (see ``torchxform/rules/``), or, without a rule, the
op's decomposition, or else a per-example loop that warns once per op.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map_

from .._core.dispatch import dispatch_keys_restored, is_random_op, needs_dispatch_keys
from .._core.errors import warn_slow_fallback
from .._core.pytree import broadcast_to_and_flatten as _broadcast_to_and_flatten
from .._core.pytree import flatten as tree_flatten
from .._core.pytree import unflatten as tree_unflatten
from .._core.interpreter import STATE, Interpreter, interpreting
from .._core.registry import BATCH_RULES, KWARG_BATCH_RULES, on_rules_changed
from .._core.schema import is_out_variant, metadata_inplace_counterpart, mutates_self
from .._core.tracer import Tracer, apply_metadata_op, new_tracer

Tensor = torch.Tensor


class BatchedTensor(Tracer):
    """A tensor batched by one vmap level.

    ``_value`` is the physical tensor (it may itself be a tracer of a lower
    level) and ``_bdim`` the dim of ``_value`` that holds the batch.
    """

    # Slots: faster to set and read than the instance dict (every op
    # makes one tracer and reads several of these).
    __slots__ = ("_value", "_bdim", "_interp")

    _value: torch.Tensor
    _bdim: int

    def _payload_repr(self) -> str:
        return f"bdim={self._bdim}, value=\n{self._value!r}"

    def _underlying(self):
        return self._value

    def _dead_value(self):
        raise RuntimeError(
            "vmap: a BatchedTensor escaped from the function it was created in (it was "
            "stored outside, e.g. in a global or a list, and used after vmap returned). "
            "Return the tensor from the vmapped function instead of keeping it."
        )

    def tolist(self):
        raise RuntimeError(_DATA_DEPENDENT_MESSAGE.format(what=".tolist()"))


RANDOMNESS_ERROR_MESSAGE = (
    "vmap: called random operation while in randomness error mode. Please either use the "
    "'same' or 'different' randomness flags on vmap or perform the randomness operation out of vmap"
)

_DATA_DEPENDENT_MESSAGE = (
    "vmap: {what} needs one concrete value, but inside vmap this Tensor holds one value "
    "per batch element. Data-dependent Python control flow, .item(), bool(t) and "
    ".tolist() are not supported under vmap: rewrite with tensor operations (for "
    "example torch.where instead of if/else), or compute the value outside vmap."
)


def make_batched(value: torch.Tensor, bdim: int, interp: VmapInterpreter) -> BatchedTensor:
    """Wrap physical ``value`` batched along ``bdim`` for ``interp``."""
    shape = value.shape
    strides = value.stride()
    if bdim == 0:
        shape, strides = shape[1:], strides[1:]
    else:
        shape, strides = shape[:bdim] + shape[bdim + 1 :], strides[:bdim] + strides[bdim + 1 :]
    t = new_tracer(BatchedTensor, interp, value, shape, strides)
    t._value = value
    t._bdim = bdim
    return t


_STRIDED = torch.strided


# id(op) -> _Plan.  Keyed by id: OpOverload.__hash__ is a Python method, too
# slow for the hot path.
_PLANS: dict[int, _Plan] = {}


_METADATA = "metadata"  # an in-place op that changes shape/strides, not values


class _Plan:
    """What the per-op path needs to know about one op, read once.

    ``direct``: the op's C++ entry point when its rule is the generic
    elementwise one (``elementwise_batch``): when every tensor argument is
    batched at the same dim with the same rank, that rule runs the op on the
    physical values as they are, which the interpreter then does itself.
    """

    __slots__ = ("rule", "inplace", "returns", "random", "direct")

    def __init__(self, op) -> None:
        rule, inplace = BATCH_RULES.get(op), mutates_self(op)
        counterpart = metadata_inplace_counterpart(op)
        if counterpart is not None and rule is None:
            # Compute the new view out of place, then give it to the tracer.
            rule, inplace = BATCH_RULES.get(counterpart), _METADATA
        self.rule = rule
        self.inplace = inplace
        self.returns = bool(op._schema.returns)
        self.random = is_random_op(op)
        self.direct = None
        if not inplace and not self.random and _is_generic_elementwise(op, rule):
            self.direct = getattr(op, "_op", op)


def _is_generic_elementwise(op, rule) -> bool:
    from ..rules.elementwise import elementwise_batch

    return (
        type(rule) is functools.partial
        and rule.func is elementwise_batch
        and rule.args == (op,)
        and set(rule.keywords) <= {"skip_promotion"}  # only read when dims must be aligned
    )


def _unbatched_fit(values, bdims, layout, rank) -> bool:
    """Whether an elementwise op can run on the physical values as they are
    when some tensor arguments are not batched (``values``/``bdims``: the
    physical arguments; the batched ones all have rank ``rank`` and their
    batch at ``layout``), exactly as ``elementwise_batch`` would run it.

    With the batch dim in front (``layout`` 0) that rule runs the op on the
    same physical values, provided broadcasting, which aligns trailing dims,
    keeps each unbatched tensor off the batch dim (it has at most the
    logical rank), and type promotion does not change: it treats 0-dim
    tensors apart, and a batched logical 0-dim tensor is physically 1-dim
    (NOTE [Batched 0-dim tensors and type promotion] in
    rules/elementwise.py), so with those every tensor must have the same
    dtype.  (Elsewhere the rule moves the batch dim to the front first,
    which a shape error would then report.)"""
    if layout != 0:
        return False
    room = rank - 1
    dtype = None
    for v, b in zip(values, bdims):
        if isinstance(v, Tensor):
            if b is None and v.dim() > room:
                return False
            if rank == 1:
                if dtype is None:
                    dtype = v.dtype
                elif v.dtype != dtype:
                    return False
    return True


def _plan(op) -> _Plan:
    plan = _PLANS[id(op)] = _Plan(op)
    return plan


def _mutate_metadata(op, args, kwargs, value, bdim):
    """Finish an in-place metadata op (``squeeze_``, ``t_``, ...) on tracer
    ``args[0]``: new logical metadata, and the rule's new physical view."""
    tracer = args[0]
    apply_metadata_op(op, args, kwargs)
    tracer._value = value
    tracer._bdim = bdim
    return tracer


on_rules_changed(_PLANS.clear)


class VmapInterpreter(Interpreter):
    """The interpreter of one vmap level."""

    __slots__ = ("batch_size", "randomness")
    name = "vmap"

    def __init__(self, batch_size: int, randomness: str) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.randomness = randomness

    # -- the per-op path ---------------------------------------------------

    def process(self, op, args, kwargs):
        plan = _PLANS.get(id(op))
        if plan is None:
            plan = _plan(op)

        values = list(args)
        bdims = [None] * len(args)
        batched = needs_keys = False
        # `uniform`: every batched tensor argument so far is batched at
        # `layout` with rank `rank`, and no argument is a Tensor[] (what the
        # generic elementwise rule checks); `unbatched`: a tensor argument
        # is not batched here (see _unbatched_fit).
        uniform = True
        unbatched = False
        layout = rank = None
        i = 0
        for a in args:
            if type(a) is BatchedTensor and a._interp is self:
                bdim = bdims[i] = a._bdim
                a = values[i] = a._value
                if not batched:
                    batched = True
                    layout, rank = bdim, a.dim()
                elif uniform and (bdim != layout or a.dim() != rank):
                    uniform = False
                if a.requires_grad or a.is_complex() or a.is_neg():
                    needs_keys = True  # See NOTE [Autograd inside rules]
            elif isinstance(a, Tensor):
                unbatched = True
                if a.requires_grad or a.is_complex() or a.is_neg():
                    needs_keys = True
            elif type(a) is list or type(a) is tuple:
                uniform = False
                inner = self._unwrap_list(a)
                if inner is not None:
                    values[i], bdims[i] = inner
                    batched = True
                if needs_dispatch_keys(values[i]):
                    needs_keys = True
            i += 1
        if kwargs:
            for v in kwargs.values():
                if type(v) is BatchedTensor and v._interp is self:
                    return self._batched_kwargs(op, args, kwargs)
                if isinstance(v, Tensor) and (v.requires_grad or v.is_complex() or v.is_neg()):
                    needs_keys = True

        direct = plan.direct
        if direct is not None and uniform and batched and (not unbatched or _unbatched_fit(values, bdims, layout, rank)):
            # What the generic elementwise rule would do: the op on the
            # physical values as they are.
            if needs_keys:
                with dispatch_keys_restored():
                    out = direct(*values, **kwargs)
            else:
                out = direct(*values, **kwargs)
            if isinstance(out, Tensor):
                return make_batched(out, layout, self)
            return self.wrap((out, layout))  # several outputs (frexp, ...)

        rule, inplace = plan.rule, plan.inplace
        if inplace and batched and bdims[0] is None:
            raise RuntimeError(
                f"vmap: in-place {op}(self, ...) is not possible: `self` is not batched but "
                f"another argument is batched by this vmap, so the result needs a batch "
                f"dimension that `self` does not have. Use the out-of-place operation "
                f"(e.g. `x = x + y` instead of `x += y`), or make `self` batched too."
            )
        if rule is None or plan.random:
            return self._guarded(op, rule, args, kwargs, values, bdims, needs_keys)
        if needs_keys:
            with dispatch_keys_restored():
                result = rule(bdims, *values, **kwargs)
        else:
            result = rule(bdims, *values, **kwargs)
        if inplace:
            if inplace is _METADATA:
                return _mutate_metadata(op, args, kwargs, *result)
            return args[0] if plan.returns else None
        out, bdim = result
        if type(bdim) is int and isinstance(out, Tensor):
            return make_batched(out, bdim, self)
        return self.wrap(result)

    def _guarded(self, op, rule, args, kwargs, values, bdims, needs_keys):
        """The path for random ops and ops without a rule: these may issue
        ops without tracer arguments, so the ceiling is set.  See NOTE [Ceiling]."""
        if rule is None and self.randomness == "error" and is_random_op(op):
            # A random op without a rule would draw in the fallback; with a
            # rule, the rule decides (some calls draw nothing, e.g. dropout
            # in eval mode).
            raise RuntimeError(RANDOMNESS_ERROR_MESSAGE)
        state = STATE
        saved_ceiling, saved_owner = state.ceiling, state.rule_owner
        state.ceiling, state.rule_owner = self.floor, self
        try:
            if rule is None:
                return self._without_rule(op, args, kwargs, values, bdims)
            with dispatch_keys_restored() if needs_keys else _nullcontext():
                result = rule(bdims, *values, **kwargs)
        finally:
            state.ceiling, state.rule_owner = saved_ceiling, saved_owner
        if mutates_self(op):
            return args[0] if op._schema.returns else None
        return self.wrap(result)

    def _unwrap_list(self, items):
        """Unwrap a Tensor[] argument: (values, bdims) or None if none of its
        entries is batched at this level."""
        found = False
        for b in items:
            if type(b) is BatchedTensor and b._interp is self:
                found = True
                break
        if not found:
            return None
        values = []
        bdims = []
        for b in items:
            if type(b) is BatchedTensor and b._interp is self:
                values.append(b._value)
                bdims.append(b._bdim)
            else:
                values.append(b)
                bdims.append(None)
        return values, tuple(bdims)

    def wrap(self, result):
        """Wrap a rule's ``(out, out_bdims)`` into BatchedTensors."""
        out, bdim = result
        if isinstance(out, torch.Tensor):
            return out if bdim is None else make_batched(out, bdim, self)
        if type(out) is tuple or type(out) is list:
            if bdim is None or type(bdim) is int:
                bdim = (bdim,) * len(out)
            return type(out)(
                make_batched(o, b, self) if b is not None and isinstance(o, torch.Tensor) else o
                for o, b in zip(out, bdim)
            )
        return out

    # -- without a rule: decomposition, else the per-example loop -----------

    def _without_rule(self, op, args, kwargs, values, bdims):
        out = self.decompose(op, args, kwargs)
        if out is not NotImplemented:
            return out
        return self._loop(op, args, kwargs, values, bdims)

    def _batched_kwargs(self, op, args, kwargs):
        if is_out_variant(op):
            raise RuntimeError(
                f"vmap: {op} writes into an `out=` tensor that is batched; out= variants are "
                f"not supported under vmap. Use the functional form and assign the result."
            )
        values, bdims = [], []
        for a in args:
            inner = self._unwrap_list(a) if type(a) in (list, tuple) else None
            if type(a) is BatchedTensor and a._interp is self:
                values.append(a._value)
                bdims.append(a._bdim)
            elif inner is not None:
                values.append(inner[0])
                bdims.append(inner[1])
            else:
                values.append(a)
                bdims.append(None)
        state = STATE
        saved_ceiling, saved_owner = state.ceiling, state.rule_owner
        state.ceiling, state.rule_owner = self.floor, self
        try:
            if op in KWARG_BATCH_RULES:
                # A rule that takes batched keyword-only tensors (e.g. an
                # attention mask): unwrapped values plus their bdims.
                kw_values, kw_bdims = {}, {}
                for k, v in kwargs.items():
                    if type(v) is BatchedTensor and v._interp is self:
                        kw_values[k], kw_bdims[k] = v._value, v._bdim
                    else:
                        kw_values[k] = v
                with dispatch_keys_restored() if needs_dispatch_keys(values) else _nullcontext():
                    result = BATCH_RULES[op](bdims, *values, kwarg_bdims=kw_bdims, **kw_values)
                return self.wrap(result)
            return self._loop(op, args, kwargs, values, bdims)
        finally:
            state.ceiling, state.rule_owner = saved_ceiling, saved_owner

    def _loop(self, op, args, kwargs, values, bdims):
        """The slow but correct fallback: run ``op`` once per batch element."""
        for v, bdim in zip(values, bdims):
            if bdim is not None and isinstance(v, Tensor) and v.layout != _STRIDED:
                raise RuntimeError(
                    f"vmap: {op} got a batched {v.layout} tensor; vmap supports strided (dense) tensors "
                    f"only. Convert with .to_dense() inside the function, or batch outside vmap."
                )
        warn_slow_fallback(op)

        def select(v, bdim, i):
            if bdim is None:
                return v
            if type(bdim) is tuple:
                return [select(w, b, i) for w, b in zip(v, bdim)]
            return v.select(bdim, i)

        kw_values = {}
        kw_bdims = {}
        for k, v in kwargs.items():
            if type(v) is BatchedTensor and v._interp is self:
                kw_values[k], kw_bdims[k] = v._value, v._bdim
            else:
                kw_values[k], kw_bdims[k] = v, None

        needs_keys = needs_dispatch_keys(values) or needs_dispatch_keys(kw_values.values())
        results = []
        with dispatch_keys_restored() if needs_keys else _nullcontext():
            for i in range(self.batch_size):
                example_args = [select(v, b, i) for v, b in zip(values, bdims)]
                example_kwargs = {k: select(v, kw_bdims[k], i) for k, v in kw_values.items()}
                results.append(op(*example_args, **example_kwargs))
            if mutates_self(op):
                return args[0] if op._schema.returns else None
            return self._stack_results(op, results)

    def _stack_results(self, op, results):
        first = results[0]
        if isinstance(first, torch.Tensor):
            if first.layout != _STRIDED:
                raise RuntimeError(
                    f"vmap: {op} returns a {first.layout} tensor; vmap supports strided (dense) tensors "
                    f"only. Convert with .to_dense() inside the function, or batch outside vmap."
                )
            return make_batched(_stack_same_shape(op, results), 0, self)
        if type(first) is tuple or type(first) is list:
            return type(first)(self._stack_results(op, list(column)) for column in zip(*results))
        if first is None or all(r == first for r in results[1:]):
            return first
        raise RuntimeError(
            f"vmap: {op} returned the Python value {first!r} for one batch element and "
            f"different values for others; a non-tensor result must be the same for the "
            f"whole batch. Compute it outside vmap."
        )


def current_vmap() -> VmapInterpreter:
    """The vmap interpreter whose rule is running.

    Valid inside the rules of random ops and the fallbacks (they run with
    the ceiling set to the level below, see NOTE [Ceiling])."""
    state = STATE
    interp = state.rule_owner
    if not isinstance(interp, VmapInterpreter):
        raise RuntimeError("current_vmap() called outside a vmap random-op rule")
    return interp


class _nullcontext:
    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _stack_same_shape(op, tensors):
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise RuntimeError(
            f"vmap: {op} produced outputs of different shapes for different batch "
            f"elements ({sorted(shapes)[:4]}...). vmap needs every element's output to have "
            f"the same shape (dynamic shapes are not supported); pad or mask instead."
        )
    return torch.stack(tensors)


# --------------------------------------------------------------------------
# The public API (torch.func.vmap's contract)
# --------------------------------------------------------------------------


def _get_name(func: Callable) -> str:
    if hasattr(func, "__name__"):
        return func.__name__
    if isinstance(func, functools.partial):
        return f"functools.partial({_get_name(func.func)}, ...)"
    return repr(func)


def _check_randomness_arg(randomness: str) -> None:
    if randomness not in ("error", "different", "same"):
        raise RuntimeError(
            f"Only allowed values for randomness are 'error', 'different', or 'same'. Got {randomness}"
        )


def _check_out_dims(out_dims, func) -> None:
    if isinstance(out_dims, int):
        return

    def check(x):
        if x is not None and not isinstance(x, int):
            raise ValueError(
                f"vmap({_get_name(func)}, ..., out_dims={out_dims}): `out_dims` must be an int, "
                f"None or a python collection of ints representing where in the outputs the "
                f"vmapped dimension should appear."
            )

    tree_map_(check, out_dims)


def _process_inputs(in_dims, args, func):
    name = _get_name(func)
    if not isinstance(in_dims, (int, tuple)):
        raise ValueError(
            f"vmap({name}, in_dims={in_dims}, ...)(<inputs>): expected `in_dims` to be int or a "
            f"(potentially nested) tuple matching the structure of inputs, got: {type(in_dims)}."
        )
    if len(args) == 0:
        raise ValueError(
            f"vmap({name})(<inputs>): got no inputs. Maybe you forgot to add inputs, or you "
            f"are trying to vmap over a function with no inputs. The latter is unsupported."
        )
    flat_args, args_spec = tree_flatten(args)
    flat_in_dims = _broadcast_to_and_flatten(in_dims, args_spec)
    if flat_in_dims is None:
        raise ValueError(
            f"vmap({name}, in_dims={in_dims}, ...)(<inputs>): in_dims is not compatible with "
            f"the structure of `inputs`. in_dims has structure {tree_flatten(in_dims)[1]} but "
            f"inputs has structure {args_spec}."
        )
    for i, (arg, in_dim) in enumerate(zip(flat_args, flat_in_dims)):
        if not isinstance(in_dim, int) and in_dim is not None:
            raise ValueError(
                f"vmap({name}, in_dims={in_dims}, ...)(<inputs>): Got in_dim={in_dim} for an "
                f"input but in_dim must be either an integer dimension or None."
            )
        if isinstance(in_dim, int) and not isinstance(arg, torch.Tensor):
            raise ValueError(
                f"vmap({name}, in_dims={in_dims}, ...)(<inputs>): Got in_dim={in_dim} for an "
                f"input but the input is of type {type(arg)}. We cannot vmap over non-Tensor "
                f"arguments, please use None as the respective in_dim"
            )
        if in_dim is not None and (in_dim < -arg.dim() or in_dim >= arg.dim()):
            raise ValueError(
                f"vmap({name}, in_dims={in_dims}, ...)(<inputs>): Got in_dim={in_dim} for some "
                f"input, but that input is a Tensor of dimensionality {arg.dim()} so expected "
                f"in_dim to satisfy -{arg.dim()} <= in_dim < {arg.dim()}."
            )
        if in_dim is not None and in_dim < 0:
            flat_in_dims[i] = in_dim % arg.dim()
    return _batch_size(flat_in_dims, flat_args, name), flat_in_dims, flat_args, args_spec


def _batch_size(flat_in_dims, flat_args, name: str) -> int:
    sizes = [(i, arg.size(d)) for i, (d, arg) in enumerate(zip(flat_in_dims, flat_args)) if d is not None]
    if not sizes:
        raise ValueError(
            f"vmap({name})(<inputs>): Expected at least one Tensor to vmap over: every in_dim "
            f"is None. Give at least one tensor input a batch dim."
        )
    if any(size != sizes[0][1] for _, size in sizes):
        detail = ", ".join(f"input {i}: {size}" for i, size in sizes)
        raise ValueError(
            f"vmap({name})(<inputs>): Expected all tensors to have the same size in the "
            f"mapped dimension, got sizes {[s for _, s in sizes]} for the mapped dimension "
            f"({detail}; inputs counted in flattened order). Make the batch sizes equal, or "
            f"use in_dim=None for inputs that should not be mapped."
        )
    return sizes[0][1]


def _unwrap_output(name, out, interp: VmapInterpreter, out_dim):
    if out_dim is None:
        if type(out) is BatchedTensor and out._interp is interp:
            raise ValueError(f"vmap({name}, ...): `{name}` can not return a BatchedTensor when out_dim is None")
        return out
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"vmap({name}, ...): `{name}` must only return Tensors, got type {type(out)}. "
            "Did you mean to set out_dims= to None for output?"
        )
    if type(out) is BatchedTensor and out._interp is interp:
        value, bdim = out._value, out._bdim
        rank = value.dim()
        if not -rank <= out_dim < rank:
            raise IndexError(
                f"vmap({name}, ..., out_dims={out_dim}): Dimension out of range (expected to be in "
                f"range of [{-rank}, {rank - 1}], but got {out_dim})"
            )
        return value.movedim(bdim, out_dim)
    # Not batched at this level: every batch element sees the same value.
    rank = out.dim() + 1
    if not -rank <= out_dim < rank:
        raise IndexError(
            f"vmap({name}, ..., out_dims={out_dim}): Dimension out of range (expected to be in "
            f"range of [{-rank}, {rank - 1}], but got {out_dim})"
        )
    out_dim = out_dim % rank
    expanded = list(out.shape)
    expanded.insert(out_dim, interp.batch_size)
    return out.unsqueeze(out_dim).expand(expanded)


def _flatten_with_out_dims(outputs, out_dims, func):
    """Flatten ``outputs`` and broadcast ``out_dims`` over them."""
    flat_outputs, output_spec = tree_flatten(outputs)

    def incompatible():
        return ValueError(
            f"vmap({_get_name(func)}, ..., out_dims={out_dims})(<inputs>): out_dims is not "
            f"compatible with the structure of `outputs`. out_dims has structure "
            f"{tree_flatten(out_dims)[1]} but outputs has structure {output_spec}."
        )

    if isinstance(outputs, torch.Tensor):
        if isinstance(out_dims, int) or out_dims is None:
            flat_out_dims = [out_dims]
        elif isinstance(out_dims, tuple) and len(out_dims) == 1:
            flat_out_dims = list(out_dims)
        else:
            raise incompatible()
    else:
        flat_out_dims = _broadcast_to_and_flatten(out_dims, output_spec)
        if flat_out_dims is None:
            raise incompatible()
    return flat_outputs, output_spec, flat_out_dims


def _unwrap_outputs(outputs, out_dims, interp, func):
    flat_outputs, spec, flat_out_dims = _flatten_with_out_dims(outputs, out_dims, func)
    name = _get_name(func)
    return tree_unflatten([_unwrap_output(name, o, interp, d) for o, d in zip(flat_outputs, flat_out_dims)], spec)


def _flat_vmap(func, batch_size, flat_in_dims, flat_args, args_spec, out_dims, randomness, kwargs):
    with interpreting(VmapInterpreter(batch_size, randomness)) as interp:
        batched = [
            arg if d is None else make_batched(arg, d, interp) for d, arg in zip(flat_in_dims, flat_args)
        ]
        outputs = func(*tree_unflatten(batched, args_spec), **kwargs)
        return _unwrap_outputs(outputs, out_dims, interp, func)


def _rng_states(flat_args):
    """The states of the generators a chunk may draw from: the CPU's, and
    those of the accelerator devices among the inputs and of the default device."""
    devices = {a.device for a in flat_args if isinstance(a, torch.Tensor)} | {torch.get_default_device()}
    states = [(None, torch.get_rng_state())]
    for device in devices:
        if device.type not in ("cpu", "meta"):
            states.append((device, torch.get_device_module(device.type).get_rng_state(device)))
    return states


def _set_rng_states(states) -> None:
    for device, state in states:
        if device is None:
            torch.set_rng_state(state)
        else:
            torch.get_device_module(device.type).set_rng_state(state, device)


def _chunked_vmap(func, batch_size, flat_in_dims, flat_args, args_spec, out_dims, randomness, chunk_size, kwargs):
    sizes = [chunk_size] * (batch_size // chunk_size)
    if batch_size % chunk_size:
        sizes.append(batch_size % chunk_size)
    split_points = tuple(itertools.accumulate(sizes))[:-1]
    per_arg_chunks = [
        arg.tensor_split(split_points, dim=d) if d is not None else [arg] * len(sizes)
        for arg, d in zip(flat_args, flat_in_dims)
    ]
    # 'same' randomness must give every chunk the same draws.
    rng_states = _rng_states(flat_args) if randomness == "same" else None
    chunk_outputs = []
    for chunk_args, size in zip(zip(*per_arg_chunks), sizes):
        if rng_states is not None:
            _set_rng_states(rng_states)
        out = _flat_vmap(func, size, flat_in_dims, list(chunk_args), args_spec, out_dims, randomness, kwargs)
        chunk_outputs.append(out)
    flattened = [_flatten_with_out_dims(out, out_dims, func) for out in chunk_outputs]
    del chunk_outputs
    _, spec, flat_out_dims = flattened[0]
    joined = []
    for i, d in enumerate(flat_out_dims):
        column = [flat[i] for flat, _, _ in flattened]
        joined.append(column[0] if d is None else torch.cat(column, dim=d))
    return tree_unflatten(joined, spec)


def vmap(
    func: Callable,
    in_dims: int | tuple = 0,
    out_dims: int | tuple | None = 0,
    randomness: str = "error",
    *,
    chunk_size: int | None = None,
) -> Callable:
    """vmap is the vectorizing map; ``vmap(func)`` returns a new function that
    maps ``func`` over some dimension of the inputs.

    Semantically, vmap pushes the map into the PyTorch operations called by
    ``func``, vectorizing them: each operation runs once on the whole batch
    (through its batching rule) instead of once per element.

    Args:
        func (function): A Python function that takes one or more arguments.
            Must return one or more Tensors.
        in_dims (int or nested structure): Specifies which dimension of the
            inputs should be mapped over. ``in_dims`` should have a structure
            like the inputs. If the ``in_dim`` for a particular input is None,
            then that indicates there is no map dimension. Default: 0.
        out_dims (int or Tuple[int]): Specifies where the mapped dimension
            should appear in the outputs. If ``out_dims`` is a Tuple, then it
            should have one element per output. Default: 0.
        randomness (str): Whether the randomness in this vmap is the same
            or different across batches: 'different', 'same', or 'error'
            (any random operation raises). Default: 'error'.
        chunk_size (None or int): If not None, compute the vmap
            ``chunk_size`` samples at a time (``chunk_size=1`` is a for-loop).
            Use it to bound memory. Default: None (a single vmap).

    Returns:
        A function that takes the same inputs as ``func``, with an extra
        dimension at the index given by ``in_dims``, and returns ``func``'s
        outputs with an extra dimension at the index given by ``out_dims``.

    Example::

        >>> import torch
        >>> from torchxform import vmap
        >>> x, y = torch.randn(2, 5), torch.randn(2, 5)
        >>> batched_dot = vmap(torch.dot)  # [N, D], [N, D] -> [N]
        >>> torch.allclose(batched_dot(x, y), (x * y).sum(1))
        True
    """
    _check_randomness_arg(randomness)
    if not (chunk_size is None or chunk_size > 0):
        raise ValueError(f"vmap: chunk_size should be None or greater than 0. (got {chunk_size})")

    @functools.wraps(func)
    def wrapped(*args: Any, **kwargs: Any):
        _check_out_dims(out_dims, func)
        batch_size, flat_in_dims, flat_args, args_spec = _process_inputs(in_dims, args, func)
        if chunk_size is not None and chunk_size < batch_size:
            return _chunked_vmap(
                func, batch_size, flat_in_dims, flat_args, args_spec, out_dims, randomness, chunk_size, kwargs
            )
        return _flat_vmap(func, batch_size, flat_in_dims, flat_args, args_spec, out_dims, randomness, kwargs)

    return wrapped
