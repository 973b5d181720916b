"""Derivatives of view/shape ops and of reductions, scans and softmax,
against torch.autograd (tests/autograd_harness.py)."""

import pytest
import torch
import torch.nn.functional as F

from tests.autograd_harness import check_derivatives

D = torch.float64


def randn(*shape):
    return torch.randn(*shape, dtype=D)


VIEWS = [
    ("view", lambda x: x.view(6, 4) * 2),
    ("reshape_noncontig", lambda x: x.transpose(0, 1).reshape(-1)),
    ("flatten", lambda x: x.flatten(1)),
    ("permute", lambda x: x.permute(2, 0, 1)),
    ("transpose", lambda x: x.transpose(-1, 0)),
    ("t", lambda x: x[0].t()),
    ("expand", lambda x: x[:, :1].expand(5, 2, 3, 4)),
    ("squeeze_unsqueeze", lambda x: x.unsqueeze(1).squeeze(1).unsqueeze(-1).squeeze()),
    ("slice", lambda x: x[:, 1:3, ::2]),
    ("select", lambda x: x[1, 2]),
    ("narrow", lambda x: x.narrow(2, 1, 2)),
    ("split", lambda x: x.split([1, 2], 1)[1] * 3),
    ("chunk_both", lambda x: x.chunk(2, -1)[0] + x.chunk(2, -1)[1]),
    ("unbind", lambda x: torch.stack(x.unbind(1)[::-1])),
    ("diagonal", lambda x: x.diagonal(0, 1, 2)),
    ("diagonal_offset", lambda x: x.diagonal(1, 0, 2)),
    ("unfold", lambda x: x.unfold(1, 2, 1)),
    ("cat", lambda x: torch.cat([x, x * 2, x[:, :1]], 1)),
    ("stack", lambda x: torch.stack([x, x.sin()], -1)),
    ("repeat", lambda x: x.repeat(2, 1, 1, 2)),
    ("flip", lambda x: x.flip(0, 2)),
    ("roll", lambda x: x.roll((1, -2), (0, 2))),
    ("roll_flat", lambda x: x.roll(3)),
    ("rot90", lambda x: x.rot90(1, (1, 2))),
    ("tril", lambda x: x.tril(1)),
    ("triu", lambda x: x.triu(-1)),
    ("movedim", lambda x: x.movedim(0, -1)),
    ("contiguous", lambda x: x.transpose(0, 2).contiguous()),
]


@pytest.mark.parametrize("name,fn", VIEWS, ids=[v[0] for v in VIEWS])
def test_views(name, fn):
    check_derivatives(fn, lambda: (randn(2, 3, 4),), msg=name)


REDUCTIONS = [
    ("sum", lambda x: x.sum()),
    ("sum_dim", lambda x: x.sum(1)),
    ("sum_dims_keepdim", lambda x: x.sum((0, 2), keepdim=True)),
    ("sum_dtype", lambda x: x.sum(-1, dtype=torch.float32).double()),
    ("nansum", lambda x: x.nansum(1)),
    ("mean", lambda x: x.mean()),
    ("mean_dim", lambda x: x.mean((-1, 0))),
    ("prod", lambda x: x.prod()),
    ("prod_dim", lambda x: x.prod(1, keepdim=True)),
    ("prod_with_zero", lambda x: torch.cat([x[:, :1] * 0, x[:, 1:]], 1).prod(1)),
    ("amax", lambda x: x.amax(1)),
    ("amin_ties", lambda x: x.round().amin((0, 1)) + x.sum() * 0),
    ("max_all", lambda x: x.max()),
    ("max_dim", lambda x: x.max(2).values),
    ("min_dim_keepdim", lambda x: x.min(0, keepdim=True)[0]),
    ("var", lambda x: x.var(1)),
    ("var_correction0", lambda x: x.var((0, 2), correction=0)),
    ("std", lambda x: x.std(-1, keepdim=True)),
    ("var_mean", lambda x: torch.var_mean(x, 1)[0] + torch.var_mean(x, 1)[1]),
    ("std_mean", lambda x: torch.std_mean(x, (1, 2))[0] * torch.std_mean(x, (1, 2))[1]),
    ("logsumexp", lambda x: x.logsumexp(1)),
    ("norm2", lambda x: x.norm()),
    ("norm1_dim", lambda x: x.norm(1, dim=1)),
    ("norm3", lambda x: torch.linalg.vector_norm(x, 3, dim=(0, 1))),
    ("norm_inf", lambda x: torch.linalg.vector_norm(x, float("inf"), dim=1)),
    ("cumsum", lambda x: x.cumsum(1)),
    ("cumprod", lambda x: x.cumprod(2)),
    ("cumprod_zero", lambda x: torch.cat([x[..., :1], x[..., 1:2] * 0, x[..., 2:]], -1).cumprod(-1)),
    ("cummax", lambda x: x.cummax(1).values),
    ("cummin", lambda x: x.cummin(0)[0]),
    ("logcumsumexp", lambda x: x.logcumsumexp(2)),
    ("softmax", lambda x: x.softmax(1)),
    ("log_softmax", lambda x: F.log_softmax(x, -1)),
    ("sort", lambda x: x.sort(1).values),
    ("sort_desc", lambda x: x.sort(-1, descending=True)[0]),
    ("topk", lambda x: x.topk(2, dim=2).values),
    ("kthvalue", lambda x: x.kthvalue(2, 1).values),
    ("median_dim", lambda x: x.median(1).values),
    ("median_all", lambda x: x.median()),
    ("mode_dim", lambda x: x.round().mode(1).values + x.sum(1) * 0),
]


@pytest.mark.parametrize("name,fn", REDUCTIONS, ids=[r[0] for r in REDUCTIONS])
def test_reductions(name, fn):
    check_derivatives(fn, lambda: (randn(2, 3, 4),), msg=name)


def test_zero_dim_reductions():
    for fn in (lambda x: x.sum(), lambda x: x.mean(0), lambda x: x.cumsum(0), lambda x: x.softmax(0)):
        check_derivatives(fn, lambda: (torch.randn((), dtype=D),))


COMPLEX = [
    ("sum", lambda z: z.sum(1)),
    ("mean", lambda z: z.mean()),
    ("prod", lambda z: z.prod(1)),
    ("cumsum", lambda z: z.cumsum(0)),
    ("cumprod", lambda z: z.cumprod(1)),
    ("logsumexp", lambda z: z.logsumexp(1)),
    ("var", lambda z: z.var(1)),
    ("norm", lambda z: torch.linalg.vector_norm(z, dim=1)),
    ("views", lambda z: z.t()[1:].reshape(-1).flip(0) * 2j),
    ("conj_real_imag", lambda z: z.conj() * z.real + z.imag),
]


@pytest.mark.parametrize("name,fn", COMPLEX, ids=[c[0] for c in COMPLEX])
def test_complex(name, fn):
    check_derivatives(fn, lambda: (torch.randn(3, 4, dtype=torch.complex128),), msg=name)
