"""The empirical neural tangent kernel of a CNN: per-example Jacobians of
the outputs with respect to all parameters (``vmap(jacrev(f))``),
contracted over parameters. Checked against Jacobians built one output
row at a time with ``torch.autograd.grad``.

Run: ``python examples/ntk.py``
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchxform import functional_call, jacrev, vmap

try:
    from _common import best_time, max_abs_error, report
except ImportError:  # imported as examples.ntk
    from ._common import best_time, max_abs_error, report


class CNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2)
        self.fc = nn.Linear(16 * 3 * 3, classes)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``K[n, m, i, j] = sum over parameters p of d f_i(x1[n])/dp * d f_j(x2[m])/dp``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(params, x):
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(f), in_dims=(None, 0))(params, x1)  # per parameter: [N, outputs, *param.shape]
    jac2 = vmap(jacrev(f), in_dims=(None, 0))(params, x2)
    return sum(torch.einsum("Naf,Mbf->NMab", jac1[k].flatten(2), jac2[k].flatten(2)) for k in params)


def loop_empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Reference: each example's Jacobian row by row with ``torch.autograd.grad``."""
    params = list(model.parameters())

    def jacobian(x):  # [outputs, all parameters]
        out = model(x.unsqueeze(0)).squeeze(0)
        rows = [torch.autograd.grad(out[i], params, retain_graph=True) for i in range(out.numel())]
        return torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])

    jac1 = torch.stack([jacobian(x) for x in x1])
    jac2 = torch.stack([jacobian(x) for x in x2])
    return torch.einsum("Naf,Mbf->NMab", jac1, jac2)


def workload(n1: int = 20, n2: int = 5) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return CNN(), torch.randn(n1, 3, 16, 16), torch.randn(n2, 3, 16, 16)


def main(n1: int = 20, n2: int = 5) -> None:
    model, x1, x2 = workload(n1, n2)
    ours, t_ours = best_time(lambda: empirical_ntk(model, x1, x2))
    reference, t_loop = best_time(lambda: loop_empirical_ntk(model, x1, x2))
    error = max_abs_error([ours], [reference])
    report(f"empirical NTK of a CNN, {n1} x {n2} examples, 10 outputs", error, t_ours, t_loop)


if __name__ == "__main__":
    main()
