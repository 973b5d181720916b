"""functionalize: outputs and input mutations equal eager's (the same
function run without torchxform on clones); make_fx graphs hold no in-place
ops (and no view ops with remove='mutations_and_views'); composition with
vmap (against a loop), grad/vjp (against torch.autograd.grad) and jvp
(against torch.autograd.forward_ad)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.fx.experimental.proxy_tensor import make_fx

from tests.harness import assert_close
from torchxform import functionalize, functional_call, grad, jvp, vmap
from torchxform._core.schema import is_view_op


def views_of_views(x):
    y = x.clone()
    y.view(-1)[2:5].mul_(3)  # a view of a view
    y.t()[1].add_(1)
    y.diagonal().sub_(0.5)
    return y * 2


def mutate_input_through_views(x):
    x[0].add_(1)  # mutation of an input, through a view
    x.t()[1:].mul_(2)
    return x.sum(0)


def setitem(x):
    y = torch.zeros(4, 3)
    y[1] = x[0]
    y[torch.tensor([0, 2])] = x[1:3] * 2  # x[idx] = v with a tensor index
    y[y > 1] = 0.0  # boolean mask write
    return y


def split_unbind_unfold(x):
    y = x.clone()
    a, b = y.split(2, dim=1)
    b.mul_(10)
    first, *_ = y.unbind(0)
    first.zero_()
    y.unfold(1, 2, 2)[1, 0].fill_(7)  # a view without a scatter op of its own
    return y


def out_variants(x):
    out = torch.empty(x.shape)
    torch.add(x, 1, out=out)
    torch.mul(out, 2, out=out[0:1].squeeze(0).unsqueeze(0).expand(x.shape[0], -1).contiguous())  # a temp out
    values = torch.empty(x.shape[1])
    indices = torch.empty(x.shape[1], dtype=torch.long)
    torch.max(x, 0, out=(values, indices))
    return out, values, indices


def metadata_inplace(x):
    y = x.clone()
    y.t_()
    y.unsqueeze_(0)
    y[0, 0].add_(1)
    return y


def mutate_integer_and_copy(x):
    idx = torch.arange(x.shape[0])
    idx.add_(1).remainder_(x.shape[0])
    y = torch.empty_like(x)
    y.copy_(x[idx])
    y += 1
    return y


FUNCTIONS = [views_of_views, mutate_input_through_views, setitem, split_unbind_unfold, out_variants, metadata_inplace,
             mutate_integer_and_copy]


@pytest.mark.parametrize("remove", ["mutations", "mutations_and_views"])
@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_outputs_and_input_mutations_equal_eager(fn, remove):
    x = torch.randn(4, 3)
    expected_input = x.clone()
    expected = fn(expected_input)
    got = functionalize(fn, remove=remove)(x)
    assert_close(got, expected)
    assert_close(x, expected_input)  # the input was mutated as eager mutates it


def _call_targets(fn, *args, remove="mutations"):
    graph = make_fx(functionalize(fn, remove=remove))(*args).graph
    placeholders = {n for n in graph.nodes if n.op == "placeholder"}
    calls = [n for n in graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]
    return calls, placeholders


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_make_fx_graph_has_no_inplace_ops(fn):
    calls, placeholders = _call_targets(fn, torch.randn(4, 3))
    for node in calls:
        if node.target is torch.ops.aten.copy_.default and node.args[0] in placeholders:
            continue  # the input mutation, written back once at the end
        assert not node.target._schema.is_mutable, f"{fn.__name__}: in-place op in graph: {node.format_node()}"


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_make_fx_graph_has_no_views_with_mutations_and_views(fn):
    calls, _ = _call_targets(fn, torch.randn(4, 3), remove="mutations_and_views")
    views = [n.format_node() for n in calls if is_view_op(n.target)]
    assert not views, f"{fn.__name__}: view ops in graph: {views}"


def test_mutations_mode_keeps_views_in_the_graph():
    calls, _ = _call_targets(views_of_views, torch.randn(4, 3))
    assert any(is_view_op(n.target) for n in calls)


def test_input_written_back_once_with_copy_():
    calls, placeholders = _call_targets(mutate_input_through_views, torch.randn(4, 3))
    copies = [n for n in calls if n.target is torch.ops.aten.copy_.default]
    assert len(copies) == 1 and copies[0].args[0] in placeholders


def test_mutations_and_views_outputs_do_not_alias_inputs():
    x = torch.randn(4, 3)
    out = functionalize(lambda x: x.view(-1)[1:], remove="mutations_and_views")(x)
    assert_close(out, x.view(-1)[1:])
    assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def _loop(fn, xs):
    return torch.stack([fn(x) for x in xs])


def scalar_fn(x):
    y = x * 1
    y[0] = x[1] * x[2]
    y.diagonal().add_(2)
    y.t()[1].add_(x[0])
    return (y * y).sum()


def test_vmap_of_functionalize_against_a_loop():
    xs = torch.randn(5, 4, 3)
    expected_inputs = xs.clone()
    expected = torch.stack([views_of_views(x) for x in expected_inputs])
    assert_close(vmap(functionalize(views_of_views))(xs), expected)
    # Input mutations reach the batched input.
    expected = torch.stack([mutate_input_through_views(x) for x in expected_inputs])
    assert_close(vmap(functionalize(mutate_input_through_views))(xs), expected)
    assert_close(xs, expected_inputs)


def test_functionalize_of_vmap_against_a_loop():
    xs = torch.randn(5, 3, 3)
    assert_close(functionalize(vmap(scalar_fn))(xs), _loop(scalar_fn, xs))
    assert_close(functionalize(vmap(split_unbind_unfold), remove="mutations_and_views")(xs),
                 _loop(split_unbind_unfold, xs))


def _reference_grad(fn, x):
    leaf = x.clone().requires_grad_()
    return torch.autograd.grad(fn(leaf), leaf)[0]


def test_grad_composes_both_ways():
    x = torch.randn(3, 3, dtype=torch.float64)
    expected = _reference_grad(scalar_fn, x)
    assert_close(grad(functionalize(scalar_fn))(x), expected)
    assert_close(functionalize(grad(scalar_fn))(x), expected)
    assert_close(functionalize(grad(scalar_fn), remove="mutations_and_views")(x), expected)
    xs = torch.randn(4, 3, 3, dtype=torch.float64)
    assert_close(vmap(grad(functionalize(scalar_fn)))(xs), torch.stack([_reference_grad(scalar_fn, x) for x in xs]))


def test_jvp_composes_both_ways():
    x = torch.randn(3, 3, dtype=torch.float64)
    t = torch.randn(3, 3, dtype=torch.float64)
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(scalar_fn(fwAD.make_dual(x, t))).tangent
    assert_close(jvp(functionalize(scalar_fn), (x,), (t,))[1], expected)
    assert_close(functionalize(lambda x, t: jvp(scalar_fn, (x,), (t,))[1])(x, t), expected)


def test_outputs_are_differentiable_by_torch_autograd():
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad(functionalize(scalar_fn)(x), x)
    assert_close(got, _reference_grad(scalar_fn, x.detach()))


def test_batch_norm_running_statistics_are_written_back():
    model = torch.nn.BatchNorm1d(3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 3)
    expected = model(x)
    got_state = {k: v.clone() for k, v in state.items()}
    got = functionalize(lambda s, x: functional_call(model, s, (x,)))(got_state, x)
    assert_close(got, expected)
    assert_close(got_state, dict(model.state_dict()))
    calls, placeholders = _call_targets(lambda s, x: functional_call(model, s, (x,)), state, x)
    for node in calls:
        if not (node.target is torch.ops.aten.copy_.default and node.args[0] in placeholders):
            assert not node.target._schema.is_mutable or node.target is torch.ops.aten.native_batch_norm.default


def test_random_inplace_ops_draw_as_eager():
    def f(x):
        noise = torch.empty_like(x).uniform_()
        return x + noise.normal_() + torch.empty(3).bernoulli_(0.5)

    x = torch.randn(3)
    torch.manual_seed(0)
    expected = f(x)
    torch.manual_seed(0)
    assert_close(functionalize(f)(x), expected)


def test_bad_remove_argument():
    with pytest.raises(RuntimeError, match="Expected remove to be one of 'mutations' or 'mutations_and_views'"):
        functionalize(torch.sin, remove="views")


def test_writing_into_an_expanded_view_names_the_op():
    def f(x):
        y = x.clone().expand(2, 3)
        y.add_(1)
        return y

    with pytest.raises(RuntimeError, match="functionalize: writing into the result of aten.expand"):
        functionalize(f)(torch.randn(3))


def test_resizing_an_out_tensor_is_refused_with_the_fix():
    def f(x):
        out = torch.empty(0)
        return torch.add(x, 1, out=out)

    with pytest.raises(RuntimeError, match="resizing out= tensors is not supported under functionalize"):
        functionalize(f)(torch.randn(3))
