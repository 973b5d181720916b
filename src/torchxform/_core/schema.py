"""Facts about an ATen op read once from its schema and cached."""

from __future__ import annotations

_INPLACE: dict = {}
_OUT_VARIANT: dict = {}


def mutates_self(op) -> bool:
    """True when ``op`` writes its first argument in place (``add_``,
    ``copy_``, ``index_put_``, ...) and so returns it."""
    flag = _INPLACE.get(op)
    if flag is None:
        arguments = op._schema.arguments
        alias = arguments[0].alias_info if arguments else None
        flag = _INPLACE[op] = bool(alias is not None and alias.is_write and not arguments[0].kwarg_only)
    return flag


def is_view_op(op) -> bool:
    """True when ``op``'s first output aliases an input without writing it
    (``view``, ``select``, ``split``, ...)."""
    returns = op._schema.returns
    if not returns:
        return False
    alias = returns[0].alias_info
    return alias is not None and not alias.is_write


def is_out_variant(op) -> bool:
    """True for ``out=`` overloads (they write a keyword-only argument)."""
    flag = _OUT_VARIANT.get(op)
    if flag is None:
        flag = _OUT_VARIANT[op] = any(
            a.kwarg_only and a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments
        )
    return flag


def functional_counterpart(op):
    """The out-of-place op of an in-place one: ``aten.index_put.default``
    for ``aten.index_put_.default``."""
    import torch

    packet = getattr(torch.ops.aten, op._schema.name.split("::")[-1].rstrip("_"))
    return getattr(packet, op._overloadname)


_METADATA_INPLACE: dict = {}


def metadata_inplace_counterpart(op):
    """For an in-place op that changes its input's shape or strides rather
    than its values (``squeeze_``, ``unsqueeze_``, ``t_``, ``transpose_``,
    ``as_strided_``), the out-of-place view op computing the new view; else None."""
    try:
        return _METADATA_INPLACE[id(op)]
    except KeyError:
        pass
    import torch

    name = op._schema.name.split("::")[-1]
    counterpart = None
    if name in ("squeeze_", "unsqueeze_", "t_", "transpose_", "as_strided_", "swapaxes_", "swapdims_"):
        packet = getattr(torch.ops.aten, name[:-1])
        overload = op._overloadname
        if overload in packet.overloads():
            counterpart = getattr(packet, overload)
        else:  # transpose_.default is transpose.int: match by argument names
            names = [a.name for a in op._schema.arguments]
            for candidate in packet.overloads():
                if [a.name for a in getattr(packet, candidate)._schema.arguments] == names:
                    counterpart = getattr(packet, candidate)
                    break
    _METADATA_INPLACE[id(op)] = counterpart
    return counterpart
