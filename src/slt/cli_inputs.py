"""What the ``slt`` commands read from their options: ``pkg.module:attr`` specs of a model,
a dataset or a loss, step sizes, and checkpoints (``weights_only=True`` or safetensors,
never an arbitrary unpickle). Errors are ``typer.BadParameter`` naming the option.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer


class _ModelSpec:
    """A picklable zero-argument model factory for a --model spec (resolved where called)."""

    def __init__(self, spec: str):
        self.spec, self._absolute = spec, _absolute(spec)  # the latter to resolve

    def __call__(self):
        import copy

        return copy.deepcopy(_build(self._absolute, "--model", _is_module, "a torch.nn.Module"))

    def __repr__(self) -> str:  # the resolved file, however spelled, and its contents
        return f"--model {self._absolute} [{spec_digest(self._absolute)}]"


class _LossSpec:
    """A picklable ``loss_fn`` for --loss/--sigma, built on first call in each process."""

    def __init__(self, loss: str, sigma: float):
        self.loss, self.sigma, self._fn = loss, sigma, None
        self._absolute = _absolute(loss)  # to resolve

    def __getstate__(self):
        return {**self.__dict__, "_fn": None}

    def __call__(self, model, batch):
        if self._fn is None:
            self._fn = _loss(self._absolute, self.sigma)
        return self._fn(model, batch)

    def __repr__(self) -> str:
        digest = f" [{spec_digest(self._absolute)}]" if ":" in self._absolute else ""
        return f"--loss {self._absolute}{digest} --sigma {self.sigma:g}"


def spec_digest(spec: str) -> str:
    """A short SHA-256 of the file a ``where:attr`` spec reads (the file, or the module's
    source): a results file written before the file was edited is then one written with
    other settings (the text of the spec alone let a rerun reuse the old rows). "" where
    there is no file to read."""
    import hashlib
    import importlib.util

    where = spec.rpartition(":")[0]
    path = where if _is_file(where) else None
    if path is None:
        try:
            found = importlib.util.find_spec(where)
        except (ImportError, ValueError):
            found = None
        path = getattr(found, "origin", None)
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12] if path else ""
    except OSError:
        return ""


def _parse_step_size(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(
            f'expected a number or "auto", got {text!r}', param_hint="--step-size"
        ) from None


def _parse_microbatch(text: str) -> int | str | None:
    word = text.strip().lower()
    if word in ("auto", "none"):
        return None if word == "none" else "auto"
    try:
        value = int(word)
    except ValueError:
        value = 0
    if value < 1:
        raise typer.BadParameter(
            f'expected an integer >= 1, "auto" or "none", got {text!r}', param_hint="--microbatch"
        )
    return value


def _is_file(where: str) -> bool:
    """Whether the part of a spec before its last ":" names a file, not a module (a name
    with a path, a .py suffix, or an existing file such as data.pt)."""
    return where.endswith(".py") or "/" in where or os.sep in where or Path(where).is_file()


def _absolute(spec: str) -> str:
    """``spec`` with a file's path made absolute: the process that resolves it (a Ray
    worker of a cluster started elsewhere) may run in another folder."""
    where, colon, attr = spec.rpartition(":")
    return f"{os.path.abspath(where)}:{attr}" if colon and where and _is_file(where) else spec


def _resolve(spec: str, option: str):
    """The object named by "pkg.module:attr" or "path/to/file.py:attr" (attr may be dotted)."""
    import importlib
    import os
    import sys

    from slt.executors import load_file_module

    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise typer.BadParameter(
            f'expected "pkg.module:attr" or "path/to/file.py:attr", got {spec!r}',
            param_hint=option,
        )
    if _is_file(where):
        file = Path(where).resolve()
        if not file.is_file():
            what = "is a folder, not a file" if file.is_dir() else "does not exist"
            raise typer.BadParameter(f"file {where} {what}", param_hint=option)
        if file.suffix != ".py":  # data.pt: torch's data is loaded by code in a .py file
            raise typer.BadParameter(
                f"{where} is not a Python file: {option} names an object in a .py file or "
                "a module (path/to/file.py:attr); to use saved tensors, write a .py file "
                "whose function loads them into a Dataset (e.g. TensorDataset(*torch.load(...)))",
                param_hint=option,
            )
        name = "_slt_cli_" + "".join(c if c.isalnum() else "_" for c in str(file))
        # --model and --data from one file share one module; process-pool workers load it
        # too and Ray tasks get it by value, so a Dataset class defined in the file unpickles
        try:
            module = load_file_module(name, file)
        except Exception as err:  # the file's own code: named, one line
            raise typer.BadParameter(_raised(f"loading {where}", err), param_hint=option) from err
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` would
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            if err.name is None or not (where == err.name or where.startswith(err.name + ".")):
                # the module exists; something it imports does not: the user's code, one line
                raise typer.BadParameter(
                    _raised(f"importing {where}", err), param_hint=option
                ) from err
            raise typer.BadParameter(
                f"no module named {err.name!r} (run from the folder that holds it, set "
                "PYTHONPATH, or give a file: path/to/file.py:attr)",
                param_hint=option,
            ) from None
        except Exception as err:  # the module's own code
            raise typer.BadParameter(_raised(f"importing {where}", err), param_hint=option) from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise typer.BadParameter(f"{where} has no attribute {attr!r}", param_hint=option)
        obj = getattr(obj, part)
    return obj


def _build(spec: str, option: str, accept, what: str):
    """The object ``spec`` names, or what it returns when called with no arguments."""
    import inspect

    obj = _resolve(spec, option)
    if accept(obj):
        return obj
    if not callable(obj):
        raise typer.BadParameter(
            f"{spec} is of type {type(obj).__name__}, not {what} or a callable returning one",
            param_hint=option,
        )
    try:
        inspect.signature(obj).bind()
    except TypeError:
        raise typer.BadParameter(
            f"{spec} must be callable with no arguments", param_hint=option
        ) from None
    except ValueError:
        pass  # no signature to inspect (a builtin): just call it
    try:
        built = obj()
    except Exception as err:  # the user's factory: named, one line
        raise typer.BadParameter(_raised(f"{spec}()", err), param_hint=option) from err
    if not accept(built):
        raise typer.BadParameter(
            f"{spec}() returned an object of type {type(built).__name__}, not {what}",
            param_hint=option,
        )
    return built


def _raised(what: str, err: BaseException) -> str:
    return f"{what} raised {type(err).__name__}: {err}"


def first_loss(net, dataset, loss_fn, batch_size: int, options: str) -> None:
    """Evaluate ``loss_fn`` on the first batch before any sampling: an empty dataset, or a
    model, data and loss that do not fit together, get a one-line error naming
    ``options`` instead of a traceback from inside the run."""
    import torch

    if len(dataset) == 0:
        raise typer.BadParameter("the dataset is empty", param_hint="--data")
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size)))
    try:
        with torch.no_grad():
            loss_fn(net, batch)
    except Exception as err:
        raise typer.BadParameter(
            _raised("the loss on the first batch", err), param_hint=options
        ) from err


def _is_module(obj) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def _is_dataset(obj) -> bool:
    import torch

    if isinstance(obj, torch.utils.data.IterableDataset) or isinstance(obj, type | str):
        return False
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__")


def _loss(loss: str, sigma: float):
    import torch.nn.functional as F

    import slt

    if loss == "gaussian":
        try:
            return slt.gaussian_nll(sigma)
        except ValueError:
            raise typer.BadParameter(
                f"σ of the gaussian loss must be a positive finite number, got {sigma:g}",
                param_hint="--sigma",
            ) from None
    if loss == "cross_entropy":
        return slt.supervised(F.cross_entropy)
    if ":" not in loss:
        raise typer.BadParameter(
            f'expected "gaussian", "cross_entropy" or "pkg.module:loss_fn", got {loss!r}',
            param_hint="--loss",
        )
    fn = _resolve(loss, "--loss")
    if not callable(fn):
        raise typer.BadParameter(f"{loss} is not callable", param_hint="--loss")
    return fn


def _output_file(path: Path, option: str, *, make_folder: bool = False) -> Path:
    """Refuse ``path`` as an output file before any sampling: a folder, a missing folder
    (unless ``make_folder``: created later), or a place this process cannot write."""
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a folder; give a file name", param_hint=option)
    if path.exists() and not os.access(path, os.W_OK):
        raise typer.BadParameter(f"cannot write to {path}", param_hint=option)
    _writable_folder(path.parent, option, exists=not make_folder)
    return path


def _output_folder(path: Path, option: str) -> Path:
    """Refuse ``path`` as an output folder (created if missing) before any sampling."""
    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{path} is a file, not a folder", param_hint=option)
    _writable_folder(path, option, exists=False)
    return path


def _writable_folder(folder: Path, option: str, *, exists: bool) -> None:
    if exists and not folder.is_dir():
        raise typer.BadParameter(f"folder {folder} does not exist", param_hint=option)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise typer.BadParameter(f"{existing} is a file, not a folder", param_hint=option)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"cannot write in folder {existing}", param_hint=option)


def _plot_file(path: Path, option: str) -> Path:
    """``path`` with ``.png`` added where it has no suffix (as matplotlib writes it), checked
    as an output file; a suffix matplotlib cannot write is refused."""
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a folder; give a file name", param_hint=option)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return path  # no plot is drawn
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise typer.BadParameter(
            f"{path}: matplotlib cannot write {path.suffix} files; give one of "
            f"{', '.join('.' + f for f in sorted(formats))}",
            param_hint=option,
        )
    return _output_file(path, option)


def _load_checkpoint(model, path: Path) -> None:
    """Load ``path`` into ``model`` as :func:`slt.trajectory.load_into` does (strict, keyed
    as the model's); a clear error when it does not fit."""
    from slt.checkpoints import load_state_dict
    from slt.trajectory import load_into

    try:
        load_into(model, load_state_dict(path), str(path))
    except (ValueError, ImportError) as err:
        raise typer.BadParameter(str(err), param_hint="--checkpoint") from None
