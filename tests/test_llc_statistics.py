"""λ̂ against exact finite-n answers, within Monte Carlo error.

Gaussian linear regression at the least-squares minimizer ŵ is exactly quadratic:
nβ (L_n(w) - L_n(ŵ)) = (nβ/2) (w - ŵ)ᵀ H (w - ŵ), H = XᵀX / (nσ²). Full-batch SGLD
w' = w - (ε/2) A (w - ŵ) + √ε ξ with A = nβH + γI is a Gaussian AR(1) whose stationary
covariance in the eigenbasis of H is 1 / (P_i (1 - ε P_i / 4)), P_i = nβ q_i + γ. So

    E[λ̂] = ½ Σ_i nβ q_i / (P_i (1 - ε P_i / 4)),

which tends to THEORY.md's ½ Σ nβ q_i / (nβ q_i + γ) as ε → 0. Tolerance: 4 standard
errors over 8 chains (the estimator's own ``llc_std``).
"""

import math

import numpy as np
import pytest
import torch

import slt


def _regression(n=512, scales=(1.0, 2.0, 0.5), sigma=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(scales), generator=g, dtype=torch.float64) * torch.tensor(
        scales, dtype=torch.float64
    )
    w_true = torch.randn(len(scales), 1, generator=g, dtype=torch.float64)
    y = x @ w_true + sigma * torch.randn(n, 1, generator=g, dtype=torch.float64)
    w_hat = torch.linalg.lstsq(x, y).solution
    model = torch.nn.Linear(len(scales), 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_hat.T)
    q = np.linalg.eigvalsh((x.T @ x / (n * sigma**2)).numpy())
    data = torch.utils.data.TensorDataset(x, y)
    return model, data, q


def _expected(q, nbeta, gamma, eps):
    p = nbeta * q + gamma
    return 0.5 * float(np.sum(nbeta * q / (p * (1 - eps * p / 4))))


@pytest.mark.parametrize("eps, gamma, draws", [(2e-3, 20.0, 2000), (1e-4, 100.0, 4000)])
def test_full_batch_sgld_hits_exact_gaussian_target(eps, gamma, draws):
    model, data, q = _regression()
    loader = torch.utils.data.DataLoader(data, batch_size=len(data))
    res = slt.estimate_llc(
        model, loader, slt.gaussian_nll(1.0), step_size=eps, localization=gamma,
        num_chains=8, num_draws=draws, num_burnin=1000, progress=False,
    )  # fmt: skip
    expected = _expected(q, res.nbeta, gamma, eps)
    assert abs(res.llc - expected) < 4 * res.llc_std, (res.llc, res.llc_std, expected)
    if eps <= 1e-4:  # here the discretized target is THEORY.md's continuous one to < 1%
        continuous = 0.5 * float(np.sum(res.nbeta * q / (res.nbeta * q + gamma)))
        assert abs(expected / continuous - 1) < 0.01
        assert continuous < 0.6 * len(q) / 2  # γ matters: far below d/2


def test_default_nbeta_is_n_over_log_n():
    model, data, _ = _regression(n=300)
    loader = torch.utils.data.DataLoader(data, batch_size=50)
    res = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), num_chains=1, num_draws=5,
                           num_burnin=0, progress=False)  # fmt: skip
    assert res.n == 300 and res.nbeta_default
    assert res.nbeta == pytest.approx(300 / math.log(300))
    assert "default n/log n" in str(res)


def test_loss_control_variate_reduces_per_draw_spread():
    # Same seed ⇒ same chains (the loss control variate does not change the sampler), so
    # the per-draw λ̂ of the two estimators are paired.
    model, data, _ = _regression(n=2048)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    kw = dict(step_size=1e-4, num_chains=2, num_draws=400, num_burnin=100, progress=False)
    with_cv = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), control_variate="loss", **kw)
    without = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), control_variate="none", **kw)
    np.testing.assert_array_equal(with_cv.trace, without.trace)
    assert with_cv.llc_trace.std() < 0.5 * without.llc_trace.std()


def test_full_data_loss_at_center_is_sample_weighted():
    # 10 samples in batches of 4: the last batch has 2, so an unweighted mean of batch
    # means would be wrong.
    model, data, _ = _regression(n=10)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    res = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), num_chains=1, num_draws=1,
                           num_burnin=0, progress=False)  # fmt: skip
    x, y = data.tensors
    with torch.no_grad():
        full = float(slt.gaussian_nll(1.0)(model, (x, y)))
    assert res.init_loss == pytest.approx(full, rel=1e-12)


def test_rmsprop_sgld_holds_its_preconditioner_after_the_burn_in_and_hits_the_target():
    # pSGLD without its Γ term is exact only for a constant preconditioner: V adapting
    # throughout (devinterp's way) put λ̂ 13% above the exact value here (+6.7σ)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _regression import regression

    model, data, q = regression(n=512)
    nbeta, gamma, eps = 512 / math.log(512), 20.0, 3e-5
    exact = 0.5 * float(np.sum(nbeta * q / (nbeta * q + gamma)))
    # ε G P / 4 at the largest preconditioner 1/δ = 10 bounds the discretisation bias
    bias = 1 / (1 - eps * 10 * (nbeta * q.max() + gamma) / 4) - 1
    res = slt.estimate_llc(model, torch.utils.data.DataLoader(data, batch_size=512),
                           slt.gaussian_nll(1.0), sampler="rmsprop_sgld", step_size=eps,
                           localization=gamma, control_variate="none", num_chains=32,
                           num_burnin=2000, num_draws=8000, seed=12, progress=False)  # fmt: skip
    assert abs(res.llc - exact) <= 4 * res.llc_std + bias * exact


def test_se_is_the_larger_of_the_two_error_bars():
    case = slt.zoo.regular(3, n=256)
    res = slt.estimate_llc(case.model, case.loader(), case.loss_fn, num_chains=3,
                           num_draws=50, num_burnin=10, progress=False)  # fmt: skip
    assert res.se == max(res.llc_std, res.mcse)
    one = slt.estimate_llc(case.model, case.loader(), case.loss_fn, num_chains=1,
                           num_draws=50, num_burnin=10, progress=False)  # fmt: skip
    assert math.isnan(one.llc_std) and one.se == one.mcse
