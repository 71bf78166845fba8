"""Read model weights from a file without running code from it.

A ``torch.save`` file is a pickle, and unpickling can call any function the file names.
We read it with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler that
only rebuilds tensors and plain containers, and refuse whatever it rejects;
``.safetensors`` files hold no code at all.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

StateDict = dict[str, torch.Tensor]


def load_state_dict(path: str | os.PathLike, *, lazy: bool = False) -> StateDict:
    """The state dict stored at ``path``, on the CPU, read without unpickling code
    (``lazy``: a torch file memory-mapped, its tensors read only when used).

    ``path`` ending in ``.safetensors`` is read with the ``safetensors`` package; any
    other file with ``torch.load(path, weights_only=True, map_location="cpu")``. A file
    that needs more than tensors and plain containers to unpickle (one that would run code
    when loaded) is refused with ``ValueError``.

    The file may hold the state dict itself (a mapping from names to tensors), or a dict
    whose ``"state_dict"`` key, else ``"model"`` key, holds one (a training checkpoint
    with optimizer state, epoch, ... beside the weights).

    Examples
    --------
    >>> import tempfile, torch
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     torch.save({"model": torch.nn.Linear(2, 1).state_dict()}, f"{tmp}/ckpt.pt")
    ...     sorted(load_state_dict(f"{tmp}/ckpt.pt"))
    ['bias', 'weight']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    content = (
        _read_safetensors(path)
        if path.suffix.lower() == ".safetensors"
        else _read_torch(path, lazy=lazy)
    )
    if _is_state_dict(content):
        return dict(content)
    if isinstance(content, Mapping):
        for key in ("state_dict", "model"):
            if key in content and _is_state_dict(content[key]):
                return dict(content[key])
        found = ", ".join(repr(k) for k in list(content)[:10])
        what = f"a dict with keys {found}"
    else:
        what = f"a {type(content).__name__}"
    raise ValueError(
        f"checkpoint {path} holds {what}; expected a state dict (names to tensors) or a "
        "dict with one under 'state_dict' or 'model'"
    )


def _read_torch(path: Path, lazy: bool = False):
    if lazy:  # memory-mapped: names and shapes without reading the numbers (zip files)
        try:
            return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except Exception:  # noqa: BLE001 - a legacy file: read it whole, errors named below
            pass
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        text = " ".join(str(err).split())
        reason = text.partition("WeightsUnpickler error:")[2].partition(" Check the doc")[0]
        reason = reason.partition(". Please use")[0]  # not torch's advice to allowlist it
        raise ValueError(
            f"refusing to load checkpoint {path}: PyTorch's weights-only unpickler rejected "
            f"it ({reason.strip() or text}). Either it is not a torch.save file, or it holds "
            "objects other than tensors and plain containers, and unpickling it fully could "
            "run code from the file. Save the weights alone: "
            "torch.save(model.state_dict(), path), or safetensors."
        ) from err
    except Exception as err:
        raise ValueError(
            f"could not read checkpoint {path} as a torch.save file "
            f"({type(err).__name__}: {err}); for safetensors use the .safetensors suffix"
        ) from err


def _read_safetensors(path: Path) -> StateDict:
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs the safetensors package: pip install safetensors "
            "(or pip install 'slt[cli]')"
        ) from err
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise ValueError(f"could not read checkpoint {path} as safetensors: {err}") from err


def _is_state_dict(value) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )
