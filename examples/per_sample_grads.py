"""Per-sample gradients: ``vmap(grad(loss), in_dims=(None, None, 0, 0))``
with ``functional_call``, for an MLP, a CNN, a small Transformer encoder and
an LSTM classifier, each checked against a loop of ``torch.autograd.grad``
over single examples.

Run: ``python examples/per_sample_grads.py``
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchxform import functional_call, grad, vmap

try:
    from _common import best_time, max_abs_error, report
except ImportError:  # imported as examples.per_sample_grads
    from ._common import best_time, max_abs_error, report


class MLP(nn.Module):
    def __init__(self, features: int = 784, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """Group norm, not batch norm: a per-sample gradient needs a model that
    treats examples independently (as Opacus requires)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class TransformerClassifier(nn.Module):
    def __init__(self, vocab: int = 100, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True),
            num_layers=2, enable_nested_tensor=False,
        )
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int = 100, width: int = 16, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        _, (h, _) = self.lstm(self.embed(tokens))
        return self.head(h[-1])


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of the loss of each example, stacked along dim 0."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(params, buffers, example, target):
        # One example is a batch of one for the model.
        logits = functional_call(model, (params, buffers), (example.unsqueeze(0),))
        return F.cross_entropy(logits, target.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, None, 0, 0))(params, buffers, x, y)


def loop_per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: one ``torch.autograd.grad`` per example."""
    names, params = zip(*model.named_parameters())
    per_example = [
        torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params) for i in range(len(x))
    ]
    return {name: torch.stack([g[j] for g in per_example]) for j, name in enumerate(names)}


def workloads(batch: int = 32) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """(title, model, inputs, targets) for each model, with random weights and data."""
    torch.manual_seed(0)
    tokens = torch.randint(1, 100, (batch, 12))
    return [
        ("MLP 784-128-10", MLP(), torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))),
        ("CNN conv-groupnorm-pool x2", CNN(), torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))),
        ("Transformer encoder, 2 layers, width 32", TransformerClassifier(), tokens, torch.randint(0, 4, (batch,))),
        ("LSTM classifier, hidden 32", LSTMClassifier(), tokens, torch.randint(0, 4, (batch,))),
    ]


def main(batch: int = 32) -> None:
    for title, model, x, y in workloads(batch):
        ours, t_ours = best_time(lambda: per_sample_grads(model, x, y))
        reference, t_loop = best_time(lambda: loop_per_sample_grads(model, x, y))
        error = max_abs_error(ours.values(), reference.values())
        report(f"per-sample gradients, {title}, batch {batch}", error, t_ours, t_loop)


if __name__ == "__main__":
    main()
