"""BIC and Laplace: exact on a Gaussian-linear model, their failure at a singular point
reported as it is, the Hessian-rank bracket against known learning coefficients."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy import special

import slt
from slt import zoo
from slt.evidence import bic, laplace, module_nll, quadrature_free_energy


def _regression(n=300, sigma=0.5, prior_std=1.0, seed=0):
    """A 2-parameter linear model in float64 at its MAP under N(0, prior_std² I)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[0.7], [-0.4]], dtype=torch.float64)
    y = y + sigma * torch.randn(n, 1, generator=g, dtype=torch.float64)
    prec = x.T @ x / sigma**2 + torch.eye(2, dtype=torch.float64) / prior_std**2
    mode = torch.linalg.solve(prec, x.T @ y / sigma**2)
    model = torch.nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(mode.T)
    logdet = torch.linalg.slogdet(prec)[1]
    return model, (x, y), slt.gaussian_nll(sigma), float(logdet), mode.ravel()


def test_laplace_is_exact_for_a_gaussian_linear_model_at_its_map():
    model, data, loss_fn, logdet, mode = _regression()
    n = data[0].shape[0]
    res = laplace(model, [data], loss_fn, prior_std=1.0)
    with torch.no_grad():
        nll = n * float(loss_fn(model, data))
    # F = n L_n(m) - log φ(m) + ½ log det(P/2π), P = XᵀX/σ² + I; -log φ(m) = ½|m|² + log 2π
    exact = nll + 0.5 * float(mode @ mode) + 0.5 * logdet
    assert res.free_energy == pytest.approx(exact, abs=1e-9)
    assert res.free_energy == res.free_energy_upper
    assert res.newton_decrement < 1e-20 and res.warnings == ()
    assert (res.rank, res.num_small, res.lambda_bracket) == (2, 0, (1.0, 1.0))
    quad = quadrature_free_energy(module_nll(model, data, loss_fn), n=n)
    assert res.free_energy == pytest.approx(quad.free_energy, abs=10 * quad.error + 1e-9)


def test_bic_is_n_loss_plus_half_d_log_n():
    model, data, loss_fn, *_ = _regression(prior_std=1e6)  # MAP ≈ least squares
    n = data[0].shape[0]
    res = bic(model, [data], loss_fn)
    with torch.no_grad():
        loss = float(loss_fn(model, data))
    assert res.bic == pytest.approx(n * loss + math.log(n), abs=1e-9)
    assert (res.num_params, res.n, res.penalty) == (2, n, pytest.approx(math.log(n)))
    assert res.grad_norm < 1e-9
    assert bic(model, [data], loss_fn, n=10 * n).penalty == pytest.approx(math.log(10 * n))
    assert "BIC =" in str(res) and "ŵ should minimize" in str(res)


def test_laplace_at_a2b2_reports_a_zero_hessian_and_misses_the_log_n():
    # At w = 0 of K = c a²b² the Hessian vanishes: both directions are decided by the prior,
    # and their ½ log(1/(nσ²)) cancels (d/2) log(n/2π) - log φ(0) exactly, so the Laplace
    # F is n L_n(0) at every n, while the exact F grows like ½ log n - log log n.
    gaps = []
    for n in (512, 8192):
        case = zoo.potential((1, 1), n=n)
        res = laplace(case.model, case.loader(4096), case.loss_fn)
        assert (res.rank, res.num_small, res.num_negative) == (0, 2, 0)
        assert res.lambda_bracket == (0.0, 0.5)
        p = 1 / n
        assert res.prior_precision == pytest.approx(p)
        assert res.small_contribution == pytest.approx(math.log(p), abs=1e-4)
        assert res.free_energy - res.nll == pytest.approx(0.0, abs=1e-4)
        x = case.dataset.tensors[0].double()
        t = n * float(x.square().mean()) / (2 * 0.5**2)  # n L_n(w) - n L_n(0) = t a²b²
        exact = res.nll - math.log(special.k0e(1 / (8 * t)) / math.sqrt(4 * math.pi * t))
        gaps.append(exact - res.free_energy)
    grow = 0.5 * math.log(8192 / 512) - math.log(math.log(8192) / math.log(512))
    assert gaps[1] - gaps[0] == pytest.approx(grow, abs=0.1)


@pytest.mark.parametrize(
    "case",
    [zoo.reduced_rank(5, 4, 3, 2, n=512), zoo.deep_linear((6, 5, 4, 6), 3, n=512),
     zoo.regular(4, 2, n=512)],
    ids=lambda c: c.name,
)  # fmt: skip
def test_rank_bracket_contains_the_learning_coefficient(case):
    res = laplace(case.model, case.loader(512), case.loss_fn)
    lo, hi = res.lambda_bracket
    assert lo <= float(case.lam) <= hi
    assert res.rank + res.num_small == res.num_params
    # the flat directions sit far below the threshold, the curved ones far above
    ev = np.abs(res.eigenvalues)
    assert ev[ev <= res.threshold].max(initial=0) < 0.1 * res.threshold
    assert ev[ev > res.threshold].min() > 1e3 * res.threshold


def test_lanczos_path_agrees_with_the_dense_spectrum():
    case = zoo.reduced_rank(5, 4, 3, 2, n=512)
    dense = laplace(case.model, case.loader(512), case.loss_fn)
    top = laplace(case.model, case.loader(512), case.loss_fn, dense_max=10, num_eigs=18)
    assert (top.method, top.num_unknown, len(top.eigenvalues)) == ("eigsh", 9, 18)
    np.testing.assert_allclose(top.eigenvalues[-dense.rank :], dense.eigenvalues[-dense.rank :],
                               rtol=1e-8)  # fmt: skip
    assert top.rank == dense.rank  # the computed spectrum reaches the threshold
    # the 9 unknown eigenvalues are ~1e-8 (of either sign) against 1/(nσ²) = 2e-3
    assert top.free_energy == pytest.approx(dense.free_energy, abs=1e-3)
    assert top.free_energy_upper == pytest.approx(dense.free_energy, abs=1e-3)
    assert "9 are taken as 0" in str(top)


def test_not_a_minimum_is_reported():
    model, data, loss_fn, *_ = _regression()
    with torch.no_grad():
        model.weight.add_(0.05)
    res = laplace(model, [data], loss_fn)
    assert res.newton_decrement > 0.01
    assert any("Newton decrement" in w for w in res.warnings)

    def neg(m, batch):
        return -loss_fn(m, batch)

    res = laplace(model, [data], neg)
    assert res.num_negative == 2 and math.isnan(res.free_energy)
    assert any("not a minimum" in w for w in res.warnings)
    assert "F ≈ nan" in str(res) and "[nan" not in str(res)  # printed "in [nan, nan]"


def test_bic_warns_away_from_a_minimum():
    # bic printed ‖∇L_n‖ and nothing else, where laplace warned
    model, data, loss_fn, *_ = _regression(prior_std=1e6)
    at_min = bic(model, [data], loss_fn)
    assert at_min.warnings == () and at_min.descent < 1e-6
    with torch.no_grad():
        model.weight.add_(0.05)
    off = bic(model, [data], loss_fn)
    # the quadratic model is exact here: the fall is n L_n(ŵ) - n L_n(ŵ_min)
    assert off.descent == pytest.approx(off.nll - at_min.nll, rel=0.05)
    assert off.descent > 0.5 and "ŵ is not a minimum of L_n" in str(off)


def test_results_are_frozen_and_print_the_diagnosis():
    case = zoo.reduced_rank(5, 4, 3, 2, n=256)
    res = laplace(case.model, case.loader(256), case.loss_fn)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.rank = 0
    text = str(res)
    assert f"rank {res.rank} of 27" in text and "r/2 ≤ λ ≤ r/2 + (d - r)/4" in text
    assert f"{res.num_small} eigenvalues with |λ| ≤" in text
    assert json.loads(json.dumps(res.to_dict()))["rank"] == res.rank
    with pytest.raises(ValueError, match="prior_std"):
        laplace(case.model, case.loader(256), case.loss_fn, prior_std=0.0)


def test_user_model_is_untouched():
    case = zoo.deep_linear((4, 3, 4), 2, n=128)
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    case.model.train()
    laplace(case.model, case.loader(64), case.loss_fn)
    bic(case.model, case.loader(64), case.loss_fn)
    assert case.model.training
    for k, v in case.model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype


class _AlwaysDropout(torch.nn.Module):
    """A linear model with dropout on its input in every mode: draws from torch's RNG."""

    def __init__(self, weight):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(weight)

    def forward(self, x):
        return self.lin(torch.nn.functional.dropout(x, 0.1, training=True))


def test_bic_and_laplace_leave_the_global_rng_alone():
    # bic drew the model's dropout from the caller's state (another value each call);
    # laplace too, then failed with vmap's bare "randomness error mode"
    case = slt.zoo.regular(2, n=64)
    model = _AlwaysDropout(case.model[0].weight)
    torch.manual_seed(1)
    first = slt.bic(model, case.loader(16), case.loss_fn).bic
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(1))
    assert slt.bic(model, case.loader(16), case.loss_fn).bic == first
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="draws random numbers in its forward pass"):
        slt.laplace(model, case.loader(16), case.loss_fn)
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(1))
