"""Side-by-side conformance report: torchxform against torch.func.

    python -m tests.opinfo.report [--samples N] [--ops REGEX] [--checks vmap,vjp]
                                  [--json OUT] [--failures OUT] [--write-expectations]

Runs every check of every op on the same samples with both backends, prints
per check the ops passed / failed / errored / skipped and how many took the
slow vmap loop fallback, then every (op, check) that fails for torchxform
but passes for torch.func.  ``--failures`` writes those with traceback
tails; ``--write-expectations`` regenerates the XFAILS section of
expectations.py from this run (entries of ops not run are kept).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

BACKEND_NAMES = ("torchxform", "torch.func")
STATUSES = ("passed", "failed", "errored", "skipped")


def run_all(opids, checks, n, progress=True):
    from tests.opinfo.backend import get_backend
    from tests.opinfo.runner import run_check

    backends = [get_backend(name) for name in BACKEND_NAMES]
    results = {name: {} for name in BACKEND_NAMES}  # backend -> (op, check) -> Result
    seconds = dict.fromkeys(BACKEND_NAMES, 0.0)
    start = time.time()
    for i, opid in enumerate(opids):
        for check in checks:
            for backend in backends:
                t = time.perf_counter()
                results[backend.name][(opid, check)] = run_check(opid, check, backend, n)
                seconds[backend.name] += time.perf_counter() - t
        if progress and (i % 25 == 0 or i == len(opids) - 1):
            print(f"  [{i + 1}/{len(opids)}] {opid}  ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    return results, seconds


def table(results, checks) -> str:
    header = f"{'check':<9}" + "".join(
        f" | {name:^38}" for name in BACKEND_NAMES
    )
    sub = f"{'':<9}" + " | pass  fail   err  skip tested fallback" * len(BACKEND_NAMES)
    lines = [header, sub, "-" * len(sub)]
    for check in checks:
        row = f"{check:<9}"
        for name in BACKEND_NAMES:
            rs = [r for (_, c), r in results[name].items() if c == check]
            counts = {s: sum(r.status == s for r in rs) for s in STATUSES}
            tested = len(rs) - counts["skipped"]
            fallback = sum(r.fallback and r.status != "skipped" for r in rs)
            row += (
                f" | {counts['passed']:4d}  {counts['failed']:4d}  {counts['errored']:4d}  {counts['skipped']:4d}"
                f"  {tested:5d}  {fallback:7d}"
            )
        lines.append(row)
    return "\n".join(lines)


def regressions(results, checks):
    """(check, op, result) failing or erroring for torchxform, passing for torch.func."""
    out = []
    for check in checks:
        for (opid, c), ours in results["torchxform"].items():
            theirs = results["torch.func"][(opid, c)]
            if c == check and ours.status in ("failed", "errored") and theirs.status == "passed":
                out.append((check, opid, ours))
    return out


def write_expectations(results, opids):
    from tests.opinfo import expectations

    path = Path(expectations.__file__)
    text = path.read_text()
    begin = text.index("# BEGIN GENERATED XFAILS")
    end = text.index("# END GENERATED XFAILS")
    ran = set(opids)
    lines = [text[begin:].splitlines()[0], "XFAILS: dict[str, dict[tuple[str, str], str]] = {"]
    for name in BACKEND_NAMES:
        entries = {k: v for k, v in expectations.XFAILS.get(name, {}).items() if k[0] not in ran}
        for key, result in results[name].items():
            if result.status in ("failed", "errored"):
                message = result.message.split(": ", 1)[1] if result.message.startswith("sample ") else result.message
                entries[key] = f"{name}: {message}"[:200]
        lines.append(f"    {name!r}: {{")
        for (opid, check), reason in sorted(entries.items()):
            lines.append(f"        ({opid!r}, {check!r}): {reason!r},")
        lines.append("    },")
    lines.append("}")
    path.write_text(text[:begin] + "\n".join(lines) + "\n" + text[end:])
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.opinfo.report", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=None, help="samples per op (default: env or 2)")
    parser.add_argument("--ops", default=None, help="regex on op ids (re.search)")
    parser.add_argument("--checks", default=None, help="comma-separated checks (default: all)")
    parser.add_argument("--json", default=None, help="write every result here")
    parser.add_argument("--failures", default=None, help="write the torchxform-only failures in detail here")
    parser.add_argument("--write-expectations", action="store_true", help="regenerate XFAILS in expectations.py")
    args = parser.parse_args(argv)

    # Imported only now: torch's test utilities parse sys.argv on import.
    sys.argv = sys.argv[:1]
    from tests.opinfo.checks import CHECKS
    from tests.opinfo.samples import OPS, n_samples

    n = args.samples if args.samples is not None else n_samples()
    opids = [o for o in OPS if args.ops is None or re.search(args.ops, o)]
    checks = list(CHECKS) if args.checks is None else args.checks.split(",")
    print(f"{len(opids)} ops x {len(checks)} checks, {n} samples per op, both backends", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results, seconds = run_all(opids, checks, n)

    print(table(results, checks))
    print("time: " + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()))
    found = regressions(results, checks)
    print(f"\n{len(found)} (op, check) fail for torchxform but pass for torch.func:")
    for check, opid, result in found:
        print(f"  {check:<8} {opid:<40} [{result.status}] {result.message[:150]}")
    if args.failures:
        with open(args.failures, "w") as f:
            for check, opid, result in found:
                f.write(f"=== {check} {opid} [{result.status}] {result.message}\n{result.detail}\n\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    name: {f"{o}/{c}": r.__dict__ for (o, c), r in res.items()}
                    for name, res in results.items()
                },
                f,
                indent=1,
            )
    if args.write_expectations:
        write_expectations(results, opids)


if __name__ == "__main__":
    main()
