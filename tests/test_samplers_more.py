"""SGNHT, MALA and the MALA acceptance diagnostic.

Deterministic identities first (closed-form SGNHT steps; MALA's accept test against an
independent computation with the noise and the uniform reproduced from the generator;
rejection restores the parameters bit for bit), then statistical checks against exact
answers with tolerances of 4 standard errors, the settings fixed in advance:

- MALA on Gaussian regression at a step size where SGLD's stationary λ̂ is +70% off still
  hits the exact continuous target ½ Σ nβ q_i / (nβ q_i + γ);
- SGNHT on the same target, within 4 se + 3% (its discretization bias, to first order in
  η with the thermostat at its mean, is +0.2% here);
- MALA on the two-parameter potentials w0²w1² and w0²w1⁴ against the exact finite-nβ
  value by quadrature (:func:`slt.zoo.expected_llc`).
"""

import math
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import slt
from slt import zoo
from slt.samplers import mala, sgnht
from slt.samplers.base import gaussian_noise
from slt.samplers.mala import log_acceptance_ratio


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second BLAS/OpenMP thread only helps when the core is free,
    and on a shared 2-core machine it made the full-batch regressions 10-20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _regression(n=512, scales=(1.0, 2.0, 0.5), sigma=1.0, seed=0):
    """Linear regression at its least-squares fit ŵ (as in test_llc_statistics.py), with
    q = eigenvalues of XᵀX/(nσ²)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor(scales, dtype=torch.float64)
    x = torch.randn(n, len(scales), generator=g, dtype=torch.float64) * scale
    w_true = torch.randn(len(scales), 1, generator=g, dtype=torch.float64)
    y = x @ w_true + sigma * torch.randn(n, 1, generator=g, dtype=torch.float64)
    w_hat = torch.linalg.lstsq(x, y).solution
    model = torch.nn.Linear(len(scales), 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_hat.T)
    q = np.linalg.eigvalsh((x.T @ x / (n * sigma**2)).numpy())
    return model, TensorDataset(x, y), q


def _continuous(q, nbeta, gamma):
    return 0.5 * float(np.sum(nbeta * q / (nbeta * q + gamma)))


def _params(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(3, 2, generator=g, dtype=dtype),
        "b": torch.randn(4, generator=g, dtype=dtype),
    }


def _clone(p):
    return {k: v.clone() for k, v in p.items()}


# ---------------------------------------------------------------- SGNHT, deterministic


def test_sgnht_without_force_or_noise_stands_still_and_cools():
    # ∇U = 0 at w* and a = 0: v stays 0, w stays put, α falls by η per step (up to the
    # rounding of -γw + γw* in the fused drift, ~1e-19 here)
    center = _params()
    params = _clone(center)
    eta = 1e-3
    kernel = sgnht(step_size=eta, nbeta=50.0, localization=3.0, center=center, diffusion=0.0)
    state = kernel.init(params)
    zero = lambda p, batch: ([torch.zeros_like(v) for v in p.values()], torch.tensor(0.0))  # noqa: E731
    for _ in range(5):
        state, _ = kernel.step(state, zero, None, torch.Generator().manual_seed(0))
    for k, v in zip(center, state.momentum):
        torch.testing.assert_close(params[k], center[k], rtol=0, atol=1e-15)
        torch.testing.assert_close(v, torch.zeros_like(v), rtol=0, atol=1e-15)
    assert float(state.thermostat) == pytest.approx(0.0 - 5 * eta, abs=1e-15)


def test_sgnht_two_steps_match_the_closed_form():
    # a = 0 (no noise), constant loss gradient g, localization γ:
    # v1 = (1 - a0) 0 + η(-nβ g - γ(w0 - w*)), w1 = w0 + v1, α1 = a0 + |v1|²/d - η, and again
    center, start = _params(0), _params(1)
    params = _clone(start)
    g = {k: torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v) for k, v in start.items()}
    eta, nbeta, gamma, a0 = 1e-2, 5.0, 2.0, 0.3
    # diffusion sets both the noise and α's start: take a = 0 and set α0 by hand
    kernel = sgnht(step_size=eta, nbeta=nbeta, localization=gamma, center=center, diffusion=0.0)
    state = kernel.init(params)
    state = state._replace(thermostat=torch.tensor(a0, dtype=torch.float64))
    grad_fn = lambda p, batch: ([g[k].clone() for k in p], torch.tensor(0.0))  # noqa: E731
    d = sum(v.numel() for v in start.values())
    w, v, alpha = _clone(start), {k: torch.zeros_like(x) for k, x in start.items()}, a0
    for _ in range(2):
        state, _ = kernel.step(state, grad_fn, None, torch.Generator().manual_seed(0))
        v = {k: (1 - alpha) * v[k] + eta * (-nbeta * g[k] - gamma * (w[k] - center[k])) for k in w}
        w = {k: w[k] + v[k] for k in w}
        alpha = alpha + sum(float((x * x).sum()) for x in v.values()) / d - eta
    for k, vk in zip(w, state.momentum):
        torch.testing.assert_close(params[k], w[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(vk, v[k], rtol=1e-12, atol=1e-14)
    assert float(state.thermostat) == pytest.approx(alpha, rel=1e-12)
    started = sgnht(step_size=eta, nbeta=nbeta, localization=gamma, center=center, diffusion=a0)
    assert float(started.init(_clone(start)).thermostat) == a0  # α starts at the diffusion


def test_sgnht_noise_enters_through_the_momentum():
    # from v = 0 at w* with ∇U = 0: v1 = √(2aη) ξ, w1 = w* + v1, α1 = a + |v1|²/d - η
    center = _params()
    params = _clone(center)
    eta, a = 4e-3, 0.05
    kernel = sgnht(step_size=eta, nbeta=10.0, localization=1.0, center=center, diffusion=a)
    zero = lambda p, batch: ([torch.zeros_like(v) for v in p.values()], torch.tensor(0.0))  # noqa: E731
    state, _ = kernel.step(kernel.init(params), zero, None, torch.Generator().manual_seed(9))
    xi = gaussian_noise(list(center.values()), torch.Generator().manual_seed(9))
    v1 = [math.sqrt(2 * a * eta) * x for x in xi]
    for (k, w), vk, expected in zip(params.items(), state.momentum, v1):
        torch.testing.assert_close(vk, expected, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(w - center[k], expected, rtol=1e-10, atol=1e-15)
    kinetic = sum(float((x * x).sum()) for x in v1) / sum(x.numel() for x in v1)
    assert float(state.thermostat) == pytest.approx(a + kinetic - eta, rel=1e-12)


# ----------------------------------------------------------------- MALA, deterministic


def _quartic(params, batch):
    """L(w) = Σ (w⁴/4 - w²/2 + w/3): non-Gaussian, with its exact gradient."""
    loss = sum((w**4 / 4 - w**2 / 2 + w / 3).sum() for w in params.values())
    grads = [w**3 - w + 1 / 3 for w in params.values()]
    return grads, loss


def _log_p(params, center, nbeta, gamma):
    _, loss = _quartic(params, None)
    return -nbeta * loss - 0.5 * gamma * sum(((params[k] - center[k]) ** 2).sum() for k in params)


def _grad_log_p(params, center, nbeta, gamma):
    grads, _ = _quartic(params, None)
    return {k: -nbeta * g - gamma * (params[k] - center[k]) for k, g in zip(params, grads)}


def test_mala_accept_test_matches_an_independent_computation():
    eps, nbeta, gamma = 0.3, 2.0, 1.5  # large enough for both outcomes to occur
    center = _params(0)
    outcomes = set()
    for seed in range(24):
        start = {k: v + 0.5 for k, v in _params(100 + seed).items()}
        params = _clone(start)
        kernel = mala(step_size=eps, nbeta=nbeta, localization=gamma, center=center)
        state, info = kernel.step(kernel.init(params), _quartic, None,
                                  torch.Generator().manual_seed(seed))  # fmt: skip
        # reproduce the proposal noise and the uniform, in the kernel's order
        gen = torch.Generator().manual_seed(seed)
        xi = gaussian_noise(list(start.values()), gen)
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        g0 = _grad_log_p(start, center, nbeta, gamma)
        prop = {k: start[k] + eps / 2 * g0[k] + math.sqrt(eps) * x for k, x in zip(start, xi)}
        g1 = _grad_log_p(prop, center, nbeta, gamma)
        normal = torch.distributions.Normal
        log_q_fwd = sum(normal(start[k] + eps / 2 * g0[k], math.sqrt(eps)).log_prob(prop[k]).sum()
                        for k in start)  # fmt: skip
        log_q_bwd = sum(normal(prop[k] + eps / 2 * g1[k], math.sqrt(eps)).log_prob(start[k]).sum()
                        for k in start)  # fmt: skip
        log_r = (_log_p(prop, center, nbeta, gamma) - _log_p(start, center, nbeta, gamma)
                 + log_q_bwd - log_q_fwd)  # fmt: skip
        alpha = min(1.0, math.exp(float(log_r)))
        assert float(info.acceptance) == pytest.approx(alpha, rel=1e-9, abs=1e-12)
        assert bool(info.accepted) == (u < alpha)
        assert float(info.loss) == pytest.approx(float(_quartic(start, None)[1]), rel=1e-12)
        for k in start:
            if info.accepted:
                torch.testing.assert_close(params[k], prop[k], rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(params[k], start[k])
        outcomes.add(bool(info.accepted))
    assert outcomes == {True, False}  # both branches were exercised


def test_mala_rejection_restores_params_and_cache_bit_for_bit():
    center = _params(0)
    params = {k: v + 1.0 for k, v in _params(1).items()}
    kernel = mala(step_size=5.0, nbeta=10.0, localization=1.0, center=center)  # far too large
    state, _ = kernel.step(kernel.init(params), _quartic, None, torch.Generator().manual_seed(0))
    before = _clone(params)
    cache = ([g.clone() for g in state.drift], state.log_density.clone(), state.loss.clone())
    for seed in range(1, 6):
        state, info = kernel.step(state, _quartic, None, torch.Generator().manual_seed(seed))
        assert not info.accepted and float(info.acceptance) == 0.0
    for k in before:
        assert torch.equal(params[k], before[k])
    assert all(torch.equal(g, h) for g, h in zip(state.drift, cache[0]))
    assert torch.equal(state.log_density, cache[1]) and torch.equal(state.loss, cache[2])


def test_mala_cache_follows_the_chain_with_one_gradient_call_per_step():
    eps, nbeta, gamma = 0.05, 2.0, 1.0
    center = _params(0)
    params = _clone(center)
    calls = []

    def grad_fn(p, batch):
        calls.append(1)
        return _quartic(p, batch)

    kernel = mala(step_size=eps, nbeta=nbeta, localization=gamma, center=center)
    state = kernel.init(params)
    accepted = []
    for seed in range(60):
        state, info = kernel.step(state, grad_fn, None, torch.Generator().manual_seed(seed))
        accepted.append(bool(info.accepted))
    assert len(calls) == 60 + 1  # one per step, plus the starting point on the first step
    assert 0 < sum(accepted) < 60
    _, loss = _quartic(params, None)
    torch.testing.assert_close(state.loss, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.log_density, _log_p(params, center, nbeta, gamma),
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    for g, expected in zip(state.drift, _grad_log_p(params, center, nbeta, gamma).values()):
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)


def test_mala_is_the_same_when_grad_fn_writes_into_the_same_buffers():
    # p.grad zeroed and refilled, or a preallocated output: the kept drift and loss at w
    # were the buffers the proposal's call overwrote (acceptance 0.93 became 1.00)
    center = _params(0)
    buffers = {}

    def reusing(p, batch):
        grads, loss = _quartic(p, batch)
        if not buffers:
            buffers["grads"], buffers["loss"] = [torch.empty_like(g) for g in grads], loss * 0
        torch._foreach_copy_(buffers["grads"], grads)
        buffers["loss"].copy_(loss)
        return buffers["grads"], buffers["loss"]

    runs = []
    for grad_fn in (_quartic, reusing):
        params = _clone(center)
        kernel = mala(step_size=0.05, nbeta=2.0, localization=1.0, center=center)
        state, trace = kernel.init(params), []
        for seed in range(40):
            state, info = kernel.step(state, grad_fn, None, torch.Generator().manual_seed(seed))
            trace.append((float(info.loss), float(info.acceptance)))
        runs.append((trace, params))
    (fresh, w_fresh), (reused, w_reused) = runs
    assert 0 < sum(a < 1 for _, a in fresh)  # some proposals are tested, not all taken
    assert fresh == reused
    assert all(torch.equal(w_fresh[k], w_reused[k]) for k in w_fresh)


def test_mala_selects_the_same_numbers_by_branch_and_by_where(monkeypatch):
    # on the CPU the step reads its accept decision and branches; elsewhere it selects with
    # torch.where (no host synchronisation): both paths, over accepted and rejected moves
    mala_module = sys.modules["slt.samplers.mala"]  # the module: slt.samplers.mala is the kernel

    def run(on_host):
        monkeypatch.setattr(mala_module, "_read_on_host", lambda accept: on_host)
        center = _params(0)
        params = {k: v + 0.5 for k, v in _params(1).items()}
        kernel = mala(step_size=0.05, nbeta=2.0, localization=1.0, center=center)
        state, record = kernel.init(params), []
        for seed in range(60):
            state, info = kernel.step(state, _quartic, None, torch.Generator().manual_seed(seed))
            record.append((float(info.loss), float(info.acceptance), bool(info.accepted)))
        kept = (*state.drift, state.log_density, state.loss, state.square, *params.values())
        return record, [t.clone() for t in kept]

    (branch, left), (where, right) = run(True), run(False)
    assert branch == where and 0 < sum(a for *_, a in branch) < len(branch)
    assert all(torch.equal(a, b) for a, b in zip(left, right))


def test_log_acceptance_ratio_is_zero_for_a_reversible_pair():
    # log p = -|w|²/2, g(w) = -w: for w' = -w, p(w') = p(w) and q(w'|w) = q(w|w')
    # (both are N(·; -w(ε/2 - 1), ε) at ∓w), so log r = 0 exactly.
    w = [torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]
    new = [-w[0]]
    log_p = -0.5 * (w[0] ** 2).sum()
    r = log_acceptance_ratio([new[0] - w[0]], [-w[0]], [-new[0]], log_p, log_p, step_size=0.3)
    assert abs(float(r)) < 1e-12


@pytest.mark.parametrize("piece", [None, 1, 5])
@pytest.mark.parametrize("localization", [0.0, 2.0])
def test_move_log_ratio_equals_the_list_formula(localization, piece, monkeypatch):
    # the streamed form (the acceptance probe's, in pieces of MOVE_PIECE numbers: here also
    # pieces that split tensors and chains) against log_acceptance_ratio with log_density
    # and explicit drifts; per chain when the tensors carry a chain dimension
    from slt.samplers.base import localized_drift
    from slt.samplers.mala import log_density, move_log_ratio

    if piece is not None:  # the module (slt.samplers.mala is also the kernel's name)
        monkeypatch.setattr(sys.modules[move_log_ratio.__module__], "MOVE_PIECE", piece)

    gen = torch.Generator().manual_seed(3)
    shapes, chains, nbeta, eps = [(4, 3), (5,)], 3, 40.0, 1e-3

    def draw(scale=1.0):
        return [scale * torch.randn(chains, *s, generator=gen, dtype=torch.float64)
                for s in shapes]  # fmt: skip

    w, center = draw(), draw()
    w1 = [a + b for a, b in zip(w, draw(0.05))]
    grad, grad_new = draw(0.1), draw(0.1)
    loss, loss_new = torch.rand(chains, generator=gen), torch.rand(chains, generator=gen)
    kw = dict(nbeta=nbeta, localization=localization)
    expected = []
    for c in range(chains):
        one = [[t[c] for t in ts] for ts in (w, w1, grad, grad_new, center)]
        drift = localized_drift(one[0], [g.clone() for g in one[2]], one[4], **kw)
        drift_new = localized_drift(one[1], [g.clone() for g in one[3]], one[4], **kw)
        expected.append(log_acceptance_ratio(
            [b - a for a, b in zip(one[0], one[1])], drift, drift_new,
            log_density(one[0], loss[c], one[4], **kw),
            log_density(one[1], loss_new[c], one[4], **kw), step_size=eps,
        ))  # fmt: skip
    got = move_log_ratio(w, w1, [g.clone() for g in grad], [g.clone() for g in grad_new], loss,
                         loss_new, center, **kw, step_size=eps, chains=True)  # fmt: skip
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-9, atol=1e-9)
    one = move_log_ratio([t[0] for t in w], [t[0] for t in w1], [g[0].clone() for g in grad],
                         [g[0].clone() for g in grad_new], loss[0], loss_new[0],
                         [t[0] for t in center], **kw, step_size=eps)  # fmt: skip
    torch.testing.assert_close(one, expected[0], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ full-batch wiring


class _CountingNLL:
    """gaussian_nll(1) that records the batch size of every call."""

    def __init__(self):
        self.sizes = []
        self.inner = slt.gaussian_nll(1.0)

    def __call__(self, model, batch):
        self.sizes.append(len(batch[0]))
        return self.inner(model, batch)


class _PlainDataset(Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


@pytest.mark.parametrize("kind", ["tensor_dataset", "one_batch_loader", "list"])
def test_mala_steps_see_the_whole_dataset_once_per_step(kind):
    model, data, _ = _regression(n=96)
    loader = {
        "tensor_dataset": DataLoader(data, batch_size=16, shuffle=True),  # full tensors used
        "one_batch_loader": DataLoader(_PlainDataset(data), batch_size=200, shuffle=True),
        "list": [data.tensors],
    }[kind]
    loss_fn = _CountingNLL()
    res = slt.estimate_llc(model, loader, loss_fn, sampler="mala", step_size=1e-3,
                           num_chains=2, num_draws=5, num_burnin=2, progress=False)  # fmt: skip
    # L_n(w*) on the full batch, then one full-data evaluation per step (+1 at each
    # chain's start): no extra pass at w* per step, although control_variate was left at
    # its default "gradient"
    assert loss_fn.sizes == [96] * (1 + 2 * (7 + 1))
    assert res.control_variate == "none"
    np.testing.assert_array_equal(res.trace_at_center, res.init_loss)
    assert np.isfinite(res.acceptance).all()
    assert ((0 <= res.acceptance) & (res.acceptance <= 1)).all()
    assert res.mala_acceptance == pytest.approx(float(res.acceptance.mean()))


def test_mala_full_batch_ignores_drop_last():
    model, data, _ = _regression(n=96)
    loader = DataLoader(data, batch_size=40, shuffle=True, drop_last=True)  # epochs of 80
    res = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), sampler="mala",
                           num_chains=1, num_draws=3, num_burnin=0, progress=False)  # fmt: skip
    with torch.no_grad():
        full = float(slt.gaussian_nll(1.0)(model, data.tensors))
    assert res.n == 96 and res.init_loss == pytest.approx(full, rel=1e-12)


def test_mala_refuses_a_loader_with_several_batches():
    model, data, _ = _regression(n=96)
    loader = DataLoader(_PlainDataset(data), batch_size=32)
    with pytest.raises(ValueError, match=r"sampler='mala'.*loader yields 3 batches") as err:
        slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), sampler="mala", progress=False)
    assert "batch_size >= len(dataset)" in str(err.value) and "TensorDataset" in str(err.value)


# ------------------------------------------------------------- acceptance diagnostic


def _run(sampler="sgld", **kw):
    model, data, _ = _regression()
    args = dict(step_size=1e-4, localization=20.0, num_chains=2, num_draws=40, num_burnin=10,
                progress=False, sampler=sampler)  # fmt: skip
    args.update(kw)
    loader = args.pop("loader", DataLoader(data, batch_size=64, shuffle=True))
    return slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), **args)


def test_acceptance_is_recorded_every_k_steps_and_in_range():
    res = _run(acceptance_every=7)
    steps = 10 + np.arange(40)  # post-burn-in draw j is step 10 + j
    computed = np.isfinite(res.acceptance)
    assert res.acceptance.shape == (2, 40)
    assert (computed == (steps % 7 == 0)[None, :]).all()
    values = res.acceptance[computed]
    assert ((0 <= values) & (values <= 1)).all()
    assert res.mala_acceptance == pytest.approx(float(values.mean()))
    assert "MALA acceptance" in str(res) and "every 7 steps" in str(res)


def test_no_probe_among_the_draws_is_said():
    # draws are steps 10-49: with acceptance_every=60 every probe (step 0) is in the burn-in,
    # and the SGLD bias check silently did not happen
    res = _run(acceptance_every=60)
    assert math.isnan(res.mala_acceptance)
    assert "no probe among the draws; acceptance_every=60" in str(res)
    (note,) = [w for w in res.warnings if "no MALA-acceptance probe" in w]
    assert "acceptance_every <= 40" in note
    assert not any("no MALA-acceptance probe" in w for w in _run(acceptance_every=0).warnings)


def test_acceptance_off_and_undefined_samplers_record_nan():
    off = _run(acceptance_every=0)
    assert np.isnan(off.acceptance).all() and math.isnan(off.mala_acceptance)
    assert "n/a (acceptance_every=0)" in str(off)
    for sampler in ("rmsprop_sgld", "sgnht"):
        res = _run(sampler, acceptance_every=1)
        assert np.isnan(res.acceptance).all() and math.isnan(res.mala_acceptance)
        assert f"not defined for {sampler}" in str(res)


def test_acceptance_probe_leaves_the_chain_unchanged():
    # The probe takes no random numbers and restores nothing by copying, so the chains are
    # the same; its extra tensors can shift memory alignment and with it the SIMD path of a
    # reduction, which moved a few losses by one ulp on a fresh install. Equality to 1e-12
    # still fails for any real perturbation (an extra noise draw or a moved parameter).
    with_probe = _run(acceptance_every=3)
    without = _run(acceptance_every=0)
    np.testing.assert_allclose(with_probe.trace, without.trace, rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        with_probe.trace_at_center, without.trace_at_center, rtol=1e-12, atol=0
    )


def _top_hessian_eigenvalue(case):
    """Largest eigenvalue of the Hessian of L_n at the case's w* (all data, autograd)."""
    model, (x, y) = case.model, case.dataset.tensors
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(vector):
        chunks = vector.split([math.prod(s) for s in shapes])
        params = {k: c.view(s) for k, c, s in zip(names, chunks, shapes)}
        out = torch.func.functional_call(model, params, (x,))
        return case.loss_fn(lambda _: out, (x, y))

    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1])


def test_acceptance_high_for_a_tiny_step_and_low_near_the_stability_limit():
    tiny = _run(step_size=1e-5, acceptance_every=5, num_draws=100)  # regression, batches of 64
    assert tiny.mala_acceptance > 0.9, str(tiny)
    # Near the stability limit, on a deep linear network (Furman & Lau's setting). On a
    # Gaussian target a stationary full-batch SGLD chain cannot go below 1/2 (see
    # estimate_llc's acceptance_every), so the low end needs a non-Gaussian posterior.
    case = zoo.deep_linear((6, 3, 3, 6), 3, n=1024)
    gamma = 10.0
    nbeta = case.n / math.log(case.n)
    limit = 4 / (nbeta * _top_hessian_eigenvalue(case) + gamma)  # SGLD's at w*
    rough = slt.estimate_llc(case.model, case.loader(128), case.loss_fn,
                             step_size=0.75 * limit, localization=gamma, num_chains=2,
                             num_draws=200, num_burnin=100, acceptance_every=5,
                             progress=False)  # fmt: skip
    assert rough.mala_acceptance < 0.5, str(rough)


# ----------------------------------------------------------------------- statistical


def test_mala_is_exact_at_a_step_size_where_sgld_is_biased():
    model, data, q = _regression()
    nbeta, gamma = 512 / math.log(512), 20.0
    p = nbeta * q + gamma
    eps = 0.6 * 4 / p.max()  # SGLD's stiffest direction: variance × 1/(1 - 0.6) = 2.5
    target = _continuous(q, nbeta, gamma)
    sgld_target = 0.5 * float(np.sum(nbeta * q / (p * (1 - eps * p / 4))))
    assert sgld_target > 1.4 * target  # what full-batch SGLD would converge to
    loader = DataLoader(data, batch_size=64, shuffle=True)  # MALA uses the full tensors
    res = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), sampler="mala",
                           step_size=eps, localization=gamma, num_chains=8, num_draws=1200,
                           num_burnin=200, progress=False)  # fmt: skip
    assert res.nbeta == pytest.approx(nbeta)
    assert 4 * res.llc_std < 0.2 * target  # power to see SGLD's +70%
    assert abs(res.llc - target) < 4 * res.llc_std, (res.llc, res.llc_std, target)


def test_sgnht_hits_the_gaussian_target():
    model, data, q = _regression()
    nbeta, gamma = 512 / math.log(512), 20.0
    target = _continuous(q, nbeta, gamma)
    loader = DataLoader(data, batch_size=len(data))
    res = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), sampler="sgnht",
                           step_size=1e-3, localization=gamma, num_chains=8, num_draws=1200,
                           num_burnin=300, progress=False)  # fmt: skip
    assert res.llc_std < 0.05 * target
    assert abs(res.llc - target) < 4 * res.llc_std + 0.03 * target, (res.llc, res.llc_std, target)


@pytest.mark.parametrize("k", [(1, 1), (1, 2)], ids=["w0^2w1^2", "w0^2w1^4"])
def test_mala_matches_quadrature_on_two_parameter_potentials(k):
    # n = 1024, σ = 1 (t = c nβ ≈ 74), γ = 8, ε = 0.02: fixed before the first run
    case = zoo.potential(k, n=1024, sigma=1.0)
    gamma = 8.0
    res = slt.estimate_llc(case.model, case.loader(), case.loss_fn, sampler="mala",
                           step_size=0.02, localization=gamma, num_chains=8, num_draws=1200,
                           num_burnin=300, progress=False)  # fmt: skip
    target = case.expected(res.nbeta, gamma)
    assert res.llc_std < 0.1 * target
    assert abs(res.llc - target) < 4 * res.llc_std, (res.llc, res.llc_std, target)


def test_sgnht_with_a_burn_in_shorter_than_its_thermostat_settles_warns():
    # every chain starts the thermostat alike (v = 0 at w*): its transient, period 2π/√(2η)
    # (444 steps at η = 1e-4), is common to the chains; λ̂ read +3.7% at the default 250
    from slt.sampling import sgnht_burnin

    assert sgnht_burnin(1e-4) == 1111
    case = slt.zoo.regular(4, n=512)
    kw = dict(sampler="sgnht", step_size=1e-4, num_chains=2, num_draws=20, progress=False)
    short = slt.estimate_llc(case.model, case.loader(), case.loss_fn, num_burnin=250, **kw)
    (note,) = [w for w in short.warnings if "short for SGNHT" in w]
    assert "use num_burnin >= 1111" in note
    long = slt.estimate_llc(case.model, case.loader(), case.loss_fn, num_burnin=1111, **kw)
    assert not any("short for SGNHT" in w for w in long.warnings)


def _quadratic_grad(p, batch):  # L = ½‖w‖²: its gradient is w itself, returned as is
    return [p["w"]], 0.5 * (p["w"] ** 2).sum()


@pytest.mark.parametrize("name", ["sgld", "rmsprop_sgld", "sgnht", "mala"])
def test_hand_used_kernels_survive_the_natural_mistakes(name):
    from slt.samplers import SAMPLERS

    def run(grad_fn, center, start):
        kernel = SAMPLERS[name](step_size=1e-2, nbeta=10.0, localization=1.0, center=center)
        state = kernel.init(start)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            state, _ = kernel.step(state, grad_fn, None, gen)
        return state.params["w"].clone()

    def fresh_grad(p, batch):
        return [p["w"].clone()], 0.5 * (p["w"] ** 2).sum()

    w0 = torch.tensor([0.3, -0.2])
    want = run(fresh_grad, {"w": torch.zeros(2)}, {"w": w0.clone()})
    # a grad_fn returning the parameter itself: the drift was written into the parameters
    # (MALA's became exactly 0)
    assert torch.equal(run(_quadratic_grad, {"w": torch.zeros(2)}, {"w": w0.clone()}), want)
    # the same dict as center and start (the usual start at w*): w* moved with the chain
    start = {"w": torch.full((2,), 0.5)}
    kernel = SAMPLERS[name](step_size=1e-2, nbeta=10.0, localization=1.0, center=start)
    state = kernel.init(start)
    kernel.step(state, fresh_grad, None, torch.Generator().manual_seed(0))
    kernel2 = SAMPLERS[name](step_size=1e-2, nbeta=10.0, localization=1.0,
                             center={"w": torch.full((2,), 0.5)})  # fmt: skip
    state2 = kernel2.init({"w": torch.full((2,), 0.5)})
    kernel2.step(state2, fresh_grad, None, torch.Generator().manual_seed(0))
    assert torch.equal(state.params["w"], state2.params["w"])


def test_hand_used_kernels_check_their_arguments_by_name():
    from slt.samplers import mala, sgld

    kw = dict(step_size=1e-2, nbeta=10.0, localization=1.0)
    for bad, message in [
        ({"step_size": -1e-3}, "step_size must be a finite number > 0"),
        ({"nbeta": 0.0}, "nbeta must be a finite number > 0"),
        ({"localization": -1.0}, "localization must be a finite number >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):  # fmt: skip
            sgld(**(kw | bad), center={"w": torch.zeros(2)})
    kernel = sgld(**kw, center={"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="must name the same tensors"):
        kernel.init({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="center\\['w'\\] has shape \\(1,\\)"):
        sgld(**kw, center={"w": torch.zeros(1)}).init({"w": torch.zeros(2)})
    with pytest.raises(TypeError, match="float32 or float64"):
        sgld(**kw, center={"w": torch.zeros(2)}).init({"w": torch.zeros(2, dtype=torch.float16)})
    state = kernel.init({"x": torch.zeros(2)})
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        kernel.step(state, lambda p, b: ([p["x"].clone()], p["x"].sum()), None, None)
    # a center whose keys come in another order is matched by name, not position: exact
    center = {"b": torch.tensor([1.0]), "a": torch.tensor([-1.0])}
    kernel = mala(**kw, center=center)
    state = kernel.init({"a": torch.tensor([-1.0]), "b": torch.tensor([1.0])})
    grad = lambda p, b: ([p["a"] * 0, p["b"] * 0], p["a"].sum() * 0)  # noqa: E731
    state, _ = kernel.step(state, grad, None, torch.Generator().manual_seed(0))
    assert state.params["a"].item() < 0 < state.params["b"].item()  # near its own center
