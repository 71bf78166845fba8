"""Results on disk: netCDF files in ArviZ's layout, written and read through xarray.

A saved result is one netCDF-4 file (h5netcdf engine) that any xarray opens with
``xarray.open_datatree(path)``, laid out as an ArviZ ``InferenceData`` (arviz-devs
``schema.md``): groups ``posterior`` and ``sample_stats`` whose variables have dims
``(chain, draw, ...)``, each group carrying ``created_at``, ``inference_library`` and
``inference_library_version``. For an :class:`~slt.result.LLCResult`:

- ``posterior``: ``llc`` (chain, draw), the per-draw λ̂ = nβ (L_B(w_t) - L_B(w*));
  ``loss`` (chain, draw) = ``trace``; ``loss_at_center`` (chain, draw) = ``trace_at_center``.
- ``sample_stats``: ``diverged`` (chain,), ``llc_per_chain`` (chain,), and any other
  ``(chain,)`` or ``(chain, draw, ...)`` array of the result (``acceptance`` is written
  as ArviZ's ``acceptance_rate``).
- root attributes: every scalar field under its own name (bools as 0/1, None as the
  string ``"None"``), tuples, lists, dicts and nested dataclasses as JSON strings
  (``warnings`` is a plain JSON list), the slt version, ``created_at``, and
  ``slt_schema`` / ``slt_result`` / ``slt_fields``, the JSON index that :func:`load` uses
  to rebuild each field exactly. Inside JSON, numpy arrays and scalars, tuples and
  dataclasses are tagged so that they come back as they were; a nested dataclass is
  rebuilt only if its class is in slt (a file never makes ``load`` import anything else).

Nothing here is specific to the fields of ``LLCResult``: placement follows each
field's value, so fields added later are saved without changes to this module.
Needs the ``io`` extra: ``pip install 'slt[io]'``.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

SCHEMA = 1  # bump when the layout changes in a way an older reader would misread

# Arrays shaped (chain, draw, ...) go to sample_stats under their own name unless named
# here: the posterior holds functions of the draws w_t; ArviZ names the sampler stats.
_POSTERIOR = {"trace": "loss", "trace_at_center": "loss_at_center", "llc_trace": "llc"}
_STATS = {"acceptance": "acceptance_rate"}
_DESCRIPTIONS = {
    "llc": "per-draw λ̂ = nβ (L_B(w_t) - L_B(w*))",
    "loss": "minibatch loss L_B(w_t) after burn-in",
    "loss_at_center": "L_B(w*) on the same minibatch",
    "llc_per_chain": "λ̂ of each chain (NaN where it diverged)",
    "diverged": "the chain produced a non-finite loss",
}
_RESULT_TYPES: dict[str, str | type] = {"LLCResult": "slt.result:LLCResult"}  # name: class
_RESERVED = {
    "slt_schema",
    "slt_result",
    "slt_fields",
    "created_at",
    "creation_library",
    "creation_library_version",
    "creation_library_language",
    "inference_library",
    "inference_library_version",
}
_INT64 = (-(2**63), 2**63 - 1)


def _xarray():
    try:
        import h5netcdf  # noqa: F401
        import h5py  # noqa: F401  (h5netcdf >= 1.8 no longer pulls it in)
        import xarray
    except ImportError as err:
        raise ImportError(
            f"saving and loading results needs xarray, h5netcdf and h5py "
            f"({err.name or err} is missing): pip install 'slt[io]'"
        ) from err
    return xarray


def save(result, path: str | os.PathLike) -> None:
    """Write ``result`` (a result dataclass such as ``LLCResult``) to a netCDF file.

    The layout is the module docstring's. The file is written next to ``path`` and
    moved into place, so a failed save never leaves a half-written file at ``path``.

    Examples
    --------
    ``res.save("llc.nc")`` (the same as ``slt.io.save(res, "llc.nc")``), then
    ``slt.load("llc.nc")`` or ``xarray.open_datatree("llc.nc")``.
    """
    xr = _xarray()
    if not dataclasses.is_dataclass(result) or isinstance(result, type):
        raise TypeError(f"result must be a result dataclass such as LLCResult, got {result!r}")
    if type(result).__name__ not in _RESULT_TYPES:  # load could not read the file back
        raise TypeError(
            f"result is a {type(result).__name__}; slt.io saves the results slt.load reads: "
            f"{', '.join(sorted(_RESULT_TYPES))}"
        )
    path = _target(path)
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    derived = "llc_trace" not in fields and isinstance(
        getattr(result, "llc_trace", None), np.ndarray
    )
    if derived:
        fields["llc_trace"] = result.llc_trace  # written for readers, never read back
    chains, draws = _sample_shape(fields.values())
    groups: dict[str, dict] = {"/": {}, "posterior": {}, "sample_stats": {}}
    index, attrs = {}, {}
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            group, var, dims = _place(name, value, chains, draws)
            if var in groups[group]:
                raise ValueError(f"result field {name!r} would overwrite {group}/{var}")
            groups[group][var] = xr.Variable(dims, value, attrs=_describe(var))
            index[name] = {"kind": "array", "group": group, "name": var}
        elif name in _RESERVED:
            raise ValueError(f"result field {name!r} clashes with a reserved attribute name")
        else:
            index[name] = {"kind": (kind := _kind(name, value))}
            attrs[name] = _encode(kind, value)
    if derived:
        del index["llc_trace"]
    provenance = _provenance()
    root_attrs = {
        "slt_schema": SCHEMA,
        "slt_result": type(result).__name__,
        "slt_fields": json.dumps(index),
        **provenance,
        **attrs,
    }
    tree = {"/": xr.Dataset(groups["/"], attrs=root_attrs)}
    for group in ("posterior", "sample_stats"):
        if groups[group]:
            tree[group] = xr.Dataset(groups[group], attrs=provenance)
            tree[group] = tree[group].assign_coords(
                {
                    d: np.arange(tree[group].sizes[d])
                    for d in ("chain", "draw")
                    if d in tree[group].dims
                }
            )
    # checksummed: a file damaged on disk fails to load instead of loading other numbers
    encoding = {
        f"/{group}": {
            var: {"fletcher32": True}
            for var, v in tree[group].data_vars.items()
            if v.ndim and v.size
        }
        for group in tree
        if group != "/"
    }
    # a name of its own for every save (threads of one process, a name near the length limit)
    tmp = None
    try:
        tmp = temporary_beside(path)
        xr.DataTree.from_dict(tree).to_netcdf(tmp, engine="h5netcdf", encoding=encoding)
        os.replace(tmp, path)
    except OSError as err:
        raise type(err)(f"cannot save to {path}: {err}") from err
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def temporary_beside(path: Path) -> Path:
    """A new empty file in ``path``'s folder to write into and move to ``path``: a name of
    its own for every call (threads of one process; ``path``'s name near the length limit)."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".slt-", suffix=".tmp")
    os.close(handle)
    return Path(tmp)


def _target(path) -> Path:
    """The file ``save`` writes for ``path``, checked before anything is computed: a
    symbolic link's target (the link stays a link)."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a file name (str or os.PathLike), got {path!r}")
    given = path
    path = Path(path)
    if not os.fspath(given) or path.name in ("", ".", ".."):
        raise ValueError(f"path={os.fspath(given)!r} must name a file, e.g. 'llc.nc'")
    if path.is_symlink():
        path = path.resolve()
    if path.is_dir():
        raise IsADirectoryError(f"cannot save to {path}: it is a folder; give a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save to {path}: folder {path.parent} does not exist")
    return path


def load(path: str | os.PathLike):
    """Read a result written by :func:`save`; field by field equal to the one saved.

    Arrays come back with their dtype and every bit (NaN positions included), floats
    exactly. Variables and attributes this version does not know (added by hand, or by a
    newer slt) are ignored; a file from a newer ``slt_schema`` loads with a warning.
    """
    xr = _xarray()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved result at {path}")
    try:
        with xr.open_datatree(path, engine="h5netcdf") as tree:
            tree = tree.load()
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a result saved by slt, or is damaged (not a readable "
            f"netCDF-4/HDF5 file, or its checksums fail: {err})"
        ) from None
    root = tree.attrs
    if "slt_schema" not in root or "slt_fields" not in root:
        raise ValueError(f"{path} is not a result saved by slt (no slt_schema attribute)")
    try:
        schema = int(root["slt_schema"])
    except (TypeError, ValueError):
        raise ValueError(
            f"{path} is not a result saved by slt (slt_schema is {root['slt_schema']!r}, not "
            "a schema number; was the file edited?)"
        ) from None
    if schema > SCHEMA:
        warnings.warn(
            f"{path} was written with result schema {schema}, newer than "
            f"this slt's {SCHEMA}; reading the fields this version knows",
            stacklevel=2,
        )
    cls = _result_type(str(root.get("slt_result", "")), path)
    try:
        index = json.loads(root["slt_fields"])
    except (TypeError, ValueError) as err:
        index = err
    if not isinstance(index, dict) or not all(
        isinstance(e, dict) and "kind" in e for e in index.values()
    ):
        raise ValueError(
            f"{path} is not a result saved by slt (its slt_fields attribute is not the JSON "
            "index of fields that slt writes; was the file edited?)"
        )
    values, missing = {}, []
    for field in dataclasses.fields(cls):
        entry = index.get(field.name)
        if entry is None:
            if (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                missing.append(field.name)
            continue
        try:
            if entry["kind"] == "array":
                node = tree if entry["group"] == "/" else tree[entry["group"]]
                values[field.name] = np.asarray(node[entry["name"]].values)
            else:
                values[field.name] = _decode(entry["kind"], root[field.name])
        except KeyError:  # indexed but gone: the file was edited
            missing.append(field.name)
    if missing:
        raise ValueError(f"{path} lacks field(s) {', '.join(missing)} of {cls.__name__}")
    return cls(**values)


def _sample_shape(values) -> tuple[int | None, int | None]:
    """(chains, draws) from the first 2-d array (the trace), else chains from a 1-d one."""
    arrays = [v for v in values if isinstance(v, np.ndarray)]
    for a in arrays:
        if a.ndim >= 2:
            return a.shape[0], a.shape[1]
    return next(((a.shape[0], None) for a in arrays if a.ndim == 1), (None, None))


def _place(name: str, value: np.ndarray, chains, draws) -> tuple[str, str, tuple[str, ...]]:
    """(group, variable name, dims) of an array field, from its shape."""
    if value.ndim >= 2 and value.shape[:2] == (chains, draws):
        group = "posterior" if name in _POSTERIOR else "sample_stats"
        var, lead = _POSTERIOR.get(name) or _STATS.get(name, name), ("chain", "draw")
    elif value.ndim >= 1 and value.shape[0] == chains:
        group, var, lead = "sample_stats", _STATS.get(name, name), ("chain",)
    else:
        group, var, lead = "/", name, ()
    return group, var, lead + tuple(f"{var}_dim_{k}" for k in range(value.ndim - len(lead)))


def _describe(var: str) -> dict:
    return {"long_name": _DESCRIPTIONS[var]} if var in _DESCRIPTIONS else {}


def _kind(name: str, value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool | np.bool_):
        return "bool"
    if isinstance(value, np.generic):
        return "numpy"  # keeps its dtype (np.float32 stays np.float32)
    if isinstance(value, str) and not _utf8(value):
        return "json"  # a name from os.fsdecode of other bytes: escaped, it round-trips
    for kind, types in (("int", int), ("float", float), ("str", str)):
        if isinstance(value, types):
            return kind
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "json"
    for kind, types in (("tuple", tuple), ("list", list), ("json", dict)):
        if isinstance(value, types):
            return kind
    raise TypeError(
        f"cannot save field {name!r} of type {type(value).__name__}: slt.io saves arrays, "
        "numbers, strings, bools, None, tuples, lists, dicts and dataclasses of these"
    )


def _encode(kind: str, value):
    if kind == "none":
        return "None"
    if kind == "bool":
        return int(value)
    if kind == "int":
        return int(value) if _INT64[0] <= value <= _INT64[1] else str(value)
    if kind == "tuple":  # a plain JSON list at the top, readable without slt
        return _dumps([_to_json(v) for v in value])
    if kind in ("list", "json"):
        return _dumps(_to_json(value))
    return value


def _utf8(text: str) -> bool:
    """Whether netCDF can store ``text`` (lone surrogates, from undecodable bytes, not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dumps(value) -> str:
    """JSON text, readable (non-ASCII kept) unless that cannot be stored as UTF-8."""
    text = json.dumps(value, ensure_ascii=False)
    return text if _utf8(text) else json.dumps(value)


def _decode(kind: str, stored):
    if kind == "none":
        return None
    if kind == "bool":
        return bool(int(stored))
    if kind == "int":
        return int(stored)
    if kind == "float":
        return float(stored)
    if kind == "str":
        return str(stored)
    if kind == "tuple":
        return tuple(json.loads(stored, object_hook=_from_json))
    if kind in ("list", "json"):
        return json.loads(stored, object_hook=_from_json)
    return stored  # "numpy": the stored numpy scalar, dtype kept


def _to_json(value):
    """JSON-able form of a value nested in a field; tagged where JSON would lose the type."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, np.ndarray):
        return {
            "__ndarray__": value.ravel().tolist(),
            "dtype": value.dtype.str,
            "shape": value.shape,
        }
    if isinstance(value, np.generic):
        return {"__numpy__": value.item(), "dtype": value.dtype.str}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"cannot save a dict with non-string keys: {list(value)[:5]}")
        return {k: _to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot save {value!r} of type {type(value).__name__} inside a field")


def _from_json(obj: dict):
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
    if "__numpy__" in obj:
        return np.array(obj["__numpy__"], dtype=obj["dtype"])[()]
    if "__tuple__" in obj:
        return tuple(obj["__tuple__"])
    if "__dataclass__" in obj:
        module, _, qualname = obj["__dataclass__"].partition(":")
        cls = None
        if module == "slt" or module.startswith("slt."):  # never import what a file names
            try:
                cls = importlib.import_module(module)
                for part in qualname.split("."):
                    cls = getattr(cls, part)
            except (ImportError, AttributeError):
                cls = None
        if cls is None or not dataclasses.is_dataclass(cls):
            warnings.warn(f"cannot rebuild {obj['__dataclass__']}; kept as a dict", stacklevel=4)
            return obj["fields"]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in obj["fields"].items() if k in known})
    return obj


def _provenance() -> dict:
    """The attributes ArviZ puts on every group."""
    from slt import __version__

    return {
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "creation_library": "slt",
        "creation_library_version": __version__,
        "creation_library_language": "Python",
        "inference_library": "slt",
        "inference_library_version": __version__,
    }


def _result_type(name: str, path: Path) -> type:
    if name not in _RESULT_TYPES:
        raise ValueError(f"{path} holds a {name!r}; slt.load reads {sorted(_RESULT_TYPES)}")
    target = _RESULT_TYPES[name]
    if isinstance(target, str):
        module, attr = target.split(":")
        target = getattr(importlib.import_module(module), attr)
    return target
