"""functionalize: in-place ops (and optionally views) replaced by functional ops.

Inside ``functionalize(f)`` every tensor is a :class:`FunctionalTensor`: a
view into a *storage*, the one current value that a tensor and all its
views share.  The levels below never see a mutation:

* an in-place op (``add_``, ``x[i] = v``, ``out=``) runs its functional
  counterpart (``add``, ``index_put``, the non-``out`` overload) one level
  down, and the storage's value becomes "old value with the written region
  replaced" (``slice_scatter``, ``select_scatter``, ...), bumping its
  version;
* a view records how it derives from the storage (its chain of view ops),
  and when the storage changed since it last looked, it recomputes itself
  from the new value;
* with ``remove='mutations_and_views'`` the view ops themselves run as their
  ``*_copy`` counterparts, so nothing below aliases.

When ``f`` returns, each input whose storage was written is brought up to
date with one ``copy_``: the observable behaviour (outputs and input
mutations) is the function's own.

NOTE [Ops that mutate other arguments]
A few ops write arguments other than ``self`` (``native_batch_norm``'s
running statistics in training, ops with ``Tensor(a!)`` arguments).  They
run on fresh copies of those arguments, whose values then become the
storages' new values: no tracked tensor is mutated below, at the price of
an in-place op on a temporary in a traced graph.  The same goes for an
in-place op that has no functional counterpart in ATen.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.utils._mode_utils import no_dispatch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._core.interpreter import Interpreter, interpreting
from .._core.schema import functional_counterpart, is_out_variant, is_view_op, metadata_inplace_counterpart, mutates_self
from .._core.tracer import Tracer, apply_metadata_op, new_tracer
from ._autodiff import below, lower

aten = torch.ops.aten


class _Storage:
    """The current value of a base tensor, shared with its views."""

    __slots__ = ("value", "version")

    def __init__(self, value) -> None:
        self.value = value
        self.version = 0


class FunctionalTensor(Tracer):
    """A value inside ``functionalize``: ``_storage`` (shared with aliases),
    ``_chain`` (the view ops from the storage's value to this tensor:
    ``(op, args after self, kwargs, output index or None)``), and ``_value``,
    this tensor's value one level down as of storage version ``_seen``."""

    _storage: _Storage
    _chain: tuple
    _value: torch.Tensor
    _seen: int

    def _payload_repr(self) -> str:
        return f"value=\n{self._current()!r}"

    def _current(self):
        if self._seen != self._storage.version:
            self._value = self._interp.replay(self._chain, self._storage.value)
            self._seen = self._storage.version
        return self._value

    def _dead_value(self):
        return self._current()

    def _underlying(self):
        return self._current()


def _wrap(value, interp, storage=None, chain=(), strides=None):
    t = new_tracer(FunctionalTensor, interp, value, value.shape, value.stride() if strides is None else strides)
    t._storage = storage if storage is not None else _Storage(value)
    t._chain = chain
    t._value = value
    t._seen = t._storage.version
    return t


class FunctionalizeInterpreter(Interpreter):
    """The interpreter of one ``functionalize`` level."""

    __slots__ = ("remove_views",)
    name = "functionalize"
    claims_untracked = True  # tensors created inside f are functionalized too

    def __init__(self, remove_views: bool) -> None:
        super().__init__()
        self.remove_views = remove_views

    def own(self, value) -> bool:
        return type(value) is FunctionalTensor and value._interp is self

    def unwrap(self, value):
        if type(value) is FunctionalTensor and value._interp is self:
            return value._current()
        if type(value) is list or type(value) is tuple:
            return type(value)(self.unwrap(v) for v in value)
        return value

    def wrap_outputs(self, out):
        if isinstance(out, torch.Tensor):
            return _wrap(out, self)
        if type(out) is tuple or type(out) is list:
            return type(out)(self.wrap_outputs(o) for o in out)
        return out

    # -- views ----------------------------------------------------------

    def view_op(self, op):
        """The op that computes a view below: the view op itself, or with
        ``remove='mutations_and_views'`` its ``*_copy`` counterpart."""
        return _copy_counterpart(op) if self.remove_views else op

    def replay(self, chain, value):
        for op, rest, kwargs, index in chain:
            value = lower(self, self.view_op(op), (value, *rest), kwargs)
            if index is not None:
                value = value[index]
        return value

    def write(self, target: FunctionalTensor, new_value) -> None:
        """``target`` (a storage's value or a view of it) now holds
        ``new_value``: the storage takes the scattered-in result."""
        storage = target._storage
        bases = [storage.value]  # the value at each step of the chain
        for link in target._chain[:-1]:
            bases.append(self.replay((link,), bases[-1]))
        for link, base in zip(reversed(target._chain), reversed(bases)):
            new_value = lower_python(self, _scatter_into, self, base, new_value, link)
        storage.value = new_value
        storage.version += 1

    # -- the per-op path ------------------------------------------------

    def process(self, op, args, kwargs):
        values = tuple(self.unwrap(a) for a in args)
        kw_values = {k: self.unwrap(v) for k, v in kwargs.items()} if kwargs else kwargs

        counterpart = metadata_inplace_counterpart(op)
        if counterpart is not None and self.own(args[0]):  # squeeze_, t_, ...: a new view of the same storage
            target = args[0]
            new_value = lower(self, self.view_op(counterpart), values, kw_values)
            apply_metadata_op(op, args, kwargs)
            target._chain = target._chain + ((counterpart, tuple(args[1:]), dict(kwargs), None),)
            target._value, target._seen = new_value, target._storage.version
            return target
        if is_out_variant(op):
            return self._out_variant(op, args, kwargs, values, kw_values)
        if mutates_self(op) and self.own(args[0]):
            return self._inplace(op, args, values, kw_values)
        written = _other_written_arguments(op, args)
        if any(self.own(args[i]) for i in written):
            return self._on_copies(op, args, values, kw_values, written)
        if is_view_op(op) and args and self.own(args[0]):
            return self._view(op, args, kwargs, values, kw_values)
        return self.wrap_outputs(lower(self, op, values, kw_values))

    def _view(self, op, args, kwargs, values, kw_values):
        base = args[0]
        out = lower(self, self.view_op(op), values, kw_values)
        rest = tuple(self.unwrap(a) for a in args[1:])
        # The wrapper has the view's strides, as in eager, also when the value
        # below is a copy: code branching on is_contiguous() must not change.
        layout = _view_layout(op, base, rest, kw_values) if self.remove_views else None
        if isinstance(out, torch.Tensor):
            return _wrap(out, self, base._storage, base._chain + ((op, rest, kw_values, None),), layout)
        return type(out)(
            _wrap(o, self, base._storage, base._chain + ((op, rest, kw_values, i),), layout and layout[i])
            for i, o in enumerate(out)
        )

    def _inplace(self, op, args, values, kw_values):
        target = args[0]
        functional = _functional_counterpart(op)
        if op is aten.copy_.default:
            # A fresh copy of the source in self's dtype and device (not aten.copy, which
            # torch.autograd cannot differentiate); expanded to self's shape below.
            new_value = lower(self, aten._to_copy.default, (values[1],),
                              {"dtype": values[0].dtype, "device": values[0].device})
        elif functional is None:  # See NOTE [Ops that mutate other arguments]
            copy = lower(self, aten.clone.default, (values[0],), {})
            lower(self, op, (copy, *values[1:]), kw_values)
            new_value = copy
        else:
            new_value = lower(self, functional, values, kw_values)
            if new_value.shape != values[0].shape or new_value.dtype != values[0].dtype:
                # copy_ from a broadcast source, add_ of a wider dtype, ...: eager writes into self's shape and dtype
                new_value = lower(self, self.view_op(aten.expand.default), (new_value, list(values[0].shape)), {})
                new_value = lower(self, aten._to_copy.default, (new_value,), {"dtype": values[0].dtype})
        self.write(target, new_value)
        target._value, target._seen = new_value, target._storage.version
        return target

    def _out_variant(self, op, args, kwargs, values, kw_values):
        out_names = [a.name for a in op._schema.arguments if a.kwarg_only and a.alias_info is not None
                     and a.alias_info.is_write]
        functional = _non_out_overload(op)
        outs = [kwargs[name] for name in out_names]
        if functional is None or not any(self.own(o) for o in outs):
            if any(self.own(o) for o in outs):
                raise RuntimeError(f"functionalize: {op} writes its out= tensor and has no functional overload "
                                   f"to run instead; call the op without out=")
            return self.wrap_outputs(lower(self, op, values, kw_values))
        plain_kwargs = {k: v for k, v in kw_values.items() if k not in out_names}
        result = lower(self, functional, values, plain_kwargs)
        results = result if isinstance(result, (tuple, list)) else (result,)
        for out, value in zip(outs, results):
            if not self.own(out):
                lower(self, aten.copy_.default, (out, value), {})
                continue
            if tuple(out.shape) != tuple(value.shape):
                raise RuntimeError(
                    f"functionalize: {op} got an out= tensor of shape {tuple(out.shape)} for a result of "
                    f"shape {tuple(value.shape)}; resizing out= tensors is not supported under "
                    f"functionalize. Allocate out with the result's shape, or use the op without out=."
                )
            if value.dtype != out.dtype:
                value = lower(self, aten._to_copy.default, (value,), {"dtype": out.dtype})
            self.write(out, value)
            out._value, out._seen = value, out._storage.version
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _on_copies(self, op, args, values, kw_values, written):
        """See NOTE [Ops that mutate other arguments]."""
        values = list(values)
        for i in written:
            if self.own(args[i]):
                values[i] = lower(self, aten.clone.default, (values[i],), {})
        out = lower(self, op, values, kw_values)
        for i in written:
            if self.own(args[i]):
                self.write(args[i], values[i])
                args[i]._value, args[i]._seen = values[i], args[i]._storage.version
        return self.wrap_outputs(out)


# --------------------------------------------------------------------------
# Op tables
# --------------------------------------------------------------------------

# In-place ops whose functional form is not the same overload of the op without "_".
_FUNCTIONAL_SPECIAL = {
    aten.normal_.default: aten.normal_functional.default,
    aten.bernoulli_.float: lambda self, p=0.5, *, generator=None: aten.bernoulli.p(self, p, generator=generator),
}


@functools.cache
def _functional_counterpart(op):
    if op in _FUNCTIONAL_SPECIAL:
        return _FUNCTIONAL_SPECIAL[op]
    try:
        return functional_counterpart(op)
    except AttributeError:
        return None


@functools.cache
def _non_out_overload(op):
    """``aten.add.Tensor`` for ``aten.add.out``: the overload of the same
    op taking the same arguments without the ``out=`` ones."""
    wanted = [a.name for a in op._schema.arguments if not (a.kwarg_only and a.alias_info is not None)]
    packet = getattr(aten, op._schema.name.split("::")[-1])
    for name in packet.overloads():
        candidate = getattr(packet, name)
        if is_out_variant(candidate) or mutates_self(candidate):
            continue
        if [a.name for a in candidate._schema.arguments] == wanted:
            return candidate
    return None


@functools.cache
def _copy_counterpart(op):
    """``aten.view_copy.default`` for ``aten.view.default``."""
    packet = getattr(aten, op._schema.name.split("::")[-1] + "_copy", None)
    if packet is not None and op._overloadname in packet.overloads():
        return getattr(packet, op._overloadname)
    return functools.partial(_view_then_clone, op)


def _view_layout(op, base, rest, kwargs):
    """The strides (a list of them for several outputs) that view ``op``
    gives, from its meta kernel on a storage-less tensor like ``base``."""
    with no_dispatch():  # metadata only: no mode (make_fx's included) should see it
        like = torch.empty_strided(base.shape, base.stride(), dtype=base.dtype, device="meta")
        out = op(like, *rest, **kwargs)
    return out.stride() if isinstance(out, torch.Tensor) else [o.stride() for o in out]


def _view_then_clone(op, *args, **kwargs):
    out = op(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return out.clone()
    return type(out)(o.clone() for o in out)


def _other_written_arguments(op, args) -> tuple[int, ...]:
    """Positions of arguments other than ``self`` that ``op`` writes."""
    positions = _written_positions(op)
    if op is aten.native_batch_norm.default and len(args) > 5 and args[5]:
        positions = (3, 4)  # training: writes its running statistics, unannotated in the schema
    return tuple(i for i in positions if i < len(args) and args[i] is not None)


@functools.cache
def _written_positions(op) -> tuple[int, ...]:
    return tuple(
        i
        for i, a in enumerate(op._schema.arguments)
        if i > 0 and not a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
    )


# --------------------------------------------------------------------------
# Writing into a view: the base with the view's region replaced.
# --------------------------------------------------------------------------


def lower_python(interp, fn, *args):
    """Run Python ``fn`` (torch ops) one level below ``interp``."""
    from .._core.dispatch import dispatch_keys_restored, needs_dispatch_keys

    with below(interp):
        if needs_dispatch_keys(args):  # See NOTE [Autograd inside rules]
            with dispatch_keys_restored():
                return fn(*args)
        return fn(*args)


def _inverse_permutation(dims):
    inverse = [0] * len(dims)
    for i, d in enumerate(dims):
        inverse[d % len(dims)] = i
    return inverse


def _scatter_into(interp, base, src, link):
    """``base`` with the region that view ``link`` selects replaced by ``src``
    (inverse views computed with ``interp``'s view ops, so that
    ``remove='mutations_and_views'`` leaves no view op below)."""
    op, rest, kwargs, index = link
    view = interp.view_op
    name = op._schema.name.split("::")[-1]
    if name == "slice":
        return torch.slice_scatter(base, src, *rest, **kwargs)
    if name == "select":
        return torch.select_scatter(base, src, *rest, **kwargs)
    if name == "diagonal":
        return torch.diagonal_scatter(base, src, *rest, **kwargs)
    if name == "as_strided":
        return torch.as_strided_scatter(base, src, *rest, **kwargs)
    if name in ("view", "_reshape_alias", "squeeze", "alias", "detach") and op._overloadname != "dtype":
        # The view covers the whole base: the new base is the new view, reshaped.
        if interp.remove_views:
            return aten.view_copy.default(src, list(base.shape))
        return aten.reshape.default(src, list(base.shape))
    if name == "unsqueeze":
        return view(aten.squeeze.dim)(src, rest[0])
    if name == "permute":
        return view(aten.permute.default)(src, _inverse_permutation(rest[0]))
    if name == "transpose":
        return view(aten.transpose.int)(src, *rest)
    if name == "t":
        return view(aten.t.default)(src)
    if name == "view_as_real":
        return view(aten.view_as_complex.default)(src)
    if name == "view_as_complex":
        return view(aten.view_as_real.default)(src)
    if name == "unbind":
        dim = rest[0] if rest else kwargs.get("dim", 0)
        return torch.select_scatter(base, src, dim, index)
    if name in ("split", "split_with_sizes"):
        size = rest[0]
        dim = rest[1] if len(rest) > 1 else kwargs.get("dim", 0)
        extent = base.shape[dim]
        sizes = size if name == "split_with_sizes" else [min(size, extent - s) for s in range(0, extent, size)]
        start = sum(sizes[:index])
        return torch.slice_scatter(base, src, dim, start, start + sizes[index])
    if name == "expand" or op._overloadname == "dtype" or base.is_complex() != src.is_complex():
        raise RuntimeError(
            f"functionalize: writing into the result of {op} is not supported (its elements overlap or "
            f"reinterpret memory); write into a .clone() of it instead"
        )
    # Any other view (unfold, ...): the positions it selects, found by
    # replaying it on the flat indices of the base.
    reshape = aten.view_copy.default if interp.remove_views else aten.reshape.default
    positions = reshape(torch.arange(base.numel(), device=base.device), list(base.shape))
    positions = view(op)(positions, *rest, **kwargs)
    if index is not None:
        positions = positions[index]
    flat = reshape(base, [-1]).index_put((reshape(positions, [-1]),), reshape(src, [-1]))
    return reshape(flat, list(base.shape))


# --------------------------------------------------------------------------
# The public API
# --------------------------------------------------------------------------


def functionalize(func: Callable, *, remove: str = "mutations") -> Callable:
    """Returns a function that computes what ``func`` computes without any
    in-place op (and, with ``remove='mutations_and_views'``, without any view
    op) reaching the levels below or a tracer such as ``make_fx``.

    Mutations of ``func``'s inputs are still visible afterwards: each input
    ``func`` wrote into is updated once, with ``copy_``, when it returns.
    Composes with every other transform.

    Args:
        func (Callable): a function of one or more tensors (pytrees allowed).
        remove (str): ``'mutations'`` (default): in-place ops are replaced by
            their functional counterparts and writes into views by scatters
            into their base. ``'mutations_and_views'``: additionally, view ops
            are replaced by their ``*_copy`` counterparts.

    Returns:
        Callable: a function with ``func``'s signature and outputs.

    Example::

        >>> import torch
        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> from torchxform import functionalize
        >>> def f(x):
        ...     y = x.clone()
        ...     y[0].add_(1)
        ...     return y
        >>> gm = make_fx(functionalize(f))(torch.zeros(2, 3))
        >>> [n.target for n in gm.graph.nodes if n.op == "call_function"]  # doctest: +SKIP
        [aten.clone.default, aten.select.int, aten.add.Tensor, aten.select_scatter.default, ...]
    """
    if remove not in ("mutations", "mutations_and_views"):
        raise RuntimeError(
            f"functionalize(f, remove='mutations'): Invalid argument for remove. Expected remove to be one "
            f"of 'mutations' or 'mutations_and_views', but got {remove!r}"
        )
    remove_views = remove == "mutations_and_views"

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        interp = FunctionalizeInterpreter(remove_views)
        with interpreting(interp):
            flat, spec = tree_flatten((args, kwargs))
            wrapped = [_wrap(a, interp) if isinstance(a, torch.Tensor) else a for a in flat]
            inner_args, inner_kwargs = tree_unflatten(wrapped, spec)
            out = func(*inner_args, **inner_kwargs)
            with below(interp):  # the results and write-backs are ops of the levels below
                result = tree_map(lambda v: v._current() if interp.own(v) else v, out)
                for original, w in zip(flat, wrapped):
                    if isinstance(original, torch.Tensor) and w._storage.version:
                        lower(interp, aten.copy_.default, (original, w._storage.value), {})
        return result

    return wrapper
