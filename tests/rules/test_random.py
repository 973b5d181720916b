"""Batching rules of random ops under vmap's three ``randomness`` modes.

Random values cannot be compared with a per-example loop; the references are:

* 'same': with the RNG seeded alike, every example equals the plain op's draw
  of the logical shape.
* 'different': the rules draw the whole physical ``[B, *shape]`` tensor in
  one call (NOTE [vmap randomness] in rules/random.py), so with the same seed
  the result equals the plain op drawing ``[B, *shape]``; plus distribution
  checks (per-example means and frequencies over large samples) that a wrong
  parameter or a shared draw cannot pass by accident.
* 'error': torch.func's error.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchxform
from tests.harness import ON_ACCELERATOR, assert_close, check_vmap, no_fallback, skip_cpu_reference_rows
from torchxform._core.registry import BATCH_RULES, batching_coverage
from torchxform._core.schema import is_out_variant

aten = torch.ops.aten
B = 4
SEED = 1234
MODES = ["error", "same", "different"]
ERROR_MODE = "called random operation while in randomness error mode"
SAME_BATCHED = "Vmap does not currently support same randomness with a batched tensor input"
DIFFERENT_UNBATCHED = "Cannot ask for different inplace randomness on an unbatched tensor"


def seeded(fn, *args, **kwargs):
    torch.manual_seed(SEED)
    return fn(*args, **kwargs)


def vmapped(fn, *args, randomness, in_dims=0, chunk_size=None):
    torch.manual_seed(SEED)
    with no_fallback():
        return torchxform.vmap(fn, in_dims=in_dims, randomness=randomness, chunk_size=chunk_size)(*args)


def assert_every_example(out, expected):
    assert out.shape == (out.shape[0],) + expected.shape, (out.shape, expected.shape)
    for i in range(out.shape[0]):
        assert_close(out[i], expected, msg=f"example {i}")


def assert_examples_differ(out):
    """'different' randomness: the examples are not all the same draw.  (Two
    examples may coincide by chance when a draw is a few values from a small
    range, so this does not demand that every pair differ.)"""
    flat = out.reshape(out.shape[0], -1)
    assert any(not torch.equal(flat[0], flat[i]) for i in range(1, out.shape[0])), "every example drew the same values"


def assert_error_mode(fn, *args, in_dims=0):
    with pytest.raises(RuntimeError, match=ERROR_MODE):
        vmapped(fn, *args, randomness="error", in_dims=in_dims)


def stacked(example, batch=B, dim=0):
    return torch.stack([example() for _ in range(batch)], dim)


# -- factories: rand, randn, randint, normal(float, float, size), randperm ------

# (name, draw(prefix)): draw(()) is one example's draw, draw((B,)) the whole
# batch's draw under 'different'.
FACTORIES = [
    ("rand", lambda pre: torch.rand(*pre, 2, 3)),
    ("rand_f64", lambda pre: torch.rand(*pre, 5, dtype=torch.float64)),
    ("rand_0dim", lambda pre: torch.rand(pre)),
    ("randn_size1", lambda pre: torch.randn(*pre, 1, 3)),
    ("randint", lambda pre: torch.randint(1000, (*pre, 3))),
    ("randint_low_int32", lambda pre: torch.randint(-500, 500, (*pre, 2, 2), dtype=torch.int32)),
    ("normal_float_float", lambda pre: torch.normal(2.0, 3.0, (*pre, 4))),
    ("normal_float_float_f64", lambda pre: torch.normal(-1.0, 0.5, (*pre, 4), dtype=torch.float64)),
]


@pytest.mark.parametrize("name,draw", FACTORIES, ids=[row[0] for row in FACTORIES])
def test_factory(name, draw):
    x = torch.zeros(B)
    assert_error_mode(lambda _: draw(()), x)
    out = vmapped(lambda _: draw(()), x, randomness="same")
    assert_every_example(out, seeded(draw, ()))
    out = vmapped(lambda _: draw(()), x, randomness="different")
    assert_close(out, seeded(draw, (B,)))
    if name != "rand_0dim":
        assert_examples_differ(out)


GENERATOR_FACTORIES = [
    ("rand", lambda pre, g: torch.rand(*pre, 3, generator=g)),
    ("randn", lambda pre, g: torch.randn(*pre, 3, generator=g)),
    ("randint", lambda pre, g: torch.randint(100, (*pre, 3), generator=g)),
    ("randint_low", lambda pre, g: torch.randint(-9, 9, (*pre, 3), generator=g)),
    ("normal", lambda pre, g: torch.normal(0.0, 1.0, (*pre, 3), generator=g)),
]


@pytest.mark.parametrize("name,draw", GENERATOR_FACTORIES, ids=[row[0] for row in GENERATOR_FACTORIES])
def test_factory_with_generator(name, draw):
    reason = "torch.normal(mean, std, size) ignores the default device: it cannot draw from a CUDA generator"
    skip_cpu_reference_rows(name, {"normal": reason})
    g = torch.Generator(torch.get_default_device())
    x = torch.zeros(B)
    for mode, prefix in [("same", ()), ("different", (B,))]:
        global_state = torch.get_rng_state()
        g.manual_seed(7)
        with no_fallback():
            out = torchxform.vmap(lambda _: draw((), g), randomness=mode)(x)
        assert torch.equal(torch.get_rng_state(), global_state), "drew from the global generator"
        g.manual_seed(7)
        expected = draw(prefix, g)
        if mode == "same":
            assert_every_example(out, expected)
        else:
            assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64])
def test_randperm(dtype):
    n = 6
    x = torch.zeros(B)
    assert_error_mode(lambda _: torch.randperm(n, dtype=dtype), x)
    out = vmapped(lambda _: torch.randperm(n, dtype=dtype), x, randomness="same")
    assert_every_example(out, seeded(torch.randperm, n, dtype=dtype))
    out = vmapped(lambda _: torch.randperm(n, dtype=dtype), x, randomness="different")
    assert out.dtype == dtype and out.shape == (B, n)
    assert torch.equal(out.sort(1).values, torch.arange(n, dtype=dtype).expand(B, n))
    assert_examples_differ(out)
    # The rule sorts i.i.d. float64 uniform keys: that draw, seeded alike.
    assert_close(out, seeded(lambda: torch.rand(B, n, dtype=torch.float64).argsort(1).to(dtype)))


def test_randperm_uniform_and_errors():
    out = vmapped(lambda _: torch.randperm(4), torch.zeros(4000), randomness="different")
    position_of_zero = (out == 0).int().argmax(1)
    counts = torch.bincount(position_of_zero, minlength=4)
    assert (counts - 1000).abs().max() < 150, counts  # sd ~27
    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    out = vmapped(lambda _: torch.randperm(5, generator=g), torch.zeros(B), randomness="different")
    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    assert_close(out, torch.rand(B, 5, dtype=torch.float64, generator=g).argsort(1))
    # nested: B1*B2 permutations, from the [B1, B2, n] keys the outer level draws
    inner = torchxform.vmap(lambda _: torch.randperm(5), randomness="different")
    out = vmapped(inner, torch.zeros(2, 3), randomness="different")
    assert_close(out, seeded(lambda: torch.rand(2, 3, 5, dtype=torch.float64).argsort(-1)))
    with pytest.raises(RuntimeError, match="without overflow"):
        vmapped(lambda _: torch.randperm(200, dtype=torch.int8), torch.zeros(B), randomness="different")
    with pytest.raises(RuntimeError, match="negative dimension"):
        vmapped(lambda _: torch.randperm(-1), torch.zeros(B), randomness="different")


# -- ops that take their shape from a tensor: rand_like, bernoulli(x, p), ... --

LIKE = [
    ("rand_like", torch.rand_like),
    ("randn_like", torch.randn_like),
    ("rand_like_f64", lambda x: torch.rand_like(x, dtype=torch.float64)),
    ("randint_like", lambda x: torch.randint_like(x, 1000)),
    ("randint_like_low", lambda x: torch.randint_like(x, -50, 50, dtype=torch.int64)),
    ("bernoulli_p", lambda x: torch.bernoulli(x, 0.3)),
    ("uniform", lambda x: aten.uniform(x, -2.0, 3.0)),
    ("normal_functional", lambda x: aten.normal_functional(x, 1.0, 2.0)),
    ("exponential", lambda x: aten.exponential(x, 1.5)),
    ("geometric", lambda x: aten.geometric(x, 0.3)),
    ("log_normal", lambda x: aten.log_normal(x)),
    ("cauchy", lambda x: aten.cauchy(x)),
    ("random", lambda x: aten.random(x)),
    ("random_from", lambda x: aten.random(x, -10, 10)),
    ("random_to", lambda x: aten.random(x, 50)),
]
LIKE_SHAPES = [(2, 3), (), (1, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,fn", LIKE, ids=[row[0] for row in LIKE])
def test_like(name, fn, dtype):
    for shape in LIKE_SHAPES:
        x = torch.randn(B, *shape, dtype=dtype)
        assert_error_mode(fn, x)
        out = vmapped(fn, x, randomness="same")
        assert_every_example(out, seeded(fn, x[0]))
        for in_dim in (0, -1):
            physical = x.movedim(0, in_dim)
            out = vmapped(fn, physical, randomness="different", in_dims=in_dim)
            # The rule draws the physical tensor as it is laid out.
            assert_close(out, seeded(fn, physical).movedim(in_dim, 0))
            if shape != () or name not in ("bernoulli_p", "geometric"):
                assert_examples_differ(out)
        # An unbatched input: drawn as if expanded to the batch.
        out = vmapped(lambda a, _: fn(a), x[0], torch.zeros(B), randomness="different", in_dims=(None, 0))
        assert_close(out, seeded(fn, x[0].expand(B, *shape)))
        out = vmapped(lambda a, _: fn(a), x[0], torch.zeros(B), randomness="same", in_dims=(None, 0))
        assert_every_example(out, seeded(fn, x[0]))


def test_like_memory_format():
    x = torch.randn(B, 2, 3, 4, 5)
    for mode in ("same", "different"):
        out = vmapped(lambda a: torch.rand_like(a, memory_format=torch.channels_last), x, randomness=mode)
        assert all(out[i].is_contiguous(memory_format=torch.channels_last) for i in range(B))
    with pytest.raises(RuntimeError, match="required rank 4"):
        vmapped(lambda a: torch.rand_like(a[0], memory_format=torch.channels_last), x, randomness="different")


def test_empty_batch():
    x = torch.randn(0, 3)
    for mode in ("same", "different"):
        assert vmapped(torch.rand_like, x, randomness=mode).shape == (0, 3)
        assert vmapped(lambda a: a.clone().uniform_(), x, randomness=mode).shape == (0, 3)
        assert vmapped(lambda a: F.dropout(a, 0.5), x, randomness=mode).shape == (0, 3)


# -- randint_like with a tensor `high`, which may differ per example ----------


def test_randint_like_tensor_high():
    x = torch.zeros(B, 2000)
    high = torch.tensor([2, 4, 7, 100])
    fn = lambda a, h: torch.randint_like(a, h)  # noqa: E731
    assert_error_mode(fn, x, high)
    for mode in ("same", "different"):
        out = vmapped(fn, x, high, randomness=mode)
        assert out.dtype == x.dtype and out.shape == x.shape
        assert ((out >= 0) & (out < high[:, None])).all()
        for i, h in enumerate(high.tolist()):  # uniform over [0, h)
            counts = torch.bincount(out[i].long(), minlength=h).float()
            expected = 2000 / h
            assert (counts - expected).abs().max() < 5 * math.sqrt(expected) + 1, (h, counts)
    same = vmapped(fn, x, high, randomness="same")
    # Shared draws: r % 4 % 2 == r % 2.
    assert torch.equal(same[1] % 2, same[0])
    different = vmapped(fn, x, high, randomness="different")
    assert not torch.equal(different[1] % 2, different[0])
    # An unbatched high: the ordinary like rule.
    # (randint_like takes a tensor high on the CPU only)
    out = vmapped(lambda a: torch.randint_like(a, torch.tensor(5, device="cpu")), x, randomness="different")
    assert_close(out, seeded(lambda: torch.randint_like(x, 5)))
    with pytest.raises(RuntimeError, match="random_ expects"):
        vmapped(fn, x, torch.tensor([2, 0, 3, 4]), randomness="different")


# -- in-place random ops --------------------------------------------------------

# made in the test, on its default device
P_TENSOR = lambda: torch.tensor([0.2, 0.5, 0.7, 0.4, 0.9])
INPLACE = [
    ("uniform_", lambda t: t.uniform_(-1.0, 2.0)),
    ("normal_", lambda t: t.normal_(1.0, 2.0)),
    ("exponential_", lambda t: t.exponential_()),
    ("geometric_", lambda t: t.geometric_(0.2)),
    ("log_normal_", lambda t: t.log_normal_()),
    ("cauchy_", lambda t: t.cauchy_()),
    ("random_", lambda t: t.random_()),
    ("random_to", lambda t: t.random_(100)),
    ("random_from_to", lambda t: t.random_(-5, 5)),
    ("bernoulli_float", lambda t: t.bernoulli_(0.3)),
    ("bernoulli_unbatched_tensor_p", lambda t: t.bernoulli_(P_TENSOR())),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,fn_", INPLACE, ids=[row[0] for row in INPLACE])
def test_inplace(name, fn_, dtype):
    shape = (4, 5)
    x = torch.randn(B, *shape, dtype=dtype)

    def fn(a):
        t = a.clone()
        assert fn_(t) is t  # in-place ops return their input
        return t

    assert_error_mode(fn, x)
    out = vmapped(fn, x, randomness="same")
    assert_every_example(out, seeded(fn_, torch.empty(shape, dtype=dtype)))
    for in_dim in (0, 1):
        physical = x.movedim(0, in_dim)
        out = vmapped(fn, physical, randomness="different", in_dims=in_dim)
        assert out.dtype == dtype
        assert_examples_differ(out)
        if name != "bernoulli_unbatched_tensor_p" or in_dim == 0:
            assert_close(out, seeded(lambda: fn_(physical.clone())).movedim(in_dim, 0))
    # An unbatched self: 'same' draws it once; 'different' cannot.
    unbatched = lambda _: fn_(torch.empty(shape, dtype=dtype))  # noqa: E731
    out = vmapped(unbatched, x, randomness="same")
    assert_every_example(out, seeded(fn_, torch.empty(shape, dtype=dtype)))
    with pytest.raises(RuntimeError, match=DIFFERENT_UNBATCHED):
        vmapped(unbatched, x, randomness="different")


def test_inplace_integer_self():
    x = torch.zeros(B, 5, dtype=torch.int64)
    out = vmapped(lambda a: a.clone().random_(3, 9), x, randomness="different")
    assert out.dtype == torch.int64 and ((out >= 3) & (out < 9)).all()
    assert_close(out, seeded(lambda: x.clone().random_(3, 9)))
    with pytest.raises(RuntimeError, match="expects 'from' to be less than 'to'"):
        vmapped(lambda a: a.clone().random_(9, 3), x, randomness="different")


# -- ops with tensor parameters -------------------------------------------------

# (name, fn, sample(): one example's parameters, same_ok: 'same' works with
# batched parameters, reference(*stacked) for the physical draw)
PARAMS = [
    ("normal_tensor_float", lambda m: torch.normal(m, 2.0), lambda: (torch.randn(2, 3),), True, None),
    ("normal_float_tensor", lambda s: torch.normal(1.0, s), lambda: (torch.rand(3) + 0.5,), True, None),
    (
        "normal_tensor_tensor",
        lambda m, s: torch.normal(m, s),
        lambda: (torch.randn(2, 3), torch.rand(2, 3) + 0.5),
        True,
        None,
    ),
    ("normal_0dim", lambda m: torch.normal(m, 1.0), lambda: (torch.randn(()),), True, None),
    ("normal_f64", lambda m: torch.normal(m, 1.0), lambda: (torch.randn(3, dtype=torch.float64),), True, None),
    ("bernoulli", torch.bernoulli, lambda: (torch.rand(2, 3),), True, None),
    ("bernoulli_f64", torch.bernoulli, lambda: (torch.rand(4, dtype=torch.float64),), True, None),
    ("poisson", torch.poisson, lambda: (torch.rand(3) * 5,), False, None),
    ("standard_gamma", torch._standard_gamma, lambda: (torch.rand(3) + 0.5,), False, None),
    (
        "binomial",
        torch.binomial,
        lambda: (torch.randint(1, 20, (3,)).float(), torch.rand(3)),
        False,
        None,
    ),
    ("dirichlet", torch._sample_dirichlet, lambda: (torch.rand(2, 3) + 0.5,), False, None),
    ("dirichlet_0dim", torch._sample_dirichlet, lambda: (torch.rand(()) + 0.5,), False, lambda a: torch.ones_like(a)),
    ("multinomial", lambda p: torch.multinomial(p, 3), lambda: (torch.rand(5) + 0.1,), False, None),
    (
        "multinomial_2d_replacement",
        lambda p: torch.multinomial(p, 6, True),
        lambda: (torch.rand(2, 4) + 0.1,),
        False,
        lambda p: torch.multinomial(p.reshape(-1, 4), 6, True).view(p.shape[0], 2, 6),
    ),
]


@pytest.mark.parametrize("name,fn,sample,same_ok,reference", PARAMS, ids=[row[0] for row in PARAMS])
def test_params(name, fn, sample, same_ok, reference):
    reference = reference or fn
    examples = [sample() for _ in range(B)]
    params = [torch.stack(column) for column in zip(*examples)]
    assert_error_mode(fn, *params)
    # 'different', every parameter batched at 0: the op on the physical values.
    out = vmapped(fn, *params, randomness="different")
    expected = seeded(reference, *params)
    assert_close(out, expected)
    if name != "dirichlet_0dim":
        assert_examples_differ(out)
    # Parameters batched elsewhere: same values, examples still independent.
    moved = [p.movedim(0, -1) for p in params]
    out = vmapped(fn, *moved, randomness="different", in_dims=-1)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    # Unbatched parameters: 'different' expands them to the batch...
    dummy = torch.zeros(B)
    unbatched = lambda _, *ps: fn(*ps)  # noqa: E731
    in_dims = (0,) + (None,) * len(params)
    out = vmapped(unbatched, dummy, *examples[0], randomness="different", in_dims=in_dims)
    first, *rest = examples[0]
    assert_close(out, seeded(reference, first.expand(B, *first.shape), *rest))
    # ... and 'same' draws them once.
    out = vmapped(unbatched, dummy, *examples[0], randomness="same", in_dims=in_dims)
    assert_every_example(out, seeded(fn, *examples[0]))
    if not same_ok:
        with pytest.raises(RuntimeError, match=SAME_BATCHED):
            vmapped(fn, *params, randomness="same")


def test_normal_same_shares_the_standard_normal_draw():
    mean = torch.tensor([-5.0, 0.0, 5.0, 10.0])[:, None].expand(B, 6).contiguous()
    std = torch.tensor([0.5, 1.0, 2.0, 3.0])[:, None].expand(B, 6).contiguous()
    z = seeded(torch.randn, 6)
    cases = [  # (fn, args, in_dims, expected)
        (lambda m, s: torch.normal(m, s), (mean, std), 0, mean + std * z),
        (lambda m: torch.normal(m, 2.0), (mean,), 0, mean + 2.0 * z),
        (lambda s: torch.normal(1.0, s), (std,), 0, 1.0 + std * z),
        (lambda m, s: torch.normal(m, s), (mean, std[0]), (0, None), mean + std[0] * z),
    ]
    for fn, args, in_dims, expected in cases:
        out = vmapped(fn, *args, randomness="same", in_dims=in_dims)
        assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="normal expects all elements of std >= 0.0"):
        vmapped(lambda s: torch.normal(0.0, s), -std, randomness="same")
    with pytest.raises(RuntimeError, match="normal expects std >= 0.0"):
        vmapped(lambda m: torch.normal(m, -1.0), mean, randomness="same")


def test_bernoulli_same_shares_the_uniform_draw():
    p = torch.rand(B, 5, 7)
    out = vmapped(torch.bernoulli, p, randomness="same")
    u = seeded(torch.rand, 5, 7)
    assert_close(out, (u < p).float())
    if not ON_ACCELERATOR:  # CUDA's bernoulli checks p on the device: a device-side assert, not an exception
        with pytest.raises(RuntimeError, match="Expected p_in >= 0"):
            vmapped(torch.bernoulli, p + 1, randomness="same")
        with pytest.raises(RuntimeError, match="Expected p_in >= 0"):
            vmapped(torch.bernoulli, p + 1, randomness="different")


# Distribution checks: each example applies its own parameters.
N = 20000
DISTRIBUTIONS = [
    # (name, fn(param) -> N samples, params per example, mean(param), var(param))
    ("normal", lambda m: torch.normal(m.expand(N), 2.0), [-5.0, 0.0, 3.0, 10.0], lambda m: m, lambda m: 4.0),
    ("normal_std", lambda s: torch.normal(1.0, s.expand(N)), [0.5, 1.0, 2.0, 4.0], lambda s: 1.0, lambda s: s * s),
    ("bernoulli", lambda p: torch.bernoulli(p.expand(N)), [0.05, 0.3, 0.5, 0.9], lambda p: p, lambda p: p * (1 - p)),
    ("poisson", lambda r: torch.poisson(r.expand(N)), [0.5, 2.0, 5.0, 20.0], lambda r: r, lambda r: r),
    ("gamma", lambda a: torch._standard_gamma(a.expand(N)), [0.5, 1.0, 3.0, 9.0], lambda a: a, lambda a: a),
    (
        "binomial",
        lambda p: torch.binomial(torch.full((N,), 10.0), p.expand(N)),
        [0.1, 0.3, 0.5, 0.8],
        lambda p: 10 * p,
        lambda p: 10 * p * (1 - p),
    ),
    (
        "bernoulli_inplace_tensor",
        lambda p: p.expand(N).clone().bernoulli_(p),
        [0.1, 0.4, 0.6, 0.95],
        lambda p: p,
        lambda p: p * (1 - p),
    ),
]


@pytest.mark.parametrize("mode", ["same", "different"])
@pytest.mark.parametrize("name,fn,values,mean,var", DISTRIBUTIONS, ids=[row[0] for row in DISTRIBUTIONS])
def test_distribution(name, fn, values, mean, var, mode):
    params = torch.tensor(values)
    if mode == "same" and name in ("poisson", "gamma", "binomial"):
        with pytest.raises(RuntimeError, match=SAME_BATCHED):
            vmapped(fn, params, randomness=mode)
        return
    out = vmapped(fn, params, randomness=mode)
    assert out.shape == (B, N)
    for i, v in enumerate(values):
        tolerance = 5 * math.sqrt(var(v) / N)
        assert abs(out[i].mean().item() - mean(v)) < tolerance, (i, v, out[i].mean())
        assert abs(out[i].var().item() - var(v)) < 0.1 * var(v) + 1e-3, (i, v, out[i].var())


def test_multinomial_and_dirichlet_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]])
    out = vmapped(lambda p: torch.multinomial(p, N, True), probs, randomness="different")
    frequencies = torch.stack([torch.bincount(row, minlength=4) for row in out]).float() / N
    assert (frequencies - probs).abs().max() < 0.02, frequencies
    out = vmapped(lambda p: torch.multinomial(p, 3), probs, randomness="different")
    assert (out[0] != 3).all()  # zero probability: never drawn without replacement either
    assert all(len(set(row.tolist())) == 3 for row in out)
    alpha = torch.tensor([[1.0, 2.0, 7.0], [5.0, 5.0, 5.0]])
    out = vmapped(lambda a: torch._sample_dirichlet(a.expand(N, 3)), alpha, randomness="different")
    assert_close(out.sum(-1), torch.ones(2, N), rtol=1e-5, atol=1e-5)
    assert (out.mean(1) - alpha / alpha.sum(-1, keepdim=True)).abs().max() < 0.01
    with pytest.raises(RuntimeError, match="prob_dist must be 1 or 2 dim"):
        vmapped(lambda p: torch.multinomial(p, 1), torch.rand(B, 2, 2, 2), randomness="different")
    with pytest.raises(RuntimeError, match="cannot sample n_sample > prob_dist"):
        vmapped(lambda p: torch.multinomial(p, 5), torch.rand(B, 3), randomness="different")


def test_bernoulli_with_tensor_p():
    x = torch.randn(B, 2, 3)
    p = torch.rand(B, 3)
    # bernoulli_(p), p batched and broadcast against the logical shape
    fn = lambda a, q: a.clone().bernoulli_(q)  # noqa: E731
    assert_error_mode(fn, x, p)
    out = vmapped(fn, x, p, randomness="different")
    assert_close(out, seeded(lambda: x.clone().bernoulli_(p[:, None])))
    out = vmapped(fn, x, p, randomness="same")
    assert_close(out, (seeded(torch.rand, 2, 3) < p[:, None]).float())
    # p unbatched, self batched along a middle dim
    out = vmapped(fn, x.movedim(0, 1), p[0], randomness="different", in_dims=(1, None))
    assert out.shape == (B, 2, 3) and set(out.unique().tolist()) <= {0.0, 1.0}
    assert_examples_differ(out)
    with pytest.raises(RuntimeError, match="in-place"):
        vmapped(lambda q: torch.zeros(3).bernoulli_(q), p, randomness="different")
    # aten.bernoulli.Tensor: self gives the shape and dtype, p broadcasts to it
    fn = lambda a, q: aten.bernoulli.Tensor(a, q)  # noqa: E731
    out = vmapped(fn, x.double(), p, randomness="different")
    assert out.dtype == torch.float64
    assert_close(out, seeded(lambda: aten.bernoulli.Tensor(x.double(), p[:, None])))
    out = vmapped(fn, x, p, randomness="same")
    assert_close(out, (seeded(torch.rand, 2, 3) < p[:, None]).float())
    out = vmapped(fn, x, p[0], randomness="same", in_dims=(0, None))
    assert_every_example(out, seeded(aten.bernoulli.Tensor, x[0], p[0]))
    out = vmapped(fn, x[0], p, randomness="different", in_dims=(None, 0))
    assert_close(out, seeded(lambda: aten.bernoulli.Tensor(x[0].expand(B, 2, 3), p[:, None])))


# -- dropout --------------------------------------------------------------------

DROPOUTS = [
    ("dropout", lambda a: F.dropout(a, 0.4)),
    ("dropout_inplace", lambda a: F.dropout(a.clone(), 0.4, inplace=True)),
    ("dropout_module", torch.nn.Dropout(0.4)),
    ("dropout2d", lambda a: F.dropout2d(a[None], 0.4)[0]),
    ("dropout1d", lambda a: F.dropout1d(a, 0.4)),
    ("alpha_dropout", lambda a: F.alpha_dropout(a, 0.4, training=True)),
    ("feature_alpha_dropout", lambda a: F.feature_alpha_dropout(a, 0.4, training=True)),
    ("native_dropout", lambda a: aten.native_dropout(a, 0.4, True)[0]),
    ("native_dropout_mask", lambda a: aten.native_dropout(a, 0.4, None)[1]),
]


FEATURE_DROPOUTS = ("dropout2d", "dropout1d", "feature_alpha_dropout")


@pytest.mark.parametrize("name,fn", DROPOUTS, ids=[row[0] for row in DROPOUTS])
def test_dropout(name, fn):
    x = torch.rand(B, 8, 20, 10) + 0.5  # nonzero, so zeros in the output are dropped elements
    assert_error_mode(fn, x)
    for in_dim in (0, 2):
        physical = x.movedim(0, in_dim)
        out = vmapped(fn, physical, randomness="different", in_dims=in_dim)
        assert out.shape == x.shape and out.dtype == fn(x[0]).dtype
        assert_examples_differ(out)
        if in_dim == 0 and name not in FEATURE_DROPOUTS:
            assert_close(out, seeded(fn, physical))  # the op on the physical batch
        if name in FEATURE_DROPOUTS:  # whole channels dropped: one decision per (example, n, c)
            dropped = out == 0
            assert torch.equal(dropped.all(-1), dropped.any(-1))
    out = vmapped(fn, x, randomness="same")
    kept = seeded(fn, x[0]) != 0
    assert_every_example(out != 0, kept)  # one mask for every example
    if name in ("dropout", "dropout_module", "native_dropout"):
        assert_close(out, torch.where(kept, x / 0.6, 0.0))
        assert abs(kept.float().mean().item() - 0.6) < 0.05


def test_dropout_eval_and_frequencies():
    x = torch.rand(B, 50, 40) + 0.5
    module = torch.nn.Dropout(0.3).eval()
    with no_fallback():
        check_vmap(module, x)  # eval mode draws nothing: fine under randomness='error'
        check_vmap(lambda a: F.dropout(a, 0.3, training=False), x)
    out = vmapped(lambda a: F.dropout(a, 0.3), x, randomness="different")
    kept = (out != 0).float().mean((1, 2))
    assert ((kept - 0.7).abs() < 0.03).all(), kept
    for mode in ("same", "different"):
        out, mask = vmapped(lambda a: aten.native_dropout(a, 0.3, False), x, randomness=mode)
        assert_close(out, x)
        assert mask.all() and mask.dtype == torch.bool


def test_dropout_unbatched_input():
    y = torch.rand(6, 5) + 0.5
    fn = lambda _, a: F.dropout(a, 0.5)  # noqa: E731
    out = vmapped(fn, torch.zeros(B), y, randomness="same", in_dims=(0, None))
    assert_every_example(out, seeded(F.dropout, y, 0.5))
    # the in-place bernoulli_ draws into an unbatched empty_like(y): as torch.func
    # (CPU's dropout; CUDA's is the fused native_dropout, which has no such draw)
    if not ON_ACCELERATOR:
        with pytest.raises(RuntimeError, match=DIFFERENT_UNBATCHED):
            vmapped(fn, torch.zeros(B), y, randomness="different", in_dims=(0, None))
    native = lambda _, a: aten.native_dropout(a, 0.5, True)[0]  # noqa: E731
    out = vmapped(native, torch.zeros(B), y, randomness="different", in_dims=(0, None))
    assert_close(out, seeded(lambda: aten.native_dropout(y.expand(B, 6, 5), 0.5, True)[0]))


def test_dropout_outputs_differentiable():
    x = (torch.rand(B, 30) + 0.5).requires_grad_()
    out = vmapped(lambda a: F.dropout(a, 0.5), x, randomness="different")
    out.sum().backward()
    assert_close(x.grad, (out != 0).float() * 2)


# -- rrelu ------------------------------------------------------------------------

LOWER, UPPER = 0.1, 0.4


def _check_rrelu(x, out, noise=None):
    negative = x <= 0
    assert_close(out[~negative], x[~negative])
    slope = out[negative] / x[negative]
    assert ((slope >= LOWER - 1e-6) & (slope <= UPPER + 1e-6)).all()
    if noise is not None:
        assert_close(noise[negative], slope, rtol=1e-5, atol=1e-6)
        assert (noise[~negative] == 1).all()


@pytest.mark.parametrize("variant", ["rrelu", "rrelu_", "with_noise", "with_noise_", "functional"])
def test_rrelu(variant):
    x = torch.randn(B, 30, 7)

    def fn(a):
        if variant == "rrelu":
            return F.rrelu(a, LOWER, UPPER, training=True)
        if variant == "rrelu_":
            return F.rrelu_(a.clone(), LOWER, UPPER, training=True)
        noise = torch.empty_like(a)
        if variant == "with_noise":
            return aten.rrelu_with_noise(a, noise, LOWER, UPPER, True), noise
        if variant == "with_noise_":
            return aten.rrelu_with_noise_(a.clone(), noise, LOWER, UPPER, True), noise
        return aten.rrelu_with_noise_functional(a, noise, LOWER, UPPER, True)

    assert_error_mode(fn, x)
    for mode in ("same", "different"):
        result = vmapped(fn, x, randomness=mode)
        out, noise = result if isinstance(result, tuple) else (result, None)
        _check_rrelu(x, out, noise)
        slopes = out / x
        if mode == "different":
            assert_close(result, seeded(fn, x))  # the op on the physical batch
            assert not torch.allclose(slopes[0][x[0] < 0][:5], slopes[1][x[0] < 0][:5])
        else:
            # One slope per logical element, shared by the examples where both are negative.
            both = (x[0] < 0) & (x[1] < 0)
            assert_close(slopes[0][both], slopes[1][both], rtol=1e-5, atol=1e-6)


def test_rrelu_eval_and_errors():
    x = torch.randn(B, 10)
    for mode in ("same", "different"):
        out = vmapped(lambda a: F.rrelu(a, LOWER, UPPER, training=False), x, randomness=mode)
        assert_close(out, F.leaky_relu(x, (LOWER + UPPER) / 2))
    with pytest.raises(RuntimeError, match="noise"):
        vmapped(lambda a: aten.rrelu_with_noise(a, torch.empty(10), LOWER, UPPER, True), x, randomness="different")
    with pytest.raises(RuntimeError, match="noise tensor shape must match"):
        vmapped(lambda a: aten.rrelu_with_noise(a, torch.empty_like(a)[:5], LOWER, UPPER, True), x, randomness="same")
    with pytest.raises(RuntimeError, match="from <= to"):
        vmapped(lambda a: aten.rrelu_with_noise(a, torch.empty_like(a), 0.5, 0.1, True), x, randomness="different")


# -- nested vmap and chunking -----------------------------------------------------

B1, B2 = 2, 3
# (name, fn on a [3] example, draw(prefix) of the equivalent plain draw)
NESTED = [
    ("rand", lambda a: torch.rand(3), lambda pre: torch.rand(*pre, 3)),
    ("rand_like", torch.rand_like, lambda pre: torch.rand(*pre, 3)),
    ("uniform_", lambda a: a.clone().uniform_(), lambda pre: torch.empty(*pre, 3).uniform_()),
    ("bernoulli_", lambda a: a.clone().bernoulli_(0.5), lambda pre: torch.empty(*pre, 3).bernoulli_(0.5)),
    # a batched mean: under 'same', shared standard-normal draws (randn's stream)
    ("normal_tensor", lambda a: torch.normal(a, 1.0), lambda pre: torch.randn(*pre, 3)),
]


@pytest.mark.parametrize("outer", ["same", "different"])
@pytest.mark.parametrize("inner", ["same", "different"])
@pytest.mark.parametrize("name,fn,draw", NESTED, ids=[row[0] for row in NESTED])
def test_nested(name, fn, draw, outer, inner):
    x = torch.zeros(B1, B2, 3)
    torch.manual_seed(SEED)
    with no_fallback():
        out = torchxform.vmap(torchxform.vmap(fn, randomness=inner), randomness=outer)(x)
    assert out.shape == (B1, B2, 3)
    if (outer, inner) == ("different", "different"):
        expected = seeded(draw, (B1, B2))  # B1*B2 independent draws
    elif (outer, inner) == ("different", "same"):
        expected = seeded(draw, (B1,))[:, None].expand(B1, B2, 3)  # shared across the inner batch only
    elif (outer, inner) == ("same", "different"):
        expected = seeded(draw, (B2,))[None].expand(B1, B2, 3)
    else:
        expected = seeded(draw, ()).expand(B1, B2, 3)
    assert_close(out, expected)


@pytest.mark.parametrize("outer", ["error", "same", "different"])
def test_nested_error_mode(outer):
    x = torch.zeros(B1, B2, 3)
    with pytest.raises(RuntimeError, match=ERROR_MODE):
        torchxform.vmap(torchxform.vmap(torch.rand_like, randomness="error"), randomness=outer)(x)
    if outer == "error":
        with pytest.raises(RuntimeError, match=ERROR_MODE):
            torchxform.vmap(torchxform.vmap(torch.rand_like, randomness="different"), randomness=outer)(x)


def test_nested_same_with_batched_params():
    # p batched at the inner level only: the 'same' rule's check and draw see plain values.
    p = torch.rand(B2, 5)
    inner = torchxform.vmap(torch.bernoulli, randomness="same")
    out = vmapped(lambda _, q: inner(q), torch.zeros(B1), p, randomness="different", in_dims=(0, None))
    u = seeded(torch.rand, B1, 5)  # the outer level draws the inner shared draw per outer example
    assert_close(out, (u[:, None] < p).float())
    # p batched at both levels: the same draws; the validity check of p now
    # reduces and asserts at the outer level, where `_assert_async` has no
    # batching rule (not a random op): the only fallback allowed here.
    p = torch.rand(B1, B2, 5)
    torch.manual_seed(SEED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torchxform.SlowFallbackWarning)
        out = torchxform.vmap(inner, randomness="different")(p)
    fallbacks = {str(w.message).split("batching rule for ")[1].split(",")[0] for w in caught}
    assert fallbacks <= {"aten._assert_async.msg", "aten.all.default"}, fallbacks
    assert_close(out, (u[:, None] < p).float())
    if not ON_ACCELERATOR:  # CUDA's bernoulli checks p on the device: a device-side assert, not an exception
        with pytest.raises(RuntimeError, match="Expected p_in >= 0"):
            torchxform.vmap(inner, randomness="different")(p + 1)


def test_chunk_size():
    x = torch.zeros(5, 3)
    for fn in (torch.rand_like, lambda a: a.clone().normal_(), lambda a: F.dropout(a + 1, 0.5)):
        out = vmapped(fn, x, randomness="same", chunk_size=2)
        assert_every_example(out, seeded(fn, x[0]))  # every chunk repeats the same draws
    out = vmapped(torch.rand_like, x, randomness="different", chunk_size=2)
    assert_close(out, seeded(lambda: torch.cat([torch.rand(2, 3), torch.rand(2, 3), torch.rand(1, 3)])))
    with pytest.raises(RuntimeError, match=ERROR_MODE):
        vmapped(torch.rand_like, x, randomness="error", chunk_size=2)


# -- out= variants ------------------------------------------------------------------


def test_out_variants():
    x = torch.zeros(B)
    buf = torch.empty(3)
    out = vmapped(lambda _: torch.rand(3, out=buf) * 1, x, randomness="same")
    assert_every_example(out, seeded(torch.rand, 3))
    with pytest.raises(RuntimeError, match="out="):
        vmapped(lambda _: torch.rand(3, out=buf), x, randomness="different")
    with pytest.raises(RuntimeError, match=ERROR_MODE):
        vmapped(lambda _: torch.rand(3, out=buf), x, randomness="error")


# -- coverage -------------------------------------------------------------------------

# Tagged ops that only CUDA/ROCm/MPS backends reach (or that take no part in
# vmap on CPU): their batching belongs with the device families.
DEVICE_ONLY = {
    "_cudnn_attention_backward", "_cudnn_attention_forward", "_cudnn_init_dropout_state", "_cudnn_rnn",
    "_efficient_attention_forward", "_fill_mem_eff_dropout_mask_", "_flash_attention_forward",
    "_flash_attention_forward_no_dropout_inplace", "_fused_sdp_choice", "_lstm_mps",
    "_nested_tensor_softmax_with_shape", "_scaled_dot_product_attention_math_for_mps",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_fused_attention_overrideable",
    "_triton_scaled_dot_attention", "miopen_rnn",
}  # fmt: skip
# Decompositions whose random ops reach the rules above (CUDA-only kernel).
DECOMPOSED = {"_fused_dropout"}
# Rules of other families (attention: rules/nn.py).
ELSEWHERE = {"_scaled_dot_product_flash_attention_for_cpu"}


def _tagged_ops():
    seen = set()
    for schema in torch._C._jit_get_all_schemas():
        if not schema.name.startswith("aten::"):
            continue
        packet = getattr(aten, schema.name[6:], None)
        name = schema.overload_name or "default"
        if packet is None or name not in packet.overloads():
            continue
        op = getattr(packet, name)
        if torch.Tag.nondeterministic_seeded in op.tags and op not in seen:
            seen.add(op)
            yield op


def test_every_random_op_is_covered():
    missing = []
    for op in _tagged_ops():
        base = op._schema.name[6:]
        if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd"):
            continue  # decomposes before it reaches vmap
        if base in DEVICE_ONLY or base in ELSEWHERE:
            continue
        if base in DECOMPOSED and not is_out_variant(op):
            assert batching_coverage(op) == "decomposition", op
            continue
        if op not in BATCH_RULES:
            missing.append(str(op))
    assert not missing, missing


@pytest.mark.parametrize(
    "fn",
    [
        lambda a: aten.native_dropout(a, 0.5, False)[0],
        lambda a: F.rrelu(a, training=False),
        lambda a: F.scaled_dot_product_attention(a[None], a[None], a[None]),  # the CPU flash kernel
    ],
    ids=["native_dropout_eval", "rrelu_eval", "sdpa_no_dropout"],
)
def test_no_draw_under_error_mode(fn):
    with no_fallback():
        check_vmap(fn, torch.randn(B, 1, 3, 4))
