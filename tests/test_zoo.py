"""The zoo: exact minimizers, the right (λ, m), exact finite-nβ targets, and accuracy."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import slt
from slt import theory, zoo
from slt.zoo.potentials import expected_llc
from slt.zoo.tanh import expected_llc as tanh_expected_llc


def _full_grad(case):
    x, y = case.dataset.tensors
    model = case.model
    loss = case.loss_fn(model, (x, y))
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize(
    "case",
    [zoo.regular(6, 2, n=512), zoo.reduced_rank(5, 4, 3, 2, n=512),
     zoo.deep_linear((6, 5, 4, 6), 3, n=512), zoo.potential((1, 2), n=512)],
    ids=lambda c: c.name,
)  # fmt: skip
def test_center_is_an_exact_minimizer(case):
    for g in _full_grad(case):
        assert g.abs().max() < 1e-5


def test_cases_carry_the_theory_values():
    assert (zoo.regular(6, 2).lam, zoo.regular(6, 2).m) == (6, 1)
    assert zoo.reduced_rank(5, 4, 3, 2).lam == theory.reduced_rank(5, 4, 3, 2).lam
    c = zoo.deep_linear((6, 5, 4, 6), 3)
    assert (c.lam, c.m) == (theory.deep_linear((6, 5, 4, 6), 3).lam, 1)
    assert (zoo.potential((1, 1)).lam, zoo.potential((1, 1)).m) == (Fraction(1, 2), 2)
    assert zoo.tanh_network(4).lam == theory.tanh_1d(4).lam
    assert zoo.deep_linear((80, 50, 50, 80), 50).num_params >= 10_000


def test_potential_loss_is_the_monomial():
    case = zoo.potential((1, 2), n=256, sigma=0.5)
    x, y = case.dataset.tensors
    c = float(x.square().mean()) / (2 * 0.25)
    with torch.no_grad():
        base = float(case.loss_fn(case.model, (x, y)))
    w = torch.tensor([0.7, -1.3])
    with torch.no_grad():
        case.model.w.copy_(w)
        k_n = float(case.loss_fn(case.model, (x, y))) - base
        case.model.w.zero_()
    assert k_n == pytest.approx(c * (0.7 * 1.3**2) ** 2, rel=1e-4)


def test_expected_llc_one_variable_closed_form():
    # K = w², posterior precision 2t + γ: t E[w²] = t/(2t + γ)
    assert expected_llc((1,), 500.0, 3.0) == pytest.approx(500 / 1003)


def test_expected_llc_regular_pair_is_sum():
    # K = w0² w1⁰... the sum rule is for sums; for a product with one variable the
    # quadrature path must reproduce the closed form: k = (1, 1) at tiny t is ≈ t E[w0²w1²]
    t, g = 1e-3, 2.0
    assert expected_llc((1, 1), t, g) == pytest.approx(t / g**2, rel=1e-2)


def test_expected_llc_has_the_multiplicity_two_log_correction():
    # For a²b², t E[K] = 1/2 - 1/(log t + C) + o(1/log t) (THEORY.md): C must settle.
    consts = [1 / (0.5 - expected_llc((1, 1), t, 1.0)) - math.log(t) for t in (1e6, 1e9, 1e12)]
    assert abs(consts[1] - consts[2]) < 0.1
    assert abs(consts[0] - consts[2]) < 0.3


def test_tanh_quadrature_matches_potential_when_tanh_is_linear():
    # With tiny inputs tanh(b x) = b x, so the tanh network is the potential a·b·x.
    g = torch.Generator().manual_seed(0)
    x = 1e-3 * torch.randn(4096, 1, generator=g)
    y = zoo.orthogonal_noise(x, 1, 1e-3, g)
    c = float(x.square().mean()) / (2 * 1e-6)
    got = tanh_expected_llc(x.numpy(), y.numpy(), 1e-3, 400.0, 4.0, hidden=1)
    assert got == pytest.approx(expected_llc((1, 1), 400.0 * c, 4.0), rel=2e-3)


def test_tanh_quadrature_converges_in_the_grid():
    case = zoo.tanh_network(2, n=1024)
    x, y = (t.numpy() for t in case.dataset.tensors)
    fine = tanh_expected_llc(x, y, 0.5, 200.0, 2.0, hidden=2, grid=401)
    coarse = tanh_expected_llc(x, y, 0.5, 200.0, 2.0, hidden=2, grid=201)
    assert fine == pytest.approx(coarse, rel=1e-3)


@pytest.mark.parametrize(
    "case", [zoo.regular(10), zoo.reduced_rank(5, 4, 3, 2)], ids=lambda case: case.name
)
def test_zoo_accuracy_fast_subset(case):
    res = slt.estimate_llc(case.model, case.loader(), case.loss_fn, progress=False,
                           **case.settings.estimate_kwargs())  # fmt: skip
    assert abs(res.llc / float(case.lam) - 1) < 0.10


def test_singular_potential_hits_its_exact_finite_nbeta_target():
    from slt.validate import default_cases

    case = next(c for c in default_cases() if c.family == "potential")
    res = slt.estimate_llc(case.model, case.loader(), case.loss_fn, progress=False,
                           **case.settings.estimate_kwargs())  # fmt: skip
    target = case.expected(res.nbeta, res.localization)
    assert target < float(case.lam) - 0.1  # the finite-nβ target is well below λ = 1/2
    assert abs(res.llc - target) < 0.10 * target
    assert np.isfinite(res.llc_std) and res.llc_std < 0.05 * target


@pytest.mark.parametrize("k", [(1, 1), (1, 2), (1, 1, 1)])
def test_exact_nll_of_a_potential_is_its_loss_at_every_point(k):
    case = zoo.potential(k, n=512, sigma=0.7)
    _, _, nll = zoo.exact_nll(case)
    w = torch.randn(5, len(k), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = zoo.Monomial(k).double()
    x, y = (t.double() for t in case.dataset.tensors)
    for point, value in zip(w, nll(w)):
        with torch.no_grad():
            model.w.copy_(point)
            direct = case.loss_fn(model, (x, y))
        assert float(value) == pytest.approx(float(direct), rel=1e-6)


def _tanh_reference(x, y, sigma, t, g):
    """nβ E[K_n] of the one-unit tanh network by adaptive quadrature over b (a in closed
    form), written apart from the library's grid: the integrand's peak at b = 0 is given
    to scipy as break points."""
    from scipy import integrate

    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    n = x.size

    def parts(b):
        tb = np.tanh(b * x)
        a2, lin = tb @ tb / (2 * sigma**2 * n), tb @ y / (sigma**2 * n)
        p = 2 * t * a2 + g
        mu = t * lin / p
        return -0.5 * math.log(p) + 0.5 * t * lin * mu - 0.5 * g * b * b, t * (
            a2 / p + a2 * mu * mu - lin * mu
        )

    top, w0 = 12 / math.sqrt(g), parts(0.0)[0]
    opts = dict(points=[0.0, 1e-3, -1e-3, 1e-2, -1e-2, 0.1, -0.1], limit=2000, epsabs=0,
                epsrel=1e-10)  # fmt: skip
    num = integrate.quad(lambda b: math.exp(parts(b)[0] - w0) * parts(b)[1], -top, top, **opts)
    den = integrate.quad(lambda b: math.exp(parts(b)[0] - w0), -top, top, **opts)
    return num[0] / den[0]


@pytest.mark.parametrize("nbeta, localization", [(492.0, 1.0), (4096.0, 0.1), (4.9e4, 1.0)])
def test_tanh_quadrature_resolves_the_peak_at_zero(nbeta, localization):
    # a uniform grid in b missed the weight's peak at b = 0 (width √(γ / 2nβc)): -32% at
    # nβ = 4096, γ = 0.1 and -12% at nβ = 49,000
    case = zoo.tanh_network(1, n=1024)
    x, y = (t.numpy() for t in case.dataset.tensors)
    want = _tanh_reference(x, y, 0.5, nbeta, localization)
    assert case.expected(nbeta, localization) == pytest.approx(want, rel=1e-5)


def test_tanh_quadrature_that_does_not_converge_says_so():
    case = zoo.tanh_network(2)  # at nβ = 49,000 the weight sits off b = 0
    with pytest.raises(ValueError, match="did not converge at nbeta=49000"):
        case.expected(4.9e4, 1.0)
    x, y = (t.numpy() for t in case.dataset.tensors)
    for kw, message in [(dict(hidden=4), "hidden must be 1, 2 or 3"),
                        (dict(hidden=1, nbeta=-1.0), "nbeta must be >= 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            tanh_expected_llc(x, y, 0.5, **({"nbeta": 10.0, "localization": 1.0} | kw))


@pytest.mark.parametrize(
    "build, message",
    [(lambda: zoo.potential((1.5, 1)), r"k\[0\] must be an integer >= 0, got 1.5"),
     (lambda: zoo.regular(-2, -3), "n_in must be an integer >= 1, got -2"),
     (lambda: zoo.regular(2.5, 2), "n_in must be an integer >= 1, got 2.5"),
     (lambda: zoo.tanh_network(2.0), "hidden must be an integer >= 1, got 2.0"),
     (lambda: zoo.regular(3, n=0), "n must be an integer >= 2, got 0"),
     (lambda: zoo.regular(3, n=2.5), "n must be an integer >= 2, got 2.5"),
     (lambda: zoo.deep_linear((3, 2, 2), 1, sigma=0.0), "sigma must be a finite number > 0"),
     (lambda: zoo.regular(3, seed=None), "seed must be an integer"),
     (lambda: zoo.potential((1, 1)).expected(-100.0, 1.0), "nbeta must be a finite number >= 0")],
)  # fmt: skip
def test_zoo_arguments_are_checked_by_name(build, message):
    # potential((1.5, 1)) was w0²·w1² (int() truncated), regular(-2, -3) a torch error
    with pytest.raises(ValueError, match=message):
        build()


def test_zoo_builders_leave_the_global_rng_alone():
    # the linear layers' default initialization drew from it, to be overwritten at once
    for build in (lambda: zoo.regular(3, n=64), lambda: zoo.deep_linear((3, 2, 2), 1, n=64),
                  lambda: zoo.reduced_rank(3, 2, 2, 1, n=64)):  # fmt: skip
        torch.manual_seed(123)
        build()
        after = torch.rand(1)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(1))
