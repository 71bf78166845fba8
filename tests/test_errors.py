"""Bad inputs to :func:`slt.estimate_llc` fail early with an error that names the argument
and the value (STYLE.md, principle 10), and diverging chains are reported, not averaged.

The divergence tests are deterministic by construction: a loss that overflows for every
chain, or a ``loss_fn`` that counts its calls and turns NaN inside one chain only (the
call pattern is fixed by :func:`slt.chains.run_chains`: one pass over the data at w*,
then the chains one after another, one call per step with ``control_variate="none"`` and
``acceptance_every=0``).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import slt

N, BATCH = 256, 64


def make_data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    y = x @ torch.tensor([[1.0], [-1.0]]) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def make_model() -> torch.nn.Module:
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    return model


def run(**overrides) -> slt.LLCResult:
    """``estimate_llc`` on a tiny regular model, with any argument overridden."""
    args = dict(
        model=make_model(),
        loader=DataLoader(make_data(), batch_size=BATCH, shuffle=True),
        loss_fn=slt.gaussian_nll(1.0),
        step_size=1e-3,
        num_chains=1,
        num_draws=5,
        num_burnin=0,
        progress=False,
    )
    args.update(overrides)
    return slt.estimate_llc(args.pop("model"), args.pop("loader"), args.pop("loss_fn"), **args)


def raises_naming(exc, argument: str, value=None):
    """``pytest.raises`` that also checks the message names ``argument`` (and ``value``)."""
    pattern = re.escape(argument)
    if value is not None:
        pattern += r".*" + re.escape(repr(value))
    return pytest.raises(exc, match=pattern)


# --- the loader ---------------------------------------------------------------------


def test_empty_dataloader():
    empty = TensorDataset(torch.empty(0, 2), torch.empty(0, 1))
    with raises_naming(ValueError, "loader") as err:
        run(loader=DataLoader(empty, batch_size=BATCH))
    assert "no batches" in str(err.value)


def test_empty_list():
    with raises_naming(ValueError, "loader") as err:
        run(loader=[])
    assert "no batches" in str(err.value)


def test_one_shot_iterator_loader():
    x, y = make_data().tensors
    batches = [(x[:128], y[:128]), (x[128:], y[128:])]
    with raises_naming(TypeError, "loader") as err:
        run(loader=iter(batches))
    assert "one-shot iterator" in str(err.value)
    # the same batches as a list are fine
    assert math.isfinite(run(loader=batches).llc)


# --- loss_fn --------------------------------------------------------------------------


def test_loss_fn_not_callable():
    with raises_naming(TypeError, "loss_fn", "mse"):
        run(loss_fn="mse")


def test_a_criterion_passed_as_loss_fn_gets_a_note():
    # F.mse_loss(model, batch): torch's TypeError named neither loss_fn nor slt.supervised
    for criterion in (torch.nn.functional.cross_entropy, torch.nn.functional.mse_loss):
        with pytest.raises((TypeError, AttributeError)) as info:
            run(loss_fn=criterion)
        assert any("slt.supervised(F.cross_entropy)" in note for note in info.value.__notes__)


def test_float64_data_into_a_float32_model_gets_a_note():
    data = TensorDataset(*(t.double() for t in make_data().tensors))
    with pytest.raises(RuntimeError) as info:
        run(loader=DataLoader(data, batch_size=BATCH))
    assert any("model's parameters are torch.float32, the batch's floating tensors "
               "torch.float64" in note for note in info.value.__notes__)  # fmt: skip


def test_llc_vs_nbeta_refuses_nbeta_and_diagnose_no_chains():
    with pytest.raises(TypeError, match=r"takes no nbeta= \(got 10\): pass nbetas=\[10, ...\]"):
        slt.llc_vs_nbeta(make_model(), DataLoader(make_data(), batch_size=BATCH),
                         slt.gaussian_nll(1.0), nbeta=10, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="at least one chain, got shape \\(0, 10\\)"):
        slt.diagnostics.diagnose(np.zeros((0, 10)))


def test_a_low_ess_with_a_step_too_large_is_not_told_to_take_a_larger_one():
    # the ESS warning advised a larger step_size next to warnings that it was too large
    res = run(step_size=0.05, num_chains=3, num_draws=30, num_burnin=20)  # ESS < 3 × 30
    assert any("too large" in w for w in res.warnings)
    ess = [w for w in res.warnings if w.startswith("low effective sample size")]
    assert ess and all("not a larger step_size" in w for w in ess)
    small = run(step_size=1e-3, num_chains=2, num_draws=20)  # 40 draws: low ESS, no alarm
    ess = [w for w in small.warnings if w.startswith("low effective sample size")]
    assert ess and "or a larger step_size" in ess[0]


def test_loss_fn_returns_non_tensor():
    def loss_fn(model, batch):
        return slt.gaussian_nll(1.0)(model, batch).item()

    with raises_naming(TypeError, "loss_fn") as err:
        run(loss_fn=loss_fn)
    assert "torch.Tensor" in str(err.value) and "float" in str(err.value)


def test_loss_fn_returns_non_scalar():
    def loss_fn(model, batch):
        x, y = batch
        return (model(x) - y).square().squeeze(1)  # per-sample, not the batch mean

    with raises_naming(ValueError, "loss_fn") as err:
        run(loss_fn=loss_fn)
    assert f"shape {(BATCH,)}" in str(err.value)


def test_loss_fn_returns_integer_tensor():
    def loss_fn(model, batch):
        return torch.tensor(3)

    with raises_naming(ValueError, "loss_fn") as err:
        run(loss_fn=loss_fn)
    assert "torch.int64" in str(err.value)


def test_nan_loss_at_center_from_model():
    model = make_model()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with raises_naming(ValueError, "loss at w*") as err:
        run(model=model)
    msg = str(err.value)
    assert "nan" in msg and "model" in msg and "loss_fn" in msg


def test_inf_loss_at_center_from_loss_fn():
    def loss_fn(model, batch):
        return slt.gaussian_nll(1.0)(model, batch) + float("inf")

    with raises_naming(ValueError, "loss at w*") as err:
        run(loss_fn=loss_fn)
    assert "inf" in str(err.value) and "loss_fn" in str(err.value)


# --- numeric options --------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0.0, -1e-3, float("nan"), float("inf"), "1e-3", True])
def test_bad_step_size(value):
    with raises_naming(ValueError, "step_size", value):
        run(step_size=value)


@pytest.mark.parametrize("value", [1, 0, -5])
def test_n_below_two(value):
    with raises_naming(ValueError, "n must be an integer >= 2", value):
        run(n=value)


def test_dataset_of_one_sample_is_too_small():
    with raises_naming(ValueError, "n must be an integer >= 2", 1):
        run(loader=DataLoader(make_data(1), batch_size=1))


@pytest.mark.parametrize("value", [0, 0.0, -10.0, float("nan"), float("inf")])
def test_bad_nbeta(value):
    with raises_naming(ValueError, "nbeta", value):
        run(nbeta=value)


@pytest.mark.parametrize("value", [-1.0, -1e-9, float("nan"), float("inf")])
def test_bad_localization(value):
    with raises_naming(ValueError, "localization", value):
        run(localization=value)


def test_zero_localization_is_allowed():
    assert run(localization=0.0).localization == 0.0


def test_nbeta_not_a_number():
    with raises_naming((TypeError, ValueError), "nbeta", "abc"):
        run(nbeta="abc")


@pytest.mark.parametrize("value", ["1.0", None])
def test_localization_not_a_number(value):
    with raises_naming((TypeError, ValueError), "localization", value):
        run(localization=value)


def test_numpy_integer_n_is_accepted():
    assert run(n=np.int64(N)).n == N


def test_numpy_float32_step_size_is_accepted():
    assert run(step_size=np.float32(1e-3)).step_size == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "argument, value",
    [
        ("num_chains", 0),
        ("num_chains", 1.5),
        ("num_chains", True),
        ("num_chains", "2"),
        ("num_draws", 0),
        ("num_draws", -3),
        ("num_draws", 1.5),
        ("num_draws", True),
        ("num_burnin", -1),
        ("num_burnin", 1.5),
        ("num_burnin", False),
        ("seed", -1),
        ("seed", 0.5),
    ],
)
def test_bad_counts(argument, value):
    with raises_naming(ValueError, f"{argument} must be an integer", value):
        run(**{argument: value})


def test_numpy_integer_counts_are_accepted():
    res = run(num_chains=np.int64(2), num_draws=np.int32(3), num_burnin=np.int64(0))
    assert (res.num_chains, res.num_draws) == (2, 3)
    assert res.trace.shape == (2, 3)


# --- choices and types --------------------------------------------------------------------


def test_unknown_sampler():
    with raises_naming(ValueError, "sampler", "adam") as err:
        run(sampler="adam")
    assert "rmsprop_sgld" in str(err.value) and "sgld" in str(err.value)


def test_unknown_control_variate():
    with raises_naming(ValueError, "control_variate", "both") as err:
        run(control_variate="both")
    assert all(cv in str(err.value) for cv in ("loss", "gradient", "none"))


def test_model_not_a_module():
    with raises_naming(TypeError, "model") as err:
        run(model=lambda x: x)
    assert "torch.nn.Module" in str(err.value) and "function" in str(err.value)


def test_no_trainable_parameters():
    model = make_model()
    model.requires_grad_(False)
    with raises_naming(ValueError, "model") as err:
        run(model=model)
    assert "requires_grad" in str(err.value)


def test_module_without_parameters():
    with raises_naming(ValueError, "model") as err:
        run(model=torch.nn.Identity(), loss_fn=lambda m, b: (m(b[0]) - b[1]).square().mean())
    assert "no trainable parameters" in str(err.value)


@pytest.mark.parametrize("sigma", [0, 0.0, -1.0, float("nan"), float("inf"), "1"])
def test_gaussian_nll_bad_sigma(sigma):
    with raises_naming(ValueError, "sigma", sigma):
        slt.gaussian_nll(sigma)


# --- divergence -------------------------------------------------------------------------


class Quartic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))


def quartic_loss(model, batch):
    return (model.w**4).sum()


def test_all_chains_diverge_raises():
    # at w = 1 the drift is -(ε/2) nβ 4w³ ≈ -920 w: |w| then grows like w³ to inf/NaN
    with pytest.raises(slt.DivergenceError, match=r"all 3 chains diverged") as err:
        run(model=Quartic(), loss_fn=quartic_loss, step_size=10.0, num_chains=3, num_draws=20)
    msg = str(err.value)
    assert "step_size=10" in msg and "step size" in msg and "smaller" in msg


def test_divergence_after_the_first_check_window():
    # num_steps > _CHECK_EVERY: the chain stops early at the first check, still reported
    with pytest.raises(slt.DivergenceError, match="step_size"):
        run(model=Quartic(), loss_fn=quartic_loss, step_size=10.0, num_chains=2, num_draws=300)


class NaNInChain:
    """gaussian_nll(1), except NaN in chain ``bad`` for steps ``after`` <= t < ``until``.

    With ``control_variate="none"`` and ``acceptance_every=0`` the calls are: one per batch
    of the pass at w*, then ``num_steps`` per chain, chain 0 first. ``loss * nan`` has NaN
    gradients (the chain's parameters become NaN); ``loss + nan`` has finite ones (a
    transient NaN loss).
    """

    def __init__(
        self,
        *,
        batches_at_center: int,
        num_steps: int,
        bad: int | None,
        after: int,
        until: int | None = None,
        transient: bool = False,
    ):
        until = num_steps if until is None else until
        start = batches_at_center + (bad if bad is not None else -10) * num_steps
        self.first_bad, self.end_bad = start + after, start + until
        self.transient = transient
        self.calls = 0
        self.inner = slt.gaussian_nll(1.0)

    def __call__(self, model, batch):
        loss = self.inner(model, batch)
        if self.first_bad <= self.calls < self.end_bad:
            loss = loss + float("nan") if self.transient else loss * float("nan")
        self.calls += 1
        return loss


def run_with_bad_chain(bad: int | None, num_chains: int, **kw):
    num_burnin, num_draws = 5, 20
    loss_fn = NaNInChain(
        batches_at_center=N // BATCH, num_steps=num_burnin + num_draws, bad=bad, after=8, **kw
    )
    res = run(
        loss_fn=loss_fn,
        control_variate="none",
        acceptance_every=0,
        step_size=1e-3,
        num_chains=num_chains,
        num_burnin=num_burnin,
        num_draws=num_draws,
        seed=11,
    )
    # the call pattern the construction relies on
    assert loss_fn.calls == N // BATCH + num_chains * (num_burnin + num_draws)
    return res


def test_one_diverged_chain_is_excluded_and_reported():
    res = run_with_bad_chain(bad=1, num_chains=3)
    clean = run_with_bad_chain(bad=None, num_chains=3)

    assert res.diverged.tolist() == [False, True, False]
    assert np.isnan(res.llc_per_chain[1])
    assert np.isfinite(res.llc_per_chain[[0, 2]]).all()
    assert res.llc == float(np.mean(res.llc_per_chain[[0, 2]]))
    assert res.llc == float(np.nanmean(res.llc_per_chain[~res.diverged]))
    assert math.isfinite(res.llc) and math.isfinite(res.llc_std)
    assert res.llc_std == pytest.approx(np.std(res.llc_per_chain[[0, 2]], ddof=1) / math.sqrt(2))
    # the other chains are exactly what they are without the bad one
    assert not clean.diverged.any()
    np.testing.assert_array_equal(res.llc_per_chain[[0, 2]], clean.llc_per_chain[[0, 2]])
    np.testing.assert_array_equal(res.trace[[0, 2]], clean.trace[[0, 2]])
    assert np.isnan(res.trace[1, 8 - 5 :]).all()  # NaN from step 8 (burn-in 5 cut off)
    # named in the warnings and in the summary
    notes = [w for w in res.warnings if "diverged" in w]
    assert len(notes) == 1 and "chain(s) 1 " in notes[0] and "step size" in notes[0]
    assert "diverged" in str(res) and "2/3 chains" in str(res)
    assert not [w for w in clean.warnings if "diverged" in w]


def test_only_one_usable_chain():
    res = run_with_bad_chain(bad=0, num_chains=2)
    assert res.diverged.tolist() == [True, False]
    assert res.llc == res.llc_per_chain[1]
    assert math.isnan(res.llc_std)
    assert any("chain(s) 0 " in w for w in res.warnings)
    assert any("only one usable chain" in w for w in res.warnings)


def test_transient_nan_loss_marks_the_chain_diverged():
    # NaN loss at steps 8-9 of chain 1 only, finite gradients: the chain's last loss is
    # finite again, but its mean is not, so it must still be excluded
    res = run_with_bad_chain(bad=1, num_chains=3, until=10, transient=True)
    clean = run_with_bad_chain(bad=None, num_chains=3)
    assert np.isnan(res.trace[1, 3:5]).all() and np.isfinite(res.trace[1, 5:]).all()
    assert res.diverged.tolist() == [False, True, False]
    assert res.llc == float(np.mean(res.llc_per_chain[[0, 2]]))
    np.testing.assert_array_equal(res.llc_per_chain[[0, 2]], clean.llc_per_chain[[0, 2]])


# --- arguments of the other entry points --------------------------------------------------


def test_a_seed_torch_cannot_take_is_named():
    loader = DataLoader(make_data(), batch_size=BATCH, shuffle=True)
    with raises_naming(ValueError, "seed", 2**64):
        slt.estimate_llc(torch.nn.Linear(2, 1), loader, slt.gaussian_nll(1.0), seed=2**64,
                         progress=False)  # fmt: skip


@pytest.mark.parametrize(
    ("argument", "value"), [("sampler", "foo"), ("sampler", ["sgld"]), ("step_sizes", 1e-4),
                            ("step_sizes", "auto"), ("step_sizes", []), ("step_sizes", [1e-4, -1])]
)  # fmt: skip
def test_calibrate_names_a_bad_argument(argument, value):
    loader = DataLoader(make_data(), batch_size=BATCH, shuffle=True)
    with pytest.raises(ValueError, match=re.escape(argument)):
        slt.calibrate(torch.nn.Linear(2, 1), loader, slt.gaussian_nll(1.0), progress=False,
                      **{argument: value})  # fmt: skip


def test_a_sampler_that_is_not_a_string_is_named():
    loader = DataLoader(make_data(), batch_size=BATCH, shuffle=True)
    with raises_naming(ValueError, "sampler", ["sgld"]):
        slt.estimate_llc(torch.nn.Linear(2, 1), loader, slt.gaussian_nll(1.0), sampler=["sgld"])


def test_gaussian_nll_takes_numpy_and_tensor_scalars_but_not_a_bool():
    for sigma in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        assert slt.gaussian_nll(sigma).sigma == 0.5
    with raises_naming(ValueError, "sigma", True):
        slt.gaussian_nll(True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_refused_with_what_to_do(dtype):
    # its SGLD moves and loss differences round away (bfloat16 read λ̂ 4x too large)
    loader = DataLoader(make_data(), batch_size=BATCH, shuffle=True)
    model = torch.nn.Linear(2, 1).to(dtype)
    with pytest.raises(ValueError, match=rf"{dtype}.*model\.float\(\)"):
        slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), progress=False)
