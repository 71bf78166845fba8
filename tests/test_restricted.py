"""Weight-refined LLC: sampling only some parameters (``params=``)."""

import pytest
import torch

import slt
from slt import theory, zoo


class TwoBlocks(torch.nn.Module):
    """f(x) = [B A x_a, W x_b]: two independent regressions, K = K_a + K_b."""

    def __init__(self):
        super().__init__()
        self.rrr = zoo.linear_network((5, 3, 4), 2)  # M=5, H=3, N=4, r=2: λ = 8
        self.reg = zoo.linear_network((3, 2), 2)  # regular 3 -> 2: λ = 3

    def forward(self, x):
        return torch.cat([self.rrr(x[:, :5]), self.reg(x[:, 5:])], dim=1)


def _data(model, n=4096, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    with torch.no_grad():
        y = model(x) + zoo.orthogonal_noise(x, 6, 1.0, g)
    return torch.utils.data.TensorDataset(x, y)


def test_blocks_match_their_own_theory_and_add_up():
    model = TwoBlocks()
    loader = torch.utils.data.DataLoader(_data(model), batch_size=128, shuffle=True)
    lam_a = theory.reduced_rank(5, 4, 3, 2).lam
    lam_b = theory.regular(6).lam
    kw = dict(step_size=5e-5, localization=1.0, num_chains=4, num_draws=1500, num_burnin=500,
              progress=False)  # fmt: skip
    whole = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), **kw)
    a = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), params="rrr.*", **kw)
    b = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), params=["reg.0.weight"], **kw)
    assert (a.num_params, b.num_params, whole.num_params) == (27, 6, 33)
    assert abs(a.llc / float(lam_a) - 1) < 0.10, str(a)
    assert abs(b.llc / float(lam_b) - 1) < 0.10, str(b)
    assert abs(whole.llc / float(lam_a + lam_b) - 1) < 0.10, str(whole)
    # sum rule: the parts add up to the whole within their Monte Carlo errors
    se = (a.mcse**2 + b.mcse**2 + whole.mcse**2) ** 0.5
    assert abs(a.llc + b.llc - whole.llc) < 4 * se + 0.05 * whole.llc


def test_predicate_and_errors():
    model = TwoBlocks()
    loader = torch.utils.data.DataLoader(_data(model, n=256), batch_size=64)
    res = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), num_chains=1, num_draws=5,
                           num_burnin=0, params=lambda name, p: name.startswith("reg"),
                           progress=False)  # fmt: skip
    assert res.num_params == 6
    with pytest.raises(ValueError, match="match no trainable parameter"):
        slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), params="nothing.*", progress=False)
    with pytest.raises(TypeError, match="params"):
        slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), params=[1, 2], progress=False)


def test_held_parameters_do_not_move_and_user_model_is_untouched():
    model = TwoBlocks()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = torch.utils.data.DataLoader(_data(model, n=256), batch_size=64)
    from slt.sampling import build_posterior, sample_llc

    posterior = build_posterior(model, loader, slt.gaussian_nll(1.0), n=None, nbeta=None,
                                localization=1.0, control_variate="gradient", sampler="sgld",
                                params="reg.*")  # fmt: skip
    sample_llc(posterior, sampler="sgld", step_size=1e-3, num_chains=1, num_draws=20,
               num_burnin=0, seed=0)  # fmt: skip
    moved = {k: not torch.equal(v, before[k]) for k, v in posterior.module.state_dict().items()}
    assert moved == {"rrr.0.weight": False, "rrr.1.weight": False, "reg.0.weight": True}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
