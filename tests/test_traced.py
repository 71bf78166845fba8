"""Gradient passes replayed from a traced graph (slt.traced), the vmapped step's and the
loop's: same numbers as the eager pass, reused across estimates of one architecture, never
where it would be wrong."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import slt
from slt import traced, zoo

KW = dict(num_chains=4, num_draws=40, num_burnin=10, step_size=1e-4, chain_method="vmap",
          progress=False, seed=3)  # fmt: skip


@pytest.fixture
def tracing(monkeypatch):
    """Every vmapped run traces (however short), from an empty graph cache."""
    monkeypatch.setattr(traced, "MIN_STEPS", 0)
    monkeypatch.setattr(traced, "enabled", True)
    monkeypatch.setattr(traced, "_CACHE", type(traced._CACHE)())


def _estimate(model, loader, loss_fn, enabled, **kw):
    traced.enabled = enabled
    try:
        return slt.estimate_llc(model, loader, loss_fn, **(KW | kw))
    finally:
        traced.enabled = True


def _traced_and_eager(model, loader, loss_fn, **kw):
    before = traced.traces
    fast = _estimate(model, loader, loss_fn, True, **kw)
    new = traced.traces - before
    slow = _estimate(model, loader, loss_fn, False, **kw)
    return fast, slow, new


def _same(a, b):
    np.testing.assert_array_equal(a.trace, b.trace)
    np.testing.assert_array_equal(a.trace_at_center, b.trace_at_center)
    np.testing.assert_array_equal(a.acceptance, b.acceptance)


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
@pytest.mark.parametrize("control_variate", ["gradient", "loss", "none"])
def test_traced_pass_gives_the_eager_numbers(tracing, no_cache, sampler, control_variate):
    case = zoo.deep_linear((5, 4, 3), 2, n=512)
    fast, slow, new = _traced_and_eager(case.model, case.loader(), case.loss_fn,
                                        sampler=sampler, control_variate=control_variate,
                                        acceptance_every=7 if sampler == "sgld" else 0)  # fmt: skip
    assert new == 1
    _same(fast, slow)


class _Scaled(torch.nn.Module):
    """A frozen layer, a buffer and a trainable layer: everything the model reads besides
    the sampled parameters must reach the graph as an argument."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(3, 4)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(4, 1)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        return self.head(torch.tanh(self.frozen(x))) * self.scale


def _data(model, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    with torch.no_grad():
        y = model(x) + 0.3 * torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,
                                       shuffle=True)  # fmt: skip


def test_frozen_parameters_and_buffers_are_arguments_not_constants(tracing):
    torch.manual_seed(0)
    model = _Scaled().eval()
    loader = _data(model)
    first, slow, new = _traced_and_eager(model, loader, slt.gaussian_nll(0.3))
    assert new == 1
    _same(first, slow)
    # another checkpoint of the architecture: new frozen weights and buffer, same graph
    with torch.no_grad():
        model.frozen.weight.mul_(-2.0)
        model.scale.fill_(2.0)
    second, slow, new = _traced_and_eager(model, loader, slt.gaussian_nll(0.3))
    assert new == 0
    _same(second, slow)
    assert not np.allclose(first.trace, second.trace)


def test_graphs_are_reused_across_estimates_and_traced_again_for_new_python_state(tracing):
    case = zoo.regular(4, n=256)
    _, _, new = _traced_and_eager(case.model, case.loader(), case.loss_fn)
    assert new == 1
    _, _, new = _traced_and_eager(case.model, case.loader(), case.loss_fn, step_size=3e-5)
    assert new == 0  # another step size and seed: the same graph
    # σ is a Python float the graph holds: another σ is another graph, with its own numbers
    fast, slow, new = _traced_and_eager(case.model, case.loader(), slt.gaussian_nll(2.0))
    assert new == 1
    _same(fast, slow)


SCALE = 1.0


def _global_scaled_loss(model, batch):  # reads a module global the fingerprint cannot see
    x, y = batch
    return SCALE * ((model(x) - y) ** 2).mean()


def test_a_graph_that_no_longer_matches_the_eager_pass_is_not_used(tracing):
    global SCALE
    case = zoo.regular(3, n=256)
    _, _, new = _traced_and_eager(case.model, case.loader(), _global_scaled_loss)
    assert new == 1
    SCALE = 3.0
    try:  # the cached graph has 1.0 baked in; its first use is checked against eager
        fast, slow, new = _traced_and_eager(case.model, case.loader(), _global_scaled_loss)
    finally:
        SCALE = 1.0
    assert new == 1  # the shared graph failed its check and was traced again
    _same(fast, slow)


class _Unregistered(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.offset = torch.ones(1)  # a plain attribute, not a buffer

    def forward(self, x):
        return self.lin(x) + self.offset


def test_what_cannot_be_traced_runs_eagerly(tracing):
    torch.manual_seed(0)
    model = _Unregistered().eval()
    loader = _data(model)
    fast, slow, new = _traced_and_eager(model, loader, slt.gaussian_nll(0.3))
    assert new == 0  # fake tensors refuse the unregistered tensor: no graph
    _same(fast, slow)


def test_models_with_hooks_are_not_traced(tracing):
    case = zoo.regular(3, n=256)
    model = case.model
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        fast, slow, new = _traced_and_eager(model, case.loader(), case.loss_fn)
    finally:
        handle.remove()
    assert new == 0
    _same(fast, slow)
    assert len(calls) >= 2 * 50  # the hook ran at every step of both runs


def test_short_runs_stay_eager(monkeypatch):
    monkeypatch.setattr(traced, "_CACHE", type(traced._CACHE)())
    case = zoo.regular(3, n=256)
    before = traced.traces
    slt.estimate_llc(case.model, case.loader(), case.loss_fn,
                     **(KW | dict(num_burnin=0, num_draws=traced.MIN_STEPS - 1)))  # fmt: skip
    assert traced.traces == before


def test_fingerprints():
    fp = traced.fingerprint
    assert fp(torch.nn.Linear(3, 2)) == fp(torch.nn.Linear(3, 2))
    assert fp(torch.nn.Linear(3, 2)) != fp(torch.nn.Linear(3, 4))
    assert fp(torch.nn.LeakyReLU(0.1)) != fp(torch.nn.LeakyReLU(0.2))
    assert fp(slt.gaussian_nll(1.0)) == fp(slt.gaussian_nll(1.0))
    assert fp(slt.gaussian_nll(1.0)) != fp(slt.gaussian_nll(2.0))
    assert fp(_global_scaled_loss) is _global_scaled_loss
    k = 2.0
    assert fp(lambda model, batch: k * model(batch[0]).sum()) is None  # a closure
    model = _Unregistered()
    assert fp(model) is None  # a tensor attribute is not plain Python state


def test_the_replayed_graph_drops_detaches_and_same_shape_views():
    from torch.func import vmap

    def fn(batch, w):
        leaves = w.detach().requires_grad_(True)
        with torch.enable_grad():
            values = vmap(lambda x, v: ((x @ v) ** 2).mean())(batch, leaves)
            (grad,) = torch.autograd.grad(values.sum(), [leaves])
        return [grad], values.detach()

    batch, w = torch.randn(4, 16, 3), torch.randn(4, 3)
    replay = traced._trace(fn, (batch, w))
    graph = replay.graph
    (output,) = graph.graph.find_nodes(op="output")
    kept = [n for n in graph.graph.nodes if n not in output.all_input_nodes]  # outputs stay
    assert torch.ops.aten.detach.default not in [n.target for n in kept]
    for node in kept:
        if node.target in (torch.ops.aten.view.default, torch.ops.aten.expand.default):
            assert node.meta["val"].shape != node.args[0].meta["val"].shape
    expect_grads, expect_values = fn(batch, w)
    for grads, values in (replay(batch, w), replay.flat(batch, w)):
        assert torch.equal(grads[0], expect_grads[0]) and torch.equal(values, expect_values)


def test_short_runs_use_a_graph_traced_by_an_earlier_run(tracing, monkeypatch):
    case = zoo.regular(4, n=256)
    monkeypatch.setattr(traced, "MIN_STEPS", 50)
    before, reused = traced.traces, traced.reuses
    long = _estimate(case.model, case.loader(), case.loss_fn, True)  # 50 steps: traces
    assert traced.traces == before + 1
    short_kw = dict(num_burnin=0, num_draws=20, seed=5)
    fast = _estimate(case.model, case.loader(), case.loss_fn, True, **short_kw)
    assert traced.traces == before + 1 and traced.reuses == reused + 1
    slow = _estimate(case.model, case.loader(), case.loss_fn, False, **short_kw)
    _same(fast, slow)
    assert np.isfinite(long.llc)
    # without an earlier graph a short run neither traces nor uses one
    other = zoo.regular(5, n=256)
    _estimate(other.model, other.loader(), other.loss_fn, True, **short_kw)
    assert traced.traces == before + 1 and traced.reuses == reused + 1


class _Tokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.nn.functional.gelu(self.norm(self.emb(x))).mean(1))


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)  # eval mode: its running statistics are buffers
        self.drop = torch.nn.Dropout(0.2)
        self.out = torch.nn.Linear(4 * 6 * 6, 1)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.norm(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("kind", ["tokens", "conv"])
def test_common_layers_are_traced_and_give_the_eager_numbers(tracing, kind):
    torch.manual_seed(0)
    model = (_Tokens() if kind == "tokens" else _Conv()).eval()
    x = torch.randint(0, 20, (256, 6)) if kind == "tokens" else torch.randn(256, 1, 8, 8)
    data = torch.utils.data.TensorDataset(x, torch.randn(256, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    fast, slow, new = _traced_and_eager(model, loader, slt.gaussian_nll(1.0), step_size=1e-5)
    assert new == 1
    _same(fast, slow)


def test_a_model_that_stores_a_tensor_in_forward_is_left_as_it_was_by_the_trace(tracing):
    # a cache built on first use (a rotary table): the trace must not leave a fake tensor
    class Lazy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
            self.cache = None

        def forward(self, x):
            if self.cache is None:
                self.cache = torch.cos(torch.arange(x.shape[-1], dtype=x.dtype))
            return self.lin(x * self.cache)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 4, generator=g), torch.randn(256, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,
                                         shuffle=True)  # fmt: skip
    model = Lazy()
    fast = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), **KW)
    loop = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), **(KW | {"chain_method": "loop"}))
    np.testing.assert_allclose(fast.trace, loop.trace, rtol=1e-5)
    assert model.cache is None  # the user's model: never run (a copy is)
    # the trace itself, on a module whose cache is not built yet: it left a FakeTensor there
    fresh = Lazy()
    names, params = zip(*fresh.named_parameters())

    def fn(batch, *tensors):
        return torch.func.functional_call(fresh, dict(zip(names, tensors)), (batch,)).sum()

    before = traced.traces
    assert traced._trace(fn, (x[:8], *[p.detach() for p in params]), fresh) is not None
    assert traced.traces == before + 1 and fresh.cache is None
    fresh(x[:8])  # and the module still runs eagerly


class _Counted(torch.nn.Module):
    """A forward that updates a buffer in place, once per pass."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return self.lin(x)


def _counted_loss(model, batch):  # reads the buffer: its value shows in every L_B
    return slt.gaussian_nll(0.3)(model, batch) + 1e-3 * model.count


def test_a_buffer_updated_in_forward_is_updated_once_per_pass_on_a_first_use(tracing):
    # the first use runs the eager pass, then checks the graph: from the buffer the eager
    # pass updated, the buffer moved twice and the graph, seeing it, failed its check
    def fn(batch, weight, count):
        count += 1
        return (batch @ weight).sum() + count

    x, weight, count = torch.randn(8, 3), torch.randn(3, 1), torch.zeros(())
    replayed = traced.TracedPass(fn)
    for calls in (1, 2, 3):
        out = replayed(x, weight, count)
        assert count.item() == calls
        assert torch.equal(out, (x @ weight).sum() + calls)
    assert list(replayed._graphs.values())[0] is not None  # the graph passed its check
    # through an estimate: the user's model untouched, the same numbers as the eager pass
    torch.manual_seed(0)
    model = _Counted().eval()
    loader = _data(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast, slow, new = _traced_and_eager(model, loader, _counted_loss)
    assert new == 1
    _same(fast, slow)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_partial_losses_with_other_arguments_have_other_fingerprints():
    # a partial keeps its arguments in slots, not __dict__: they were left out of the key,
    # so a graph of partial(loss, scale=1) could be offered for partial(loss, scale=2)
    import functools

    def loss(model, batch, scale=1.0):
        return scale * slt.gaussian_nll(1.0)(model, batch)

    one, two = functools.partial(loss, scale=1.0), functools.partial(loss, scale=2.0)
    assert traced.fingerprint(one) != traced.fingerprint(two)
    assert traced.fingerprint(one) == traced.fingerprint(functools.partial(loss, scale=1.0))
    assert traced.fingerprint(functools.partial(loss, scale=object())) is None


# The loop (chain_method="loop", and run_chains under every sampler and evidence ladder):
# its passes, at the chain's parameters and the gradient control variate's at w*, replayed
# from a traced graph of the unbatched pass (Posterior.replayed)


@pytest.fixture
def loop_tracing(tracing, monkeypatch):
    """Every loop run traces, however short."""
    from slt import chains

    monkeypatch.setattr(chains, "LOOP_TRACE_MIN_STEPS", 0)
    monkeypatch.setattr(chains, "LOOP_TRACE_MIN_STEPS_COLD", 0)


LOOP = dict(chain_method="loop", num_chains=2, num_draws=40, num_burnin=10)


@pytest.mark.parametrize(
    "sampler, control_variate",
    [("sgld", "gradient"), ("sgld", "loss"), ("sgld", "none"), ("rmsprop_sgld", "gradient"),
     ("sgnht", "gradient"), ("mala", "none")],
)  # fmt: skip
def test_the_loops_replayed_passes_give_the_eager_numbers(loop_tracing, sampler, control_variate):
    case = zoo.deep_linear((5, 4, 3), 2, n=512)
    loader = case.loader(512 if sampler == "mala" else None)  # MALA: the whole data per step
    fast, slow, new = _traced_and_eager(case.model, loader, case.loss_fn, sampler=sampler,
                                        control_variate=control_variate,
                                        acceptance_every=7 if sampler == "sgld" else 0,
                                        **LOOP)  # fmt: skip
    assert new == 1
    _same(fast, slow)


def test_the_loops_pass_at_w_star_shares_the_chains_graph(loop_tracing, no_cache):
    # no per-sample table: a pass at w* on every batch, through the same graph (reused)
    case = zoo.regular(4, n=256)
    reused = traced.reuses
    fast, slow, new = _traced_and_eager(case.model, case.loader(), case.loss_fn, **LOOP)
    assert new == 1 and traced.reuses > reused
    _same(fast, slow)
    assert np.isfinite(fast.trace_at_center).all()


def test_the_loop_replays_only_small_models_and_long_runs(tracing, monkeypatch):
    from slt import chains

    case = zoo.regular(4, n=256)
    short = LOOP["num_chains"] * (LOOP["num_draws"] + LOOP["num_burnin"])
    monkeypatch.setattr(chains, "_dynamo_imported", lambda: True)
    monkeypatch.setattr(chains, "LOOP_TRACE_MIN_STEPS", short + 1)
    before = traced.traces
    _estimate(case.model, case.loader(), case.loss_fn, True, **LOOP)
    assert traced.traces == before  # a short run: no trace of its own
    monkeypatch.setattr(chains, "LOOP_TRACE_MIN_STEPS", short)
    d = sum(p.numel() for p in case.model.parameters())
    monkeypatch.setattr(chains, "LOOP_TRACE_MAX_PARAMS", d - 1)
    _estimate(case.model, case.loader(), case.loss_fn, True, **LOOP)
    assert traced.traces == before  # too many parameters: the pass runs as before
    monkeypatch.setattr(chains, "LOOP_TRACE_MAX_PARAMS", d)
    _estimate(case.model, case.loader(), case.loss_fn, True, **LOOP)
    assert traced.traces == before + 1
    # and now a short run replays the graph the long one left
    monkeypatch.setattr(chains, "LOOP_TRACE_MIN_STEPS", short + 1)
    reused = traced.reuses
    fast = _estimate(case.model, case.loader(), case.loss_fn, True, **(LOOP | dict(seed=8)))
    assert traced.traces == before + 1 and traced.reuses > reused
    _same(fast, _estimate(case.model, case.loader(), case.loss_fn, False, **(LOOP | dict(seed=8))))
    # where torch._dynamo is not imported yet (the first trace would import it), only runs
    # of LOOP_TRACE_MIN_STEPS_COLD chain-steps or more trace
    monkeypatch.setattr(traced, "_CACHE", type(traced._CACHE)())
    monkeypatch.setattr(chains, "_dynamo_imported", lambda: False)
    monkeypatch.setattr(chains, "LOOP_TRACE_MIN_STEPS", short)
    monkeypatch.setattr(chains, "LOOP_TRACE_MIN_STEPS_COLD", short + 1)
    _estimate(case.model, case.loader(), case.loss_fn, True, **LOOP)
    assert traced.traces == before + 1
    monkeypatch.setattr(chains, "LOOP_TRACE_MIN_STEPS_COLD", short)
    _estimate(case.model, case.loader(), case.loss_fn, True, **LOOP)
    assert traced.traces == before + 2


def test_the_loop_runs_hooks_and_buffers_updated_in_forward_as_before(loop_tracing):
    case = zoo.regular(3, n=256)
    calls = []
    handle = case.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        fast, slow, new = _traced_and_eager(case.model, case.loader(), case.loss_fn, **LOOP)
    finally:
        handle.remove()
    assert new == 0 and len(calls) >= 2 * 2 * 50  # every pass of both runs
    _same(fast, slow)
    torch.manual_seed(0)
    model = _Counted().eval()
    loader = _data(model)  # runs the model once
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast, slow, new = _traced_and_eager(model, loader, _counted_loss, **LOOP)
    assert new == 1
    _same(fast, slow)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_loops_graph_takes_frozen_parameters_and_buffers_as_arguments(loop_tracing):
    torch.manual_seed(0)
    model = _Scaled().eval()
    loader = _data(model)
    for params in (None, ["head.weight"]):  # all trainable ones, or a weight-refined part
        fast, slow, new = _traced_and_eager(model, loader, slt.gaussian_nll(0.3), params=params,
                                            **LOOP)  # fmt: skip
        assert new == 1
        _same(fast, slow)


def test_a_ladder_of_short_runs_traces_once_for_all_of_them(tracing, monkeypatch):
    # WBIC: one short run per chain per rung; the whole ladder is long enough to repay a
    # trace, so the first run traces and the rest reuse its graph; the numbers are the eager
    # ones. A loss the graph cannot be kept for (a closure) traces in no run this short.
    from slt import chains

    monkeypatch.setattr(chains, "_dynamo_imported", lambda: True)
    case = zoo.regular(3, n=256)
    kw = dict(num_chains=2, num_draws=30, num_burnin=10, num_anneal=2, sampler="sgld",
              progress=False, seed=1)  # fmt: skip
    job = 2 * 2 * 40  # the ladder of two β, 2 chains × 40 steps on each (the annealing: 40)
    monkeypatch.setattr(chains, "LOOP_TRACE_MIN_STEPS", job)
    before, reused = traced.traces, traced.reuses

    def run(loss_fn, enabled):
        traced.enabled = enabled
        try:
            return slt.wbic(case.model, case.loader(), loss_fn, **kw)
        finally:
            traced.enabled = True

    fast = run(case.loss_fn, True)
    assert traced.traces == before + 1 and traced.reuses >= reused + 3
    slow = run(case.loss_fn, False)
    assert fast.wbic == slow.wbic and fast.lambda_hat == slow.lambda_hat
    sigma = 1.0

    def closure(model, batch):
        return slt.gaussian_nll(sigma)(model, batch)

    run(closure, True)
    assert traced.traces == before + 1


class _Recurrent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(3, 8, batch_first=True)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.lstm(x)[0][:, -1])


class _AlwaysDropout(torch.nn.Module):
    """Dropout that stays on in eval mode: the pass draws from torch's global generator."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(torch.nn.functional.dropout(x, 0.2, training=True))


def test_the_loop_runs_eagerly_what_traces_but_does_not_replay_the_same(loop_tracing):
    # an LSTM records a graph whose kernel fails on replay (an undefined workspace): the
    # check must reject it, not raise. An always-on dropout's graph draws other masks: it
    # fails its check, and the check must not move the global random state, or the traced
    # run (and the first run in a process to trace) would draw other numbers than the rest
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 5, 3, generator=g), torch.randn(256, 1, generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    fast, slow, new = _traced_and_eager(_Recurrent(), loader, slt.gaussian_nll(1.0), **LOOP)
    assert new == 1
    _same(fast, slow)
    model = _AlwaysDropout()
    loader = _data(model)
    first, slow, new = _traced_and_eager(model, loader, slt.gaussian_nll(0.3), **LOOP)
    assert new == 1
    _same(first, slow)
    again, _, new = _traced_and_eager(model, loader, slt.gaussian_nll(0.3), **LOOP)
    assert new == 0
    _same(again, first)


class _Schedule(torch.nn.Module):
    """A forward that reads and advances a plain Python counter: a graph would hold the
    counter's value at tracing as a constant."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * (1.0 + 1e-3 * self.calls)


def test_a_pass_that_changes_the_modules_python_state_is_not_replayed(loop_tracing):
    # (the batched step refuses such a model: check_batched_gradient)
    torch.manual_seed(0)
    model = _Schedule().eval()
    loader = _data(model)
    calls = model.calls
    fast, slow, _ = _traced_and_eager(model, loader, slt.gaussian_nll(0.3), **LOOP)
    _same(fast, slow)
    assert model.calls == calls  # the user's model: never run (a copy is)


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_a_submodule_registered_twice_is_traced_and_left_as_it_was(loop_tracing, method):
    # the trace's functional_call left a fake tensor in the shared submodule, on which the
    # next eager pass failed
    sys.path.insert(0, str(Path(__file__).parent))
    from _models import SharedBlock

    torch.manual_seed(0)
    model = SharedBlock().eval()
    loader = _data(model)
    fast, slow, new = _traced_and_eager(model, loader, slt.gaussian_nll(0.3),
                                        **(LOOP | dict(chain_method=method)))  # fmt: skip
    assert new == 1
    _same(fast, slow)


@pytest.mark.parametrize("keys", [8, 16])
def test_the_loops_graph_of_attention_over_many_keys_is_used(loop_tracing, keys):
    # past 12 keys the loop's graph was traced on the math backend and checked against the
    # eager pass on PyTorch's own kernel: they round differently, so it was always dropped
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                             batch_first=True).eval()  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, keys, 8, generator=gen), torch.randn(32, keys, 8, generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16,
                                         shuffle=True)  # fmt: skip
    fast, slow, new = _traced_and_eager(model, loader, slt.gaussian_nll(1.0),
                                        control_variate="none", **LOOP)  # fmt: skip
    assert new >= 1 and traced._CACHE and all(g is not None for g in traced._CACHE.values())
    _same(fast, slow)
