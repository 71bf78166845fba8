"""estimate_llc(microbatch=m): batches of whole micro-batches, control variates from a table."""

import numpy as np
import pytest
import torch

import slt
import slt.tables as tables_module
from slt.sampling import build_posterior


def _mlp(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def _data(n, width_in, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width_in, generator=g)
    return torch.utils.data.TensorDataset(x, torch.randn(n, 1, generator=g))


def _posterior(model, dataset, microbatch, batch_size=32, shuffle=True, cv="gradient", seed=0):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)
    return build_posterior(model, loader, slt.gaussian_nll(1.0), n=None, nbeta=None,
                           localization=1.0, control_variate=cv, sampler="sgld",
                           microbatch=microbatch, seed=seed)  # fmt: skip


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_epoch_is_whole_micro_batches_covering_every_sample_once(shuffle):
    p = _posterior(_mlp((3, 8, 1)), _data(240, 3), microbatch=8, batch_size=48, shuffle=shuffle)
    groups = p.batches.groups
    assert groups.shape == (30, 8)
    assert sorted(groups.reshape(-1).tolist()) == list(range(240))
    members = {frozenset(g.tolist()) for g in groups}
    for epoch in range(2):
        seen = []
        for _, index in p.batches.indexed_epoch(torch.Generator().manual_seed(epoch)):
            rows = torch.arange(240)[index] if isinstance(index, slice) else index
            assert rows.numel() == 48
            assert all(frozenset(r.tolist()) in members for r in rows.reshape(-1, 8))
            seen += rows.tolist()
        assert sorted(seen) == list(range(240))


def test_the_chains_batched_indices_are_the_loops_batches():
    p = _posterior(_mlp((3, 8, 1)), _data(240, 3), microbatch=8, batch_size=48)
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    loop = [p.batches.indexed_epoch(torch.Generator().manual_seed(s)) for s in (1, 2)]
    chains = p.batches.chain_indices(generators)
    for _ in range(5):
        index = next(chains)
        for c in range(2):
            torch.testing.assert_close(index[c], next(loop[c])[1])


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("cv", ["gradient", "loss"])
def test_the_table_gives_the_pass_at_centers_control_variate(shuffle, cv):
    # d = 5,801: no per-sample table; with micro-batches of 10 the table has 30 rows
    p = _posterior(_mlp((10, 80, 60, 1)), _data(300, 10), microbatch=10, batch_size=30,
                   shuffle=shuffle, cv=cv)  # fmt: skip
    assert p.cache_loss.shape == (30,) and p.factors is None
    assert (p.cache_grad is None) == (cv == "loss")
    batches = p.stream(torch.Generator().manual_seed(3))
    next(batches)
    batch, index = next(batches)
    loss, grad_fn = p.at_center(batch, index)
    direct_loss, direct_grad_fn = p.at_center(batch, None)  # the passes at w*
    torch.testing.assert_close(loss.float(), direct_loss.float(), rtol=1e-5, atol=1e-6)
    params = p.reset()
    for a, b in zip(grad_fn(params, batch)[0], direct_grad_fn(params, batch)[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_table_rows_per_chain():
    p = _posterior(_mlp((3, 8, 1)), _data(240, 3), microbatch=8, batch_size=48)
    groups = p.batches.groups
    index = groups[torch.tensor([[4, 0, 7, 2, 9, 1], [3, 5, 6, 8, 10, 11]])].reshape(2, 48)
    assert p.table_rows(index).tolist() == [[4, 0, 7, 2, 9, 1], [3, 5, 6, 8, 10, 11]]
    correction, loss = p.table_correction(index)
    assert [c.shape[0] for c in correction] == [2] * 4 and loss.shape == (2,)
    for c in range(2):
        torch.testing.assert_close(loss[c], p.cache_loss[p.table_rows(index[c])].mean())


def _estimate(model, data, **kw):
    loader = torch.utils.data.DataLoader(data, batch_size=40, shuffle=True)
    return slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), step_size=1e-4,
                            num_chains=3, num_draws=60, num_burnin=20, progress=False,
                            **kw)  # fmt: skip


def test_loop_and_vmap_agree_and_the_result_records_it():
    model, data = _mlp((3, 12, 1)), _data(400, 3)
    loop = _estimate(model, data, microbatch=8, chain_method="loop")
    vmapped = _estimate(model, data, microbatch=8, chain_method="vmap")
    np.testing.assert_allclose(loop.llc_per_chain, vmapped.llc_per_chain, rtol=1e-4)
    np.testing.assert_allclose(loop.acceptance, vmapped.acceptance, rtol=1e-3, atol=1e-4)
    assert loop.microbatch == vmapped.microbatch == 8
    assert "control variate gradient (micro-batches of 8)" in str(vmapped)
    again = _estimate(model, data, microbatch=8, chain_method="vmap")
    np.testing.assert_array_equal(again.trace, vmapped.trace)  # same seed, same numbers
    other = _estimate(model, data, microbatch=8, chain_method="vmap", seed=1)
    assert not np.array_equal(other.trace, vmapped.trace)
    plain = _estimate(model, data, chain_method="vmap")
    assert plain.microbatch is None and "micro-batches" not in str(plain)
    assert not np.array_equal(plain.trace, vmapped.trace)  # other batches


def test_the_partition_comes_from_the_seed():
    model, data = _mlp((3, 8, 1)), _data(240, 3)
    first = _posterior(model, data, microbatch=8, seed=0).batches.groups
    torch.testing.assert_close(_posterior(model, data, microbatch=8, seed=0).batches.groups, first)
    assert not torch.equal(_posterior(model, data, microbatch=8, seed=1).batches.groups, first)


def test_hits_the_known_lambda_of_linear_regression():
    # zoo.regular(4): λ = d/2 = 2; 16 chains, tolerance 4 standard errors of the estimate
    # (0.04 each: 1.95 here, 1.96 without micro-batches, against 1.99)
    case = slt.zoo.regular(4, n=2048)
    loader = torch.utils.data.DataLoader(case.dataset, batch_size=128, shuffle=True)
    res = slt.estimate_llc(case.model, loader, case.loss_fn, step_size=1e-4, num_chains=16,
                           num_draws=4000, num_burnin=500, microbatch=16,
                           progress=False)  # fmt: skip
    # what λ̂ estimates at this nβ and γ = 1: ½ Σ nβ q / (nβ q + γ), q the eigenvalues of
    # XᵀX / (n σ²) (σ = 1), within 1% of λ here
    x = case.dataset.tensors[0].double()
    q = torch.linalg.eigvalsh(x.T @ x / case.n).numpy()
    target = 0.5 * float(np.sum(res.nbeta * q / (res.nbeta * q + 1.0)))
    assert abs(target / float(case.lam) - 1) < 0.01
    assert abs(res.llc - target) < 4 * res.llc_std, (res.llc, res.llc_std, target)


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            dict(microbatch=7),
            r"microbatch must divide the number of samples \(240\) and the "
            r"batch size \(40\); got 7",
        ),  # fmt: skip
        (dict(microbatch=0), "microbatch"),
        (dict(microbatch=8, control_variate="none"), "control_variate='none'"),
        (dict(microbatch=8, sampler="mala"), "whole dataset"),
    ],
)
def test_bad_microbatch_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        _estimate(_mlp((3, 8, 1)), _data(240, 3), **kw)


def test_a_table_over_the_budget_is_refused(monkeypatch):
    monkeypatch.setattr(tables_module, "_CACHE_MAX_FLOATS", 1000)
    with pytest.raises(ValueError, match=r"a table of 30 micro-batches × 41 parameters"):
        _estimate(_mlp((3, 8, 1)), _data(240, 3), microbatch=8)


def test_a_loader_without_sample_indices_is_refused():
    data = _data(240, 3)
    with pytest.raises(ValueError, match="micro-batches need a DataLoader over a TensorDataset"):
        slt.estimate_llc(_mlp((3, 8, 1)), [data.tensors], slt.gaussian_nll(1.0),
                         microbatch=8, progress=False)  # fmt: skip


def test_a_loss_that_is_not_a_mean_is_refused():
    def summed(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).sum()

    loader = torch.utils.data.DataLoader(_data(240, 3), batch_size=40, shuffle=True)
    with pytest.raises(ValueError, match="not a mean of per-sample terms"):
        slt.estimate_llc(_mlp((3, 8, 1)), loader, summed, microbatch=8, progress=False)


def test_the_model_and_its_data_are_left_alone():
    model, data = _mlp((3, 8, 1)), _data(240, 3)
    before = [p.detach().clone() for p in model.parameters()]
    x = data.tensors[0].clone()
    _estimate(model, data, microbatch=8)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(x, data.tensors[0]) and model.training


def test_calibration_pilots_sample_the_microbatched_chain():
    model, data = _mlp((3, 8, 1)), _data(240, 3)
    loader = torch.utils.data.DataLoader(data, batch_size=40, shuffle=True)
    kw = dict(step_sizes=[1e-3], num_draws=60, num_burnin=20, seed=2, progress=False)
    cal = slt.calibrate(model, loader, slt.gaussian_nll(1.0), microbatch=8, **kw)
    plain = slt.calibrate(model, loader, slt.gaussian_nll(1.0), **kw)
    pilot = slt.sampling.sample_llc(_posterior(model, data, 8, batch_size=40, seed=2),
                                    sampler="sgld", step_size=1e-3, num_chains=1,
                                    num_draws=60, num_burnin=20, seed=2)  # fmt: skip
    assert cal.candidates[0].llc == pytest.approx(pilot.llc, rel=1e-6)
    assert plain.candidates[0].llc != pytest.approx(pilot.llc, rel=1e-6)
    assert cal.settings["microbatch"] == 8 and plain.settings["microbatch"] is None
    with pytest.raises(ValueError, match=r"microbatch must divide the number of samples"):
        slt.calibrate(model, loader, slt.gaussian_nll(1.0), microbatch=7, **kw)
    auto = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), step_size="auto",
                            num_draws=100, num_burnin=20, microbatch=8,
                            progress=False)  # fmt: skip
    assert auto.calibration["settings"]["microbatch"] == 8 and auto.microbatch == 8


@pytest.mark.parametrize("cv", ["gradient", "loss"])
def test_the_full_data_terms_come_from_the_table(cv):
    # L_n(w*) and ∇L_n(w*) are the means of the table's rows (the micro-batches partition
    # the data): equal to the pass over the data up to rounding, and no pass is made
    model, data = _mlp((3, 8, 1)), _data(240, 3)
    grouped = _posterior(model, data, microbatch=8, batch_size=40, cv=cv)
    passed = _posterior(model, data, microbatch=None, batch_size=40, cv=cv)
    sizes = []
    loss_fn = slt.gaussian_nll(1.0)

    def counted(model, batch):
        sizes.append(len(batch[0]))
        return loss_fn(model, batch)

    loader = torch.utils.data.DataLoader(data, batch_size=40, shuffle=True)
    build_posterior(model, loader, counted, n=None, nbeta=None, localization=1.0,
                    control_variate=cv, sampler="sgld", microbatch=8, seed=0)  # fmt: skip
    assert sizes.count(40) == 1  # the first batch, checked; no pass over the six
    assert grouped.init_loss == pytest.approx(passed.init_loss, rel=1e-6)
    if cv == "gradient":
        for a, b in zip(grouped.init_grad, passed.init_grad):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    else:
        assert grouped.init_grad is None and passed.init_grad is None


def test_a_non_finite_loss_at_center_is_refused_with_micro_batches():
    model, data = _mlp((3, 8, 1)), _data(240, 3)
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    with pytest.raises(ValueError, match="the loss at w\\* \\(the model as given\\) is nan"):
        _posterior(model, data, microbatch=8, batch_size=40)


def test_an_n_other_than_the_datas_size_is_taken():
    # n sets nβ and L_n's meaning; the table is over the samples the loader holds
    res = _estimate(_mlp((3, 8, 1)), _data(240, 3), microbatch=8, n=120)
    assert res.microbatch == 8 and np.isfinite(res.llc)


def _normed(seed=0):
    # d = 4,609 > 4,096 and a LayerNorm: neither a per-sample table nor the factors of
    # nn.Linear layers stand in for the pass at w*, so microbatch="auto" takes micro-batches
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 64),
        torch.nn.LayerNorm(64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 1),
    )


def test_auto_takes_micro_batches_where_a_pass_at_center_would_run(monkeypatch):
    data = _data(240, 3)
    assert _posterior(_normed(), data, "auto", batch_size=48).microbatch == 2  # the smallest
    monkeypatch.setattr(tables_module, "_AUTO_MAX_FLOATS", 240 // 8 * 4609)
    p = _posterior(_normed(), data, "auto", batch_size=48)
    assert p.microbatch == 8 and p.cache_grad.shape == (30, 4609)  # the smallest that fits
    # at least four micro-batches a batch: 48 / 16 = 3 is too few, and nothing else fits
    monkeypatch.setattr(tables_module, "_AUTO_MAX_FLOATS", 240 // 16 * 4609)
    assert _posterior(_normed(), data, "auto", batch_size=48).microbatch is None
    assert _posterior(_normed(), data, "auto", batch_size=64).microbatch == 16


@pytest.mark.parametrize(
    "model, kw",
    [
        (lambda: _mlp((3, 8, 1)), {}),  # per-sample gradients fit a table
        (lambda: _mlp((10, 80, 60, 1)), {}),  # d = 5,801 of nn.Linear layers: the factors
        (_normed, dict(cv="loss")),  # the loss control variate has its per-sample table
        (_normed, dict(cv="none")),
        (_normed, dict(shuffle=False)),  # batches in the loader's order, as asked
        (_normed, dict(batch_size=37)),  # no common divisor of 240 and 37
    ],
)
def test_auto_leaves_batches_per_sample_elsewhere(model, kw):
    model = model()
    width = model[0].in_features
    p = _posterior(model, _data(240, width), "auto", **kw)
    assert p.microbatch is None and p.batches.groups is None


def test_auto_is_the_default_and_equals_the_size_it_picks():
    model, data = _normed(), _data(240, 3)
    res = _estimate(model, data)
    assert res.microbatch == 2 and "micro-batches of 2" in str(res)
    np.testing.assert_array_equal(_estimate(model, data, microbatch=2).trace, res.trace)
    plain = _estimate(model, data, microbatch=None)
    assert plain.microbatch is None and not np.array_equal(plain.trace, res.trace)


def test_auto_falls_back_to_the_passes_at_center():
    # a loss that is not a mean of per-sample terms has no table: per-sample batches and a
    # pass at w* on each, the numbers of microbatch=None, where an explicit size is refused
    def summed(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).sum() / 40

    loader = torch.utils.data.DataLoader(_data(240, 3), batch_size=40, shuffle=True)
    kw = dict(step_size=1e-5, num_chains=2, num_draws=30, num_burnin=0, progress=False)
    auto = slt.estimate_llc(_normed(), loader, summed, **kw)
    off = slt.estimate_llc(_normed(), loader, summed, microbatch=None, **kw)
    assert auto.microbatch is None
    np.testing.assert_array_equal(auto.trace, off.trace)
    with pytest.raises(ValueError, match="not a mean of per-sample terms"):
        slt.estimate_llc(_normed(), loader, summed, microbatch=2, **kw)


@pytest.mark.parametrize("value", ["big", 0, 2.5, True])
def test_a_microbatch_that_is_not_a_size_is_refused(value):
    with pytest.raises(ValueError, match=r'microbatch must be "auto", None or an integer >= 1'):
        _estimate(_mlp((3, 8, 1)), _data(240, 3), microbatch=value)


@pytest.mark.parametrize("cv", ["gradient", "loss"])
def test_large_micro_batches_are_tabled_by_a_pass_each(monkeypatch, cv):
    # from _GROUP_PASS_MIN samples a micro-batch's row comes from a plain pass over it, not
    # from a vmapped one: the same table up to rounding
    data = _data(240, 3)
    monkeypatch.setattr(tables_module, "_GROUP_PASS_MIN", 8)
    passes = _posterior(_normed(), data, microbatch=8, batch_size=48, cv=cv)
    monkeypatch.setattr(tables_module, "_GROUP_PASS_MIN", 9)
    vmapped = _posterior(_normed(), data, microbatch=8, batch_size=48, cv=cv)
    torch.testing.assert_close(passes.cache_loss, vmapped.cache_loss, rtol=1e-5, atol=1e-6)
    if cv == "gradient":
        torch.testing.assert_close(passes.cache_grad, vmapped.cache_grad, rtol=1e-4, atol=1e-6)
    assert passes.init_loss == pytest.approx(vmapped.init_loss, rel=1e-6)
