"""The core: interpreter stack, levels, bind routing, the dispatch mode, the
rule registry and the fallback order."""

import warnings

import pytest
import torch

import torchxform
from torchxform import vmap
from torchxform._core import registry
from torchxform._core.dispatch import TransformMode, bind
from torchxform._core.interpreter import Interpreter, active_interpreters, interpreting, transform_depth
from torch.utils._python_dispatch import _get_current_dispatch_mode

aten = torch.ops.aten


def test_levels_follow_nesting_and_stack_is_restored():
    seen = []

    def inner(b):
        seen.append([(type(i).__name__, i.level) for i in active_interpreters()])
        return b

    vmap(vmap(inner))(torch.randn(2, 3))
    assert seen[0] == [("VmapInterpreter", 1), ("VmapInterpreter", 2)]
    assert transform_depth() == 0
    assert not isinstance(_get_current_dispatch_mode(), TransformMode)


def test_stack_restored_when_inner_transform_raises():
    class Boom(Exception):
        pass

    def f(a):
        def g(b):
            raise Boom

        try:
            vmap(g)(a.unsqueeze(0))
        except Boom:
            pass
        assert [i.level for i in active_interpreters()] == [1]
        assert isinstance(_get_current_dispatch_mode(), TransformMode)
        return a * 2

    torch.testing.assert_close(vmap(f)(torch.ones(3)), torch.full((3,), 2.0))
    assert transform_depth() == 0


def test_interpreting_marks_dead_and_restores():
    class Dummy(Interpreter):
        def process(self, op, args, kwargs):  # pragma: no cover - never reached
            raise AssertionError

    interp = Dummy()
    with pytest.raises(ValueError):
        with interpreting(interp):
            assert interp.alive and interp.level == 1
            raise ValueError
    assert not interp.alive and transform_depth() == 0


def test_factories_inside_vmap_are_plain_tensors():
    def f(a):
        z = torch.zeros(3)
        assert type(z) is torch.Tensor
        return a + z

    torch.testing.assert_close(vmap(f)(torch.ones(2, 3)), torch.ones(2, 3))


def test_bind_without_tracers_runs_plain():
    x = torch.randn(3)
    torch.testing.assert_close(bind(aten.sin.default, (x,), {}), x.sin())


def test_bind_routes_to_highest_level():
    x = torch.randn(2, 3)
    y = torch.randn(4, 3)
    levels = []

    def outer(a):
        def inner(b):
            out = a * b  # a: level 1, b: level 2
            levels.append(out._interp.level)
            return out

        return vmap(inner)(y)

    out = vmap(outer)(x)
    torch.testing.assert_close(out, x[:, None, :] * y[None])
    assert levels == [2]


def test_registry_rejects_packets_and_lists_coverage():
    with pytest.raises(TypeError, match="overloads, not packets"):
        registry.register_batching(aten.sin)(lambda *a: None)
    assert registry.batching_coverage(aten.sin.default) == "rule"
    assert registry.batching_coverage(aten._local_scalar_dense.default) == "error"
    assert aten.sin.default in registry.registered_ops()


def test_decomposition_is_used_before_loop():
    # aten.silu has a rule; pretend it has none, so its torch._decomp
    # decomposition (x * sigmoid(x)) runs under vmap without any loop.
    op = aten.silu.default
    saved = registry.BATCH_RULES.pop(op)
    registry._changed()
    try:
        assert registry.batching_coverage(op) == "decomposition"
        x = torch.randn(3, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", torchxform.SlowFallbackWarning)
            out = vmap(torch.nn.functional.silu, in_dims=1)(x)
        torch.testing.assert_close(out, torch.nn.functional.silu(x).t())
    finally:
        registry.BATCH_RULES[op] = saved
        registry._changed()


def test_custom_rule_registration_takes_effect():
    op = aten.sin.default
    saved = registry.BATCH_RULES[op]
    calls = []

    @registry.register_batching(op)
    def traced_sin(bdims, x):
        calls.append(bdims)
        return torch.sin(x), bdims[0]

    try:
        torch.testing.assert_close(vmap(torch.sin, in_dims=1)(torch.ones(2, 3)), torch.ones(3, 2).sin())
        assert calls == [[1]]
    finally:
        registry.BATCH_RULES[op] = saved
        registry._changed()


def test_metadata_inplace_ops_update_the_tracer():
    w = torch.randn(3, 4)

    def f(a):
        b = a.clone()
        assert b.unsqueeze_(0) is b
        b.t_()
        return b, a @ w  # matmul of a 1-D input squeezes its result in place in C++

    x = torch.randn(5, 3)
    out, mm = vmap(f)(x)
    torch.testing.assert_close(out, torch.stack([r.unsqueeze(0).t() for r in x]))
    torch.testing.assert_close(mm, x @ w)


def test_conjugate_views_then_real_and_imag_under_every_transform():
    # See NOTE [Conjugation is physical inside tracers].
    import torch.autograd.forward_ad as fwAD

    from torchxform import grad, jvp, vmap

    f = lambda x: (torch.conj(x * (1 + 2j)).imag * x + torch.fft.ifft(x).real).sum()  # noqa: E731
    x = torch.randn(4, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    torch.testing.assert_close(grad(f)(x), torch.autograd.grad(f(leaf), leaf)[0])
    t = torch.randn(4, dtype=torch.float64)
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
    torch.testing.assert_close(jvp(f, (x,), (t,))[1], expected)
    xs = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(vmap(f)(xs), torch.stack([f(row) for row in xs]))
