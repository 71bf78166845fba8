"""WAIC, V_n, ν and the held-out generalization loss against exact values.

Two models whose posterior is known exactly for any data set:

- regression y = w·x + N(0, σ²), prior N(0, I): the posterior is N(m, Λ⁻¹), so with
  r_i = y_i - x_i·m and s_i² = x_iᵀΛ⁻¹x_i, log E_w p(y_i|w) = log N(y_i; x_i·m, σ² + s_i²)
  and Var_w[ℓ_i] = (2 s_i⁴ + 4 r_i² s_i²)/(4σ⁴);
- a²b² (f = ab·x, truth 0): the likelihood depends on w only through P = ab, whose prior
  density is K_0(|P|)/π (the product of two standard normals), so every posterior
  expectation is a 1-d integral in P (Gauss–Legendre in t = √|P|, which removes K_0's
  logarithmic singularity).

The sampled values must match the exact ones within 4 standard errors on one data set; over
many data sets the exact values then show the claim itself, E[WAIC - S_n] = E[G_n - S]
(Watanabe 2010), where T_n alone misses by about 2ν/n.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

import slt
from slt.evidence import waic
from slt.zoo.potentials import Monomial

SIGMA_REG, SIGMA_SING = 1.0, 0.5
W0 = np.array([1.0, -0.5, 0.0, 0.5])


def _regression_data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(W0))).astype(np.float32).astype(np.float64)
    y = (x @ W0 + SIGMA_REG * rng.normal(size=n)).astype(np.float32).astype(np.float64)
    return x, y


def _singular_data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n).astype(np.float32).astype(np.float64)
    y = (SIGMA_SING * rng.normal(size=n)).astype(np.float32).astype(np.float64)
    return x, y


def _gaussian_log_density(y, mean, var):
    return -0.5 * (y - mean) ** 2 / var - 0.5 * np.log(2 * math.pi * var)


def _exact_regression(x, y, x_test=None, y_test=None):
    """(T_n, V_n, WAIC, G - S, G) at β = 1: G - S as the mean KL over the test inputs, G on
    the held-out (x_test, y_test)."""
    s2 = SIGMA_REG**2
    prec = x.T @ x / s2 + np.eye(x.shape[1])
    cov = np.linalg.inv(prec)
    m = cov @ x.T @ y / s2
    spread = np.einsum("ij,jk,ik->i", x, cov, x)
    r = y - x @ m
    t_n = -_gaussian_log_density(y, x @ m, s2 + spread).mean()
    v_n = ((2 * spread**2 + 4 * r**2 * spread) / (4 * s2**2)).sum()
    gap = g = math.nan
    if x_test is not None:  # KL(N(x·w0, σ²) || N(x·m, σ² + s²)), averaged over x
        var = s2 + np.einsum("ij,jk,ik->i", x_test, cov, x_test)
        kl = 0.5 * np.log(var / s2) + (s2 + (x_test @ (W0 - m)) ** 2) / (2 * var) - 0.5
        gap = kl.mean()
        if y_test is not None:
            g = -_gaussian_log_density(y_test, x_test @ m, var).mean()
    return t_n, v_n, t_n + v_n / len(y), gap, g


_T, _TW = np.polynomial.legendre.leggauss(400)


def _exact_singular(x, y, x_test=None, y_test=None):
    """(T_n, V_n, WAIC, G) at β = 1 for f = ab·x by quadrature over P = ab."""
    s2 = SIGMA_SING**2
    sxx, sxy = (x * x).sum(), (x * y).sum()
    sd = SIGMA_SING / math.sqrt(sxx)
    reach = abs(sxy / sxx) + 30 * sd
    nodes, weights = [], []
    for sign in (-1.0, 1.0):  # P = ±t², t ∈ (0, √reach)
        t = (_T + 1) / 2 * math.sqrt(reach)
        nodes.append(sign * t * t)
        weights.append(_TW / 2 * math.sqrt(reach) * 2 * t)
    p, w = np.concatenate(nodes), np.concatenate(weights)
    log_post = np.log(special.k0(np.abs(p))) - (sxx * p * p - 2 * sxy * p) / (2 * s2)
    w = w * np.exp(log_post - log_post.max())
    w /= w.sum()
    const = math.log(SIGMA_SING) + 0.5 * math.log(2 * math.pi)
    ell = (y[:, None] - x[:, None] * p[None, :]) ** 2 / (2 * s2) + const  # (sample, node)
    mean = ell @ w
    var = (ell - mean[:, None]) ** 2 @ w
    t_n = -np.log(np.exp(-ell) @ w).mean()
    v_n = var.sum()
    g = math.nan
    if x_test is not None:
        ell_t = (y_test[:, None] - x_test[:, None] * p[None, :]) ** 2 / (2 * s2) + const
        g = -np.log(np.exp(-ell_t) @ w).mean()
    return t_n, v_n, t_n + v_n / len(y), g


def _loader(x, y):
    xt = torch.tensor(x, dtype=torch.float32).reshape(len(x), -1)
    yt = torch.tensor(y, dtype=torch.float32).reshape(-1, 1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=len(x))


def test_singular_fluctuation_is_half_d_on_a_regular_model():
    n = 500
    x, y = _regression_data(n, 0)
    x_test, y_test = _regression_data(20_000, 1)
    model = torch.nn.Linear(len(W0), 1, bias=False)
    res = waic(model, _loader(x, y), slt.gaussian_nll(SIGMA_REG),
               test_loader=_loader(x_test, y_test), num_chains=8, num_draws=400,
               num_burnin=100, seed=0, progress=False)  # fmt: skip
    t_n, v_n, w_n, kl, g = _exact_regression(x, y, x_test, y_test)
    d = len(W0)
    assert abs(res.singular_fluctuation - v_n / 2) < 4 * res.singular_fluctuation_se
    assert abs(v_n / 2 - d / 2) < 0.1 * d / 2  # this data set's exact ν: d/2 up to O(d/√n)
    assert abs(res.singular_fluctuation - d / 2) < 4 * res.singular_fluctuation_se + 0.1 * d / 2
    assert abs(res.waic - w_n) < 4 * res.waic_se
    assert abs(res.training_loss - t_n) < 4 * res.waic_se
    assert abs(res.generalization_loss - g) < 4 * res.generalization_loss_se
    print(
        res, f"\nexact: ν {v_n / 2:.4f}, WAIC {w_n:.6f}, T_n {t_n:.6f}, G {g:.6f}, G - S {kl:.2e}"
    )


def test_waic_and_held_out_loss_match_the_exact_values_on_a_singular_model():
    n = 200
    x, y = _singular_data(n, 0)
    x_test, y_test = _singular_data(20_000, 1)
    res = waic(Monomial((1, 1)), _loader(x, y), slt.gaussian_nll(SIGMA_SING),
               test_loader=_loader(x_test, y_test), num_chains=8, num_draws=400,
               num_burnin=100, seed=0, progress=False)  # fmt: skip
    t_n, v_n, w_n, g = _exact_singular(x, y, x_test, y_test)
    assert abs(res.waic - w_n) < 4 * res.waic_se
    assert abs(res.training_loss - t_n) < 4 * res.waic_se
    assert abs(res.functional_variance - v_n) < 4 * res.functional_variance_se
    assert abs(res.generalization_loss - g) < 4 * res.generalization_loss_se
    assert res.singular_fluctuation < 0.75  # well below d/2 = 1: singular
    print(res, f"\nexact: ν {v_n / 2:.4f}, WAIC {w_n:.6f}, T_n {t_n:.6f}, G {g:.6f}")


def test_the_exact_singular_quadrature_agrees_with_brute_force():
    x, y = _singular_data(50, 3)
    t_n, v_n, _, _ = _exact_singular(x, y)
    p = np.linspace(-1.5, 1.5, 600_001)
    p = p[p != 0]
    ell = (y[:, None] - x[:, None] * p[None, :]) ** 2 / (2 * SIGMA_SING**2)
    ell += math.log(SIGMA_SING) + 0.5 * math.log(2 * math.pi)
    w = special.k0(np.abs(p)) * np.exp(-ell.sum(0) + ell.sum(0).min())
    w /= w.sum()
    assert -np.log(np.exp(-ell) @ w).mean() == pytest.approx(t_n, rel=1e-5)
    mean = ell @ w
    assert (((ell - mean[:, None]) ** 2) @ w).sum() == pytest.approx(v_n, rel=1e-3)


@pytest.mark.parametrize("model", ["regular", "a2b2"])
def test_waic_tracks_the_generalization_loss_over_data_sets(model):
    # E[WAIC - S_n] = E[G_n - S] (Watanabe 2010) on the exact values (which the sampled ones
    # match, above); T_n alone is biased by -2ν/n. n(· - ·) has spread O(1) per data set.
    n, reps = 200, 200
    diffs, t_only = [], []
    for r in range(reps):
        if model == "regular":
            x, y = _regression_data(n, 10 + r)
            x_test, _ = _regression_data(2000, 10_000 + r)
            t_n, _, w_n, gap, _ = _exact_regression(x, y, x_test)
            s_n = -_gaussian_log_density(y, x @ W0, SIGMA_REG**2).mean()
        else:
            x, y = _singular_data(n, 10 + r)
            x_test, y_test = _singular_data(1000, 10_000 + r)
            t_n, _, w_n, g = _exact_singular(x, y, x_test, y_test)
            s_n = -_gaussian_log_density(y, 0.0, SIGMA_SING**2).mean()
            gap = g + _gaussian_log_density(y_test, 0.0, SIGMA_SING**2).mean()
        diffs.append(n * ((w_n - s_n) - gap))
        t_only.append(n * ((t_n - s_n) - gap))
    diffs, t_only = np.array(diffs), np.array(t_only)
    se = diffs.std(ddof=1) / math.sqrt(reps)
    assert abs(diffs.mean()) < 3 * se
    assert t_only.mean() < -5 * t_only.std(ddof=1) / math.sqrt(reps)  # the test has power
    print(f"{model}: n(WAIC - S_n) - n(G - S) = {diffs.mean():.3f} ± {se:.3f}; with T_n alone "
          f"{t_only.mean():.3f} ± {t_only.std(ddof=1) / math.sqrt(reps):.3f}")  # fmt: skip
