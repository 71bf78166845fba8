"""What an LLC estimate returns: :class:`LLCResult`, with its summary, export and save."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LLCResult:
    """An LLC estimate with what is needed to judge it. Arrays are ``(chain, draw)``."""

    llc: float  # mean of llc_per_chain over chains that did not diverge
    llc_std: float  # standard error of that mean (std over chains / √chains)
    llc_per_chain: np.ndarray  # (chain,), NaN for diverged chains
    init_loss: float  # L_n(w*) on the full data
    trace: np.ndarray  # (chain, draw) minibatch loss L_B(w_t) after burn-in
    trace_at_center: np.ndarray  # (chain, draw) L_B(w*) on the same batches
    diverged: np.ndarray  # (chain,) bool
    warnings: tuple[str, ...]
    nbeta: float
    nbeta_default: bool
    n: int
    num_params: int
    localization: float
    step_size: float
    sampler: str
    num_chains: int
    num_draws: int
    num_burnin: int
    control_variate: str
    seed: int
    seconds: float
    # MALA acceptance probability of each post-burn-in step (the move w_t → w_{t+1}): every
    # step for sampler="mala", every `acceptance_every` steps for "sgld" (the acceptance its
    # move would have had under MALA), NaN where not computed and for the other samplers.
    acceptance: np.ndarray | None = None  # (chain, draw)
    mala_acceptance: float = math.nan  # mean of the computed values over non-diverged chains
    acceptance_every: int = 0
    # Diagnostics of the per-draw λ̂ trace over usable chains (slt.diagnostics).
    rhat: float = math.nan  # rank-normalized split R̂; NaN with one usable chain
    ess_bulk: float = math.nan  # bulk ESS, total over usable chains
    ess_tail: float = math.nan  # tail ESS (5%/95% quantiles), total
    mcse: float = math.nan  # Monte Carlo standard error of llc, sd/√ESS (minibatch noise included)
    calibration: dict | None = None  # what step_size="auto" tried and chose (CalibrationResult)
    per_sample_path: str | None = None  # HDF5 file of per-sample losses (record="per_sample")
    # How the chains ran: "loop" (one after another) or "vmap" (all in one batched step;
    # what chain_method="auto" chose, or a fallback to the loop), and whether compiled.
    chain_method: str = "loop"
    compiled: bool = False
    # Minibatches drawn as whole micro-batches of this many samples (estimate_llc's
    # microbatch), the control variates read from a table over them; None: per sample.
    microbatch: int | None = None
    # The names of the sampled parameters where params= chose them (the others held at w*);
    # None: every trainable parameter
    params: tuple[str, ...] | None = None

    @property
    def se(self) -> float:
        """The cautious error bar of ``llc``: the larger of ``llc_std`` and ``mcse``
        (``mcse`` alone with one chain; NaN where there is no MCSE), as ``Trajectory.se``."""
        if math.isnan(self.mcse):
            return math.nan
        return self.mcse if math.isnan(self.llc_std) else max(self.llc_std, self.mcse)

    @property
    def llc_trace(self) -> np.ndarray:
        """(chain, draw) per-draw λ̂ = nβ (L_B(w_t) - L_B(w*))."""
        return self.nbeta * (self.trace - self.trace_at_center)

    def to_dict(self) -> dict:
        """Plain Python numbers and lists, which ``json.dumps`` takes; NaN (R̂ of one chain,
        unprobed acceptances) stays a float NaN, written ``NaN``, which strict JSON readers
        refuse (the JSON files the command line writes have null there)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, np.ndarray):
                out[key] = value.tolist()
            elif isinstance(value, tuple):
                out[key] = list(value)
            elif isinstance(value, np.generic):  # a numpy scalar: json cannot write it
                out[key] = value.item()
        return out

    def save(self, path) -> None:
        """Write to a netCDF file in ArviZ's layout (:func:`slt.io.save`; ``slt[io]``)."""
        from slt.io import save

        save(self, path)

    def _acceptance_note(self) -> str:
        if self.sampler == "mala":
            return f"{self.mala_acceptance:.3g} (every step)"
        if self.sampler != "sgld":
            return f"n/a (not defined for {self.sampler} moves)"
        if math.isnan(self.mala_acceptance):
            if not self.acceptance_every:
                return "n/a (acceptance_every=0)"
            return f"n/a (no probe among the draws; acceptance_every={self.acceptance_every})"
        return f"{self.mala_acceptance:.3g} of SGLD moves (every {self.acceptance_every} steps)"

    def __str__(self) -> str:
        ok = ~self.diverged
        nb = f"{self.nbeta:.4g}" + (" (default n/log n)" if self.nbeta_default else "")
        per_chain = " ".join(
            "diverged" if d else f"{v:.4g}" for v, d in zip(self.llc_per_chain, self.diverged)
        )
        lines = [
            f"LLC estimate  λ̂ = {self.llc:.4g} ± {self.llc_std:.2g}  "
            f"({int(ok.sum())}/{self.num_chains} chains × {self.num_draws} draws, "
            f"burn-in {self.num_burnin})",
            f"  sampler {self.sampler}, step_size {self.step_size:g}, "
            f"localization {self.localization:g}, nβ {nb}, n {self.n}",
            f"  L_n(w*) {self.init_loss:.6g}   d {self.num_params} "
            f"(BIC's d/2 = {self.num_params / 2:g})   "
            f"control variate {self.control_variate}"
            f"{'' if self.microbatch is None else f' (micro-batches of {self.microbatch})'}"
            f"   chains {self.chain_method}"
            f"{', compiled' if self.compiled else ''}   {self.seconds:.1f} s",
            *([] if self.params is None else [f"  params: {_names(self.params)}"]),
            f"  per chain: {per_chain}",
            f"  R̂ {self.rhat:.3f}   ESS bulk {self.ess_bulk:.0f} tail {self.ess_tail:.0f}   "
            f"MCSE {self.mcse:.2g}   MALA acceptance {self._acceptance_note()}",
        ]
        if self.calibration is not None:
            cal = self.calibration
            lines.append(
                f"  step_size chosen by calibration: {cal['step_size']:.3g} from "
                f"{len(cal['candidates'])} candidates in {cal['seconds']:.1f} s"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _names(names: tuple[str, ...], width: int = 70) -> str:
    """The sampled parameters' names, cut to about ``width`` characters with a count."""
    text = ", ".join(names)
    if len(text) <= width:
        return text
    shown = []
    for name in names:
        if len(", ".join([*shown, name])) > width - 20:
            break
        shown.append(name)
    return f"{', '.join(shown)}, ... ({len(names)} tensors)"
