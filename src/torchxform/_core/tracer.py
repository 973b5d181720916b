"""The tracer base class: a ``torch.Tensor`` wrapper subclass.

A tracer reports the *logical* shape, strides, dtype and device of the value
its transform tracks, so user code (nn.Modules, tensor methods,
torch.nn.functional) runs on it unchanged.  It owns no storage; every ATen op
on it reaches ``bind`` through ``__torch_dispatch__`` (or through the
transform mode, which runs first while a transform is active).
"""

from __future__ import annotations

import torch

from .interpreter import integer_tracer_made

_make_wrapper_subclass = torch.Tensor._make_wrapper_subclass
_EMPTY_KWARGS: dict = {}
_bind = None  # set by dispatch.py, which imports this module


class Tracer(torch.Tensor):
    """Base class of every transform's tracked values.

    Subclasses set ``_interp`` (their interpreter) and their payload, and
    implement ``_payload_repr``, ``_dead_value`` and ``_underlying``.
    """

    _interp = None  # the Interpreter this tracer belongs to

    # Tensor methods and torch functions dispatch to ATen as usual; only the
    # ATen ops are intercepted (CompositeImplicit ops arrive decomposed).
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _bind(func, args, kwargs or _EMPTY_KWARGS)

    def _payload_repr(self) -> str:
        raise NotImplementedError

    def _dead_value(self):
        """The value that stands for this tracer once its transform ended."""
        raise NotImplementedError

    def _underlying(self) -> torch.Tensor:
        """The tensor this tracer wraps, one level down (for debug_unwrap)."""
        raise NotImplementedError

    def __repr__(self, *, tensor_contents=None) -> str:
        level = self._interp.level if self._interp is not None else "?"
        inner = self._payload_repr().replace("\n", "\n    ")
        return f"{type(self).__name__}(lvl={level}, {inner}\n)"

    def __str__(self) -> str:
        return self.__repr__()

    # NOTE [0-dim integer tracer as an index]
    # Python indexing turns a 0-dim integer tensor index into a Python int
    # (calling .item()) unless it is one of PyTorch's own batched tensors.
    # A tracer may hold one integer per batch element, so it must stay a
    # tensor index: it is passed as a [1] index tensor, and when it was the
    # only kind of advanced index, the size-1 dim that produces is removed.

    def __getitem__(self, index):
        index, extra_dim = _tensor_index(self, index)
        out = torch.Tensor.__getitem__(self, index)
        return out if extra_dim is None else out.squeeze(extra_dim)

    def __setitem__(self, index, value):
        index, extra_dim = _tensor_index(self, index)
        if extra_dim is not None and isinstance(value, torch.Tensor) and value.dim() > 0:
            region_rank = torch.Tensor.__getitem__(self, index).dim()
            position = extra_dim - (region_rank - value.dim() - 1)
            if position >= 0:
                value = value.unsqueeze(position)
        torch.Tensor.__setitem__(self, index, value)

    def __reduce_ex__(self, protocol):
        raise RuntimeError(
            f"{type(self).__name__} is a transform's internal value and cannot be "
            "pickled or deep-copied; return it from the transformed function instead."
        )


def new_tracer(cls, interp, value, shape, strides, layout=torch.strided) -> Tracer:
    """A storage-less tracer of ``cls`` for ``interp``: the given logical
    shape and strides, ``value``'s dtype and device.  (A tracer of an integer
    or bool dtype can become a Python index: see NOTE [Patches while
    transforms run].)  The caller sets the payload."""
    dtype = value.dtype
    if not (dtype.is_floating_point or dtype.is_complex):
        integer_tracer_made()
    # Positional arguments: (cls, size, strides, storage_offset, memory_format, dtype, layout, device)
    t = _make_wrapper_subclass(cls, shape, strides, None, None, dtype, layout, value.device)
    t._interp = interp
    return t


def apply_metadata_op(op, args, kwargs) -> None:
    """Run in-place metadata op ``op`` (``squeeze_``, ``t_``, ...) on the
    tracer ``args[0]`` itself: its meta kernel, without dispatch, gives the
    wrapper its new sizes and strides (as
    torch.utils._python_dispatch.return_and_correct_aliasing does), so C++
    callers holding the tensor see the change too.  The transform then sets
    the tracer's payload."""
    with _no_dispatch():
        meta_in_tls = _meta_in_tls_dispatch_include()
        _set_meta_in_tls_dispatch_include(True)
        try:
            getattr(op, "_op", op)(*args, **kwargs)  # the C++ entry point of an OpOverload
        finally:
            _set_meta_in_tls_dispatch_include(meta_in_tls)


_no_dispatch = torch._C._DisableTorchDispatch  # torch.utils._mode_utils.no_dispatch
_meta_in_tls_dispatch_include = torch._C._meta_in_tls_dispatch_include
_set_meta_in_tls_dispatch_include = torch._C._set_meta_in_tls_dispatch_include


def _is_integer_scalar_tracer(item) -> bool:
    return (
        isinstance(item, Tracer)
        and item.dim() == 0
        and not item.dtype.is_floating_point
        and not item.dtype.is_complex
        and item.dtype is not torch.bool
    )


def _tensor_index(tensor, index):
    """See NOTE [0-dim integer tracer as an index].  Returns the index to use
    and the dim of the result to squeeze (or None)."""
    items = index if type(index) is tuple else (index,)
    if not any(_is_integer_scalar_tracer(i) for i in items):
        return index, None
    converted = []
    advanced = []  # positions of tensor indices in `items`
    other_advanced = False
    for k, item in enumerate(items):
        if _is_integer_scalar_tracer(item):
            converted.append(item.unsqueeze(0))
            advanced.append(k)
            continue
        if isinstance(item, torch.Tensor):
            if item.dim() > 0 or item.dtype is torch.bool:
                other_advanced = True
                advanced.append(k)
        elif isinstance(item, (list, range)):
            other_advanced = True
            advanced.append(k)
        converted.append(item)
    converted = tuple(converted)
    if other_advanced:  # the [1] index broadcasts into the others' shape: no extra dim
        return converted, None

    def result_dims(item):
        """Dims of the result produced by a basic index item."""
        if item is None or item is True or item is False or isinstance(item, slice):
            return 1
        if item is Ellipsis:
            specified = sum(
                1 for i in items if i is not None and i is not Ellipsis and i is not True and i is not False
            )
            return tensor.dim() - specified
        return 0  # an int, or a 0-dim integer tensor used as an int

    # PyTorch applies int indices first (removing their dims), so the tensor
    # indices are adjacent unless a slice, None or Ellipsis separates them.
    first, last = advanced[0], advanced[-1]
    separated = any(result_dims(items[k]) != 0 or items[k] is Ellipsis for k in range(first, last) if k not in advanced)
    if separated:
        return converted, 0
    return converted, sum(result_dims(items[k]) for k in range(first))


def debug_unwrap(tensor: torch.Tensor, *, recurse: bool = True) -> torch.Tensor:
    """Unwraps a torchxform tracer (a ``BatchedTensor``, ``GradTensor`` or
    ``DualTensor``) to the tensor it wraps, for debugging; other tensors are
    returned as they are.

    A BatchedTensor unwraps to its physical tensor, batch dim included; a
    GradTensor or DualTensor to its primal value.

    Args:
        tensor (Tensor): the tensor to unwrap.
        recurse (bool): If True, unwrap every level down to a plain tensor;
            otherwise one level only. Default: True.

    Returns:
        Tensor: the unwrapped tensor.

    Example::

        >>> import torch
        >>> from torchxform import debug_unwrap, vmap
        >>> vmap(lambda x: debug_unwrap(x).shape)(torch.randn(3, 2))  # doctest: +SKIP
        torch.Size([3, 2])
    """
    while isinstance(tensor, Tracer):
        tensor = tensor._underlying()
        if not recurse:
            break
    return tensor
