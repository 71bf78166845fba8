"""chain_method="vmap": all chains in one batched step, equal to the loop."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import slt
from slt import zoo

sys.path.insert(0, str(Path(__file__).parent))
from _models import SharedBlock  # noqa: E402


def _both(case, **kw):
    args = dict(num_chains=4, num_draws=150, num_burnin=50, step_size=5e-5, acceptance_every=0,
                progress=False) | kw  # fmt: skip
    loop = slt.estimate_llc(case.model, case.loader(), case.loss_fn, chain_method="loop", **args)
    vm = slt.estimate_llc(case.model, case.loader(), case.loss_fn, chain_method="vmap", **args)
    return loop, vm


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
@pytest.mark.parametrize("control_variate", ["gradient", "loss", "none"])
def test_vmap_equals_the_loop(sampler, control_variate, cache, request):
    # same batches and noise per chain; only floating-point reassociation differs. Without
    # the per-sample cache the vmapped step evaluates w and w* in one stacked pass.
    if not cache:
        request.getfixturevalue("no_cache")
    case = zoo.deep_linear((5, 4, 3), 2, n=512)
    loop, vm = _both(case, sampler=sampler, control_variate=control_variate)
    np.testing.assert_allclose(vm.trace, loop.trace, rtol=1e-4)
    np.testing.assert_allclose(vm.trace_at_center, loop.trace_at_center, rtol=1e-4)
    np.testing.assert_allclose(vm.llc_per_chain, loop.llc_per_chain, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("control_variate", ["gradient", "none"])
def test_vmap_acceptance_of_sgld_moves_equals_the_loop(control_variate):
    # the probe every 7 steps: same moves, same MALA acceptance per chain and step
    case = zoo.deep_linear((5, 4, 3), 2, n=512)
    loop, vm = _both(case, acceptance_every=7, step_size=2e-3, control_variate=control_variate)
    a, b = loop.acceptance, vm.acceptance
    assert np.isfinite(a).sum() == np.isfinite(b).sum() > 0
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
    assert np.nanmin(a) < 0.999  # a step size whose moves MALA would sometimes reject
    np.testing.assert_allclose(b[np.isfinite(b)], a[np.isfinite(a)], rtol=1e-3, atol=1e-4)
    assert vm.mala_acceptance == pytest.approx(loop.mala_acceptance, rel=1e-3)


def test_auto_takes_vmap_from_enough_chains():
    from slt.vmapped import VMAP_MIN_CHAINS

    case = zoo.regular(3, n=256)
    kw = dict(num_draws=30, num_burnin=0, progress=False, seed=2)
    auto = slt.estimate_llc(
        case.model, case.loader(), case.loss_fn, num_chains=VMAP_MIN_CHAINS, **kw
    )
    vm = slt.estimate_llc(case.model, case.loader(), case.loss_fn, num_chains=VMAP_MIN_CHAINS,
                          chain_method="vmap", **kw)  # fmt: skip
    np.testing.assert_array_equal(auto.trace, vm.trace)
    assert np.isfinite(auto.mala_acceptance)
    # the result says how the chains ran
    assert (auto.chain_method, auto.compiled) == ("vmap", False)
    assert "chains vmap   " in str(auto)


def test_vmap_is_reproducible_and_chain_order_independent():
    case = zoo.regular(3, n=256)
    kw = dict(chain_method="vmap", num_draws=40, acceptance_every=0, progress=False)
    a = slt.estimate_llc(case.model, case.loader(), case.loss_fn, num_chains=3, **kw)
    b = slt.estimate_llc(case.model, case.loader(), case.loss_fn, num_chains=2, **kw)
    np.testing.assert_array_equal(a.trace[:2], b.trace)


def test_vmap_refuses_what_it_cannot_do(tmp_path):
    case = zoo.regular(3, n=256)
    with pytest.raises(ValueError, match="chain_method"):
        slt.estimate_llc(case.model, case.loader(), case.loss_fn, chain_method="vmap",
                         sampler="sgnht", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="chain_method"):
        slt.estimate_llc(case.model, case.loader(), case.loss_fn, chain_method="vmap",
                         record="per_sample", record_path=str(tmp_path / "r.h5"),
                         progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="chain_method"):
        slt.estimate_llc(case.model, case.loader(), case.loss_fn, chain_method="gpu",
                         progress=False)  # fmt: skip


def test_auto_falls_back_to_the_loop_for_models_vmap_cannot_run():
    class Branchy(torch.nn.Module):  # data-dependent control flow: vmap cannot trace it
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1, bias=False)

        def forward(self, x):
            return self.lin(x) if bool(x.sum() > -1e9) else -self.lin(x)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 2, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    model = Branchy()
    with torch.no_grad():
        model.lin.weight.fill_(1.0)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    res = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), num_chains=4, num_draws=20,
                           acceptance_every=0, progress=False)  # fmt: skip
    assert np.isfinite(res.llc)
    assert res.chain_method == "loop" and "chains loop   " in str(res)


class _Dropout(torch.nn.Module):  # always-on dropout: draws from torch's global state
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.l2(torch.nn.functional.dropout(torch.tanh(self.l1(x)), 0.2, training=True))


class _RunningMean(torch.nn.Module):  # a buffer its forward updates, in eval mode too
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.register_buffer("mean", torch.zeros(3))

    def forward(self, x):
        with torch.no_grad():
            self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.lin(x - self.mean)


@pytest.mark.parametrize("cls", [_Dropout, _RunningMean])
def test_auto_that_runs_the_loop_runs_the_loops_numbers(cls):
    # auto's probes (the activation count, the batched pass's check) run the model too: they
    # must leave its random draws and buffers where they were
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, generator=g),
                                          torch.randn(64, 1, generator=g))  # fmt: skip
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    torch.manual_seed(0)
    model = cls()
    kw = dict(num_draws=10, num_burnin=0, step_size=1e-3, progress=False)
    runs = {
        (method, chains): slt.estimate_llc(model, loader, slt.gaussian_nll(1.0),
                                           chain_method=method, num_chains=chains, **kw)
        for method, chains in [("loop", 4), ("auto", 4), ("auto", 3)]
    }  # fmt: skip
    assert runs["auto", 4].chain_method == "loop"
    np.testing.assert_array_equal(runs["auto", 4].trace, runs["loop", 4].trace)
    np.testing.assert_array_equal(runs["auto", 3].trace, runs["loop", 4].trace[:3])


class _Recurrent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(3, 4, batch_first=True)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0].mean(1)).squeeze(-1)


def test_auto_runs_an_lstm_in_the_loop_without_torch_warnings():
    # torch has no batching rule for aten::lstm with batched weights (vmap raises, auto takes
    # the loop) and only a warning per-sample fallback with batched inputs (the per-sample
    # cache): neither may reach the user
    torch.manual_seed(0)
    model = _Recurrent().eval()
    x = torch.randn(128, 5, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randn(128)),
                                         batch_size=32, shuffle=True)  # fmt: skip
    kw = dict(num_chains=2, num_draws=10, num_burnin=0, step_size=1e-5, progress=False)
    with pytest.raises(RuntimeError, match="lstm"):
        slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), chain_method="vmap", **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # not "error": slt would catch it and work around
        res = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), **kw)
    assert [str(w.message) for w in caught] == []
    assert np.isfinite(res.llc_per_chain).all()


def test_auto_keeps_the_loop_for_large_models(monkeypatch):
    import slt.sampling

    monkeypatch.setattr(slt.sampling, "VMAP_MAX_PARAMS", 5)  # regular(10) has 10 parameters
    case = zoo.regular(10, n=256)
    kw = dict(num_chains=4, num_draws=20, num_burnin=0, progress=False, seed=1)
    auto = slt.estimate_llc(case.model, case.loader(), case.loss_fn, **kw)
    loop = slt.estimate_llc(case.model, case.loader(), case.loss_fn, chain_method="loop", **kw)
    np.testing.assert_array_equal(auto.trace, loop.trace)
    assert auto.chain_method == loop.chain_method == "loop"


@pytest.mark.parametrize("control_variate", ["gradient", "none"])
def test_auto_keeps_the_loop_where_the_batched_activations_are_large(monkeypatch,
                                                                      control_variate):  # fmt: skip
    # regular(10) on batches of 64: one output per sample, so 64 numbers per chain; 4 chains
    # are 256 rows' worth, 512 with the gradient control variate's w* rows
    import slt.sampling
    from slt import vmapped

    case = zoo.regular(10, n=256)
    kw = dict(num_chains=4, num_draws=20, num_burnin=0, progress=False, seed=1,
              control_variate=control_variate)  # fmt: skip
    loader = torch.utils.data.DataLoader(case.dataset, batch_size=64, shuffle=True)
    posterior = slt.sampling.build_posterior(case.model, loader, case.loss_fn, n=None, nbeta=None,
                                             localization=1.0, control_variate=control_variate,
                                             sampler="sgld")  # fmt: skip
    first = next(iter(posterior.batches.epoch(torch.Generator().manual_seed(1))))
    assert vmapped.activations(posterior, first) == 64
    assert not vmapped.has_hooks(posterior.reference)  # the counting hooks are gone
    rows = 4 * (2 if control_variate == "gradient" else 1)
    loop = slt.estimate_llc(case.model, loader, case.loss_fn, chain_method="loop", **kw)
    vm = slt.estimate_llc(case.model, loader, case.loss_fn, chain_method="vmap", **kw)
    assert not np.array_equal(vm.trace, loop.trace)  # rounding tells the two apart
    for cap, expected in [(64 * rows - 1, loop), (64 * rows, vm)]:
        monkeypatch.setattr(slt.sampling, "VMAP_MAX_ACTIVATIONS", cap)
        auto = slt.estimate_llc(case.model, loader, case.loss_fn, **kw)
        np.testing.assert_array_equal(auto.trace, expected.trace)


def test_vmap_equals_the_loop_with_an_unshuffled_loader():
    # sample indices come as slices then; the cached control variate must still apply
    case = zoo.regular(3, n=256)
    loader = torch.utils.data.DataLoader(case.dataset, batch_size=64, shuffle=False)
    kw = dict(num_chains=4, num_draws=30, num_burnin=0, step_size=1e-4, progress=False)
    loop = slt.estimate_llc(case.model, loader, case.loss_fn, chain_method="loop", **kw)
    vm = slt.estimate_llc(case.model, loader, case.loss_fn, chain_method="vmap", **kw)
    np.testing.assert_allclose(vm.trace, loop.trace, rtol=1e-5)
    np.testing.assert_allclose(vm.trace_at_center, loop.trace_at_center, rtol=1e-5)


class _Tied(torch.nn.Module):
    """x -> W(W x): one weight under two names."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(3, 3, bias=False)
        self.second = torch.nn.Linear(3, 3, bias=False)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(self.first(x))


def test_vmap_equals_the_loop_with_tied_weights():
    # the shared weight is sampled once and must be substituted under both names
    from slt.passes import _has_tied_parameters

    torch.manual_seed(0)
    model = _Tied().eval()
    assert _has_tied_parameters(model) and not _has_tied_parameters(torch.nn.Linear(2, 2))
    x = torch.randn(256, 3)
    with torch.no_grad():
        y = model(x) + 0.5 * torch.randn(256, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64,
                                         shuffle=True)  # fmt: skip
    kw = dict(num_chains=4, num_draws=30, num_burnin=0, step_size=1e-4, progress=False)
    loss_fn = slt.gaussian_nll(0.5)
    loop = slt.estimate_llc(model, loader, loss_fn, chain_method="loop", **kw)
    vm = slt.estimate_llc(model, loader, loss_fn, chain_method="vmap", **kw)
    np.testing.assert_allclose(vm.trace, loop.trace, rtol=1e-5)
    np.testing.assert_allclose(vm.trace_at_center, loop.trace_at_center, rtol=1e-5)


def test_a_submodule_registered_twice_is_swapped_and_put_back():
    # torch.func.functional_call leaves a swapped-in tensor in such a module (torch 2.13):
    # after a vmapped pass a batched one, which the next call (the loop's fallback, the
    # per-sample table) tripped over; vmap and "auto" raised, the table was not built and
    # the loop's gradient control variate lost the block's part of ∇L_B(w*)
    from slt.passes import has_shared_modules, swapped_call
    from slt.posterior import Posterior

    torch.manual_seed(0)
    model = SharedBlock().eval()
    assert has_shared_modules(model) and not has_shared_modules(torch.nn.Linear(2, 2))
    before = {n: p for n, p in model.named_parameters()}
    zero = {n: torch.zeros_like(p) for n, p in before.items()}
    out = swapped_call(model, zero, (torch.randn(5, 3),), shared=True)
    assert torch.equal(out, torch.zeros(5, 1))
    assert all(p is before[n] for n, p in model.named_parameters())
    x = torch.randn(256, 3)
    with torch.no_grad():
        y = model(x) + 0.5 * torch.randn(256, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64,
                                         shuffle=True)  # fmt: skip
    loss_fn = slt.gaussian_nll(0.5)
    posterior = Posterior(model, loader, loss_fn)
    for i in (0, 100):  # the per-sample table at w*
        grads = torch.autograd.grad(loss_fn(model, (x[i : i + 1], y[i : i + 1])),
                                    list(model.parameters()))  # fmt: skip
        expected = torch.cat([g.reshape(-1) for g in grads])
        torch.testing.assert_close(posterior.cache_grad[i], expected, rtol=1e-5, atol=1e-6)
    kw = dict(num_chains=4, num_draws=30, num_burnin=0, step_size=1e-4, progress=False)
    loop = slt.estimate_llc(model, loader, loss_fn, chain_method="loop", **kw)
    for method in ("vmap", "auto"):
        res = slt.estimate_llc(model, loader, loss_fn, chain_method=method, **kw)
        assert res.chain_method == "vmap"
        np.testing.assert_allclose(res.trace, loop.trace, rtol=1e-5)
        np.testing.assert_allclose(res.trace_at_center, loop.trace_at_center, rtol=1e-5)
    assert all(p is before[n] for n, p in model.named_parameters())


def test_auto_takes_vmap_from_two_chains_where_the_pass_will_be_traced(monkeypatch):
    from slt import traced

    case = zoo.regular(3, n=256)
    kw = dict(num_chains=2, num_draws=30, num_burnin=0, progress=False, seed=2)
    monkeypatch.setattr(traced, "_CACHE", type(traced._CACHE)())
    before = traced.traces
    loop = slt.estimate_llc(case.model, case.loader(), case.loss_fn, chain_method="loop", **kw)
    short = slt.estimate_llc(case.model, case.loader(), case.loss_fn, **kw)
    assert traced.traces == before  # 30 < MIN_STEPS: the loop
    monkeypatch.setattr(traced, "MIN_STEPS", 30)
    auto = slt.estimate_llc(case.model, case.loader(), case.loss_fn, **kw)
    assert traced.traces == before + 1  # the vmapped step, traced
    np.testing.assert_array_equal(short.trace, loop.trace)
    np.testing.assert_allclose(auto.trace, loop.trace, rtol=1e-5)


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(3, 8)
        self.layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1)).squeeze(-1)


@pytest.mark.parametrize("traced", [False, True])
def test_vmap_runs_eval_mode_attention_and_equals_the_loop(traced, monkeypatch):
    # under torch.func an eval-mode TransformerEncoderLayer / MultiheadAttention would take
    # the fused inference kernel (no derivative, no batching rule): vmap raised before
    from slt import traced as tracing

    monkeypatch.setattr(tracing, "MIN_STEPS", 1 if traced else 10**9)
    monkeypatch.setattr(tracing, "_CACHE", type(tracing._CACHE)())
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(128, 5, 3)
    with torch.no_grad():
        y = model(x) + 0.5 * torch.randn(128)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,
                                         shuffle=True)  # fmt: skip
    kw = dict(num_chains=2, num_draws=20, num_burnin=0, step_size=1e-4, progress=False)
    loss_fn = slt.gaussian_nll(0.5)
    traces = tracing.traces
    loop = slt.estimate_llc(model, loader, loss_fn, chain_method="loop", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no torch warning reaches the user
        vm = slt.estimate_llc(model, loader, loss_fn, chain_method="vmap", **kw)
    assert tracing.traces == traces + traced
    np.testing.assert_allclose(vm.trace, loop.trace, rtol=1e-5)
    np.testing.assert_allclose(vm.trace_at_center, loop.trace_at_center, rtol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()  # the switch is restored
    assert not model.training


_REFUSAL_KW = dict(num_chains=4, num_draws=20, step_size=1e-4, progress=False)


def _sum_of_three_loader():
    """y = x₁ + x₂ + x₃ on 256 samples: the data of the models vmap must refuse."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)


def test_a_parameter_read_through_a_list_is_caught_not_held_at_w_star():
    # functional_call swaps registered parameters only: read through a list, the weight
    # would stay at w* in every vmapped chain (λ̂ 0.62 against the loop's 1.10)
    class ListRef(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 1)
            self.refs = [self.a.weight]

        def forward(self, x):
            return x @ self.refs[0].T + self.a.bias

    loader, kw = _sum_of_three_loader(), _REFUSAL_KW
    model = ListRef()
    with pytest.raises(ValueError, match="reads a sampled parameter other than through"):
        slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), chain_method="vmap", **kw)
    auto = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), **kw)
    loop = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), chain_method="loop", **kw)
    assert auto.chain_method == "loop" and np.array_equal(auto.trace, loop.trace)


def test_an_embedding_with_a_padding_idx_runs_in_the_loop():
    # torch.func applies padding_idx to the first chain only: the others' padding rows took
    # a gradient and λ̂ differed from the loop's (-0.36 against -0.009); the gradient check
    # at w* ran one chain, so it never saw it
    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e = torch.nn.Embedding(6, 4, padding_idx=0)
            self.head = torch.nn.Linear(12, 3)
            with torch.no_grad():
                self.e.weight[0] = torch.randn(4, generator=torch.Generator().manual_seed(1))

        def forward(self, x):
            return self.head(self.e(x).flatten(1))

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (128, 3), generator=g)
    x[:, 0] = 0  # a padding token in every sample
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 3, (128,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    torch.manual_seed(0)
    model, loss_fn = Tokens(), slt.supervised(torch.nn.functional.cross_entropy)
    kw = dict(num_chains=4, num_draws=20, num_burnin=5, step_size=1e-3, progress=False)
    with pytest.raises(ValueError, match="nn.Embedding e has a padding_idx"):
        slt.estimate_llc(model, loader, loss_fn, chain_method="vmap", **kw)
    auto = slt.estimate_llc(model, loader, loss_fn, **kw)
    loop = slt.estimate_llc(model, loader, loss_fn, chain_method="loop", **kw)
    assert auto.chain_method == "loop" and np.array_equal(auto.trace, loop.trace)
    # held at w* (params= elsewhere), the padded embedding is no obstacle
    held = slt.estimate_llc(model, loader, loss_fn, chain_method="vmap", params="head.*", **kw)
    assert held.chain_method == "vmap"


def test_a_forward_that_updates_state_its_output_reads_is_refused_by_name():
    # the batched step updates such a buffer once for all chains, the loop once per chain:
    # they cannot agree, and the error says so rather than blaming a list or a closure
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 1)
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x):
            self.count.add_(1)
            return self.a(x) * (1 + 0.1 * self.count)

    loader, kw = _sum_of_three_loader(), _REFUSAL_KW
    with pytest.raises(ValueError, match="a buffer changed in place"):
        slt.estimate_llc(Counting(), loader, slt.gaussian_nll(1.0), chain_method="vmap", **kw)
    assert slt.estimate_llc(Counting(), loader, slt.gaussian_nll(1.0), **kw).chain_method == "loop"


def test_a_model_vmap_cannot_run_gets_an_error_that_says_what_to_do():
    # a running statistic updated from the batch in forward: torch.func's own error is a
    # shape mismatch that names neither the cause nor the way out
    class Running(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 1)
            self.register_buffer("mean", torch.zeros(3))

        def forward(self, x):
            self.mean.mul_(0.9).add_(0.1 * x.mean(0))
            return self.a(x - self.mean)

    loader, kw = _sum_of_three_loader(), _REFUSAL_KW
    with pytest.raises(RuntimeError, match="vmap cannot run the model's pass.*chain_method='loop'"):
        slt.estimate_llc(Running(), loader, slt.gaussian_nll(1.0), chain_method="vmap", **kw)
    assert slt.estimate_llc(Running(), loader, slt.gaussian_nll(1.0), **kw).chain_method == "loop"


def test_the_batched_gradient_check_passes_at_a_minimum_on_the_full_batch():
    # there the gradient is itself rounding: the check must not mistake rounding for a
    # parameter vmap cannot swap (it would refuse chain_method="vmap")
    case = zoo.regular(10, n=512)
    loader = torch.utils.data.DataLoader(case.dataset, batch_size=512)
    res = slt.estimate_llc(case.model, loader, case.loss_fn, chain_method="vmap", num_chains=2,
                           num_draws=10, step_size=1e-4, progress=False)  # fmt: skip
    assert res.chain_method == "vmap" and np.isfinite(res.llc)


def test_a_loss_of_shape_one_runs_batched_as_a_scalar():
    case = zoo.regular(3, n=256)

    def loss_fn(model, batch):
        return case.loss_fn(model, batch).reshape(1)

    kw = dict(num_chains=2, num_draws=20, step_size=1e-3, seed=1, progress=False)
    loop = slt.estimate_llc(case.model, case.loader(), loss_fn, chain_method="loop", **kw)
    vm = slt.estimate_llc(case.model, case.loader(), loss_fn, chain_method="vmap", **kw)
    np.testing.assert_allclose(vm.trace, loop.trace, rtol=1e-5)


class _Scaled(torch.nn.Module):  # a 0-d parameter (a learnable scale)
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.lin(x) * self.scale


@pytest.mark.parametrize("microbatch", [None, 4])
def test_a_zero_dimensional_parameter_reads_the_tables_at_w_star(microbatch):
    case = zoo.regular(3, n=256)
    model = _Scaled()
    with torch.no_grad():
        model.lin.weight.copy_(case.model[0].weight)
    kw = dict(num_chains=2, num_draws=20, step_size=1e-3, microbatch=microbatch, progress=False)
    loop = slt.estimate_llc(model, case.loader(), case.loss_fn, chain_method="loop", **kw)
    vm = slt.estimate_llc(model, case.loader(), case.loss_fn, chain_method="vmap", **kw)
    np.testing.assert_allclose(vm.trace, loop.trace, rtol=1e-5)
