"""``tree_flatten`` / ``tree_unflatten`` with fast paths for what the API
wrappers see on almost every call: one tensor, or a tuple of tensors.

Each call of a transform flattens its inputs and outputs several times;
``torch.utils._pytree`` takes microseconds for even a 1-tuple.  The fast
paths return the very specs ``torch.utils._pytree`` gives (cached), so specs
compare and print as before; anything else goes to ``torch.utils._pytree``.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import SUPPORTED_NODES, _broadcast_to_and_flatten, tree_flatten, tree_unflatten

Tensor = torch.Tensor

_LEAF_SPEC = tree_flatten(0)[1]
_TUPLE_SPECS: list = []  # n -> the spec of an n-tuple of leaves
_TUPLE_SPEC_IDS: set[int] = set()


def _tuple_spec(n: int):
    while len(_TUPLE_SPECS) <= n:
        spec = tree_flatten(tuple(range(len(_TUPLE_SPECS))))[1]
        _TUPLE_SPECS.append(spec)
        _TUPLE_SPEC_IDS.add(id(spec))
    return _TUPLE_SPECS[n]


def _is_tensor_leaf(x) -> bool:
    return isinstance(x, Tensor) and type(x) not in SUPPORTED_NODES


def flatten(tree):
    """``tree_flatten(tree)``."""
    if type(tree) is tuple:
        for x in tree:
            if not _is_tensor_leaf(x):
                return tree_flatten(tree)
        return list(tree), _tuple_spec(len(tree))
    if _is_tensor_leaf(tree):
        return [tree], _LEAF_SPEC
    return tree_flatten(tree)


def unflatten(leaves, spec):
    """``tree_unflatten(leaves, spec)``."""
    if spec is _LEAF_SPEC and len(leaves) == 1:
        return leaves[0]
    if id(spec) in _TUPLE_SPEC_IDS and len(leaves) == spec.num_leaves:
        return tuple(leaves)
    return tree_unflatten(leaves, spec)


def broadcast_to_and_flatten(tree, spec):
    """``torch.utils._pytree._broadcast_to_and_flatten(tree, spec)``."""
    if type(tree) is int:
        return [tree] * spec.num_leaves
    if (
        type(tree) is tuple
        and id(spec) in _TUPLE_SPEC_IDS
        and len(tree) == spec.num_leaves
        and all(d is None or type(d) is int for d in tree)
    ):
        return list(tree)
    return _broadcast_to_and_flatten(tree, spec)
