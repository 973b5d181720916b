"""rearrange against einops.rearrange (the reference), under vmap against a
loop, under grad against torch.autograd, and torch.func's errors."""

import pytest
import torch

from torchxform import grad, rearrange, vmap
from tests.harness import assert_close

einops = pytest.importorskip("einops")

PATTERNS = [
    ("b h w c -> b c h w", {}),
    ("b h w c -> (b h) w c", {}),
    ("b h w c -> h (b w) c", {}),
    ("b h w c -> b (c h w)", {}),
    ("b (h1 h) (w1 w) c -> (b h1 w1) h w c", {"h1": 2, "w1": 2}),
    ("b (h h1) (w w1) c -> b h w (c h1 w1)", {"h1": 2, "w1": 2}),
    ("b ... c -> c ... b", {}),
    ("... c -> (...) c", {}),
    ("b h ... -> b 1 h () ...", {}),
    ("b 1 h w c -> b h w c", {}),
    ("... -> ...", {}),
]


@pytest.mark.parametrize("pattern, lengths", PATTERNS, ids=[p for p, _ in PATTERNS])
def test_rearrange_matches_einops(pattern, lengths):
    x = torch.randn(2, 4, 6, 3) if " 1 h w c" not in pattern else torch.randn(2, 1, 4, 6, 3)
    assert torch.equal(rearrange(x, pattern, **lengths), einops.rearrange(x, pattern, **lengths))


def test_rearrange_of_a_list_stacks():
    xs = [torch.randn(4, 5) for _ in range(3)]
    assert torch.equal(rearrange(xs, "n h w -> h (n w)"), einops.rearrange(xs, "n h w -> h (n w)"))


def test_rearrange_under_vmap_and_grad():
    x = torch.randn(5, 4, 6, 3)
    pattern = "(h h1) w c -> h (w c h1)"
    got = vmap(lambda t: rearrange(t, pattern, h1=2))(x)
    assert_close(got, torch.stack([einops.rearrange(t, pattern, h1=2) for t in x]))
    weights = torch.randn(2, 18 * 2)
    loss = lambda t: (rearrange(t, pattern, h1=2) * weights).sum()  # noqa: E731
    leaf = x[0].clone().requires_grad_()
    expected = torch.autograd.grad((einops.rearrange(leaf, pattern, h1=2) * weights).sum(), leaf)[0]
    assert_close(grad(loss)(x[0]), expected)


@pytest.mark.parametrize(
    "pattern, lengths, match",
    [
        ("a b c -> a b c d", {}, "only on one side"),
        ("a b -> a b", {}, "Number of dimensions"),
        ("a b c -> a b", {}, "only on one side"),
        ("a a c -> a c", {}, "more than once"),
        ("(a b) c d -> a b c d", {}, "cannot infer"),
        ("(a b) c d -> a b c d", {"a": 5}, "cannot be split"),
        ("a b c -> a b c", {"z": 2}, "not in the pattern"),
        ("a b c", {}, "'->'"),
        ("a ... -> a", {}, "both sides"),
    ],
)
def test_rearrange_errors(pattern, lengths, match):
    with pytest.raises(ValueError, match=match):
        rearrange(torch.randn(2, 3, 4), pattern, **lengths)
