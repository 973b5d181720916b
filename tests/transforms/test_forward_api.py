"""jvp, linearize, jacrev, jacfwd and hessian: torch.func's contract and
every composition, against torch.autograd.forward_ad /
torch.autograd.functional references."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.functional import hessian as ref_hessian
from torch.autograd.functional import hvp as ref_hvp
from torch.autograd.functional import jacobian as ref_jacobian
from torch.autograd.functional import vhp as ref_vhp

from torchxform import grad, hessian, jacfwd, jacrev, jvp, linearize, vjp, vmap
from tests.harness import assert_close, no_fallback

D = torch.float64


def randn(*shape):
    return torch.randn(*shape, dtype=D)


def forward_ad(f, primals, tangents):
    with fwAD.dual_level():
        out = f(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        flat = out if isinstance(out, tuple) else (out,)
        unpacked = [fwAD.unpack_dual(o) for o in flat]
        primal = tuple(u.primal for u in unpacked)
        tangent = tuple(u.tangent if u.tangent is not None else torch.zeros_like(u.primal) for u in unpacked)
    return (primal, tangent) if isinstance(out, tuple) else (primal[0], tangent[0])


# -- jvp ---------------------------------------------------------------------


def test_jvp_matches_forward_ad_with_several_inputs_and_outputs():
    x, y = randn(3), randn(3)
    tx, ty = randn(3), randn(3)

    def f(x, y):
        return (x * y).sin(), (x.exp() * y).sum()

    assert_close(jvp(f, (x, y), (tx, ty)), forward_ad(f, (x, y), (tx, ty)))


def test_jvp_pytree_primals_and_outputs_and_aux():
    p = {"w": randn(3, 2), "b": [randn(2)]}
    t = {"w": randn(3, 2), "b": [randn(2)]}
    x = randn(4, 3)

    def f(p):
        out = x @ p["w"] + p["b"][0]
        return {"out": out.tanh(), "norm": out.norm()}, out.detach()

    out, tangent, aux = jvp(f, (p,), (t,), has_aux=True)
    assert_close(aux, x @ p["w"] + p["b"][0])
    with fwAD.dual_level():
        w, b = fwAD.make_dual(p["w"], t["w"]), fwAD.make_dual(p["b"][0], t["b"][0])
        o = x @ w + b
        expected = {"out": fwAD.unpack_dual(o.tanh()).tangent, "norm": fwAD.unpack_dual(o.norm()).tangent}
    assert set(tangent) == {"out", "norm"}
    assert_close(tangent, expected)
    assert type(out["out"]) is torch.Tensor and type(tangent["norm"]) is torch.Tensor


def test_jvp_output_not_depending_on_input_has_zero_tangent():
    out, tangent = jvp(lambda x: torch.ones(2, dtype=D) * 3, (randn(3),), (randn(3),))
    assert_close(tangent, torch.zeros(2, dtype=D))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: jvp(torch.sin, [randn(3)], (randn(3),)), "Expected primals to be a tuple"),
        (lambda: jvp(torch.sin, (randn(3),), [randn(3)]), "Expected tangents to be a tuple"),
        (lambda: jvp(torch.add, (randn(3), randn(3)), (randn(3),)), "same python structure"),
        (lambda: jvp(torch.sin, (randn(3),), (randn(4),)), "same shape"),
        (lambda: jvp(torch.sin, (randn(3),), (torch.randn(3),)), "same dtype"),
        (lambda: jvp(lambda x: 3, (randn(3),), (randn(3),)), "return only tensors"),
        (lambda: jvp(torch.sin, (randn(3),), (randn(3),), has_aux=True), "should be a tuple"),
        (lambda: jvp(torch.sin, (3,), (randn(3),)), "only contain Tensors"),
        (lambda: jvp(torch.sin, (randn(3),), (randn(3),), strict=True), "strict=True"),
    ],
    ids=["list_primals", "list_tangents", "structure", "shape", "dtype", "non_tensor_out", "aux", "non_tensor_in", "strict"],
)
def test_jvp_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_no_tangent_no_work():
    seen = {}

    def f(x, y):
        c = y * 2  # y has no tangent: neither has c
        seen["c_tangent"] = c._tangent
        return x * c

    jvp(lambda x: f(x, randn(3)), (randn(3),), (randn(3),))
    assert seen["c_tangent"] is None


def test_jvp_inplace_and_views_match_forward_ad():
    def f(x, y):
        z = x.clone()
        z[0] = y.sum()
        v = z[1:]
        v.mul_(y[:2])
        out = torch.zeros(4, dtype=D)
        out[:3] = z * 2
        return out + z.sum()

    x, y, tx, ty = randn(3), randn(3), randn(3), randn(3)
    assert_close(jvp(f, (x, y), (tx, ty)), forward_ad(f, (x, y), (tx, ty)))


def test_nested_jvp_no_perturbation_confusion():
    # d/dx [x * d/dy (x * y)] = 2x; the inner jvp's closure over x must not
    # mix up the two perturbations.
    x = randn(3)

    def inner(x):
        return jvp(lambda y: x * y, (x,), (torch.ones_like(x),))[1]

    _, t = jvp(lambda x: x * inner(x), (x,), (torch.ones_like(x),))
    assert_close(t, 2 * x)


# -- linearize ------------------------------------------------------------------


def test_linearize_matches_jvp_and_reuses_the_primal_computation():
    x = randn(4, 4)
    primal_ops = []

    def f(x):
        primal_ops.append(1)
        return (x @ x).sin() * x.exp()

    out, jvp_fn = linearize(f, x)
    assert_close(out, f(x))
    calls_after_setup = len(primal_ops)
    for _ in range(3):
        t = randn(4, 4)
        assert_close(jvp_fn(t), jvp(f, (x,), (t,))[1])
    assert len(primal_ops) == calls_after_setup + 3  # only the reference jvp calls ran f
    with pytest.raises(RuntimeError, match="doesn't match the shape"):
        jvp_fn(randn(3))


# -- Jacobians -------------------------------------------------------------------


def f_two(x, y):
    return (x.sin()[:, None] * y.exp()).tanh()


@pytest.mark.parametrize("jac", [jacrev, jacfwd], ids=["jacrev", "jacfwd"])
@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1, 0)], ids=str)
def test_jacobians_argnums(jac, argnums):
    x, y = randn(4), randn(3)
    expected = ref_jacobian(f_two, (x, y))
    got = jac(f_two, argnums=argnums)(x, y)
    if isinstance(argnums, int):
        assert_close(got, expected[argnums])
    else:
        assert_close(got, tuple(expected[i] for i in argnums))


@pytest.mark.parametrize("chunk_size", [1, 2, 5, None])
@pytest.mark.parametrize("preallocate", [False, True])
def test_jacrev_chunk_size(chunk_size, preallocate):
    x, y = randn(4), randn(3)
    got = jacrev(f_two, argnums=(0, 1), chunk_size=chunk_size, _preallocate_and_copy=preallocate)(x, y)
    assert_close(got, ref_jacobian(f_two, (x, y)))


def test_jacobians_pytree_outputs_and_aux():
    x = randn(3)

    def f(x):
        return {"a": x.sin(), "b": (x * x).sum()}, x.cos()

    for jac in (jacrev, jacfwd):
        got, aux = jac(f, has_aux=True)(x)
        assert_close(aux, x.cos())
        assert_close(got["a"], ref_jacobian(lambda x: x.sin(), x))
        assert_close(got["b"], ref_jacobian(lambda x: (x * x).sum(), x))


def test_jacobians_dict_input():
    params = {"w": randn(2, 3), "b": randn(2)}
    x = randn(3)

    def f(p):
        return (p["w"] @ x + p["b"]).tanh()

    for jac in (jacrev, jacfwd):
        got = jac(f)(params)
        expected = ref_jacobian(lambda w, b: f({"w": w, "b": b}), (params["w"], params["b"]))
        assert_close(got, {"w": expected[0], "b": expected[1]})


def test_jacobian_errors():
    with pytest.raises(ValueError, match="`chunk_size` should be greater than 0"):
        jacrev(torch.sin, chunk_size=0)
    with pytest.raises(RuntimeError, match="Expected all inputs to be real"):
        jacrev(torch.sin)(torch.randn(3, dtype=torch.complex128))
    with pytest.raises(RuntimeError, match="Expected all outputs to be real"):
        jacfwd(lambda x: x * 1j)(randn(3))


def test_hessian_and_argnums():
    x, y = randn(4), randn(4)

    def f(x, y):
        return (x.sin() * y.exp()).sum() + (x * x * y).sum()

    assert_close(hessian(f)(x, y), ref_hessian(lambda x: f(x, y), x))
    full = hessian(f, argnums=(0, 1))(x, y)
    expected = ref_hessian(f, (x, y))
    assert_close(full, expected)
    assert_close(jacrev(jacrev(lambda x: f(x, y)))(x), expected[0][0])
    assert_close(jacfwd(jacfwd(lambda x: f(x, y)))(x), expected[0][0])


def test_hvp_and_vhp():
    x, v = randn(5), randn(5)
    f = lambda x: (x.sin() * x.cumsum(0)).sum()  # noqa: E731
    hvp_jvp = jvp(grad(f), (x,), (v,))[1]  # forward over reverse
    vhp_vjp = vjp(grad(f), x)[1](v)[0]  # reverse over reverse
    assert_close(hvp_jvp, ref_hvp(f, x, v)[1])
    assert_close(vhp_vjp, ref_vhp(f, x, v)[1])


def test_batched_jacobians():
    xs = randn(6, 3)
    f = lambda x: x.sin() * x.sum()  # noqa: E731
    expected = torch.stack([ref_jacobian(f, x) for x in xs])
    with no_fallback():
        assert_close(vmap(jacrev(f))(xs), expected)
        assert_close(vmap(jacfwd(f))(xs), expected)


def test_vmap_jvp_and_jvp_vmap():
    xs, ts = randn(5, 3), randn(5, 3)
    f = lambda x: x.exp() * x.sum()  # noqa: E731
    expected = torch.stack([forward_ad(f, (x,), (t,))[1] for x, t in zip(xs, ts)])
    with no_fallback():
        assert_close(vmap(lambda x, t: jvp(f, (x,), (t,))[1])(xs, ts), expected)
        assert_close(jvp(vmap(f), (xs,), (ts,))[1], expected)


def test_vjp_over_jvp():
    x, t, ct = randn(3), randn(3), randn(3)
    f = lambda x: x.sin() * x.exp()  # noqa: E731

    def jvp_out(x):
        return jvp(f, (x,), (t,))[1]

    (got,) = vjp(jvp_out, x)[1](ct)
    xr = x.clone().requires_grad_()
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(f(fwAD.make_dual(xr, t))).tangent
    (expected,) = torch.autograd.grad(tangent, xr, ct)
    assert_close(got, expected)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def _functional(model):
    names = [n for n, _ in model.named_parameters()]

    def call(params, x):
        saved = dict(model.named_parameters())
        try:
            for n, p in zip(names, params):
                mod, leaf = model, n
                *path, leaf = n.split(".")
                for part in path:
                    mod = getattr(mod, part)
                mod._parameters[leaf] = p
            return model(x)
        finally:
            for n in names:
                *path, leaf = n.split(".")
                mod = model
                for part in path:
                    mod = getattr(mod, part)
                mod._parameters[leaf] = saved[n]

    return call, [p.detach() for p in model.parameters()]


def test_hessian_of_a_module_loss():
    model = _mlp()
    call, params = _functional(model)
    x, y = randn(4, 3), randn(4, 2)

    def loss(w0, b0, w1, b1):
        return F.mse_loss(call([w0, b0, w1, b1], x), y)

    got = hessian(loss, argnums=(0, 3))(*params)
    expected = ref_hessian(loss, tuple(params))
    assert_close(got[0][0], expected[0][0])
    assert_close(got[0][1], expected[0][3])
    assert_close(got[1][1], expected[3][3])


def test_empirical_ntk_two_ways():
    model = _mlp()
    call, params = _functional(model)
    x1, x2 = randn(5, 3), randn(4, 3)

    # Reference: per-example Jacobians from torch.autograd, contracted.
    def jac_rows(x):
        rows = []
        for example in x:
            jac = ref_jacobian(lambda *p: call(list(p), example.unsqueeze(0)).squeeze(0), tuple(params))
            rows.append(torch.cat([j.flatten(1) for j in jac], 1))  # [out, n_params]
        return torch.stack(rows)  # [N, out, n_params]

    expected = torch.einsum("aip,bjp->abij", jac_rows(x1), jac_rows(x2))

    # 1. Jacobian contraction: vmap over jacrev.
    def single(params, x):
        return call(params, x.unsqueeze(0)).squeeze(0)

    j1 = vmap(jacrev(single), in_dims=(None, 0))(params, x1)
    j2 = vmap(jacrev(single), in_dims=(None, 0))(params, x2)
    ntk_jac = sum(torch.einsum("aij...,bkj...->abik", a.flatten(2), b.flatten(2)) for a, b in zip(j1, j2))
    assert_close(ntk_jac, expected)

    # 2. vmap over jvp/vjp: NTK = J1 J2^T, each column via a jvp of a vjp.
    def ntk_column(x1_single, x2_single):
        _, pull = vjp(lambda p: single(p, x2_single), params)

        def jtj(v):  # J(x1) J(x2)^T v
            (cotangent_params,) = pull(v)
            return jvp(lambda p: single(p, x1_single), (params,), (cotangent_params,))[1]

        return vmap(jtj)(torch.eye(2, dtype=D)).T  # [out1, out2]

    ntk_products = vmap(vmap(ntk_column, in_dims=(None, 0)), in_dims=(0, None))(x1, x2)
    assert_close(ntk_products, expected)


# -- tangent layout and writes into fresh tensors ----------------------------

LAYOUT_SENSITIVE = {
    "permute_reshape": lambda x: x.permute(0, 2, 3, 1).reshape(2, -1),
    "permute_view": lambda x: x.permute(0, 2, 3, 1).view(2, -1),
    "as_strided": lambda x: x.as_strided((5,), (3,)),
    "as_strided_of_result": lambda x: (x * 2).as_strided((5,), (3,), 1),
}


@pytest.mark.parametrize("name", LAYOUT_SENSITIVE)
def test_tangents_take_the_primal_layout(name):
    # A channels_last primal with a contiguous tangent: view ops read strides,
    # so the tangent must be laid out as the primal (see NOTE [Tangent layout]).
    f = LAYOUT_SENSITIVE[name]
    x = randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    tangents = randn(3, 2, 3, 4, 4)
    assert_close(jvp(f, (x,), (tangents[0],))[1], forward_ad(f, (x,), (tangents[0],))[1], msg=name)
    batched = vmap(lambda t: jvp(f, (x,), (t,))[1])(tangents)
    assert_close(batched, torch.stack([forward_ad(f, (x,), (t,))[1] for t in tangents]), msg=name)


def test_vmap_over_jvp_writing_into_a_fresh_tensor():
    # The written value's tangent is batched, the fresh tensor has none yet:
    # its tangent must be made able to hold the batched one.
    def f(x):
        y = torch.zeros(5, dtype=x.dtype)
        y[1:4] = x
        return y * 3

    x, tangents = randn(3), randn(4, 3)
    got = vmap(lambda t: jvp(f, (x,), (t,))[1])(tangents)
    assert_close(got, torch.stack([forward_ad(f, (x,), (t,))[1] for t in tangents]))


def test_vmap_over_vjp_through_a_view_of_a_changed_base():
    # The view's node is refreshed from its base's: its cotangent is written
    # into zeros of the base's shape, under vmap a batched write.
    def f(x):
        y = x.clone()
        view = y[1:3]
        y.mul_(2)
        return view.sin()

    x, cotangents = randn(4), randn(5, 2)
    got = vmap(lambda c: vjp(f, x)[1](c)[0])(cotangents)
    leaf = x.clone().requires_grad_()
    out = f(leaf)
    expected = torch.stack([torch.autograd.grad(out, leaf, c, retain_graph=True)[0] for c in cotangents])
    assert_close(got, expected)
