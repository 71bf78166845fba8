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
