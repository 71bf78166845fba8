"""compile=True: the compiled vmap step equals the eager one and compiles once per shape.

Tolerances: both paths draw the same batches and noise; only the order of float32
operations differs (fused by the compiler), ~1e-7 relative per step, so traces of a few
dozen steps agree to rtol 1e-5, and λ̂ = nβ × their mean difference (nβ ≈ 46 here) to
1e-4 absolute.
"""

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import slt
from slt import compiled, zoo


def _estimate(case, model=None, loss_fn=None, **kw):
    args = dict(num_chains=3, num_draws=30, num_burnin=0, step_size=5e-5, acceptance_every=0,
                progress=False, chain_method="vmap") | kw  # fmt: skip
    model = case.model if model is None else model
    return slt.estimate_llc(model, case.loader(64), loss_fn or case.loss_fn, **args)


def _assert_same(a, b):
    np.testing.assert_allclose(b.trace, a.trace, rtol=1e-5)
    np.testing.assert_allclose(b.trace_at_center, a.trace_at_center, rtol=1e-5)
    np.testing.assert_allclose(b.llc_per_chain, a.llc_per_chain, rtol=1e-3, atol=1e-4)


def _checkpoint(model, shift):
    """A copy of ``model`` with every parameter moved: the next training checkpoint."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(shift)
    return other


def test_compiled_equals_eager_and_a_checkpoint_compiles_nothing():
    case = zoo.deep_linear((3, 2, 2), 1, n=256)
    _assert_same(_estimate(case), _estimate(case, compile=True))
    # a new model object with other values, a new loss object, another step size: same graph
    later = _checkpoint(case.model, 0.05)
    before = compiled.compilations
    fast = _estimate(case, later, slt.gaussian_nll(1.0), step_size=1e-4, compile=True)
    assert compiled.compilations == before
    assert (fast.chain_method, fast.compiled) == ("vmap", True)
    assert "chains vmap, compiled" in str(fast)
    _assert_same(_estimate(case, later, step_size=1e-4), fast)


def test_a_shared_submodule_compiles_and_equals_eager():
    # functional_call leaves a swapped-in tensor in a submodule registered twice: inductor
    # failed on it ("Cannot access storage of TensorWrapper") before swapped_call
    sys.path.insert(0, str(Path(__file__).parent))
    from _models import SharedBlock

    torch.manual_seed(0)
    model = SharedBlock().eval()
    x = torch.randn(256, 3)
    with torch.no_grad():
        y = model(x) + 0.5 * torch.randn(256, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64,
                                         shuffle=True)  # fmt: skip
    args = dict(num_chains=3, num_draws=30, num_burnin=0, step_size=5e-5, acceptance_every=0,
                progress=False, chain_method="vmap")  # fmt: skip
    eager = slt.estimate_llc(model, loader, slt.gaussian_nll(0.5), **args)
    fast = slt.estimate_llc(model, loader, slt.gaussian_nll(0.5), compile=True, **args)
    assert fast.compiled
    _assert_same(eager, fast)


def test_frozen_parameters_come_from_the_current_model():
    # weight-refined LLC: layer 1 is held at w*; the cached graph must read the checkpoint's
    case = zoo.deep_linear((3, 2, 2), 1, n=256)
    _assert_same(_estimate(case, params="0.*"), _estimate(case, params="0.*", compile=True))
    later = _checkpoint(case.model, 0.3)
    before = compiled.compilations
    fast = _estimate(case, later, params="0.*", compile=True)
    assert compiled.compilations == before
    _assert_same(_estimate(case, later, params="0.*"), fast)


@pytest.mark.parametrize(
    ("sampler", "control_variate"), [("rmsprop_sgld", "gradient"), ("sgld", "loss"),
                                     ("sgld", "none")],
)  # fmt: skip
def test_compiled_equals_eager_for_each_sampler_and_control_variate(sampler, control_variate):
    case = zoo.deep_linear((3, 2, 2), 1, n=256)
    kw = dict(sampler=sampler, control_variate=control_variate)
    _assert_same(_estimate(case, **kw), _estimate(case, compile=True, **kw))


@pytest.fixture
def low_recompile_limit():
    """torch's recompile limit at 1 (default 8), so that hitting it takes one recompile."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=1):
        yield


def test_a_loss_with_other_constants_compiles_afresh_rather_than_reuse(low_recompile_limit):
    # a σ sweep shared one entry, recompiled under torch's guards up to their limit (8), and
    # then every new σ was a hard FailOnRecompileLimitHit; the limit at 1 shows it at once
    case = zoo.deep_linear((3, 2, 2), 1, n=256)
    _estimate(case, compile=True)
    before = compiled.compilations
    other = slt.gaussian_nll(2.0)  # the same type: its σ is in the key
    _assert_same(_estimate(case, loss_fn=other), _estimate(case, loss_fn=other, compile=True))
    assert compiled.compilations == before + 1
    _estimate(case, loss_fn=slt.gaussian_nll(2.0), compile=True)  # an equal σ: reused
    assert compiled.compilations == before + 1


def test_an_entry_at_the_recompile_limit_is_compiled_afresh(low_recompile_limit):
    # closures cannot be summarized: they share an entry, which torch recompiles per value
    case = zoo.deep_linear((3, 2, 2), 1, n=256)

    def scaled(sigma):
        return lambda model, batch: case.loss_fn(model, batch) / sigma**2

    _estimate(case, loss_fn=scaled(1.5), compile=True)
    other = scaled(2.5)
    _assert_same(_estimate(case, loss_fn=other), _estimate(case, loss_fn=other, compile=True))


def test_compile_refuses_what_it_cannot_do(tmp_path):
    case = zoo.regular(2, n=128)
    for method in ("loop", "auto"):
        with pytest.raises(ValueError, match="compile=True needs chain_method"):
            _estimate(case, chain_method=method, compile=True)
    with pytest.raises(TypeError, match="compile must be True or False"):
        _estimate(case, compile="yes")
    with pytest.raises(ValueError, match="chain_method"):
        _estimate(case, sampler="sgnht", compile=True)
    with pytest.raises(ValueError, match="chain_method"):
        _estimate(case, record="per_sample", record_path=tmp_path / "r.h5", compile=True)
    assert not (tmp_path / "r.h5").exists()  # refused before the recording file is made


def test_compiled_step_probes_the_acceptance_as_the_eager_step_does():
    # the compiled step keeps no plain gradient at w_t, so its probe takes one more pass
    # there; the acceptances must be the eager step's, at the same steps, up to rounding
    case = zoo.deep_linear((3, 2, 2), 1, n=256)
    eager = _estimate(case, acceptance_every=7, step_size=2e-3)
    fast = _estimate(case, acceptance_every=7, step_size=2e-3, compile=True)
    _assert_same(eager, fast)
    probed = np.isfinite(eager.acceptance)
    assert probed[:, ::7].all() and probed.sum() == 3 * 5  # steps 0, 7, ..., 28
    np.testing.assert_array_equal(np.isfinite(fast.acceptance), probed)
    np.testing.assert_allclose(fast.acceptance[probed], eager.acceptance[probed], atol=1e-4)
    assert eager.mala_acceptance < 0.999  # a step size at which the probe sees something


@pytest.mark.parametrize("control_variate", ["gradient", "loss"])
def test_compiled_reads_the_tables_the_eager_step_reads(control_variate, monkeypatch):
    # micro-batches: ∇L_B(w*) and L_B(w*) from their table; the loss control variate: L_B(w*)
    # from the per-sample losses. The graph then has no pass at w*.
    monkeypatch.setattr(compiled, "_COMPILED", type(compiled._COMPILED)())
    case = zoo.deep_linear((3, 2, 2), 1, n=256)
    kw = dict(control_variate=control_variate, microbatch=16)
    _assert_same(_estimate(case, **kw), _estimate(case, compile=True, **kw))
    (key,) = compiled._COMPILED
    assert key[4] == ("read" if control_variate == "gradient" else "none")
    # the next checkpoint: its own table at its own w*, the same graph
    later = _checkpoint(case.model, 0.05)
    before = compiled.compilations
    fast = _estimate(case, later, compile=True, **kw)
    assert compiled.compilations == before
    _assert_same(_estimate(case, later, **kw), fast)
