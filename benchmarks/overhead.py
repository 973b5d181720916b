"""Eager overhead of the transforms, side by side with torch.func and plain
ops in the same run (one thread, interleaved repeats, medians):

* per op: a chain of elementwise ops (``a * 1.01``) on small tensors under
  vmap, grad, vmap(grad) and jvp.  Reported as microseconds per op, from
  the difference between a long and a short chain, so per-call costs
  cancel out; divide by the number of levels for µs per op per level;
* per call: whole calls of small workloads, where the API wrappers'
  per-call work counts: a few elementwise ops on 8 elements under
  vmap(grad), and jacrev / jacfwd / hessian of a 64 -> 64 tanh MLP.

Run: ``python benchmarks/overhead.py [--repeats N]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
import torch.func

import torchxform

SHORT, LONG = 10, 60  # chain lengths; per-op cost = (t(LONG) - t(SHORT)) / (LONG - SHORT)


def chain(n):
    def f(a):
        for _ in range(n):
            a = a * 1.01
        return a

    return f


def chain_sum(n):
    inner = chain(n)
    return lambda a: inner(a).sum()


def per_op_cases(lib):
    """name -> (callable taking the chain length and returning a thunk, levels)."""
    x = torch.randn(8, 8)
    t = torch.randn(8, 8)
    cases = {
        "plain": (lambda n: (lambda: chain(n)(x)), 0),
        "vmap": (lambda n: (lambda: lib.vmap(chain(n))(x)), 1),
        "grad": (lambda n: (lambda: lib.grad(chain_sum(n))(x)), 1),
        "jvp": (lambda n: (lambda: lib.jvp(chain(n), (x,), (t,))), 1),
        "vmap(grad)": (lambda n: (lambda: lib.vmap(lib.grad(chain_sum(n)))(x)), 2),
    }
    return cases


def mlp():
    torch.manual_seed(0)
    w1, b1 = torch.randn(64, 64) / 8, torch.randn(64)
    w2, b2 = torch.randn(64, 64) / 8, torch.randn(64)
    x = torch.randn(64)
    return (lambda x: torch.tanh(w2 @ torch.tanh(w1 @ x + b1) + b2)), x


def tiny(x):
    return (torch.sin(x) * x + torch.cos(x)).sum()


def per_call_cases(lib):
    f, x = mlp()
    xs = torch.randn(8)
    return {
        "tiny vmap(grad)": lambda: lib.vmap(lib.grad(tiny))(xs),
        "jacrev mlp64": lambda: lib.jacrev(f)(x),
        "jacfwd mlp64": lambda: lib.jacfwd(f)(x),
        "hessian mlp64": lambda: lib.hessian(f)(x),
    }


def time_once(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def calibrate(fn, target: float = 0.02) -> int:
    fn()
    t = time_once(fn, 1)
    return max(1, min(1000, int(target / max(t, 1e-7))))


def run(repeats: int) -> None:
    libs = {"torchxform": torchxform, "torch.func": torch.func}
    # Per-op thunks: (case, lib) -> (short thunk, long thunk, inner count).
    per_op = {}
    for lib_name, lib in libs.items():
        for case, (make, levels) in per_op_cases(lib).items():
            if case == "plain" and lib_name != "torchxform":
                continue
            short, long = make(SHORT), make(LONG)
            per_op[case, lib_name] = (short, long, calibrate(long), levels)
    per_call = {}
    for lib_name, lib in libs.items():
        for case, fn in per_call_cases(lib).items():
            per_call[case, lib_name] = (fn, calibrate(fn))

    op_samples = {key: [] for key in per_op}
    call_samples = {key: [] for key in per_call}
    for _ in range(repeats):  # interleaved: every case once per round
        for key, (short, long, inner, _) in per_op.items():
            t_long = time_once(long, inner)
            t_short = time_once(short, inner)
            op_samples[key].append((t_long - t_short) / (LONG - SHORT))
        for key, (fn, inner) in per_call.items():
            call_samples[key].append(time_once(fn, inner))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {repeats} interleaved repeats, medians")
    plain = statistics.median(op_samples["plain", "torchxform"]) * 1e6
    print(f"\nper op: chain of `a * 1.01` on 8x8 (µs/op; (t({LONG})-t({SHORT}))/{LONG - SHORT}); plain op {plain:.1f} µs")
    print(f"    {'transform':12s} {'levels':>6s} {'torchxform':>11s} {'torch.func':>11s} {'ratio':>6s} {'txf µs/op/level':>16s}")
    for case, (_, levels) in per_op_cases(torchxform).items():
        if case == "plain":
            continue
        ours = statistics.median(op_samples[case, "torchxform"]) * 1e6
        theirs = statistics.median(op_samples[case, "torch.func"]) * 1e6
        print(f"    {case:12s} {levels:6d} {ours:11.1f} {theirs:11.1f} {ours / theirs:6.2f} {ours / levels:16.1f}")
    print("\nper call (ms/call)")
    print(f"    {'workload':18s} {'torchxform':>11s} {'torch.func':>11s} {'ratio':>6s}")
    ratios = []
    for case in per_call_cases(torchxform):
        ours = statistics.median(call_samples[case, "torchxform"]) * 1e3
        theirs = statistics.median(call_samples[case, "torch.func"]) * 1e3
        ratios.append(ours / theirs)
        print(f"    {case:18s} {ours:11.3f} {theirs:11.3f} {ours / theirs:6.2f}")
    jac = ratios[1:]
    print(f"    geomean ratio jacrev/jacfwd/hessian: {math.exp(sum(map(math.log, jac)) / len(jac)):.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    options = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)
    run(options.repeats)
