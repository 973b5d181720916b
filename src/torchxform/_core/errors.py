"""Warnings and errors of torchxform's own."""

from __future__ import annotations

import warnings


class SlowFallbackWarning(UserWarning):
    """An op had no batching rule and ran as a per-example Python loop.

    Emitted once per op.  Turn it into an error with
    ``warnings.simplefilter("error", torchxform.SlowFallbackWarning)``.
    """


_WARNED: set = set()


def warn_slow_fallback(op, transform: str = "vmap") -> None:
    """Warn once per op that ``op`` took the slow loop fallback."""
    if op in _WARNED:
        return
    warnings.warn(
        f"{transform}: there is no batching rule for {op}, so it ran through the slow "
        f"fallback: a Python loop over the batch, one call per example. Results are "
        f"correct but slower. Register a rule with torchxform's batching registry "
        f"(see torchxform/rules/) to vectorize it.",
        SlowFallbackWarning,
        stacklevel=3,
    )
    # Only after warning: with the "error" filter every call raises again.
    _WARNED.add(op)


def reset_fallback_warnings() -> None:
    """Forget which ops already warned (each will warn once more)."""
    _WARNED.clear()
