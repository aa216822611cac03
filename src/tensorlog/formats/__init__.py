"""Readers: every layout tensorlog knows, turned into the same :class:`Run` objects.

One module per format: :mod:`.tensorlog` (tensorlog's layouts and the reference
logger's dumps), :mod:`.passdump` (vLLM's debug-tensor-dump proposal),
:mod:`.msprobe` (msProbe dumps). A new foreign format is one more module here
and one more line in :data:`_READERS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..errors import RunReadError
from .model import ModuleCall, Run, Step, TensorRecord
from .msprobe import is_msprobe_dump, load_msprobe_dump
from .parts import merge_parts, merge_step_streams, read_parts_file
from .passdump import is_pass_dump, load_pass_dump
from .safeio import Listing
from .tensorlog import is_tensorlog_run, load_tensorlog_run, tensorlog_steps

__all__ = ["load_run", "iter_run", "run_parts", "RunSource", "Run", "Step", "ModuleCall", "TensorRecord"]

RunSource = str | Path | Sequence[str | Path]
"""A run directory, a parts file listing several, or a list of directories (each holding some of the ranks)."""

_READERS: list[tuple[str, Callable[[Path, Listing], bool], Callable[[Path, Listing], Run]]] = [
    ("pass-dump", is_pass_dump, load_pass_dump),
    ("msprobe", lambda p, _: is_msprobe_dump(p), lambda p, _: load_msprobe_dump(p)),
    ("tensorlog", lambda p, listing: is_tensorlog_run(listing), load_tensorlog_run),
]


def _reader(p: Path, listing: Listing) -> Callable[[Path, Listing], Run] | None:
    for _, test, load in _READERS:
        if test(p, listing):
            return load
    return None


def _unusable(path: str | Path, e: OSError | RuntimeError) -> RunReadError:
    """A path the OS refuses before anything is read: a name too long, an unknown ~user, a symlink loop."""
    return RunReadError(f"cannot use {str(path)[:200]!r} as a run: {getattr(e, 'strerror', None) or e}")


def resolve_run_dir(path: str | Path) -> tuple[Path, Listing]:
    """A run directory itself, or an output dir that holds exactly one run."""
    try:
        p = Path(path).expanduser()
        if not p.exists():
            raise RunReadError(f"no such directory: {p}")
        if not p.is_dir():
            raise RunReadError(f"not a directory: {p}")
    except (OSError, RuntimeError) as e:  # a name too long, an unknown ~user, a symlink loop
        raise _unusable(path, e) from None
    listing = Listing(p)
    if _reader(p, listing) is not None:
        return p, listing
    runs = []
    for _, d in sorted(listing.dirs.items()):
        sub = Listing(d)
        if _reader(d, sub) is not None:
            runs.append((d, sub))
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise RunReadError(f"{p} is not a tensorlog run (no run.json, step_N/, Pass or msProbe files) and holds no run")
    listed = ", ".join(r.name for r, _ in runs[:5]) + (" ..." if len(runs) > 5 else "")
    raise RunReadError(f"{p} holds {len(runs)} runs ({listed}); pass one of them")


def run_parts(source: RunSource) -> list[tuple[Path, str | None]]:
    """The directories a run is read from, each with the node a parts file names for it (else None).

    Raises:
        RunReadError: an empty list, or a parts file that cannot be read.
    """
    if isinstance(source, (str, Path)):
        try:
            p = Path(source).expanduser()
            is_parts = p.is_file() and p.suffix == ".json"
        except (OSError, RuntimeError) as e:
            raise _unusable(source, e) from None
        return _distinct(read_parts_file(p)) if is_parts else [(p, None)]
    items = [x for s in source for x in run_parts(s)]
    if not items:
        raise RunReadError("no run directory given")
    return _distinct(items)


def _distinct(items: list[tuple[Path, str | None]]) -> list[tuple[Path, str | None]]:
    """A directory listed twice (under any name) is refused before anything is read: one stat per part."""
    seen: dict[object, Path] = {}
    for p, _ in items:
        try:
            st = os.stat(p)
            key: object = (st.st_dev, st.st_ino)
        except (OSError, ValueError):
            key = str(p)
        if key in seen:
            raise RunReadError(f"the run's parts list one directory twice: {seen[key]} and {p}")
        seen[key] = p
    return items


def load_run(path: RunSource) -> Run:
    """Read a run: tensorlog's layouts, a reference (vLLM) dump, a ``Pass00000.pt`` dump, or an msProbe dump.

    Args:
        path (str | Path | list): the run directory, or an output directory that
            holds exactly one run. A run whose ranks were written on several
            nodes: a list of its directories, or a parts file
            (``{"format": "tensorlog-run-parts", "parts": [{"path": ...}, ...]}``);
            the parts are merged as the ranks of one directory are.

    Returns:
        Run: steps, module calls in execution order, lazily loaded tensors.
        Files that cannot be read are listed in ``run.problems`` and on the
        calls they belong to; they never make loading fail.

    Raises:
        RunReadError: the path is missing, is not a run, or holds several; parts
            of different layouts, or two parts that hold the same rank.

    Example:
        >>> run = tensorlog.load_run("/tmp/tensorlog/baseline")
        >>> [c.dirname for c in run.steps[0].calls][:3]
        ['model.embed_tokens', 'model.layers.0', 'model.layers.0.input_layernorm']
    """
    parts = run_parts(path)
    return merge_parts([_load_one(p) for p, _ in parts])


def _load_one(path: Path) -> Run:
    p, listing = resolve_run_dir(path)
    loader = _reader(p, listing)
    assert loader is not None
    return loader(p, listing)


def iter_run(source: RunSource) -> tuple[Run, int, Iterator[Step]]:
    """A run without its steps, how many steps it has, and the steps one at a time, merged across parts.

    For a run too long to hold (hours of statistics): tensorlog's layouts are read a
    step at a time, so memory is one step's records; other layouts are read whole.
    ``problems`` of the returned run grows as the steps are read.

    Raises:
        RunReadError: as :func:`load_run`.
    """
    shells: list[Run] = []
    numbers: set[int] = set()
    streams: list[Iterator[Step]] = []
    problems: list[str] = []
    for path, _ in run_parts(source):
        p, listing = resolve_run_dir(path)
        loader = _reader(p, listing)
        if loader is load_tensorlog_run:
            shell, indexes, steps = tensorlog_steps(p, listing, problems)
        else:
            assert loader is not None
            shell = loader(p, listing)
            problems.extend(shell.problems)
            indexes, steps = list(shell.steps), iter(list(shell.steps.values()))
            shell.steps = {}
        shells.append(shell)
        numbers.update(indexes)
        streams.append(steps)
    run = merge_parts(shells)
    run.problems = problems  # the readers append to it as the steps are read
    return run, len(numbers), merge_step_streams(streams)
