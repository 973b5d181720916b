"""torch.autograd.Function under the transforms: grad runs its own backward
(against torch.autograd on the same Function); jvp its own jvp (against
torch.autograd.forward_ad on the same Function); vmap its vmap staticmethod
or a generated rule (against a loop); compositions of all three, the
examples of PyTorch's "Extending torch.func with autograd.Function" notes,
once_differentiable, and torch.func's errors; torch.autograd.Function is
intact after transforms ran."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import torchxform
from torchxform import grad, jvp, vmap
from tests.harness import assert_close


class StraightThroughRound(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.round()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def test_vmap_batches_the_forward():
    x = torch.randn(4, 3) * 3
    got = vmap(lambda t: StraightThroughRound.apply(t) * 2)(x)
    assert_close(got, torch.stack([StraightThroughRound.apply(t) * 2 for t in x]))


class SavedExp(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.exp()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_output):
        (result,) = ctx.saved_tensors
        return grad_output * result


class OldStyle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output * 2


def reference_grad(fn, x, create_graph=False):
    leaf = x.clone().requires_grad_()
    return torch.autograd.grad(fn(leaf).sum(), leaf, create_graph=create_graph)[0], leaf


def test_grad_runs_the_functions_own_backward():
    x = torch.randn(5) * 3
    # The straight-through estimator: its backward, not round's zero derivative.
    f = lambda x: StraightThroughRound.apply(x * 2)  # noqa: E731
    assert_close(grad(lambda x: f(x).sum())(x), reference_grad(f, x)[0])
    assert_close(grad(lambda x: SavedExp.apply(x).sum())(x), reference_grad(SavedExp.apply, x)[0])


def test_second_order_and_per_sample_through_a_function():
    x = torch.randn(4, dtype=torch.float64)
    first, leaf = reference_grad(SavedExp.apply, x, create_graph=True)
    second = torch.autograd.grad(first.sum(), leaf)[0]
    assert_close(grad(lambda x: grad(lambda y: SavedExp.apply(y).sum())(x).sum())(x), second)
    xs = torch.randn(3, 4, dtype=torch.float64)
    got = vmap(grad(lambda x: (SavedExp.apply(x) * x).sum()))(xs)
    assert_close(got, torch.stack([reference_grad(lambda t: SavedExp.apply(t) * t, x)[0] for x in xs]))


def test_jvp_of_a_function_without_jvp_names_the_fix():
    with pytest.raises(RuntimeError, match="StraightThroughRound is a torch.autograd.Function without a jvp"):
        jvp(lambda x: StraightThroughRound.apply(x), (torch.randn(3),), (torch.randn(3),))


def test_a_function_without_setup_context_gets_torch_funcs_error():
    with pytest.raises(RuntimeError, match="must override the setup_context staticmethod"):
        grad(lambda x: OldStyle.apply(x).sum())(torch.randn(3))


def test_a_function_on_constants_inside_grad_is_fine():
    x = torch.randn(3)
    got = grad(lambda x: (x * StraightThroughRound.apply(torch.full((3,), 1.6))).sum())(x)
    assert_close(got, torch.full((3,), 2.0))


def test_autograd_function_intact_after_transforms():
    # Patches are restored as they were: a classmethod stays a classmethod
    # (bound to each subclass), so torch.autograd keeps working.
    vmap(torch.sin)(torch.randn(2, 3))
    assert isinstance(vars(torch.autograd.Function)["apply"], classmethod)
    leaf = torch.randn(3, requires_grad=True)
    StraightThroughRound.apply(leaf).sum().backward()
    assert_close(leaf.grad, torch.ones(3))
    assert torchxform.vmap(StraightThroughRound.apply)(torch.randn(2, 3)).shape == (2, 3)


# -- PyTorch's "Extending torch.func with autograd.Function" examples ---------

np = pytest.importorskip("numpy")


class NumpySort(torch.autograd.Function):
    """Sorts with NumPy: its forward is opaque to every transform."""

    @staticmethod
    def forward(x, dim):
        device = x.device
        x = x.cpu().numpy()
        ind = np.argsort(x, axis=dim)
        ind_inv = np.argsort(ind, axis=dim)
        result = np.take_along_axis(x, ind, axis=dim)
        return torch.tensor(result, device=device), torch.tensor(ind, device=device), torch.tensor(ind_inv, device=device)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, dim = inputs
        _, ind, ind_inv = output
        ctx.mark_non_differentiable(ind, ind_inv)
        ctx.save_for_backward(ind, ind_inv)
        ctx.dim = dim

    @staticmethod
    def backward(ctx, grad_output, _0, _1):
        ind, ind_inv = ctx.saved_tensors
        return NumpyTake.apply(grad_output, ind_inv, ind, ctx.dim), None

    @staticmethod
    def vmap(info, in_dims, x, dim):
        x_bdim, _ = in_dims
        x = x.movedim(x_bdim, 0)
        dim = dim if dim >= 0 else dim + x.dim() - 1
        return NumpySort.apply(x, dim + 1), (0, 0, 0)


class NumpyTake(torch.autograd.Function):
    @staticmethod
    def forward(x, ind, ind_inv, dim):
        device = x.device
        return torch.tensor(np.take_along_axis(x.cpu().numpy(), ind.cpu().numpy(), dim), device=device)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ind, ind_inv, dim = inputs
        ctx.save_for_backward(ind, ind_inv)
        ctx.dim = dim

    @staticmethod
    def backward(ctx, grad_output):
        ind, ind_inv = ctx.saved_tensors
        return NumpyTake.apply(grad_output, ind_inv, ind, ctx.dim), None, None, None

    @staticmethod
    def vmap(info, in_dims, x, ind, ind_inv, dim):
        x_bdim, ind_bdim, ind_inv_bdim, _ = in_dims
        logical_dim = x.dim() if x_bdim is None else x.dim() - 1
        dim = dim if dim >= 0 else dim + logical_dim

        def at_front(t, bdim):
            return t.expand(info.batch_size, *t.shape) if bdim is None else t.movedim(bdim, 0)

        return NumpyTake.apply(at_front(x, x_bdim), at_front(ind, ind_bdim), at_front(ind_inv, ind_inv_bdim), dim + 1), 0


def weighted_sort(x):
    return (NumpySort.apply(x, -1)[0] * torch.arange(1.0, x.shape[-1] + 1, dtype=x.dtype)).sum()


def test_numpy_sort_under_grad_vmap_and_their_compositions():
    x = torch.randn(5, dtype=torch.float64)
    xs = torch.randn(3, 5, dtype=torch.float64)
    per_example = torch.stack([reference_grad(weighted_sort, row)[0] for row in xs])
    assert_close(grad(weighted_sort)(x), reference_grad(weighted_sort, x)[0])
    assert_close(vmap(lambda t: NumpySort.apply(t, 0)[0])(xs), torch.stack([NumpySort.apply(t, 0)[0] for t in xs]))
    assert_close(vmap(grad(weighted_sort))(xs), per_example)
    assert_close(grad(lambda xs: vmap(weighted_sort)(xs).sum())(xs), per_example)
    # Second order: the backward is itself a Function with a backward.
    assert_close(torchxform.jacrev(torchxform.jacrev(weighted_sort))(x), torch.zeros(5, 5, dtype=torch.float64))


class MyCube(torch.autograd.Function):
    """The notes' generate_vmap_rule example, with a jvp added."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3, 3 * x**2

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        _, dx = output
        ctx.save_for_backward(x, dx)
        ctx.save_for_forward(x, dx)

    @staticmethod
    def backward(ctx, grad_output, grad_dx):
        x, dx = ctx.saved_tensors
        return grad_output * dx + grad_dx * 6 * x

    @staticmethod
    def jvp(ctx, x_t):
        x, dx = ctx.saved_tensors
        return dx * x_t, 6 * x * x_t


def cube(x):
    return MyCube.apply(x)[0]


def reference_jvp(fn, x, t):
    with fwAD.dual_level():
        out = fn(fwAD.make_dual(x, t))
        return fwAD.unpack_dual(out).tangent


def test_generated_vmap_rule_under_every_composition():
    x = torch.randn(4, dtype=torch.float64)
    xs = torch.randn(3, 4, dtype=torch.float64)
    loop_grads = torch.stack([reference_grad(cube, row)[0] for row in xs])
    assert_close(vmap(cube)(xs), torch.stack([cube(row) for row in xs]))
    assert_close(grad(lambda xs: vmap(cube)(xs).sum())(xs), loop_grads)
    assert_close(vmap(grad(lambda x: cube(x).sum()))(xs), loop_grads)
    assert_close(torchxform.jacrev(vmap(cube))(xs).sum((0, 1)), loop_grads)
    t = torch.randn(3, 4, dtype=torch.float64)
    loop_tangents = torch.stack([reference_jvp(cube, a, b) for a, b in zip(xs, t)])
    assert_close(jvp(vmap(cube), (xs,), (t,))[1], loop_tangents)
    assert_close(vmap(lambda a, b: jvp(cube, (a,), (b,))[1])(xs, t), loop_tangents)
    # Forward over reverse through the generated rule: the Hessian diagonal 6x.
    hess = torchxform.jacfwd(torchxform.jacrev(lambda x: cube(x).sum()))(x)
    first, leaf = reference_grad(cube, x, create_graph=True)
    expected = torch.stack([torch.autograd.grad(first[i], leaf, retain_graph=True)[0] for i in range(4)])
    assert_close(hess, expected)


def test_jvp_runs_the_functions_own_jvp():
    x = torch.randn(5, dtype=torch.float64)
    t = torch.randn(5, dtype=torch.float64)
    assert_close(jvp(cube, (x,), (t,)), (cube(x), reference_jvp(cube, x, t)))
    # An input without a tangent gets zeros, as torch.autograd.forward_ad gives it.
    two = lambda x, y: cube(x) * cube(y)  # noqa: E731
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(two(fwAD.make_dual(x, t), x.flip(0))).tangent
    assert_close(jvp(lambda x: two(x, x.flip(0).detach()), (x,), (t,))[1], expected)


class Both(MyCube):
    @staticmethod
    def vmap(info, in_dims, x):
        return MyCube.apply(x), (in_dims[0], in_dims[0])


class TwoReturnsExpected(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g

    @staticmethod
    def vmap(info, in_dims, x):
        return x


def test_vmap_errors_follow_torch_func():
    with pytest.raises(RuntimeError, match="has both generate_vmap_rule=True and an overridden vmap staticmethod"):
        vmap(lambda x: Both.apply(x)[0])(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="Expected the vmap staticmethod to have two returns"):
        vmap(lambda x: TwoReturnsExpected.apply(x))(torch.randn(2, 3))


class OnceDifferentiableExp(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.exp()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (result,) = ctx.saved_tensors
        return grad_output * result


def test_once_differentiable_first_order_works_second_order_raises():
    x = torch.randn(4, dtype=torch.float64)
    fn = lambda x: OnceDifferentiableExp.apply(x).sum()  # noqa: E731
    assert_close(grad(fn)(x), x.exp())
    xs = torch.randn(3, 4, dtype=torch.float64)
    assert_close(vmap(grad(fn))(xs), xs.exp())
    # A second derivative would be silently lost (the backward runs without grad mode): refused.
    with pytest.raises(RuntimeError, match="trying to differentiate twice a function that was marked with"):
        grad(lambda x: grad(fn)(x).sum())(x)


def test_a_function_under_functionalize_and_needs_input_grad():
    seen = []

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(x, y):
            return x * y

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, g):
            seen.append(ctx.needs_input_grad)
            x, y = ctx.saved_tensors
            return g * y, g * x

    x, y = torch.randn(3), torch.randn(3)
    assert_close(torchxform.functionalize(lambda x: Scale.apply(x, y))(x), x * y)
    assert_close(grad(lambda x: Scale.apply(x, y).sum())(x), y)
    assert seen[-1] == (True, False)


class NoisyScale(torch.autograd.Function):
    """Draws inside its forward: under the generated vmap rule the draws run
    in a vmap started below the user's vmap level (see NOTE [Ceiling])."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        noise = torch.rand(())
        return x * (1 + noise), noise

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g, _):
        (noise,) = ctx.saved_tensors
        return g * (1 + noise)


def test_generated_vmap_rule_with_random_ops_under_grad():
    xs = torch.randn(4, 3)

    def total(xs):
        out, noise = vmap(lambda x: NoisyScale.apply(x), randomness="different")(xs)
        return out.sum(), noise

    gradient, noise = grad(total, has_aux=True)(xs)
    assert noise.unique().numel() == 4  # one draw per example
    assert_close(gradient, (1 + noise)[:, None].expand(4, 3))
    with pytest.raises(RuntimeError, match="randomness error mode"):
        vmap(lambda x: NoisyScale.apply(x))(xs)
