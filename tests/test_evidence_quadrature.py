"""Exact free energies by quadrature, checked against closed forms.

- Gaussian-linear (regular) models: F(β) and E_β[n L_n] are Gaussian integrals.
- a²b²: integrating a in closed form leaves a 1-d integral that is itself a Bessel function,
  ∫ N(b; 0, σ²) (1 + 2tσ²b²)^(-1/2) db = e^z K_0(z) / √(4π t σ⁴), z = 1/(8 t σ⁴).
- a²b²c²: integrating a and then c in closed form leaves one 1-d integral (scipy quad).

Every check asserts the actual error is below the reported ``error`` and that the reported
``error`` is small, at n up to 10⁴.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, special

import slt
from slt.evidence import module_nll, quadrature_free_energy
from slt.evidence._cubature import RULES


def _quad(f, pieces):
    return sum(integrate.quad(f, a, b, epsabs=0, epsrel=1e-13, limit=500)[0] for a, b in pieces)


@pytest.mark.parametrize("rule, degree, gauss_degree", [("gk15", 23, 13), ("gk7", 11, 5)])
def test_rules_integrate_polynomials_exactly(rule, degree, gauss_degree):
    x, wk, wg = RULES[rule]
    for k in range(degree + 2):
        exact = 2 / (k + 1) if k % 2 == 0 else 0.0
        assert (abs(wk @ x**k - exact) < 1e-14) == (k <= degree)
        assert (abs(wg @ x**k - exact) < 1e-14) == (k <= gauss_degree or k % 2 == 1)


def _gaussian_case(d, n, beta, mean, std, seed=0):
    """L_n = L0 + ½ (w - ŵ)ᵀA(w - ŵ); exact F(β) and E_β[n L_n]."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(d, d))
    a = m @ m.T / d + 0.3 * np.eye(d)
    w_hat, l0 = 1.5 * rng.normal(size=d), 1.3
    at, wt = torch.tensor(a), torch.tensor(w_hat)

    def nll(w):
        return l0 + 0.5 * torch.einsum("pi,ij,pj->p", w - wt, at, w - wt)

    prec = n * beta * a + np.eye(d) / std**2
    mode = np.linalg.solve(prec, n * beta * a @ w_hat + mean / std**2 * np.ones(d))
    l_mode = l0 + 0.5 * (mode - w_hat) @ a @ (mode - w_hat)
    norm = d * math.log(std * math.sqrt(2 * math.pi))
    log_prior = -0.5 * np.sum(((mode - mean) / std) ** 2) - norm
    free = n * beta * l_mode - log_prior + 0.5 * np.linalg.slogdet(prec / (2 * math.pi))[1]
    spread = np.trace(a @ np.linalg.inv(prec)) + (mode - w_hat) @ a @ (mode - w_hat)
    mean_nll = n * l0 + 0.5 * n * spread
    return nll, free, mean_nll


@pytest.mark.parametrize(
    "d, n, beta",
    [(1, 10, 1.0), (1, 10_000, 0.05), (2, 10, 0.05), (2, 1000, 1.0), (2, 10_000, 1.0),
     (3, 10_000, 1.0)],
)  # fmt: skip
def test_gaussian_linear_model_matches_the_gaussian_integral(d, n, beta):
    nll, free, mean_nll = _gaussian_case(d, n, beta, mean=0.2, std=1.5)
    res = quadrature_free_energy(nll, n=n, dim=d, beta=beta, prior_mean=0.2, prior_std=1.5)
    assert res.converged
    assert abs(res.free_energy - free) <= res.error <= 1e-7
    assert abs(res.expected_nll - mean_nll) <= res.expected_nll_error <= 1e-6 * abs(mean_nll)


def _a2b2_free_energy(n, std):
    t = float(n)
    z = 1 / (8 * t * std**4)
    return -math.log(special.k0e(z) / math.sqrt(4 * math.pi * t * std**4))


def test_bessel_closed_form_of_a2b2_agrees_with_plain_quadrature():
    n, std = 300.0, 0.8

    def f(b):  # ∫ exp(-n a²b²) N(a; 0, σ²) da = (1 + 2nσ²b²)^(-1/2)
        return (
            math.exp(-0.5 * (b / std) ** 2)
            / (std * math.sqrt(2 * math.pi))
            / math.sqrt(1 + 2 * n * std**2 * b * b)
        )

    z = _quad(f, [(-np.inf, -1), (-1, 0), (0, 1), (1, np.inf)])
    assert -math.log(z) == pytest.approx(_a2b2_free_energy(n, std), abs=1e-12)


@pytest.mark.parametrize("n", [10, 100, 1000, 10_000])
@pytest.mark.parametrize("std", [1.0, 0.6])
def test_a2b2_matches_the_bessel_closed_form(n, std):
    res = quadrature_free_energy(lambda w: (w[:, 0] * w[:, 1]) ** 2, n=n, dim=2, prior_std=std)
    assert abs(res.free_energy - _a2b2_free_energy(n, std)) <= res.error <= 1e-7


def test_a2b2_with_the_prior_off_the_singularity():
    # prior N(μ, 1): ∫ exp(-t a²b²) N(a; μ, 1) da = exp(-tμ²b²/(1 + 2tb²)) / √(1 + 2tb²)
    n, mu = 10_000, 0.3

    def f(b):
        s = 1 + 2 * n * b * b
        return math.exp(-0.5 * (b - mu) ** 2 - n * b * b * mu * mu / s) / math.sqrt(2 * math.pi * s)

    exact = -math.log(_quad(f, [(-np.inf, -1), (-1, 0), (0, 1), (1, np.inf)]))
    res = quadrature_free_energy(lambda w: (w[:, 0] * w[:, 1]) ** 2, n=n, dim=2, prior_mean=mu)
    assert abs(res.free_energy - exact) <= res.error <= 1e-7


def _a2b2c2_free_energy(n):
    """Integrate a, then c (∫ N(c)(1 + αc²)^(-1/2) dc = e^z K_0(z)/√(2πα), z = 1/(4α))."""

    def f(b):
        alpha = 2 * n * b * b
        if alpha < 1e-12:
            return math.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
        inner = special.k0e(1 / (4 * alpha)) / math.sqrt(2 * math.pi * alpha)
        return math.exp(-0.5 * b * b) / math.sqrt(2 * math.pi) * inner

    return -math.log(2 * _quad(f, [(0, 1e-3), (1e-3, 0.1), (0.1, 1), (1, np.inf)]))


@pytest.mark.parametrize("alpha", [1e-3, 0.5, 40.0, 1e5])
def test_the_bessel_step_of_the_a2b2c2_form(alpha):
    # ∫ N(c; 0, 1) (1 + αc²)^(-1/2) dc = e^z K_0(z) / √(2πα), z = 1/(4α)
    def f(c):
        return math.exp(-0.5 * c * c) / math.sqrt(2 * math.pi * (1 + alpha * c * c))

    plain = 2 * _quad(f, [(0, 1 / math.sqrt(alpha)), (1 / math.sqrt(alpha), np.inf)])
    closed = special.k0e(1 / (4 * alpha)) / math.sqrt(2 * math.pi * alpha)
    assert plain == pytest.approx(closed, rel=1e-11)


@pytest.mark.parametrize("n", [1000, 10_000])
def test_a2b2c2_matches_its_semi_closed_form(n):
    res = quadrature_free_energy(lambda w: (w[:, 0] * w[:, 1] * w[:, 2]) ** 2, n=n, dim=3)
    assert res.converged
    assert abs(res.free_energy - _a2b2c2_free_energy(n)) <= res.error <= 1e-7


def test_extra_break_points_change_nothing_but_the_mesh():
    def sq(w):
        return (w[:, 0] * w[:, 1]) ** 2

    plain = quadrature_free_energy(sq, n=1000, dim=2)
    more = quadrature_free_energy(sq, n=1000, dim=2, breaks=[[0.3, 0.0], [-2.0, 1.0]])
    assert more.num_cells != plain.num_cells
    assert abs(more.free_energy - plain.free_energy) <= more.error + plain.error


def test_derivative_in_beta_is_the_expected_nll():
    # dF/dβ = E_β[n L_n]: the identity thermodynamic integration rests on (a²b², singular)
    def nll(w):
        return 0.7 + (w[:, 0] * w[:, 1]) ** 2

    h, beta, n = 1e-3, 0.4, 5000
    f_plus, f_minus = (quadrature_free_energy(nll, n=n, dim=2, beta=beta + s * h).free_energy
                       for s in (1, -1))  # fmt: skip
    mid = quadrature_free_energy(nll, n=n, dim=2, beta=beta)
    assert (f_plus - f_minus) / (2 * h) == pytest.approx(mid.expected_nll, abs=1e-4)
    assert mid.expected_nll > 0.7 * n


def _linear_data(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.tensor([[0.8], [-0.5], [0.3]][:d]) + 0.5 * torch.randn(n, 1, generator=g)
    return x, y


def test_module_nll_is_the_mean_gaussian_nll_at_each_point():
    x, y = _linear_data(64, 2)
    model = torch.nn.Linear(2, 1, bias=False)
    before = model.weight.detach().clone()
    nll = module_nll(model, (x, y), slt.gaussian_nll(0.5))
    w = torch.randn(7, 2, dtype=torch.float64)
    xd, yd = x.double(), y.double()
    resid = yd.T - w @ xd.T  # (points, n)
    want = (resid**2).mean(1) / (2 * 0.25) + math.log(0.5) + 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(nll(w), want, rtol=1e-12, atol=1e-12)
    assert torch.equal(model.weight, before)
    assert (nll.dim, nll.names) == (2, ["weight"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    torch.testing.assert_close(module_nll(model, loader, slt.gaussian_nll(0.5))(w), want)


def test_module_nll_falls_back_to_a_loop_when_vmap_cannot_run_the_model():
    x, y = _linear_data(32, 2)
    gauss = slt.gaussian_nll(0.5)

    def branching(model, batch):  # data-dependent control flow: vmap refuses it
        return gauss(model, batch) if bool((model.weight.sum() > -100).item()) else None

    w = torch.randn(5, 2, dtype=torch.float64)
    plain = module_nll(torch.nn.Linear(2, 1, bias=False), (x, y), gauss)
    looped = module_nll(torch.nn.Linear(2, 1, bias=False), (x, y), branching)
    with pytest.warns(RuntimeWarning, match="one parameter point at a time"):
        values = looped(w)
    torch.testing.assert_close(values, plain(w))
    assert not looped.vectorized


def test_quadrature_through_module_nll_matches_the_gaussian_integral():
    n, sigma = 200, 0.5
    x, y = _linear_data(n, 2, seed=1)
    nll = module_nll(torch.nn.Linear(2, 1, bias=False), (x, y), slt.gaussian_nll(sigma))
    xd, yd = x.double().numpy(), y.double().numpy().ravel()
    a = xd.T @ xd / (n * sigma**2)  # Hessian of L_n
    prec = n * a + np.eye(2)
    mode = np.linalg.solve(prec, xd.T @ yd / sigma**2)
    l_mode = float(nll(torch.tensor(mode[None]))[0])
    exact = n * l_mode + 0.5 * mode @ mode + 0.5 * np.linalg.slogdet(prec)[1]
    res = quadrature_free_energy(nll, n=n)
    assert res.dim == 2
    assert abs(res.free_energy - exact) <= res.error <= 1e-7


def test_bad_arguments_are_named():
    sq = lambda w: (w**2).sum(1)  # noqa: E731
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3"):
        quadrature_free_energy(sq, n=10, dim=4)
    with pytest.raises(ValueError, match="bounds"):
        quadrature_free_energy(sq, n=10, dim=1, bounds=[[1.0, -1.0]])
    # (2, d) for d = 3 is not the box (d, 2): refused, not reshaped into another box
    with pytest.raises(ValueError, match=r"bounds must be finite \(3, 2\) rows"):
        quadrature_free_energy(sq, n=10, dim=3, bounds=[[-1.0, -2.0, -3.0], [1.0, 2.0, 3.0]])
    # NaN is not zero mass: the integral is undefined there, and the error says where
    half_nan = lambda w: torch.where(w[:, 0] > 0, torch.nan, w[:, 0] ** 2 / 2)  # noqa: E731
    with pytest.raises(ValueError, match="nll returned NaN at .* points"):
        quadrature_free_energy(half_nan, n=100, dim=1)
    with pytest.raises(ValueError, match="prior_std"):
        quadrature_free_energy(sq, n=10, dim=1, prior_std=0.0)
    with pytest.raises(ValueError, match="shape"):
        quadrature_free_energy(lambda w: w, n=10, dim=2)
    with pytest.raises(ValueError, match="max_evals"):
        quadrature_free_energy(lambda w: (w[:, 0] * w[:, 1]) ** 2, n=10**4, dim=2, max_evals=10**4)


def test_an_exhausted_budget_is_reported():
    with pytest.warns(RuntimeWarning, match="did not reach"):
        res = quadrature_free_energy(lambda w: (w[:, 0] * w[:, 1]) ** 2, n=100, dim=2,
                                     rtol=1e-14, max_evals=200_000)  # fmt: skip
    assert not res.converged and "NOT converged" in str(res)
    assert json.loads(json.dumps(res.to_dict()))["converged"] is False
    assert res.error > 1e-14
