"""Run one check of one op on its bounded samples and classify the outcome.

Per sample: 'passed', 'failed' (wrong numbers: ``Mismatch``), 'errored'
(the backend raised) or 'skipped' (``NotCheckable``).  Per op: failed if any
sample failed, else errored if any errored, else passed if any passed, else
skipped.  ``fallback`` says whether the backend's slow vmap loop fallback ran.
"""

from __future__ import annotations

import contextlib
import os
import signal
import traceback
import warnings
import zlib
from dataclasses import dataclass

import torch

from tests.opinfo import expectations
from tests.opinfo.checks import CHECKS, Mismatch, NotCheckable
from tests.opinfo.samples import OPS, derivative_dtype, n_samples, sample_groups, vmap_dtype

TIMEOUT_ENV_VAR = "TORCHXFORM_OPINFO_TIMEOUT"
DEFAULT_TIMEOUT_S = 120  # per sample and check; a guard against hangs

VMAP_CHECKS = ("vmap",)

# check -> (OpInfo flag PyTorch needs, reason to skip without it)
REQUIRED_FLAG = {
    "vjp": ("supports_autograd", "no autograd support in PyTorch (supports_autograd=False)"),
    "vmapvjp": ("supports_autograd", "no autograd support in PyTorch (supports_autograd=False)"),
    "jvp": ("supports_forward_ad", "no forward AD in PyTorch (supports_forward_ad=False)"),
    "vmapjvp": ("supports_forward_ad", "no forward AD in PyTorch (supports_forward_ad=False)"),
    "vjpvjp": ("supports_gradgrad", "no double backward in PyTorch (supports_gradgrad=False)"),
    "jvpvjp": ("supports_fwgrad_bwgrad", "no forward-over-reverse in PyTorch (supports_fwgrad_bwgrad=False)"),
}


@dataclass
class SampleContext:
    op: object
    opid: str
    dtype: torch.dtype
    n: int
    index: int
    group: tuple


@dataclass
class Result:
    status: str  # passed | failed | errored | skipped
    message: str = ""  # one line: why it failed / errored / was skipped
    detail: str = ""  # traceback tail of the first failure
    fallback: bool = False

    @property
    def ok(self) -> bool:
        return self.status in ("passed", "skipped")


def applicable(opid: str, check: str):
    """(dtype, None) when the check applies to the op, else (None, reason)."""
    op = OPS[opid]
    reason = expectations.skip_reason(opid, check)
    if reason:
        return None, reason
    if check in VMAP_CHECKS:
        dtype = vmap_dtype(op)
        return (dtype, None) if dtype else (None, "no CPU dtype usable here")
    flag, reason = REQUIRED_FLAG[check]
    if not getattr(op, flag) or not op.supports_autograd:
        return None, reason
    dtype = derivative_dtype(op)
    return (dtype, None) if dtype else (None, "no float64/complex128 backward on CPU")


@contextlib.contextmanager
def time_limit(seconds: int):
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def _tail(err: BaseException, lines: int = 12) -> str:
    return "\n".join("".join(traceback.format_exception(err)).rstrip().splitlines()[-lines:])


def run_check(opid: str, check: str, backend, n: int | None = None) -> Result:
    n = n_samples() if n is None else n
    dtype, reason = applicable(opid, check)
    if reason:
        return Result("skipped", reason)
    try:
        groups = sample_groups(opid, dtype, n)
    except Exception as err:
        return Result("skipped", f"OpInfo sample generation raised {_first_line(err)}")
    if not groups:
        return Result("skipped", "no samples")

    op, tol, timeout = OPS[opid], expectations.tolerance(opid), int(os.environ.get(TIMEOUT_ENV_VAR, DEFAULT_TIMEOUT_S))
    outcomes = []  # (status, message, detail)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.reset()
        for index, group in enumerate(groups):
            torch.manual_seed(zlib.crc32(f"{opid}/{check}/{index}".encode()))
            ctx = SampleContext(op, opid, dtype, n, index, group)
            try:
                with time_limit(timeout):
                    CHECKS[check](ctx, backend, tol)
                outcomes.append(("passed", "", ""))
            except NotCheckable as err:
                outcomes.append(("skipped", str(err), ""))
            except Mismatch as err:
                outcomes.append(("failed", f"sample {index}: wrong numbers: {str(err).splitlines()[0]}", _tail(err)))
            except Exception as err:
                outcomes.append(("errored", f"sample {index}: {_first_line(err)}", _tail(err)))
    fallback = any(backend.is_fallback_warning(w) for w in caught)
    for status in ("failed", "errored", "passed", "skipped"):
        found = [o for o in outcomes if o[0] == status]
        if found:
            return Result(status, found[0][1], found[0][2], fallback)
    raise AssertionError("unreachable")
