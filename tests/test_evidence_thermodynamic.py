"""Thermodynamic integration against exact free energies.

The zoo's potentials have n L_n(w) = n L_n(0) + n c (Π_j w_j^{k_j})² exactly (the noise is
orthogonal to x), and its regression n L_n(w) = n L_n(w*) + (n/2)(w - w*)ᵀA(w - w*); so
F(β) and E_β[n L_n] follow from cheap quadrature of a closed-form L_n (d = 2), a
semi-closed 1-d form (a²b²c²) or a Gaussian integral (the regression). Each rung's
E_β[n L_n] is compared with its exact value first, then F_n. Tolerances: 4.5 standard
errors per rung (14 rungs × 5 cases: a normal z exceeds 4.5 with probability 7e-6), and
3 × the stated error (Monte Carlo and integration) for F_n.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special

from slt import zoo
from slt.evidence import free_energy, quadrature_free_energy
from slt.evidence.thermodynamic import _integration_error, ladder_weights


def _a2b2c2_log_z(t):
    """log ∫ exp(-t (abc)²) N(0, I) d(a, b, c): a and c in closed form, b by quad."""

    def f(b):
        alpha = 2 * t * b * b
        if alpha < 1e-12:
            return math.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
        inner = special.k0e(1 / (4 * alpha)) / math.sqrt(2 * math.pi * alpha)
        return math.exp(-0.5 * b * b) / math.sqrt(2 * math.pi) * inner

    pieces = [(0, 1e-3), (1e-3, 0.1), (0.1, 1), (1, np.inf)]
    total = sum(integrate.quad(f, a, b, epsabs=0, epsrel=1e-12, limit=500)[0] for a, b in pieces)
    return math.log(2 * total)


def _exact(case, k):
    """F(β) and E_β[n L_n] as functions of β, exactly, for a zoo case."""
    n = case.n
    if k is None:  # the regression: Gaussian integrals
        x, y = case.dataset.tensors
        x = x.double()
        a = (x.T @ x / n).numpy()  # σ = 1
        w_star = case.model[0].weight.detach().double().numpy().ravel()
        with torch.no_grad():
            l_star = float(case.loss_fn(case.model, (x.float(), y)))

        def expected(beta):
            prec = n * beta * a + np.eye(len(a))
            mode = np.linalg.solve(prec, n * beta * a @ w_star)
            spread = np.trace(a @ np.linalg.inv(prec)) + (mode - w_star) @ a @ (mode - w_star)
            return n * l_star + 0.5 * n * spread

        def free(beta):
            prec = n * beta * a + np.eye(len(a))
            mode = np.linalg.solve(prec, n * beta * a @ w_star)
            value = 0.5 * n * beta * (mode - w_star) @ a @ (mode - w_star) + 0.5 * mode @ mode
            return n * beta * l_star + value + 0.5 * np.linalg.slogdet(prec)[1]

        return free, expected
    l0, c, nll = zoo.exact_nll(case)
    if len(k) == 3:  # a²b²c²: the semi-closed form, E = dF/dβ by central differences

        def free(beta):
            return n * beta * l0 - _a2b2c2_log_z(n * beta * c)

        def expected(beta):
            h = 1e-4 * beta
            return (free(beta + h) - free(beta - h)) / (2 * h)

        return free, expected

    def free(beta):
        return quadrature_free_energy(nll, n=n, dim=len(k), beta=beta, rtol=1e-7).free_energy

    def expected(beta):
        return quadrature_free_energy(nll, n=n, dim=len(k), beta=beta, rtol=1e-7).expected_nll

    return free, expected


CASES = [  # (name, builder, k, n): two- and three-parameter potentials and a regression
    ("a2b2", lambda n: zoo.potential((1, 1), n=n), (1, 1), 200),
    ("a2b2", lambda n: zoo.potential((1, 1), n=n), (1, 1), 2000),
    ("a2b4", lambda n: zoo.potential((1, 2), n=n), (1, 2), 500),
    ("a2b2c2", lambda n: zoo.potential((1, 1, 1), n=n), (1, 1, 1), 500),
    ("a2+b2", lambda n: zoo.regular(2, n=n), None, 1000),
]


@pytest.mark.parametrize("name, build, k, n", CASES, ids=[f"{c[0]}-n{c[3]}" for c in CASES])
def test_thermodynamic_integration_matches_the_exact_free_energy(name, build, k, n):
    case = build(n)
    free, expected = _exact(case, k)
    res = free_energy(case.model, case.loader(), case.loss_fn, num_rungs=9, num_chains=6,
                      num_draws=150, num_burnin=50, seed=1, progress=False)  # fmt: skip
    assert res.sampler == "mala" and res.betas[0] == 0 and res.betas[-1] == 1
    # every rung first (the prior rung too: its draws are independent)
    exact = np.array([expected(b) if b > 0 else math.nan for b in res.betas])
    z = (res.expected_nll[1:] - exact[1:]) / res.expected_nll_se[1:]
    assert np.all(np.abs(z) < 4.5), z
    truth = free(1.0)
    assert abs(res.free_energy - truth) <= 3 * res.error, (res.free_energy, truth, res.error)
    # the error is small enough to mean something: a tenth of what BIC charges, (d/2) log n
    assert res.error < 0.1 * res.num_params / 2 * math.log(n)
    assert res.mc_error >= res.mc_error_propagated
    print(f"{name} n={n}: TI {res.free_energy - res.nll_at_center:.4f} ± {res.mc_error:.3f} (MC) "
          f"± {res.integration_error:.3f} (int.), exact {truth - res.nll_at_center:.4f}; rung "
          f"|z| max {np.abs(z).max():.2f}; {res.seconds:.1f} s")  # fmt: skip


def test_weights_integrate_the_ladder_and_the_error_estimate_sees_a_coarse_ladder():
    # g(β) = 30 e^{-30β} + 1 + 0.5/(β + 0.001): fast near 0, then like a + b/β, as E_β[n L_n]
    def g(b):
        return 30 * np.exp(-30 * b) + 1 + 0.5 / (b + 1e-3)

    exact = 1 - math.expm1(-30) + 0.5 * math.log(1.001 / 1e-3)
    errors = []
    for num in (9, 17, 33, 65):
        betas = np.concatenate([[0.0], np.geomspace(1e-4, 1, num)])
        value = ladder_weights(betas) @ g(betas)
        estimate = _integration_error(betas, g(betas))
        assert abs(value - exact) <= estimate  # the estimate bounds the actual error here
        errors.append(abs(value - exact))
    assert errors[0] > 3 * errors[1] > 9 * errors[2] > 27 * errors[3]  # second order

    # an even number of rungs above β₁ leaves one interval unpaired; the estimate still
    # sees each interval (here, 4 rungs: the last interval unpaired missed 80% of the error)
    def smooth(b):
        return 1 + 5 * np.exp(-3 * b)

    exact = 1 + 5 * (1 - math.exp(-3)) / 3
    for num in (3, 4, 5, 6):
        betas = np.concatenate([[0.0], np.geomspace(0.01, 1, num)])
        actual = abs(ladder_weights(betas) @ smooth(betas) - exact)
        assert _integration_error(betas, smooth(betas)) > (0.5 if num == 3 else 1) * actual
    # the rule is exact for a + b/β above β₁, and for a constant everywhere
    betas = np.concatenate([[0.0], np.geomspace(0.01, 1, 5)])
    w = ladder_weights(betas)
    assert w.sum() == pytest.approx(1, abs=1e-14)
    assert (w[1:] @ (1 / betas[1:]) - 0.5) == pytest.approx(math.log(100), abs=1e-12)


def test_free_energy_rejects_a_flat_prior_and_bad_ladders():
    case = zoo.regular(1, n=32)
    with pytest.raises(ValueError, match="prior_std"):
        free_energy(case.model, case.loader(), case.loss_fn, prior_std=None, progress=False)
    with pytest.raises(ValueError, match="betas"):
        free_energy(case.model, case.loader(), case.loss_fn, betas=[0.1, 0.5], progress=False)
    # two rungs leave the every-other-rung error estimate nothing to compare
    with pytest.raises(ValueError, match="at least 3"):
        free_energy(case.model, case.loader(), case.loss_fn, betas=[0.1, 1.0], progress=False)
    with pytest.raises(ValueError, match="num_rungs"):
        free_energy(case.model, case.loader(), case.loss_fn, num_rungs=2, progress=False)
    for beta_min in (1.0, 2.0):  # a ladder that does not climb to 1 from below
        with pytest.raises(ValueError, match=f"beta_min must be < 1.*{beta_min}"):
            free_energy(case.model, case.loader(), case.loss_fn, beta_min=beta_min,
                        progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="sampler"):
        free_energy(case.model, case.loader(), case.loss_fn, sampler="sgnht", progress=False)
