"""Rule tables keyed by ``OpOverload``, and what to do when an op has none.

Each transform looks its rules up in its own dict (one lookup per op per
level).  Rules are registered next to each other per op family under
``torchxform/rules/``; this module only holds the tables, the decomposition
lookup and the coverage listing.

Batching rules have the signature ``rule(bdims, *args, **kwargs) ->
(out, out_bdims)``: ``args`` are the op's positional arguments with this
level's tracers replaced by their physical values, ``bdims`` a list with
one entry per positional argument (the batch dim, or None for unbatched and
non-tensor arguments; for a ``Tensor[]`` argument, a tuple of entries), and
``out_bdims`` mirrors the output structure.

VJP rules are called at backward time with keyword arguments chosen by the
rule's own signature (so only what it names is saved for backward, as
derivatives.yaml does): ``grad`` (the output's cotangent; a tuple for ops
with several outputs, None where an output got none), any of the op's
schema argument names (their forward values), ``result`` (the forward
output(s)), ``needs`` (per positional argument: is its gradient wanted),
``inputs_meta`` (per positional argument: ``(shape, dtype, device)`` of a
tensor, a tuple of those for a ``Tensor[]``, else None), ``op``, and
``kwarg_needs`` (``{name: True}`` for keyword-only tensors being
differentiated; a rule that names it returns a dict ``{name: grad}`` as its
last element, after the positional entries).  A VJP rule returns one entry per positional argument of the op (a
list for a ``Tensor[]`` argument; None for no gradient; a shorter tuple
means None for the rest).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch._ops import OpOverload, OpOverloadPacket

# op -> batching rule.  See the module docstring for the signature.
BATCH_RULES: dict[OpOverload, Callable] = {}

# op -> VJP rule.  See the module docstring for the signature.
VJP_RULES: dict[OpOverload, Callable] = {}

# op -> JVP rule.  A JVP rule runs at forward time; it names what it needs
# (schema arguments = primals, ``<name>_t`` = that argument's tangent or None,
# ``tangents`` = all of them by position, ``result``, ``op``) and returns the
# output's tangent (a tuple for several outputs; None for zero).  A rule
# with ``raw_jvp = True`` is called as ``rule(op, primals, tangents, kwargs,
# result)`` instead (generic rules).
JVP_RULES: dict[OpOverload, Callable] = {}

# Ops whose outputs carry no derivative even for floating inputs
# (detach, sign, floor, ...): no VJP needed, the outputs are constants.
NONDIFFERENTIABLE: set[OpOverload] = set()

# Ops whose batching rule also accepts batched keyword-only tensors: it is
# then called with ``kwarg_bdims={name: bdim}`` for the batched ones
# (otherwise a batched keyword argument sends the op to the fallback).
KWARG_BATCH_RULES: set[OpOverload] = set()

# Ops whose rule raises on purpose (dynamic shapes, data-dependent values):
# reported as such by the coverage listing.
ERROR_RULES: set[OpOverload] = set()


_CHANGE_HOOKS: list[Callable[[], None]] = []


def on_rules_changed(hook: Callable[[], None]) -> None:
    """Call ``hook`` whenever a rule is registered (transforms cache per-op
    lookups and clear them then)."""
    _CHANGE_HOOKS.append(hook)


def _changed() -> None:
    for hook in _CHANGE_HOOKS:
        hook()


def _overloads(ops) -> Iterable[OpOverload]:
    for op in ops:
        if isinstance(op, OpOverloadPacket):
            raise TypeError(
                f"register rules for overloads, not packets: got {op}; "
                f"pick one of {op.overloads()} (e.g. {op}.{op.overloads()[0]})"
            )
        if not isinstance(op, OpOverload):
            raise TypeError(f"expected a torch OpOverload such as torch.ops.aten.sin.default (or a torch.library.custom_op), got {op!r}")
        yield op


def register_batching(*ops: OpOverload, error: bool = False, batched_kwargs: bool = False):
    """Decorator: register ``rule`` as the batching rule of each op in ``ops``.

    The rule receives the op as first argument when it is registered for
    several ops (``functools.partial``), so one generic rule serves a family.
    ``error=True`` marks rules that exist only to raise a clear error;
    ``batched_kwargs=True`` rules that handle batched keyword-only tensors
    (see ``KWARG_BATCH_RULES``).
    """
    ops = tuple(_overloads(ops))  # bad ops raise here, where they are named

    def decorator(rule: Callable) -> Callable:
        many = len(ops) > 1
        for op in ops:
            BATCH_RULES[op] = functools.partial(rule, op) if many else rule
            if error:
                ERROR_RULES.add(op)
            if batched_kwargs:
                KWARG_BATCH_RULES.add(op)
        _changed()
        return rule

    return decorator


def register_batching_each(ops: Iterable[OpOverload], rule: Callable, **options) -> None:
    """Register ``functools.partial(rule, op, **options)`` for every op."""
    for op in _overloads(ops):
        BATCH_RULES[op] = functools.partial(rule, op, **options)
    _changed()


def _rule_registrar(table: dict, ops) -> Callable[[Callable], Callable]:
    ops = tuple(_overloads(ops))  # bad ops raise here, where they are named

    def decorator(rule: Callable) -> Callable:
        for op in ops:
            table[op] = rule
        _changed()
        return rule

    return decorator


def register_vjp(*ops: OpOverload):
    """Decorator: register ``rule`` as the VJP rule of each op in ``ops``
    (see the module docstring for the signature)."""
    return _rule_registrar(VJP_RULES, ops)


def register_jvp(*ops: OpOverload):
    """Decorator: register ``rule`` as the JVP rule of each op in ``ops``
    (see ``JVP_RULES`` for the signature)."""
    return _rule_registrar(JVP_RULES, ops)


def register_nondifferentiable(*ops: OpOverload) -> None:
    """Mark ops whose outputs have zero derivative everywhere they exist."""
    NONDIFFERENTIABLE.update(_overloads(ops))
    _changed()


def aten_overloads() -> Iterable[OpOverload]:
    """Every overload of every ATen op in this torch build (for rules that
    cover ops by tag)."""
    aten = torch.ops.aten
    for name in dir(aten):
        packet = getattr(aten, name, None)
        if isinstance(packet, OpOverloadPacket):
            for overload in packet.overloads():
                yield getattr(packet, overload)


def overloads(packet: OpOverloadPacket, *names: str) -> list[OpOverload]:
    """The named overloads of ``packet`` that exist in this torch build."""
    found = []
    for name in names:
        if name in packet.overloads():
            found.append(getattr(packet, name))
    return found


# --------------------------------------------------------------------------
# Decompositions
# --------------------------------------------------------------------------

# Only ATen-level decompositions: torch._refs implementations are written in
# prims, which no interpreter here has rules for, and the `*_copy` entries
# of the table alias their view ops (a copy op must not return a view).
_DECOMP_MODULES = ("torch._decomp.decompositions",)
_DECOMP_CACHE: dict[OpOverload, Callable | None] = {}


# torchxform's own decompositions (for ops torch has none usable for).
DECOMPOSITIONS: dict[OpOverload, Callable] = {}


def register_decomposition(*ops: OpOverload):
    """Decorator: ``fn`` (same signature as the op) decomposes ``ops`` into
    other ATen ops for every transform without a rule for them."""

    def decorator(fn: Callable) -> Callable:
        for op in _overloads(ops):
            DECOMPOSITIONS[op] = fn
        _DECOMP_CACHE.clear()
        _changed()
        return fn

    return decorator


def decomposition(op: OpOverload) -> Callable | None:
    """A decomposition of ``op`` into other ATen ops, or None.

    First torchxform's own (``register_decomposition``), then the op's
    CompositeImplicitAutograd kernel: such ops normally decompose above
    ``__torch_dispatch__``, but inside a rule (below autograd) they arrive
    whole.  Then torch._decomp's Python ones.
    """
    try:
        return _DECOMP_CACHE[op]
    except KeyError:
        pass
    from torch._decomp import decomposition_table

    if op in DECOMPOSITIONS:
        _DECOMP_CACHE[op] = DECOMPOSITIONS[op]
        return DECOMPOSITIONS[op]
    try:
        composite = torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")
    except RuntimeError:  # TorchScript-only overloads (e.g. aten::__and__.bool) are not dispatcher ops
        composite = False
    if composite:
        fn = op.decompose
    else:
        fn = decomposition_table.get(op)
        if fn is not None and getattr(fn, "__module__", "") not in _DECOMP_MODULES:
            fn = None
    _DECOMP_CACHE[op] = fn
    return fn


# --------------------------------------------------------------------------
# Coverage
# --------------------------------------------------------------------------


def batching_coverage(op: OpOverload) -> str:
    """How vmap handles ``op``: 'rule', 'error' (a rule that raises on
    purpose), 'decomposition' or 'loop' (the slow per-example fallback)."""
    if op in BATCH_RULES:
        return "error" if op in ERROR_RULES else "rule"
    from .schema import metadata_inplace_counterpart

    counterpart = metadata_inplace_counterpart(op)
    if counterpart is not None and counterpart in BATCH_RULES:
        return "rule"  # squeeze_, t_, ...: the view's rule, then new metadata
    if decomposition(op) is not None:
        return "decomposition"
    return "loop"


def jvp_coverage(op: OpOverload) -> str:
    """How jvp handles ``op``: 'rule', 'nondifferentiable', 'decomposition',
    'from-vjp' (derived from its VJP rule, see NOTE [JVP from a VJP]) or
    'missing'."""
    if op in JVP_RULES:
        return "rule"
    if op in NONDIFFERENTIABLE and op not in VJP_RULES:
        return "nondifferentiable"
    if decomposition(op) is not None:
        return "decomposition"
    if op in VJP_RULES:
        return "from-vjp"
    return "missing"


def vjp_coverage(op: OpOverload) -> str:
    """How grad/vjp handle ``op``: 'rule', 'nondifferentiable',
    'decomposition' or 'missing' (an error if a derivative is needed)."""
    if op in VJP_RULES:  # a rule wins over a nondifferentiable mark
        return "rule"
    if op in NONDIFFERENTIABLE:
        return "nondifferentiable"
    if decomposition(op) is not None:
        return "decomposition"
    return "missing"


def registered_ops() -> list[OpOverload]:
    """Every op that has at least one registered rule, sorted by name."""
    return sorted(set(BATCH_RULES) | set(VJP_RULES) | set(JVP_RULES) | NONDIFFERENTIABLE, key=str)


__all__ = [
    "BATCH_RULES",
    "VJP_RULES",
    "JVP_RULES",
    "register_jvp",
    "jvp_coverage",
    "NONDIFFERENTIABLE",
    "ERROR_RULES",
    "KWARG_BATCH_RULES",
    "register_vjp",
    "register_nondifferentiable",
    "register_decomposition",
    "DECOMPOSITIONS",
    "vjp_coverage",
    "register_batching",
    "on_rules_changed",
    "register_batching_each",
    "overloads",
    "decomposition",
    "batching_coverage",
    "registered_ops",
]
