"""Independent references for derivative tests: torch.autograd.

Expected values always come from stock PyTorch autograd
(``torch.autograd.grad``, with ``create_graph`` for second order) on the
plain function; torchxform is only ever the thing under test.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

import torchxform
from tests.harness import assert_close, no_fallback


def _is_diff(x) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def split_args(args):
    """Positions of the differentiable tensor arguments, and a function
    rebuilding the full argument tuple from their values."""
    positions = [i for i, a in enumerate(args) if _is_diff(a)]

    def merge(diff):
        full = list(args)
        for i, d in zip(positions, diff):
            full[i] = d
        return tuple(full)

    return positions, merge


def random_like_outputs(out):
    return tree_map(lambda o: torch.randn_like(o) if _is_diff(o) else None, out)


def reference_vjp(fn, args, cotangent, create_graph=False):
    """fn's output and the gradients of <output, cotangent> with respect to
    every differentiable argument (zeros where it is not used), by
    torch.autograd."""
    positions, merge = split_args(args)
    leaves = [args[i].detach().clone().requires_grad_() for i in positions]
    out = fn(*merge(leaves))
    flat_out, _ = tree_flatten(out)
    flat_ct, _ = tree_flatten(cotangent)
    pairs = [(o, c) for o, c in zip(flat_out, flat_ct) if c is not None and o.requires_grad]
    if pairs:
        grads = torch.autograd.grad(
            [o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True, create_graph=create_graph
        )
    else:
        grads = [None] * len(leaves)
    grads = tuple(torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves))
    return out, grads, leaves


def ours_vjp(fn, args, cotangent):
    positions, merge = split_args(args)
    out, pullback = torchxform.vjp(lambda *diff: fn(*merge(diff)), *[args[i] for i in positions])
    return out, pullback(cotangent)


def check_vjp(fn: Callable, *args, cotangent=None, rtol=None, atol=None, msg: str = ""):
    """vjp(fn) against torch.autograd.grad: outputs and gradients."""
    name = msg or getattr(fn, "__name__", "fn")
    if cotangent is None:
        cotangent = _ct(fn, args)
    expected_out, expected_grads, _ = reference_vjp(fn, args, cotangent)
    actual_out, actual_grads = ours_vjp(fn, args, cotangent)
    detached = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, expected_out)
    assert_close(actual_out, detached, rtol=rtol, atol=atol, msg=f"{name}: output")
    assert_close(actual_grads, tuple(g.detach() for g in expected_grads), rtol=rtol, atol=atol, msg=f"{name}: vjp")


def _ct(fn, args):
    with torch.no_grad():
        return random_like_outputs(fn(*args))


def check_vjp_vjp(fn: Callable, *args, rtol=None, atol=None, msg: str = ""):
    """Second order: the vjp of (args, cotangent) -> vjp(fn)(cotangent),
    against torch.autograd.grad with create_graph=True."""
    name = msg or getattr(fn, "__name__", "fn")
    positions, merge = split_args(args)
    cotangent = _ct(fn, args)
    flat_ct, ct_spec = tree_flatten(cotangent)
    present = [i for i, c in enumerate(flat_ct) if c is not None]

    def rebuild_ct(values):
        full = [None] * len(flat_ct)
        for i, v in zip(present, values):
            full[i] = v
        return tree_unflatten(full, ct_spec)

    def first(*primals):
        diff, cts = primals[: len(positions)], primals[len(positions) :]
        _, pullback = torchxform.vjp(lambda *d: fn(*merge(d)), *diff)
        return pullback(rebuild_ct(cts))

    primals = [args[i] for i in positions] + [flat_ct[i] for i in present]
    out, pullback = torchxform.vjp(first, *primals)
    second_ct = tuple(torch.randn_like(o) for o in out)
    actual = pullback(second_ct)

    leaves = [p.detach().clone().requires_grad_() for p in primals]
    diff_leaves = leaves[: len(positions)]
    ref_out = fn(*merge(diff_leaves))
    pairs = [
        (o, c)
        for o, c in zip(tree_flatten(ref_out)[0], tree_flatten(rebuild_ct(leaves[len(positions) :]))[0])
        if c is not None and o.requires_grad
    ]
    first_grads = torch.autograd.grad(
        [o for o, _ in pairs], diff_leaves, [c for _, c in pairs], allow_unused=True, create_graph=True
    )
    first_grads = [torch.zeros_like(d) if g is None else g for g, d in zip(first_grads, diff_leaves)]
    graded = [(g, c) for g, c in zip(first_grads, second_ct) if g.requires_grad]
    expected = [None] * len(leaves)
    if graded:
        expected = torch.autograd.grad([g for g, _ in graded], leaves, [c for _, c in graded], allow_unused=True)
    expected = tuple(torch.zeros_like(leaf) if e is None else e for e, leaf in zip(expected, leaves))
    assert_close(actual, expected, rtol=rtol, atol=atol, msg=f"{name}: vjp of vjp")


def check_vmap_vjp(fn: Callable, *args, batch_size: int = 3, rtol=None, atol=None, msg: str = ""):
    """vmap over vjp_fn with a batch of cotangents, against a loop of
    torch.autograd.grad."""
    name = msg or getattr(fn, "__name__", "fn")
    positions, merge = split_args(args)
    with torch.no_grad():
        out = fn(*args)
    flat_out, out_spec = tree_flatten(out)
    cts = [random_like_outputs(out) for _ in range(batch_size)]
    _, pullback = torchxform.vjp(lambda *diff: fn(*merge(diff)), *[args[i] for i in positions])
    flat_cts = [tree_flatten(c)[0] for c in cts]
    stacked = tree_unflatten(
        [torch.stack([f[j] for f in flat_cts]) if flat_cts[0][j] is not None else None for j in range(len(flat_out))],
        out_spec,
    )
    actual = torchxform.vmap(pullback)(stacked)
    expected = tuple(
        torch.stack(column) for column in zip(*[tuple(g.detach() for g in reference_vjp(fn, args, c)[1]) for c in cts])
    )
    assert_close(actual, expected, rtol=rtol, atol=atol, msg=f"{name}: vmap over vjp")


def check_derivatives(fn: Callable, sample: Callable[[], Sequence], *, second_order: bool = True,
                      batched: bool = True, rtol=None, atol=None, msg: str = ""):
    """The standard table check of one op's derivative: vjp, vjp of vjp and
    vmap over vjp, each against torch.autograd, with no loop fallback."""
    args = tuple(sample())
    with no_fallback():
        check_vjp(fn, *args, rtol=rtol, atol=atol, msg=msg)
        if second_order:
            check_vjp_vjp(fn, *args, rtol=rtol, atol=atol, msg=msg)
        if batched:
            check_vmap_vjp(fn, *args, rtol=rtol, atol=atol, msg=msg)


__all__ = [
    "reference_jvp",
    "check_jvp",
    "check_vmap_jvp",
    "check_jvp_of_vjp",
    "check_forward_derivatives",
    "reference_vjp",
    "check_vjp",
    "check_vjp_vjp",
    "check_vmap_vjp",
    "check_derivatives",
    "split_args",
]


# --------------------------------------------------------------------------
# Forward mode: references from torch.autograd.forward_ad
# --------------------------------------------------------------------------


def reference_jvp(fn, args, tangents):
    """fn's output and its tangent for ``tangents`` (one per differentiable
    argument), by torch.autograd.forward_ad."""
    import torch.autograd.forward_ad as fwAD

    positions, merge = split_args(args)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(args[i], t) for i, t in zip(positions, tangents)]
        out = fn(*merge(duals))
        flat, spec = tree_flatten(out)
        primal = [fwAD.unpack_dual(o).primal if isinstance(o, torch.Tensor) else o for o in flat]
        tangent = [
            (fwAD.unpack_dual(o).tangent if fwAD.unpack_dual(o).tangent is not None else torch.zeros_like(o))
            if isinstance(o, torch.Tensor) and _is_diff(o)
            else None
            for o in flat
        ]
    return tree_unflatten(primal, spec), tree_unflatten(tangent, spec)


def _random_tangents(args):
    positions, _ = split_args(args)
    return tuple(torch.randn_like(args[i]) for i in positions)


def ours_jvp(fn, args, tangents):
    positions, merge = split_args(args)
    return torchxform.jvp(lambda *diff: fn(*merge(diff)), tuple(args[i] for i in positions), tuple(tangents))


def check_jvp(fn: Callable, *args, rtol=None, atol=None, msg: str = ""):
    """jvp(fn) against torch.autograd.forward_ad: output and tangent."""
    name = msg or getattr(fn, "__name__", "fn")
    tangents = _random_tangents(args)
    expected_out, expected_tangent = reference_jvp(fn, args, tangents)
    actual_out, actual_tangent = ours_jvp(fn, args, tangents)
    assert_close(actual_out, expected_out, rtol=rtol, atol=atol, msg=f"{name}: jvp output")
    flat_e, _ = tree_flatten(expected_tangent)
    flat_a, _ = tree_flatten(actual_tangent)
    pairs = [(a, e) for a, e in zip(flat_a, flat_e) if e is not None]
    assert_close([a for a, _ in pairs], [e for _, e in pairs], rtol=rtol, atol=atol, msg=f"{name}: jvp tangent")


def check_vmap_jvp(fn: Callable, *args, batch_size: int = 3, rtol=None, atol=None, msg: str = ""):
    """vmap over jvp with a batch of tangents, against a loop of forward_ad."""
    name = msg or getattr(fn, "__name__", "fn")
    positions, merge = split_args(args)
    batches = [_random_tangents(args) for _ in range(batch_size)]
    stacked = tuple(torch.stack(column) for column in zip(*batches))
    primals = tuple(args[i] for i in positions)
    actual = torchxform.vmap(lambda *ts: torchxform.jvp(lambda *d: fn(*merge(d)), primals, ts)[1])(*stacked)
    expected = [reference_jvp(fn, args, ts)[1] for ts in batches]
    flat_expected = [tree_flatten(e)[0] for e in expected]
    flat_actual, _ = tree_flatten(actual)
    for j, a in enumerate(flat_actual):
        column = [f[j] for f in flat_expected]
        if column[0] is None:
            continue
        assert_close(a, torch.stack(column), rtol=rtol, atol=atol, msg=f"{name}: vmap over jvp")


def check_jvp_of_vjp(fn: Callable, *args, rtol=None, atol=None, msg: str = ""):
    """Forward over reverse: the jvp of x -> vjp(fn)(x)(cotangent), a
    Hessian-vector product, against torch.autograd double backward."""
    name = msg or getattr(fn, "__name__", "fn")
    positions, merge = split_args(args)
    cotangent = _ct(fn, args)
    tangents = _random_tangents(args)
    primals = tuple(args[i] for i in positions)

    def pulled(*diff):
        return torchxform.vjp(lambda *d: fn(*merge(d)), *diff)[1](cotangent)

    _, actual = torchxform.jvp(pulled, primals, tangents)
    assert_close(tuple(actual), reference_jvp_of_vjp(fn, args, cotangent, tangents), rtol=rtol, atol=atol,
                 msg=f"{name}: jvp of vjp")


def reference_jvp_of_vjp(fn, args, cotangent, tangents):
    """Forward over reverse by torch: forward-mode AD through
    torch.autograd.grad(create_graph=True)."""
    import torch.autograd.forward_ad as fwAD

    positions, merge = split_args(args)
    with fwAD.dual_level():
        leaves = [fwAD.make_dual(args[i].detach().clone(), t).requires_grad_() for i, t in zip(positions, tangents)]
        out = fn(*merge(leaves))
        pairs = [
            (o, c) for o, c in zip(tree_flatten(out)[0], tree_flatten(cotangent)[0]) if c is not None and o.requires_grad
        ]
        grads = [None] * len(leaves)
        if pairs:
            grads = torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True,
                                        create_graph=True)
        result = []
        for g, leaf in zip(grads, leaves):
            t = fwAD.unpack_dual(g).tangent if g is not None else None
            result.append(torch.zeros_like(leaf.detach()) if t is None else t.detach())
    return tuple(result)


def check_forward_derivatives(fn: Callable, sample: Callable[[], Sequence], *, over_reverse: bool = True,
                              batched: bool = True, rtol=None, atol=None, msg: str = ""):
    """The standard table check of one op's forward derivative: jvp, vmap
    over jvp and jvp over vjp, each against torch.autograd."""
    args = tuple(sample())
    with no_fallback():
        check_jvp(fn, *args, rtol=rtol, atol=atol, msg=msg)
        if batched:
            check_vmap_jvp(fn, *args, rtol=rtol, atol=atol, msg=msg)
        if over_reverse:
            check_jvp_of_vjp(fn, *args, rtol=rtol, atol=atol, msg=msg)
