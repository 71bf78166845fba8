"""The benchmark's cases: two zoo cases with a known λ, two ReLU MLPs and a small transformer
without one.

Every case is a σ = 1 Gaussian regression on n = 4096 samples, so one per-sample negative
log-likelihood serves slt and devinterp alike (see ``_devinterp.py``).

- ``regular``: linear regression ``zoo.regular(10)``, d = 10, λ = d/2 = 5.
- ``rrr``: reduced rank regression ``zoo.reduced_rank(20, 10, 10, 3)``, d = 300, λ = 65, m = 1
  (Aoyagi & Watanabe 2005).
- ``mlp10k``: a ReLU MLP 20-100-80-1 (d = 10 261) fitted to a smaller random ReLU teacher
  (20-16-1, output variance ≈ 1) plus N(0, 1) noise, trained to near a minimum by 500
  full-batch Adam steps from a fixed seed (~5 s) before anything is timed. With d > n it
  fits part of the noise, as trained networks do; there is no known λ.
- ``mlp1m``: a ReLU MLP 256-1024-768-1 (d = 1 051 137) at its own random initialisation,
  with data y = f_w(x) + N(0, 1) drawn from that same network (realizable: w is the true
  parameter, though with d ≫ n not a minimum of L_n, so its λ̂ is only compared between
  methods). Training a 1M-parameter network here would cost more than the benchmark.
- ``transformer``: a 2-layer transformer encoder (d_model 32, 4 heads, feed-forward 64) over
  sequences of 8 vectors of 8 features, mean-pooled to one output (d = 17 409), realizable
  at its seeded initialisation like ``mlp1m``: PyTorch's own attention, LayerNorm and ReLU
  feed-forward layers, in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import slt
from slt import zoo

N = 4096
SIGMA = 1.0


@dataclass(frozen=True)
class Case:
    """A model at w*, its data and loss, and the known learning coefficient λ (or None)."""

    name: str
    model: torch.nn.Module
    dataset: torch.utils.data.TensorDataset  # (x (n, in), y (n, out))
    loss_fn: Callable
    lam: float | None

    @property
    def n(self) -> int:
        return len(self.dataset)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def loader(self, batch_size: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, shuffle=True)


def from_zoo(case: zoo.Case) -> Case:
    return Case(case.name, case.model, case.dataset, case.loss_fn, float(case.lam))


def relu_mlp(widths: Sequence[int], generator: torch.Generator) -> torch.nn.Sequential:
    """Linear layers ``widths[0] -> ... -> widths[-1]`` with ReLU between, initialised
    (PyTorch's default uniform ±1/√fan_in) from ``generator``."""
    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layer = torch.nn.Linear(fan_in, fan_out)
        bound = fan_in**-0.5
        with torch.no_grad():
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
        layers += [layer, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).eval()


def _data(teacher: torch.nn.Module, n_in: int, generator: torch.Generator):
    x = torch.randn(N, n_in, generator=generator)
    with torch.no_grad():
        y = teacher(x)
        y = y + SIGMA * torch.randn(y.shape, generator=generator)
    return torch.utils.data.TensorDataset(x, y)


def teacher_student(
    widths: Sequence[int], teacher_widths: Sequence[int], *, train_steps: int, seed: int = 0
) -> Case:
    """A student MLP ``widths`` trained by full-batch Adam (cosine schedule from 3e-3) on data
    from a teacher MLP whose output layer is scaled by 5, so signal and noise variance are
    both about 1."""
    generator = torch.Generator().manual_seed(seed)
    teacher = relu_mlp(teacher_widths, generator)
    with torch.no_grad():  # signal variance ≈ 1, the noise's
        teacher[-1].weight.mul_(5.0)
        teacher[-1].bias.mul_(5.0)
    data = _data(teacher, widths[0], generator)
    student = relu_mlp(widths, generator)
    loss_fn = slt.gaussian_nll(SIGMA)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, train_steps)
    for _ in range(train_steps):
        opt.zero_grad()
        loss_fn(student, data.tensors).backward()
        opt.step()
        sched.step()
    student.zero_grad(set_to_none=True)
    name = f"relu_mlp({'-'.join(map(str, widths))})"
    return Case(name, student, data, loss_fn, None)


def realizable_mlp(widths: Sequence[int], *, seed: int = 0) -> Case:
    """An MLP ``widths`` at a random w with data drawn from the model at that w."""
    generator = torch.Generator().manual_seed(seed)
    model = relu_mlp(widths, generator)
    data = _data(model, widths[0], generator)
    name = f"relu_mlp({'-'.join(map(str, widths))})"
    return Case(name, model, data, slt.gaussian_nll(SIGMA), None)


class SequenceRegressor(torch.nn.Module):
    """A sequence of ``features``-vectors → a linear embedding to ``width`` → a
    ``torch.nn.TransformerEncoder`` (``layers`` post-norm layers, ``heads`` heads, feed-forward
    2·width, no dropout) → the mean over positions → one output."""

    def __init__(self, features: int, width: int, heads: int, layers: int):
        super().__init__()
        self.embed = torch.nn.Linear(features, width)
        layer = torch.nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0,
                                                 batch_first=True)  # fmt: skip
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def realizable_transformer(*, length: int = 8, features: int = 8, width: int = 32, heads: int = 4,
                           layers: int = 2, seed: int = 0) -> Case:  # fmt: skip
    """A :class:`SequenceRegressor` at its seeded default initialisation, with data drawn from
    it (inputs (n, length, features) standard normal, y = f_w(x) + N(0, σ²)), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # PyTorch's initialisers draw from the global generator
        torch.manual_seed(seed)
        model = SequenceRegressor(features, width, heads, layers).eval()
    x = torch.randn(N, length, features, generator=generator)
    with torch.no_grad():
        y = model(x)
        y = y + SIGMA * torch.randn(y.shape, generator=generator)
    data = torch.utils.data.TensorDataset(x, y)
    name = f"transformer(d_model={width},heads={heads},layers={layers},seq={length})"
    return Case(name, model, data, slt.gaussian_nll(SIGMA), None)


CASES: dict[str, Callable[[], Case]] = {
    "regular": lambda: from_zoo(zoo.regular(10)),
    "rrr": lambda: from_zoo(zoo.reduced_rank(20, 10, 10, 3)),
    "mlp10k": lambda: teacher_student((20, 100, 80, 1), (20, 16, 1), train_steps=500),
    "mlp1m": lambda: realizable_mlp((256, 1024, 768, 1)),
    "transformer": realizable_transformer,
}


def build(name: str) -> Case:
    """The case called ``name`` (a key of :data:`CASES`), built from its fixed seed."""
    if name not in CASES:
        raise ValueError(f"case must be one of {sorted(CASES)}, got {name!r}")
    return CASES[name]()
