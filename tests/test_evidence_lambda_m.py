"""λ and m from λ̂(nβ): synthetic data from the formula, interval coverage, and the exact
finite-nβ expectations of the normal-crossing potentials a², a²b², a²b²c²."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from slt.evidence import estimate_lambda_m
from slt.nbeta import NbetaSweep
from slt.zoo import expected_llc

NBETA = np.geomspace(1e2, 1e6, 9)
X = 1 / np.log(NBETA)


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("order, sigma", [(1, 0.002), (2, 0.0005)])
def test_recovers_lambda_and_m_from_noisy_points(m, order, sigma):
    # se(m) is about 9σ (order 1) and 70σ (order 2) on this grid: m_int is off with
    # probability < 1e-6; λ is checked within 4 standard errors
    rng = np.random.default_rng(m)
    lam = 1.25
    y = lam - (m - 1) * X + sigma * rng.standard_normal(len(X))
    res = estimate_lambda_m(NBETA, y, np.full(len(X), sigma), order=order)
    assert res.m_int == m and m in res.m_consistent
    assert abs(res.lam - lam) < 4 * res.lam_std
    assert abs(res.m - m) < 4 * res.m_std
    assert abs(res.lam_at_m - lam) < 4 * res.lam_at_m_std < 4 * res.lam_std


def test_the_second_order_term_is_fitted_and_leaving_it_out_biases_m():
    rng = np.random.default_rng(0)
    sigma, c = 0.0005, 3.0
    y = 0.5 - 2 * X + c * X**2 + sigma * rng.standard_normal(len(X))
    res = estimate_lambda_m(NBETA, y, np.full(len(X), sigma))
    assert res.m_int == 3 and abs(res.curvature - c) < 4 * res.curvature_std
    line = estimate_lambda_m(NBETA, y, np.full(len(X), sigma), order=1)
    assert line.m < 2.6 and line.inflated  # the straight line misses, and says its χ² is large
    assert any("χ²/dof" in w for w in line.warnings)


@pytest.mark.parametrize("weighted, low, high", [(True, 0.95, 0.993), (False, 0.925, 0.975)])
def test_interval_for_m_covers_at_the_stated_level(weighted, low, high):
    # 1000 replicates: binomial sd 0.7%. Known σ: the χ²/dof > 1 inflation makes the
    # interval conservative (measured 97%); estimated σ (Student t): 95%.
    rng = np.random.default_rng(0)
    sigma, hits = 0.01, 0
    for _ in range(1000):
        y = 0.5 - X + sigma * rng.standard_normal(len(X))
        res = estimate_lambda_m(NBETA, y, np.full(len(X), sigma) if weighted else None, order=1)
        hits += res.m_interval[0] <= 2 <= res.m_interval[1]
    assert low <= hits / 1000 <= high


@pytest.mark.parametrize("k, m", [((1,), 1), ((1, 1), 2), ((1, 1, 1), 3)])
def test_exact_finite_nbeta_expectations_of_the_potentials(k, m):
    # nβ E[K] under exp(-nβ K - ‖w‖²/2), K = Π w_j², by quadrature (deterministic)
    nbeta = np.geomspace(1e3, 1e6, 7)
    llc = [expected_llc(k, nb, 1.0) for nb in nbeta]
    res = estimate_lambda_m(nbeta, llc)
    assert res.m_int == m
    assert res.lam == pytest.approx(0.5, rel=0.1)
    assert res.lam_at_m == pytest.approx(0.5, rel=0.01)
    assert res.m == pytest.approx(m, abs=0.25)


def test_accepts_an_nbeta_sweep_and_drops_failed_points():
    llc = 0.7 - X
    llc[3] = np.nan
    sweep = NbetaSweep(nbeta=NBETA, llc=llc, llc_std=np.full(len(X), 0.01),
                       step_size=np.full(len(X), 1e-4), n=1000, results=())  # fmt: skip
    res = estimate_lambda_m(sweep, order=1)
    assert len(res.nbeta) == len(X) - 1 and res.weighted
    assert res.m_int == 2 and res.lam == pytest.approx(0.7, abs=1e-9)
    assert any("left out" in w for w in res.warnings)


def test_a_sweeps_warnings_come_along_and_too_close_a_fit_is_said():
    # the fit dropped the sweep's warnings (every point had ESS 25, R̂ 1.10), and exact
    # agreement of correlated points (one seed at every nβ) passed for precision
    rng = np.random.default_rng(0)
    llc = 0.7 - X + 0.01 * rng.standard_normal(len(X))  # scatter as the errors say
    sweep = NbetaSweep(nbeta=NBETA, llc=llc, llc_std=np.full(len(X), 0.01),
                       step_size=np.full(len(X), 1e-4), n=1000, results=(),
                       warnings=("at nβ = 30: R̂ = 1.097 > 1.05",))  # fmt: skip
    res = estimate_lambda_m(sweep, order=1)
    assert res.warnings == ("sweep: at nβ = 30: R̂ = 1.097 > 1.05",)
    exact = estimate_lambda_m(NBETA, 0.7 - X, np.full(len(X), 0.01), order=1)
    assert any("closer to the fit than their errors allow" in w for w in exact.warnings)


def test_result_is_frozen_and_prints_lambda_m_and_the_integers():
    res = estimate_lambda_m(NBETA, 0.5 - X + 0.01 * np.sin(NBETA), np.full(len(X), 0.01))
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.m = 1.0
    text = str(res)
    assert "λ = " in text and "m as an integer: 2" in text and "consistent at 95%" in text
    assert res.residuals.shape == NBETA.shape
    assert json.loads(json.dumps(res.to_dict()))["m_int"] == 2


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="nbeta must be finite and > 1"):
        estimate_lambda_m([0.5, 10, 100, 1000], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="one value per point"):
        estimate_lambda_m(NBETA, X[:-1])
    with pytest.raises(ValueError, match="at least 4 points"):
        estimate_lambda_m(NBETA[:3], X[:3])
    with pytest.raises(ValueError, match="llc_std must be > 0"):
        estimate_lambda_m(NBETA, X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="order"):
        estimate_lambda_m(NBETA, X, order=3)
    for order in (2.0, True):  # not an int 1 or 2: named, not a slicing error or order 1
        with pytest.raises(ValueError, match=f"order must be 1 or 2, got {order!r}"):
            estimate_lambda_m(NBETA, X, order=order)
