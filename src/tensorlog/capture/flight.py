"""The flight recorder's output: watched steps, kept in memory, written out as an ordinary statistics run.

The steps go through the same :class:`Recorder` and :class:`Writer` as a
capture's, as graph values whose statistics were measured already, so the
run reads, compares and exports like any other. Its steps keep the engine's
step numbers, and ``detect_anomaly`` names where the first NaN/Inf was born.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import LogConfig
from ..config.selection import Selector
from ..schema.records import Anomaly
from .compiled import rebuild
from .handle import open_writer
from .recorder import Recorder
from .run import RunInfo, UnusableOutputDir, claim_run_dir, release_claim, release_run_dir, write_module_tree
from .watch import WatchedStep

__all__ = ["write_watched_run"]


def write_watched_run(
    config: LogConfig, model: torch.nn.Module, info: RunInfo, steps: list[WatchedStep], run_name: str
) -> tuple[Path, Anomaly | None]:
    """Write ``steps`` as statistics run ``run_name`` in ``config``'s output directory; returns its path and
    the first NaN/Inf in it. Runs on the caller's thread and returns once every file is on disk.

    Raises:
        OSError: the run directory cannot be made or written.
    """
    cfg = config.with_overrides(
        run_name=run_name,
        unique_run_name=True,
        mode="statistics",
        detect_anomaly=True,
        stop_on_anomaly=False,
        log_step_ids=[],
        async_write=False,
        parquet_window=None,
        retain_steps=None,
        retain_bytes=None,
        max_total_bytes=None,
        watch_every=None,
    )
    rank = info.file_rank
    try:
        path = claim_run_dir(cfg, rank)
    except UnusableOutputDir as e:
        raise OSError(str(e)) from None
    try:
        write_module_tree(path, model, rank)
        writer = open_writer(cfg, model, info, path)
    except OSError:
        release_run_dir(path, rank)
        raise
    release_claim(path)
    rec = Recorder(cfg, Selector(cfg), writer, rank=rank, layout=writer.layout)
    try:
        for st in steps:
            rec.state.index = st.step
            rec.begin_step()
            for call in st.calls:
                args, kwargs = rebuild(list(call.values), call.leaves)
                if call.kind == "input":
                    rec.enter(call.module, call.cls, args, kwargs, None)
                elif rec.open_calls(call.module):
                    rec.leave(call.module, args[0] if args else None)
            done = rec.end_step(st.info)
            if done is not None:
                writer.wait_step(done)
    finally:
        writer.close(complete=True)
    return path, writer.anomaly
