"""Batching rules of creation ops (``*_like``, ``new_*``, ``lift_fresh_copy``,
linspace/logspace with tensor endpoints) against a Python loop."""

import pytest
import torch

import torchxform
from tests.harness import assert_close, check_vmap, check_vmap_sampled, no_fallback

aten = torch.ops.aten
FLOATS = [torch.float32, torch.float64]
SHAPES = [(2, 3), (), (1, 4), (2, 1, 3)]


def _sampler(shape, dtype):
    return lambda: (torch.randn(shape, dtype=dtype),)


# Deterministic values: compared with the loop directly.  (name, fn)
LIKE = [
    ("zeros_like", torch.zeros_like),
    ("ones_like", torch.ones_like),
    ("full_like", lambda x: torch.full_like(x, 2.5)),
    ("full_like_int", lambda x: torch.full_like(x, 7, dtype=torch.int32)),
    ("zeros_like_f64", lambda x: torch.zeros_like(x, dtype=torch.float64)),
    ("ones_like_contiguous", lambda x: torch.ones_like(x, memory_format=torch.contiguous_format)),
    ("ones_like_preserve", lambda x: torch.ones_like(x, memory_format=torch.preserve_format)),
    ("empty_like_written", lambda x: torch.empty_like(x).copy_(x * 2)),  # batched: takes batched writes
    ("empty_like_bool_filled", lambda x: torch.empty_like(x, dtype=torch.bool).fill_(True)),
    ("new_zeros", lambda x: x.new_zeros((2, 3))),
    ("new_ones_dtype", lambda x: x.new_ones(4, dtype=torch.int64)),
    ("new_full", lambda x: x.new_full((3,), -1.5)),
    ("new_zeros_0dim", lambda x: x.new_zeros(())),
    ("new_zeros_written", lambda x: _write_first(x.new_zeros(3), x)),
    ("new_empty_written", lambda x: x.new_empty((2,) + x.shape).copy_(x.expand((2,) + x.shape))),
    ("new_empty_strided_written", lambda x: x.new_empty_strided((2, 3), (1, 2)).fill_(0.0).add_(x.sum())),
    ("lift_fresh_copy", lambda x: aten.lift_fresh_copy(x)),
    ("factory_plain", lambda x: torch.zeros(3) + torch.arange(3.0) * x.sum()),
]


def _write_first(buf, x):
    # torch.func materializes new_* results so that batched writes like this work.
    buf[0] = x.sum()
    buf[1:2] = x.reshape(-1)[:1] if x.numel() else buf[1:2]
    return buf


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name,fn", LIKE, ids=[row[0] for row in LIKE])
def test_like_and_new(name, fn, dtype):
    with no_fallback():
        for shape in SHAPES:
            check_vmap_sampled(fn, _sampler(shape, dtype), msg=f"{name} {shape}")


def test_like_results_are_batched_and_fresh():
    x = torch.randn(3, 2)
    out = torchxform.vmap(lambda a: torch.zeros_like(a).add_(a))(x)
    assert_close(out, x)
    out = torchxform.vmap(lambda a: a.new_ones(2))(x)
    assert out.shape == (3, 2) and out.dtype == x.dtype
    out.add_(1)  # materialized: a real tensor, not an expanded view
    assert (out == 2).all()


@pytest.mark.parametrize("in_dim", [0, 1, -1])
@pytest.mark.parametrize(
    "fn",
    [
        lambda x: torch.zeros_like(x, memory_format=torch.channels_last),
        lambda x: torch.empty_like(x, memory_format=torch.channels_last).fill_(1.0),
        lambda x: torch.full_like(x, 3.0, memory_format=torch.contiguous_format),
        lambda x: torch.ones_like(x),
    ],
    ids=["zeros_cl", "empty_cl", "full_contiguous", "ones_preserve"],
)
def test_like_memory_format(fn, in_dim):
    # Each example is laid out as eager lays out the logical result.
    examples = [torch.randn(2, 3, 4, 5) for _ in range(3)]
    examples[1] = examples[1].contiguous(memory_format=torch.channels_last)  # preserve follows the input
    x = torch.stack(examples, in_dim)
    with no_fallback():
        out = check_vmap(fn, x, in_dims=in_dim)
    for i, example in enumerate(examples):
        logical = x.select(in_dim, i)
        expected = fn(logical)
        if logical.is_contiguous() or logical.is_contiguous(memory_format=torch.channels_last):
            assert out[i].stride() == expected.stride(), (i, out[i].stride(), expected.stride())


def test_like_memory_format_channels_last_3d():
    x = torch.randn(2, 3, 3, 4, 5, 6)
    with no_fallback():
        out = check_vmap(lambda a: torch.ones_like(a, memory_format=torch.channels_last_3d), x, in_dims=1)
    assert all(out[i].is_contiguous(memory_format=torch.channels_last_3d) for i in range(3))


@pytest.mark.parametrize(
    "memory_format,rank", [(torch.channels_last, 4), (torch.channels_last_3d, 5)], ids=["cl", "cl3d"]
)
def test_like_memory_format_wrong_rank_raises(memory_format, rank):
    x = torch.randn(3, 2, 3, 4)  # logical rank 3
    with pytest.raises(RuntimeError, match=f"required rank {rank} tensor"):
        torchxform.vmap(lambda a: torch.zeros_like(a, memory_format=memory_format))(x)


def test_new_empty_strided_layout():
    x = torch.randn(4, 3)
    out = torchxform.vmap(lambda a: a.new_empty_strided((2, 3), (1, 2)).copy_(a.expand(2, 3)))(x)
    assert_close(out, x[:, None].expand(4, 2, 3))
    with pytest.raises(RuntimeError, match="dimensionality of sizes"):
        torchxform.vmap(lambda a: a.new_empty_strided((2, 3), (1,)))(x)


def test_new_batch_nested():
    x = torch.randn(2, 3, 4)
    with no_fallback():
        check_vmap(lambda a: torchxform.vmap(lambda b: _write_first(b.new_zeros(3), b))(a), x)
        check_vmap(lambda a: torchxform.vmap(lambda b: torch.full_like(b, 2.0) * b)(a), x, in_dims=1)


# -- linspace / logspace with tensor endpoints ---------------------------------

RANGES = [
    ("linspace", lambda s, e: torch.linspace(s, e, 5)),
    ("linspace_even", lambda s, e: torch.linspace(s, e, 6)),
    ("linspace_steps1", lambda s, e: torch.linspace(s, e, 1)),
    ("linspace_steps0", lambda s, e: torch.linspace(s, e, 0)),
    ("linspace_f64", lambda s, e: torch.linspace(s, e, 7, dtype=torch.float64)),
    ("linspace_int", lambda s, e: torch.linspace(s * 10, e * 10, 4, dtype=torch.int64)),
    ("linspace_scalar_start", lambda s, e: torch.linspace(-1.5, e, 5)),
    ("linspace_scalar_end", lambda s, e: torch.linspace(s, 2, 5)),
    ("logspace", lambda s, e: torch.logspace(s, e, 5)),
    ("logspace_base2", lambda s, e: torch.logspace(s, e, 4, base=2.0, dtype=torch.float64)),
    ("logspace_steps1", lambda s, e: torch.logspace(s, e, 1)),
    ("logspace_scalar_end", lambda s, e: torch.logspace(s, 1.0, 3)),
]


@pytest.mark.parametrize("name,fn", RANGES, ids=[row[0] for row in RANGES])
def test_linspace_logspace_tensor_endpoints(name, fn):
    def sample():
        return torch.randn(()), torch.randn(()) + 2

    with no_fallback():
        check_vmap_sampled(fn, sample, dims=(0, None))


def test_linspace_logspace_integral_endpoints():
    starts = torch.tensor([0, 1, -2])
    ends = torch.tensor([3, 8, 2])
    with no_fallback():
        check_vmap(lambda s, e: torch.logspace(s, e, 4, dtype=torch.int64), starts, ends)
        check_vmap(lambda s, e: torch.logspace(s, e, 4, base=2), starts, ends)
        check_vmap(lambda s, e: torch.linspace(s, e, 5, dtype=torch.int32), starts, ends)
        check_vmap(lambda s, e: torch.linspace(s, e, 4), starts.double(), ends)


def test_linspace_errors():
    with pytest.raises(RuntimeError, match="0-dimensional start and end"):
        torchxform.vmap(lambda s: torch.linspace(s, torch.tensor(1.0), 3))(torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="number of steps must be non-negative"):
        torchxform.vmap(lambda s: torch.linspace(s, 1.0, -1))(torch.randn(3))
