"""A differentially private SGD step as Opacus takes it: per-sample
gradients, each clipped to a total norm of at most ``max_grad_norm``,
summed, Gaussian noise of std ``noise_multiplier * max_grad_norm`` added,
averaged over the batch, and applied. Checked against the same step built
from a loop of ``torch.autograd.grad`` over examples.

Run: ``python examples/dp_sgd.py``
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchxform import functional_call, grad, vmap

try:
    from _common import best_time, max_abs_error, report
except ImportError:  # imported as examples.dp_sgd
    from ._common import best_time, max_abs_error, report

MAX_GRAD_NORM = 1.0
NOISE_MULTIPLIER = 1.1
LEARNING_RATE = 0.1


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2), nn.GroupNorm(4, 8), nn.Tanh(), nn.Flatten(),
        nn.Linear(8 * 12 * 12, 32), nn.Tanh(), nn.Linear(32, 10),
    )


def private_update(per_sample: dict[str, torch.Tensor], noise_seed: int, max_grad_norm: float) -> dict[str, torch.Tensor]:
    """Clip each example's gradient, sum, add noise, average: the privatised
    gradient, from per-sample gradients stacked along dim 0."""
    batch = next(iter(per_sample.values())).shape[0]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()], dim=1).norm(dim=1)
    scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    generator = torch.Generator(device=norms.device).manual_seed(noise_seed)
    update = {}
    for name, g in per_sample.items():
        clipped_sum = torch.einsum("n,n...->...", scale, g)
        noise = torch.randn(clipped_sum.shape, generator=generator, device=clipped_sum.device) * (NOISE_MULTIPLIER * max_grad_norm)
        update[name] = (clipped_sum + noise.to(clipped_sum)) / batch
    return update


def dp_sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise_seed: int,
                max_grad_norm: float = MAX_GRAD_NORM) -> dict[str, torch.Tensor]:
    """New parameters after one DP-SGD step (the model is left unchanged)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(params, example, target):
        return F.cross_entropy(functional_call(model, params, (example.unsqueeze(0),)), target.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    update = private_update(per_sample, noise_seed, max_grad_norm)
    return {k: params[k] - LEARNING_RATE * update[k] for k in params}


def loop_dp_sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, noise_seed: int,
                     max_grad_norm: float = MAX_GRAD_NORM) -> dict[str, torch.Tensor]:
    """Reference: one example at a time, as a loop over ``torch.autograd.grad``
    with each gradient clipped before it joins the sum."""
    names, params = zip(*model.named_parameters())
    sums = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        total_norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, max_grad_norm / (total_norm.item() + 1e-6))
        for s, g in zip(sums, grads):
            s += factor * g
    generator = torch.Generator(device=params[0].device).manual_seed(noise_seed)  # the same noise, same order
    new_params = {}
    for name, p, s in zip(names, params, sums):
        noise = torch.randn(s.shape, generator=generator, device=s.device) * (NOISE_MULTIPLIER * max_grad_norm)
        new_params[name] = p.detach() - LEARNING_RATE * (s + noise) / len(x)
    return new_params


def workload(batch: int = 64) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return make_model(), torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))


def main(batch: int = 64) -> None:
    model, x, y = workload(batch)
    ours, t_ours = best_time(lambda: dp_sgd_step(model, x, y, noise_seed=1))
    reference, t_loop = best_time(lambda: loop_dp_sgd_step(model, x, y, noise_seed=1))
    error = max_abs_error(ours.values(), reference.values())
    report(f"DP-SGD step (clip {MAX_GRAD_NORM}, noise {NOISE_MULTIPLIER}), CNN, batch {batch}", error, t_ours, t_loop)


if __name__ == "__main__":
    main()
