"""The attention formulation used off the CPU (NOTE [Attention off the
CPU]), exercised on any device: against PyTorch's own
F.scaled_dot_product_attention eagerly, under vmap (against a loop), grad
(against torch.autograd) and jvp (against torch.autograd.forward_ad)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from tests.harness import assert_close, no_fallback
from torchxform import grad, jvp, vmap
from torchxform.rules.nn import sdpa_math

CASES = {
    "plain": lambda q: {},
    "causal": lambda q: {"is_causal": True},
    "scale": lambda q: {"scale": 0.3},
    "bool_mask": lambda q: {"attn_mask": torch.rand(q.shape[-2], 5) > 0.3},
    "float_mask": lambda q: {"attn_mask": torch.randn(q.shape[-2], 5, dtype=q.dtype)},
    "gqa": lambda q: {"enable_gqa": True},
}


def _inputs(case):
    heads_kv = 1 if case == "gqa" else 2
    q = torch.randn(2, 4, 3, dtype=torch.float64)
    k = torch.randn(heads_kv, 5, 3, dtype=torch.float64)
    v = torch.randn(heads_kv, 5, 3, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("case", list(CASES))
def test_matches_pytorch_and_composes(case):
    torch.manual_seed(0)
    q, k, v = _inputs(case)
    kwargs = CASES[case](q)
    if case == "bool_mask":
        kwargs["attn_mask"][:, 0] = True  # no fully masked row
    assert_close(sdpa_math(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs))

    qs = torch.randn(3, *q.shape, dtype=torch.float64)
    with no_fallback():
        got = vmap(lambda q: sdpa_math(q, k, v, **kwargs))(qs)
    assert_close(got, torch.stack([F.scaled_dot_product_attention(x, k, v, **kwargs) for x in qs]))

    loss = lambda q, k, v: (sdpa_math(q, k, v, **kwargs) ** 2).sum()  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad((F.scaled_dot_product_attention(*leaves, **kwargs) ** 2).sum(), leaves)
    assert_close(grad(loss, argnums=(0, 1, 2))(q, k, v), expected)

    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, dt) for t, dt in zip((q, k, v), tangents)]
        expected = fwAD.unpack_dual(F.scaled_dot_product_attention(*duals, **kwargs)).tangent
    assert_close(jvp(lambda q, k, v: sdpa_math(q, k, v, **kwargs), (q, k, v), tangents)[1], expected)


def test_the_patch_is_removed_after_transforms():
    original = F.scaled_dot_product_attention
    vmap(lambda q: F.scaled_dot_product_attention(q, q, q))(torch.randn(2, 3, 4))
    assert F.scaled_dot_product_attention is original
