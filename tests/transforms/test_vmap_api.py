"""vmap's contract: in_dims/out_dims, pytrees, nesting, chunking, errors,
in-place and view semantics.  References are Python loops (tests/harness.py)
or eager PyTorch; error types follow torch.func."""

import gc
import warnings

import pytest
import torch

import torchxform
from torchxform import vmap
from tests.harness import assert_close, check_vmap, loop_reference


# -- in_dims ------------------------------------------------------------------


@pytest.mark.parametrize("in_dims", [0, 1, -1, (1, None), (None, 1), (-2, 0)], ids=str)
def test_in_dims_int_and_tuple(in_dims):
    x = torch.randn(3, 4, 5)
    y = torch.randn(4, 4, 5) if in_dims in ((-2, 0),) else torch.randn(3, 4, 5)
    if in_dims == (-2, 0):
        x = torch.randn(3, 4, 5)
        y = torch.randn(4, 5)
    check_vmap(lambda a, b: a * b.sum(), x, y, in_dims=in_dims)


def test_in_dims_pytree():
    params = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    xs = [torch.randn(5, 3), (torch.randn(2, 5),)]

    def f(p, inputs):
        x, (z,) = inputs
        return x @ p["w"] + p["b"] + z.sum()

    check_vmap(f, params, xs, in_dims=({"w": None, "b": None}, [0, (1,)]))
    check_vmap(f, params, xs, in_dims=(None, [0, (1,)]))


def test_kwargs_are_not_batched():
    x = torch.randn(3, 4)
    scale = torch.randn(4)
    out = vmap(lambda a, scale: a * scale)(x, scale=scale)
    torch.testing.assert_close(out, x * scale)


def test_non_tensor_args_with_none_in_dim():
    x = torch.randn(3, 4)
    out = vmap(lambda a, n, s: a * n + s, in_dims=(0, None, None))(x, 2, "ignored" and 1.0)
    torch.testing.assert_close(out, x * 2 + 1.0)


# -- out_dims -----------------------------------------------------------------


@pytest.mark.parametrize("out_dims", [0, 1, -1, 2], ids=str)
def test_out_dims_single(out_dims):
    check_vmap(lambda a: a.t(), torch.randn(3, 4, 5), out_dims=out_dims)


def test_out_dims_several_and_pytree():
    x = torch.randn(3, 4)
    check_vmap(lambda a: (a, a.sum(), {"c": a * 2}), x, out_dims=(1, 0, {"c": -1}))
    check_vmap(lambda a: (a, a.sum()), x, out_dims=(1, 0))


def test_out_dims_none_for_unbatched_output():
    x = torch.randn(3, 4)
    w = torch.randn(4)
    out, const = vmap(lambda a: (a * w, w), out_dims=(0, None))(x)
    torch.testing.assert_close(out, x * w)
    assert const is w
    _, n = vmap(lambda a: (a, 7), out_dims=(0, None))(x)
    assert n == 7


def test_unbatched_output_is_broadcast():
    x = torch.randn(3, 4)
    w = torch.randn(5)
    out = vmap(lambda a: w * 2, out_dims=1)(x)
    torch.testing.assert_close(out, (w * 2).unsqueeze(1).expand(5, 3))


def test_outputs_are_plain_tensors():
    out = vmap(lambda a: (a.sin(), [a.cos()]))(torch.randn(3, 4))
    assert type(out[0]) is torch.Tensor and type(out[1][0]) is torch.Tensor


# -- nesting ------------------------------------------------------------------


@pytest.mark.parametrize("inner,outer", [(0, 0), (1, 0), (0, 2), (-1, 1), (None, 0)], ids=str)
def test_nested_vmap_dims(inner, outer):
    x = torch.randn(3, 3, 3)
    y = torch.randn(3, 3, 3)

    def f(a, b):
        return (a * b).sum() + a

    inner_dims = (inner, 0)
    expected = loop_reference(lambda xa, ya: loop_reference(f, (xa, ya), inner_dims), (x, y), (outer, outer))
    actual = vmap(vmap(f, in_dims=inner_dims), in_dims=(outer, outer))(x, y)
    assert_close(actual, expected)


def test_triple_nesting():
    x = torch.randn(2, 3, 4, 5)
    out = vmap(vmap(vmap(lambda a: a.sum() * a)))(x)
    torch.testing.assert_close(out, x.sum(-1, keepdim=True) * x)


def test_inner_vmap_over_closure_of_outer_tracer():
    x = torch.randn(3, 4)
    y = torch.randn(5, 4)

    def outer(a):
        return vmap(lambda b: (a * b).sum())(y)

    torch.testing.assert_close(vmap(outer)(x), x @ y.t())


# -- chunk_size ---------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 100])
def test_chunk_size_matches_unchunked(chunk_size):
    x = torch.randn(5, 3)
    y = torch.randn(3, 5)

    def f(a, b):
        return a.sin() * b, a.sum()

    chunked = vmap(f, in_dims=(0, 1), out_dims=(1, 0), chunk_size=chunk_size)(x, y)
    plain = vmap(f, in_dims=(0, 1), out_dims=(1, 0))(x, y)
    assert_close(chunked, plain, rtol=0, atol=0)
    assert_close(chunked, loop_reference(f, (x, y), (0, 1), (1, 0)))


# -- bad input ----------------------------------------------------------------


def test_error_mismatched_batch_sizes_names_them():
    with pytest.raises(ValueError, match=r"same size in the mapped dimension.*\[3, 4\]"):
        vmap(torch.add)(torch.randn(3), torch.randn(4))


def test_error_in_dims_structure():
    with pytest.raises(ValueError, match="in_dims is not compatible with the structure"):
        vmap(torch.add, in_dims=(0, 0, 0))(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="expected `in_dims` to be int or a"):
        vmap(torch.add, in_dims=[0, 0])(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="in_dim must be either an integer dimension or None"):
        vmap(torch.sin, in_dims=("a",))(torch.randn(3))


def test_error_in_dim_for_non_tensor():
    with pytest.raises(ValueError, match="use None as the respective in_dim"):
        vmap(lambda a, n: a * n)(torch.randn(3), 2)


def test_error_in_dim_out_of_range():
    with pytest.raises(ValueError, match=r"-2 <= in_dim < 2"):
        vmap(torch.sin, in_dims=2)(torch.randn(3, 4))


def test_error_no_batched_input():
    with pytest.raises(ValueError, match="at least one Tensor to vmap over"):
        vmap(torch.sin, in_dims=(None,))(torch.randn(3))
    with pytest.raises(ValueError, match="got no inputs"):
        vmap(lambda: torch.ones(3))()


def test_error_non_tensor_output():
    with pytest.raises(ValueError, match="must only return Tensors, got type <class 'str'>"):
        vmap(lambda a: "x")(torch.randn(3))


def test_error_batched_output_with_out_dim_none():
    with pytest.raises(ValueError, match="can not return a BatchedTensor when out_dim is None"):
        vmap(lambda a: a, out_dims=None)(torch.randn(3))


def test_error_out_dims_types():
    with pytest.raises(ValueError, match="`out_dims` must be an int, None or a python collection"):
        vmap(torch.sin, out_dims="x")(torch.randn(3))
    with pytest.raises(ValueError, match="out_dims is not compatible with the structure"):
        vmap(lambda a: (a, a), out_dims=(0, 0, 0))(torch.randn(3))


def test_error_chunk_size_and_randomness():
    with pytest.raises(ValueError, match="chunk_size should be None or greater than 0"):
        vmap(torch.sin, chunk_size=0)
    with pytest.raises(RuntimeError, match="Only allowed values for randomness"):
        vmap(torch.sin, randomness="sometimes")


def test_failing_function_leaves_no_state():
    from torchxform._core.interpreter import transform_depth
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    modes_before = len(_get_current_dispatch_mode_stack())

    def boom(a):
        vmap(lambda b: b / 0)(a.unsqueeze(0))
        raise KeyError("user error")

    with pytest.raises(KeyError):
        vmap(boom)(torch.randn(3))
    assert transform_depth() == 0
    assert len(_get_current_dispatch_mode_stack()) == modes_before
    torch.testing.assert_close(torch.ones(2) + 1, torch.full((2,), 2.0))


# -- in-place ops and views ---------------------------------------------------


def test_inplace_on_unbatched_with_batched_arg_raises():
    w = torch.randn(3)
    with pytest.raises(RuntimeError, match=r"vmap: in-place .*`self` is not batched"):
        vmap(lambda a: w.add_(a))(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match=r"vmap: in-place"):
        vmap(lambda a: w.copy_(a))(torch.randn(4, 3))


def test_inplace_on_batched_input_mutates_caller_tensor():
    x = torch.randn(4, 3)
    expected = x * 2
    vmap(lambda a: a.mul_(2))(x)
    torch.testing.assert_close(x, expected)


def test_view_writes_reach_base():
    x = torch.randn(4, 3, 5)

    def f(a):
        b = a.clone()
        v = b[1]  # a view of b
        v.mul_(0)
        w = b.t()  # another view
        w[0, 2] = 7.0
        return b

    check_vmap(f, x)
    check_vmap(f, x.transpose(0, 1), in_dims=1)


def test_setitem_with_batched_value():
    def f(a, b):
        c = a.clone()
        c[0] = b
        c[:, 1] += b[1]
        return c

    check_vmap(f, torch.randn(4, 3, 3), torch.randn(4, 3))


# -- data-dependent operations ------------------------------------------------


@pytest.mark.parametrize(
    "fn,match",
    [
        (lambda a: a.sum().item(), r"\.item\(\)"),
        (lambda a: a.sum() > 0 and a, r"\.item\(\)|control flow"),
        (lambda a: a.tolist(), r"\.tolist\(\)"),
        (lambda a: torch.unique(a), "dynamic shape"),
        (lambda a: torch.nonzero(a > 0), "dynamic shape"),  # counts differ between examples
    ],
    ids=["item", "bool", "tolist", "unique", "nonzero"],
)
def test_data_dependent_ops_raise(fn, match):
    x = torch.tensor([[1.0, -1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0], [-1.0, -2.0, 5.0, 0.5]])
    with pytest.raises(RuntimeError, match=match):
        vmap(fn)(x)


def test_nonzero_batches_when_every_example_has_the_same_count():
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 4.0]])
    assert_close(vmap(torch.nonzero)(x), torch.stack([torch.nonzero(row) for row in x]))


# -- tracers ------------------------------------------------------------------


def test_batched_tensor_repr_and_metadata():
    seen = {}

    def f(a):
        seen["repr"] = repr(a)
        seen["shape"] = a.shape
        seen["dtype"] = a.dtype
        seen["contig"] = a.is_contiguous()
        return a

    vmap(f, in_dims=1)(torch.randn(4, 3, 5, dtype=torch.float64))
    assert seen["repr"].startswith("BatchedTensor(lvl=1, bdim=1, value=")
    assert seen["shape"] == (4, 5) and seen["dtype"] == torch.float64
    assert seen["contig"] is False  # the logical strides skip the batch dim


def test_escaped_batched_tensor_raises_clearly():
    leaked = []
    vmap(lambda a: leaked.append(a) or a)(torch.randn(3))
    with pytest.raises(RuntimeError, match="escaped"):
        leaked[0] + 1


# -- interop with torch.autograd ----------------------------------------------


def test_outputs_differentiable_by_torch_autograd():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, 2, requires_grad=True)
    out = vmap(lambda a: (a.sin() @ w).tanh())(x)
    assert out.requires_grad
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    ref = (x.sin() @ w).tanh()
    rx, rw = torch.autograd.grad(ref.sum(), (x, w))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_no_grad_inside_vmap_blocks_autograd():
    x = torch.randn(4, 3, requires_grad=True)

    def f(a):
        with torch.no_grad():
            b = a * 2
        return b

    assert not vmap(f)(x).requires_grad


# -- fallbacks ------------------------------------------------------------------


def test_loop_fallback_warns_once_per_op_and_can_error():
    from torchxform._core.errors import reset_fallback_warnings
    from torchxform._core.registry import BATCH_RULES, _changed

    op = torch.ops.aten.mul.Tensor
    saved = BATCH_RULES.pop(op)
    _changed()
    try:
        reset_fallback_warnings()
        x = torch.randn(3, 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out1 = vmap(lambda a: a * a)(x)
            out2 = vmap(lambda a: a * 3)(x)
        slow = [w for w in caught if issubclass(w.category, torchxform.SlowFallbackWarning)]
        assert len(slow) == 1 and "aten.mul.Tensor" in str(slow[0].message)
        torch.testing.assert_close(out1, x * x)
        torch.testing.assert_close(out2, x * 3)
        reset_fallback_warnings()
        with warnings.catch_warnings():
            warnings.simplefilter("error", torchxform.SlowFallbackWarning)
            with pytest.raises(torchxform.SlowFallbackWarning):
                vmap(lambda a: a * a)(x)
            with pytest.raises(torchxform.SlowFallbackWarning):  # still an error the next time
                vmap(lambda a: a * a)(x)
    finally:
        BATCH_RULES[op] = saved
        _changed()


def test_no_memory_growth_across_calls():
    import weakref

    refs = []

    def f(a):
        refs.append(weakref.ref(a))
        return a * 2

    for _ in range(3):
        vmap(f)(torch.randn(3, 4))
    gc.collect()
    assert all(r() is None for r in refs)


def test_narrow_with_a_batched_tensor_start_against_a_loop():
    # See NOTE [narrow with a tensor start].
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    starts = torch.tensor([0, 2, -2])
    expected = torch.stack([torch.narrow(a, 0, int(s), 2) for a, s in zip(x, starts)])
    assert_close(vmap(lambda x, s: torch.narrow(x, 0, s, 2))(x, starts), expected)
    expected = torch.stack([x[0].narrow(1, int(s), 2) for s in starts])
    assert_close(vmap(lambda s: x[0].narrow(1, s, 2))(starts), expected)
    assert torch.narrow is torch._C._VariableFunctions.narrow  # restored after the transforms


def test_tensor_split_with_batched_indices_is_refused_clearly():
    x = torch.randn(3, 6)
    cuts = lambda: torch.tensor([2, 4], device="cpu")  # noqa: E731 (tensor_split takes them on the CPU only)
    assert_close(vmap(lambda x: torch.tensor_split(x, cuts()))(x),
                 tuple(torch.stack(parts) for parts in zip(*[torch.tensor_split(r, cuts()) for r in x])))
    with pytest.raises(RuntimeError, match="tensor_split: the indices or sections are a tensor tracked by a transform"):
        vmap(lambda x, i: torch.tensor_split(x, i))(x, torch.tensor([[1, 2], [2, 3], [0, 1]]))
