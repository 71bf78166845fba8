"""Curvature and noise of the posterior at a point, which the step-size calibration and the
evidence ladder read: the top Hessian eigenvalue of L_B (power iteration on Hessian-vector
products) and the per-coordinate variance of minibatch gradients at w*."""

from __future__ import annotations

import torch

from slt.posterior import Posterior


def top_hessian_eigenvalue(
    posterior: Posterior, batch, *, iters: int = 20, seed: int = 0, at_center: bool = True
) -> float:
    """Largest |eigenvalue| of the Hessian of L_B at w* (or, with ``at_center=False``, at
    the posterior's current parameters), by power iteration on Hessian-vector products:
    ‖Hv‖ for the last unit vector v, which never exceeds it and tends to it even where
    eigenvalues ±q pair up (an indefinite Hessian away from a minimum), where the Rayleigh
    quotient vᵀHv stalls below q."""
    params = list((posterior.reset() if at_center else posterior.params).values())
    g = torch.Generator(device=posterior.device).manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) for p in params]
    eig = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((x * x).sum() for x in v))
        v = [x / norm for x in v]
        loss = posterior.loss(posterior.module, batch, twice=True)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        # a parameter the loss does not read, or reads linearly, adds nothing to H v
        read = [i for i, gr in enumerate(grads) if gr is not None and gr.requires_grad]
        if not read:
            return 0.0
        hv = torch.autograd.grad([grads[i] for i in read], params,
                                 grad_outputs=[v[i] for i in read], allow_unused=True)  # fmt: skip
        hv = [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, params)]
        eig = float(torch.sqrt(sum((h * h).sum() for h in hv)))
        v = hv
        if eig == 0:
            return 0.0
    return eig


def minibatch_gradient_variance(
    posterior: Posterior, *, num_batches: int = 16, seed: int = 0
) -> float:
    """Mean over coordinates of Var[∇L_B(w*)] across ``num_batches`` minibatches."""
    params = list(posterior.reset().values())
    stream = posterior.batches.forever(torch.Generator().manual_seed(seed))
    flats = []
    for _ in range(num_batches):
        loss = posterior.loss(posterior.module, next(stream))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flats.append(torch.cat([
            (torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)
        ]).double())  # fmt: skip
    stacked = torch.stack(flats)
    return float(stacked.var(dim=0, unbiased=True).mean())
