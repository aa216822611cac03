"""The run directory: claimed once, atomically, and described by ``run.json`` and ``modules.json``."""

from __future__ import annotations

import datetime as _dt
import errno
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import LogConfig
from ..errors import ConfigError
from ..schema import names
from ..schema.records import NodeInfo, RunManifest
from ..storage.atomic import RunRoot, remove_file, sweep_temps, write_atomic

__all__ = ["RunInfo", "claim_run_dir", "release_run_dir", "release_claim", "base_manifest", "write_module_tree", "now"]


@dataclass
class RunInfo:
    """Facts about the process that ``run.json`` records; integrations add theirs in ``facts``."""

    rank: int | None = None
    world_size: int | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    @property
    def file_rank(self) -> int | None:
        """The rank that goes into file names: only when several ranks share a directory."""
        return self.rank if (self.world_size or 1) > 1 else None


class UnusableOutputDir(Exception):
    """The output directory cannot be written: logging is off for this run, the model runs on."""


def claim_run_dir(config: LogConfig, rank: int | None) -> Path:
    """Create the run directory and claim it by creating its ``run.json`` exclusively.

    Two processes given the same run name cannot both write into it: the second
    is refused (``ConfigError``), or with ``unique_run_name`` gets
    ``<name>-1``, ``<name>-2``, ...

    Raises:
        ConfigError: the run name is taken.
        UnusableOutputDir: the directory cannot be created or written.
    """
    base = path = Path(os.path.abspath(config.run_dir))  # absolute: a later chdir must not move where files go
    n = 0
    while True:
        try:
            path.mkdir(parents=True, exist_ok=True)
            RunRoot.adopt(path, _claim(path, rank))  # held from here: every later write is confined to it
            if rank is not None:
                sweep_temps(path)  # a shared run directory: what this host's dead writers left
            return path
        except FileExistsError:
            if path.is_dir() and not config.unique_run_name:
                raise ConfigError(
                    f"run directory {path} already holds a run; choose another run_name, omit it for a fresh "
                    "uuid, or set unique_run_name to get a numbered one"
                ) from None
            if not path.is_dir() and not config.unique_run_name:
                raise UnusableOutputDir(f"{path} exists and is not a directory") from None
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        except OSError as e:
            raise UnusableOutputDir(f"cannot create the run directory {path}: {e.strerror or e}") from None


def _claim(path: Path, rank: int | None) -> int:
    """Create the rank's ``run.json`` exclusively, in ``path`` itself: a run directory that is a symbolic link
    (planted where the run was to go) is refused, so nothing is written where it points."""
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnusableOutputDir(f"{path} is a symbolic link or not a directory; a run directory must be its own") from None
        raise
    try:
        fd = os.open(names.run_file(rank), os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        os.close(fd)
    except BaseException:
        os.close(dfd)
        raise
    return dfd


def release_run_dir(path: Path, rank: int | None) -> None:
    """Give back a claimed run directory that nothing could be written to (its empty ``run.json``; the directory
    too, when no other rank has written there), so no run that never started is left to read."""
    for leftover in (path / names.modules_file(rank), path / names.run_file(rank)):
        try:
            remove_file(leftover)  # through the claim's descriptor: never what a swapped-in link points to
        except OSError:
            pass
    release_claim(path)
    try:
        path.rmdir()  # only when empty, and never a link
    except OSError:
        pass


def release_claim(path: Path) -> None:
    """The claim's hold on the run directory ends (the writer holds its own while it writes)."""
    root = RunRoot.of(os.path.join(os.path.abspath(os.fspath(path)), "x"))
    if root is not None:
        root.release()


def base_manifest(config: LogConfig, model: torch.nn.Module, info: RunInfo, *, layout: str, path: Path) -> RunManifest:
    from ..version import __version__

    cfg = config.model_dump(mode="json")
    data: dict[str, Any] = {
        "tensorlog_version": __version__,
        "torch_version": torch.__version__,
        "config": cfg,
        "layout": layout,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "host": socket.gethostname(),
        "node": node_info(path),
        "pid": os.getpid(),
        "rank": info.rank,
        "world_size": info.world_size,
        "start_time": now(),
        "grafted_from": str(Path(config.reload_input_dir).expanduser().resolve()) if config.reload_input_dir else None,
        **info.facts,
    }
    return RunManifest.model_validate(data)


def node_info(path: Path) -> NodeInfo:
    """Where this rank's files are: a run spread over several nodes is read back part by part, on each node."""
    return NodeInfo(hostname=socket.gethostname(), ray_node_id=_ray_node_id(), path=str(path.resolve()))


def _ray_node_id() -> str | None:
    ray = sys.modules.get("ray")  # only when the process already runs under Ray: never import it here
    try:
        return str(ray.get_runtime_context().get_node_id()) if ray is not None and ray.is_initialized() else None
    except Exception:  # a Ray too old or too new for this call: the hostname still says where
        return None


def write_module_tree(path: Path, model: torch.nn.Module, rank: int | None) -> None:
    """``modules.json``: each module's class and children, for readers that walk the hierarchy."""
    import json

    tree = {
        n: {"class": type(m).__name__, "children": [f"{n}.{c}" if n else c for c, _ in m.named_children()]}
        for n, m in model.named_modules()
    }
    write_atomic(path / names.modules_file(rank), [json.dumps(tree, separators=(",", ":")).encode()])


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
