"""grad, grad_and_value and vjp: torch.func's contract, composition, in-place
and view semantics, no_grad semantics, interop and memory.  References are
torch.autograd on the plain function (or closed forms for trivial cases)."""

import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchxform
from torchxform import grad, grad_and_value, vjp, vmap
from tests.harness import assert_close, no_fallback

D = torch.float64


def autograd_grad(f, *args, argnums=0):
    """d f(*args) / d args[argnums] by torch.autograd."""
    nums = (argnums,) if isinstance(argnums, int) else argnums
    nums = tuple(n % len(args) for n in nums)
    leaves = [a.detach().clone().requires_grad_() if i in nums else a for i, a in enumerate(args)]
    out = f(*leaves)
    grads = torch.autograd.grad(out, [leaves[i] for i in nums], allow_unused=True)
    grads = tuple(torch.zeros_like(args[i]) if g is None else g for g, i in zip(grads, nums))
    return grads[0] if isinstance(argnums, int) else grads


def f3(x, y, z):
    return (x.sin() * y).sum() + (z * x).exp().mean()


# -- API ---------------------------------------------------------------------


@pytest.mark.parametrize("argnums", [0, 1, -1, (0, 2), (2, 0), (1,)], ids=str)
def test_grad_argnums(argnums):
    args = (torch.randn(3, dtype=D), torch.randn(3, dtype=D), torch.randn(3, dtype=D))
    assert_close(grad(f3, argnums=argnums)(*args), autograd_grad(f3, *args, argnums=argnums))


def test_grad_pytree_args_and_kwargs():
    params = {"w": torch.randn(4, 3, dtype=D), "b": [torch.randn(4, dtype=D)]}
    x = torch.randn(5, 3, dtype=D)

    def loss(p, x, *, scale):
        return ((x @ p["w"].t() + p["b"][0]).tanh() ** 2).sum() * scale

    g = grad(loss)(params, x, scale=2.0)
    assert set(g) == {"w", "b"} and isinstance(g["b"], list)
    w = params["w"].clone().requires_grad_()
    b = params["b"][0].clone().requires_grad_()
    rw, rb = torch.autograd.grad(loss({"w": w, "b": [b]}, x, scale=2.0), (w, b))
    assert_close(g, {"w": rw, "b": [rb]})


def test_grad_has_aux_and_grad_and_value():
    x = torch.randn(3, dtype=D)

    def f(x):
        y = x.sin()
        return y.sum(), {"y": y, "n": 3}

    g, aux = grad(f, has_aux=True)(x)
    assert_close(g, x.cos())
    assert_close(aux["y"], x.sin()) and aux["n"] == 3
    assert type(aux["y"]) is torch.Tensor
    g2, (value, aux2) = grad_and_value(f, has_aux=True)(x)
    assert_close(g2, x.cos())
    assert_close(value, x.sin().sum())
    g3, value3 = grad_and_value(lambda x: (x**2).sum())(x)
    assert_close((g3, value3), (2 * x, (x**2).sum()))


def test_vjp_outputs_pytree_and_repeated_calls():
    x, y = torch.randn(3, dtype=D), torch.randn(3, dtype=D)

    def f(x, y):
        return {"a": x * y, "b": (x.exp(), y.sum())}

    out, pullback = vjp(f, x, y)
    assert_close(out, f(x, y))
    for _ in range(2):  # vjp_fn may be called several times
        ct = {"a": torch.randn(3, dtype=D), "b": (torch.randn(3, dtype=D), torch.randn((), dtype=D))}
        gx, gy = pullback(ct)
        rx, ry = x.clone().requires_grad_(), y.clone().requires_grad_()
        ro = f(rx, ry)
        ex = torch.autograd.grad([ro["a"], ro["b"][0], ro["b"][1]], [rx, ry], [ct["a"], ct["b"][0], ct["b"][1]])
        assert_close((gx, gy), ex)


def test_vjp_has_aux():
    x = torch.randn(3, dtype=D)
    out, pullback, aux = vjp(lambda x: (x.sin(), x.cos()), x, has_aux=True)
    assert_close(aux, x.cos())
    assert_close(pullback(torch.ones(3, dtype=D))[0], x.cos())


# -- errors (torch.func's types and messages) ---------------------------------


def test_error_non_scalar_output():
    with pytest.raises(RuntimeError, match="to return a scalar Tensor, got tensor with 1 dims"):
        grad(lambda x: x * 2)(torch.randn(3))


def test_error_non_tensor_output():
    with pytest.raises(RuntimeError, match="Expected f\\(\\*args\\) to return a Tensor, got <class 'float'>"):
        grad(lambda x: 1.0)(torch.randn(3))
    with pytest.raises(RuntimeError, match="expected f\\(\\*primals\\) to return only tensors"):
        vjp(lambda x: (x, 2), torch.randn(3))


def test_error_argnums():
    with pytest.raises(RuntimeError, match="Got argnum=2, but only 2 positional inputs"):
        grad(lambda x, y: (x * y).sum(), argnums=2)(torch.randn(3), torch.randn(3))
    with pytest.raises(RuntimeError, match="argnums elements must be unique"):
        grad(lambda x, y: (x * y).sum(), argnums=(0, 0))(torch.randn(3), torch.randn(3))
    with pytest.raises(RuntimeError, match="argnums must be non-empty"):
        grad(lambda x: x.sum(), argnums=())(torch.randn(3))
    with pytest.raises(RuntimeError, match="argnums must be int or Tuple"):
        grad(lambda x: x.sum(), argnums=[0])(torch.randn(3))


def test_error_has_aux_without_tuple():
    with pytest.raises(RuntimeError, match="should be a tuple: \\(output, aux\\) if has_aux is True"):
        grad(lambda x: x.sum(), has_aux=True)(torch.randn(3))
    with pytest.raises(RuntimeError, match="should be a tuple: \\(output, aux\\) if has_aux is True"):
        vjp(lambda x: x, torch.randn(3), has_aux=True)


def test_error_cotangent_structure_and_shape():
    _, pullback = vjp(lambda x: (x, x * 2), torch.randn(3))
    with pytest.raises(RuntimeError, match="Expected pytree structure of cotangents"):
        pullback(torch.ones(3))
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        pullback((torch.ones(3), torch.ones(4)))


def test_error_non_tensor_primal_and_integer_output():
    with pytest.raises(ValueError, match="must be Tensor, got <class 'int'>"):
        vjp(lambda x: x, 3)
    with pytest.raises(RuntimeError, match="must be floating-point or complex Tensors"):
        vjp(lambda x: (x > 0).long(), torch.randn(3))


def test_missing_rule_names_the_op():
    from torchxform._core import registry

    op = torch.ops.aten.sin.default
    saved = registry.VJP_RULES.pop(op)
    registry._changed()
    try:
        with pytest.raises(RuntimeError, match=r"grad: there is no VJP rule for aten\.sin\.default"):
            grad(lambda x: x.sin().sum())(torch.randn(3))
    finally:
        registry.VJP_RULES[op] = saved
        registry._changed()


def test_failing_function_leaves_no_state():
    from torchxform._core.interpreter import transform_depth

    with pytest.raises(ZeroDivisionError):
        grad(lambda x: (x * (1 / 0)).sum())(torch.randn(3))
    assert transform_depth() == 0


# -- composition --------------------------------------------------------------


def test_grad_of_grad_and_third_order():
    x = torch.randn(4, dtype=D)
    f = lambda x: (x.sin() * x.exp()).sum()  # noqa: E731
    xr = x.clone().requires_grad_()
    (g1,) = torch.autograd.grad(f(xr), xr, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), xr, create_graph=True)
    (g3,) = torch.autograd.grad(g2.sum(), xr)
    assert_close(grad(lambda x: grad(f)(x).sum())(x), g2)
    assert_close(grad(lambda x: grad(lambda y: grad(f)(y).sum())(x).sum())(x), g3)


def test_perturbation_confusion():
    x = torch.randn(3, dtype=D)
    out = grad(lambda x: (x * grad(lambda y: (x * y).sum())(x)).sum())(x)
    assert_close(out, 2 * x)


def test_closure_over_outer_tracer():
    x, w = torch.randn(3, dtype=D), torch.randn(3, dtype=D)

    def outer(w):
        return grad(lambda x: (w * x.sin()).sum())(x).pow(2).sum()

    assert_close(grad(outer)(w), autograd_grad(lambda w: (w * x.cos()).pow(2).sum(), w))


def test_vmap_of_grad_is_per_sample():
    w = torch.randn(3, 2, dtype=D)
    xs, ys = torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D)

    def loss(w, x, y):
        return ((x @ w).tanh() - y).pow(2).sum()

    with no_fallback():
        got = vmap(grad(loss), in_dims=(None, 0, 0))(w, xs, ys)
    expected = torch.stack([autograd_grad(loss, w, x, y) for x, y in zip(xs, ys)])
    assert_close(got, expected)


def test_grad_of_vmap():
    w = torch.randn(3, dtype=D)
    xs = torch.randn(5, 3, dtype=D)
    with no_fallback():
        got = grad(lambda w: vmap(lambda x: (w * x).sin().sum())(xs).sum())(w)
    assert_close(got, autograd_grad(lambda w: (w * xs).sin().sum(), w))


def test_vmap_of_vjp_with_batched_cotangents():
    x = torch.randn(3, 4, dtype=D)
    out, pullback = vjp(lambda x: x.softmax(-1) * x, x)
    cts = torch.randn(6, 3, 4, dtype=D)
    with no_fallback():
        (got,) = vmap(pullback)(cts)
    xr = x.clone().requires_grad_()
    ref = xr.softmax(-1) * xr
    expected = torch.stack([torch.autograd.grad(ref, xr, c, retain_graph=True)[0] for c in cts])
    assert_close(got, expected)


def test_vjp_of_vjp():
    x = torch.randn(3, dtype=D)
    v = torch.randn(3, dtype=D)

    def f(x):
        return x.sin() * x.sum()

    def pulled(x, v):
        return vjp(f, x)[1](v)[0]

    (g_x, g_v) = vjp(pulled, x, v)[1](torch.ones(3, dtype=D))
    xr, vr = x.clone().requires_grad_(), v.clone().requires_grad_()
    (first,) = torch.autograd.grad(f(xr), xr, vr, create_graph=True)
    ex, ev = torch.autograd.grad(first.sum(), (xr, vr))
    assert_close((g_x, g_v), (ex, ev))


# -- symbolic zeros ---------------------------------------------------------------


def test_unused_inputs_get_zero_gradients():
    x, y = torch.randn(3, dtype=D), torch.randn(2, 5, dtype=torch.float32)
    gx, gy = grad(lambda x, y: x.sum() * 2, argnums=(0, 1))(x, y)
    assert_close(gx, torch.full((3,), 2.0, dtype=D))
    assert gy.shape == y.shape and gy.dtype == y.dtype and not gy.any()
    (gz,) = vjp(lambda x: torch.ones(3), x)[1](torch.ones(3))
    assert gz.shape == x.shape and not gz.any()


def test_no_tape_node_for_untracked_values():
    seen = {}

    def f(x):
        c = torch.ones(3) * 2  # depends on no input: a constant at this level
        seen["node"] = c._node
        return (x * c).sum()

    grad(f)(torch.randn(3))
    assert seen["node"] is None


# -- in-place ops and views (eager autograd gives the reference) --------------


INPLACE_CASES = [
    ("setitem_then_mul_", lambda x, y: (lambda z: (z.__setitem__(0, y.sum()), z.mul_(2), z)[-1])(x.clone())),
    ("iadd", lambda x, y: (lambda out: (out.__iadd__(y), out)[-1])(x * 3)),
    ("relu_inplace_module", lambda x, y: nn.ReLU(inplace=True)(x * y)),
    ("masked_fill_", lambda x, y: (x * y).masked_fill_(x > 0, 0.5)),
    ("copy_into_slice", lambda x, y: (lambda z: (z[1:].copy_(y[:2] * 5), z)[-1])(x.clone())),
    ("view_write_then_base_read", lambda x, y: (lambda z: (z.view(-1)[:2].mul_(y[0]), z * z)[-1])(x.clone())),
    ("write_base_then_read_view", lambda x, y: (lambda z: (lambda v: (z.add_(y), v * 2)[-1])(z[::2]))(x.clone())),
    ("transpose_view_write", lambda x, y: (lambda z: (z.t().mul_(y.unsqueeze(1)), z)[-1])(x.unsqueeze(0).expand(3, 3).clone())),
    ("new_zeros_filled", lambda x, y: (lambda z: (z.__setitem__(slice(0, 3), x * y), z.sin())[-1])(x.new_zeros(5))),
    ("factory_filled", lambda x, y: (lambda z: (z.__setitem__(1, (x * y).sum()), z * 3)[-1])(torch.zeros(4, dtype=D))),
    ("squeeze_unsqueeze_inplace", lambda x, y: (lambda z: (z.unsqueeze_(0), z.mul_(y), z.squeeze_(0), z)[-1])(x.clone())),
]


@pytest.mark.parametrize("name,fn", INPLACE_CASES, ids=[c[0] for c in INPLACE_CASES])
def test_inplace_and_views_match_autograd(name, fn):
    x, y = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    loss = lambda x, y: fn(x, y).pow(2).sum()  # noqa: E731
    assert_close(grad(loss, argnums=(0, 1))(x, y), autograd_grad(loss, x, y, argnums=(0, 1)))


def test_modifying_a_saved_tensor_raises():
    def f(x):
        y = x.clone()
        z = y * y  # saves y
        y.add_(1)
        return z.sum()

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        grad(f)(torch.randn(3))


def test_mutating_a_captured_tensor_raises():
    captured = torch.zeros(3)
    with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
        grad(lambda x: captured.copy_(x).sum())(torch.randn(3))


# -- no_grad / detach ---------------------------------------------------------


def test_no_grad_inside_stops_differentiation():
    x = torch.randn(3, dtype=D)

    def f(x):
        with torch.no_grad():
            c = x**2
        return (x - c).sum()

    assert_close(grad(f)(x), torch.ones(3, dtype=D))


def test_grad_under_outer_no_grad_still_differentiates():
    x = torch.randn(3, dtype=D)
    with torch.no_grad():
        assert_close(grad(lambda x: x.sin().sum())(x), x.cos())


def test_detach_stops_differentiation():
    x = torch.randn(3, dtype=D)
    assert_close(grad(lambda x: (x * x.detach()).sum())(x), x)


def test_requires_grad_flag_does_not_decide():
    x = torch.randn(3, dtype=D, requires_grad=False)
    w = torch.randn(3, dtype=D, requires_grad=True)
    assert_close(grad(lambda x: (x * w).sum())(x), w.detach())


def test_inner_grad_under_no_grad_is_invisible_to_outer():
    x = torch.randn(3, dtype=D)

    def outer(x):
        with torch.no_grad():
            g = grad(lambda y: (y**3).sum())(x)
        return (g * x).sum()

    assert_close(grad(outer)(x), 3 * x**2)


# -- interop with torch.autograd ------------------------------------------------


def test_grad_output_backpropagates_second_derivative():
    x = torch.randn(3, dtype=D, requires_grad=True)
    g = grad(lambda x: (x**3).sum())(x)
    assert g.requires_grad
    g.sum().backward()
    assert_close(x.grad, 6 * x.detach())


def test_maml_outer_step_with_torch_optimizer():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    tasks_x, tasks_y = torch.randn(4, 5, 3, dtype=D), torch.randn(4, 5, 1, dtype=D)
    w0, b0 = model.weight, model.bias

    def inner_loss(w, b, x, y):
        return F.mse_loss(F.linear(x, w, b), y)

    def adapted_loss(w, b, x, y):
        gw, gb = grad(inner_loss, argnums=(0, 1))(w, b, x, y)
        return inner_loss(w - 0.1 * gw, b - 0.1 * gb, x, y)

    losses = vmap(adapted_loss, in_dims=(None, None, 0, 0))(w0, b0, tasks_x, tasks_y)
    losses.sum().backward()
    ours = (w0.grad.clone(), b0.grad.clone())

    w, b = w0.detach().clone().requires_grad_(), b0.detach().clone().requires_grad_()
    total = 0
    for x, y in zip(tasks_x, tasks_y):
        gw, gb = torch.autograd.grad(inner_loss(w, b, x, y), (w, b), create_graph=True)
        total = total + inner_loss(w - 0.1 * gw, b - 0.1 * gb, x, y)
    expected = torch.autograd.grad(total, (w, b))
    assert_close(ours, expected)


# -- memory ----------------------------------------------------------------------


def test_tape_released_after_grad_returns():
    refs = []

    def f(x):
        y = x.sin()
        refs.append(weakref.ref(y))
        return (y * y).sum()

    for _ in range(3):
        grad(f)(torch.randn(100))
    gc.collect()
    assert all(r() is None for r in refs)


def test_no_memory_growth_across_calls():
    import tracemalloc

    f = grad(lambda x: (x.sin() * x.cos()).sum())
    x = torch.randn(64)
    for _ in range(20):
        f(x)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(200):
        f(x)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert growth < 200_000, growth  # bytes; a leaked tape per call would be far more


def test_grad_tensor_repr_and_escape():
    leaked = []

    def f(x):
        leaked.append(x)
        assert "GradTensor(lvl=1" in repr(x)
        return x.sum()

    grad(f)(torch.ones(2))
    # After the transform, a leaked tracer stands for its value.
    assert_close(leaked[0] + 1, torch.full((2,), 2.0))
    assert torchxform.grad is grad
