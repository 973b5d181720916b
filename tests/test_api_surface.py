"""torchxform's public surface covers torch.func's, and each name of
torch.func's is exercised somewhere in the suite."""

import pathlib
import re

import torch.func

import torchxform


def test_every_torch_func_name_is_exported():
    assert set(torch.func.__all__) <= set(torchxform.__all__)
    for name in torchxform.__all__:
        assert getattr(torchxform, name) is not None


def test_every_torch_func_name_is_tested():
    tests = pathlib.Path(__file__).parent
    text = "\n".join(p.read_text() for p in tests.rglob("test_*.py") if p.name != "test_api_surface.py")
    untested = [name for name in torch.func.__all__ if not re.search(rf"\b{name}\(", text)]
    assert not untested, f"no test calls {untested}"
