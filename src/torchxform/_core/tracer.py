"""The tracer base class: a ``torch.Tensor`` wrapper subclass.

A tracer reports the *logical* shape, strides, dtype and device of the value
its transform tracks, so user code (nn.Modules, tensor methods,
torch.nn.functional) runs on it unchanged.  It owns no storage; every ATen op
on it reaches ``bind`` through ``__torch_dispatch__`` (or through the
transform mode, which runs first while a transform is active).
"""

from __future__ import annotations

import torch

_make_wrapper_subclass = torch.Tensor._make_wrapper_subclass
_EMPTY_KWARGS: dict = {}
_bind = None  # set by dispatch.py, which imports this module


class Tracer(torch.Tensor):
    """Base class of every transform's tracked values.

    Subclasses set ``_interp`` (their interpreter) and their payload, and
    implement ``_payload_repr`` and ``_dead_value``.
    """

    _interp = None  # the Interpreter this tracer belongs to

    # Tensor methods and torch functions dispatch to ATen as usual; only the
    # ATen ops are intercepted (CompositeImplicit ops arrive decomposed).
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _bind(func, args, kwargs or _EMPTY_KWARGS)

    @staticmethod
    def _wrap_shape(cls, shape, strides, like: torch.Tensor) -> "Tracer":
        """Allocate a storage-less tracer of ``cls`` with the given logical
        shape/strides and ``like``'s dtype and device."""
        return _make_wrapper_subclass(cls, shape, strides, dtype=like.dtype, device=like.device)

    def _payload_repr(self) -> str:
        raise NotImplementedError

    def _dead_value(self):
        """The value that stands for this tracer once its transform ended."""
        raise NotImplementedError

    def __repr__(self, *, tensor_contents=None) -> str:
        level = self._interp.level if self._interp is not None else "?"
        inner = self._payload_repr().replace("\n", "\n    ")
        return f"{type(self).__name__}(lvl={level}, {inner}\n)"

    def __str__(self) -> str:
        return self.__repr__()

    def __reduce_ex__(self, protocol):
        raise RuntimeError(
            f"{type(self).__name__} is a transform's internal value and cannot be "
            "pickled or deep-copied; return it from the transformed function instead."
        )
