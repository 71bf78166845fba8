"""The results file of :func:`slt.llc_trajectory`: JSON lines, one per finished checkpoint.

Line 1 is a header: ``{"slt_trajectory": 1, "settings": {...}, "settings_hash": ...}``,
the settings that every row was computed with. Each further line is one checkpoint's row
(λ̂, its errors and diagnostics, L_n(w*), warnings, the checkpoint's SHA-256 and the
settings hash), appended in a single ``write`` and flushed to disk (``fsync``) as soon as
that checkpoint finishes. A process killed mid-write leaves at most a partial last line,
which :func:`read` drops and :meth:`ResultsFile.open` cuts off before appending again;
every complete line is kept. Non-finite numbers are written as ``null`` (plain JSON),
read back as NaN.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from slt import _json

FORMAT = 1


class SettingsChangedError(ValueError):
    """The results file was written with other settings than this run's."""


@dataclass
class Contents:
    """What a results file holds: its header and its complete rows, in file order."""

    header: dict | None = None
    rows: list[dict] = field(default_factory=list)
    partial_tail: int = 0  # bytes of an unfinished last line (a killed write)


def read(path: str | os.PathLike) -> Contents:
    """Parse a results file; a missing or empty file gives empty contents."""
    path = Path(path)
    if not path.exists():
        return Contents()
    data = path.read_bytes()
    complete, _, tail = data.rpartition(b"\n")
    out = Contents(partial_tail=len(tail))
    if not complete and not tail:
        return out
    lines = complete.split(b"\n") if complete else []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if out.header is None:  # a binary file, or text that is not ours
                raise ValueError(
                    f"{path} is not an slt trajectory results file (no header); use another "
                    "file, or pass overwrite=True to replace it"
                ) from None
            raise ValueError(
                f"{path}, line {number}: not valid JSON ({getattr(err, 'msg', err)}); the "
                "results file is corrupt (only a killed write's last line is repaired "
                "automatically)"
            ) from None
        if out.header is None:
            if not isinstance(record, dict) or record.get("slt_trajectory") is None:
                raise ValueError(
                    f"{path} is not an slt trajectory results file (no header); use another "
                    "file, or pass overwrite=True to replace it"
                )
            if int(record["slt_trajectory"]) > FORMAT:
                raise ValueError(
                    f"{path} has trajectory format {record['slt_trajectory']}, newer than "
                    f"this slt's {FORMAT}; upgrade slt to resume it"
                )
            out.header = record
        else:
            out.rows.append(_from_json(record))
    if out.header is None and tail.strip():  # slt writes its header whole, with a newline
        raise ValueError(
            f"{path} is not an slt trajectory results file (no header); use another file, or "
            "pass overwrite=True to replace it"
        )
    return out


def settings_diff(old: dict, new: dict, *, defaults: dict | None = None) -> list[str]:
    """``"key: old -> new"`` for every differing entry of two (nested) settings dicts.

    A key present on one side only counts as a difference unless its value there equals
    ``defaults[key]`` (a setting added to ``estimate_llc`` later, left at its default).

    >>> old, new = {"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": None}
    >>> settings_diff(old, new, defaults={"d": None})
    ['b.c: 2 -> 3']
    """
    defaults = defaults or {}
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in settings_diff(a, b, defaults=defaults.get(key))]
            continue
        default = defaults.get(key, _MISSING)
        if (
            _MISSING in (a, b)
            and default is not _MISSING
            and _same(a if b is _MISSING else b, default)
        ):
            continue
        if a is _MISSING or b is _MISSING or not _same(a, b):
            out.append(f"{key}: {_show(a)} -> {_show(b)}")
    return out


_MISSING = object()


def _same(a, b) -> bool:
    return json.dumps(numbers_normalised(a), sort_keys=True, default=repr) == json.dumps(
        numbers_normalised(b), sort_keys=True, default=repr
    )


def numbers_normalised(value):
    """``value`` with every whole float written as an int (``1.0`` -> ``1``), so that equal
    numbers spelled differently compare and hash the same; lists and dicts recursively.

    >>> numbers_normalised({"localization": 1.0, "step_size": [1e-4, 2.0], "ok": True})
    {'localization': 1, 'step_size': [0.0001, 2], 'ok': True}
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: numbers_normalised(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [numbers_normalised(v) for v in value]
    return value


def _show(value) -> str:
    return "(absent)" if value is _MISSING else json.dumps(value, default=repr)


class ResultsFile:
    """Append-only writer; :meth:`open` checks the header against this run's settings."""

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path) or os.path.isdir(path):
            raise ValueError(
                f"results={path!r} must be the path of a file (new or a results file), "
                "not a folder or an empty name"
            )
        self.path = Path(path)
        self._header: dict | None = None  # a header to write with the first row
        self._new = False  # and the file did not exist: created, not replaced

    def open(self, settings: dict, settings_hash: str, *, overwrite: bool, defaults: dict):
        """The rows already in the file, after checking they share this run's settings.

        A file written with other settings raises :class:`SettingsChangedError` naming
        them, unless ``overwrite``, which discards it, or it holds no rows. A partial last
        line is cut off. A new header is written with the first row (:meth:`append`), so
        a run that fails before finishing a checkpoint (a bad setting) leaves the file as
        it was.
        """
        if not self.path.parent.is_dir():
            raise FileNotFoundError(
                f"results={str(self.path)!r}: folder {self.path.parent} does not exist"
            )
        contents = read(self.path) if not overwrite else Contents()
        diff = []
        if contents.header is not None and contents.header["settings_hash"] != settings_hash:
            # the hash covers every estimate_llc option, so it changes when slt gains one;
            # a file whose only differences are options added since, at their defaults, is
            # resumed
            diff = settings_diff(contents.header["settings"], settings, defaults=defaults)
        if diff and contents.rows:
            what = "; ".join(diff)
            raise SettingsChangedError(
                f"results file {self.path} holds {len(contents.rows)} checkpoint(s) computed "
                f"with other settings ({what}). Rerun with the settings it was written with, "
                "write to another results file, or pass overwrite=True to discard it"
            )
        if contents.header is None or diff:  # new, empty, discarded, or no rows of its own
            self._new = not self.path.exists()
            self._header = {
                "slt_trajectory": FORMAT,
                "settings_hash": settings_hash,
                "settings": settings,
                "created_at": _now(),
            }
            return []
        if contents.partial_tail:
            with open(self.path, "r+b") as f:
                f.truncate(f.seek(0, os.SEEK_END) - contents.partial_tail)
        # rows of this run's settings, or of the header's where those differ only by options
        # added since (above)
        ours = {settings_hash, contents.header["settings_hash"]}
        stale = [r for r in contents.rows if r.get("settings_hash") not in ours]
        if stale:
            raise ValueError(
                f"results file {self.path}: {len(stale)} row(s) carry a settings hash other "
                "than its header's; the file was edited or mixed. Use another file or "
                "overwrite=True"
            )
        return contents.rows

    def append(self, row: dict) -> None:
        """Write one row as one line, flushed to disk before returning (the first row of a
        new file together with its header: created, or replacing what was there)."""
        line = (_json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        if self._header is not None:
            head = (json.dumps(self._header, default=repr) + "\n").encode("utf-8")
            header_hash, self._header = self._header["settings_hash"], None
            if not self._new:
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    f.write(head + line)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                return
            if self._created(head + line, header_hash):
                return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _created(self, data: bytes, settings_hash: str) -> bool:
        """Create the new file with ``data``; False if another run created it meanwhile
        with these settings (append to it then: its rows stay), an error if with others."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            header = read(self.path).header
            if header is None or header["settings_hash"] != settings_hash:
                raise SettingsChangedError(
                    f"results file {self.path} was created by another run meanwhile, with "
                    "other settings; use another results file"
                ) from None
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


_FLOATS = {"llc", "llc_std", "mcse", "rhat", "ess_bulk", "ess_tail", "init_loss", "nbeta",
           "step_size", "mala_acceptance", "seconds"}  # fmt: skip


def _from_json(row: dict) -> dict:
    for key in _FLOATS & set(row):
        if row[key] is None:
            row[key] = math.nan
    if isinstance(row.get("llc_per_chain"), list):
        row["llc_per_chain"] = [math.nan if v is None else v for v in row["llc_per_chain"]]
    return row
