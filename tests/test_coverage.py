"""coverage() and explain(): the rule tables as users see them, and the
per-call report of slow fallbacks and missing rules."""

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchxform
from torchxform import coverage, explain, grad, vmap


@torch.library.custom_op("torchxform_tests::opaque_double", mutates_args=())
def opaque_double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@opaque_double.register_fake
def _(x):
    return torch.empty_like(x)


def test_coverage_of_the_registry():
    report = coverage()
    rows = {op: (vmap_kind, grad_kind, jvp_kind) for op, vmap_kind, grad_kind, jvp_kind in report.rows}
    assert rows["aten.sin.default"] == ("rule", "rule", "rule")
    assert rows["aten.unique_dim.default"][0] == "error"  # data-dependent shape: a clear error, on purpose
    assert sum(report.counts()["vmap"].values()) == len(report.rows)
    assert "aten.sin.default" in str(report)


def test_coverage_of_a_function_lists_the_aten_ops_it_runs():
    report = coverage(lambda x, w: F.gelu(F.linear(x, w)).sum(), torch.randn(2, 3), torch.randn(4, 3))
    ops = [row[0] for row in report.rows]
    assert "aten.gelu.default" in ops and "aten.sum.default" in ops
    assert all(row[1:] == ("rule", "rule", "rule") for row in report.rows)
    custom = coverage(opaque_double, torch.randn(3))
    assert custom.rows == [("torchxform_tests.opaque_double.default", "loop", "missing", "missing")]


def test_coverage_command():
    out = subprocess.run([sys.executable, "-m", "torchxform.coverage"], capture_output=True, text=True, check=True)
    assert "aten.sin.default" in out.stdout and "ops with a rule" in out.stdout
    assert "RuntimeWarning" not in out.stderr


def test_explain_reports_fallbacks_with_call_counts(capsys):
    x = torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchxform.SlowFallbackWarning)
        out, report = explain(vmap(lambda t: opaque_double(opaque_double(t))))(x)
    torch.testing.assert_close(out, 4 * x)  # the function's own result comes back
    assert report.fallbacks[("vmap", "torchxform_tests.opaque_double.default")] == 2
    assert "per-example loop (2 calls)" in capsys.readouterr().out


def test_explain_reports_a_missing_rule_and_reraises():
    f = explain(grad(lambda x: opaque_double(x).sum()), verbose=False)
    with pytest.raises(RuntimeError, match="no VJP rule for torchxform_tests.opaque_double") as caught:
        f(torch.randn(3))
    assert caught.value.explanation.missing_rule == ("grad", "torchxform_tests.opaque_double.default")


def test_explain_quiet_when_all_ops_have_rules():
    out, report = explain(vmap(grad(lambda x: x.sin().sum())), verbose=False)(torch.randn(4, 3))
    assert not report.fallbacks and report.missing_rule is None
    assert "no slow fallback" in str(report)
