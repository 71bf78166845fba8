"""Weight-refined LLC: sampling only some parameters (``params=``)."""

import threading

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
    # the result says what was sampled (its d alone did not)
    assert (whole.params, b.params) == (None, ("reg.0.weight",))
    assert a.params == ("rrr.0.weight", "rrr.1.weight") and "params: rrr.0.weight" in str(a)
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


class _Tied(torch.nn.Module):
    """An encoder and a decoder sharing one weight; the decoder keeps its own bias."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(4, 4)
        self.dec = torch.nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def _selected(model, params, dims=(4, 4)):
    """The names a posterior of ``model`` samples under ``params`` (inputs, outputs: dims)."""
    from slt.sampling import build_posterior

    x = torch.randn(64, dims[0], generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, torch.zeros(64, dims[1]))
    post = build_posterior(model, torch.utils.data.DataLoader(data, batch_size=16),
                           slt.gaussian_nll(1.0), n=None, nbeta=None, localization=1.0,
                           control_variate="gradient", sampler="sgld", params=params)  # fmt: skip
    return post.names


def test_a_tied_weight_is_selected_by_any_of_its_names():
    # named_parameters() drops a tied weight's second name: "dec.*" sampled dec.bias alone,
    # and "dec.weight" was refused as matching nothing
    model = _Tied()
    assert _selected(model, "dec.*") == ["enc.weight", "dec.bias"]
    assert _selected(model, "dec.weight") == ["enc.weight"]
    assert _selected(model, lambda name, p: name.startswith("dec.")) == ["enc.weight", "dec.bias"]
    shared = torch.nn.Sequential(*[torch.nn.Linear(4, 4)] * 3)  # one block registered 3 times
    assert _selected(shared, "1.*") == ["0.weight", "0.bias"]


def test_the_models_own_submodule_or_parameters_select_them():
    # params=model.head was called as a predicate (a module is callable); [head.weight] was
    # refused with the whole tensor printed
    model = TwoBlocks()
    assert _selected(model, model.reg, (8, 6)) == ["reg.0.weight"]
    assert _selected(model, [model.rrr[1].weight], (8, 6)) == ["rrr.1.weight"]
    with pytest.raises(ValueError, match="not parameters of model"):
        _selected(model, torch.nn.Linear(2, 2), (8, 6))
    with pytest.raises(ValueError, match="the sampling copy's parameters"):
        _selected(model, lambda name, p: any(p is q for q in model.reg.parameters()), (8, 6))


def test_an_exact_name_with_brackets_is_not_a_glob():
    model = torch.nn.Module()
    model.heads = torch.nn.ModuleDict({"out[0]": torch.nn.Linear(3, 1)})
    model.forward = lambda x: model.heads["out[0]"](x)
    assert _selected(model, "heads.out[0].weight", (3, 1)) == ["heads.out[0].weight"]


def test_complex_parameters_and_uncopyable_models_are_named():
    # a complex weight was sampled at half the temperature (λ̂ 0.50 against 1.0); the
    # hook-based weight_norm failed inside deepcopy with torch's own words
    class Complex(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.0 + 1.0j))
            self.lin = torch.nn.Linear(2, 1)

        def forward(self, x):
            return self.lin(x) + self.w.real

    with pytest.raises(ValueError, match="complex sampled parameters \\(w\\)"):
        _selected(Complex(), None, (2, 1))
    with pytest.warns(FutureWarning):
        normed = torch.nn.utils.weight_norm(torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match="model cannot be copied .*weight"):
        _selected(normed, None, (3, 1))
    locked = torch.nn.Sequential(torch.nn.Linear(2, 1))
    locked[0].lock = threading.Lock()  # was torch's "cannot pickle '_thread.lock' object"
    with pytest.raises(TypeError, match=r"attribute 0\.lock \(lock\) does not copy"):
        _selected(locked, None, (2, 1))


@pytest.mark.parametrize(
    "layer",
    [torch.nn.MultiheadAttention(4, 2, dropout=0.5), torch.nn.InstanceNorm1d(4,
     track_running_stats=True), torch.nn.RReLU()],
)  # fmt: skip
def test_train_mode_layers_beyond_batchnorm_and_dropout_are_warned(layer):
    from slt.posterior import _train_mode_layers

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), layer).train()
    assert _train_mode_layers(model) == ["1"]
    assert _train_mode_layers(model.eval()) == []


def test_batchnorm_without_running_statistics_is_not_warned_as_train_mode():
    # eval mode changes nothing for it (batch statistics either way): the warning said the
    # posterior is evaluated in eval mode, as if that made a difference
    from slt.posterior import _train_mode_layers

    kept = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).train()
    batch_stats = torch.nn.BatchNorm1d(4, track_running_stats=False)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), batch_stats).train()
    assert _train_mode_layers(kept) == ["1"] and _train_mode_layers(plain) == []


def test_a_parametrized_weight_given_as_params_names_its_originals():
    layer = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(3, 2))
    model = torch.nn.Sequential(layer, torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"select those \(0\.parametrizations\.weight\.original0"):
        _selected(model, [model[0].weight], (3, 1))
