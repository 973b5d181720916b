"""One function per check: ``check(ctx, backend, tol)``.

Each check runs one sample group ``ctx.group`` (see samples.py and
runner.SampleContext) through the backend's
transforms and compares against stock PyTorch only: a Python loop over the
batch for vmap, ``torch.autograd.grad`` for reverse mode,
``torch.autograd.forward_ad`` for forward mode.  It raises ``Mismatch`` for
wrong numbers, ``NotCheckable`` when the sample cannot be checked (then the
reason says why), and lets every other exception of the backend through.
A reference that raises makes the sample not checkable.
"""

from __future__ import annotations

import itertools

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._pytree import tree_leaves

from tests.harness import loop_reference
from tests.opinfo.samples import diff_problem, has_sparse, randomness, vmap_problem

BATCH = 3  # examples per vmap batch (draws 0..2); vmap-of-vmap uses 2 x 2 (draws 0..3)
SEED = 1234  # seeds random ops in derivative checks


class Mismatch(AssertionError):
    """The backend's numbers (or output structure) differ from the reference."""


class NotCheckable(Exception):
    """This sample cannot be checked; the message says why."""


# --------------------------------------------------------------------------
# Comparison and references
# --------------------------------------------------------------------------


def compare(actual, expected, what: str, tol: dict) -> None:
    """Leaves of both pytrees agree: tensors in dtype, shape and value (NaN
    equal to NaN), everything else exactly.  Containers are not compared
    (a namedtuple equals a tuple).  ``tol`` is assert_close's rtol/atol, or
    ``{"metadata_only": True}`` for ops whose values are undefined."""
    metadata_only = tol.get("metadata_only", False)
    tol = {k: v for k, v in tol.items() if k != "metadata_only"}
    flat_a, flat_e = tree_leaves(actual), tree_leaves(expected)
    if len(flat_a) != len(flat_e):
        raise Mismatch(f"{what}: {len(flat_a)} outputs, expected {len(flat_e)}")
    for i, (a, e) in enumerate(zip(flat_a, flat_e)):
        if isinstance(e, torch.Tensor):
            if not isinstance(a, torch.Tensor):
                raise Mismatch(f"{what}[{i}]: got {type(a).__name__}, expected a Tensor")
            if type(a) is not torch.Tensor and type(e) is torch.Tensor:
                raise Mismatch(f"{what}[{i}]: leaked wrapper {type(a).__name__}")
            a, e = a.detach(), e.detach()
            if metadata_only:
                a, e = torch.zeros_like(a), torch.zeros_like(e)
            if a.dtype == e.dtype == torch.complex32:  # few kernels take complex32
                a, e = a.to(torch.complex64), e.to(torch.complex64)
            try:
                torch.testing.assert_close(a, e, equal_nan=True, **tol)
            except AssertionError as err:
                raise Mismatch(f"{what}[{i}]: {err}") from None
        elif a != e and not (a != a and e != e):
            raise Mismatch(f"{what}[{i}]: {a!r} != {e!r}")


def _reference(compute, *args, **kwargs):
    """Run a stock-PyTorch reference; if PyTorch itself cannot compute it,
    the sample is not checkable."""
    try:
        return compute(*args, **kwargs)
    except Exception as err:
        raise NotCheckable(f"reference raised {type(err).__name__}: {str(err).splitlines()[0][:120]}") from err


def _zeros_for_none(values, likes):
    return tuple(torch.zeros_like(like) if v is None else v for v, like in zip(values, likes))


def autograd_vjp(outs, inputs, cotangents, *, create_graph=False):
    """<outs, cotangents> differentiated w.r.t. inputs by torch.autograd.grad,
    zeros where an input is unused."""
    pairs = [(o, c) for o, c in zip(outs, cotangents) if o.requires_grad]
    if not pairs:
        return tuple(torch.zeros_like(x) for x in inputs)
    grads = torch.autograd.grad(
        [o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True, create_graph=create_graph
    )
    return _zeros_for_none(grads, inputs)


def reference_vjp(fn, primals, cotangents):
    leaves = [p.detach().requires_grad_() for p in primals]
    outs = fn(*leaves)
    return tuple(o.detach() for o in outs), tuple(g.detach() for g in autograd_vjp(outs, leaves, cotangents))


def reference_jvp(fn, primals, tangents):
    with fwAD.dual_level():
        outs = fn(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        unpacked = [fwAD.unpack_dual(o) for o in outs]
        primal_out = tuple(u.primal.detach().clone() for u in unpacked)
        tangent_out = _zeros_for_none([u.tangent for u in unpacked], primal_out)
        return primal_out, tuple(t.detach().clone() for t in tangent_out)


def loop(fn, batched_args, in_dims):
    """The vmap reference: fn on each example, results stacked at dim 0.
    Each example is a fresh contiguous tensor, as a user's would be (a view
    into the batch would change what storage-reading ops like as_strided
    see)."""

    def per_example(*args):
        return fn(*[a.clone(memory_format=torch.contiguous_format) if isinstance(a, torch.Tensor) else a for a in args])

    return loop_reference(per_example, batched_args, in_dims)


def _randn_like(tensors):
    return tuple(torch.randn_like(t) for t in tensors)


def _stack_at(tensors, dim):
    return torch.stack(tensors, dim=dim if dim >= 0 else dim + tensors[0].dim() + 1)


# --------------------------------------------------------------------------
# Batch-dim choices
# --------------------------------------------------------------------------


def dim_combos(k: int) -> list:
    """Batch dims for k tensor arguments, never all None: every combination
    of (0, -1, None) for up to three tensors; beyond, all 0, all -1, each
    tensor batched alone, and an alternating mix."""
    if k <= 3:
        return [c for c in itertools.product((0, -1, None), repeat=k) if any(d is not None for d in c)]
    combos = [(0,) * k, (-1,) * k]
    combos += [tuple(0 if j == i else None for j in range(k)) for i in range(k)]
    combos.append(tuple((0, None, -1)[j % 3] for j in range(k)))
    return combos


def _batch(per_draw, combo, draws):
    """Arguments for vmap: tensor i stacked over ``draws`` at combo[i], or
    draw 0's tensor where combo[i] is None."""
    return [
        per_draw[0][i] if d is None else _stack_at([per_draw[b][i] for b in draws], d) for i, d in enumerate(combo)
    ]


def _vmap_against_loop(backend, fn, per_draw, combos, tol, what):
    """vmap(fn) over each combo against the loop; returns how many combos
    had a computable reference."""
    checked = 0
    for combo in combos:
        args = _batch(per_draw, combo, range(BATCH))
        try:
            expected = loop(fn, args, combo)
        except Exception:
            continue  # e.g. a view the op cannot take of a batch slice: PyTorch fails too
        actual = backend.vmap(fn, in_dims=combo)(*args)
        compare(actual, expected, f"{what} in_dims={combo}", tol)
        checked += 1
    return checked


def _require_deterministic(ctx):
    if has_sparse(ctx.group[0]):
        raise NotCheckable("sparse layout")
    kind = randomness(ctx.opid, ctx.dtype, ctx.n, ctx.index)
    if kind.startswith("reference raised"):
        raise NotCheckable(kind)
    if kind != "deterministic":
        raise NotCheckable(f"{kind} op: no loop reference for vmap's randomness")


def _diff_seed(ctx):
    """None for deterministic samples; a seed for random ones (their
    derivative checks reseed before each call)."""
    if has_sparse(ctx.group[0]):
        raise NotCheckable("sparse layout")
    kind = randomness(ctx.opid, ctx.dtype, ctx.n, ctx.index)
    if kind.startswith("reference raised"):
        raise NotCheckable(kind)
    if kind == "nondeterministic":
        raise NotCheckable("nondeterministic op: equal seeds give different results")
    return SEED if kind == "random" else None


# --------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------


def check_vmap(ctx, backend, tol):
    """vmap against a loop for every batch-dim choice, plus vmap-of-vmap."""
    _require_deterministic(ctx)
    problem = vmap_problem(ctx.op, ctx.group)
    k = len(problem.tensors[0])
    if k == 0:
        raise NotCheckable("no tensor arguments")
    with torch.no_grad():
        out = _reference(problem.fn, *problem.tensors[0])
    if not all(isinstance(o, torch.Tensor) for o in tree_leaves(out)):
        raise NotCheckable("non-tensor output")
    if any(o.layout != torch.strided for o in tree_leaves(out)):
        raise NotCheckable("sparse layout")
    combos = dim_combos(k)
    if not _vmap_against_loop(backend, problem.fn, problem.tensors, combos, tol, "vmap"):
        raise NotCheckable("reference loop raised for every batch-dim choice")

    # vmap of vmap over a 2 x 2 grid of draws, for two of the combinations.
    for combo in {combos[0], combos[-1]}:
        args = [
            problem.tensors[0][i]
            if d is None
            else _stack_at(
                [_stack_at([problem.tensors[2 * r + c][i] for c in range(2)], d) for r in range(2)], d
            )
            for i, d in enumerate(combo)
        ]
        try:
            expected = loop(lambda *xs: loop(problem.fn, xs, combo), args, combo)
        except Exception:
            continue
        actual = backend.vmap(backend.vmap(problem.fn, in_dims=combo), in_dims=combo)(*args)
        compare(actual, expected, f"vmap(vmap) in_dims={combo}", tol)


def _diff_setup(ctx, *, noncontiguous=False):
    seed = _diff_seed(ctx)
    problem = diff_problem(ctx.op, ctx.group, seed=seed, noncontiguous=noncontiguous)
    primals = problem.primals[0]
    if not primals:
        raise NotCheckable("no differentiable inputs")
    with torch.no_grad():
        outs = _reference(problem.fn, *primals)
    if not outs:
        raise NotCheckable("no differentiable outputs")
    if any(o.layout != torch.strided for o in outs):
        raise NotCheckable("sparse layout")
    return problem, primals, outs, seed


def _inner(outs, cotangents):
    """Real inner product <outs, cotangents>: a loss whose gradient is the
    vjp with these cotangents (complex as pairs of reals, as autograd)."""
    total = 0
    for o, c in zip(outs, cotangents):
        if o.is_complex():
            total = total + (o.real * c.real).sum() + (o.imag * c.imag).sum()
        else:
            total = total + (o * c).sum()
    return total


def check_vjp(ctx, backend, tol):
    """vjp and grad against torch.autograd.grad, contiguous and noncontiguous."""
    for noncontiguous in (False, True):
        problem, primals, outs, _ = _diff_setup(ctx, noncontiguous=noncontiguous)
        layout = "noncontiguous" if noncontiguous else "contiguous"
        cotangents = _randn_like(outs)
        ref_out, ref_grads = _reference(reference_vjp, problem.fn, primals, cotangents)
        out, vjp_fn = backend.vjp(problem.fn, *primals)
        compare(out, ref_out, f"vjp output ({layout})", tol)
        compare(vjp_fn(cotangents), ref_grads, f"vjp ({layout})", tol)
        argnums = tuple(range(len(primals)))
        grads = backend.grad(lambda *p: _inner(problem.fn(*p), cotangents), argnums=argnums)(*primals)
        compare(grads, ref_grads, f"grad ({layout})", tol)


def check_jvp(ctx, backend, tol):
    """jvp against torch.autograd.forward_ad."""
    problem, primals, _, _ = _diff_setup(ctx)
    tangents = _randn_like(primals)
    expected = _reference(reference_jvp, problem.fn, primals, tangents)
    actual = backend.jvp(problem.fn, tuple(primals), tangents)
    compare(actual, expected, "jvp (output, tangent)", tol)


def check_vmapvjp(ctx, backend, tol):
    """vmap over vjp: batched cotangents alone, then primals and cotangents
    all batched, against a loop of torch.autograd.grad."""
    _require_deterministic(ctx)
    problem, primals, outs, _ = _diff_setup(ctx)
    n = len(primals)
    per_draw = [list(p) + list(_randn_like(outs)) for p in problem.primals]

    def pullback(*args):
        _, vjp_fn = backend.vjp(problem.fn, *args[:n])
        return vjp_fn(tuple(args[n:]))

    def reference(*args):
        return reference_vjp(problem.fn, args[:n], args[n:])[1]

    combos = [(None,) * n + (0,) * len(outs), (0,) * (n + len(outs))]
    for combo in combos:
        args = _batch(per_draw, combo, range(BATCH))
        expected = _reference(loop, reference, args, combo)
        actual = backend.vmap(pullback, in_dims=combo)(*args)
        compare(actual, expected, f"vmap(vjp) in_dims={combo}", tol)


def check_vjpvjp(ctx, backend, tol):
    """vjp of (primals, cotangents) -> vjp, against torch.autograd.grad with
    create_graph=True."""
    problem, primals, outs, _ = _diff_setup(ctx)
    n = len(primals)
    cotangents = _randn_like(outs)

    def pullback(*args):
        _, vjp_fn = backend.vjp(problem.fn, *args[:n])
        return vjp_fn(tuple(args[n:]))

    def reference(cotangents2):
        leaves = [x.detach().requires_grad_() for x in (*primals, *cotangents)]
        first = autograd_vjp(problem.fn(*leaves[:n]), leaves[:n], leaves[n:], create_graph=True)
        second = autograd_vjp(first, leaves, cotangents2)
        return tuple(g.detach() for g in first), tuple(g.detach() for g in second)

    cotangents2 = _randn_like(primals)  # the first-order vjp has the primals' shapes
    expected_first, expected_second = _reference(reference, cotangents2)
    out, vjp_fn = backend.vjp(pullback, *primals, *cotangents)
    compare(out, expected_first, "vjp (first order)", tol)
    compare(vjp_fn(cotangents2), expected_second, "vjp of vjp", tol)


def check_jvpvjp(ctx, backend, tol):
    """Forward over reverse: jvp of (primals, cotangents) -> vjp, against
    torch.autograd.grad run on forward_ad dual tensors."""
    problem, primals, outs, _ = _diff_setup(ctx)
    n = len(primals)
    cotangents = _randn_like(outs)
    primal_tangents = _randn_like(primals)
    cotangent_tangents = _randn_like(cotangents)

    def pullback(*args):
        _, vjp_fn = backend.vjp(problem.fn, *args[:n])
        return vjp_fn(tuple(args[n:]))

    def reference():
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p.detach().requires_grad_(), t) for p, t in zip(primals, primal_tangents)]
            outs = problem.fn(*duals)
            dual_cts = [fwAD.make_dual(c, t) for c, t in zip(cotangents, cotangent_tangents)]
            grads = autograd_vjp(outs, duals, dual_cts, create_graph=True)
            unpacked = [fwAD.unpack_dual(g) for g in grads]
            primal_out = tuple(u.primal.detach().clone() for u in unpacked)
            tangent_out = _zeros_for_none([u.tangent for u in unpacked], primal_out)
            return primal_out, tuple(t.detach().clone() for t in tangent_out)

    expected = _reference(reference)
    actual = backend.jvp(pullback, (*primals, *cotangents), (*primal_tangents, *cotangent_tangents))
    compare(actual, expected, "jvp of vjp (output, tangent)", tol)


def check_vmapjvp(ctx, backend, tol):
    """vmap over jvp: batched tangents alone, then primals and tangents all
    batched, against a loop of torch.autograd.forward_ad."""
    _require_deterministic(ctx)
    problem, primals, _, _ = _diff_setup(ctx)
    n = len(primals)
    per_draw = [list(p) + list(_randn_like(p)) for p in problem.primals]

    def pushforward(*args):
        return backend.jvp(problem.fn, tuple(args[:n]), tuple(args[n:]))

    def reference(*args):
        return reference_jvp(problem.fn, args[:n], args[n:])

    for combo in [(None,) * n + (0,) * n, (0,) * (2 * n)]:
        args = _batch(per_draw, combo, range(BATCH))
        expected = _reference(loop, reference, args, combo)
        actual = backend.vmap(pushforward, in_dims=combo)(*args)
        compare(actual, expected, f"vmap(jvp) in_dims={combo}", tol)


CHECKS = {
    "vmap": check_vmap,
    "vjp": check_vjp,
    "jvp": check_jvp,
    "vmapvjp": check_vmapvjp,
    "vjpvjp": check_vjpvjp,
    "jvpvjp": check_jvpvjp,
    "vmapjvp": check_vmapjvp,
}
