"""Forward-mode and Jacobian measurements, each side by side with torch.func
in the same run:

* ``linearize``: one call of the returned ``jvp_fn`` against one full
  ``jvp`` (which re-runs the primal computation);
* ``jacrev(chunk_size=...)``: how far the resident memory of a process
  peaks above where it stood, while computing one Jacobian, for several
  chunk sizes (each in a fresh subprocess, so that peaks do not mix; Linux).

Run: ``python benchmarks/jacobians.py``
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
import warnings

import torch
import torch.func

import torchxform


def best_time(fn, repeats: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def expensive_primal(x):
    """A primal computation much dearer than its linearization's use: many
    elementwise layers on a vector."""
    for _ in range(50):
        x = torch.tanh(x) * 1.01 + torch.sin(x)
    return x


def linearize_report() -> None:
    x, t = torch.randn(10_000), torch.randn(10_000)
    print("linearize: one jvp_fn(t) call vs one jvp(f, (x,), (t,)) call, 50 elementwise layers, n=10000")
    for name, lib in (("torchxform", torchxform), ("torch.func", torch.func)):
        with warnings.catch_warnings():  # torch.fx's const folding warns about its own graph
            warnings.simplefilter("ignore", UserWarning)
            _, jvp_fn = lib.linearize(expensive_primal, x)
        t_linear = best_time(lambda: jvp_fn(t))
        t_jvp = best_time(lambda: lib.jvp(expensive_primal, (x,), (t,)))
        print(f"    {name:11s} jvp_fn {t_linear * 1e3:7.2f} ms    jvp {t_jvp * 1e3:7.2f} ms    "
              f"(jvp_fn is {t_jvp / t_linear:.1f}x faster)")


def peak_memory_child(library: str, chunk_size: str) -> None:
    torch.manual_seed(0)
    w1, w2 = torch.randn(8000, 2000) / 45, torch.randn(2000, 8000) / 90
    x = torch.randn(2000)
    f = lambda x: torch.tanh(w2 @ torch.tanh(w1 @ x))  # noqa: E731
    lib = torchxform if library == "torchxform" else torch.func
    before = _current_rss_mb()
    jacobian = lib.jacrev(f, chunk_size=None if chunk_size == "None" else int(chunk_size))(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{peak - before:.0f} {jacobian.sum().item():.6f}")


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def chunk_size_report() -> None:
    print("jacrev(f, chunk_size) peak memory growth while computing one 2000x2000 Jacobian of a "
          "2000-8000-2000 tanh MLP (the Jacobian alone is 16 MB)")
    for name in ("torchxform", "torch.func"):
        row = []
        for chunk_size in ("None", "100", "10", "1"):
            out = subprocess.run([sys.executable, __file__, "--child", name, chunk_size], check=True,
                                 capture_output=True, text=True).stdout.split()
            row.append(f"chunk_size={chunk_size}: {out[0]:>4s} MB")
        print(f"    {name:11s} " + "    ".join(row))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        peak_memory_child(sys.argv[2], sys.argv[3])
    else:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        linearize_report()
        chunk_size_report()
