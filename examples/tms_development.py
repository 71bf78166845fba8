"""Stagewise development in a toy model of superposition, seen through λ̂.

A toy model of superposition (Elhage et al. 2022) in the setting of Chen, Lau, Mendel,
Wei & Murfet, "Dynamical versus Bayesian phase transitions in a toy model of
superposition" (arXiv 2310.06301): c = 6 sparse features compressed into 2 hidden
dimensions, x̂ = ReLU(Wᵀ W x + b), W ∈ R^{2×6}, b ∈ R^6. Each input has exactly one
non-zero feature, uniform on [0, 1]. The loss is the Gaussian NLL with σ² = 1/2, i.e. the
summed squared error ‖x - x̂‖² plus a constant, so n L_n is the scale that the free
energy F_n ≈ n L_n + λ log n uses.

Trained by SGD from a small initialization, the model learns features in stages: a
plateau near W = 0, a drop to a configuration with four features (a 4-gon with two
half-learned columns), a second plateau, and a drop to a 5-gon. This script

1. trains it (seed 5: one of the 16 seeds we tried whose run has two well separated
   plateaus; most seeds pass their intermediate k-gons within a few hundred steps) and
   saves a checkpoint every 800 steps;
2. estimates λ̂ at every checkpoint with :func:`slt.llc_trajectory` (resumable: kill it and
   rerun, finished checkpoints are kept);
3. finds change points in λ̂(t) and L_n(t) with :func:`slt.detect_transitions`;
4. builds the regular k-gon critical points (k = 2..6), measures their loss and λ̂, and
   places them on a phase diagram of F_n against n (:func:`slt.phase_diagram`);
5. writes ``tms_development.png`` and ``table.txt`` to ``--out``.

    python examples/tms_development.py                # about 25 s on 2 cores
    python examples/tms_development.py --executor process

Every number comes from seeds set here, so a rerun reproduces the picture and the table.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path

import numpy as np
import torch

import slt
from slt.phase import phase_diagram
from slt.plots_development import plot_phase_diagram, plot_trajectory
from slt.trajectory import llc_trajectory
from slt.transitions import detect_transitions

C, HIDDEN, N = 6, 2, 1000  # features, hidden dimensions, training samples
SIGMA2 = 0.5  # Gaussian noise variance: NLL = ‖x - x̂‖² + const
LLC_SETTINGS = dict(step_size=1e-3, localization=30.0, num_chains=4, num_draws=500,
                    num_burnin=200, seed=0)  # fmt: skip


class TMS(torch.nn.Module):
    """x̂ = ReLU(Wᵀ W x + b) with W (hidden, features), b (features,)."""

    def __init__(self, features: int = C, hidden: int = HIDDEN):
        super().__init__()
        self.W = torch.nn.Parameter(torch.zeros(hidden, features))
        self.b = torch.nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W.T @ self.W + self.b)


def nll(model: torch.nn.Module, batch) -> torch.Tensor:
    """Mean per-sample Gaussian NLL, σ² = 1/2 (module level, so process pools can pickle it)."""
    x, y = batch
    sq = (model(x) - y).square().sum(1)
    return (sq / (2 * SIGMA2)).mean() + y.shape[1] * 0.5 * math.log(2 * math.pi * SIGMA2)


def sample(n: int, generator: torch.Generator, features: int = C) -> torch.Tensor:
    """n inputs with one non-zero feature each, chosen uniformly, its value U[0, 1]."""
    which = torch.randint(features, (n,), generator=generator)
    x = torch.zeros(n, features)
    x[torch.arange(n), which] = torch.rand(n, generator=generator)
    return x


def train(out: Path, *, seed: int, steps: int, every: int, lr: float = 0.01, batch: int = 32,
          init_scale: float = 0.003) -> torch.Tensor:  # fmt: skip
    """SGD from W ~ N(0, init_scale²), b = 0; a checkpoint every ``every`` steps."""
    g = torch.Generator().manual_seed(seed)
    x = sample(N, g)
    model = TMS()
    with torch.no_grad():
        model.W.copy_(torch.randn(HIDDEN, C, generator=g) * init_scale)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out.mkdir(parents=True, exist_ok=True)
    for step in range(steps + 1):
        if step % every == 0:
            torch.save(model.state_dict(), out / f"step_{step:06d}.pt")
        i = torch.randint(N, (batch,), generator=g)
        loss = nll(model, (x[i], x[i]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x


def kgon(k: int, x: torch.Tensor, *, steps: int = 1500) -> TMS:
    """The regular k-gon of least loss on ``x``: columns 0..k-1 of W at radius r on a
    regular k-gon, the others zero; bias b₊ on represented features, b₀ on the others.

    (r, b₊, b₀) are fitted by Adam within this symmetric family. On the population loss
    these are the k-gon critical points of Chen et al. (2023, section 3, with the
    unrepresented biases positive); on n = 1,000 samples the symmetry holds only
    approximately, so the gradient of L_n there is small, not zero (the table shows λ̂;
    a saddle shows up as λ̂ ≤ 0).
    """
    angles = 2 * math.pi * torch.arange(k) / k
    unit = torch.cat([torch.stack([angles.cos(), angles.sin()]), torch.zeros(HIDDEN, C - k)], 1)
    represented = torch.arange(C) < k
    p = torch.tensor([0.0, 0.0, 0.08], requires_grad=True)  # log r, b₊, b₀
    opt = torch.optim.Adam([p], lr=0.01)
    model = TMS()

    def build(p):
        return unit * p[0].exp(), torch.where(represented, p[1], p[2])

    for _ in range(steps):
        W, b = build(p)
        loss = (torch.relu(x @ W.T @ W + b) - x).square().sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        W, b = build(p)
        model.W.copy_(W)
        model.b.copy_(b)
    return model


def figure(traj, transitions, diagram, checkpoints: Path):
    """λ̂ and loss with stages (left), phase diagram (right), W at the end of each stage."""
    import matplotlib.pyplot as plt

    from slt.checkpoints import load_state_dict

    stages = transitions.stages
    fig = plt.figure(figsize=(13, 8.5))
    grid = fig.add_gridspec(3, max(len(stages), 3) * 2, height_ratios=[1, 1, 0.9])
    half = grid.ncols // 2 + 1
    ax_llc = fig.add_subplot(grid[0, :half])
    ax_loss = fig.add_subplot(grid[1, :half], sharex=ax_llc)
    plot_trajectory(traj, transitions, ax=(ax_llc, ax_loss))
    plot_phase_diagram(diagram, ax=fig.add_subplot(grid[:2, half + 1 :]))
    width = grid.ncols // len(stages)
    for i, (_, last) in enumerate(stages):
        ax = fig.add_subplot(grid[2, i * width : (i + 1) * width], aspect="equal")
        W = load_state_dict(checkpoints / f"step_{last:06d}.pt")["W"]
        for j in range(W.shape[1]):
            ax.plot([0, W[0, j]], [0, W[1, j]], "-o", ms=3, color=f"C{j}")
        ax.set(xlim=(-1.4, 1.4), ylim=(-1.4, 1.4), xticks=[], yticks=[])
        ax.set_title(f"stage {i + 1}: W at step {last}", fontsize=9)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tms-out"))
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--every", type=int, default=800)
    parser.add_argument("--executor", default="serial", choices=["serial", "process", "ray"])
    parser.add_argument("--overwrite", action="store_true",
                        help="discard a results file written with other settings")  # fmt: skip
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(1)  # an 18-parameter model: one thread is fastest
    start = time.perf_counter()

    x = train(args.out / "checkpoints", seed=args.seed, steps=args.steps, every=args.every)
    trained = time.perf_counter()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x), batch_size=100,
                                         shuffle=True)  # fmt: skip
    traj = llc_trajectory(
        args.out / "checkpoints", functools.partial(TMS, C, HIDDEN), loader, nll,
        results=args.out / "trajectory.jsonl", executor=args.executor,
        overwrite=args.overwrite, progress=args.progress, **LLC_SETTINGS,
    )  # fmt: skip
    measured = time.perf_counter()
    transitions = detect_transitions(traj)

    test = sample(100_000, torch.Generator().manual_seed(12345))
    candidates, saddles = {}, {}
    for k in range(2, C + 1):
        model = kgon(k, x)
        res = slt.estimate_llc(model, loader, nll, progress=False,
                               **{**LLC_SETTINGS, "num_draws": 1000})  # fmt: skip
        with torch.no_grad():
            loss = nll(model, (test, test)).item()
        entry = dict(loss=loss, llc=res.llc, llc_std=res.se, train_loss=res.init_loss,
                     warnings=len(res.warnings))  # fmt: skip
        # λ̂ is defined at a local minimum; at a saddle the chains descend and λ̂ ≤ 0
        (candidates if res.llc > 2 * res.se else saddles)[f"{k}-gon"] = entry
    diagram = phase_diagram(candidates, np.geomspace(10, 3000, 400))
    done = time.perf_counter()

    fig = figure(traj, transitions, diagram, args.out / "checkpoints")
    fig.savefig(args.out / "tms_development.png", dpi=110)
    table = "\n".join([
        str(traj), "", str(transitions), "", "k-gon critical points (loss on 100,000 fresh "
        "samples; λ̂ with the trajectory's settings on the training data)",
        f"{'candidate':>10} {'L (test)':>10} {'L_n (train)':>12} {'λ̂ ± se':>16} {'warnings':>9}",
        *(f"{name:>10} {c['loss']:>10.5f} {c['train_loss']:>12.5f} "
          f"{c['llc']:>8.3f} ± {c['llc_std']:<5.2g} {c['warnings']:>9}"
          + ("   (saddle: λ̂ not > 2 se, left off the diagram)" if name in saddles else "")
          for name, c in {**saddles, **candidates}.items()),
        "", str(diagram), "",
        f"training {trained - start:.1f} s, trajectory {measured - trained:.1f} s "
        f"({traj.num_computed} computed, {traj.num_reused} reused, executor {args.executor}), "
        f"k-gons {done - measured:.1f} s; total {done - start:.1f} s",
    ])  # fmt: skip
    (args.out / "table.txt").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"wrote {args.out / 'tms_development.png'} and {args.out / 'table.txt'}")


if __name__ == "__main__":
    main()
