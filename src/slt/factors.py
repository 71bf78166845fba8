"""∇L_B(w*) of a model's ``nn.Linear`` layers from per-sample factors recorded once at w*.

For a linear layer y = x Wᵀ + b in a model that treats its samples independently, the
gradient of a batch-mean loss L_B = (1/|B|) Σ_{i∈B} ℓ_i is

    ∇_W L_B = (1/|B|) Σ_{i∈B} δ_i x_iᵀ,    ∇_b L_B = (1/|B|) Σ_{i∈B} δ_i,

with x_i the layer's input for sample i and δ_i = ∂ℓ_i/∂y_i (summed over a sample's
positions when the layer sees more than one per sample, as in a sequence). At w* both
factors are fixed, so one forward and backward pass over the data records them for every
sample, and the gradient control variate's ∇L_B(w*) on any batch becomes a gather and one
matrix product per layer (:meth:`LinearFactors.gradient_sums`) instead of a forward and a
backward pass: about a third of the pass's arithmetic (the weight gradients; no forward, no
input gradients), the same numbers up to rounding. The table holds, per sample, every
layer's input (with a 1 for the bias) and output (times its positions): n · Σ (in + 1 + out)
numbers, against the n · d of a per-sample gradient table, so it fits where that one does
not.

It applies only where every sampled parameter is the ``weight`` or ``bias`` of an
``nn.Linear`` (exactly that class) called once per forward pass, and the result is checked
against autograd on a batch the pass did not see whole; anything else (attention, layer
norms, convolutions, shared weights, samples that interact) keeps the pass at w*.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from slt.posterior import Posterior

BUDGET = 2**23  # numbers the table may hold: 32 MB of float32 (why: README, "Factors of Linear")
_CHUNK = 256  # samples per pass while recording
_CHECK = 64  # samples in the batch the recorded factors are checked on


@dataclass(frozen=True)
class _Layer:
    """Where one layer's factors lie in a row of the table, and which gradients it gives."""

    x: slice  # columns of x_i (positions × (in [+ 1 for the bias])); empty without the weight
    delta: slice  # columns of δ_i (positions × out)
    positions: int
    width_in: int  # in, plus 1 where the bias is sampled (a column of ones)
    weight: int | None  # index of the weight among the sampled parameters, or None
    bias: int | None  # index of the bias, or None


class LinearFactors:
    """The (n, F) table of every sample's layer inputs and output gradients at w*."""

    def __init__(self, table: torch.Tensor, layers: Sequence[_Layer], count: int):
        self.table = table  # (n, F)
        self.layers = list(layers)
        self.count = count  # sampled parameters

    def gradient_sums(self, index: torch.Tensor | slice) -> list[torch.Tensor]:
        """|B| ∇L_B(w*) of every sampled parameter, for the samples ``index``: (b,) or a
        slice for one batch, or (chain, b) for one batch per chain (each result then has a
        leading chain dimension). Sums, not means: the caller scales them by 1/|B| in the
        operation that uses them (a separate division costs ~15 µs a tensor at these
        sizes)."""
        if isinstance(index, slice):  # an unshuffled loader's batch
            rows = self.table[index]
            lead, size = (), rows.shape[0]
        else:
            lead, size = index.shape[:-1], index.shape[-1]
            rows = self.table.index_select(0, index.reshape(-1))  # (chain · b, F)
        product = torch.bmm if lead else torch.mm
        out: list[torch.Tensor | None] = [None] * self.count
        for layer in self.layers:
            span = size * layer.positions
            delta = rows[:, layer.delta].reshape(*lead, span, -1)
            if layer.weight is None:  # the bias alone
                out[layer.bias] = delta.sum(-2)
                continue
            x = rows[:, layer.x].reshape(*lead, span, layer.width_in)
            grad = product(delta.mT, x)  # (..., out, in [+ 1]): Σ_i δ_i [x_i, 1]ᵀ
            if layer.bias is None:
                out[layer.weight] = grad
            else:
                out[layer.weight], out[layer.bias] = grad[..., :-1], grad[..., -1]
        return out  # type: ignore[return-value]


def linear_owners(posterior: Posterior) -> dict[str, dict[str, int]] | None:
    """{layer name: {"weight"/"bias": index among the sampled parameters}}, or None where a
    sampled parameter is not the weight or bias of an ``nn.Linear``."""
    modules = dict(posterior.reference.named_modules())
    owners: dict[str, dict[str, int]] = {}
    for i, name in enumerate(posterior.names):
        layer, _, attr = name.rpartition(".")
        if type(modules.get(layer)) is not torch.nn.Linear or attr not in ("weight", "bias"):
            return None
        owners.setdefault(layer, {})[attr] = i
    return owners


def record_factors(posterior: Posterior, tensors: Sequence[torch.Tensor]) -> LinearFactors | None:
    """The factors of every sample in ``tensors`` (the dataset, in index order) at w*, or
    None where they do not apply, would exceed :data:`BUDGET` numbers, or fail the check."""
    owners = linear_owners(posterior)
    if owners is None:
        return None
    n = tensors[0].shape[0]
    modules = dict(posterior.reference.named_modules())
    seen: dict[str, list] = {}

    def hook(name, _module, args, output):
        seen.setdefault(name, []).append((args, output))
        return output.clone()  # what the model goes on with: an in-place ReLU must not alter
        # the output whose gradient δ is (autograd would then give the gradient after it)

    handles = [modules[name].register_forward_hook(partial(hook, name)) for name in owners]
    table, layers, first = None, [], []
    try:
        for start in range(0, n, _CHUNK):
            chunk = [t[start : start + _CHUNK].clone() for t in tensors]  # not the user's
            size = chunk[0].shape[0]
            seen.clear()
            with torch.enable_grad():
                loss = posterior.loss(posterior.reference, chunk)
            calls = [seen.get(name, []) for name in owners]
            if any(len(c) != 1 or len(c[0][0]) != 1 for c in calls):
                return None  # a layer called twice, never, or with more than one input
            inputs = [c[0][0][0].detach() for c in calls]
            outputs = [c[0][1] for c in calls]
            if any(x.dim() < 2 or x.shape[0] != size for x in inputs):
                return None  # no leading sample dimension
            with torch.enable_grad():
                deltas = torch.autograd.grad(loss, outputs, allow_unused=True)
            shapes = [(x.shape[1:], y.shape[1:]) for x, y in zip(inputs, outputs)]
            if table is None:
                first = shapes
                layers, width = _layout(owners, inputs, outputs)
                if n * width > BUDGET:
                    return None
                table = torch.empty(n, width, dtype=inputs[0].dtype, device=inputs[0].device)
            if shapes != first:
                return None  # a sample's shape that changes from chunk to chunk
            rows = table[start : start + size]
            for layer, x, y, d in zip(layers, inputs, outputs, deltas):
                d = torch.zeros_like(y) if d is None else d
                rows[:, layer.delta] = (d * size).reshape(size, -1)  # δ_i = size · ∂L/∂y_i
                if layer.weight is not None:
                    block = rows[:, layer.x].view(size, layer.positions, layer.width_in)
                    block[..., : x.shape[-1]] = x.reshape(size, layer.positions, -1)
                    if layer.bias is not None:
                        block[..., -1] = 1.0
    finally:
        for handle in handles:
            handle.remove()
    factors = LinearFactors(table, layers, len(posterior.names))
    return factors if _agrees(posterior, tensors, factors) else None


def _layout(owners, inputs, outputs) -> tuple[list[_Layer], int]:
    layers, width = [], 0
    for attrs, x, y in zip(owners.values(), inputs, outputs):
        positions = x.shape[1:-1].numel()
        width_in = (x.shape[-1] + ("bias" in attrs)) if "weight" in attrs else 0
        x_cols = slice(width, width + positions * width_in)
        width = x_cols.stop
        delta = slice(width, width + positions * y.shape[-1])
        width = delta.stop
        layers.append(_Layer(x_cols, delta, positions, width_in, attrs.get("weight"),
                             attrs.get("bias")))  # fmt: skip
    return layers, width


def _agrees(posterior: Posterior, tensors, factors: LinearFactors) -> bool:
    """Whether the factors give autograd's ∇L_B(w*) on a batch of samples spread over the
    recording's chunks (a model whose samples interact, or a weight also used outside its
    layer, fails here): each parameter within 1e-4 of its norm."""
    n = tensors[0].shape[0]  # a batch that is never a whole chunk, even when n <= _CHUNK
    index = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: min(_CHECK, n // 2)]
    index = index.to(factors.table.device)
    batch = [t[index] for t in tensors]
    with torch.enable_grad():
        loss = posterior.loss(posterior.reference, batch)
        expected = posterior._grads(loss, list(posterior.center.values()))
    for got, want in zip(factors.gradient_sums(index), expected):
        got = got / index.shape[0]
        if got.shape != want.shape:
            return False
        error, scale = torch.linalg.vector_norm(got - want), torch.linalg.vector_norm(want)
        if float(error) > 1e-4 * float(scale) + 1e-7:
            return False
    return True
