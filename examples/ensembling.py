"""Model ensembling: the states of several models stacked with
``stack_module_state`` and run at once by ``vmap(functional_call)``, both
with one minibatch per model and with one minibatch shared by all
(``in_dims=(0, 0, None)``), for an MLP and a CNN; checked against a loop
over the models.

Run: ``python examples/ensembling.py``
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchxform import functional_call, replace_all_batch_norm_modules_, stack_module_state, vmap

try:
    from _common import best_time, max_abs_error, report
except ImportError:  # imported as examples.ensembling
    from ._common import best_time, max_abs_error, report


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 128), nn.Linear(128, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Batch norm in training mode: ``replace_all_batch_norm_modules_``
    makes it normalise by each model's own minibatch without updating
    running statistics, which vmap cannot store per model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def stack_ensemble(models: list[nn.Module]) -> tuple[nn.Module, dict, dict]:
    """A template module and the stacked parameters and buffers of ``models``."""
    params, buffers = stack_module_state(models)
    # The stacked state replaces the template's own, so the template needs no
    # storage: keep it on the meta device.
    template = copy.deepcopy(models[0]).to("meta")
    return template, params, buffers


def ensemble_forward(template: nn.Module, params: dict, buffers: dict, minibatches: torch.Tensor,
                     shared: bool) -> torch.Tensor:
    """Outputs of every model, stacked along dim 0. ``minibatches`` is one
    minibatch per model (``[models, batch, ...]``) unless ``shared``, when
    it is one minibatch for all."""

    def run_one(params, buffers, x):
        return functional_call(template, (params, buffers), (x,))

    return vmap(run_one, in_dims=(0, 0, None if shared else 0))(params, buffers, minibatches)


def loop_ensemble_forward(models: list[nn.Module], minibatches: torch.Tensor, shared: bool) -> torch.Tensor:
    """Reference: each model called on its own."""
    return torch.stack([model(minibatches if shared else minibatches[i]) for i, model in enumerate(models)])


def workloads(members: int = 10, batch: int = 64) -> list[tuple[str, list[nn.Module], torch.Tensor, bool]]:
    """(title, models, minibatches, shared) with random weights and data."""
    torch.manual_seed(0)
    mlps = [MLP() for _ in range(members)]
    cnns = [replace_all_batch_norm_modules_(CNN()) for _ in range(members)]
    per_model = torch.randn(members, batch, 1, 28, 28)
    shared = torch.randn(batch, 1, 28, 28)
    return [
        (f"{members} MLPs 784-128-128-10, a minibatch each", mlps, per_model, False),
        (f"{members} MLPs 784-128-128-10, one shared minibatch", mlps, shared, True),
        (f"{members} CNNs conv-bn-pool-conv(groups=2)-pool, a minibatch each", cnns, per_model, False),
        (f"{members} CNNs conv-bn-pool-conv(groups=2)-pool, one shared minibatch", cnns, shared, True),
    ]


def main(members: int = 10, batch: int = 64) -> None:
    with torch.no_grad():
        for title, models, minibatches, shared in workloads(members, batch):
            template, params, buffers = stack_ensemble(models)
            ours, t_ours = best_time(lambda: ensemble_forward(template, params, buffers, minibatches, shared))
            reference, t_loop = best_time(lambda: loop_ensemble_forward(models, minibatches, shared))
            report(f"ensembling, {title} of {batch}", max_abs_error([ours], [reference]), t_ours, t_loop)


if __name__ == "__main__":
    main()
