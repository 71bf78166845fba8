"""The README's "Coming from devinterp" table: devinterp's ``lr``, ``nbeta`` and
``localization`` are slt's ``step_size``, ``nbeta`` and ``localization``, step for step.

slt's kernels and devinterp 2.0.1's ``SGMCMC`` optimizers are run side by side on the same
loss, from the same point, with noise from generators seeded alike, and must trace the same
path. Skipped without devinterp (it is in the test extra, so the suite's command runs it).
"""

import importlib.util
import inspect

import pytest
import torch

from slt.samplers import rmsprop_sgld, sgld

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("devinterp") is None, reason="needs devinterp 2.0.1"
)

EPS, NBETA, GAMMA, STEPS = 1e-3, 50.0, 3.0, 25


def batch_loss(w):
    """A non-quadratic mean loss whose gradient varies along the path."""
    return (torch.sin(w) * w.square()).mean() + 0.25 * w.pow(4).mean()


def devinterp_path(method, **kwargs):
    """devinterp's optimizer ``method`` at lr = EPS, nbeta = NBETA and, unless ``kwargs``
    say otherwise, localization = GAMMA."""
    from devinterp.optim import SGMCMC

    w = torch.linspace(-1.0, 1.5, 40).requires_grad_()
    optimizer = getattr(SGMCMC, method)(
        [w], lr=EPS, nbeta=NBETA, **{"localization": GAMMA, **kwargs}
    )
    generator = torch.Generator().manual_seed(7)
    path = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        batch_loss(w).backward()
        optimizer.step(noise_generator=generator)
        path.append(w.detach().clone())
    return torch.stack(path)


def slt_path(kernel_factory, **kwargs):
    """slt's kernel at step_size = EPS, nbeta = NBETA and, unless ``kwargs`` say otherwise,
    localization = GAMMA, around w* = the start."""
    w0 = torch.linspace(-1.0, 1.5, 40)
    kernel = kernel_factory(
        step_size=EPS, nbeta=NBETA, center={"w": w0}, **{"localization": GAMMA, **kwargs}
    )
    state = kernel.init({"w": w0.clone()})
    generator = torch.Generator().manual_seed(7)

    def grad_fn(params, batch):
        w = params["w"].detach().requires_grad_()
        loss = batch_loss(w)
        (grad,) = torch.autograd.grad(loss, w)
        return [grad], loss.detach()

    path = []
    for _ in range(STEPS):
        state, _ = kernel.step(state, grad_fn, None, generator)
        path.append(state.params["w"].clone())
    return torch.stack(path)


def test_sgld_is_devinterps_sgld_with_lr_as_step_size():
    theirs = devinterp_path("sgld")
    ours = slt_path(sgld)
    moved = (theirs[-1] - theirs[0]).abs().max()
    assert moved > 0.1  # the path goes somewhere: the comparison is not of constants
    torch.testing.assert_close(ours, theirs)  # float32 rounding: the lerp is slt's own


def test_rmsprop_sgld_adapting_throughout_is_devinterps_rmsprop_sgld():
    # devinterp adapts its preconditioner at every step; slt does so only for adapt_steps
    # (estimate_llc: the burn-in), so the kernels agree with adapt_steps=None
    theirs = devinterp_path("rmsprop_sgld", alpha=0.99, eps=0.1)
    ours = slt_path(rmsprop_sgld, alpha=0.99, eps=0.1, adapt_steps=None)
    torch.testing.assert_close(ours, theirs)
    held = slt_path(rmsprop_sgld, alpha=0.99, eps=0.1, adapt_steps=5)
    assert (held[-1] - theirs[-1]).abs().max() > 1e-3


def test_devinterps_default_localization_is_none_where_slts_is_one():
    # SGMCMC.sgld's (and sample()'s) default localization is 0: an unlocalized chain, which
    # slt runs with localization=0 and not with its default γ = 1
    from devinterp.optim import SGMCMC
    from devinterp.slt.sampling import sample

    default = inspect.signature(SGMCMC.sgld).parameters["localization"].default
    assert default == inspect.signature(sample).parameters["localization"].default == 0.0
    theirs = devinterp_path("sgld", localization=default)
    torch.testing.assert_close(slt_path(sgld, localization=0.0), theirs)
    assert (slt_path(sgld, localization=1.0)[-1] - theirs[-1]).abs().max() > 1e-4


def test_the_readme_table_gives_devinterps_own_defaults():
    from devinterp.optim import SGMCMC
    from devinterp.slt.config import SAMPLING_METHODS
    from devinterp.slt.sampling import sample

    defaults = {k: p.default for k, p in inspect.signature(sample).parameters.items()}
    assert {k: defaults[k] for k in (
        "num_chains", "num_draws", "num_burnin_steps", "batch_size", "init_seed",
        "num_init_loss_batches", "match_sampling_input_ids_across_chains", "localization",
        "sampling_method",
    )} == {
        "num_chains": 4, "num_draws": 200, "num_burnin_steps": 0, "batch_size": 32,
        "init_seed": 100, "num_init_loss_batches": 32,
        "match_sampling_input_ids_across_chains": True, "localization": 0.0,
        "sampling_method": "sgmcmc_sgld",
    }  # fmt: skip
    assert set(SAMPLING_METHODS) == {"sgmcmc_sgld", "rmsprop_sgld"}
    assert inspect.signature(SGMCMC.sgld).parameters["nbeta"].default == 1.0
