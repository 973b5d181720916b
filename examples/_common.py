"""Shared by the example scripts: timing and reporting against a loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch


def best_time(fn: Callable[[], object], repeats: int = 3) -> tuple[object, float]:
    """Runs ``fn`` once to warm up, then ``repeats`` times; returns its
    result and the best wall time in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def max_abs_error(ours: Iterable[torch.Tensor], reference: Iterable[torch.Tensor]) -> float:
    """Largest absolute difference over matching pairs of tensors."""
    return max((a - b).abs().max().item() for a, b in zip(ours, reference, strict=True))


def report(title: str, error: float, t_ours: float, t_loop: float, tolerance: float = 1e-4) -> None:
    print(f"{title}\n    max abs error vs reference = {error:.2e}    torchxform {t_ours * 1e3:8.2f} ms"
          f"    loop {t_loop * 1e3:8.2f} ms    ({t_loop / t_ours:.2f}x)")
    if not error < tolerance:
        raise SystemExit(f"{title}: disagrees with the reference (max abs error {error})")
