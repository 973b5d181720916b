"""Warnings and errors of torchxform's own."""

from __future__ import annotations

import warnings


class SlowFallbackWarning(UserWarning):
    """An op had no batching rule and ran as a per-example Python loop.

    Emitted once per op.  Turn it into an error with
    ``warnings.simplefilter("error", torchxform.SlowFallbackWarning)``.
    """


class MissingRuleError(RuntimeError):
    """An op needed a derivative rule that neither exists nor follows from
    a decomposition.  ``op`` and ``transform`` say which."""

    def __init__(self, message: str, op, transform: str) -> None:
        super().__init__(message)
        self.op = op
        self.transform = transform


_WARNED: set = set()

# Called as observer(transform, op) on every slow fallback (torchxform.explain).
FALLBACK_OBSERVERS: list = []


def warn_slow_fallback(op, transform: str = "vmap") -> None:
    """Tell the observers, and warn once per op, that ``op`` took the slow
    loop fallback."""
    for observer in FALLBACK_OBSERVERS:
        observer(transform, op)
    if op in _WARNED:
        return
    warnings.warn(
        f"{transform}: there is no batching rule for {op}, so it ran through the slow "
        f"fallback: a Python loop over the batch, one call per example. Results are "
        f"correct but slower. Register a rule with torchxform.register_batch_rule "
        f"(see torchxform/rules/ for examples) to vectorize it.",
        SlowFallbackWarning,
        stacklevel=3,
    )
    # Only after warning: with the "error" filter every call raises again.
    _WARNED.add(op)


def reset_fallback_warnings() -> None:
    """Forget which ops already warned (each will warn once more)."""
    _WARNED.clear()
