"""Reading a run as if every file in it were hostile.

* Only regular files are read, never through a symbolic link (a run written by
  tensorlog or the reference never contains one): a link anywhere in a run is a
  per-file error, which makes compare exit 2.
* Every json file has a size limit, checked before reading, and nesting is
  limited by the parser; its content is validated against the typed records
  before a field is used.
* Temporary files of a writer that died are never read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError

from ..errors import RunReadError
from ..schema import names
from ..storage.tensorfile import read_limited

__all__ = ["Listing", "list_dir", "read_json", "read_model", "SMALL_JSON", "INDEX_JSON", "first_error"]

SMALL_JSON = 16 << 20
"""``run.json``, a call's ``inputs.json``: far smaller in any real run."""
INDEX_JSON = 32 << 20
"""A step index (and a packed file's header): about 1 KB per logged call, so room for some 30,000 calls; parsing
a hostile one of this size into Python objects takes about half a GB."""

M = TypeVar("M", bound=BaseModel)


class Listing:
    """A directory's entries, split into real directories and regular files; links and oddities refused."""

    def __init__(self, d: Path) -> None:
        self.dirs: dict[str, Path] = {}
        self.files: dict[str, Path] = {}
        self.refused: list[str] = []
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            self.refused.append(f"cannot list {d}: {e.strerror or e}")
            return
        for entry in entries:
            name = entry.name
            if names.is_temp_name(name):
                continue
            try:
                if entry.is_symlink():
                    self.refused.append(f"refusing {Path(entry.path)}: a symbolic link (a run never contains one)")
                elif entry.is_dir(follow_symlinks=False):
                    self.dirs[name] = Path(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    self.files[name] = Path(entry.path)
                else:
                    self.refused.append(f"refusing {Path(entry.path)}: not a regular file")
            except OSError as err:
                self.refused.append(f"cannot read {Path(entry.path)}: {err.strerror or err}")


def list_dir(d: Path) -> Listing:
    return Listing(d)


def read_json(path: Path, limit: int = SMALL_JSON) -> Any:
    """Parsed json (NaN and Infinity allowed), size- and depth-limited."""
    data = read_limited(path, limit)
    try:
        return pydantic_core.from_json(data, allow_inf_nan=True)
    except ValueError as e:
        raise RunReadError(f"cannot read {path}: invalid JSON: {str(e)[:200]}") from None


def read_model(path: Path, model: type[M], limit: int = SMALL_JSON) -> M:
    """A json file validated against ``model``; any mismatch is one ``RunReadError`` naming the field."""
    data = read_limited(path, limit)
    try:
        return model.model_validate_json(data)
    except ValidationError as e:
        raise RunReadError(f"cannot read {path}: {first_error(e)}") from None


def first_error(e: ValidationError) -> str:
    errs = e.errors()
    if not errs:
        return str(e)[:200]
    x = errs[0]
    where = ".".join(str(p) for p in x.get("loc", ())) or "<document>"
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{where}: {x.get('msg', '')[:160]}{more}"


def as_number(v: Any) -> float | None:
    """A number as a dump may write it: a JSON number, or a string such as ``"nan"`` / ``"inf"``; else None."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None
