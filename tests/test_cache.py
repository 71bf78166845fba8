"""The per-sample cache at w* gives the same control variates as the passes it replaces."""

import numpy as np
import pytest
import torch

import slt
import slt.posterior as posterior_module
from slt import zoo
from slt.sampling import build_posterior


def _posterior(case, loss_fn=None, control_variate="gradient"):
    return build_posterior(case.model, case.loader(64), loss_fn or case.loss_fn, n=None,
                           nbeta=None, localization=1.0, control_variate=control_variate,
                           sampler="sgld")  # fmt: skip


@pytest.mark.parametrize("control_variate", ["gradient", "loss"])
def test_cached_terms_equal_the_passes_at_center(control_variate):
    case = zoo.deep_linear((5, 4, 3), 2, n=300)
    p = _posterior(case, control_variate=control_variate)
    assert p.cache_loss is not None
    batch, index = next(p.stream(torch.Generator().manual_seed(1)))
    assert index is not None
    cached_loss, cached_grad_fn = p.at_center(batch, index)
    direct_loss, direct_grad_fn = p.at_center(batch, None)
    torch.testing.assert_close(cached_loss.float(), direct_loss.float(), rtol=1e-5, atol=1e-6)
    params = p.reset()
    cached, _ = cached_grad_fn(params, batch)
    direct, _ = direct_grad_fn(params, batch)
    for a, b in zip(cached, direct):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_estimates_agree_with_and_without_the_cache(request):
    case = zoo.regular(4, n=512)
    kw = dict(step_size=1e-4, num_chains=2, num_draws=200, num_burnin=50, progress=False)
    cached = slt.estimate_llc(case.model, case.loader(), case.loss_fn, **kw)
    request.getfixturevalue("no_cache")
    direct = slt.estimate_llc(case.model, case.loader(), case.loss_fn, **kw)
    np.testing.assert_allclose(cached.trace, direct.trace, rtol=1e-4)
    np.testing.assert_allclose(cached.llc_trace, direct.llc_trace, rtol=1e-3, atol=1e-3)


def test_no_cache_for_a_loss_that_is_not_a_per_sample_mean():
    case = zoo.regular(3, n=256)

    def with_batch_term(model, batch):  # depends on the batch size: not a per-sample mean
        return case.loss_fn(model, batch) + 1.0 / batch[0].shape[0]

    assert _posterior(case, with_batch_term).cache_loss is None
    assert _posterior(case).cache_grad is not None


def _masked(n_full):
    """A regression whose loss averages over masked-in targets, not samples, on data sorted
    so that the first ``n_full`` rows are all masked in (as text bucketed by length)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, generator=gen)
    y = x.sum(1, keepdim=True) + 0.5 * torch.randn(512, 1, generator=gen)
    mask = torch.ones(512, 1)
    mask[n_full:] = (torch.rand(512 - n_full, 1, generator=gen) < 0.5).float()
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)

    def loss_fn(model, batch):  # a mean over masked-in targets: not a per-sample mean
        x, y, m = batch
        return ((model(x) - y) ** 2 * m).sum() / m.sum()

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, mask),
                                         batch_size=64, shuffle=True)  # fmt: skip
    return model, loader, loss_fn


@pytest.mark.parametrize("chain_method", ["loop", "vmap"])
def test_no_cache_for_a_non_per_sample_mean_hidden_after_the_first_rows(chain_method):
    # the check compared the table with the loss on the first 64 rows only: all masked in,
    # so it passed, and L_B(w*) came from the table while L_B(w) came from loss_fn. With
    # chains that cannot move λ̂ must be 0; it read nβ × (the mismatch) in the loop
    model, loader, loss_fn = _masked(64)
    res = slt.estimate_llc(model, loader, loss_fn, step_size=1e-12, num_chains=2,
                           num_draws=20, num_burnin=0, control_variate="loss",
                           chain_method=chain_method, progress=False)  # fmt: skip
    assert abs(res.llc) < 1e-3
    p = build_posterior(model, loader, loss_fn, n=None, nbeta=None, localization=1.0,
                        control_variate="gradient", sampler="sgld")  # fmt: skip
    assert p.cache_loss is None


def test_no_cache_off_the_fast_path():
    case = zoo.regular(3, n=256)
    x, y = case.dataset.tensors
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    p = build_posterior(case.model, batches, case.loss_fn, n=None, nbeta=None,
                        localization=1.0, control_variate="gradient", sampler="sgld")  # fmt: skip
    assert p.cache_loss is None
    assert next(p.stream(torch.Generator()))[1] is None


def test_batch_mean_is_the_mean_of_the_indexed_rows():
    from slt.tables import batch_mean

    g = torch.Generator().manual_seed(0)
    table, values = torch.randn(50, 7, generator=g), torch.randn(50, generator=g)
    index = torch.randint(0, 50, (3, 8), generator=g)
    torch.testing.assert_close(batch_mean(table, index), table[index].mean(1))
    torch.testing.assert_close(batch_mean(table, index[0]), table[index[0]].mean(0))
    torch.testing.assert_close(batch_mean(values, index), values[index].mean(1))
    torch.testing.assert_close(batch_mean(values, index[0]), values[index[0]].mean())
    torch.testing.assert_close(batch_mean(table, slice(3, 9)), table[3:9].mean(0))


@pytest.mark.parametrize("num_chains, built", [(4, False), (2, True)])
def test_the_cache_is_built_only_when_the_loop_reads_it(num_chains, built, monkeypatch):
    # the vmapped default (4 chains) stacks w* into its pass and never builds the
    # per-sample table; the loop (2 chains) builds it on first use
    calls = []
    build = posterior_module.Posterior._build_cache

    def spy(self):
        calls.append(self)
        build(self)

    monkeypatch.setattr(posterior_module.Posterior, "_build_cache", spy)
    case = zoo.regular(4, n=256)
    slt.estimate_llc(case.model, case.loader(), case.loss_fn, num_chains=num_chains,
                     num_draws=20, num_burnin=0, step_size=1e-4, progress=False)  # fmt: skip
    assert bool(calls) == built
