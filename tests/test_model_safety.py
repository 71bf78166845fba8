"""The user's objects are sacred (STYLE.md, principle 10) and randomness is passed in
(principle 2): ``estimate_llc`` never changes the model, its mode, its gradients, the data
or the global random state, and the same seed gives bit-identical numbers.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

import slt

sys.path.insert(0, str(Path(__file__).parent))
from _models import PairDataset  # noqa: E402

N, BATCH = 256, 64
SAMPLERS = ("sgld", "rmsprop_sgld")
CONTROL_VARIATES = ("loss", "gradient", "none")


def make_tensors(n: int = N):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-1.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def make_net() -> torch.nn.Module:
    """A small network with BatchNorm and Dropout, so that its mode matters."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(8, 1),
    )


def estimate(model, loader, **overrides) -> slt.LLCResult:
    kwargs = dict(step_size=1e-4, num_chains=2, num_draws=20, num_burnin=5, progress=False)
    kwargs.update(overrides)
    return slt.estimate_llc(model, loader, slt.gaussian_nll(0.5), **kwargs)


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grad": {
            k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()
        },
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "ids": {k: id(p) for k, p in model.named_parameters()},
    }


def assert_same(before: dict, after: dict):
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        w = after["state"][k]
        assert v.dtype == w.dtype and torch.equal(v, w), k
    for k, g in before["grad"].items():
        h = after["grad"][k]
        assert (g is None) == (h is None), k
        assert g is None or torch.equal(g, h), k
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["ids"] == after["ids"]


# --- the model ----------------------------------------------------------------------------


@pytest.mark.parametrize("control_variate", CONTROL_VARIATES)
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_is_not_mutated(mode, sampler, control_variate):
    x, y = make_tensors()
    model = make_net()
    model(x[:32])  # a train-mode forward: BatchNorm running stats move off their init
    assert int(model[1].num_batches_tracked) == 1
    model.train(mode == "train")
    model[0].bias.requires_grad_(False)  # a frozen parameter
    before = snapshot(model)
    assert all(g is None for g in before["grad"].values())

    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the train-mode warning has its own test
        res = estimate(model, loader, sampler=sampler, control_variate=control_variate)

    assert np.isfinite(res.llc_per_chain).all()
    assert res.num_params == sum(p.numel() for p in model.parameters()) - 8  # frozen bias
    assert_same(before, snapshot(model))


def test_existing_gradients_are_kept():
    x, y = make_tensors()
    model = make_net().eval()
    slt.gaussian_nll(0.5)(model, (x, y)).backward()
    before = snapshot(model)
    assert all(g is not None and g.abs().sum() > 0 for g in before["grad"].values())
    for control_variate in CONTROL_VARIATES:
        estimate(
            model,
            DataLoader(TensorDataset(x, y), batch_size=BATCH),
            control_variate=control_variate,
        )
        assert_same(before, snapshot(model))


def test_mixed_submodule_modes_are_kept():
    x, y = make_tensors()
    model = make_net().train()
    model[3].eval()  # Dropout in eval, BatchNorm in train
    before = snapshot(model)
    with pytest.warns(UserWarning, match="training mode"):
        estimate(model, DataLoader(TensorDataset(x, y), batch_size=BATCH))
    assert_same(before, snapshot(model))
    assert model[1].training and not model[3].training


def test_train_mode_warns_and_records_the_warning():
    x, y = make_tensors()
    model = make_net().train()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    with pytest.warns(UserWarning, match="training mode") as record:
        res = estimate(model, loader)
    ours = [w for w in record if "training mode" in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert message in res.warnings
    assert "(1, 3)" in message and "eval mode" in message  # names the layers
    assert ours[0].filename == __file__  # stacklevel points at the caller
    assert model.training


def test_eval_mode_does_not_warn():
    x, y = make_tensors()
    model = make_net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = estimate(model, DataLoader(TensorDataset(x, y), batch_size=BATCH))
    assert not [w for w in res.warnings if "training mode" in w]


def test_train_mode_is_evaluated_as_eval_mode():
    # the posterior runs on an eval-mode copy: train and eval give identical numbers
    x, y = make_tensors()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_train = estimate(make_net().train(), loader, seed=4)
    in_eval = estimate(make_net().eval(), loader, seed=4)
    np.testing.assert_array_equal(in_train.trace, in_eval.trace)
    assert in_train.init_loss == in_eval.init_loss


# --- the data -------------------------------------------------------------------------


def loaders(x, y):
    return {
        "tensor_shuffled": DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True),
        "tensor_sequential": DataLoader(TensorDataset(x, y), batch_size=BATCH),
        "custom_shuffled": DataLoader(PairDataset(x, y), batch_size=BATCH, shuffle=True),
        "list": [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)],
    }


@pytest.mark.parametrize(
    "kind", ["tensor_shuffled", "tensor_sequential", "custom_shuffled", "list"]
)
def test_data_is_not_mutated(kind):
    x, y = make_tensors()
    x0, y0 = x.clone(), y.clone()
    estimate(make_net().eval(), loaders(x, y)[kind], control_variate="gradient")
    assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize(
    "kind", ["tensor_shuffled", "custom_shuffled", "tensor_sequential", "list"]
)
def test_global_rng_is_untouched(kind):
    x, y = make_tensors()
    loader = loaders(x, y)[kind]
    model = make_net().train()  # Dropout in the user's mode must not draw either
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate(model, loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_global_rng_is_untouched_with_a_custom_sampler():
    x, y = make_tensors()
    sampler = WeightedRandomSampler(
        torch.ones(N),
        N,
        replacement=False,  # each sample once
        generator=torch.Generator().manual_seed(1),
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, sampler=sampler)
    model = make_net().eval()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    estimate(model, loader)
    assert torch.equal(torch.get_rng_state(), state)


# --- reproducibility ----------------------------------------------------------------------


def tiny_problem():
    x, y = make_tensors()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model, DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)


@pytest.mark.parametrize("control_variate", CONTROL_VARIATES)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_numbers(sampler, control_variate):
    model, loader = tiny_problem()
    kw = dict(sampler=sampler, control_variate=control_variate, step_size=1e-3)
    torch.manual_seed(1)  # the global generator's state must not matter
    first = estimate(model, loader, seed=7, **kw)
    torch.manual_seed(2)
    second = estimate(model, loader, seed=7, **kw)
    other = estimate(model, loader, seed=8, **kw)

    np.testing.assert_array_equal(first.trace, second.trace)
    np.testing.assert_array_equal(first.trace_at_center, second.trace_at_center)
    np.testing.assert_array_equal(first.llc_per_chain, second.llc_per_chain)
    assert first.llc == second.llc and first.init_loss == second.init_loss
    assert np.isfinite(first.trace).all()
    # different seeds: every chain's draws differ, and so do its minibatches
    assert (first.trace != other.trace).any(axis=1).all()
    assert not np.array_equal(first.llc_per_chain, other.llc_per_chain)
    if control_variate != "none":
        assert (first.trace_at_center != other.trace_at_center).any(axis=1).all()
    # chains differ from each other within one run
    assert not np.array_equal(first.trace[0], first.trace[1])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_chain_does_not_depend_on_num_chains(sampler):
    model, loader = tiny_problem()
    two = estimate(model, loader, num_chains=2, sampler=sampler, step_size=1e-3, seed=5)
    three = estimate(model, loader, num_chains=3, sampler=sampler, step_size=1e-3, seed=5)
    np.testing.assert_array_equal(three.trace[:2], two.trace)
    np.testing.assert_array_equal(three.trace_at_center[:2], two.trace_at_center)
    np.testing.assert_array_equal(three.llc_per_chain[:2], two.llc_per_chain)
    assert not np.array_equal(three.trace[2], three.trace[1])


# --- the evidence functions: the caller's global random state ------------------------------


class AlwaysDropout(torch.nn.Module):
    """Dropout in forward whatever the mode: user code that draws from the global state."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.unused = torch.nn.Dropout(0.1)  # in train mode: slt warns that it samples eval

    def forward(self, x):
        return self.linear(torch.nn.functional.dropout(x, 0.1, training=True))


def evidence_calls():
    small = dict(num_chains=2, num_draws=8, num_burnin=4, progress=False)
    return {
        "wbic": lambda m, dl, loss, seed: slt.wbic(m, dl, loss, num_anneal=1, seed=seed, **small),
        "waic": lambda m, dl, loss, seed: slt.waic(m, dl, loss, num_anneal=1, seed=seed, **small),
        "free_energy": lambda m, dl, loss, seed: slt.free_energy(
            m, dl, loss, num_rungs=3, num_prior_draws=4, seed=seed, **small
        ),
    }


@pytest.mark.parametrize("name", ["wbic", "waic", "free_energy"])
def test_evidence_leaves_the_global_rng_alone_and_repeats_with_its_seed(name):
    """A model that draws from torch's global random state (always-on dropout) neither
    advances the caller's state nor makes the numbers depend on it, and the model (its
    state, mode and gradients) and the data are left as they were: as estimate_llc."""
    x, y = make_tensors(64)
    x0, y0 = x.clone(), y.clone()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    call = evidence_calls()[name]
    values = []
    for caller_seed in (1234, 99):
        torch.manual_seed(caller_seed)
        model = AlwaysDropout()
        torch.nn.init.constant_(model.linear.weight, 0.3)
        torch.nn.init.constant_(model.linear.bias, 0.0)
        model.linear.weight.grad = torch.ones_like(model.linear.weight)
        before, state = snapshot(model), torch.get_rng_state()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = call(model, loader, slt.gaussian_nll(0.5), 3)
        assert torch.equal(torch.get_rng_state(), state)
        assert_same(before, snapshot(model))
        # its warning (a train-mode Dropout) points at the caller, not inside slt
        assert caught and all(w.filename == __file__ for w in caught)
        assert torch.equal(x, x0) and torch.equal(y, y0)
        values.append(json_numbers(res.to_dict()))
    assert values[0] == values[1]


def json_numbers(d: dict) -> list:
    """The finite numbers of a result's to_dict (not its timing), in order."""
    out = []
    for key, value in d.items():
        if key in ("seconds", "settings"):
            continue
        arr = np.asarray(value) if not isinstance(value, dict) else np.asarray([])
        if arr.dtype.kind in "fiu":
            out.extend(np.nan_to_num(arr, nan=-1.0).ravel().tolist())
    return out


def test_hooks_on_the_model_run_during_sampling_on_its_copies():
    """As the README says: a hook is part of the function sampled (the private copies keep
    it), so one that records activations records every step's."""
    x, y = make_tensors()
    model = torch.nn.Sequential(torch.nn.Linear(3, 1))
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(module))
    res = estimate(model, DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True))
    assert len(calls) >= res.num_chains * (20 + 5)
    assert all(module is not model[0] for module in calls)  # copies, not the user's layer


def test_a_calibration_grid_leaves_the_global_rng_alone():
    """slt.calibrate over a grid of localizations runs chains of its own at each point (as
    well as a calibration each): those ran on the caller's global random state."""
    x, y = make_tensors(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    torch.manual_seed(5)
    model = AlwaysDropout().eval()
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slt.calibrate(model, loader, slt.gaussian_nll(0.5), localization=[1.0, 4.0],
                      num_draws=20, num_burnin=10, grid_draws=20, grid_chains=2,
                      num_candidates=2, progress=False)  # fmt: skip
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_an_estimate_called_without_autograd_runs_as_outside_it(mode):
    # a caller evaluating under no_grad or inference_mode: slt turns autograd on for its
    # own passes, and the caller's mode is left as it was
    x, y = make_tensors(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = torch.nn.Linear(3, 1)
    kw = dict(num_chains=2, num_draws=20, num_burnin=5, progress=False)
    outside = estimate(model, loader, chain_method="loop")
    cal = slt.calibrate(model, loader, slt.gaussian_nll(0.5), num_draws=20,
                        num_candidates=1, progress=False)  # fmt: skip
    with mode():
        inside = estimate(model, loader, chain_method="loop")
        cal_inside = slt.calibrate(model, loader, slt.gaussian_nll(0.5), num_draws=20,
                                   num_candidates=1, progress=False)  # fmt: skip
        waic = slt.waic(model, loader, slt.gaussian_nll(0.5), num_anneal=0, **kw)
        assert not torch.is_grad_enabled()
    assert np.array_equal(inside.trace, outside.trace)
    assert cal_inside.step_size == cal.step_size
    assert np.isfinite(waic.waic)


class _Bag(torch.nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6, sparse=sparse)
        self.out = torch.nn.Linear(6, 11)

    def forward(self, tokens):
        return self.out(self.emb(tokens).mean(1))


@pytest.mark.parametrize("control_variate", ["gradient", "none"])
def test_a_sparse_embedding_samples_as_its_dense_twin(control_variate):
    # nn.Embedding(sparse=True) has sparse gradients: the samplers' in-place updates raised
    # "add(sparse, dense) is not supported" / "copy_() between dense and sparse"
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (64, 4), generator=gen)
    labels = torch.randint(0, 11, (64,), generator=gen)
    loader = DataLoader(TensorDataset(tokens, labels), batch_size=16, shuffle=True)
    dense, sparse = _Bag(False), _Bag(True)
    sparse.load_state_dict(dense.state_dict())
    loss_fn = slt.supervised(torch.nn.functional.cross_entropy)
    kw = dict(num_chains=2, num_draws=20, num_burnin=0, control_variate=control_variate,
              progress=False)  # fmt: skip
    want = slt.estimate_llc(dense, loader, loss_fn, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor vmap's "file us an issue" from the table at w*
        got = slt.estimate_llc(sparse, loader, loss_fn, **kw)
    assert got.chain_method == "loop"
    np.testing.assert_allclose(got.trace, want.trace, rtol=1e-5)
