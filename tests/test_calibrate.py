"""Step-size calibration, step_size="auto", the too-large-step warning, and λ̂ against nβ."""

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import slt
from slt import zoo
from slt.chains import flush_denormals
from slt.curvature import top_hessian_eigenvalue
from slt.posterior import Posterior

sys.path.insert(0, str(Path(__file__).parent))
from _regression import regression as _regression  # noqa: E402


def test_power_iteration_finds_the_top_hessian_eigenvalue():
    model, data, q = _regression()
    posterior = Posterior(model, torch.utils.data.DataLoader(data, batch_size=len(data)),
                          slt.gaussian_nll(1.0), control_variate="none")  # fmt: skip
    assert top_hessian_eigenvalue(posterior, list(data.tensors)) == pytest.approx(q.max(), rel=1e-3)


def test_power_iteration_finds_the_largest_magnitude_of_an_indefinite_hessian():
    # eigenvalues ±2 pair up (away from a minimum: prior draws, chains' draws): the Rayleigh
    # quotient stalled below 2 (0.42-2.0 over seeds); ‖Hv‖ does not
    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

    curvatures = torch.tensor([2.0, -2.0, 0.5, -0.1])

    def loss(model, batch):
        return 0.5 * (curvatures * model.w**2).sum() + 0 * batch.sum()

    batch = torch.zeros(8, 1)
    posterior = Posterior(Quadratic(), [batch], loss, n=8)
    for seed in range(10):
        assert top_hessian_eigenvalue(posterior, batch, seed=seed) == pytest.approx(2.0, rel=1e-4)


def test_calibration_choice_where_the_answer_is_known():
    # Full batch on a Gaussian target: SGLD's relative bias in λ̂ at ε is known exactly,
    # E[λ̂](ε)/E[λ̂](0) = Σ w_i/(1 - εP_i/4) / Σ w_i. The grid's first candidate keeps the
    # inflation of the stiffest direction at max_stiff_bias (1%), so the chosen ε must be
    # within it; a 40x larger step (bias > 25%) must never be chosen.
    model, data, q = _regression()
    loader = torch.utils.data.DataLoader(data, batch_size=len(data))
    cal = slt.calibrate(model, loader, slt.gaussian_nll(1.0), localization=1.0, progress=False)
    nb = cal.nbeta
    p = nb * q + 1.0
    w = nb * q / p

    def bias(eps):
        return float(np.sum(w / (1 - eps * p / 4)) / np.sum(w) - 1)

    assert 0 < bias(cal.step_size) <= cal.settings["max_stiff_bias"] + 1e-9
    assert bias(40 * cal.step_size) > 0.25
    chosen = [c for c in cal.candidates if c.step_size == cal.step_size][0]
    assert chosen.passed and chosen.acceptance > 0.9 and chosen.stationary
    assert "step_size" in str(cal) and len(cal.to_dict()["candidates"]) == len(cal.candidates)


def test_explicit_grid_rejects_a_step_that_is_too_large():
    model, data, q = _regression()
    loader = torch.utils.data.DataLoader(data, batch_size=len(data))
    p_max = 1024 / math.log(1024) * q.max() + 1
    huge, fine = 3.0 / p_max, 0.05 / p_max
    cal = slt.calibrate(model, loader, slt.gaussian_nll(1.0), step_sizes=[fine, huge],
                        num_burnin=50, num_draws=50, progress=False)  # fmt: skip
    first = cal.candidates[0]
    assert first.step_size == pytest.approx(huge) and not first.passed
    assert any("acceptance" in r or "εP/4" in r for r in first.reasons)
    assert cal.step_size == pytest.approx(fine)


def test_auto_step_size_lands_within_ten_percent_and_costs_little():
    case = zoo.reduced_rank(7, 5, 4, 3, seed=2)  # m = 1, not a validate case
    res = slt.estimate_llc(case.model, case.loader(), case.loss_fn, step_size="auto",
                           num_draws=1500, num_burnin=500, progress=False)  # fmt: skip
    assert abs(res.llc / float(case.lam) - 1) < 0.10, str(res)
    cal = res.calibration
    assert cal["step_size"] == res.step_size
    # the pilot budget is a fifth of the estimate's steps (time is measured by benchmarks)
    assert cal["settings"]["pilot_steps"] <= res.num_chains * (1500 + 500) // 5
    assert "chosen by calibration" in str(res)


def test_auto_calibrates_on_the_posterior_it_samples(monkeypatch):
    # one pass over the data at w* (and one set of tables) serves the pilots and the estimate,
    # with the numbers calibrate() gives on a posterior of its own
    built = []
    init = Posterior.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(Posterior, "__init__", counted)
    case = zoo.regular(4, n=512)
    res = slt.estimate_llc(case.model, case.loader(64), case.loss_fn, step_size="auto",
                           num_draws=200, num_burnin=50, progress=False)  # fmt: skip
    assert len(built) == 1
    alone = slt.calibrate(case.model, case.loader(64), case.loss_fn,
                          max_pilot_steps=4 * (200 + 50) // 5, progress=False)  # fmt: skip
    assert res.step_size == alone.step_size
    assert res.calibration["candidates"] == [c.__dict__ for c in alone.candidates]


def test_too_large_step_size_is_caught():
    # Stable (εP_max < 4) but far too large: λ̂ is inflated. It must not pass silently.
    model, data, q = _regression(n=4096)
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True)
    p_max = 4096 / math.log(4096) * q.max() + 1
    res = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), step_size=2.0 / p_max,
                           num_draws=500, num_burnin=100, progress=False)  # fmt: skip
    assert res.mala_acceptance < slt.sampling.MIN_SGLD_ACCEPTANCE
    assert any("too large" in w for w in res.warnings)
    good = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), step_size=0.02 / p_max,
                            num_draws=500, num_burnin=300, progress=False)  # fmt: skip
    assert not any("too large" in w for w in good.warnings)


def test_flush_denormals_restores_the_callers_mode():
    def flushing():
        return bool(torch.tensor(1e-40, dtype=torch.float32).mul(1.0) == 0)

    for before in (False, True):
        torch.set_flush_denormal(before)
        with flush_denormals():
            assert flushing()
        assert flushing() is before
    torch.set_flush_denormal(False)


def test_llc_vs_nbeta_rescales_the_step_and_tracks_the_gaussian_target():
    model, data, q = _regression(n=512)
    loader = torch.utils.data.DataLoader(data, batch_size=len(data))
    sweep = slt.llc_vs_nbeta(model, loader, slt.gaussian_nll(1.0), nbetas=[200, 50],
                             step_size=2e-4, localization=5.0, num_chains=4, num_draws=1000,
                             num_burnin=300, progress=False)  # fmt: skip
    assert sweep.nbeta.tolist() == [50.0, 200.0]
    ref = 512 / math.log(512)
    np.testing.assert_allclose(sweep.step_size, 2e-4 * ref / sweep.nbeta)
    for nb, eps, llc, se in zip(sweep.nbeta, sweep.step_size, sweep.llc, sweep.llc_std):
        p = nb * q + 5.0
        expected = 0.5 * float(np.sum(nb * q / (p * (1 - eps * p / 4))))
        assert abs(llc - expected) < 4 * se + 0.02 * expected
    assert "nβ" in str(sweep) and len(sweep.relative_change) == 1


@pytest.mark.parametrize("nbetas", [100.0, [], [10.0, -1.0], "many", [[10.0, 20.0]]])
def test_llc_vs_nbeta_names_a_bad_grid(nbetas):
    case = slt.zoo.regular(1, n=32)
    with pytest.raises(ValueError, match="nbetas must be a sequence of finite numbers > 0"):
        slt.llc_vs_nbeta(case.model, case.loader(), case.loss_fn, nbetas=nbetas,
                         step_size=1e-3, progress=False)  # fmt: skip


def test_a_sweep_prints_no_nan_or_inf_percent_and_a_result_with_numpy_scalars_is_json():
    import dataclasses
    import json

    from slt.nbeta import NbetaSweep

    sweep = NbetaSweep(nbeta=np.array([10.0, 20.0, 40.0]), llc=np.array([0.0, np.nan, 2.0]),
                       llc_std=np.array([0.1, 0.1, 0.1]), step_size=np.array([1e-3] * 3), n=64,
                       results=())  # fmt: skip
    text = str(sweep)
    assert "nan%" not in text and "inf%" not in text and text.count("—") == 2
    case = slt.zoo.regular(1, n=32)
    res = slt.estimate_llc(case.model, case.loader(), case.loss_fn, num_chains=2, num_draws=4,
                           step_size=1e-3, progress=False)  # fmt: skip
    json.dumps(dataclasses.replace(res, llc=np.float32(res.llc)).to_dict())


def test_a_parameter_the_loss_does_not_read_is_calibrated_around():
    # an unused head: its rows of H v are zero, not an autograd error
    class TwoHeads(torch.nn.Module):
        def __init__(self, used):
            super().__init__()
            self.used, self.unused = used, torch.nn.Linear(3, 1)

        def forward(self, x):
            return self.used(x)

    model, data, q = _regression()
    loader = torch.utils.data.DataLoader(data, batch_size=len(data))
    posterior = Posterior(TwoHeads(model), loader, slt.gaussian_nll(1.0))
    assert top_hessian_eigenvalue(posterior, list(data.tensors)) == pytest.approx(q.max(), rel=1e-3)
    res = slt.estimate_llc(TwoHeads(model), loader, slt.gaussian_nll(1.0), step_size="auto",
                           num_chains=1, num_draws=40, progress=False)  # fmt: skip
    assert np.isfinite(res.llc)


def test_auto_never_samples_with_a_step_its_pilot_saw_diverge():
    # a²b⁴ is flat at w*: the first candidate, set by γ alone, diverges, and the budget of
    # a fifth of the estimate holds only it
    case = zoo.potential([1, 2], n=1024)
    with pytest.raises(slt.DivergenceError, match="every candidate step size diverged"):
        slt.estimate_llc(case.model, case.loader(), case.loss_fn, step_size="auto",
                         progress=False)  # fmt: skip


def test_mala_is_not_held_to_minibatch_noise_it_does_not_have():
    case = zoo.regular(3, n=512)
    cal = slt.calibrate(case.model, case.loader(), case.loss_fn, sampler="mala", nbeta=5000,
                        num_candidates=2, progress=False)  # fmt: skip
    assert not any("noise" in r for c in cal.candidates for r in c.reasons)


def test_a_first_pilot_over_the_budget_is_said_and_repeats_are_refused():
    case = zoo.regular(3, n=512)
    cal = slt.calibrate(case.model, case.loader(), case.loss_fn, max_pilot_steps=100,
                        num_candidates=2, progress=False)  # fmt: skip
    assert any("over the budget of 100" in w for w in cal.warnings)
    with pytest.raises(ValueError, match="step_sizes must be distinct"):
        slt.calibrate(case.model, case.loader(), case.loss_fn, step_sizes=[3e-4, 3e-4],
                      progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="nbetas must be distinct"):
        slt.llc_vs_nbeta(case.model, case.loader(), case.loss_fn, nbetas=[20, 80, 20])
    with pytest.raises(ValueError, match="step_size='auto': llc_vs_nbeta takes a number"):
        slt.llc_vs_nbeta(case.model, case.loader(), case.loss_fn, step_size="auto")


def test_a_grid_spanning_decades_is_warned_of_before_any_pilot(monkeypatch):
    # every pilot covers the first's diffusion time: [1e-2, 1e-6] made the last one 10,000x
    # the first's steps (~300 s on a small model), and nothing said so
    from slt import sampling

    class Sampled(Exception):
        pass

    def no_pilot(*args, **kwargs):
        raise Sampled

    monkeypatch.setattr(sampling, "sample_llc", no_pilot)
    case = zoo.regular(3, n=512)
    with (
        pytest.warns(UserWarning, match=r"would run 4,000,000 chain-steps"),
        pytest.raises(Sampled),
    ):
        slt.calibrate(case.model, case.loader(), case.loss_fn, step_sizes=[1e-6, 1e-2],
                      num_chains=4, num_burnin=50, num_draws=50, progress=False)  # fmt: skip
    for options in (
        {"step_sizes": [1e-6, 1e-2], "max_pilot_steps": 10_000},
        {"step_sizes": [1e-3, 1e-4]},
    ):  # capped, or a narrow grid: nothing to say
        with warnings.catch_warnings(), pytest.raises(Sampled):
            warnings.simplefilter("error")
            slt.calibrate(case.model, case.loader(), case.loss_fn, progress=False, **options)


@pytest.mark.parametrize(
    "option, value, message",
    [("n", 1, "n must be an integer >= 2, got 1"), ("n", "64", "n must be an integer >= 2"),
     ("step_size", -1e-3, "step_size must be a finite number > 0, got -0.001"),
     ("step_size", [1e-3], "step_size must be a real number"),
     ("step_size", True, "step_size must be a real number, got True"),
     ("nbetas", [True, 2], "nbetas must be a sequence of finite numbers > 0"),
     ("rescale_step_size", "yes", "rescale_step_size must be True or False")],
)  # fmt: skip
def test_llc_vs_nbeta_checks_its_own_arguments(option, value, message):
    # n=1 was a ZeroDivisionError, a negative step named its rescaled value, True was 1
    case = slt.zoo.regular(1, n=32)
    kw = {"nbetas": [10.0, 20.0], "step_size": 1e-3} | {option: value}
    with pytest.raises((ValueError, TypeError), match=message):
        slt.llc_vs_nbeta(case.model, case.loader(), case.loss_fn, progress=False, **kw)


def test_llc_vs_nbeta_keeps_the_points_before_a_diverged_one_and_says_each_warning():
    # every chain diverging at the largest nβ raised and lost the finished points; each
    # point's warnings were only in sweep.results[i]
    case = slt.zoo.regular(2, n=256)
    sweep = slt.llc_vs_nbeta(case.model, case.loader(64), case.loss_fn, nbetas=[10, 30, 1e5],
                             step_size=1e-3, rescale_step_size=False, num_chains=2,
                             num_draws=50, num_burnin=10, progress=False)  # fmt: skip
    assert np.isfinite(sweep.llc[:2]).all() and np.isnan(sweep.llc[2])
    assert sweep.results[2] is None
    assert any(w.startswith("at nβ = 1e+05: all 2 chains diverged") for w in sweep.warnings)
    for i, nb in enumerate(sweep.nbeta[:2]):
        said = [w for w in sweep.warnings if w.startswith(f"at nβ = {nb:.4g}: ")]
        assert len(said) == len(sweep.results[i].warnings)
    assert "warning: at nβ = 1e+05" in str(sweep)
    with pytest.raises(slt.DivergenceError, match="every chain diverged at every nβ"):
        slt.llc_vs_nbeta(case.model, case.loader(64), case.loss_fn, nbetas=[1e5, 2e5],
                         step_size=1e-3, rescale_step_size=False, num_chains=2,
                         num_draws=50, num_burnin=10, progress=False)  # fmt: skip
