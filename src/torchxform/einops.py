"""``rearrange``: einops-style reordering of a tensor's elements (transpose,
reshape, squeeze/unsqueeze, stack), written with reshape and permute only,
so it works under every transform."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

_TOKEN = re.compile(r"\.\.\.|\(|\)|[A-Za-z_][A-Za-z0-9_]*|\d+|\S")
_ELLIPSIS = "..."


def _parse(side: str) -> list:
    """The groups of one side of a pattern: ``"b (h w) ... (...)"`` ->
    ``[["b"], ["h", "w"], "...", ["..."]]`` (a bare ``...`` stands for as
    many groups as it covers dims, one in parentheses for one group); ``1``
    and ``()`` are empty (unit) groups."""
    groups: list = []
    current: list[str] | None = None
    for token in _TOKEN.findall(side):
        if token == "(":
            if current is not None:
                raise ValueError(f"rearrange: nested parentheses in '{side}'")
            current = []
        elif token == ")":
            if current is None:
                raise ValueError(f"rearrange: unbalanced parentheses in '{side}'")
            groups.append(current)
            current = None
        elif token.isdigit():
            if token != "1":
                raise ValueError(f"rearrange: only the anonymous axis 1 is supported, got {token} in '{side}'")
            if current is None:
                groups.append([])
        elif token == _ELLIPSIS and current is None:
            groups.append(_ELLIPSIS)
        elif token == _ELLIPSIS or token.isidentifier():
            if current is None:
                groups.append([token])
            else:
                current.append(token)
        else:
            raise ValueError(f"rearrange: unexpected character '{token}' in '{side}'")
    if current is not None:
        raise ValueError(f"rearrange: unbalanced parentheses in '{side}'")
    return groups


def _names(groups: list) -> list[str]:
    return [name for group in groups for name in ([group] if group == _ELLIPSIS else group)]


def _expand_ellipsis(groups: list, ellipsis_names: list[str]) -> list[list[str]]:
    expanded: list[list[str]] = []
    for group in groups:
        if group == _ELLIPSIS:
            expanded.extend([name] for name in ellipsis_names)
        else:
            expanded.append([n for name in group for n in (ellipsis_names if name == _ELLIPSIS else [name])])
    return expanded


def rearrange(
    tensor: torch.Tensor | Sequence[torch.Tensor], pattern: str, **axes_lengths: int
) -> torch.Tensor:
    """A native implementation of ``einops.rearrange``: reorders a tensor's
    elements by a pattern (transpose, reshape, squeeze, unsqueeze, stack).

    Args:
        tensor (Tensor or sequence of Tensor): the tensor(s) to rearrange; a
            sequence is stacked along a new first dim.
        pattern (str): the rearrangement pattern, e.g. ``"b h w c -> b c h w"``
            or ``"b (h h1) (w w1) c -> b h w (c h1 w1)"``; ``...`` stands for
            any number of dims, ``1`` or ``()`` for a dim of size 1.
        axes_lengths (int): the lengths of axes that cannot be inferred.

    Returns:
        Tensor: the rearranged tensor (a view where reshape allows one).

    Example::

        >>> import torch
        >>> from torchxform import rearrange
        >>> images = torch.randn(32, 30, 40, 3)
        >>> rearrange(images, "b h w c -> b c h w").shape
        torch.Size([32, 3, 30, 40])
        >>> rearrange(images, "b (h h1) (w w1) c -> b h w (c h1 w1)", h1=2, w1=2).shape
        torch.Size([32, 15, 20, 12])
    """
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.stack(list(tensor))
    if pattern.count("->") != 1:
        raise ValueError(f"rearrange: the pattern needs exactly one '->', got '{pattern}'")
    left_text, right_text = pattern.split("->")
    left, right = _parse(left_text), _parse(right_text)
    left_names, right_names = _names(left), _names(right)
    for side, names in (("left", left_names), ("right", right_names)):
        repeated = {n for n in names if names.count(n) > 1}
        if repeated:
            raise ValueError(f"rearrange: axes {sorted(repeated)} appear more than once on the {side} of '{pattern}'")
    if (_ELLIPSIS in left_names) != (_ELLIPSIS in right_names):
        raise ValueError(f"rearrange: '...' must appear on both sides of '{pattern}' or on neither")
    if any(group != _ELLIPSIS and _ELLIPSIS in group for group in left):
        raise ValueError(f"rearrange: '...' cannot be inside parentheses on the left of '{pattern}'")
    only_one_side = set(left_names) ^ set(right_names)
    if only_one_side:
        raise ValueError(
            f"Identifiers only on one side of rearrange expression (should be on both): {only_one_side}"
        )
    unknown_lengths = set(axes_lengths) - set(left_names)
    if unknown_lengths:
        raise ValueError(f"rearrange: axes_lengths names axes not in the pattern: {sorted(unknown_lengths)}")

    has_ellipsis = _ELLIPSIS in left_names
    explicit_dims = len(left) - has_ellipsis
    if tensor.dim() < explicit_dims or (not has_ellipsis and tensor.dim() != explicit_dims):
        raise ValueError(
            f"Number of dimensions in pattern ({explicit_dims}) must be equal to the number of dimensions "
            f"in the tensor ({tensor.dim()})"
        )
    ellipsis_names = [f"...{i}" for i in range(tensor.dim() - explicit_dims)] if has_ellipsis else []
    left, right = _expand_ellipsis(left, ellipsis_names), _expand_ellipsis(right, ellipsis_names)

    sizes = dict(axes_lengths)
    for group, dim_size in zip(left, tensor.shape):
        known = math.prod(sizes[name] for name in group if name in sizes)
        missing = [name for name in group if name not in sizes]
        if len(missing) > 1:
            raise ValueError(f"rearrange: cannot infer the sizes of {missing} in '{pattern}'; pass them as keywords")
        if missing and known > 0 and dim_size % known == 0:
            sizes[missing[0]] = dim_size // known
        elif missing or known != dim_size:
            raise ValueError(
                f"rearrange: a dim of size {dim_size} cannot be split as ({' '.join(group) or '1'}) "
                f"with lengths {[sizes.get(name) for name in group]}"
            )

    elementary = _names(left)
    split = tensor.reshape([sizes[name] for name in elementary])
    order = [elementary.index(name) for name in _names(right)]
    return split.permute(order).reshape([math.prod(sizes[name] for name in group) for group in right])


__all__ = ["rearrange"]
