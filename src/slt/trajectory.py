"""λ̂ across training: one :func:`slt.estimate_llc` per checkpoint, resumable, fanned out.

Each checkpoint becomes a pure job (its source, the factory that rebuilds the model,
the settings, the seed), so it runs the same in this process, in a process pool or on
Ray (:mod:`slt.executors`). Every checkpoint uses the same ``seed``: chains at every
checkpoint see the same minibatch order and injected noise (common random numbers), so
differences between neighbouring checkpoints carry less Monte Carlo noise than each λ̂.

With ``results=path``, each finished checkpoint is appended to a JSON-lines file
(:mod:`slt.trajectory_file`) at once; a rerun reads it, skips every checkpoint already
there (matched by label and the SHA-256 of its weights), and computes only the rest.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slt import _globals, executors
from slt._text import few, right
from slt.checkpoint_jobs import (  # noqa: F401  (make_jobs and Job are public here too)
    CHECKPOINT_SUFFIXES,
    Job,
    data_fingerprint,
    describe,
    make_jobs,
)
from slt.trajectory_file import ResultsFile, numbers_normalised

_NOT_SETTINGS = {"model", "loader", "loss_fn", "progress"}


@dataclass(frozen=True)
class Shared:
    """What every job of one trajectory needs; sent once to each worker."""

    model_factory: Callable[[], torch.nn.Module]
    loader: Iterable
    loss_fn: Callable
    settings: dict  # estimate_llc keyword arguments
    settings_hash: str
    device: str  # "auto" (CUDA where the worker has it), "cpu", "cuda", ...


@dataclass(frozen=True)
class Trajectory:
    """λ̂ and L_n(w*) per checkpoint, sorted by step. Arrays are ``(checkpoint,)``."""

    steps: np.ndarray  # (checkpoint,) int
    labels: tuple[str, ...]
    llc: np.ndarray  # λ̂ (NaN where every chain diverged)
    llc_std: np.ndarray  # standard error over chains
    mcse: np.ndarray  # Monte Carlo standard error (within chains, minibatch noise included)
    rhat: np.ndarray
    ess_bulk: np.ndarray
    init_loss: np.ndarray  # L_n(w*) on the full data
    llc_per_chain: np.ndarray  # (checkpoint, chain)
    warnings: tuple[tuple[str, ...], ...]  # per checkpoint
    settings: dict  # the estimate_llc settings and the identity of model, loss and data
    settings_hash: str
    path: str | None  # the results file, if any
    num_computed: int  # checkpoints estimated by this call
    num_reused: int  # checkpoints read back from the results file
    rows: tuple[dict, ...]  # the results file's rows, in the same order

    @property
    def loss(self) -> np.ndarray:
        """(checkpoint,) L_n(w*), the training loss at each checkpoint."""
        return self.init_loss

    @property
    def se(self) -> np.ndarray:
        """(checkpoint,) the larger of ``llc_std`` and ``mcse`` (the cautious error bar);
        ``mcse`` alone where one chain leaves no ``llc_std``; NaN where there is no MCSE
        (chains that never moved: their ``llc_std`` of 0 is no error bar)."""
        mcse = np.asarray(self.mcse, dtype=float)
        return np.where(np.isnan(mcse), np.nan, np.fmax(self.llc_std, mcse))

    def to_dict(self) -> dict:
        """Plain Python values (JSON-serialisable up to NaN)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in out.items()}

    def plot(self, transitions=None, **kwargs):
        """:func:`slt.plots_development.plot_trajectory` of this trajectory."""
        from slt.plots_development import plot_trajectory

        return plot_trajectory(self, transitions=transitions, **kwargs)

    def __str__(self) -> str:
        where = f", results {self.path}" if self.path else ""
        lines = [
            f"λ̂ trajectory: {len(self.steps)} checkpoints ({self.num_computed} computed, "
            f"{self.num_reused} reused{where})",
            f"{'step':>10} {'L_n(w*)':>12} {right('λ̂', 10)} {'± se':>8} {'chains':>8} "
            f"{'MCSE':>8} {right('R̂', 6)} {'ESS':>6}  warnings",
        ]
        se = self.se  # the error bar; its two parts after it
        for i, step in enumerate(self.steps):
            lines.append(
                f"{step:>10} {self.init_loss[i]:>12.6g} {self.llc[i]:>10.4g} {se[i]:>8.2g} "
                f"{self.llc_std[i]:>8.2g} {self.mcse[i]:>8.2g} {self.rhat[i]:>6.3f} "
                f"{self.ess_bulk[i]:>6.0f}  {len(self.warnings[i])}"
            )
        lines.append("  ± se: the larger of the se over chains and the MCSE")
        failed = [(label, row["error"]) for label, row in zip(self.labels, self.rows)
                  if row.get("error")]  # fmt: skip
        if failed:
            lines.append(f"no λ̂ at {len(failed)} checkpoint(s):")
            lines += [f"  {label}: {error}" for label, error in failed]
        return "\n".join(lines)


def llc_trajectory(
    checkpoints: str | os.PathLike | Sequence | Mapping,
    model_factory: Callable[[], torch.nn.Module],
    loader: Iterable,
    loss_fn: Callable,
    *,
    results: str | os.PathLike | None = None,
    steps: Sequence[int] | None = None,
    executor: str = "serial",
    max_workers: int | None = None,
    threads_per_worker: int | None = 1,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> Trajectory:
    """λ̂ (with diagnostics) at every checkpoint of a training run.

    For each checkpoint: build ``model_factory()``, load the weights (``strict=True``)
    and call :func:`slt.estimate_llc` with ``settings``, the same ``seed`` at every
    checkpoint.

    Parameters
    ----------
    checkpoints : folder, sequence, or mapping step -> source
        A folder (its ``*.pt``, ``*.pth``, ``*.bin``, ``*.ckpt``, ``*.safetensors`` files),
        a sequence of paths and/or state dicts, or a mapping from training step to one.
        Files are read by :func:`slt.checkpoints.load_state_dict`: ``torch.load`` with
        ``weights_only=True``, so a file that would execute code when unpickled is refused
        with ``ValueError``.
    model_factory : callable
        ``model_factory()`` returns a fresh ``nn.Module`` to load each checkpoint into.
        For ``executor="process"`` it must pickle: a class or function defined at module
        level (a ``functools.partial`` of one is fine), not a lambda or closure.
    loader, loss_fn
        As for :func:`slt.estimate_llc`; for ``"process"`` they must pickle too (a
        ``DataLoader`` over a ``TensorDataset`` does).
    results : path, optional
        JSON-lines file for the rows (:mod:`slt.trajectory_file`), written as each
        checkpoint finishes. If it exists, finished checkpoints are read back, not
        recomputed (each with this run's step); if it was written with other settings,
        ``SettingsChangedError`` names them, unless ``overwrite=True``, which discards the
        file. Settings compare as values: ``1`` equals ``1.0``, a callable (``params=``) is
        its ``module.qualname``. A file that is not such a results file is refused.
    steps : sequence of int, optional
        The training step of each checkpoint. Default: the mapping's keys, else the last
        number in each file name when every name has a distinct one, else 0, 1, 2, ... in
        the order given (a folder's files in natural order: ``ckpt_2`` before ``ckpt_10``),
        with a warning.
    executor : {"serial", "process", "ray"}
        Where the jobs run (:mod:`slt.executors`); at the same torch thread count the
        numbers do not depend on it, bit for bit.
    max_workers, threads_per_worker
        Pool size for "process"; ``torch.set_num_threads`` in each worker. "serial" runs at
        the caller's ``torch.get_num_threads()``: it matches a pool bit for bit when that
        equals ``threads_per_worker``; otherwise λ̂ differs in the last bits (how sums are
        split over threads). Each row records its ``threads``.
    device : str
        Where each job samples: "auto" uses CUDA when the worker has it. Recorded per row,
        not part of the settings (results on CPU and GPU differ in the last bits).
    progress : bool
        A progress bar over checkpoints.
    **settings
        Keyword options of :func:`slt.estimate_llc` (``step_size``, ``localization``,
        ``nbeta``, ``num_chains``, ``num_draws``, ``num_burnin``, ``sampler``,
        ``seed``, ...). With ``record="per_sample"``, each checkpoint streams to its own
        file: ``record_path`` with ``.step<step>`` before the suffix (``ps.h5`` ->
        ``ps.step100.h5``), named in the row's ``per_sample_path``.

    Returns
    -------
    Trajectory
        A checkpoint whose chains all diverge, or whose L_n(w*) is NaN or infinite, has
        λ̂ = NaN and its row the ``error`` (printed with the table); the others run.

    Examples
    --------
    >>> import functools, torch, slt
    >>> from slt.trajectory import llc_trajectory  # also slt.llc_trajectory
    >>> x = torch.randn(128, 2, generator=torch.Generator().manual_seed(0))
    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]),
    ...                                      batch_size=32, shuffle=True)
    >>> factory = functools.partial(torch.nn.Linear, 2, 1)
    >>> ckpts = {0: factory().state_dict(), 10: factory().state_dict()}
    >>> traj = llc_trajectory(ckpts, factory, loader, slt.gaussian_nll(1.0),
    ...                       num_chains=2, num_draws=20, num_burnin=5, progress=False)
    >>> traj.steps.tolist(), traj.llc.shape
    ([0, 10], (2,))
    """
    defaults = estimate_llc_defaults()
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise TypeError(
            f"llc_trajectory got unknown setting(s) {', '.join(unknown)}; the settings are "
            f"estimate_llc's keyword options: {', '.join(sorted(defaults))}"
        )
    if executor not in executors.EXECUTORS:
        raise ValueError(f"executor must be one of {executors.EXECUTORS}, got {executor!r}")
    for name, value in (("max_workers", max_workers), ("threads_per_worker", threads_per_worker)):
        # 0 meant every CPU, a negative number was a bare error from the pool
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):  # fmt: skip
            raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
    if isinstance(model_factory, torch.nn.Module) or not callable(model_factory):
        # a model is callable too: it failed at the first checkpoint, in its forward
        raise TypeError(
            "model_factory must be a function of no arguments that builds a fresh model "
            f"(its class, or lambda: MyNet(...)), got {type(model_factory).__name__} "
            f"{model_factory!r:.80}"
        )
    _check_device(device, executor)
    jobs = make_jobs(checkpoints, steps)
    full = {**defaults, **settings}
    identity = {
        "estimate_llc": _jsonable(full),
        "model_factory": describe(model_factory),
        "loss_fn": describe(loss_fn),
        "data": data_fingerprint(loader),
    }
    settings_hash = hashlib.sha256(
        json.dumps(numbers_normalised(identity), sort_keys=True).encode()
    ).hexdigest()[:16]
    if settings.get("record_path") is not None:  # the caller's folder, not a worker's
        settings = {**settings, "record_path": os.path.abspath(settings["record_path"])}
    shared = Shared(model_factory, loader, loss_fn, settings, settings_hash, device)
    if executor == "process":
        executors.check_picklable(
            {"model_factory": model_factory, "loader": loader, "loss_fn": loss_fn,
             "settings": settings}, executor,
        )  # fmt: skip
    done: dict[str, dict] = {}
    file = None
    if results is not None:
        file = ResultsFile(results)
        # a file from before an option was added ran what the option's absence meant
        absent = _jsonable(defaults | _BEFORE_ADDED)
        for row in file.open(identity, settings_hash, overwrite=overwrite,
                             defaults={"estimate_llc": absent}):  # fmt: skip
            done[row["label"]] = row
    rows: dict[str, dict] = {}
    todo = []
    for job in jobs:
        row = done.get(job.label)
        if row is not None and row.get("checkpoint_sha256") != job.sha256:
            raise ValueError(
                f"checkpoint {job.label!r} has changed since its row in {results} was "
                "written (its SHA-256 differs); pass overwrite=True to recompute everything, "
                "or use another results file"
            )
        if row is not None:  # the step of this run's numbering, not the one it was written with
            rows[job.label] = {**row, "step": job.step}
        else:
            todo.append(job)
    num_reused = len(rows)
    _check_fits(model_factory, todo)  # a file that cannot run stops the run before any sampling
    bar = _progress_bar(len(jobs), num_reused, progress)

    def finished(job: Job, row: dict) -> None:
        if file is not None:
            file.append(row)
        rows[job.label] = row
        if bar is not None:
            bar.update(1)

    try:
        executors.run_jobs(
            run_job, shared, todo, finished, executor=executor, max_workers=max_workers,
            threads_per_worker=threads_per_worker,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    ordered = [rows[job.label] for job in jobs]
    return _trajectory(ordered, identity, settings_hash, results, len(todo), num_reused)


def _check_fits(model_factory: Callable[[], torch.nn.Module], jobs: list[Job]) -> None:
    """Read every checkpoint to be computed (a torch file memory-mapped: names and shapes,
    not the numbers) and check it fits the model, before any sampling: an unreadable file
    or one of another model (an ``optimizer.pt`` beside the weights) stopped the run only
    when its turn came, after the others had sampled."""
    from slt.checkpoints import load_state_dict

    if not jobs:
        return
    outer = _globals.current()
    try:  # as in run_job: its initialization is not drawn from the caller's generator
        model = model_factory()
    finally:
        _globals.restore(outer)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model_factory() returned {type(model).__name__}, not an nn.Module")
    for job in jobs:
        state = (load_state_dict(job.source, lazy=True) if isinstance(job.source, str)
                 else job.source)  # fmt: skip
        load_into(model, state, job.label, shapes_only=True)


def _check_device(device, executor: str) -> None:
    """Refuse a ``device`` torch cannot parse, or CUDA where this process runs the jobs and
    has none (a Ray cluster's workers may have GPUs its driver lacks), before any job."""
    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(
            f'device must be "auto" or a torch device such as "cpu" or "cuda:0", got {device!r}'
        ) from None
    if kind == "cuda" and executor != "ray" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but this PyTorch has no CUDA device; use 'auto'")


def run_job(shared: Shared, job: Job) -> dict:
    """Estimate λ̂ at one checkpoint; the row for the results file. Pure up to timing."""
    from slt.chains import DivergenceError
    from slt.checkpoints import load_state_dict
    from slt.llc import estimate_llc

    state = load_state_dict(job.source) if isinstance(job.source, str) else job.source
    outer = _globals.current()
    try:  # its random initialization, overwritten at once, is not drawn from the caller's
        model = shared.model_factory()
    finally:
        _globals.restore(outer)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model_factory() returned {type(model).__name__}, not an nn.Module")
    load_into(model, state, job.label)
    device = shared.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    start = time.perf_counter()
    row: dict[str, Any] = {"label": job.label, "step": job.step,
                           "source": job.source if isinstance(job.source, str) else None,
                           "checkpoint_sha256": job.sha256}  # fmt: skip
    settings = shared.settings
    if settings.get("record") == "per_sample" and settings.get("record_path") is not None:
        settings = {**settings, "record_path": record_path_of(settings["record_path"], job.step)}
        row["per_sample_path"] = settings["record_path"]
    try:
        res = estimate_llc(model, shared.loader, shared.loss_fn, progress=False, **settings)
    except (DivergenceError, ValueError) as err:
        # L_n(w*): known where the chains diverged; a ValueError is this checkpoint's only
        # when L_n(w*) is NaN or infinite (else a bad setting or input: raised)
        try:
            loss = full_loss(model, shared.loader, shared.loss_fn)
        except Exception:
            if isinstance(err, ValueError):
                raise err from None
            loss = math.nan
        if isinstance(err, ValueError) and math.isfinite(loss):
            raise
        row.update(llc=math.nan, llc_std=math.nan, mcse=math.nan, rhat=math.nan,
                   ess_bulk=math.nan, ess_tail=math.nan, init_loss=loss, llc_per_chain=[],
                   warnings=[str(err)], error=str(err))  # fmt: skip
        row.pop("per_sample_path", None)  # a failed estimate keeps no file
    else:
        row.update(
            llc=res.llc, llc_std=res.llc_std, mcse=res.mcse, rhat=res.rhat,
            ess_bulk=res.ess_bulk, ess_tail=res.ess_tail, init_loss=res.init_loss,
            llc_per_chain=[float(v) for v in res.llc_per_chain], nbeta=res.nbeta, n=res.n,
            num_params=res.num_params, step_size=float(res.step_size),
            mala_acceptance=res.mala_acceptance, num_diverged=int(res.diverged.sum()),
            warnings=list(res.warnings),
        )  # fmt: skip
    row.update(
        seconds=time.perf_counter() - start, settings_hash=shared.settings_hash,
        device=str(device), threads=torch.get_num_threads(), pid=os.getpid(),
        host=socket.gethostname(),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )  # fmt: skip
    return row


def record_path_of(path: str | os.PathLike, step: int) -> str:
    """The ``record_path`` of the checkpoint at ``step``: ``ps.h5`` -> ``ps.step10.h5``."""
    path = Path(path)
    return str(path.with_name(f"{path.stem}.step{step}{path.suffix}"))


def full_loss(model: torch.nn.Module, loader: Iterable, loss_fn: Callable) -> float:
    """L_n at the model's weights: the sample-weighted mean of batch losses over one pass
    (in eval mode, in a fixed order), as :func:`slt.estimate_llc` computes L_n(w*)."""
    from slt.data import BatchStream
    from slt.posterior import mean_loss

    device = next(iter(model.parameters()), torch.empty(0)).device
    model = copy.deepcopy(model).eval()  # the factory's module keeps its mode
    return mean_loss(model, BatchStream(loader, device), loss_fn)


def load_into(model: torch.nn.Module, state: Mapping, label: str, *,
              shapes_only: bool = False) -> None:  # fmt: skip
    """``model.load_state_dict(state, strict=True)`` with the differing keys named;
    ``shapes_only``: check the names and shapes against the model's and load nothing."""
    expected = model.state_dict()
    state = as_model_keys(state, expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {label!r} does not fit the model: missing keys {few(missing)}; "
            f"unexpected keys {few(unexpected)}{_prefix_hint(unexpected, missing)}"
        )
    if shapes_only:
        wrong = [
            f"{k} {tuple(state[k].shape)} (model {tuple(value.shape)})"
            for k, value in expected.items()
            if isinstance(state[k], torch.Tensor) and state[k].shape != value.shape
        ]
        if wrong:
            raise ValueError(
                f"checkpoint {label!r} does not fit the model: shapes differ: {few(wrong)}"
            )
        return
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        # torch's message spans lines (one per tensor): one line for the table and the file
        raise ValueError(
            f"checkpoint {label!r} does not fit the model: {' '.join(str(err).split())}"
        ) from None


# what wrappers put before every key of the model they hold: a LightningModule's attribute
# (commonly "model."), DistributedDataParallel's "module.", torch.compile's "_orig_mod."
WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.")


def as_model_keys(state: Mapping, model_state: Mapping) -> Mapping:
    """``state`` keyed as ``model_state`` (the model's ``state_dict()``) where that gives
    exactly the model's keys: the prefixes of :data:`WRAPPER_PREFIXES` that every key
    carries taken off, one after another (``module._orig_mod.``), and a tied weight the file
    leaves out (``save_pretrained`` saves GPT-2's ``lm_head.weight``, the embedding's, once)
    read from the key it shares memory with in the model. Otherwise ``state`` with only its
    tied weights filled, the keys that still differ named by :func:`load_into`."""
    keys = set(model_state)
    tied = _tied_keys(model_state)
    names, as_given = list(state), None
    while True:
        filled = dict(zip(names, state.values()))
        for key in keys.difference(filled):
            source = next((k for k in tied.get(key, ()) if k in filled), None)
            if source is not None:
                filled[key] = filled[source]
        as_given = filled if as_given is None else as_given  # no prefix taken off
        if set(filled) == keys and len(set(names)) == len(names):
            return filled
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in names)), None)
        if prefix is None or not names:
            return as_given  # the keys that still differ are then named by load_into
        names = [k.removeprefix(prefix) for k in names]


def _prefix_hint(unexpected: list[str], missing: list[str]) -> str:
    """Where every unexpected key is a missing one under one more prefix (a wrapper's
    attribute slt does not know, ``net.``), the words that say so and how to load it."""
    heads = {k.partition(".")[0] for k in unexpected}
    if len(heads) != 1 or not missing or not all("." in k for k in unexpected):
        return ""
    prefix = heads.pop() + "."
    if not set(missing) <= {k.removeprefix(prefix) for k in unexpected}:
        return ""
    return (
        f" (the checkpoint's keys carry the prefix {prefix!r}: pass the state dict with it "
        f"taken off, {{k.removeprefix({prefix!r}): v for k, v in state.items()}})"
    )


def _tied_keys(model_state: Mapping) -> dict[str, list[str]]:
    """Each key of ``model_state`` that views the same memory as another, to all of them."""
    groups: dict[tuple, list[str]] = {}
    for key, value in model_state.items():
        if isinstance(value, torch.Tensor) and value.numel() > 0 and value.device.type != "meta":
            view = (value.untyped_storage().data_ptr(), value.storage_offset(),
                    tuple(value.shape), value.stride(), value.dtype)  # fmt: skip
            groups.setdefault(view, []).append(key)
    return {k: group for group in groups.values() if len(group) > 1 for k in group}


# estimate_llc's options whose default is not what a file written before they existed ran:
# microbatch came with the default None (per-sample batches), now "auto"
_BEFORE_ADDED = {"microbatch": None}


def estimate_llc_defaults() -> dict:
    """The keyword options of :func:`slt.estimate_llc` with their defaults."""
    from slt.llc import estimate_llc

    return {
        name: p.default
        for name, p in inspect.signature(estimate_llc).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _NOT_SETTINGS
    }


def _jsonable(value):
    """Settings as JSON values: tuples to lists, a callable by its ``module.qualname``
    (:func:`describe`, the same in every process), anything else JSON lacks by repr."""
    return json.loads(json.dumps(value, default=_name))


def _name(value) -> str:
    return describe(value) if callable(value) else repr(value)


def _progress_bar(total: int, initial: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="checkpoints", unit="ckpt")


def _trajectory(rows, identity, settings_hash, path, num_computed, num_reused) -> Trajectory:
    def column(key, dtype=float):
        return np.array([row.get(key, math.nan) for row in rows], dtype=dtype)

    chains = max((len(r.get("llc_per_chain") or []) for r in rows), default=0)
    per_chain = np.full((len(rows), chains), np.nan)
    for i, r in enumerate(rows):
        values = r.get("llc_per_chain") or []
        per_chain[i, : len(values)] = values
    return Trajectory(
        steps=column("step", int),
        labels=tuple(r["label"] for r in rows),
        llc=column("llc"),
        llc_std=column("llc_std"),
        mcse=column("mcse"),
        rhat=column("rhat"),
        ess_bulk=column("ess_bulk"),
        init_loss=column("init_loss"),
        llc_per_chain=per_chain,
        warnings=tuple(tuple(r.get("warnings") or ()) for r in rows),
        settings=identity,
        settings_hash=settings_hash,
        path=None if path is None else str(path),
        num_computed=num_computed,
        num_reused=num_reused,
        rows=tuple(rows),
    )
