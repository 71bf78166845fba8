"""Deterministic identities of the kernels: drift and noise checked separately by
reproducing the noise from a generator in the same state (as Optax tests stochastic code)."""

import math

import pytest
import torch

from slt.samplers import SAMPLERS, rmsprop_sgld, sgld
from slt.samplers.base import gaussian_noise


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)}


def _clone(p):
    return {k: v.clone() for k, v in p.items()}


def _noise_like(params, seed):
    return gaussian_noise(list(params.values()), torch.Generator().manual_seed(seed))


def _constant_grad(grads):
    def grad_fn(params, batch):
        return [g.clone() for g in grads], torch.tensor(0.0)

    return grad_fn


def _step(kernel, params, grads, seed):
    state = kernel.init(params)
    state, info = kernel.step(
        state, _constant_grad(grads), None, torch.Generator().manual_seed(seed)
    )
    return state


# MALA may reject the move (its accept test is checked in test_samplers_more.py)
@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"mala"}))
def test_zero_gradient_at_center_moves_by_noise_only(name):
    center = _params()
    params = _clone(center)
    zero = [torch.zeros_like(p) for p in params.values()]
    kernel = SAMPLERS[name](step_size=1e-2, nbeta=100.0, localization=5.0, center=center)
    _step(kernel, params, zero, seed=7)
    noise = _noise_like(center, seed=7)
    scale = math.sqrt(1e-2)
    if name == "rmsprop_sgld":  # V = 0 so G = 1/δ
        scale *= math.sqrt(1 / 0.1)
    if name == "sgnht":  # v = 0, so the first move is v = √(2aη) ξ, default a = 0.01
        scale *= math.sqrt(2 * 0.01)
    for (k, w), xi in zip(params.items(), noise):
        torch.testing.assert_close(w - center[k], scale * xi, rtol=1e-5, atol=1e-7)


# for MALA the target is flat here (zero loss, γ = 0): every proposal is accepted
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_noise_scales_as_sqrt_step_size(name):
    center = _params()
    zero = [torch.zeros_like(p) for p in center.values()]
    moves = []
    for eps in (1e-2, 4e-2):
        params = _clone(center)
        kernel = SAMPLERS[name](step_size=eps, nbeta=1.0, localization=0.0, center=center)
        _step(kernel, params, zero, seed=3)
        moves.append([params[k] - center[k] for k in center])
    for small, large in zip(*moves):
        torch.testing.assert_close(large, 2 * small, rtol=1e-5, atol=1e-7)


def test_sgld_drift_is_localized_tempered_gradient():
    center = _params(0)
    params = _params(1)
    start = _clone(params)
    grads = [torch.full_like(p, 0.3) for p in params.values()]
    eps, nbeta, gamma = 1e-3, 50.0, 2.0
    kernel = sgld(step_size=eps, nbeta=nbeta, localization=gamma, center=center)
    _step(kernel, params, grads, seed=11)
    noise = _noise_like(params, seed=11)
    for (k, w), g, xi in zip(params.items(), grads, noise):
        drift = (eps / 2) * (-nbeta * g - gamma * (start[k] - center[k]))
        torch.testing.assert_close(w - start[k] - math.sqrt(eps) * xi, drift, rtol=1e-5, atol=1e-7)


def test_rmsprop_sgld_preconditioner_after_one_step():
    center = _params(0)
    params = _params(1)
    start = _clone(params)
    grads = [torch.linspace(-1, 2, p.numel()).view_as(p) for p in params.values()]
    eps, nbeta, gamma, alpha, delta = 1e-3, 50.0, 2.0, 0.9, 0.1
    kernel = rmsprop_sgld(
        step_size=eps, nbeta=nbeta, localization=gamma, center=center, alpha=alpha, eps=delta
    )
    state = _step(kernel, params, grads, seed=5)
    noise = _noise_like(params, seed=5)
    for (k, w), g, xi, v in zip(params.items(), grads, noise, state.square_avg):
        torch.testing.assert_close(v, (1 - alpha) * g * g)
        precond = 1 / ((1 - alpha) ** 0.5 * g.abs() + delta)
        drift = (eps / 2) * precond * (-nbeta * g - gamma * (start[k] - center[k]))
        expected = drift + math.sqrt(eps) * precond.sqrt() * xi
        torch.testing.assert_close(w - start[k], expected, rtol=1e-5, atol=1e-6)


def test_step_reports_loss_before_the_move():
    center = _params()
    params = _clone(center)

    def grad_fn(p, batch):
        return [torch.zeros_like(v) for v in p.values()], p["b"].sum().detach().clone()

    kernel = sgld(step_size=1.0, nbeta=1.0, localization=0.0, center=center)
    _, info = kernel.step(kernel.init(params), grad_fn, None, torch.Generator().manual_seed(0))
    assert info.loss == center["b"].sum()
    assert not torch.equal(params["b"], center["b"])


def test_noise_buffer_draws_one_randn_call_per_step():
    # the kernels' reused buffer: call after call, one torch.randn over all parameters from
    # the generator, split in parameter order; a new parameter shape gets a new buffer
    from slt.samplers.base import NoiseBuffer

    def reference(params, generator):
        flat = torch.randn(sum(p.numel() for p in params), generator=generator)
        return [c.view_as(p) for c, p in zip(flat.split([p.numel() for p in params]), params)]

    params = list(_params().values())
    buffer, a, b = NoiseBuffer(), torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    first = buffer(params, a)
    kept = [t.clone() for t in first]
    torch.testing.assert_close(kept, reference(params, b), rtol=0, atol=0)
    second = buffer(params, a)
    assert all(s is f for s, f in zip(second, first))  # the same tensors, refilled
    torch.testing.assert_close(second, reference(params, b), rtol=0, atol=0)
    other = [torch.zeros(7)]
    torch.testing.assert_close(buffer(other, a), reference(other, b), rtol=0, atol=0)
    torch.testing.assert_close(gaussian_noise(params, a), reference(params, b), rtol=0, atol=0)
