"""Independent references for vmap tests: a Python loop over the batch.

Nothing here uses torchxform except the function under test; expected values
always come from running the plain function on one example at a time.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import warnings
from typing import Callable, Sequence

import pytest
import torch
from torch.utils._pytree import _broadcast_to_and_flatten, tree_flatten, tree_unflatten

import torchxform

# True when the suite runs on an accelerator (tests/conftest.py makes
# TORCHXFORM_TEST_DEVICE the default device).  Only for skipping tests whose
# eager reference PyTorch itself cannot run there; say why in the reason.
ON_ACCELERATOR = os.environ.get("TORCHXFORM_TEST_DEVICE", "cpu") != "cpu"


def cpu_reference(reason):
    """Mark a test that cannot run on an accelerator because PyTorch itself
    cannot run its eager op or reference there (``reason`` says which)."""
    return pytest.mark.skipif(ON_ACCELERATOR, reason=reason)


def cpu_reference_row(param, reason):
    """A ``pytest.param`` table row with :func:`cpu_reference` added."""
    return pytest.param(*param.values, marks=[*param.marks, cpu_reference(reason)], id=param.id)


def skip_cpu_reference_rows(name, reasons):
    """In a test over a table of tuples: skip row ``name`` on an accelerator
    if ``reasons`` (row name -> reason, as for :func:`cpu_reference`) has it."""
    if ON_ACCELERATOR and name in reasons:
        pytest.skip(reasons[name])


def fixed_randn(*shape, seed, dtype=torch.float64):
    """Standard-normal values that are the same at every call, made on the
    default device: a constant that a function under test closes over.  It is
    made when the test runs (so on the test's device) and is equal each time
    the function runs; drawn by Python's ``random``, it is no random op under
    vmap."""
    rng = random.Random(seed)
    return torch.tensor([rng.gauss(0.0, 1.0) for _ in range(math.prod(shape))], dtype=dtype).reshape(shape)


def fixed_rand(*shape, seed, dtype=torch.float64):
    """Like :func:`fixed_randn`, uniform on [0, 1)."""
    rng = random.Random(seed)
    return torch.tensor([rng.random() for _ in range(math.prod(shape))], dtype=dtype).reshape(shape)


# Tolerances by dtype, stated once.  Rules compute the same math on the
# whole batch, so differences come only from reassociation in kernels.
TOLERANCES = {
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float32: dict(rtol=1.3e-6 * 10, atol=1e-5),
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.complex64: dict(rtol=1.3e-5, atol=1e-5),
    torch.complex128: dict(rtol=1e-7, atol=1e-7),
}


def assert_close(actual, expected, *, rtol=None, atol=None, msg=""):
    """Compare pytrees of tensors (and plain values) exactly in structure,
    dtype and shape, and numerically within the dtype's tolerance."""
    flat_a, spec_a = tree_flatten(actual)
    flat_e, spec_e = tree_flatten(expected)
    assert spec_a == spec_e, f"{msg}: structure {spec_a} != expected {spec_e}"
    for a, e in zip(flat_a, flat_e):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"{msg}: got {type(a)}, expected a Tensor"
            assert type(a) is torch.Tensor or type(e) is not torch.Tensor, f"{msg}: leaked wrapper {type(a)}"
            tol = {} if rtol is None else dict(rtol=rtol, atol=atol)
            if not tol and e.dtype in TOLERANCES:
                tol = TOLERANCES[e.dtype]
            torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m: f"{msg}: {m}", **tol)
        else:
            assert a == e, f"{msg}: {a!r} != {e!r}"


def loop_reference(fn, batched_args, in_dims, out_dims=0, kwargs=None):
    """What vmap(fn, in_dims, out_dims)(*batched_args) must equal: fn run per
    example, results stacked along out_dims."""
    kwargs = kwargs or {}
    flat_args, spec = tree_flatten(tuple(batched_args))
    if isinstance(in_dims, int):
        flat_dims = [in_dims] * len(flat_args)
    else:
        flat_dims = _broadcast_to_and_flatten(in_dims, spec)
    sizes = {a.shape[d] for a, d in zip(flat_args, flat_dims) if d is not None}
    assert len(sizes) == 1, sizes
    (size,) = sizes
    results = []
    for i in range(size):
        example = [a.select(d, i) if d is not None else a for a, d in zip(flat_args, flat_dims)]
        results.append(fn(*tree_unflatten(example, spec), **kwargs))
    flat_results = [tree_flatten(r) for r in results]
    out_spec = flat_results[0][1]
    if isinstance(out_dims, int) or out_dims is None:
        flat_out_dims = [out_dims] * out_spec.num_leaves
    else:
        flat_out_dims = _broadcast_to_and_flatten(out_dims, out_spec)
    stacked = []
    for j, d in enumerate(flat_out_dims):
        column = [flat[j] for flat, _ in flat_results]
        stacked.append(column[0] if d is None else torch.stack(column, dim=d))
    return tree_unflatten(stacked, out_spec)


def check_vmap(fn, *batched_args, in_dims=0, out_dims=0, kwargs=None, rtol=None, atol=None, msg=""):
    """Assert vmap(fn) equals the Python loop over the batch."""
    expected = loop_reference(fn, batched_args, in_dims, out_dims, kwargs)
    actual = torchxform.vmap(fn, in_dims, out_dims)(*batched_args, **(kwargs or {}))
    assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg or getattr(fn, "__name__", "fn"))
    return actual


def _stack_at(tensors, dim):
    return torch.stack(tensors, dim=dim if dim >= 0 else dim + tensors[0].dim() + 1)


def check_vmap_sampled(
    fn: Callable,
    sample: Callable[[], Sequence],
    *,
    batch_size: int = 3,
    dims: Sequence = (0, -1, None),
    nested: bool = True,
    rtol=None,
    atol=None,
    msg: str = "",
):
    """The standard table check of one op.

    ``sample()`` returns a fresh tuple of arguments for one example (tensors
    drawn from the op's domain; non-tensor arguments must be the same every
    call).  For every combination of batch dim in ``dims`` over the tensor
    arguments (not all None) the batched arguments are stacked examples, and
    vmap(fn) must equal the loop over examples; with ``nested``, vmap(vmap(fn))
    is checked the same way over a 2 x batch_size grid of examples.
    """
    name = msg or getattr(fn, "__name__", "fn")
    samples = [tuple(sample()) for _ in range(batch_size)]
    tensor_positions = [i for i, a in enumerate(samples[0]) if isinstance(a, torch.Tensor)]
    combos = [c for c in itertools.product(dims, repeat=len(tensor_positions)) if any(d is not None for d in c)]
    for combo in combos:
        dim_of = dict(zip(tensor_positions, combo))
        args = []
        in_dims = []
        for i, a in enumerate(samples[0]):
            d = dim_of.get(i)
            if d is None:
                args.append(a)
            else:
                args.append(_stack_at([s[i] for s in samples], d))
            in_dims.append(d)
        check_vmap(fn, *args, in_dims=tuple(in_dims), rtol=rtol, atol=atol, msg=f"{name} in_dims={tuple(in_dims)}")

    if not nested:
        return
    grid = [[tuple(sample()) for _ in range(batch_size)] for _ in range(2)]
    for combo in combos[:: max(1, len(combos) // 4)]:  # a spread of combinations
        dim_of = dict(zip(tensor_positions, combo))
        args, inner_dims, outer_dims = [], [], []
        for i, a in enumerate(grid[0][0]):
            d = dim_of.get(i)
            if d is None:
                args.append(a)
            else:
                rows = [_stack_at([grid[r][c][i] for c in range(batch_size)], d) for r in range(2)]
                args.append(_stack_at(rows, d))
            inner_dims.append(d)
            outer_dims.append(d)
        expected = loop_reference(
            lambda *xs: loop_reference(fn, xs, tuple(inner_dims)), args, tuple(outer_dims)
        )
        actual = torchxform.vmap(torchxform.vmap(fn, tuple(inner_dims)), tuple(outer_dims))(*args)
        assert_close(actual, expected, rtol=rtol, atol=atol, msg=f"{name} nested in_dims={tuple(outer_dims)}")


def check_autograd_through_vmap(fn, args, in_dims, *, double=False, msg=""):
    """Outputs of vmap(fn) stay differentiable by torch.autograd: gradients
    of a loss on them equal those through the Python loop."""

    def grads(compute):
        leaves = [
            (a.double() if double else a.clone()).requires_grad_() if a.is_floating_point() else a for a in args
        ]
        out = compute(*leaves)
        wanted = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
        return out, torch.autograd.grad(out.square().sum(), wanted, allow_unused=True)

    with no_fallback():
        actual = grads(torchxform.vmap(fn, in_dims))
    expected = grads(lambda *xs: loop_reference(fn, xs, in_dims))
    assert_close(actual, expected, msg=msg)


@contextlib.contextmanager
def no_fallback():
    """Inside, any slow-loop fallback raises instead of warning."""
    from torchxform._core.errors import reset_fallback_warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", torchxform.SlowFallbackWarning)
        reset_fallback_warnings()
        yield


__all__ = [
    "assert_close",
    "loop_reference",
    "check_vmap",
    "check_vmap_sampled",
    "check_autograd_through_vmap",
    "no_fallback",
    "TOLERANCES",
]
