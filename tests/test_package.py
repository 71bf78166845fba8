"""Package-level promises: a light core import, a frozen result that serialises."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import slt


def test_core_import_pulls_no_extras():
    extras = "('matplotlib', 'typer', 'xarray')"
    code = f"import sys, slt; print(sorted(m for m in {extras} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _result():
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    return slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), num_chains=2, num_draws=20,
                            num_burnin=5, progress=False)  # fmt: skip


def test_result_is_frozen_and_serialises():
    res = _result()
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.llc = 0.0
    back = json.loads(json.dumps(res.to_dict()))
    assert back["llc"] == res.llc
    np.testing.assert_array_equal(np.array(back["trace"]), res.trace)
    assert res.trace.shape == res.trace_at_center.shape == res.llc_trace.shape == (2, 20)
    assert res.llc == pytest.approx(res.llc_per_chain.mean())
    np.testing.assert_allclose(res.llc_per_chain, res.llc_trace.mean(1))
