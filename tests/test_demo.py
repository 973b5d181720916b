"""The README's demo runs, and every result in it matches its Python loop
(the demo itself exits with an error otherwise)."""

import warnings

import torchxform
from torchxform import demo


def test_demo_runs_without_fallbacks(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchxform.SlowFallbackWarning)
        demo.main()
    out = capsys.readouterr().out
    assert out.count("max |vmap - loop|") == 3
    assert "All results match the Python loop." in out
