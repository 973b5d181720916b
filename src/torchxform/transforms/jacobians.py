"""Jacobians and Hessians from the pieces: jacrev (vmap over vjp), jacfwd
(vmap over jvp), hessian (jacfwd over jacrev) and linearize (the jvp traced
once, replayed per tangent)."""

from __future__ import annotations

import functools
import itertools
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils._pytree import tree_map

from .._core.pytree import flatten as tree_flatten
from .._core.pytree import unflatten as tree_unflatten
from .forward import jvp_with_argnums
from .reverse import _check_argnums, vjp_with_argnums
from .vmap import vmap

Tensor = torch.Tensor


def _error_if_complex(api: str, values, is_input: bool, flat: bool = False) -> None:
    """``flat``: ``values`` is already a flat list of leaves."""
    for i, value in enumerate(values if flat else tree_flatten(values)[0]):
        if isinstance(value, Tensor) and value.dtype.is_complex:
            which = "inputs" if is_input else "outputs"
            raise RuntimeError(
                f"{api}: Expected all {which} to be real but received complex tensor at flattened input idx: {i}"
            )


def _slice_argnums(args, argnums):
    positions = _check_argnums(argnums, len(args))
    if isinstance(positions, int):
        return (args[positions],)
    return tuple(args[i] for i in positions)


def _chunk_sizes(total: int, chunk_size: int | None) -> list[int]:
    if chunk_size is None or chunk_size >= total:
        return [total]
    sizes = [chunk_size] * (total // chunk_size)
    if total % chunk_size:
        sizes.append(total % chunk_size)
    return sizes


def _standard_basis(tensors: Sequence[Tensor], chunk_size: int | None) -> Iterator[tuple[Tensor, ...]]:
    """The rows of an N x N identity (N = total numel of ``tensors``) in
    chunks of at most ``chunk_size`` rows, each row split into one piece per
    tensor, shaped and typed like it.
    # numels [1, 2]: rows [[1],[0],[0]] for the first tensor, [[0,0],[1,0],[0,1]] for the second
    """
    numels = [t.numel() for t in tensors]
    total = sum(numels)
    starts = list(itertools.accumulate([0] + numels[:-1]))
    if len(tensors) == 1 and (chunk_size is None or chunk_size >= total):
        # One tensor, one chunk: the identity itself (one op instead of three).
        t = tensors[0]
        yield (torch.eye(total, dtype=t.dtype, device=t.device).view((total,) + tuple(t.shape)),)
        return
    row = 0
    for size in _chunk_sizes(total, chunk_size):
        pieces = []
        for t, numel, start in zip(tensors, numels, starts):
            piece = t.new_zeros(size, numel)
            # rows row..row+size of the identity, columns start..start+numel
            piece.diagonal(row - start).fill_(1)  # entry (r, c) is 1 where row + r == start + c
            pieces.append(piece.view((size,) + tuple(t.shape)))
        row += size
        yield tuple(pieces)


def jacrev(
    func: Callable,
    argnums: int | tuple[int, ...] = 0,
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
    _preallocate_and_copy: bool = False,
) -> Callable:
    """Computes the Jacobian of ``func`` with respect to the arg(s) at index
    ``argnum`` using reverse mode autodiff (vmap over vjp).

    Args:
        func (function): A Python function that takes one or more arguments,
            one of which must be a Tensor, and returns one or more Tensors.
        argnums (int or Tuple[int]): Optional, integer or tuple of integers,
            saying which arguments to get the Jacobian with respect to.
            Default: 0.
        has_aux (bool): Flag indicating that ``func`` returns a
            ``(output, aux)`` tuple where the first element is the output of
            the function to be differentiated and the second element is
            auxiliary objects that will not be differentiated. Default: False.
        chunk_size (None or int): If None (default), use the maximum chunk
            size (equivalent to doing a single vmap over vjp to compute the
            Jacobian). If 1, the Jacobian is computed row by row with a
            for-loop. Otherwise, vmap over vjp ``chunk_size`` rows at a time:
            the same result with peak memory bounded by the chunk.
        _preallocate_and_copy (bool): write each chunk into a preallocated
            result instead of concatenating the chunks at the end.

    Returns:
        A function with the same inputs as ``func`` returning the Jacobian
        (and ``aux`` with ``has_aux``): for each output (with the outputs'
        structure) the Jacobian with respect to the argument(s) chosen, of
        shape ``output.shape + input.shape`` (a tuple over inputs for tuple
        argnums).

    Example::

        >>> import torch
        >>> from torchxform import jacrev
        >>> x = torch.randn(5)
        >>> jacobian = jacrev(torch.sin)(x)
        >>> torch.allclose(jacobian, torch.diag(torch.cos(x)))
        True
    """
    if not (chunk_size is None or chunk_size > 0):
        raise ValueError("jacrev: `chunk_size` should be greater than 0.")

    @functools.wraps(func)
    def wrapper(*args):
        _error_if_complex("jacrev", args, is_input=True)
        result = vjp_with_argnums(func, args, argnums, has_aux)
        output, pullback = result[0], result[1]
        aux = result[2] if has_aux else None
        flat_output, output_spec = tree_flatten(output)
        _error_if_complex("jacrev", flat_output, is_input=False, flat=True)
        primals = _slice_argnums(args, argnums)
        flat_primals, primals_spec = tree_flatten(primals)
        out_numel = sum(o.numel() for o in flat_output)

        stacked = None
        chunks: list[list[Tensor]] = []
        row = 0
        for basis_chunk in _standard_basis(flat_output, chunk_size):
            basis = tree_unflatten(list(basis_chunk), output_spec)
            if chunk_size == 1:  # a plain loop: no vmap limitations at all
                rows = tree_map(lambda t: t.unsqueeze(0), pullback(tree_map(lambda t: t.squeeze(0), basis)))
            else:
                rows = vmap(pullback)(basis)
            flat_rows = tree_flatten(rows)[0]
            size = basis_chunk[0].shape[0]
            if _preallocate_and_copy and size < out_numel:
                if stacked is None:
                    stacked = [p.new_zeros((out_numel,) + tuple(p.shape)) for p in flat_primals]
                for target, r in zip(stacked, flat_rows):
                    target[row : row + size].copy_(r)
            else:
                chunks.append(flat_rows)
            row += size
        if stacked is not None:
            per_input = stacked
        elif len(chunks) == 1:
            per_input = chunks[0]
        else:
            per_input = [torch.cat(column, 0) for column in zip(*chunks)]
        del chunks

        # [out_numel, *input.shape] per input -> per output, per input: out.shape + input.shape
        if len(flat_output) == 1:  # nothing to split
            (o,) = flat_output
            split = [[jac.view(tuple(o.shape) + tuple(p.shape))] for jac, p in zip(per_input, flat_primals)]
        else:
            split = [
                [piece.view(tuple(o.shape) + tuple(p.shape)) for piece, o in zip(jac.split([o.numel() for o in flat_output]), flat_output)]
                for jac, p in zip(per_input, flat_primals)
            ]
        by_output = [tree_unflatten(list(column), primals_spec) for column in zip(*split)]
        if isinstance(argnums, int):
            by_output = [column[0] for column in by_output]
        jacobian = tree_unflatten(by_output, output_spec)
        return (jacobian, aux) if has_aux else jacobian

    return wrapper


def jacfwd(
    func: Callable, argnums: int | tuple[int, ...] = 0, has_aux: bool = False, *, randomness: str = "error"
) -> Callable:
    """Computes the Jacobian of ``func`` with respect to the arg(s) at index
    ``argnum`` using forward-mode autodiff (vmap over jvp).

    Args:
        func (function): A Python function that takes one or more arguments,
            one of which must be a Tensor, and returns one or more Tensors.
        argnums (int or Tuple[int]): Optional, integer or tuple of integers,
            saying which arguments to get the Jacobian with respect to.
            Default: 0.
        has_aux (bool): Flag indicating that ``func`` returns a
            ``(output, aux)`` tuple where the first element is the output of
            the function to be differentiated and the second element is
            auxiliary objects that will not be differentiated. Default: False.
        randomness (str): Which randomness to use for the vmap over jvp
            ('error', 'different' or 'same'), as in :func:`vmap`.
            Default: 'error'.

    Returns:
        A function with the same inputs as ``func`` returning the Jacobian
        (and ``aux`` with ``has_aux``), structured as :func:`jacrev`'s.

    Example::

        >>> import torch
        >>> from torchxform import jacfwd
        >>> x = torch.randn(5)
        >>> jacobian = jacfwd(torch.sin)(x)
        >>> torch.allclose(jacobian, torch.diag(torch.cos(x)))
        True
    """

    @functools.wraps(func)
    def wrapper(*args):
        _error_if_complex("jacfwd", args, is_input=True)
        primals = _slice_argnums(args, argnums)
        flat_primals, primals_spec = tree_flatten(primals)
        (flat_basis,) = _standard_basis(flat_primals, None)
        basis = tree_unflatten(list(flat_basis), primals_spec)
        if isinstance(argnums, int):
            basis = basis[0]

        def push_jvp(tangent):
            result = jvp_with_argnums(func, args, tangent, argnums, has_aux)
            _error_if_complex("jacfwd", result[0], is_input=False)
            if has_aux:
                return result[1], result[2]
            return result[1]

        results = vmap(push_jvp, randomness=randomness)(basis)
        aux = None
        if has_aux:
            results, aux = results
            flat_aux, aux_spec = tree_flatten(aux)
            aux = tree_unflatten([a[0] for a in flat_aux], aux_spec)  # every basis row gives the same aux
        flat_jacs, output_spec = tree_flatten(results)
        numels = [p.numel() for p in flat_primals]
        per_output = []
        for jac in flat_jacs:  # [n_in, *out.shape]
            pieces = jac.movedim(0, -1).split(numels, -1)
            per_output.append(
                tree_unflatten(
                    [piece.unflatten(-1, tuple(p.shape)) if p.dim() else piece.squeeze(-1) for piece, p in zip(pieces, flat_primals)],
                    primals_spec,
                )
            )
        if isinstance(argnums, int):
            per_output = [column[0] for column in per_output]
        jacobian = tree_unflatten(per_output, output_spec)
        return (jacobian, aux) if has_aux else jacobian

    return wrapper


def hessian(func: Callable, argnums: int | tuple[int, ...] = 0) -> Callable:
    """Computes the Hessian of ``func`` with respect to the arg(s) at index
    ``argnum`` via a forward-over-reverse strategy (``jacfwd(jacrev(func))``).

    Args:
        func (function): A Python function that takes one or more arguments,
            one of which must be a Tensor, and returns one or more Tensors.
        argnums (int or Tuple[int]): Optional, integer or tuple of integers,
            saying which arguments to get the Hessian with respect to.
            Default: 0.

    Returns:
        A function with the same inputs as ``func`` returning the Hessian.

    Example::

        >>> import torch
        >>> from torchxform import hessian
        >>> x = torch.randn(5)
        >>> torch.allclose(hessian(lambda x: x.sin().sum())(x), torch.diag(-x.sin()))
        True
    """
    return jacfwd(jacrev(func, argnums), argnums)


def linearize(func: Callable, *primals) -> tuple[Any, Callable]:
    """Returns the value of ``func`` at ``primals`` and its linear
    approximation there: a function computing the jvp of ``func`` at
    ``primals`` for any tangents.

    The jvp is traced once (``make_fx``) with the primal computation folded
    into constants, so each call of ``jvp_fn`` runs only the tangent
    computation.

    Args:
        func (Callable): A Python function that takes one or more arguments.
        primals (Tensors): Positional arguments to ``func`` that must all be
            Tensors. These are the values at which the function is linearly
            approximated.

    Returns:
        A ``(output, jvp_fn)`` tuple; ``jvp_fn(*tangents)`` takes tangents
        with the primals' structure and returns the output's tangents.

    Example::

        >>> import torch
        >>> from torchxform import linearize
        >>> output, jvp_fn = linearize(torch.sin, torch.zeros(3))
        >>> jvp_fn(torch.ones(3))
        tensor([1., 1., 1.])
    """
    from torch.fx.experimental import const_fold
    from torch.fx.experimental.proxy_tensor import make_fx

    flat_primals, primals_spec = tree_flatten(primals)
    output = func(*primals)
    flat_output, output_spec = tree_flatten(output)

    def trace_fn(*flat_tangents):
        tangents = tree_unflatten(list(flat_tangents), primals_spec)
        _, tangents_out = jvp_with_argnums(func, primals, tangents, None, False)
        return tree_flatten(tangents_out)[0]

    examples = [p.new_empty(()).expand_as(p) for p in flat_primals]
    graph = make_fx(trace_fn)(*examples)
    with warnings.catch_warnings():
        # const_fold's own benign notice about the attributes it moves
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
        folded = const_fold.split_const_subgraphs(graph)
    meta = [(p.shape, p.dtype, p.device) for p in flat_primals]

    def jvp_fn(*tangents):
        flat_tangents, spec = tree_flatten(tangents)
        if spec != primals_spec:
            raise RuntimeError(f"Expected the tangents {spec} to have the same argspec as the primals {primals_spec}")
        for i, (t, (shape, dtype, device)) in enumerate(zip(flat_tangents, meta)):
            for what, got, want in (("shape", t.shape, shape), ("device", t.device, device), ("dtype", t.dtype, dtype)):
                if got != want:
                    raise RuntimeError(
                        f"tangent:{i} with {what} {got} in flattened pytree doesn't match the {what} {want} "
                        f"of the corresponding primal."
                    )
        return tree_unflatten(list(folded(*flat_tangents)), output_spec)

    return output, jvp_fn
