"""Snapshots: what of each tensor must survive the call, taken in the hook at the least cost.

For each leaf of a call the snapshotter decides, once:

* a tensor already snapshotted in this step and unchanged since (same object,
  same version counter: a module's input is usually the previous module's
  output) is not copied again: its file is hard-linked and its statistics shared;
* the data that must be kept (tensor mode; small tensors' values; checksums)
  is copied to a private host buffer, reserved first against
  ``max_pending_bytes``; CUDA tensors are copied without blocking, on a side
  stream, into pinned memory;
* statistics are computed where the tensor lives, in two reductions, and read
  back once per step (:mod:`tensorlog.storage.stats`), except for CPU tensors
  that are copied anyway, whose statistics the writer takes from the copy off
  the model's thread.

The shared-tensor cache holds weak references only: it never keeps a tensor
(or its copy) alive, so it costs no memory beyond the budget.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..config import LogConfig, Selector
from ..schema import names
from ..schema import reference as ref
from ..schema.leaves import Leaf, describe_value
from ..storage import stats as _stats
from ..storage.records import TensorSnap

__all__ = ["Snapshotter"]


class Snapshotter:
    """Owned by the model's thread. One per capture; :meth:`begin_step` forgets the previous step."""

    def __init__(self, config: LogConfig, selector: Selector, rank: int | None, layout: str) -> None:
        self.config = config
        self.selector = selector
        self.rank = rank
        self.layout = layout  # "reference", "packed" or "statistics"
        self.ext = "safetensors" if config.format == "safetensors" else "pt"
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int, TensorSnap]] = {}
        self._parts: list[list[torch.Tensor]] = []
        self._streams: dict[int | None, Any] = {}

    def begin_step(self) -> None:
        self._seen = {}
        self._parts = []

    def take_stats(self) -> list[list[torch.Tensor]]:
        """The step's device-side partial statistics (one list per row), handed to the writer once."""
        parts, self._parts = self._parts, []
        return parts

    def plan(self, kind: str, leaves: list[Leaf], used: set[str]) -> tuple[list[TensorSnap], int]:
        """Snapshots for ``leaves`` (metadata only) and the bytes their host copies will need.

        ``used`` holds the stems already taken in this call, so that no two leaves share a file.
        """
        cfg = self.config
        snaps: list[TensorSnap] = []
        need = 0
        for path, v in leaves:
            stem = _unique(names.safe_stem(names.tensor_stem(kind, path)), used)
            key = "_".join(path) if path else None
            if not isinstance(v, torch.Tensor):
                snaps.append(
                    TensorSnap(
                        name=f"{stem}_value" + ("" if self.rank is None else f"_rank{self.rank}"),
                        kind=kind,
                        key=key,
                        path=path,
                        stem=stem,
                        tensor=False,
                        value=describe_value(v),
                    )
                )
                continue
            t = v.detach()
            strided = t.layout == torch.strided
            device = str(t.device)
            s = TensorSnap(
                name=names.tensor_file(stem, device, self.rank, "x")[:-2],
                kind=kind,
                key=key,
                path=path,
                stem=stem,
                shape=list(t.shape),
                dtype=str(t.dtype),
                device=device,
                stride=list(t.stride()) if strided else None,
                numel=t.numel(),
                parameter=isinstance(v, torch.nn.Parameter),
            )
            s.host = v  # the live tensor, until copy() replaces it by a private copy (or drops it)
            if not self.selector.device(t.device):
                s.skipped = "device_names"
            elif cfg.max_tensor_size is not None and t.numel() > cfg.max_tensor_size:
                s.skipped = "max_tensor_size"
                if self.layout == "reference" and path:  # a single output's sidecar would be outputs.json itself
                    s.sidecar = ref.sidecar(t, cfg.max_tensor_size)
            prev = self._seen_before(v) if s.skipped is None else None
            if prev is not None:
                s.same_as = prev
                s.file = names.tensor_file(stem, device, self.rank, self.ext) if prev.file else None
            elif s.skipped is None and strided:
                small = t.numel() <= cfg.small_tensor_values
                keep_file = cfg.mode == "tensor"
                if keep_file or small or cfg.mode == "md5":
                    need += t.numel() * t.element_size()
                    s.file = names.tensor_file(stem, device, self.rank, self.ext) if keep_file else None
                    s.want_values = small
                    s.want_checksum = cfg.mode == "md5"
            snaps.append(s)
        return snaps, need

    def copy(self, snaps: list[TensorSnap]) -> bool:
        """Make the planned host copies and start the statistics; True when a CUDA copy is in flight."""
        on_cuda = False
        for s in snaps:
            live = s.host
            if live is None or not s.tensor:
                continue
            s.host = None
            t = live.detach()
            if s.same_as is not None:
                continue
            keep = s.skipped is None and (s.file is not None or s.want_values or s.want_checksum)
            cuda = t.device.type == "cuda"
            if keep:
                s.host = _host_copy(t, self._stream(t.device) if cuda else None)
                on_cuda |= cuda
            if s.skipped != "device_names":
                if keep and not cuda and s.host is not None:
                    s.stats_from_host = True  # the writer takes them from the copy, off this thread
                else:
                    s.stats_row = len(self._parts)
                    self._parts.append(_stats.partial_stats(t))
            if s.skipped is None:
                self._remember(live, s)
        return on_cuda

    def _seen_before(self, t: torch.Tensor) -> TensorSnap | None:
        entry = self._seen.get(id(t))
        if entry is None:
            return None
        ref_, version, snap = entry
        if ref_() is not t or t.is_inference() or t._version != version:
            return None
        return snap

    def _remember(self, t: torch.Tensor, snap: TensorSnap) -> None:
        if t.is_inference():  # no version counter: an in-place change would go unnoticed
            return
        try:
            self._seen[id(t)] = (weakref.ref(t), t._version, snap)
        except TypeError:
            pass

    def _stream(self, device: torch.device) -> Any:
        stream = self._streams.get(device.index)
        if stream is None:
            stream = self._streams[device.index] = torch.cuda.Stream(device)
        return stream

    def ready_event(self, device_index: int | None) -> Any:
        """An event recorded on the copy stream: the writer waits on it before reading the copies."""
        ev = torch.cuda.Event()
        ev.record(self._streams.get(device_index))
        return ev


def _unique(stem: str, used: set[str]) -> str:
    out, n = stem, 0
    while out in used:
        n += 1
        out = f"{stem}~{n}"
    used.add(out)
    return out


def _host_copy(t: torch.Tensor, stream: Any = None) -> torch.Tensor:
    """A private, contiguous host copy.

    CUDA tensors are copied without blocking into pinned memory on a side stream
    that first waits for the work that produced them; ``record_stream`` keeps the
    allocator from reusing their memory before the copy is done.
    """
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(stream)
        return host
    return t.to("cpu").clone(memory_format=torch.contiguous_format)
