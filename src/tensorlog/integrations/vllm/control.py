"""A live engine's tensorlog, steered between steps: captures armed over HTTP, the watcher, the flight recorder.

The API server (:mod:`.endpoints`) validates a request and sends it to every
worker with ``collective_rpc("tensorlog_control", ...)``; vLLM runs that
between two steps, on the worker's own thread, so nothing here is shared
between threads. :class:`Live` is one model runner's share: it is told when
each step begins and ends, and owns

* the watcher (``watch_every``) and its metrics;
* the flight recorder: at the first NaN/Inf, the watched steps kept in memory
  are written as a statistics run;
* at most one armed capture: the next K steps, or the steps that serve given
  requests, into a run of its own. On a compiled engine those steps run the
  model's uncompiled forward (vLLM's own ``skip_compiled``), where hooks fire.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ...capture import CaptureHandle, RunInfo
from ...capture.flight import write_watched_run
from ...capture.watch import Watcher, summarize
from ...config import LogConfig, build_config
from ...errors import ConfigError, TensorlogError
from ..prometheus import Publisher

__all__ = ["Live", "Armed", "capture_request", "CONTROL_KEYS", "FIXED_KEYS", "MAX_ARMED_STEPS"]

logger = logging.getLogger("vllm.tensorlog")

CONTROL_KEYS = ("steps", "request_id")
FIXED_KEYS = frozenset(
    {
        "output_dir",
        "reload_input_dir",
        "enabled",
        "stop_on_anomaly",
        "watch_every",
        "watch_match",
        "watch_keep",
        "watch_capture_next",
    }
)
"""Config keys a request may not set: where files go is the server's choice, watching is set at start, and
nothing a request arms may raise into the engine."""
MAX_MATCHED = 4096
"""Requests one capture by request id may match (a short id can match every request)."""
SHOWN_STEPS = 32
MAX_ARMED_STEPS = 1_000_000
MAX_REQUEST_IDS = 64


def capture_request(body: Any, base: LogConfig | None, run_name: str, default_dir: str) -> dict[str, Any]:
    """A ``POST /tensorlog/capture`` body as the request each worker takes; :class:`ConfigError` says what is wrong.

    ``{"steps": K}`` or ``{"request_id": "..." | [...]}`` (one step when neither), plus config keys.
    """
    if not isinstance(body, dict):
        raise ConfigError(f"invalid capture request: expected a JSON object, got {type(body).__name__}")
    steps, rids = body.get("steps"), body.get("request_id")
    problems = []
    if steps is not None and rids is not None:
        problems.append("give steps or request_id, not both")
    if steps is not None and (type(steps) is not int or not 1 <= steps <= MAX_ARMED_STEPS):
        problems.append(f"steps: an integer from 1 to {MAX_ARMED_STEPS} (got {steps!r:.80})")
    if isinstance(rids, str):
        rids = [rids]
    if rids is not None and (
        not isinstance(rids, list)
        or not 1 <= len(rids) <= MAX_REQUEST_IDS
        or not all(isinstance(r, str) and 0 < len(r) <= 256 for r in rids)
    ):
        problems.append(f"request_id: a request id or a list of 1 to {MAX_REQUEST_IDS} of them (got {rids!r:.80})")
    for key in body:
        if key not in CONTROL_KEYS and key not in LogConfig.model_fields:
            near = difflib.get_close_matches(str(key), [*CONTROL_KEYS, *LogConfig.model_fields], n=1, cutoff=0.6)
            problems.append(f"unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    fixed = sorted(FIXED_KEYS & set(body))
    if fixed:
        problems.append(f"{', '.join(fixed)}: set when the server starts, not per capture")
    if problems:
        raise ConfigError("invalid capture request: " + "; ".join(problems))
    keys = {k: v for k, v in body.items() if k not in CONTROL_KEYS}
    keys.setdefault("run_name", run_name)
    defaults = {"output_dir": base.output_dir if base is not None else default_dir}
    cfg = build_config({**keys, "log_step_ids": []}, source=" (capture request)", **defaults)
    data = cfg.model_dump(mode="json", exclude_unset=True)
    data["output_dir"] = cfg.output_dir
    return {"op": "capture", "config": data, "steps": None if rids else (steps or 1), "request_ids": rids}


class Armed:
    """A capture armed while serving: which steps it takes, and how many it has (all bounded)."""

    def __init__(self, handle: CaptureHandle, steps: int | None, request_ids: list[str] | None) -> None:
        self.handle = handle
        self.steps_left = steps
        self.request_ids = request_ids
        self.count = 0
        self.first: list[int] = []
        self.last: deque[int] = deque(maxlen=SHOWN_STEPS)
        self.seen: set[str] = set()
        """Engine request ids that matched (at most :data:`MAX_MATCHED`): the capture ends once all have finished."""
        self.finished: set[str] = set()
        """Those of them that finished."""
        self.written: set[str] = set()
        """Requests whose start this run has recorded (a subset of the requests of its steps)."""
        self.logging = False

    def wants(self, req_ids: list[str]) -> bool:
        if self.request_ids is None:
            return (self.steps_left or 0) > 0
        hits = [r for r in req_ids if any(want in r for want in self.request_ids)]
        self.seen.update(hits)
        return bool(hits)

    @property
    def done(self) -> bool:
        if self.request_ids is None:
            return (self.steps_left or 0) <= 0
        return bool(self.seen) and self.seen <= self.finished

    def logged(self, index: int) -> None:
        self.count += 1
        if len(self.first) < SHOWN_STEPS:
            self.first.append(index)
        else:
            self.last.append(index)

    def status(self) -> dict[str, Any]:
        shown = self.first + list(self.last)
        out: dict[str, Any] = {
            "run": self.handle.path.name,
            "path": str(self.handle.path),
            "steps_logged": shown,
            "steps_left": self.steps_left,
            "request_ids": self.request_ids,
            "stopped": self.handle.stopped_reason,
        }
        if self.count > len(shown):
            out["steps_logged_count"] = self.count  # the first and the last ones are listed
        return out


class Live:
    """One runner's live state; every method runs on the worker's thread, between or around steps."""

    def __init__(
        self,
        model: Any,
        config: LogConfig | None,
        info: Callable[[bool], RunInfo],
        *,
        compiled: bool,
        rank: int | None,
    ) -> None:
        self.model = model
        self.config = config
        self.make_info = info
        self.compiled = compiled
        self.watch: Watcher | None = None
        self.publisher: Publisher | None = None
        self.flight: dict[str, Any] | None = None
        self.armed: Armed | None = None
        self.last: dict[str, Any] | None = None
        self.eager_forward = False
        """The current step runs the uncompiled forward (an armed capture logs it)."""
        self._watching = False
        if config is not None and config.enabled and config.watch_every is not None:
            self.watch = Watcher(model, config, compiled=compiled)
            try:
                self.publisher = Publisher(rank)
            except (ValueError, TensorlogError) as e:  # the flight recorder works without metrics
                logger.warning("tensorlog: %s", e)
            if not self.watch.names:
                logger.warning(
                    "tensorlog: watch_match %s selects no module of this model; nothing is watched", config.watch_match
                )
            logger.info(
                "tensorlog: watching %d modules every %d steps (%s)",
                len(self.watch.names),
                config.watch_every,
                ", ".join(self.watch.names[:4]) + (", ..." if len(self.watch.names) > 4 else ""),
            )

    # -- steps ------------------------------------------------------------------------------

    def requests_finished(self, finished: set[str]) -> None:
        armed = self.armed
        if armed is not None and armed.request_ids is not None:
            armed.finished |= finished & armed.seen
            if armed.done:
                self._disarm("done")

    def begin(self, index: int, req_ids: list[str]) -> None:
        self.eager_forward = False
        armed = self.armed
        if armed is not None:
            if armed.handle.stopped_reason is not None:
                self._disarm("stopped: " + armed.handle.stopped_reason)
                armed = None
            elif len(armed.seen) > MAX_MATCHED:
                self._disarm(f"stopped: the request id matched more than {MAX_MATCHED} requests")
                armed = None
            elif armed.wants(req_ids):
                armed.logging = True
                armed.handle.begin_step(index)
                self.eager_forward = self.compiled
        if self.watch is not None:
            self._watching = self.watch.begin_step(index)

    @property
    def wants_info(self) -> bool:
        return self._watching or (self.armed is not None and self.armed.logging)

    def end(self, index: int, info: dict[str, Any] | None, starts: dict[str, dict[str, Any]]) -> None:
        """Step ``index`` ended; ``starts``: the live requests' starts, for the armed run's first step of each."""
        armed = self.armed
        try:
            if armed is not None and armed.logging:
                armed.logging = False
                if armed.steps_left is not None:
                    armed.steps_left -= 1
                armed.logged(index)
                step_info = dict(info or {})
                news = [starts[r] for r in step_info.get("req_ids", []) if r in starts and r not in armed.written]
                if news:
                    armed.written.update(n["id"] for n in news)
                    step_info["new_requests"] = news
                armed.handle.end_step(step_info)
                if armed.request_ids is None and armed.done:
                    self._disarm("done")
        finally:
            self._end_watch(info)

    def _end_watch(self, info: dict[str, Any] | None) -> None:
        self.eager_forward = False
        if self._watching and self.watch is not None:
            self._watching = False
            step = self.watch.end_step(info)
            if step is not None:
                summary = summarize(step)
                if self.publisher is not None:
                    self.publisher.publish(summary)
                if self.flight is None and any(s.nonfinite for s in summary.values()):
                    self._record_flight(step.step)

    def _record_flight(self, index: int) -> None:
        assert self.watch is not None and self.config is not None
        steps = list(self.watch.recent)
        name = f"{self.config.run_name}-nonfinite"
        try:
            path, anomaly = write_watched_run(self.config, self.model, self.make_info(False), steps, name)
        except Exception as e:
            self.flight = {"error": f"{type(e).__name__}: {e}"}
            logger.warning("tensorlog: NaN/Inf at step %d, but the flight recorder could not write its run: %s", index, e)
            return
        where = (
            f"{'born in' if anomaly.born_here else 'first seen in'} {anomaly.module} at step {anomaly.step}"
            if anomaly is not None
            else f"at step {index}"
        )
        self.flight = {
            "path": str(path),
            "steps": [s.step for s in steps],
            "step": anomaly.step if anomaly is not None else index,
            "module": anomaly.module if anomaly is not None else None,
            "born_here": anomaly.born_here if anomaly is not None else None,
            "request_ids": list((steps[-1].info or {}).get("req_ids", [])) if steps else [],
        }
        logger.warning("tensorlog: NaN/Inf %s; the %d watched step(s) up to it are in %s", where, len(steps), path)
        if self.config.watch_capture_next and self.armed is None:
            cfg = self.config.with_overrides(
                run_name=f"{self.config.run_name}-nonfinite-next", log_step_ids=[], watch_every=None, unique_run_name=True
            )
            self._arm(cfg, 1, None)

    # -- control ----------------------------------------------------------------------------

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "status":
            return self.status()
        if op == "stop":
            if self.armed is None:
                return {"stopped": None, **self.status()}
            last = self._disarm("stopped over HTTP")
            return {"stopped": last, **self.status()}
        if op == "capture":
            if self.armed is not None:
                return {"error": f"a capture is armed already ({self.armed.handle.path}); POST /tensorlog/stop first"}
            cfg = build_config(request["config"])
            self._arm(cfg, request.get("steps"), request.get("request_ids"))
            return self.status()
        return {"error": f"unknown tensorlog control request {op!r}"}

    def status(self) -> dict[str, Any]:
        watch = None
        if self.watch is not None:
            watch = {"every": self.watch.every, "modules": list(self.watch.names), "kept": len(self.watch.recent)}
        return {
            "armed": self.armed is not None,
            "capture": self.armed.status() if self.armed is not None else None,
            "last_capture": self.last,
            "watch": watch,
            "flight_recorder": self.flight,
        }

    def _arm(self, cfg: LogConfig, steps: int | None, request_ids: list[str] | None) -> None:
        handle = CaptureHandle(self.model, cfg, info=self.make_info(True), auto_step=False, compiled=False)
        if not handle.enabled:
            reason = handle.stopped_reason or "this rank is not selected"
            handle.remove()
            self.last = {"run": cfg.run_name, "path": None, "not_armed": reason}
            return
        self.armed = Armed(handle, steps, request_ids)
        logger.info(
            "tensorlog: capture armed (%s) into %s", f"{steps} step(s)" if steps else f"requests {request_ids}", handle.path
        )

    def _disarm(self, why: str) -> dict[str, Any]:
        armed, self.armed = self.armed, None
        assert armed is not None
        if armed.logging:  # stopped mid-step (cannot happen between steps, where control runs)
            armed.handle.end_step(None)
        armed.handle.remove()
        self.last = {**armed.status(), "ended": why, "ended_at": time.time()}
        logger.info("tensorlog: capture %s: %s (%d steps)", why, armed.handle.path, armed.count)
        return self.last

    def close(self) -> None:
        if self.armed is not None:
            self._disarm("engine shut down")
        if self.watch is not None:
            self.watch.close()
