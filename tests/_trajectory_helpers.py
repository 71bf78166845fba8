"""Importable model factories and losses for the trajectory tests (workers import them)."""

import math
import os
import time

import torch

_CONST = 0.5 * math.log(2 * math.pi)


def nll(model, batch):
    """Gaussian NLL with σ = 1, written at module level so that it pickles."""
    x, y = batch
    return 0.5 * (model(x) - y).square().sum(1).mean() + y.shape[1] * _CONST


def linear():
    return torch.nn.Linear(3, 1)


def counting_linear():
    """``linear()``, and one line in $SLT_TEST_COUNTER per call (which process, when)."""
    with open(os.environ["SLT_TEST_COUNTER"], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(float(os.environ.get("SLT_TEST_SLEEP", "0")))
    return torch.nn.Linear(3, 1)


def data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-0.5], [0.25]]) + 0.3 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def loader(n=256, seed=0):
    return torch.utils.data.DataLoader(data(n, seed), batch_size=32, shuffle=True)


def checkpoints(folder, num=6, seed=0):
    """``num`` state dicts along a gradient-descent path, saved as step_<k>.pt files."""
    torch.manual_seed(seed)
    model = linear()
    ds = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    paths = []
    for k in range(num):
        path = os.path.join(folder, f"step_{10 * k:05d}.pt")
        torch.save(model.state_dict(), path)
        paths.append(path)
        for _ in range(10):
            opt.zero_grad()
            nll(model, ds.tensors).backward()
            opt.step()
    return paths


def dies_on_positive_bias(model, batch):
    """``nll``, but the worker process exits at once where the model's bias is positive
    (as a worker killed for memory would)."""
    if float(model.bias) > 0:
        os._exit(3)
    return nll(model, batch)


def picky_nll(model, batch):
    """``nll``, refusing a model whose first weight is 123 (a failure at run time)."""
    if float(model.weight.detach().flatten()[0]) == 123.0:
        raise ValueError("picky_nll refuses this checkpoint")
    return nll(model, batch)
