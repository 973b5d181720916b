"""MAML on sine-wave regression: the inner SGD step is taken functionally
inside ``grad``, the outer gradient flows through it, and ``vmap`` runs all
tasks of a meta-batch at once. Checked against torch.autograd with
``create_graph=True`` in a loop over tasks.

Run: ``python examples/maml.py``
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchxform import functional_call, grad, vmap

try:
    from _common import best_time, max_abs_error, report
except ImportError:  # imported as examples.maml
    from ._common import best_time, max_abs_error, report

INNER_LR = 0.01


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def sine_tasks(tasks: int, shots: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Support and query sets ``[tasks, shots, 1]`` of random sine waves."""
    amplitude = torch.rand(tasks, 1, 1, generator=generator, device=generator.device) * 4.9 + 0.1
    phase = torch.rand(tasks, 1, 1, generator=generator, device=generator.device) * math.pi
    x_support = torch.rand(tasks, shots, 1, generator=generator, device=generator.device) * 10 - 5
    x_query = torch.rand(tasks, shots, 1, generator=generator, device=generator.device) * 10 - 5
    return x_support, amplitude * torch.sin(x_support - phase), x_query, amplitude * torch.sin(x_query - phase)


def meta_gradient(model: nn.Module, x_support, y_support, x_query, y_query) -> dict[str, torch.Tensor]:
    """The gradient of the mean query loss after one inner SGD step per task."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(params, x, y):
        return F.mse_loss(functional_call(model, params, (x,)), y)

    def query_loss_after_adaptation(params, x_support, y_support, x_query, y_query):
        inner_grads = grad(loss)(params, x_support, y_support)
        adapted = {k: params[k] - INNER_LR * inner_grads[k] for k in params}
        return loss(adapted, x_query, y_query)

    def mean_query_loss(params):
        per_task = vmap(query_loss_after_adaptation, in_dims=(None, 0, 0, 0, 0))(
            params, x_support, y_support, x_query, y_query
        )
        return per_task.mean()

    return grad(mean_query_loss)(params)


def loop_meta_gradient(model: nn.Module, x_support, y_support, x_query, y_query) -> dict[str, torch.Tensor]:
    """Reference: torch.autograd, one task at a time, ``create_graph=True``
    so the outer gradient differentiates through the inner step."""
    names, params = zip(*model.named_parameters())
    total = 0.0
    for task in range(len(x_support)):
        support_loss = F.mse_loss(model(x_support[task]), y_support[task])
        inner_grads = torch.autograd.grad(support_loss, params, create_graph=True)
        adapted = {n: p - INNER_LR * g for n, p, g in zip(names, params, inner_grads)}
        total = total + F.mse_loss(torch.func.functional_call(model, adapted, (x_query[task],)), y_query[task])
    outer = torch.autograd.grad(total / len(x_support), params)
    return dict(zip(names, outer))


def workload(tasks: int = 16, shots: int = 10) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    generator = torch.Generator(device=torch.get_default_device()).manual_seed(0)
    return make_model(), sine_tasks(tasks, shots, generator)


def main(tasks: int = 16, shots: int = 10) -> None:
    model, data = workload(tasks, shots)
    ours, t_ours = best_time(lambda: meta_gradient(model, *data))
    reference, t_loop = best_time(lambda: loop_meta_gradient(model, *data))
    error = max_abs_error(ours.values(), reference.values())
    report(f"MAML meta-gradient, {tasks} sine tasks x {shots} shots, MLP 1-40-40-1", error, t_ours, t_loop)


if __name__ == "__main__":
    main()
