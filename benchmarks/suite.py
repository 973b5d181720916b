"""The benchmark suite: every workload of ``benchmarks/workloads.py``, each
peer side by side in one process, timed the same way.

Run (about 5 minutes on a 2-core CPU; ``--quick`` for a smoke run of seconds):

    python benchmarks/suite.py

Options: ``--quick``, ``--only REGEX`` (workload names), ``--threads N``
(default 1), ``--no-compile`` / ``--compile`` (``torch.compile`` is on by
default, off under ``--quick``), ``--compile-timeout S``, ``--rounds N``,
``--round-ms MS``, ``--json PATH``, ``--png PATH`` / ``--no-png``.

Method. For each workload, each peer is called once and its result checked
against torchxform's (a mismatch is reported and never timed; a peer that
fails or is absent is reported n/a with the reason). ``torch.compile``'s
first call, which compiles, is reported separately as its compile time.
Each peer is then warmed up and calibrated: ``k`` calls per round, so that a
round takes about ``--round-ms``. Then ``--rounds`` rounds run the peers
interleaved round-robin (the starting peer rotates each round); each round
gives one time per call. Reported: the median over rounds, and the spread
as the interquartile range over rounds in % of the median. Python's garbage
collector stays on (it is part of what a Python implementation costs).

Ratios are all ``peer time / torch.func time`` (lower is faster; torch.func
is 1.00). The group summary gives the geometric mean of torchxform/torch.func
over the compute-bound and the overhead-bound workloads.

The process fixes its thread count (``torch.set_num_threads``) and, because
this machine's page faults on fresh large buffers are slow, re-executes itself
with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set where they
are missing (so glibc keeps freed memory for reuse instead of unmapping it).
"""

from __future__ import annotations

import os
import sys

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}

if __name__ == "__main__":  # before torch is imported: glibc reads these at start-up
    _missing = {k: v for k, v in MALLOC_ENV.items() if k not in os.environ}
    if _missing and "--no-reexec" not in sys.argv:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:], "--no-reexec"], {**os.environ, **_missing})

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402

import torchxform  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import COMPUTE, OVERHEAD, WORKLOADS, Workload  # noqa: E402

HERE = Path(__file__).resolve().parent
PEERS = ["torchxform", "torch.func", "torch.compile", "loop", "opacus"]
BASELINE = "torch.func"
TOLERANCE = 1e-4  # max |peer - torchxform| / max |torchxform|, over every tensor of the result
TARGETS = {  # torchxform / torch.func: (geomean at most, none above)
    COMPUTE: (1.05, 1.15),
    OVERHEAD: (1.5, 2.0),
}


# --------------------------------------------------------------------------------------------
# Machine and environment


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "torchxform": torchxform.__version__,
        "git_commit": commit,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "loadavg_start": os.getloadavg(),  # other work on the machine shows up as spread
    }


def machine_slug(info: dict) -> str:
    cpu = re.sub(r"\(r\)|\(tm\)|cpu|processor|\d+-core", "", info["cpu"].lower())
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu).strip("-")
    return f"{cpu or 'cpu'}-{info['cores']}c"


def compile_unavailable_reason() -> str | None:
    """Why torch.compile (inductor) cannot run here, or None."""
    import shutil
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "no C++ compiler on PATH (inductor needs one on CPU)"
    return None


# --------------------------------------------------------------------------------------------
# Checking and timing


class CompileTimeout(Exception):
    pass


def call_with_timeout(fn, seconds: float | None):
    if not seconds:
        return fn()

    def expire(signum, frame):
        raise CompileTimeout(f"did not compile within {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def relative_error(result, reference) -> float:
    """max |result - reference| / max |reference| over matching tensors; inf if the structures differ."""
    got, want = pytree.tree_leaves(result), pytree.tree_leaves(reference)
    if len(got) != len(want):
        return math.inf
    worst = 0.0
    for a, b in zip(got, want):
        if not isinstance(a, torch.Tensor) or a.shape != b.shape:
            return math.inf
        scale = b.abs().max().item() if b.numel() else 0.0
        err = (a.detach().double() - b.detach().double()).abs().max().item() if b.numel() else 0.0
        worst = max(worst, err / max(scale, 1e-30))
    return worst


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def calibrate(fn, round_s: float) -> int:
    """Calls per round, so that a round takes about ``round_s``."""
    fn()  # second warm-up call (the first was the check)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        if best > round_s:
            break
    return max(1, min(100_000, round(round_s / best)))


def stats(samples: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3
    return {"median_s": median, "q1_s": q1, "q3_s": q3, "min_s": min(samples), "max_s": max(samples),
            "spread_pct": 100 * (q3 - q1) / median if median else 0.0, "samples_s": samples}


def run_workload(wl: Workload, args) -> dict:
    print(f"\n[{wl.name}] {wl.description}", flush=True)
    record = {"name": wl.name, "group": wl.group, "description": wl.description, "peers": {}}
    peers = wl.setup()
    reasons = {}
    if not args.compile:
        reasons["torch.compile"] = "skipped (--no-compile)" if not args.quick else "skipped (--quick)"
    elif args.compile_blocked:
        reasons["torch.compile"] = args.compile_blocked
    for name in PEERS:
        if name not in peers:
            record["peers"][name] = {"status": "n/a", "reason": "not applicable to this workload"}
        elif name in reasons:
            record["peers"][name] = {"status": "n/a", "reason": reasons[name]}
            del peers[name]

    # Check every peer against torchxform, once, before timing.
    live = {}
    reference = None
    for name in PEERS:
        if name not in peers:
            continue
        fn = peers[name]
        entry = record["peers"][name] = {}
        graph_breaks_before = sum(torch._dynamo.utils.counters["graph_break"].values())
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                timeout = args.compile_timeout if name == "torch.compile" else None
                result = call_with_timeout(fn, timeout)
        except Exception as exc:  # noqa: BLE001  (any failure makes the peer n/a, with its reason)
            entry.update(status="n/a", reason=one_line(exc))
            if args.verbose:
                traceback.print_exc()
            print(f"    {name:14s} n/a: {entry['reason']}", flush=True)
            if name == "torchxform":
                for other in PEERS[1:]:
                    record["peers"].setdefault(other, {"status": "n/a", "reason": "torchxform failed"})
                return record
            if isinstance(exc, CompileTimeout):
                torch._dynamo.reset()
            continue
        first_call_s = time.perf_counter() - start
        if name in ("torchxform", "torch.func"):  # e.g. a SlowFallbackWarning: a rule is missing
            entry["warnings"] = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}"
                                        for w in caught})
            for w in entry["warnings"]:
                print(f"    {name:14s} warns {w}", flush=True)
        if name == "torch.compile":
            entry["compile_s"] = first_call_s
            entry["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values()) - graph_breaks_before
        if name == "torchxform":
            reference = result
            entry["error"] = 0.0
        else:
            entry["error"] = relative_error(result, reference)
            if not entry["error"] <= TOLERANCE:
                entry.update(status="mismatch", reason=f"relative error {entry['error']:.2e} > {TOLERANCE:g} "
                                                       f"against torchxform")
                print(f"    {name:14s} MISMATCH: {entry['reason']}", flush=True)
                continue
        entry["status"] = "ok"
        live[name] = fn
    del reference, result

    # Warm up and calibrate; then interleaved rounds.
    calls = {name: calibrate(fn, args.round_ms / 1e3) for name, fn in live.items()}
    samples = {name: [] for name in live}
    order = list(live)
    gc.collect()
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            fn, k = live[name], calls[name]
            start = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - start) / k)
    for name in live:
        record["peers"][name].update(calls_per_round=calls[name], rounds=args.rounds, **stats(samples[name]))
    base = record["peers"].get(BASELINE, {}).get("median_s")
    best = record["peers"].get(BASELINE, {}).get("min_s")
    for name in live:
        entry = record["peers"][name]
        entry["ratio_to_torch_func"] = entry["median_s"] / base if base else None
        entry["best_round_ratio_to_torch_func"] = entry["min_s"] / best if best else None  # robust to load
        extra = f"  (compile {entry['compile_s']:.1f} s)" if "compile_s" in entry else ""
        ratio = f"{entry['ratio_to_torch_func']:.2f}x torch.func" if base else ""
        print(f"    {name:14s} {fmt_time(entry['median_s']):>9s} ±{entry['spread_pct']:4.1f}%  "
              f"k={calls[name]:<5d} {ratio}{extra}", flush=True)
    return record


# --------------------------------------------------------------------------------------------
# Reporting


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def cell(entry: dict, kind: str) -> str:
    status = entry.get("status")
    if status == "mismatch":
        return "MISMATCH"
    if status != "ok":
        return "n/a"
    if kind == "time":
        return f"{fmt_time(entry['median_s'])} ±{entry['spread_pct']:.0f}%"
    r = entry.get("ratio_to_torch_func")
    return f"{r:.2f}" if r is not None else "-"


def print_table(records: list[dict], title: str, kind: str) -> None:
    width = max(len(r["name"]) for r in records)
    cols = 19 if kind == "time" else 14
    print(f"\n{title}")
    print(f"{'workload':{width}s}  {'group':8s} " + "".join(f"{p:>{cols}s}" for p in PEERS))
    for r in records:
        row = "".join(f"{cell(r['peers'].get(p, {}), kind):>{cols}s}" for p in PEERS)
        print(f"{r['name']:{width}s}  {r['group'].split('-')[0]:8s} " + row)


def summarize(records: list[dict]) -> dict:
    summary = {}
    for group, (target_mean, target_max) in TARGETS.items():
        both = [r for r in records if r["group"] == group and r["peers"].get("torchxform", {}).get("status") == "ok"
                and r["peers"].get(BASELINE, {}).get("status") == "ok"]
        if not both:
            continue
        ratios = {r["name"]: r["peers"]["torchxform"]["ratio_to_torch_func"] for r in both}
        mean, worst = geomean(list(ratios.values())), max(ratios.values())
        best_rounds = geomean([r["peers"]["torchxform"]["best_round_ratio_to_torch_func"] for r in both])
        summary[group] = {"geomean_torchxform_over_torch_func": mean, "max": worst,
                          "geomean_on_best_rounds": best_rounds,
                          "max_workload": max(ratios, key=ratios.get), "n": len(ratios),
                          "target_geomean": target_mean, "target_max": target_max,
                          "meets_target": mean <= target_mean and worst <= target_max}
    return summary


def per_sample_margin(records: list[dict]) -> list[str]:
    """At batch 256: how far torchxform and torch.func are ahead of the loop and Opacus."""
    lines = []
    for r in records:
        if r["name"] != "per-sample MLP b256":
            continue
        p = r["peers"]
        for other in ("loop", "opacus"):
            if all(p.get(n, {}).get("status") == "ok" for n in ("torchxform", BASELINE, other)):
                ours = p[other]["median_s"] / p["torchxform"]["median_s"]
                theirs = p[other]["median_s"] / p[BASELINE]["median_s"]
                verdict = "meets" if ours >= theirs else "misses"
                lines.append(f"  {r['name']}: {other} is {ours:.2f}x torchxform's time, {theirs:.2f}x torch.func's "
                             f"({verdict} the target: torchxform ahead by at least torch.func's margin)")
    return lines


def report(records: list[dict], summary: dict) -> None:
    print_table(records, "Median time per call, ± interquartile range over rounds (% of median)", "time")
    print_table(records, "Ratio = peer time / torch.func time (lower is faster; torch.func = 1.00)", "ratio")
    compiled = [(r["name"], r["peers"]["torch.compile"]) for r in records
                if "compile_s" in r["peers"].get("torch.compile", {})]
    if compiled:
        print("\ntorch.compile: compile time (first call), graph breaks")
        for name, e in compiled:
            print(f"  {name:24s} {e['compile_s']:7.1f} s   {e.get('graph_breaks', 0)} graph breaks")
    notes = sorted({(p, e["reason"]) for r in records for p, e in r["peers"].items()
                    if e.get("status") in ("n/a", "mismatch") and e.get("reason") != "not applicable to this workload"})
    if notes:
        print("\nn/a and mismatches:")
        for peer, reason in notes:
            where = [r["name"] for r in records if r["peers"].get(peer, {}).get("reason") == reason]
            print(f"  {peer}: {reason}  [{', '.join(where)}]")
    print("\ntorchxform / torch.func, geometric mean per group:")
    for group, s in summary.items():
        verdict = "meets" if s["meets_target"] else "MISSES"
        print(f"  {group:15s} geomean {s['geomean_torchxform_over_torch_func']:.2f} over {s['n']} workloads, "
              f"max {s['max']:.2f} ({s['max_workload']}); on best rounds {s['geomean_on_best_rounds']:.2f}\n"
              f"  {'':15s} target: geomean <= {s['target_geomean']}, "
              f"none > {s['target_max']}  -> {verdict}")
    for line in per_sample_margin(records):
        print(line)


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 short rounds, no torch.compile")
    ap.add_argument("--only", metavar="REGEX", help="run only the workloads whose name matches (re.search)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="include torch.compile over torch.func (default: on, off under --quick)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-timeout", type=float, default=180, metavar="S",
                    help="give up on a torch.compile that takes longer (default 180 s)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, --quick 2)")
    ap.add_argument("--round-ms", type=float, default=None, help="target time of one round (default 100, --quick 10)")
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/<date>-<machine>.json")
    ap.add_argument("--png", type=Path, default=HERE / "results" / "suite.png", help="bar chart (default %(default)s)")
    ap.add_argument("--no-png", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing peers")
    ap.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile is None:
        args.compile = not args.quick
    args.rounds = args.rounds or (2 if args.quick else 7)
    args.round_ms = args.round_ms or (10 if args.quick else 100)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.compile_blocked = compile_unavailable_reason() if args.compile else None
    info = machine_info(args.threads)
    if any(info["malloc_env"][k] is None for k in MALLOC_ENV):
        print("warning: MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ unset: large fresh buffers may page-fault "
              "slowly and skew the compute-bound timings", file=sys.stderr)
    print(f"{info['cpu']}, {info['cores']} cores, {info['threads']} thread(s), torch {info['torch']}, "
          f"torchxform {info['torchxform']} ({info['git_commit']}), Python {info['python']}, "
          f"load average {info['loadavg_start'][0]:.2f}")
    print(f"{args.rounds} interleaved rounds of ~{args.round_ms:g} ms per peer; "
          f"torch.compile {'on' if args.compile else 'off'}")

    selected = [w for w in WORKLOADS if not args.only or re.search(args.only, w.name)]
    if not selected:
        raise SystemExit(f"no workload matches {args.only!r}: " + ", ".join(w.name for w in WORKLOADS))
    start = time.perf_counter()
    records = [run_workload(w, args) for w in selected]
    summary = summarize(records)
    report(records, summary)

    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": info,
        "settings": {"rounds": args.rounds, "round_ms": args.round_ms, "compile": args.compile,
                     "compile_timeout_s": args.compile_timeout, "quick": args.quick, "only": args.only,
                     "tolerance": TOLERANCE, "ratio": "peer median time / torch.func median time"},
        "workloads": records,
        "summary": summary,
        "wall_s": time.perf_counter() - start,
    }
    info["loadavg_end"] = os.getloadavg()
    path = args.json or HERE / "results" / f"{datetime.date.today().isoformat()}-{machine_slug(info)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {path}  (suite wall time {results['wall_s']:.0f} s, load average {info['loadavg_end'][0]:.2f})")
    if not args.no_png:
        try:
            from plot import draw
            draw(results, args.png)
            print(f"wrote {args.png}")
        except ImportError as exc:
            print(f"no chart: {one_line(exc)} (pip install matplotlib, or the 'bench' extra)")
    return results


if __name__ == "__main__":
    main()
