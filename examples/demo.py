"""``python examples/demo.py``: torchxform's transforms on real models,
each checked against a plain Python loop and timed next to it.

Everything runs on the CPU with random weights and data made here (no
downloads), in a few seconds.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchxform import functional_call, grad, vmap

try:
    from _common import best_time
except ImportError:  # imported as examples.demo
    from ._common import best_time


def _timed(fn):
    return best_time(fn, repeats=5)


def _report(title: str, ours, loop) -> None:
    (out, t_ours), (ref, t_loop) = ours, loop
    err = (out - ref).abs().max().item()
    print(f"{title}\n    max |torchxform - loop| = {err:.2e}    torchxform {t_ours * 1e3:7.2f} ms"
          f"    loop {t_loop * 1e3:7.2f} ms    ({t_loop / t_ours:.1f}x)")
    if not err < 1e-4:
        raise SystemExit(f"demo: {title}: torchxform disagrees with the loop (max error {err})")


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1)))).log_softmax(-1)


def mlp(params, x):
    """A two-layer MLP written functionally, so its weights can be batched."""
    w1, b1, w2, b2 = params
    return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)


def main() -> None:
    torch.manual_seed(0)
    print("torchxform demo (CPU, random weights and data)\n")

    # 1. One CNN (eval mode) over 32 minibatches of 4 images at once: vmap
    #    adds the leading "which minibatch" dim without touching the model.
    model = SmallCNN().eval()
    batches = torch.randn(32, 4, 1, 28, 28)
    with torch.no_grad():
        ours = _timed(lambda: vmap(model)(batches))
        loop = _timed(lambda: torch.stack([model(b) for b in batches]))
    _report("1. CNN (conv-bn-relu-pool x2, linear x2) on 32 minibatches of 4 images", ours, loop)

    # 2. An ensemble of 16 MLPs (784-128-10) on one shared minibatch: the
    #    weights carry the batch dim, the data does not (in_dims=(0, None)).
    members = 16
    params = (
        torch.randn(members, 128, 784) * 784**-0.5,
        torch.zeros(members, 128),
        torch.randn(members, 10, 128) * 128**-0.5,
        torch.zeros(members, 10),
    )
    x = torch.randn(64, 784)
    ours = _timed(lambda: vmap(mlp, in_dims=(0, None))(params, x))
    loop = _timed(lambda: torch.stack([mlp([p[i] for p in params], x) for i in range(members)]))
    _report("2. ensemble of 16 MLPs (784-128-10), shared minibatch of 64", ours, loop)

    # 3. Per-example pairwise distances: vmap of a function written for one
    #    point set, over 256 point sets.
    points = torch.randn(256, 50, 3)
    dist = lambda p: ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1).sqrt()  # noqa: E731
    ours = _timed(lambda: vmap(dist)(points))
    loop = _timed(lambda: torch.stack([dist(p) for p in points]))
    _report("3. pairwise distances of 256 sets of 50 points", ours, loop)

    # 4. Per-sample gradients of the CNN (the workflow of differential
    #    privacy): vmap over examples of grad of the loss of one example.
    #    The loop is one torch.autograd.grad per example.
    images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(params, buffers, image, label):
        log_probs = functional_call(model, (params, buffers), (image.unsqueeze(0),))
        return F.nll_loss(log_probs, label.unsqueeze(0))

    def flat(grads):  # [examples, all parameters]
        return torch.cat([g.flatten(1) for g in grads], dim=1)

    per_sample_grads = vmap(grad(loss), in_dims=(None, None, 0, 0))
    ours = _timed(lambda: flat(per_sample_grads(params, buffers, images, labels).values()))
    loop = _timed(lambda: flat(
        torch.stack(g) for g in zip(*[
            torch.autograd.grad(F.nll_loss(model(images[i : i + 1]), labels[i : i + 1]), list(model.parameters()))
            for i in range(len(images))
        ])
    ))
    _report("4. per-sample gradients of the CNN, 64 examples", ours, loop)
    print("\nAll results match the Python loop.")


if __name__ == "__main__":
    main()
