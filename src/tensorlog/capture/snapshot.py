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

import functools
import weakref
from typing import Any

import torch

from ..config import LogConfig
from ..config.selection import Selector
from ..schema import names
from ..schema import vllm_json as ref
from ..schema.leaves import Leaf, describe_value
from ..storage import stats as _stats
from ..storage.records import StepEnd, TensorOutcome, TensorPlan
from ..storage.tensorfile import ST_NAMES
from ..storage.writer import Writer
from .graphtap import GraphValue

__all__ = ["Snapshotter"]


class Snapshotter:
    """The recorder's: used on the model's thread, or by a gradient hook under the recorder's lock while the model's
    thread waits in ``backward()``. One per capture; :meth:`begin_step` forgets the previous step."""

    def __init__(self, config: LogConfig, selector: Selector, rank: int | None, layout: str, writer: Writer) -> None:
        self.config = config
        self.selector = selector
        self.rank = rank
        self.layout = layout  # "reference", "packed" or "statistics"
        self.writer = writer
        self.packed = layout == "packed"
        self.in_graph = False
        self._graph_devices: set[int | None] = set()
        """Calls come from taps in a compiled graph: Inductor reuses a buffer for a later value by writing
        into it directly (no version bump), so nothing is shared between calls, and CUDA copies go on the
        current stream, ordered before the graph's next write."""
        self.ext = "safetensors" if config.format == "safetensors" else "pt"
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int, TensorPlan]] = {}
        self._parts: list[list[torch.Tensor]] = []
        self._graph_seen: dict[int, tuple[GraphValue, TensorPlan]] = {}
        """The graph's values planned this step: the object a second tap of one tensor hands over again."""
        self._weights: dict[int, tuple[weakref.ref[torch.Tensor], int, TensorPlan]] = {}
        """Weights whose statistics were taken, across steps (``level: op`` hands them to ops every step)."""
        self._streams: dict[int | None, Any] = {}

    def begin_step(self) -> None:
        self._seen = {}
        self._graph_seen = {}
        self._parts = []

    def end_step(self, end: StepEnd) -> None:
        """Hand the step's last packed chunk and its statistics to the writer: one device-to-host copy per device.

        On CUDA the copy goes to pinned memory without blocking; the writer waits on
        an event for it (and for the copies no writer thread waited for), not the model.
        """
        self.seal(end.step)
        parts, self._parts = self._parts, []
        if parts:
            host = []
            for dev, rows, flat in _stats.gather(parts):
                if dev.type == "cuda":
                    pinned = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
                    pinned.copy_(flat, non_blocking=True)
                    host.append((rows, pinned))
                    ev = torch.cuda.Event()
                    ev.record()
                    end.ready.append(ev)
                else:
                    host.append((rows, flat))
            end.stats = ([len(p) for p in parts], host)
        end.ready += self.copy_events()

    def plan(self, kind: str, leaves: list[Leaf], used: set[str]) -> tuple[list[TensorPlan], list[torch.Tensor | None], int]:
        """Plans for ``leaves`` (metadata only), the tensors :meth:`copy` reads, and the bytes their copies will need.

        The second list holds, for each plan, the tensor to copy and measure (the live tensor, detached, or a
        compiled graph's staged view) or None: the caller holds them until :meth:`copy`, and no longer.
        ``used`` holds the stems already taken in this call, so that no two leaves share a file.
        """
        cfg = self.config
        snaps: list[TensorPlan] = []
        sources: list[torch.Tensor | None] = []
        need = 0
        for path, v in leaves:
            if isinstance(v, GraphValue):
                snap, data = self._plan_graph(kind, path, v, used)
                if data is not None and (snap.file is not None or snap.want_checksum):
                    need += data.numel() * data.element_size()
                snaps.append(snap)
                sources.append(data)
                continue
            if not isinstance(v, torch.Tensor):
                stem = _unique(_stem(kind, path), used)
                snaps.append(
                    TensorPlan(
                        name=f"{stem}_value" + ("" if self.rank is None else f"_rank{self.rank}"),
                        kind=kind,
                        key="_".join(path) if path else None,
                        path=path,
                        stem=stem,
                        result=TensorOutcome(),
                        tensor=False,
                        value=describe_value(v),
                    )
                )
                sources.append(None)
                continue
            t = v.detach()
            dev = t.device
            device, stem, key, name, file = self._names(kind, path, dev, used)
            nested = t.is_nested  # no single shape: recorded by dtype and device only
            strided = t.layout == torch.strided and not nested
            stride = t.stride() if strided else None
            numel = t.numel() if not nested else 0
            parameter = type(v) is not torch.Tensor and isinstance(v, torch.nn.Parameter)
            skipped = None
            sidecar = None
            if not self.selector.device(dev):
                skipped = "device_names"
            elif not plain_data(t):
                skipped = f"a {_kind_of(t)} tensor: no plain data to copy or take statistics of"
                strided = False
            elif cfg.max_tensor_size is not None and numel > cfg.max_tensor_size:
                skipped = "max_tensor_size"
                if self.layout == "reference" and path:  # a single output's sidecar would be outputs.json itself
                    sidecar = ref.sidecar(t, cfg.max_tensor_size)
            prev = self._seen_before(v) if skipped is None else None
            stats = None
            kept_file = None
            pack = want_values = want_checksum = False
            if prev is not None:
                kept_file = file if prev.file else None
            elif parameter and cfg.mode == "statistics":
                stats = self._weight_stats(v)  # a weight is the same every step until something changes it
            elif skipped is None and strided:
                small = numel <= cfg.small_tensor_values
                keep_file = cfg.mode == "tensor"
                if self.packed and keep_file and t.dtype not in ST_NAMES:
                    skipped = f"{t.dtype} cannot be stored in safetensors"
                elif self.packed and keep_file:
                    pack = True  # placed in the step's stream by copy(); bounded by the writer's arena
                    want_values = small
                elif keep_file or small or cfg.mode == "md5":
                    if keep_file or cfg.mode == "md5":  # a few values of a small tensor count as metadata
                        need += numel * t.element_size()
                    kept_file = file if keep_file else None
                    want_values = small
                    want_checksum = cfg.mode == "md5"
            snaps.append(
                TensorPlan(
                    name=name,
                    kind=kind,
                    key=key,
                    path=path,
                    stem=stem,
                    result=TensorOutcome(stats=stats),
                    shape=t.shape if not nested else None,
                    dtype=t.dtype,
                    device=device,
                    stride=stride,
                    numel=numel,
                    parameter=parameter,
                    skipped=skipped,
                    file=kept_file,
                    pack=pack,
                    want_values=want_values,
                    want_checksum=want_checksum,
                    same_as=prev,
                    sidecar=sidecar,
                )
            )
            sources.append(t)
        return snaps, sources, need

    def _names(
        self, kind: str, path: tuple[str, ...], dev: torch.device, used: set[str]
    ) -> tuple[str, str, str | None, str, str]:
        """``(device, stem, key, name, file)`` of a tensor leaf; ``used`` holds the stems this call took."""
        device = _DEVICE_NAMES.get(dev)
        if device is None:
            device = _DEVICE_NAMES[dev] = str(dev)
        stem, key, name, file = _leaf_names(kind, path, device, self.rank, self.ext)
        if stem in used:  # two leaves whose names collide once made safe for a file system
            stem = _unique(stem, used)
            name = names.tensor_file(stem, device, self.rank, "x")[:-2]
            file = names.tensor_file(stem, device, self.rank, self.ext)
        else:
            used.add(stem)
        return device, stem, key, name, file

    def _plan_graph(
        self, kind: str, path: tuple[str, ...], v: GraphValue, used: set[str]
    ) -> tuple[TensorPlan, torch.Tensor | None]:
        """A tensor a compiled graph measured (and staged): its statistics are given; its data, returned beside the
        plan (None where nothing is copied), is a staged view."""
        cfg = self.config
        device, stem, key, name, file = self._names(kind, path, v.device, used)
        numel = v.numel
        prev = self._graph_seen.get(id(v))
        same_as = prev[1] if prev is not None and prev[0] is v else None  # tapped before (an input that was an output)
        stats = _stats.finish(list(v.partial), numel) if v.partial is not None and same_as is None else None
        skipped = kept_file = data = None
        want_values = want_checksum = pack = False
        keep_file = cfg.mode == "tensor"
        small = numel <= cfg.small_tensor_values
        if same_as is not None:
            kept_file = file if same_as.file else None
        elif not self.selector.device(v.device):
            skipped = "device_names"
        elif cfg.max_tensor_size is not None and numel > cfg.max_tensor_size:
            skipped = "max_tensor_size"
        elif not (keep_file or small or cfg.mode == "md5"):
            pass
        elif v.data is None:
            if keep_file or cfg.mode == "md5":
                skipped = (
                    f"not staged by the compiled graph: {v.not_staged}" if v.not_staged else "not staged by the compiled graph"
                )
        else:
            data = v.data
            want_values = small
            want_checksum = cfg.mode == "md5"
            if keep_file and self.packed and v.dtype not in ST_NAMES:
                skipped, data = f"{v.dtype} cannot be stored in safetensors", None
            elif keep_file and self.packed:
                pack = True
            elif keep_file:
                kept_file = file
        s = TensorPlan(
            name=name,
            kind=kind,
            key=key,
            path=path,
            stem=stem,
            result=TensorOutcome(stats=stats),
            shape=v.shape,
            dtype=v.dtype,
            device=device,
            stride=_contiguous_stride(v.shape),
            numel=numel,
            skipped=skipped,
            file=kept_file,
            pack=pack,
            want_values=want_values,
            want_checksum=want_checksum,
            same_as=same_as,
            graph=True,
        )
        if same_as is None:
            self._graph_seen[id(v)] = (v, s)
        return s, data

    def copy(self, snaps: list[TensorPlan], sources: list[torch.Tensor | None], originals: list[Leaf], step: int) -> bool | None:
        """Make the planned host copies and start the statistics; True when a CUDA copy is in flight.

        ``sources`` are what :meth:`plan` returned beside ``snaps``, ``originals`` the leaves they were planned
        from: the objects the next call will see again (a detached tensor is a new object each time).
        None: the packed layout's staging memory was full and back-pressure dropped them.
        """
        on_cuda = False
        for s, t, (_, live) in zip(snaps, sources, originals):
            if t is None or not s.tensor or s.same_as is not None:
                continue
            cuda = t.device.type == "cuda"
            if s.skipped is None:
                copied = self._copy_out(s, t, step, cuda)
                if copied is None:
                    return None
                on_cuda |= copied
            if s.graph:  # a staged view, copied out above before the graph runs again; its statistics are given
                continue
            kept = s.skipped is None and (s.pack or s.file is not None)
            wanted = s.skipped != "device_names" and plain_data(t) and (cuda or not kept or self.config.detect_anomaly)
            if s.parameter and s.skipped is None and self.config.mode == "statistics" and not live.is_inference():
                if s.result.stats is None:
                    self._weights[id(live)] = (weakref.ref(live), live._version, s)
                else:
                    wanted = False  # taken in an earlier step, and the weight has not changed since
            if wanted:
                # a CPU tensor whose data is kept gets its statistics from the file, when a reader wants them
                s.result.stats_row = len(self._parts)
                self._parts.append(_stats.partial_stats(t))
            if s.skipped is None:
                self._remember(live, s)
        return on_cuda

    def _copy_out(self, s: TensorPlan, t: torch.Tensor, step: int, cuda: bool) -> bool | None:
        """``t``'s bytes into the step's packed stream, or a host copy of it, as ``s`` was planned; whether a
        CUDA copy started, or None when back-pressure dropped it."""
        if s.pack:
            placed = self._pack(t, step)
            if placed is None:
                return None
            s.result.packed_at = placed
            if s.want_values:
                s.result.host_copy = _host_copy(t, self._stream(t.device) if cuda else None)
                return cuda
        elif s.file is not None or s.want_values or s.want_checksum:
            s.result.host_copy = _host_copy(t, self._stream(t.device) if cuda else None)
            return cuda
        return False

    def _pack(self, t: torch.Tensor, step: int) -> tuple[int, int] | None:
        """Copy ``t`` into the step's packed stream (non-blocking, on the copy stream, for CUDA): where its bytes
        lie, or None when back-pressure dropped it."""
        stream = None
        src = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        if t.device.type == "cuda":
            stream = self._stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            t.record_stream(stream)
        placed = self.writer.pack(step, src, stream=stream)
        if placed is None:
            return None
        return placed, placed + int(src.numel())

    def seal(self, step: int) -> None:
        """The step's last packed chunk goes to the writer (after the copies into it, on CUDA)."""
        if self.packed:
            self.writer.seal_pack(step, next(iter(self._streams.values()), None))

    def _weight_stats(self, w: torch.Tensor) -> _stats.Stats | None:
        """A weight's statistics from an earlier step, if it is unchanged and that step is finished.

        The finishing thread sets ``stats`` once, before the step is finished; capture
        waits for that (a step returns once it is on disk), so what is read here is whole.
        """
        entry = self._weights.get(id(w))
        if entry is None:
            return None
        ref_, version, snap = entry
        if ref_() is not w or w.is_inference() or w._version != version:
            return None
        return snap.result.stats

    def _seen_before(self, t: torch.Tensor) -> TensorPlan | None:
        entry = self._seen.get(id(t))
        if entry is None:
            return None
        ref_, version, snap = entry
        if ref_() is not t or t.is_inference() or t._version != version:
            return None
        return snap

    def _remember(self, t: torch.Tensor, snap: TensorPlan) -> None:
        if t.is_inference() or self.in_graph:  # no version counter, or kernels that write without bumping it
            return
        try:
            self._seen[id(t)] = (weakref.ref(t), t._version, snap)
        except TypeError:
            pass

    def _stream(self, device: torch.device) -> Any:
        if self.in_graph:
            self._graph_devices.add(device.index)
            return torch.cuda.current_stream(device)
        stream = self._streams.get(device.index)
        if stream is None:
            stream = self._streams[device.index] = torch.cuda.Stream(device)
        return stream

    def copy_events(self) -> list[Any]:
        """One event per copy stream, recorded now: every copy made so far is done once they are."""
        return [self.ready_event(i) for i in {*self._streams, *self._graph_devices}]

    def ready_event(self, device_index: int | None) -> Any:
        """An event recorded on the copy stream: the writer waits on it before reading the copies."""
        ev = torch.cuda.Event()
        stream = self._streams.get(device_index)
        ev.record(stream if stream is not None else torch.cuda.current_stream(device_index))
        return ev


_DEVICE_NAMES: dict[torch.device, str] = {}


@functools.lru_cache(maxsize=1 << 16)
def _stem(kind: str, path: tuple[str, ...]) -> str:
    return names.safe_stem(names.tensor_stem(kind, path))


@functools.lru_cache(maxsize=1 << 16)
def _leaf_names(kind: str, path: tuple[str, ...], device: str, rank: int | None, ext: str) -> tuple[str, str | None, str, str]:
    """``(stem, key, pairing name, file name)`` of a tensor leaf: the same few thousand every step."""
    stem = _stem(kind, path)
    return (
        stem,
        "_".join(path) if path else None,
        names.tensor_file(stem, device, rank, "x")[:-2],
        names.tensor_file(stem, device, rank, ext),
    )


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, n = [], 1
    for d in reversed(shape):
        out.append(n)
        n *= max(d, 1)
    return tuple(reversed(out))


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


def plain_data(t: torch.Tensor) -> bool:
    """A dense tensor with data: what can be copied, saved and reduced (not meta, nested, quantized or sparse)."""
    return t.layout == torch.strided and t.device.type != "meta" and not t.is_nested and not t.is_quantized


def _kind_of(t: torch.Tensor) -> str:
    if t.device.type == "meta":
        return "meta"
    if t.is_nested:
        return "nested"
    return "quantized" if t.is_quantized else str(t.layout).removeprefix("torch.")
