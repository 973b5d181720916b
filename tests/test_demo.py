"""The README's demo runs, and every result in it matches its Python loop
(the demo itself exits with an error otherwise)."""

import warnings

import torchxform


def test_demo_runs_without_fallbacks(example, capsys):
    demo = example("demo")
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchxform.SlowFallbackWarning)
        demo.main()
    out = capsys.readouterr().out
    assert out.count("max |torchxform - loop|") == 4
    assert "All results match the Python loop." in out
