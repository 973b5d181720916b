"""The real-model workflows under ``examples/``, each against its stock
PyTorch reference (loops of torch.autograd.grad, a loop over models,
create_graph=True for MAML), at sizes small enough for CI."""

from __future__ import annotations

import warnings

import pytest
import torch

import torchxform

@pytest.fixture(autouse=True)
def no_slow_fallbacks():
    # The workflows must run on rules, not on the per-example loop fallback.
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchxform.SlowFallbackWarning)
        yield


def assert_dicts_close(ours, reference, atol=1e-5, rtol=1e-4):
    assert ours.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("index", range(4), ids=["mlp", "cnn", "transformer", "lstm"])
def test_per_sample_gradients(index, example):
    per_sample_grads = example("per_sample_grads")
    _, model, x, y = per_sample_grads.workloads(batch=6)[index]
    assert_dicts_close(per_sample_grads.per_sample_grads(model, x, y),
                       per_sample_grads.loop_per_sample_grads(model, x, y))


@pytest.mark.parametrize("index", range(4), ids=["mlp-own", "mlp-shared", "cnn-own", "cnn-shared"])
def test_ensembling(index, example):
    ensembling = example("ensembling")
    _, models, minibatches, shared = ensembling.workloads(members=3, batch=5)[index]
    template, params, buffers = ensembling.stack_ensemble(models)
    ours = ensembling.ensemble_forward(template, params, buffers, minibatches, shared)
    torch.testing.assert_close(ours, ensembling.loop_ensemble_forward(models, minibatches, shared))


def test_ensembling_gradients_through_the_stacked_state(example):
    # Training an ensemble: the gradient of the summed losses with respect
    # to the stacked parameters is each model's own gradient.
    ensembling = example("ensembling")
    _, models, minibatches, _ = ensembling.workloads(members=3, batch=5)[2]
    template, params, buffers = ensembling.stack_ensemble(models)
    loss = lambda p: ensembling.ensemble_forward(template, p, buffers, minibatches, False).square().sum()  # noqa: E731
    ours = torchxform.grad(loss)(params)
    for i, model in enumerate(models):
        names, leaves = zip(*model.named_parameters())
        reference = torch.autograd.grad(model(minibatches[i]).square().sum(), leaves)
        assert_dicts_close({n: ours[n][i] for n in names}, dict(zip(names, reference)), atol=1e-4)


def test_maml_meta_gradient(example):
    maml = example("maml")
    model, data = maml.workload(tasks=4, shots=5)
    assert_dicts_close(maml.meta_gradient(model, *data), maml.loop_meta_gradient(model, *data))


def test_empirical_ntk(example):
    ntk = example("ntk")
    model, x1, x2 = ntk.workload(n1=3, n2=2)
    torch.testing.assert_close(ntk.empirical_ntk(model, x1, x2), ntk.loop_empirical_ntk(model, x1, x2),
                               atol=1e-4, rtol=1e-4)


def test_dp_sgd_step_clips_and_noises_like_the_loop(example):
    dp_sgd = example("dp_sgd")
    model, x, y = dp_sgd.workload(batch=8)
    # A clipping norm between the smallest and largest per-example gradient
    # norms, so that some examples are clipped and some are not.
    names, params = zip(*model.named_parameters())
    norms = []
    for i in range(len(x)):
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        norms.append(torch.sqrt(sum((g**2).sum() for g in grads)).item())
    threshold = sorted(norms)[len(norms) // 2]
    assert min(norms) < threshold < max(norms)
    ours = dp_sgd.dp_sgd_step(model, x, y, noise_seed=3, max_grad_norm=threshold)
    assert_dicts_close(ours, dp_sgd.loop_dp_sgd_step(model, x, y, noise_seed=3, max_grad_norm=threshold))


@pytest.mark.parametrize("script", ["per_sample_grads", "ensembling", "maml", "ntk", "dp_sgd"])
def test_example_scripts_run(script, capsys, example):
    module = example(script)
    # The smallest sizes: this checks the script's main path, not speed.
    sizes = {"per_sample_grads": {"batch": 2}, "ensembling": {"members": 2, "batch": 2},
             "maml": {"tasks": 2, "shots": 2}, "ntk": {"n1": 2, "n2": 1}, "dp_sgd": {"batch": 2}}
    module.main(**sizes[script])
    assert "max abs error vs reference" in capsys.readouterr().out
