"""Which ops each transform handles, and how: ``coverage()`` for the rule
tables or for the ops a function reaches, ``explain(f)(*args)`` for the
performance cliffs and missing rules of one call.
``python -m torchxform.coverage`` prints the table for every op with a rule
(see coverage.py)."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ._core import errors
from ._core.registry import batching_coverage, jvp_coverage, registered_ops, vjp_coverage


@dataclass
class CoverageReport:
    """One row per op: how vmap, grad/vjp and jvp handle it.

    vmap: 'rule', 'error' (raises on purpose: data-dependent shapes),
    'decomposition' or 'loop' (the slow per-example fallback); grad: 'rule',
    'nondifferentiable', 'decomposition' or 'missing'; jvp: the same and
    'from-vjp' (derived from the VJP rule)."""

    rows: list[tuple[str, str, str, str]]

    def counts(self) -> dict[str, collections.Counter]:
        """Per transform, how many ops fall in each category."""
        return {
            name: collections.Counter(row[i] for row in self.rows)
            for i, name in ((1, "vmap"), (2, "grad"), (3, "jvp"))
        }

    def __str__(self) -> str:
        width = max([len("op")] + [len(row[0]) for row in self.rows])
        lines = [f"{'op':{width}s}  {'vmap':13s}  {'grad':17s}  jvp", "-" * (width + 50)]
        lines += [f"{op:{width}s}  {vmap:13s}  {grad:17s}  {jvp}" for op, vmap, grad, jvp in self.rows]
        lines.append("")
        for name, counter in self.counts().items():
            lines.append(f"{name}: " + ", ".join(f"{kind} {n}" for kind, n in sorted(counter.items())))
        return "\n".join(lines)

    __repr__ = __str__


class _RecordOps(TorchDispatchMode):
    """Records the ATen ops a function runs (after autograd, so
    CompositeImplicit ops arrive decomposed, as the transforms see them)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] = None
        return func(*args, **(kwargs or {}))


def coverage(func: Callable | None = None, *args, **kwargs) -> CoverageReport:
    """How vmap, grad/vjp and jvp handle each op: every op with a rule, or
    with ``func`` the ATen ops that ``func(*args, **kwargs)`` runs (called
    once, eagerly, without transforms).

    Args:
        func (Callable, optional): a function whose ops to report.
        *args, **kwargs: its arguments.

    Returns:
        CoverageReport: printable; ``.rows`` holds ``(op, vmap, grad, jvp)``
        and ``.counts()`` the totals per transform.

    Example::

        >>> import torch
        >>> from torchxform import coverage
        >>> report = coverage(lambda x: torch.nn.functional.gelu(x).sum(), torch.randn(3))
        >>> [row[:2] for row in report.rows]
        [('aten.gelu.default', 'rule'), ('aten.sum.default', 'rule')]
    """
    if func is None:
        ops = registered_ops()
    else:
        recorder = _RecordOps()
        with recorder:
            func(*args, **kwargs)
        ops = list(recorder.ops)
    rows = [(str(op), batching_coverage(op), vjp_coverage(op), jvp_coverage(op)) for op in ops]
    return CoverageReport(rows)


@dataclass
class Explanation:
    """What one call of a transformed function did that is slow or
    unsupported: ``fallbacks`` counts the ops that ran as a per-example
    loop, by (transform, op); ``missing_rule`` is the op (and transform)
    whose missing derivative rule stopped the call, if one did."""

    fallbacks: collections.Counter = field(default_factory=collections.Counter)
    missing_rule: tuple[str, str] | None = None

    def __str__(self) -> str:
        if not self.fallbacks and self.missing_rule is None:
            return "torchxform.explain: every op ran on a rule or a decomposition (no slow fallback)."
        lines = ["torchxform.explain:"]
        for (transform, op), calls in self.fallbacks.most_common():
            lines.append(f"  {transform}: {op} ran as a per-example loop ({calls} call{'s' * (calls != 1)}); "
                         f"register a rule with torchxform.register_batch_rule")
        if self.missing_rule is not None:
            transform, op = self.missing_rule
            register = "register_vjp" if transform == "grad" else "register_jvp"
            lines.append(f"  {transform}: no derivative rule for {op}; register one with torchxform.{register}")
        return "\n".join(lines)

    __repr__ = __str__


def explain(func: Callable, *, verbose: bool = True) -> Callable:
    """Wraps a function that uses torchxform's transforms so that each call
    also reports what torch.func only warns about once: every op that took
    the slow per-example loop (with how many calls), and the op whose
    missing derivative rule stopped the call.

    Args:
        func (Callable): typically a transformed function, e.g.
            ``vmap(grad(loss))``.
        verbose (bool): print the report after each call. Default: True.

    Returns:
        Callable: returns ``(func's result, Explanation)``; if ``func``
        raises for a missing rule, the report is printed (when verbose) and
        the error re-raised with it attached as ``explanation``.

    Example::

        >>> import torch
        >>> from torchxform import explain, vmap
        >>> out, report = explain(vmap(torch.sin), verbose=False)(torch.randn(4, 3))
        >>> report.fallbacks
        Counter()
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        report = Explanation()

        def observe(transform, op):
            report.fallbacks[(transform, str(op))] += 1

        errors.FALLBACK_OBSERVERS.append(observe)
        try:
            result = func(*args, **kwargs)
        except errors.MissingRuleError as error:
            report.missing_rule = (error.transform, str(error.op))
            error.explanation = report
            if verbose:
                print(report)
            raise
        finally:
            errors.FALLBACK_OBSERVERS.remove(observe)
        if verbose:
            print(report)
        return result, report

    return wrapper


def main() -> None:
    report = coverage()
    print(report)
    print(f"\n{len(report.rows)} ops with a rule; torch {torch.__version__}")


__all__ = ["coverage", "explain", "CoverageReport", "Explanation"]
