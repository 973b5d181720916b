"""Fourier transforms and pairwise distances under vmap, against a loop."""

import pytest
import torch

from tests.harness import check_vmap_sampled, no_fallback

FFT = [
    ("fft", lambda x: torch.fft.fft(x, dim=0), torch.randn),
    ("ifft_norm", lambda x: torch.fft.ifft(x, norm="ortho"), torch.randn),
    ("rfft", torch.fft.rfft, torch.randn),
    ("rfft2", torch.fft.rfft2, torch.randn),
    ("irfft", lambda x: torch.fft.irfft(torch.fft.rfft(x)), torch.randn),
    ("fftn", lambda x: torch.fft.fftn(x, dim=(0, 1)), torch.randn),
    ("hfft", lambda x: torch.fft.hfft(x.to(torch.complex128)), lambda *s: torch.randn(*s, dtype=torch.float64)),
]


@pytest.mark.parametrize("name,fn,make", FFT, ids=[f[0] for f in FFT])
def test_fft(name, fn, make):
    with no_fallback():
        check_vmap_sampled(fn, lambda: (make(4, 6),))


@pytest.mark.parametrize("p", [1.0, 2.0, float("inf")])
def test_cdist(p):
    with no_fallback():
        check_vmap_sampled(lambda a, b: torch.cdist(a, b, p=p), lambda: (torch.randn(5, 3), torch.randn(4, 3)))
        check_vmap_sampled(lambda a, b: torch.cdist(a, b, p=p), lambda: (torch.randn(2, 5, 3), torch.randn(2, 4, 3)))


INPLACE_UNTAGGED = [
    # self is built from both inputs, so it is batched whenever one is
    ("eq_", lambda x, y: (x + y).eq_(y)),
    ("gt_", lambda x, y: (x + y).gt_(y)),
    ("copysign_", lambda x, y: (x + y).copysign_(y)),
    ("threshold_", lambda x, y: torch.nn.functional.threshold_(x.clone() + y, 0.1, 20.0)),
    ("tril_", lambda x, y: x.clone().tril_() + y),
    ("rsub", lambda x, y: torch.rsub(x, y, alpha=2)),
    ("polar", lambda x, y: torch.polar(x.abs(), y)),
    ("complex", torch.complex),
]


@pytest.mark.parametrize("name,fn", INPLACE_UNTAGGED, ids=[f[0] for f in INPLACE_UNTAGGED])
def test_elementwise_untagged(name, fn):
    with no_fallback():
        check_vmap_sampled(fn, lambda: (torch.randn(3, 3), torch.randn(3, 3)))
