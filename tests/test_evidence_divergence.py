"""Chains that diverge in the evidence estimators: reported per chain (NaN, in the warnings),
never averaged in; and what cannot be estimated is refused with the reason."""

import math

import numpy as np
import pytest
import torch

import slt


def _case_nan_beyond(radius: float):
    """regular(1), with a loss that is NaN once the weight is ``radius`` from w*: chains
    that wander that far diverge."""
    case = slt.zoo.regular(1, n=64)
    center = next(case.model.parameters()).detach().clone()

    def loss_fn(model, batch):
        w = next(model.parameters())
        far = (w - center).abs().max() > radius
        return case.loss_fn(model, batch) + torch.where(far, math.nan, 0.0)

    return case, loss_fn


def test_waic_marks_a_diverged_chain_nan_and_says_so():
    case, loss_fn = _case_nan_beyond(0.3)
    res = slt.waic(case.model, case.loader(), loss_fn, prior_std=None, sampler="sgld",
                   step_scale=0.5, num_chains=4, num_draws=40, num_burnin=10, num_anneal=0,
                   seed=0, progress=False)  # fmt: skip
    lost = np.isnan(res.waic_per_chain)
    assert res.waic_per_chain.shape == res.singular_fluctuation_per_chain.shape == (4,)
    assert 0 < lost.sum() < 4
    np.testing.assert_array_equal(np.isnan(res.singular_fluctuation_per_chain), lost)
    assert f"{lost.sum()} of 4 chains diverged" in res.warnings
    assert f"4 chains ({lost.sum()} diverged, left out)" in str(res)
    assert math.isfinite(res.waic) and math.isfinite(res.waic_se)


def test_waic_needs_two_recorded_draws_per_chain():
    case = slt.zoo.regular(1, n=64)
    with pytest.raises(ValueError, match="record_every=10 with num_draws=10 records one draw"):
        slt.waic(case.model, case.loader(), case.loss_fn, num_draws=10, record_every=10,
                 progress=False)  # fmt: skip


def test_wbic_reports_divergence_at_the_second_temperature():
    # β₂ = 0.3 spreads the chains about 1.8x wider than β = 1: some cross the radius there
    case, loss_fn = _case_nan_beyond(0.5)
    res = slt.wbic(case.model, case.loader(), loss_fn, prior_std=None, sampler="sgld",
                   step_scale=0.5, beta=1.0, beta2=0.3, num_chains=4, num_draws=40,
                   num_burnin=10, num_anneal=0, seed=0, progress=False)  # fmt: skip
    lost = np.isnan(res.lambda_per_chain)
    assert np.isfinite(res.wbic_per_chain).all() and 0 < lost.sum() < 4
    assert f"{lost.sum()} of 4 chains diverged at β₂ = 0.3" in res.warnings
    assert f"λ̂ is taken over the {4 - lost.sum()} chains that finished both rungs" in res.warnings
    # over the chains that finished both rungs, not the difference of two other averages
    assert res.lambda_hat == pytest.approx(res.lambda_per_chain[~lost].mean(), rel=1e-12)


def test_free_energy_refuses_a_loss_that_is_not_finite_under_the_prior():
    case, loss_fn = _case_nan_beyond(2.0)
    with pytest.raises(ValueError, match=r"the loss is nan at \d+ of 16 draws from the prior"):
        slt.free_energy(case.model, case.loader(), loss_fn, num_chains=2, num_draws=8,
                        num_burnin=2, num_rungs=3, num_prior_draws=16, progress=False)  # fmt: skip


class _FirstColumn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)

    def forward(self, x):
        return self.lin(x[:, :1])


def test_waic_leaves_out_held_out_passes_that_are_not_finite_and_says_so():
    # the second column flags held-out samples; their loss is NaN once w leaves a radius,
    # the training loss never is: no chain diverges, some held-out passes are lost
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, generator=g)
    y = 0.5 * x + 0.3 * torch.randn(64, 1, generator=g)
    train = torch.utils.data.TensorDataset(torch.cat([x, torch.zeros_like(x)], 1), y)
    held = torch.utils.data.TensorDataset(torch.cat([x, torch.ones_like(x)], 1), y)
    model = _FirstColumn()
    with torch.no_grad():
        model.lin.weight.fill_(0.5)
        model.lin.bias.zero_()
    center = model.lin.weight.detach().clone()
    nll = slt.gaussian_nll(0.3)

    def loss_fn(m, batch):
        far = (m.lin.weight - center).abs().max() > 0.05
        flagged = batch[0][:, 1].max() > 0
        return nll(m, batch) + torch.where(far & flagged, math.nan, 0.0)

    loader = torch.utils.data.DataLoader(train, batch_size=64)
    test_loader = torch.utils.data.DataLoader(held, batch_size=64)
    res = slt.waic(model, loader, loss_fn, test_loader=test_loader, prior_std=None,
                   sampler="sgld", step_scale=0.5, num_chains=4, num_draws=40, num_burnin=10,
                   num_anneal=0, seed=0, progress=False)  # fmt: skip
    lost = [w for w in res.warnings if "held-out passes gave a NaN or infinite loss" in w]
    assert len(lost) == 1 and "no G" not in lost[0]
    assert math.isfinite(res.generalization_loss) and math.isfinite(res.waic)
    assert not np.isnan(res.waic_per_chain).any()  # no chain diverged


@pytest.mark.parametrize("name", ["wbic", "waic"])
@pytest.mark.parametrize("num_anneal", [0, 2])
def test_a_loss_not_finite_where_chains_start_is_named(name, num_anneal):
    # finite at w*, NaN at some prior draws: the error says where, not "at w*" or "nbeta"
    case, loss_fn = _case_nan_beyond(1.0)
    with pytest.raises(ValueError, match=r"the loss is nan at \d+ of \d+ draws from the prior"):
        getattr(slt, name)(case.model, case.loader(), loss_fn, num_chains=8, num_draws=8,
                           num_burnin=4, num_anneal=num_anneal, progress=False)  # fmt: skip


class _Rows(torch.utils.data.Dataset):
    """The case's data as a plain Dataset (not a TensorDataset): SGLD on minibatches."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors[0])

    def __getitem__(self, i):
        return self.tensors[0][i], self.tensors[1][i]


def test_a_chain_whose_last_step_leaves_the_loss_nan_is_a_diverged_chain():
    # the trace holds the loss before each step, so a last step into the NaN region went
    # unseen, and the next rung's posterior, built there, raised "the loss at w* (the model
    # as given) is nan" though the user's model is finite
    case = slt.zoo.regular(2, n=128)
    loader = torch.utils.data.DataLoader(_Rows(case.dataset.tensors), batch_size=32,
                                         shuffle=True)  # fmt: skip

    def loss_fn(model, batch):  # finite at the model (w0 = 1) and wherever w0 <= 2
        nan = torch.where(model[0].weight[0, 0] > 2.0, math.nan, 0.0)
        return case.loss_fn(model, batch) + nan

    res = slt.free_energy(case.model, loader, loss_fn, num_rungs=3, num_chains=6,
                          num_draws=40, num_burnin=10, seed=0, progress=False)  # fmt: skip
    assert math.isfinite(res.free_energy)
    assert any("of 6 chains diverged" in w for w in res.warnings)


def test_wbic_says_a_chain_lost_at_beta_once():
    # the rung record is cumulative: a chain lost at β was said to diverge at β₂ as well
    case = slt.zoo.regular(2, n=128)

    def loss_fn(model, batch):
        return case.loss_fn(model, batch) + torch.where(model[0].weight[0, 0] > 1.5, math.nan, 0.0)

    res = slt.wbic(case.model, case.loader(32), loss_fn, num_chains=6, num_draws=40,
                   num_burnin=10, num_anneal=0, sampler="sgld", step_scale=0.3, prior_std=1.0,
                   seed=0, progress=False)  # fmt: skip
    at_beta = int(np.isnan(res.wbic_per_chain).sum())
    at_beta2 = int((np.isnan(res.lambda_per_chain) & ~np.isnan(res.wbic_per_chain)).sum())
    assert at_beta > 0
    said = [w for w in res.warnings if "chains diverged at β₂" in w]
    assert said == (
        [f"{at_beta2} of 6 chains diverged at β₂ = {res.beta2:.4g}"] if at_beta2 else []
    )


def test_ladders_whose_chains_never_move_say_so():
    # MALA at step_scale 1e5 rejects every proposal: WAIC printed V_n = 0 ± 0 without a
    # word, free_energy's mc_error was NaN (max(nan, x)) with no acceptance warning
    case = slt.zoo.regular(2, n=128)
    kw = dict(num_chains=4, num_draws=40, num_burnin=10, progress=False, seed=0,
              step_scale=1e5, prior_std=None)  # fmt: skip
    for res in (slt.waic(case.model, case.loader(32), case.loss_fn, record_every=4, **kw),
                slt.wbic(case.model, case.loader(32), case.loss_fn, **kw)):  # fmt: skip
        assert any("chains never moved (at β = " in w for w in res.warnings)
        assert any("MALA accepted under 20%" in w for w in res.warnings)
    kw.pop("prior_std")
    fe = slt.free_energy(case.model, case.loader(32), case.loss_fn, num_rungs=3,
                         num_prior_draws=8, **kw)  # fmt: skip
    assert math.isnan(fe.mc_error_propagated)
    assert fe.mc_error == fe.mc_error_between_chains > 0
    assert any("never moved" in w for w in fe.warnings)
