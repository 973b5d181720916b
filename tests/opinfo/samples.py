"""OpInfo entries and their samples, as the checks consume them.

Every op of ``op_db`` has an id ``name`` or ``name.variant``.  Each check
takes a *group* of samples: the same sample drawn ``DRAWS`` times from the
op's sample generator under different seeds, so that the examples stacked
into a vmap batch differ in value (and indices stay in range, matrices stay
positive definite, ...) while sharing shapes and non-tensor arguments.
Where a draw does not match the first in structure, the first is reused.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from torch.testing._internal.common_methods_invocations import op_db

SAMPLES_ENV_VAR = "TORCHXFORM_OPINFO_SAMPLES"
DEFAULT_SAMPLES = 2
DRAWS = 4  # vmap uses a batch of 3 draws; vmap-of-vmap a 2 x 2 grid


def n_samples() -> int:
    return int(os.environ.get(SAMPLES_ENV_VAR, DEFAULT_SAMPLES))


def op_id(op) -> str:
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


OPS = {op_id(op): op for op in op_db}


def _signature(sample):
    """What must agree between draws: tensor shapes, dtypes, requires_grad
    flags and layouts, and every non-tensor argument."""
    leaves = tree_leaves((sample.input, sample.args, sample.kwargs))
    return [
        (tuple(x.shape), x.dtype, x.requires_grad, x.layout) if isinstance(x, torch.Tensor) else ("value", repr(x))
        for x in leaves
    ]


def vmap_dtype(op):
    """float64 where the op supports it; else the most useful dtype it does."""
    supported = op.supported_dtypes("cpu")
    for dtype in (torch.float64, torch.complex128, torch.int64, torch.bool, torch.float32):
        if dtype in supported:
            return dtype
    return None


def derivative_dtype(op):
    """float64, or complex128 for ops defined on complex numbers only."""
    supported = op.supported_backward_dtypes("cpu")
    for dtype in (torch.float64, torch.complex128):
        if dtype in supported:
            return dtype
    return None


@functools.lru_cache(maxsize=4)
def sample_groups(opid: str, dtype: torch.dtype, n: int) -> tuple:
    """The first ``n`` samples of the op in ``dtype``, each as ``DRAWS`` draws."""
    op = OPS[opid]
    requires_grad = op.supports_autograd and (dtype.is_floating_point or dtype.is_complex)
    draws = []
    for seed in range(DRAWS):
        torch.manual_seed(1000 + seed)
        random.seed(1000 + seed)
        generator = op.sample_inputs("cpu", dtype, requires_grad=requires_grad)
        draws.append(list(itertools.islice(generator, n)))
    groups = []
    for j, first in enumerate(draws[0]):
        group = [first]
        for draw in draws[1:]:
            same = j < len(draw) and _signature(draw[j]) == _signature(first)
            group.append(draw[j] if same else first)
        groups.append(tuple(group))
    return tuple(groups)


def has_sparse(sample) -> bool:
    leaves = tree_leaves((sample.input, sample.args, sample.kwargs))
    return any(isinstance(x, torch.Tensor) and x.layout != torch.strided for x in leaves)


def _fresh(x):
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


# --------------------------------------------------------------------------
# Normalized functions: the op as a function of tensors only
# --------------------------------------------------------------------------


@dataclass
class VmapProblem:
    """``fn(*tensors)`` is the op on the sample with its tensor arguments
    (those of input and args, TensorLists included) replaced; kwargs stay
    fixed.  ``tensors`` holds those arguments for each draw."""

    fn: Callable
    tensors: list  # per draw: list of tensors


def vmap_problem(op, group) -> VmapProblem:
    flat, spec = tree_flatten((group[0].input, group[0].args))
    positions = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
    kwargs = group[0].kwargs

    def fn(*tensors):  # fresh copies of the constants each call: ops may mutate them
        full = [_fresh(x) for x in flat]
        for i, t in zip(positions, tensors):
            full[i] = t
        inp, args = tree_unflatten(full, spec)
        return op.op(inp, *args, **{k: _fresh(v) for k, v in kwargs.items()})

    per_draw = []
    for sample in group:
        leaves = tree_leaves((sample.input, sample.args))
        per_draw.append([leaves[i].detach().clone() for i in positions])
    return VmapProblem(fn, per_draw)


@dataclass
class DiffProblem:
    """``fn(*primals)`` is the op (through its gradcheck wrapper and the
    sample's output_process_fn_grad) as a function of the sample's
    differentiable tensors, returning a tuple of its floating/complex
    outputs.  ``primals`` holds those tensors for each draw."""

    fn: Callable
    primals: list  # per draw: list of tensors


def _is_diff(x) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def diff_problem(op, group, *, seed: int | None = None, noncontiguous: bool = False) -> DiffProblem:
    """With ``seed``, every call of ``fn`` first seeds the global RNG, so
    random ops draw the same numbers in the reference and under test."""
    first = group[0]
    flat, spec = tree_flatten((first.input, first.args))
    positions = [i for i, x in enumerate(flat) if _is_diff(x) and x.requires_grad]
    kwargs = first.kwargs
    process = first.output_process_fn_grad
    wrapped = op.get_op()

    def fn(*primals):  # fresh copies of the constants each call: ops may mutate them
        full = [_fresh(x) for x in flat]
        for i, p in zip(positions, primals):
            full[i] = p
        inp, args = tree_unflatten(full, spec)
        if seed is not None:
            torch.manual_seed(seed)
        out = process(op.gradcheck_wrapper(wrapped, inp, *args, **{k: _fresh(v) for k, v in kwargs.items()}))
        return tuple(o for o in tree_leaves(out) if _is_diff(o))

    per_draw = []
    for sample in group:
        if noncontiguous:
            sample = sample.noncontiguous()
        leaves = tree_leaves((sample.input, sample.args))
        per_draw.append([leaves[i].detach().clone() for i in positions])
    return DiffProblem(fn, per_draw)


def outputs_equal(a, b) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or x.layout != y.layout:
                return False
            if x.layout != torch.strided:
                x, y = x.to_dense(), y.to_dense()
            if x.dtype == torch.complex32:  # few kernels take complex32
                x, y = x.to(torch.complex64), y.to(torch.complex64)
            if not torch.equal(torch.nan_to_num(x.detach()), torch.nan_to_num(y.detach())):
                return False
        elif x != y and not (x != x and y != y):  # NaN scalars are equal here
            return False
    return True


class _RandomOpDetector(TorchDispatchMode):
    """Notes whether any ATen op tagged nondeterministic_seeded ran (OpInfo
    often wraps random ops in a reseeding wrapper, so equal outputs of two
    runs do not prove an op deterministic)."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.seen = True
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=16)
def randomness(opid: str, dtype: torch.dtype, n: int, index: int) -> str:
    """For sample ``index`` of the op: 'deterministic'; 'random' (it calls a
    random op, or two runs differ, while equally seeded runs agree);
    'nondeterministic' (equally seeded runs differ); or 'reference raised
    ...' when PyTorch cannot run the sample at all."""
    op = OPS[opid]
    problem = vmap_problem(op, sample_groups(opid, dtype, n)[index])
    tensors = problem.tensors[0]
    try:
        with torch.no_grad():
            detector = _RandomOpDetector()
            with detector:
                a = problem.fn(*tensors)
            torch.manual_seed(1)
            b = problem.fn(*tensors)
            torch.manual_seed(1)
            c = problem.fn(*tensors)
    except Exception as err:
        lines = str(err).strip().splitlines()
        return f"reference raised {type(err).__name__}: {lines[0][:120] if lines else ''}"
    if not outputs_equal(b, c):
        return "nondeterministic"
    return "random" if detector.seen or not outputs_equal(a, b) else "deterministic"
