"""The workloads of the benchmark suite (``benchmarks/suite.py``).

A workload is a function decorated with :func:`workload` that builds its data
(seeded, so every run sees the same numbers) and returns its peers: a dict
from peer name to a zero-argument callable that computes the workload's
result once. The peers:

``torchxform``     the transform written with ``torchxform``;
``torch.func``     the same code with ``torch.func`` in its place;
``torch.compile``  ``torch.compile`` over the ``torch.func`` version (compiled
                   lazily, on its first call);
``loop``           plain PyTorch: a loop of ``torch.autograd.grad`` (or of
                   forward-mode duals, or over models), as one would write it
                   without transforms;
``opacus``         ``opacus.GradSampleModule`` (per-sample workloads only).

The first three come from one ``make(lib)`` that writes the workload against
a transform library (``torchxform`` or ``torch.func``), so they run the very
same code. Every result is a tensor or a dict/tuple of tensors, with the same
structure for every peer, so the suite can check each peer against
``torchxform``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.func
import torch.nn as nn
import torch.nn.functional as F

import torchxform

Peers = dict[str, Callable[[], Any]]

# Opacus's hooks on inputs that do not require grad: PyTorch notes that they see module outputs only.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

COMPUTE = "compute-bound"
OVERHEAD = "overhead-bound"


@dataclass(frozen=True)
class Workload:
    name: str
    group: str  # COMPUTE or OVERHEAD
    description: str
    setup: Callable[[], Peers]


WORKLOADS: list[Workload] = []


def workload(name: str, group: str, description: str):
    def register(setup: Callable[[], Peers]) -> Callable[[], Peers]:
        WORKLOADS.append(Workload(name, group, description, setup))
        return setup
    return register


def transform_peers(make: Callable[[Any], Callable], *args) -> Peers:
    """``torchxform``, ``torch.func`` and ``torch.compile`` peers from one
    ``make(lib)`` that returns the function to call on ``args``."""
    ours, theirs = make(torchxform), make(torch.func)
    compiled = torch.compile(make(torch.func))  # lazy: compiles on its first call
    return {
        "torchxform": lambda: ours(*args),
        "torch.func": lambda: theirs(*args),
        "torch.compile": lambda: compiled(*args),
    }


def detached(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return ({k: v.detach() for k, v in model.named_parameters()},
            {k: v.detach() for k, v in model.named_buffers()})


# --------------------------------------------------------------------------------------------
# Per-sample gradients


def mlp(sizes: tuple[int, ...], act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Two convolutions, each with max pooling, and two linear layers, on 1x28x28."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3)   # 28 -> 26, pooled to 13
        self.conv2 = nn.Conv2d(16, 32, 3)  # 13 -> 11, pooled to 5
        self.fc1 = nn.Linear(32 * 5 * 5, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def per_sample_peers(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Peers:
    """Per-sample gradients of the cross-entropy loss, ``{name: [B, *param.shape]}``."""
    params, buffers = detached(model)

    def make(lib):
        def loss(params, buffers, example, target):
            out = lib.functional_call(model, (params, buffers), (example.unsqueeze(0),))
            return F.cross_entropy(out, target.unsqueeze(0))
        return lib.vmap(lib.grad(loss), in_dims=(None, None, 0, 0))

    peers = transform_peers(make, params, buffers, x, y)
    names, plist = zip(*model.named_parameters())

    def loop():  # one torch.autograd.grad per example
        grads = [torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), plist)
                 for i in range(len(x))]
        return {name: torch.stack([g[j] for g in grads]) for j, name in enumerate(names)}

    peers["loop"] = loop
    peers["opacus"] = lazy(lambda: opacus_peer(model, x, y))  # Opacus may be absent: fails on first call
    return peers


def lazy(build: Callable[[], Callable[[], Any]]) -> Callable[[], Any]:
    """A peer built on its first call (where building can fail, the suite reports why)."""
    run = None

    def call():
        nonlocal run
        if run is None:
            run = build()
        return run()
    return call


def opacus_peer(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], Any]:
    """Returns the Opacus peer (the suite calls this once to build it)."""
    from opacus import GradSampleModule

    # A copy: GradSampleModule hooks the modules it wraps, which must not slow the other peers.
    gsm = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
    named = list(gsm._module.named_parameters())

    def run():
        gsm.zero_grad(set_to_none=True)  # clears .grad and .grad_sample
        # Summed, so that each grad_sample is the gradient of its own example's loss.
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        return {name: p.grad_sample for name, p in named}
    return run


@workload("per-sample MLP b64", COMPUTE, "vmap(grad) per-sample grads, MLP 784-512-512-10, batch 64")
def psg_mlp_b64() -> Peers:
    torch.manual_seed(0)
    return per_sample_peers(mlp((784, 512, 512, 10)), torch.randn(64, 784), torch.randint(10, (64,)))


@workload("per-sample MLP b256", COMPUTE, "vmap(grad) per-sample grads, MLP 784-512-512-10, batch 256")
def psg_mlp_b256() -> Peers:
    torch.manual_seed(0)
    return per_sample_peers(mlp((784, 512, 512, 10)), torch.randn(256, 784), torch.randint(10, (256,)))


@workload("per-sample CNN b64", COMPUTE, "vmap(grad) per-sample grads, 2 conv + pool + 2 linear, 1x28x28, batch 64")
def psg_cnn_b64() -> Peers:
    torch.manual_seed(0)
    return per_sample_peers(SmallCNN(), torch.randn(64, 1, 28, 28), torch.randint(10, (64,)))


# --------------------------------------------------------------------------------------------
# Ensembles


@workload("ensemble 16 MLPs", COMPUTE,
          "vmap(functional_call) over stack_module_state of 16 MLPs 784-256-256-10, shared batch 64")
def ensemble() -> Peers:
    torch.manual_seed(0)
    models = [mlp((784, 256, 256, 10)).requires_grad_(False) for _ in range(16)]
    x = torch.randn(64, 784)
    base = copy.deepcopy(models[0]).to("meta")

    def make(lib):
        params, buffers = lib.stack_module_state(models)
        batched = lib.vmap(lambda p, b, x: lib.functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))
        return lambda x: batched(params, buffers, x)

    peers = transform_peers(make, x)
    peers["loop"] = lambda: torch.stack([m(x) for m in models])  # one model after another
    return peers


# --------------------------------------------------------------------------------------------
# Empirical neural tangent kernel


@workload("NTK MLP 32x32", COMPUTE,
          "empirical NTK, vmap(jacrev) of functional_call w.r.t. params, MLP 16-64-64-10 tanh, 32 x 32 inputs")
def ntk() -> Peers:
    torch.manual_seed(0)
    model = mlp((16, 64, 64, 10), act=nn.Tanh)
    x1, x2 = torch.randn(32, 16), torch.randn(32, 16)
    params, _ = detached(model)

    def make(lib):
        def f(params, x):
            return lib.functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)
        jac = lib.vmap(lib.jacrev(f), in_dims=(None, 0))

        def kernel(params, x1, x2):  # K[n, m, i, j] = sum_p df_i(x1[n])/dp . df_j(x2[m])/dp
            j1, j2 = jac(params, x1), jac(params, x2)
            return sum(torch.einsum("Naf,Mbf->NMab", j1[k].flatten(2), j2[k].flatten(2)) for k in params)
        return kernel

    peers = transform_peers(make, params, x1, x2)
    plist = list(model.parameters())

    def jacobian(x):  # [outputs, all parameters], one autograd.grad per output row
        out = model(x.unsqueeze(0)).squeeze(0)
        rows = [torch.autograd.grad(out[i], plist, retain_graph=True) for i in range(out.numel())]
        return torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])

    def loop():
        j1 = torch.stack([jacobian(x) for x in x1])
        j2 = torch.stack([jacobian(x) for x in x2])
        return torch.einsum("Naf,Mbf->NMab", j1, j2)

    peers["loop"] = loop
    return peers


# --------------------------------------------------------------------------------------------
# Jacobians and Hessians (small, so the transforms' per-op overhead dominates)


def tanh_mlp64():
    torch.manual_seed(0)
    w1, w2 = torch.randn(64, 64) / 8, torch.randn(64, 64) / 8
    b1, b2 = torch.randn(64) / 8, torch.randn(64) / 8

    def f(x):  # works on [64] and on [B, 64]
        return torch.tanh(torch.tanh(x @ w1.T + b1) @ w2.T + b2)
    return f


def reverse_rows_jacobian(f, x):
    """Plain PyTorch: one torch.autograd.grad per output row (torch.autograd.functional.jacobian)."""
    return torch.autograd.functional.jacobian(f, x)


@workload("jacrev 64->64", OVERHEAD, "jacrev of a 64-64-64 tanh MLP at one input")
def jacrev64() -> Peers:
    f = tanh_mlp64()
    x = torch.randn(64)
    peers = transform_peers(lambda lib: lib.jacrev(f), x)
    peers["loop"] = lambda: reverse_rows_jacobian(f, x)
    return peers


@workload("jacfwd 64->64", OVERHEAD, "jacfwd of a 64-64-64 tanh MLP at one input")
def jacfwd64() -> Peers:
    f = tanh_mlp64()
    x = torch.randn(64)
    peers = transform_peers(lambda lib: lib.jacfwd(f), x)
    basis = torch.eye(64)

    def loop():  # one forward-mode dual pass per input column
        cols = []
        with fwAD.dual_level():
            for e in basis:
                cols.append(fwAD.unpack_dual(f(fwAD.make_dual(x, e))).tangent)
        return torch.stack(cols, dim=1)

    peers["loop"] = loop
    return peers


@workload("vmap(jacrev) b128", OVERHEAD, "vmap(jacrev) of a 64-64-64 tanh MLP over a batch of 128")
def vmap_jacrev() -> Peers:
    f = tanh_mlp64()
    xs = torch.randn(128, 64)
    peers = transform_peers(lambda lib: lib.vmap(lib.jacrev(f)), xs)

    def loop():  # one autograd.grad per output row of the batched function (examples are independent)
        x = xs.detach().requires_grad_()
        out = f(x)
        rows = [torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)[0] for i in range(out.shape[1])]
        return torch.stack(rows, dim=1)

    peers["loop"] = loop
    return peers


def scalar_fn32():
    torch.manual_seed(0)
    a, b = torch.randn(16, 32) / 6, torch.randn(32, 32) / 6

    def f(x):  # R^32 -> R
        return torch.logsumexp(a @ torch.tanh(b @ x), 0) + 0.1 * (x * x).sum()
    return f


@workload("hessian 32", OVERHEAD, "hessian (jacfwd(jacrev)) of a scalar function of 32 inputs")
def hessian32() -> Peers:
    f = scalar_fn32()
    x = torch.randn(32)
    peers = transform_peers(lambda lib: lib.hessian(f), x)
    peers["loop"] = lambda: torch.autograd.functional.hessian(f, x)  # double backward, row by row
    return peers


@workload("hvp 32", OVERHEAD, "Hessian-vector product jvp(grad(f)) of a scalar function of 32 inputs")
def hvp32() -> Peers:
    f = scalar_fn32()
    x, v = torch.randn(32), torch.randn(32)
    peers = transform_peers(lambda lib: lambda x, v: lib.jvp(lib.grad(f), (x,), (v,))[1], x, v)

    def double_backward():
        xg = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(f(xg), xg, create_graph=True)
        return torch.autograd.grad(g, xg, v)[0]

    peers["loop"] = double_backward
    return peers


@workload("tiny vmap(grad)", OVERHEAD, "vmap(grad) of a few elementwise ops over 8 scalars: per-call overhead")
def tiny() -> Peers:
    torch.manual_seed(0)
    xs = torch.randn(8)

    def f(x):
        return torch.sin(x) * x + torch.exp(-x * x)

    peers = transform_peers(lambda lib: lib.vmap(lib.grad(f)), xs)

    def loop():
        grads = []
        for x in xs:
            x = x.detach().requires_grad_()
            grads.append(torch.autograd.grad(f(x), x)[0])
        return torch.stack(grads)

    peers["loop"] = loop
    return peers
