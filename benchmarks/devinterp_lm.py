"""A language model through devinterp 2.0.1's ``llc()`` and through slt, translated by the
README's "Coming from devinterp" table: what n, a sample and nβ are for sequences.

    python benchmarks/devinterp_lm.py [--smoke]      # ~30 s on one CPU thread

A bigram model (``Embedding(8, 4)`` → ``Linear(4, 8)``, d = 72) on 300 sequences of 8
tokens from a random Markov chain (every transition seen, so the minimum is finite),
trained to it (Adam, then L-BFGS). A sample is a sequence: slt's ``loss_fn`` is the batch
mean of each sequence's summed token NLL and its default nβ = n / log n, n = 300.
devinterp's loss is the mean over token positions, 7 to a sequence, so the same posterior
there is ``n_beta`` = 7 nβ. Rows:

- devinterp ``llc()`` as it reports (the burn-in in its average, ± the sd over chains), and
  its trace recomputed over the draws after the burn-in (± the standard error);
- slt, plain SGLD (``control_variate="none"``: devinterp's chain), the per-sequence loss;
- slt with devinterp's per-token mean as ``loss_fn`` and slt's default nβ: a posterior 7×
  hotter, the pitfall of keeping the loss and not ``n_beta``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # devinterp's per-chain progress bars

import numpy as np  # noqa: E402
import torch
import torch.nn.functional as F

import slt

VOCAB, LENGTH, SEQUENCES, WIDTH = 8, 8, 300, 4


class Bigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, WIDTH)
        self.out = torch.nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


def sequences(seed: int = 0) -> torch.Tensor:
    """``SEQUENCES`` × ``LENGTH`` tokens of a Markov chain with a random transition matrix."""
    g = torch.Generator().manual_seed(seed)
    transition = torch.softmax(0.5 * torch.randn(VOCAB, VOCAB, generator=g), -1)
    ids = torch.empty(SEQUENCES, LENGTH, dtype=torch.long)
    ids[:, 0] = torch.randint(VOCAB, (SEQUENCES,), generator=g)
    for t in range(1, LENGTH):
        ids[:, t] = torch.multinomial(transition[ids[:, t - 1]], 1, generator=g)[:, 0]
    return ids


def token_nll(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(batch, LENGTH − 1) next-token NLL: devinterp's per-token loss."""
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def trained(ids: torch.Tensor, adam_steps: int) -> torch.nn.Module:
    """w*: Adam, then L-BFGS to a gradient norm near zero."""
    torch.manual_seed(0)
    model = Bigram()
    adam = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(adam_steps):
        adam.zero_grad()
        token_nll(model, ids).mean().backward()
        adam.step()
    lbfgs = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-9,
                              tolerance_change=1e-12, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        lbfgs.zero_grad()
        loss = token_nll(model, ids).mean()
        loss.backward()
        return loss

    lbfgs.step(closure)
    return model


class RowIds(torch.utils.data.Dataset):
    """The sequences as devinterp's ``{"input_ids": (LENGTH,)}`` rows."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def run_devinterp(model, ids, settings: dict, n_beta: float) -> dict:
    from devinterp.slt.llc import llc

    with tempfile.TemporaryDirectory() as tmp:
        res = llc(model=model, dataset=RowIds(ids), observables={}, lr=settings["step_size"],
                  n_beta=n_beta, localization=settings["localization"],
                  num_chains=settings["num_chains"], num_draws=settings["num_draws"],
                  num_burnin_steps=settings["num_burnin"], batch_size=settings["batch_size"],
                  match_sampling_input_ids_across_chains=False, init_seed=settings["seed"],
                  output_path=Path(tmp) / "samples.zarr", device="cpu")  # fmt: skip
        trace = np.asarray(res["loss_trace"].values)  # (chain, burn-in + draws)
        init = float(res["init_loss"])
        reported = np.asarray(res["llc_per_chain"].values)
        reported_sd = float(res["llc_std"])
    after = n_beta * (trace[:, settings["num_burnin"] :].mean(1) - init)
    return {"reported": (float(reported.mean()), reported_sd),
            "after_burnin": (float(after.mean()), se(after))}  # fmt: skip


def se(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def run_slt(model, ids, settings: dict, loss_fn) -> slt.LLCResult:
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(ids), batch_size=settings["batch_size"], shuffle=True
    )
    options = {k: v for k, v in settings.items() if k != "batch_size"}
    return slt.estimate_llc(model, loader, loss_fn, control_variate="none", progress=False,
                            **options)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 chains × (2+10): does it run?")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = dict(step_size=3e-4, localization=10.0, num_chains=4, num_draws=1000,
                    num_burnin=250, batch_size=32, seed=0)  # fmt: skip
    if args.smoke:
        settings.update(num_chains=2, num_draws=10, num_burnin=2)
    ids = sequences()
    model = trained(ids, adam_steps=100 if args.smoke else 1500)
    nbeta = SEQUENCES / math.log(SEQUENCES)  # slt's default: n = sequences
    n_beta = (LENGTH - 1) * nbeta  # devinterp's, on its per-token mean
    theirs = run_devinterp(model, ids, settings, n_beta)
    ours = run_slt(model, ids, settings, slt.next_token_nll())  # the per-sequence sum
    hot = run_slt(model, ids, settings, lambda m, b: token_nll(m, b[0]).mean())
    runs = settings["num_chains"], settings["num_burnin"], settings["num_draws"]
    print(f"bigram LM, d = 72, n = {SEQUENCES} sequences of {LENGTH} tokens; "
          f"ε {settings['step_size']:g}, γ {settings['localization']:g}, batch "
          f"{settings['batch_size']}, {runs[0]} chains × ({runs[1]} + {runs[2]})")  # fmt: skip
    rows = [
        (f"devinterp llc(), n_beta = 7 × {nbeta:.1f} = {n_beta:.1f}, as reported (± sd)",
         *theirs["reported"]),
        ("devinterp llc(), its trace over the draws after the burn-in (± se)",
         *theirs["after_burnin"]),
        (f"slt, per-sequence NLL, default nβ = {ours.nbeta:.1f} (± se)", ours.llc, ours.se),
        (f"slt, per-token mean NLL, default nβ = {hot.nbeta:.1f}: 7× hotter (± se)", hot.llc,
         hot.se),
    ]  # fmt: skip
    for label, value, err in rows:
        print(f"  {label:<78} {value:8.3f} ± {err:.2f}")
    finite = all(math.isfinite(value) for _, value, _ in rows)
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
