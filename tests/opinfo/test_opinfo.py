"""Every OpInfo of torch's op_db through every check (see checks.py), on the
first ``TORCHXFORM_OPINFO_SAMPLES`` samples (default 2), with the transforms
of ``TORCHXFORM_OPINFO_BACKEND`` (default torchxform; or torch.func).

Known failures are strict xfails listed in expectations.py; a check that
starts passing fails here until its entry is removed.
"""

import pytest

from tests.opinfo.backend import get_backend
from tests.opinfo.checks import CHECKS
from tests.opinfo.expectations import xfail_reason
from tests.opinfo.runner import run_check
from tests.opinfo.samples import OPS

BACKEND = get_backend()


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("opid", list(OPS))
def test_opinfo(opid, check):
    result = run_check(opid, check, BACKEND)
    if result.status == "skipped":
        pytest.skip(result.message)
    expected_failure = xfail_reason(BACKEND.name, opid, check)
    if expected_failure:
        if result.status == "passed":
            pytest.fail(
                f"XPASS(strict): {BACKEND.name} {check} of {opid} now passes; remove its xfail from "
                f"tests/opinfo/expectations.py (python -m tests.opinfo.report --write-expectations)",
                pytrace=False,
            )
        pytest.xfail(expected_failure)
    if result.status != "passed":
        pytest.fail(f"{BACKEND.name} {check} of {opid}: {result.message}\n{result.detail}", pytrace=False)
