"""The interpreter stack: one entry per active transform.

Every transform (vmap, grad, jvp, ...) pushes an :class:`Interpreter` while
the user's function runs; its position on the thread-local stack is its
*level* (1 for the outermost).  Values a transform tracks are tracers
(see ``tracer.py``) that point back at their interpreter; ``bind`` (see
``dispatch.py``) routes every ATen op to the highest live level among them.

NOTE [Ceiling]
While an interpreter at level L runs a rule, the ops the rule issues belong
to the levels below L.  Tracers make that automatic for ops on tracked
values, but an op without any tracer argument (``torch.rand(3)`` from a
random-op rule, for instance) would otherwise be routed to the top of the
stack.  ``STATE.ceiling`` records how many stack entries (from the bottom)
may receive such ops: ``None`` at user level (all of them), ``L - 1`` while
level L processes an op, ``L`` while level L runs a decomposition of one of
its own ops (whose random ops it must see itself).

A transform may also start while a level is suspended, e.g. a vmap inside a
rule or inside an autograd.Function's generated vmap rule, which runs below
level L: the new level is pushed on top of the stack, above L, yet the
levels beneath it are those below the ceiling it started under.  So each
interpreter records its ``floor``, the ceiling its rules' ops get: the
ceiling in force when it was pushed, or ``level - 1`` at user level.
"""

from __future__ import annotations

import threading


class TransformState(threading.local):
    """Thread-local state shared by all transforms."""

    def __init__(self) -> None:
        self.stack: list[Interpreter] = []
        self.ceiling: int | None = None  # See NOTE [Ceiling]
        self.rule_owner: Interpreter | None = None  # the vmap level whose random-op rule runs


STATE = TransformState()

_dispatch = None  # the dispatch module, which imports this one: set there


class Interpreter:
    """One active transform.  Subclasses implement :meth:`process`.

    ``level`` is fixed when the interpreter is pushed; ``alive`` turns False
    when its transform returns, after which its escaped tracers stand for
    their plain values (see ``Tracer._dead_value``).
    """

    __slots__ = ("level", "floor", "alive", "_decomposing", "__weakref__")
    name = "transform"
    # Whether ops at user level that involve no tracer at all (factories,
    # ops on captured plain tensors) belong to this interpreter when it is
    # the innermost one: true for autograd-style transforms, whose tensors
    # created inside the function live at their level.
    claims_untracked = False

    def __init__(self) -> None:
        self.level = 0
        self.floor = 0  # the ceiling for the ops its rules issue: see NOTE [Ceiling]
        self.alive = False
        self._decomposing: set = set()

    def process(self, op, args, kwargs):
        """Run ATen ``op`` whose highest-level tracer argument belongs to self.

        ``args``/``kwargs`` are as ``__torch_dispatch__`` received them: this
        interpreter's tracers, tracers of lower levels and plain values.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement process()")

    def decompose(self, op, args, kwargs):
        """Run ``op``'s decomposition on this level's own tracers (so its ops
        bind here again), or return NotImplemented if it has none (or is
        already being decomposed: a decomposition that calls its own op)."""
        from .dispatch import dispatch_keys_restored, needs_dispatch_keys
        from .registry import decomposition

        decomp = decomposition(op)
        if decomp is None or op in self._decomposing:
            return NotImplemented
        state = STATE
        saved_ceiling = state.ceiling
        state.ceiling = self.level  # its random ops belong to this level: see NOTE [Ceiling]
        self._decomposing.add(op)
        try:
            if needs_dispatch_keys(args):
                with dispatch_keys_restored():
                    return decomp(*args, **kwargs)
            return decomp(*args, **kwargs)
        finally:
            self._decomposing.discard(op)
            state.ceiling = saved_ceiling

    def __repr__(self) -> str:
        state = "alive" if self.alive else "dead"
        return f"{type(self).__name__}(level={self.level}, {state})"


class interpreting:
    """Context manager: push ``interp`` for the duration of a transform.

    Restores the stack, the ceiling and the dispatch mode on every exit path,
    also when the user's function raises.
    """

    __slots__ = ("interp", "_depth", "_ceiling", "_mode_token")

    def __init__(self, interp: Interpreter) -> None:
        self.interp = interp

    def __enter__(self) -> Interpreter:
        state = STATE
        stack = state.stack
        self._depth = len(stack)
        self._ceiling = state.ceiling
        interp = self.interp
        interp.level = self._depth + 1
        interp.floor = self._depth if self._ceiling is None else self._ceiling
        interp.alive = True
        if self._depth == 0 and not _patches_installed:
            _install_patches()
        stack.append(interp)
        # The user's function runs at user level: random ops without tracers
        # go to the top of the stack again.  See NOTE [Ceiling].
        state.ceiling = None
        if _dispatch is None:
            from . import dispatch  # noqa: F401  (sets _dispatch)
        self._mode_token = _dispatch.enter_mode()
        return interp

    def __exit__(self, exc_type, exc, tb) -> None:
        state = STATE
        self.interp.alive = False
        # Also drops levels that a failing nested transform left behind.
        for leftover in state.stack[self._depth :]:
            leftover.alive = False
        del state.stack[self._depth :]
        state.ceiling = self._ceiling
        _dispatch.exit_mode(self._mode_token)
        if self._depth == 0:
            _remove_patches()


# NOTE [Patches while transforms run]
# A few PyTorch entry points hide their ops from every transform: nn.GRU and
# nn.RNN call C++ composites (torch._VF.gru, ...) that decompose above
# __torch_dispatch__ into code writing batched values in place into
# unbatched temporaries.  While any transform is active (and only then)
# such attributes are replaced by equivalents written in ATen ops; they are
# restored when the outermost transform exits, on every exit path.  The
# patch is process-wide: another thread calling those entry points meanwhile
# gets the same values through the replacement.
#
# Patches of torch.Tensor's own methods are installed later, when the first
# tracer of an integer or bool dtype is made (see ``integer_tracer_made``),
# and removed with the others.  Changing an attribute of torch.Tensor
# invalidates CPython's attribute caches for every tensor type, which costs
# tens of microseconds per transform call in the lookups that follow; and
# the Tensor methods patched (narrow, tensor_split: NOTE [narrow with a
# tensor start] in rules/view.py) differ from the originals only when a
# tracer is given as an index, which needs a tracer of such a dtype to
# exist first.
_PATCHES: list[tuple[object, str, object]] = []
_SAVED: list[tuple[object, str, object]] = []
_TENSOR = None  # torch.Tensor, imported lazily (this module does not import torch)
_patches_installed = False
_tensor_patches_installed = False


def register_patch(owner, attribute: str, replacement) -> None:
    """Use ``replacement`` for ``owner.attribute`` while transforms run
    (for a method of torch.Tensor: once a tracer of an integer or bool dtype
    exists).  See NOTE [Patches while transforms run]."""
    _PATCHES.append((owner, attribute, replacement))


_INHERITED = object()  # the patched attribute was not the owner's own


def _install(owner, attribute, replacement) -> None:
    # The raw attribute, not getattr's: a classmethod read through
    # getattr comes back bound to the owner, and restoring that would
    # bind it to the owner for every subclass too.
    original = vars(owner).get(attribute, _INHERITED)
    _SAVED.append((owner, attribute, original))
    setattr(owner, attribute, replacement)


def _install_patches() -> None:
    global _TENSOR, _patches_installed
    _patches_installed = True
    if _TENSOR is None:
        import torch

        _TENSOR = torch.Tensor
    for owner, attribute, replacement in _PATCHES:
        if owner is not _TENSOR:
            _install(owner, attribute, replacement)


def integer_tracer_made() -> None:
    """Called when a tracer of an integer or bool dtype is made: installs
    the patches of torch.Tensor's methods, if transforms run and they are
    not installed yet.  See NOTE [Patches while transforms run]."""
    global _tensor_patches_installed
    if _tensor_patches_installed or not _patches_installed:
        return
    _tensor_patches_installed = True
    for owner, attribute, replacement in _PATCHES:
        if owner is _TENSOR:
            _install(owner, attribute, replacement)


def _remove_patches() -> None:
    global _patches_installed, _tensor_patches_installed
    _patches_installed = _tensor_patches_installed = False
    while _SAVED:
        owner, attribute, original = _SAVED.pop()
        if original is _INHERITED:
            delattr(owner, attribute)
        else:
            setattr(owner, attribute, original)


def active_interpreters() -> tuple[Interpreter, ...]:
    """The live interpreters of this thread, outermost first."""
    return tuple(STATE.stack)


def transform_depth() -> int:
    """How many transforms are active on this thread."""
    return len(STATE.stack)


__all__ = ["Interpreter", "interpreting", "active_interpreters", "transform_depth", "register_patch", "STATE"]
