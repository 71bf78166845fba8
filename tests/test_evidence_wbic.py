"""WBIC against exact values.

- Linear regression with a flat prior: the posterior at β is N(ŵ, (nβA)⁻¹), so
  E_β[n L_n] = n L_n(ŵ) + d/(2β) exactly: WBIC = n L_n(ŵ) + (d/2) log n and λ̂ = d/2
  (THEORY.md). The zoo's regression has w* = ŵ exactly (noise orthogonal to x).
- Singular potentials: E_β[n L_n] at β = 1/log n and F_n by quadrature of the closed-form
  L_n; WBIC - F_n = O_p(√log n) (Watanabe 2013), while BIC - F_n grows like
  (d/2 - λ) log n.
Tolerances: 4 standard errors.
"""

from __future__ import annotations

import math

import pytest

from slt import zoo
from slt.evidence import quadrature_free_energy, wbic


@pytest.mark.parametrize("sampler", ["mala", "sgld"])
def test_wbic_with_a_flat_prior_on_linear_regression_is_bic(sampler):
    d, n = 4, 1000
    case = zoo.regular(d, n=n)
    res = wbic(case.model, case.loader(), case.loss_fn, prior_std=None, sampler=sampler,
               num_chains=6, num_draws=300, num_burnin=100, seed=3, progress=False)  # fmt: skip
    assert res.sampler == sampler and res.beta == pytest.approx(1 / math.log(n))
    exact = res.nll_at_center + 0.5 * d * math.log(n)  # n L_n(ŵ) + (d/2) log n
    assert abs(res.wbic - exact) < 4 * res.wbic_se
    assert abs(res.lambda_hat - d / 2) < 4 * res.lambda_se
    assert res.wbic_se < 0.15 * 0.5 * d * math.log(n)  # precise enough to mean something
    print(res)


def _potential(k, n):
    case = zoo.potential(k, n=n)
    return case, zoo.exact_nll(case)[2]


@pytest.mark.parametrize("k", [(1, 1), (1, 2)], ids=["a2b2", "a2b4"])
def test_wbic_tracks_the_free_energy_on_singular_potentials(k):
    n = 1000
    case, nll = _potential(k, n)
    res = wbic(case.model, case.loader(), case.loss_fn, num_chains=6, num_draws=300,
               num_burnin=100, seed=0, progress=False)  # fmt: skip
    exact = quadrature_free_energy(nll, n=n, dim=2, beta=res.beta).expected_nll
    exact2 = quadrature_free_energy(nll, n=n, dim=2, beta=res.beta2).expected_nll
    free = quadrature_free_energy(nll, n=n, dim=2).free_energy
    assert abs(res.wbic - exact) < 4 * res.wbic_se
    exact_lambda = (exact - exact2) / (1 / res.beta - 1 / res.beta2)
    assert abs(res.lambda_hat - exact_lambda) < 4 * res.lambda_se
    # WBIC - F_n = O(√log n) (measured by quadrature: -0.36 to +0.09 for a²b², a²b⁴ at n from
    # 10² to 10⁵), while BIC misses F_n by about (d/2 - λ) log n
    assert abs(res.wbic - free) < math.sqrt(math.log(n))
    assert res.bic_at_center - free > math.sqrt(math.log(n))
    print(
        res, f"\nexact WBIC {exact:.6g}, F_n {free:.6g}, exact two-temperature λ {exact_lambda:.4g}"
    )


def test_wbic_checks_its_arguments():
    case = zoo.regular(1, n=32)
    with pytest.raises(ValueError, match="beta2"):
        wbic(case.model, case.loader(), case.loss_fn, beta=0.3, beta2=0.3, progress=False)
    with pytest.raises(ValueError, match="num_chains"):
        wbic(case.model, case.loader(), case.loss_fn, num_chains=1, progress=False)


def test_wbic_at_beta_one_takes_a_second_temperature_below_it():
    # min(2β, 1) would equal β = 1: the default β₂ is then β/2, not an error about beta2
    case = zoo.regular(1, n=32)
    res = wbic(case.model, case.loader(), case.loss_fn, beta=1.0, num_chains=2, num_draws=8,
               num_burnin=4, num_anneal=0, progress=False)  # fmt: skip
    assert (res.beta, res.beta2) == (1.0, 0.5)
