"""Working with nn.Modules under transforms: calling a module with given
parameters and buffers, stacking the state of several models for
ensembling, and making batch norm vmap-friendly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils.stateless import _reparametrize_module


def functional_call(
    module: nn.Module,
    parameter_and_buffer_dicts: dict[str, Tensor] | Sequence[dict[str, Tensor]],
    args: Any = None,
    kwargs: dict[str, Any] | None = None,
    *,
    tie_weights: bool = True,
    strict: bool = False,
) -> Any:
    """Performs a functional call on the module by replacing the module
    parameters and buffers with the provided ones.

    The module's own parameters and buffers are restored afterwards, also
    when the call raises.  The given values may be tracers of any transform
    (``grad``/``vmap`` over a dict of parameters is the usual use).

    Args:
        module (torch.nn.Module): the module to call.
        parameter_and_buffer_dicts (Dict[str, Tensor] or tuple of
            Dict[str, Tensor]): the parameters and buffers to use, by their
            ``named_parameters``/``named_buffers`` names. Several dicts must
            have distinct keys.
        args (Any or tuple): arguments to the module call; not a tuple means
            a single argument.
        kwargs (dict): keyword arguments to the module call.
        tie_weights (bool): If True, parameters and buffers tied in the
            original model stay tied (giving one value per tied group; two
            different values raise). Default: True.
        strict (bool): If True, the names given must match the module's
            parameters and buffers exactly (missing or unexpected keys
            raise). Default: False.

    Returns:
        Any: the result of calling ``module``.

    Example::

        >>> import torch
        >>> from torchxform import functional_call, grad
        >>> model = torch.nn.Linear(3, 1)
        >>> params = {k: v.detach() for k, v in model.named_parameters()}
        >>> x, y = torch.randn(4, 3), torch.randn(4, 1)
        >>> loss = lambda p: torch.nn.functional.mse_loss(functional_call(model, p, (x,)), y)
        >>> sorted(grad(loss)(params))
        ['bias', 'weight']
    """
    if isinstance(parameter_and_buffer_dicts, dict):
        parameters_and_buffers = parameter_and_buffer_dicts
    elif isinstance(parameter_and_buffer_dicts, Sequence):
        if not all(isinstance(d, dict) for d in parameter_and_buffer_dicts):
            raise ValueError("Expected all elements of parameter_and_buffer_dicts to be dictionaries")
        seen: dict[str, int] = {}
        for d in parameter_and_buffer_dicts:
            for key in d:
                seen[key] = seen.get(key, 0) + 1
        repeated = [key for key, count in seen.items() if count > 1]
        if repeated:
            raise ValueError(
                f"{repeated} appeared in multiple dictionaries; behavior of functional call is ambiguous"
            )
        parameters_and_buffers = {k: v for d in parameter_and_buffer_dicts for k, v in d.items()}
    else:
        raise ValueError(
            f"Expected parameter_and_buffer_dicts to be a dict, or a list/tuple of dicts, "
            f"but got {type(parameter_and_buffer_dicts)}"
        )
    if isinstance(module, nn.DataParallel):
        raise RuntimeError("The stateless API can't be used with nn.DataParallel module")
    if kwargs is None:
        kwargs = {}
    if args is None:
        args = ()
    elif not isinstance(args, tuple):
        args = (args,)
    with _reparametrize_module(module, parameters_and_buffers, tie_weights=tie_weights, strict=strict):
        return module(*args, **kwargs)


def _stacked_leaf(tensors: Sequence[Tensor], name: str) -> Tensor:
    all_requires_grad = all(t.requires_grad for t in tensors)
    if not all_requires_grad and any(t.requires_grad for t in tensors):
        raise RuntimeError(f"Expected {name} from each model to have the same .requires_grad")
    stacked = torch.stack([t.detach() for t in tensors])
    return stacked.requires_grad_() if all_requires_grad else stacked


def stack_module_state(models: Sequence[nn.Module] | nn.ModuleList) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """stack_module_state(models) -> params, buffers

    Prepares a list of ``M`` same-class ``nn.Module``s for ensembling with
    :func:`vmap`: returns two dicts stacking all their parameters and buffers
    along a new leading dim, by name. The stacked parameters are new leaf
    tensors (they require grad when the originals do) unrelated to the
    originals' autograd history, so they can go to an optimizer directly.

    Args:
        models: the modules, all of the same class, structure and
            train/eval mode.

    Returns:
        ``(params, buffers)``: dicts of stacked tensors ``[M, *shape]``.

    Example::

        >>> import torch
        >>> from torchxform import functional_call, stack_module_state, vmap
        >>> models = [torch.nn.Linear(3, 2) for _ in range(5)]
        >>> params, buffers = stack_module_state(models)
        >>> call = lambda p, b, x: functional_call(models[0], (p, b), (x,))
        >>> vmap(call, in_dims=(0, 0, None))(params, buffers, torch.randn(4, 3)).shape
        torch.Size([5, 4, 2])
    """
    if len(models) == 0:
        raise RuntimeError("stack_module_state: Expected at least one model, got 0.")
    if not (all(m.training for m in models) or all(not m.training for m in models)):
        raise RuntimeError("stack_module_state: Expected all models to have the same training/eval mode.")
    model_class = type(models[0])
    if not all(type(m) is model_class for m in models):
        raise RuntimeError("stack_module_state: Expected all models to be of the same class.")
    all_params = [dict(m.named_parameters()) for m in models]
    all_buffers = [dict(m.named_buffers()) for m in models]
    for i, (p, b) in enumerate(zip(all_params, all_buffers)):
        for kind, mine, first in (("parameters", p, all_params[0]), ("buffers", b, all_buffers[0])):
            if mine.keys() != first.keys() or any(mine[k].shape != first[k].shape for k in first):
                raise RuntimeError(
                    f"stack_module_state: Expected all models to have the same structure, but model {i}'s "
                    f"{kind} differ from model 0's (names {sorted(set(mine) ^ set(first)) or 'match'}, "
                    f"or shapes differ)."
                )
    params = {k: _stacked_leaf([p[k] for p in all_params], k) for k in all_params[0]}
    buffers = {k: _stacked_leaf([b[k] for b in all_buffers], k) for k in all_buffers[0]}
    return params, buffers


def replace_all_batch_norm_modules_(root: nn.Module) -> nn.Module:
    """In place, makes every batch norm module of ``root`` stop using and
    tracking running statistics, so that a training-mode batch norm can run
    under :func:`vmap` (each example then normalizes with its own batch
    statistics).

    Args:
        root (nn.Module): the module whose batch norms to update.

    Returns:
        ``root`` itself.

    Example::

        >>> import torch
        >>> from torchxform import replace_all_batch_norm_modules_
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
        >>> replace_all_batch_norm_modules_(model)[1].running_mean is None
        True
    """
    for module in root.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
            module.track_running_stats = False
    return root


__all__ = ["functional_call", "stack_module_state", "replace_all_batch_norm_modules_"]


# --------------------------------------------------------------------------
# functorch's make_functional family, as torch.func's migration guide maps
# it onto functional_call and stack_module_state.
# --------------------------------------------------------------------------


class FunctionalModule(nn.Module):
    """A module called as ``fmodel(params, [buffers,] *args, **kwargs)``:
    what :func:`make_functional`, :func:`make_functional_with_buffers` and
    :func:`combine_state_for_ensemble` return.  The wrapped module's own
    parameters (and buffers, when they are passed) are not used."""

    def __init__(self, module: nn.Module, param_names, buffer_names, with_buffers: bool) -> None:
        super().__init__()
        self.stateless_model = module
        self.param_names = tuple(param_names)
        self.buffer_names = tuple(buffer_names)
        self.with_buffers = with_buffers

    def forward(self, params, *args, **kwargs):
        state = dict(zip(self.param_names, params, strict=True))
        if self.with_buffers:
            buffers, *args = args
            state.update(zip(self.buffer_names, buffers, strict=True))
        return functional_call(self.stateless_model, state, tuple(args), kwargs)


def _tracked(tensors, disable_autograd_tracking: bool) -> tuple[Tensor, ...]:
    return tuple(t.detach() if disable_autograd_tracking else t for t in tensors)


def make_functional(model: nn.Module, disable_autograd_tracking: bool = False):
    """functorch's ``make_functional``: ``(fmodel, params)`` with
    ``fmodel(params, *args) == model(*args)`` for the module's own
    parameters.  Equivalent to ``functional_call(model, dict(zip(names,
    params)), args)``, which is what new code should use.

    Args:
        model (torch.nn.Module): a module without buffers (see
            :func:`make_functional_with_buffers` for one with buffers).
        disable_autograd_tracking (bool): return detached parameters.

    Returns:
        tuple: ``(fmodel, params)``, ``params`` a tuple of tensors in
        ``model.named_parameters()`` order.

    Example::

        >>> import torch
        >>> from torchxform import grad, make_functional
        >>> fmodel, params = make_functional(torch.nn.Linear(3, 2))
        >>> grads = grad(lambda p, x: fmodel(p, x).sum())(params, torch.randn(4, 3))
        >>> [g.shape for g in grads]
        [torch.Size([2, 3]), torch.Size([2])]
    """
    if any(True for _ in model.buffers()):
        raise RuntimeError(
            "make_functional(model): `model` has buffers. Please use make_functional_with_buffers(model) "
            "instead (or functional_call with the buffers in its dict)."
        )
    named = list(model.named_parameters())
    params = _tracked([p for _, p in named], disable_autograd_tracking)
    return FunctionalModule(model, [n for n, _ in named], (), False), params


def make_functional_with_buffers(model: nn.Module, disable_autograd_tracking: bool = False):
    """functorch's ``make_functional_with_buffers``: ``(fmodel, params,
    buffers)`` with ``fmodel(params, buffers, *args) == model(*args)``.

    Args:
        model (torch.nn.Module): a module.
        disable_autograd_tracking (bool): return detached parameters.

    Returns:
        tuple: ``(fmodel, params, buffers)``, tuples of tensors in
        ``named_parameters()`` / ``named_buffers()`` order.

    Example::

        >>> import torch
        >>> from torchxform import make_functional_with_buffers
        >>> model = torch.nn.BatchNorm1d(3).eval()
        >>> fmodel, params, buffers = make_functional_with_buffers(model)
        >>> fmodel(params, buffers, torch.randn(4, 3)).shape
        torch.Size([4, 3])
    """
    named_params = list(model.named_parameters())
    named_buffers = list(model.named_buffers())
    fmodel = FunctionalModule(model, [n for n, _ in named_params], [n for n, _ in named_buffers], True)
    params = _tracked([p for _, p in named_params], disable_autograd_tracking)
    return fmodel, params, tuple(b for _, b in named_buffers)


def combine_state_for_ensemble(models: Sequence[nn.Module]):
    """functorch's ``combine_state_for_ensemble``: ``(fmodel, params,
    buffers)`` where each parameter and buffer is the stack of the models'
    (new leaves, along dim 0), for ``vmap(fmodel)(params, buffers, x)``.
    :func:`stack_module_state` with :func:`functional_call` is the
    torch.func way to write the same.

    Args:
        models (sequence of torch.nn.Module): models of one class, all in
            training mode or all in evaluation mode.

    Returns:
        tuple: ``(fmodel, params, buffers)``.

    Example::

        >>> import torch
        >>> from torchxform import combine_state_for_ensemble, vmap
        >>> models = [torch.nn.Linear(3, 2) for _ in range(4)]
        >>> fmodel, params, buffers = combine_state_for_ensemble(models)
        >>> vmap(fmodel, in_dims=(0, 0, None))(params, buffers, torch.randn(5, 3)).shape
        torch.Size([4, 5, 2])
    """
    models = list(models)
    if not models:
        raise RuntimeError("combine_state_for_ensemble: Expected at least one model, got 0.")
    if not (all(m.training for m in models) or all(not m.training for m in models)):
        raise RuntimeError("combine_state_for_ensemble: Expected all models to have the same training/eval mode.")
    if any(type(m) is not type(models[0]) for m in models):
        raise RuntimeError("combine_state_for_ensemble: Expected all models to be of the same class.")
    params, buffers = stack_module_state(models)
    fmodel = FunctionalModule(models[0], params.keys(), buffers.keys(), True)
    return fmodel, tuple(params.values()), tuple(buffers.values())
