"""The gradient control variate's ∇L_B(w*) from per-sample factors of nn.Linear layers
(slt.factors) equals autograd's, and the factors are refused wherever they would not."""

import numpy as np
import pytest
import torch

import slt
import slt.factors as factors_module
import slt.tables as tables_module
from slt.factors import record_factors
from slt.sampling import build_posterior


def _mlp(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _data(n, width_in, width_out=1, seed=1, shape=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, width_in, generator=g)
    return torch.utils.data.TensorDataset(x, torch.randn(n, width_out, generator=g))


def _posterior(model, dataset, params=None, batch_size=32, shuffle=True):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)
    return build_posterior(model, loader, slt.gaussian_nll(1.0), n=None, nbeta=None,
                           localization=1.0, control_variate="gradient", sampler="sgld",
                           params=params)  # fmt: skip


def _autograd(posterior, index):
    batch = [t[index] for t in posterior.batches.tensors]
    loss = posterior.loss(posterior.reference, batch)
    return posterior._grads(loss, list(posterior.center.values()))


def _assert_matches_autograd(posterior, index):
    factors = record_factors(posterior, posterior.batches.tensors)
    assert factors is not None
    got = factors.gradient_sums(index)
    for g, want in zip(got, _autograd(posterior, index)):
        torch.testing.assert_close(g / index.shape[-1], want, rtol=1e-4, atol=1e-6)
    return factors


@pytest.mark.parametrize("shuffle", [True, False])  # False: the batches are slices
def test_the_loop_uses_the_factors_and_they_equal_the_pass_at_center(shuffle):
    # d = 5,801 > 4,096: no per-sample gradient table, so the factors stand in
    p = _posterior(_mlp((10, 80, 60, 1)), _data(300, 10), shuffle=shuffle)
    assert not p.gradient_table_fits
    assert p.factors is not None and p.cache_grad is None
    batches = p.stream(torch.Generator().manual_seed(3))
    batch, index = next(batches)
    batch, index = next(batches)  # rows 32-63 unshuffled
    assert isinstance(index, torch.Tensor) == shuffle
    loss, grad_fn = p.at_center(batch, index)
    direct_loss, direct_grad_fn = p.at_center(batch, None)
    torch.testing.assert_close(loss.float(), direct_loss.float(), rtol=1e-5, atol=1e-6)
    params = p.reset()
    for a, b in zip(grad_fn(params, batch)[0], direct_grad_fn(params, batch)[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_per_chain_indices_give_each_chains_batch():
    p = _posterior(_mlp((6, 20, 3)), _data(200, 6, 3))
    factors = _assert_matches_autograd(p, torch.arange(40, 80))
    index = torch.randint(0, 200, (3, 16), generator=torch.Generator().manual_seed(0))
    for chain, sums in enumerate(zip(*[g.unbind(0) for g in factors.gradient_sums(index)])):
        for got, want in zip(sums, factors.gradient_sums(index[chain])):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params", ["0.weight", "0.bias", ["2.*", "0.bias"]])
def test_a_selection_of_weights_and_biases(params):
    p = _posterior(_mlp((6, 20, 3)), _data(200, 6, 3), params=params)
    _assert_matches_autograd(p, torch.arange(0, 200, 3))


def test_an_in_place_activation_after_a_layer():
    torch.manual_seed(0)
    relu = torch.nn.ReLU(inplace=True)
    model = torch.nn.Sequential(torch.nn.Linear(6, 20), relu, torch.nn.Linear(20, 3))
    _assert_matches_autograd(_posterior(model, _data(200, 6, 3)), torch.arange(5, 200, 4))


def test_positions_within_a_sample_are_summed():
    class PerPosition(torch.nn.Module):  # a layer applied at every position, then a mean
        def __init__(self):
            super().__init__()
            self.inner, self.outer = torch.nn.Linear(5, 7), torch.nn.Linear(7, 2)

        def forward(self, x):  # (b, positions, 5) -> (b, 2)
            return self.outer(torch.tanh(self.inner(x))).mean(1)

    torch.manual_seed(0)
    p = _posterior(PerPosition(), _data(150, 5, 2, shape=(4,)))
    factors = _assert_matches_autograd(p, torch.arange(7, 150, 2))
    assert [layer.positions for layer in factors.layers] == [4, 4]


def test_the_feed_forward_layers_of_a_transformer_block():
    # the weight-refined LLC of one block's feed-forward part: its layers see every position
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0,
                                                          batch_first=True)  # fmt: skip
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x):  # (b, positions, 8) -> (b, 2)
            return self.head(self.layer(x).mean(1))

    torch.manual_seed(0)
    p = _posterior(Block().eval(), _data(150, 8, 2, shape=(5,)), params="layer.linear*")
    factors = _assert_matches_autograd(p, torch.arange(3, 150, 2))
    assert [layer.positions for layer in factors.layers] == [5, 5]


class _Scaled(torch.nn.Module):  # a parameter outside any nn.Linear
    def __init__(self):
        super().__init__()
        self.linear, self.scale = torch.nn.Linear(4, 1), torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * self.linear(x)


class _Twice(torch.nn.Module):  # one layer called twice per pass: shared weights
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(torch.relu(self.linear(x)))[:, :1]


class _Interacting(torch.nn.Module):  # samples interact through a batch statistic
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(h - h.mean(0)))


class _Subclass(torch.nn.Linear):  # may compute something else than x Wᵀ + b
    def forward(self, x):
        return super().forward(x) ** 2


@pytest.mark.parametrize("n", [300, 60])  # 60: the recording pass is one chunk of all samples
@pytest.mark.parametrize("model", [_Scaled, _Twice, _Interacting, lambda: _Subclass(4, 1)])
def test_no_factors_where_they_would_not_be_the_gradient(model, n):
    torch.manual_seed(0)
    p = _posterior(model(), _data(n, 4))
    assert record_factors(p, p.batches.tensors) is None
    assert not any(m._forward_hooks for m in p.reference.modules())  # the hooks removed


def test_no_factors_over_the_budget(monkeypatch):
    p = _posterior(_mlp((6, 20, 3)), _data(200, 6, 3))
    width = (6 + 1 + 20) + (20 + 1 + 3)  # per sample: each layer's [x, 1] and δ
    monkeypatch.setattr(factors_module, "BUDGET", 200 * width - 1)
    assert record_factors(p, p.batches.tensors) is None
    monkeypatch.setattr(factors_module, "BUDGET", 200 * width)
    assert record_factors(p, p.batches.tensors).table.shape == (200, width)


def test_estimates_agree_with_and_without_the_factors(monkeypatch):
    model, dataset = _mlp((10, 80, 60, 1)), _data(256, 10)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)
    kw = dict(step_size=1e-4, num_chains=2, num_draws=100, num_burnin=20, progress=False,
              chain_method="loop")  # fmt: skip
    with_factors = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), **kw)
    monkeypatch.setattr(tables_module, "record_factors", lambda *args: None)
    direct = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), **kw)
    np.testing.assert_allclose(with_factors.trace, direct.trace, rtol=1e-4)
    np.testing.assert_allclose(with_factors.llc_trace, direct.llc_trace, rtol=1e-3, atol=1e-3)


def test_a_loss_the_recording_pass_cannot_run_keeps_the_pass_at_center():
    model, dataset = _mlp((10, 80, 60, 1)), _data(256, 10)

    def only_batches_of_32(model, batch):  # the recording pass uses chunks of 256
        if batch[0].shape[0] not in (32, 64):  # 64: the per-sample check's probe
            raise RuntimeError("this loss takes batches of 32")
        return slt.gaussian_nll(1.0)(model, batch)

    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)
    p = build_posterior(model, loader, only_batches_of_32, n=None, nbeta=None,
                        localization=1.0, control_variate="gradient", sampler="sgld")  # fmt: skip
    assert p.factors is None and p.cache_loss is None
    batch, index = next(p.stream(torch.Generator().manual_seed(0)))
    loss, grad_fn = p.at_center(batch, index)  # the pass at w*
    assert torch.isfinite(loss) and grad_fn.keywords["correction"] is not None


def test_the_batched_step_reads_the_factors_from_its_threshold(monkeypatch):
    import slt.vmapped

    model, dataset = _mlp((10, 80, 60, 1)), _data(256, 10)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)
    kw = dict(step_size=1e-4, num_chains=3, num_draws=100, num_burnin=20, progress=False,
              chain_method="vmap")  # fmt: skip
    calls = []
    sums = factors_module.LinearFactors.gradient_sums

    def spy(self, index):
        calls.append(tuple(index.shape))
        return sums(self, index)

    monkeypatch.setattr(factors_module.LinearFactors, "gradient_sums", spy)
    rows = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), **kw)  # d = 5,801: rows
    assert not calls
    monkeypatch.setattr(slt.vmapped, "VMAP_FACTORS_MIN_PARAMS", 5_000)
    with_factors = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), **kw)
    assert calls.count((3, 32)) == 120  # every step, one batch per chain (and the check)
    np.testing.assert_allclose(with_factors.trace, rows.trace, rtol=1e-4)
    np.testing.assert_allclose(with_factors.trace_at_center, rows.trace_at_center, rtol=1e-5)
    np.testing.assert_allclose(with_factors.llc_trace, rows.llc_trace, rtol=1e-3, atol=1e-3)
    # the acceptance probe runs on either layout of the step's pass (C rows, or the chains
    # in both halves of 2C): the same MALA acceptance per chain and probed step
    assert np.isfinite(rows.acceptance).sum() == 3 * 5  # steps 20, 40, ... of 100 draws
    np.testing.assert_allclose(with_factors.acceptance, rows.acceptance, rtol=1e-3,
                               equal_nan=True)  # fmt: skip


def test_the_activation_cap_counts_no_rows_for_w_star_where_the_factors_stand_in(monkeypatch):
    import slt.sampling
    import slt.vmapped

    model, dataset = _mlp((10, 80, 60, 1)), _data(256, 10)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)
    kw = dict(step_size=1e-4, num_chains=4, num_draws=20, num_burnin=0, progress=False)
    monkeypatch.setattr(slt.vmapped, "VMAP_FACTORS_MIN_PARAMS", 5_000)
    p = _posterior(model, dataset)
    first = next(iter(p.batches.epoch(torch.Generator().manual_seed(0))))
    per_chain = slt.vmapped.activations(p, first)
    vm = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), chain_method="vmap", **kw)
    loop = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), chain_method="loop", **kw)
    assert not np.array_equal(vm.trace, loop.trace)  # rounding tells the two apart
    for cap, expected in [(4 * per_chain - 1, loop), (4 * per_chain, vm)]:
        monkeypatch.setattr(slt.sampling, "VMAP_MAX_ACTIVATIONS", cap)
        auto = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), **kw)
        np.testing.assert_array_equal(auto.trace, expected.trace)
    monkeypatch.setattr(tables_module, "record_factors", lambda *args: None)
    rows = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), chain_method="loop", **kw)
    auto = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), **kw)  # 2 × 4 rows: the loop
    np.testing.assert_array_equal(auto.trace, rows.trace)
