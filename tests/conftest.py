"""Shared fixtures."""

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def example():
    """Imports a script of ``examples/`` by name (they import each other as
    scripts do, so the folder goes on sys.path meanwhile)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(EXAMPLES))


# The same suite on an accelerator: TORCHXFORM_TEST_DEVICE=cuda makes every
# tensor a test creates without a device live there (torch.set_default_device),
# references included.  CI runs on CPU, where this is unset.
_DEVICE = os.environ.get("TORCHXFORM_TEST_DEVICE")


@pytest.fixture(autouse=True)
def _default_device():
    if not _DEVICE:
        yield
        return
    torch.set_default_device(_DEVICE)
    # Full float32 precision, as on the CPU: otherwise cuDNN convolutions and
    # RNNs take TF32, and a batched call and its per-example reference round
    # differently by far more than the tolerances.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_default_device(None)
