"""Checkpoints as jobs: what :func:`slt.llc_trajectory` estimates, named and fingerprinted.

A job is a checkpoint (a file path or a state dict in memory), the training step it
belongs to, a unique label, and the SHA-256 of its weights — what lets a rerun recognise
a checkpoint it has already done. :func:`describe` and :func:`data_fingerprint` name the
other things a results file must match (the loss function, the data) before a rerun may
reuse it.
"""

from __future__ import annotations

import hashlib
import os
import re
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slt import _checks
from slt.data import _shuffles

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def is_checkpoint_name(name: str) -> bool:
    """A checkpoint's file name by its suffix, in any case (``ckpt_20.PT``), and the
    ``.pth.tar`` of PyTorch's ImageNet example."""
    lower = name.lower()
    return lower.endswith(CHECKPOINT_SUFFIXES) or lower.endswith(".pth.tar")


@dataclass(frozen=True)
class Job:
    """One checkpoint to estimate: everything but what all jobs share."""

    label: str  # unique name of the checkpoint (file name, or "step 100")
    step: int  # training step, the x-axis of the trajectory
    source: str | dict  # a file path, or a state dict in memory
    sha256: str  # of the file's bytes, or of the state dict's tensors


def make_jobs(checkpoints, steps: Sequence[int] | None = None) -> list[Job]:
    """One :class:`Job` per checkpoint, in order of training step."""
    trainer = False  # a Trainer's output_dir: labelled checkpoint-<step>/<file> whatever else
    if isinstance(checkpoints, str | os.PathLike):
        folder = Path(checkpoints)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoints={str(folder)!r} is not a folder")
        keys, sources = trainer_checkpoints(folder)  # a Trainer's checkpoint-<step>/ folders
        if sources:
            trainer = True
            _beside_trainer_folders(folder, keys)
        else:
            found = (str(p) for p in folder.iterdir() if is_checkpoint_name(p.name))
            keys, sources = None, sorted(found, key=natural_key)
        if not sources:
            suffixes = ", ".join((*CHECKPOINT_SUFFIXES, ".pth.tar"))
            raise ValueError(
                f"no checkpoint files ({suffixes}, in any case) and no checkpoint-<step> "
                f"folders in {folder}"
            )
    elif isinstance(checkpoints, Mapping):
        keys, sources = list(checkpoints.keys()), list(checkpoints.values())
    elif isinstance(checkpoints, Sequence):
        keys, sources = None, list(checkpoints)
    else:
        raise TypeError(
            "checkpoints must be a folder, a sequence of paths or state dicts, or a mapping "
            f"from step to one; got {type(checkpoints).__name__}"
        )
    if not sources:
        raise ValueError("checkpoints is empty")
    sources = [str(s) if isinstance(s, os.PathLike) else s for s in sources]
    for s in sources:
        if not isinstance(s, str | Mapping):
            raise TypeError(f"a checkpoint must be a path or a state dict, got {type(s).__name__}")
    if steps is not None:
        steps = _checks.whole_numbers("steps", steps)
    elif keys is not None:
        steps = _checks.whole_numbers("steps (the mapping's keys)", keys)
    else:
        steps = _steps_from_names(sources)
    if len(steps) != len(sources):
        raise ValueError(f"steps has {len(steps)} entries for {len(sources)} checkpoints")
    if len(set(steps)) != len(steps):
        raise ValueError(f"steps must be distinct, got {steps}")
    # a Trainer's jobs are labelled by their folder always: a label that changed with the
    # folder's other checkpoints would not match the results file's rows on a rerun
    labels = (
        [str(Path(*Path(s).parts[-2:])) for s in sources] if trainer else _labels(sources, steps)
    )
    # a path goes to the job absolute: a worker (a Ray cluster started elsewhere) may run in
    # another folder
    jobs = [
        Job(label, step, os.path.abspath(s) if isinstance(s, str) else dict(s), _sha256(s))
        for label, step, s in zip(labels, steps, sources)
    ]
    return sorted(jobs, key=lambda j: j.step)


# the weights a Hugging Face Trainer saves in each checkpoint-<step>/ folder, by preference
TRAINER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_TRAINER_FOLDER = re.compile(r"checkpoint-(\d+)")


def trainer_checkpoints(folder: Path) -> tuple[list[int], list[str]]:
    """The steps and weight files of the ``checkpoint-<step>/`` folders in ``folder`` (a
    Hugging Face ``Trainer``'s ``output_dir``), in step order; empty lists if it has none.
    A checkpoint folder without a single weights file (sharded, or weights elsewhere) is
    refused by name: skipping it would leave a hole in the trajectory."""
    found = []
    for sub in folder.iterdir():
        match = _TRAINER_FOLDER.fullmatch(sub.name)
        if not match or not sub.is_dir():
            continue
        weights = [sub / name for name in TRAINER_WEIGHTS if (sub / name).is_file()]
        if not weights:
            sharded = sorted(p.name for p in sub.glob("*.index.json"))
            why = f"sharded weights ({sharded[0]})" if sharded else "no weights file"
            raise ValueError(
                f"checkpoint folder {sub} holds {why}; slt reads one of "
                f"{', '.join(TRAINER_WEIGHTS)} per folder: pass checkpoints= a mapping from "
                "step to state dict (or to a file) for other layouts"
            )
        found.append((int(match.group(1)), str(weights[0])))
    found.sort()
    steps = [step for step, _ in found]
    twice = sorted({Path(p).parent.name for k, p in found if steps.count(k) > 1})
    if twice:
        raise ValueError(f"checkpoint folders give the same step: {', '.join(twice)} in {folder}")
    return steps, [path for _, path in found]


# what a Trainer's save_model() writes beside the checkpoint-<step>/ folders: the final model
TRAINER_FINAL = (*TRAINER_WEIGHTS, "training_args.bin")


def _beside_trainer_folders(folder: Path, steps: list[int]) -> None:
    """Refuse checkpoint files beside a Trainer's checkpoint folders, but for its final
    save (``trainer.save_model()``), which is said to be left out (no step in its name)."""
    files = sorted(p.name for p in folder.iterdir() if is_checkpoint_name(p.name))
    other = [name for name in files if name not in TRAINER_FINAL]
    if other:
        raise ValueError(
            f"{folder} holds checkpoint-<step> folders and other checkpoint files "
            f"({_few(other)}); pass checkpoints= a list or a {{step: path}} mapping of the ones "
            "to estimate"
        )
    final = [name for name in TRAINER_WEIGHTS if name in files]
    if final:
        warnings.warn(
            f"{folder}: read as a Hugging Face Trainer's output_dir, its checkpoint folders at "
            f"steps {_few([str(k) for k in steps])}; the final save {final[0]} beside them is "
            "left out (no step in its name): pass a {step: path} mapping to include it",
            stacklevel=3,
        )


def natural_key(name: str) -> list:
    """Sort key that orders the numbers in a name by value: ``ckpt_2`` before ``ckpt_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


_STEP = re.compile(r"(?<![a-z])(?:global_)?steps?[=_-]?(\d+)", re.IGNORECASE)
# a whole number that is not a part of a decimal (a metric in the name: val_loss=0.05)
_WHOLE = re.compile(r"(?<!\d)(?<!\d\.)\d+(?!\d)(?!\.\d)")


def step_of_name(stem: str) -> int | None:
    """The step a checkpoint's name gives: the last number after "step" (``step=300``,
    ``step_300``, ``global_step300``), else the last whole number that is not part of a
    decimal; None if there is none. Lightning's ``epoch=3-step=150-val_loss=0.08`` is 150
    (the last number, 8, put training out of order)."""
    found = _STEP.findall(stem) or _WHOLE.findall(stem)
    return int(found[-1]) if found else None


def _steps_from_names(sources: list) -> list[int]:
    """Each file name's step (:func:`step_of_name`); else 0, 1, 2, ... in the order given
    (a folder's files in natural order), with a warning that says why."""
    numbers = [step_of_name(Path(s).stem) if isinstance(s, str) else None for s in sources]
    if None not in numbers and len(set(numbers)) == len(numbers):
        return numbers
    if any(isinstance(s, str) for s in sources):  # state dicts alone are steps 0, 1, ...
        names = [Path(s).name if isinstance(s, str) else f"state dict [{i}]"
                 for i, s in enumerate(sources)]  # fmt: skip
        why = [n for n, k in zip(names, numbers) if k is None or numbers.count(k) > 1]
        warnings.warn(
            f"checkpoint names give no distinct step number ({_few(why)}): steps are 0 to "
            f"{len(sources) - 1} in this order: {_few(names)}; pass steps= to set them",
            stacklevel=3,
        )
    return list(range(len(sources)))


def _few(names: list[str], limit: int = 4) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _labels(sources: list, steps: list[int]) -> list[str]:
    names = [Path(s).name if isinstance(s, str) else None for s in sources]
    if None not in names and len(set(names)) == len(names):
        return names
    labels = [s if isinstance(s, str) else f"step {step}" for s, step in zip(sources, steps)]
    if len(set(labels)) < len(labels):  # one file at two steps: the step tells them apart
        labels = [f"{label} (step {step})" for label, step in zip(labels, steps)]
    return labels


def _sha256(source) -> str:
    digest = hashlib.sha256()
    if isinstance(source, str):
        if not Path(source).is_file():
            raise FileNotFoundError(f"checkpoint {source} does not exist or is not a file")
        with open(source, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    else:
        _hash_state(digest, source)
    return digest.hexdigest()


def _hash_state(digest, state: Mapping) -> None:
    for key in sorted(state):
        value = state[key]
        digest.update(str(key).encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())


def describe(obj) -> str:
    """A readable identity of a callable: ``module.qualname``, partials and objects too
    (their state, never a memory address, which changes from run to run)."""
    import functools

    if isinstance(obj, functools.partial):
        args = [_shown(a) for a in obj.args] + [f"{k}={_shown(v)}" for k, v in obj.keywords.items()]
        return f"partial({describe(obj.func)}, {', '.join(args)})"
    if isinstance(obj, types.MethodType):  # a bound method: its object's state too
        return f"{describe(obj.__func__)} of {_shown(obj.__self__, called=True)}"
    qualname = getattr(obj, "__qualname__", None)
    if qualname is not None and "(" in qualname:  # slt's adapters name their parameters
        return qualname
    if isinstance(obj, types.FunctionType) and obj not in _DIGESTING:
        # the name alone is shared by every closure a factory makes (make_loss(σ)'s for
        # each σ) and by every lambda: their code, defaults and captured values too
        _DIGESTING.add(obj)
        try:
            return f"{obj.__module__}.{qualname} [{_function_digest(obj)}]"
        finally:
            _DIGESTING.discard(obj)
    if qualname is not None:
        return f"{getattr(obj, '__module__', '?')}.{qualname}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}: {_shown(obj, called=True)}"


_DIGESTING: set = set()  # functions being digested (a recursive closure holds itself)


def _function_digest(fn: types.FunctionType) -> str:
    """A short SHA-256 of a function's code, defaults and closure values (addresses out)."""
    digest = hashlib.sha256()
    code = fn.__code__
    digest.update(code.co_code)
    parts = [code.co_consts, code.co_names, fn.__defaults__, fn.__kwdefaults__]
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:  # an empty cell
            cells.append(None)
    for value in [*parts, *cells]:
        digest.update(_identity(value).encode())
    return digest.hexdigest()[:12]


def _identity(value) -> str:
    """``value`` as text for a digest: tensors by their bytes, callables by
    :func:`describe`, anything else by :func:`_shown`."""
    if isinstance(value, torch.Tensor):
        digest = hashlib.sha256()
        _hash_state(digest, {"": value})
        return f"tensor {digest.hexdigest()}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_identity(v) for v in value) + ")"
    if isinstance(value, types.CodeType):  # a nested function's code
        return _identity((value.co_code, value.co_consts, value.co_names))
    if callable(value) and not isinstance(value, type):
        return describe(value)
    return _shown(value)


def _shown(value, *, called: bool = False) -> str:
    """``repr(value)`` without addresses; an object with the default repr as its class
    and attributes; a callable (unless ``called``: the object being described) by
    :func:`describe`."""
    if callable(value) and not called:
        return describe(value)
    if type(value).__repr__ is object.__repr__:
        state = sorted(getattr(value, "__dict__", {}).items())
        return (
            f"{type(value).__qualname__}(" + ", ".join(f"{k}={_shown(v)}" for k, v in state) + ")"
        )
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def data_fingerprint(loader) -> dict:
    """Size, batch size, how a DataLoader draws its batches (shuffle, drop_last, its
    sampler's class) and, for tensors held in memory, a SHA-256 of the data."""
    out: dict[str, Any] = {"loader": type(loader).__name__}
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        out["n"] = len(dataset)
    if getattr(loader, "batch_size", None) is not None:
        out["batch_size"] = loader.batch_size
    spec = getattr(loader, "slt_data_spec", None)  # set by `slt trajectory`: --data and its file
    if spec is not None:
        out["spec"] = spec
    if isinstance(loader, torch.utils.data.DataLoader):  # what the sampling draws by
        out["drop_last"] = bool(loader.drop_last)
        out["sampler"] = type(loader.sampler).__qualname__
        out["batch_sampler"] = type(loader.batch_sampler).__qualname__
        out["shuffle"] = _shuffles(loader)
    tensors = None
    if isinstance(dataset, torch.utils.data.TensorDataset):
        tensors = dataset.tensors
    elif isinstance(loader, list | tuple):
        tensors = [t for batch in loader for t in _tensors(batch)]
    if tensors is not None:
        digest = hashlib.sha256()
        _hash_state(digest, {str(i): t for i, t in enumerate(tensors)})
        out["sha256"] = digest.hexdigest()[:16]
    return out


def _tensors(batch) -> list:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, list | tuple):
        return [t for v in batch for t in _tensors(v)]
    return []
