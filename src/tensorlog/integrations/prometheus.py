"""Watched statistics as Prometheus metrics, on the registry the process already exports.

In vLLM's API server with ``PROMETHEUS_MULTIPROC_DIR`` set (``tensorlog vllm
serve`` sets it), every process writes its values to files there and the
server's ``/metrics`` collects them: the gauges keep the most recent value
across processes (``mostrecent``), the counters add up. Without it, the
metrics live in ``prometheus_client``'s default registry of this process.
"""

from __future__ import annotations

import logging
from typing import Any

from ..capture.watch import ModuleStats
from ..errors import DependencyError

__all__ = ["Publisher", "METRIC_NAMES"]

logger = logging.getLogger("vllm.tensorlog")

METRIC_NAMES = (
    "tensorlog_abs_max",
    "tensorlog_rms",
    "tensorlog_mean",
    "tensorlog_nonfinite_total",
    "tensorlog_steps_watched_total",
)

_METRICS: dict[tuple[str, ...], tuple[Any, ...]] = {}
"""One set per label set and process (a registry takes each name once)."""


def _metrics(labels: tuple[str, ...]) -> tuple[Any, ...]:
    found = _METRICS.get(labels)
    if found is not None:
        return found
    if _METRICS:
        raise ValueError(
            f"tensorlog metrics exist in this process with the labels {next(iter(_METRICS))}, and a registry "
            f"takes a name once: this engine ({labels}) is watched without metrics"
        )
    try:
        from prometheus_client import Counter, Gauge
    except ImportError:
        raise DependencyError("watch_every publishes Prometheus metrics: pip install prometheus-client") from None
    gauges = tuple(
        Gauge(name, doc, labels, multiprocess_mode="mostrecent")
        for name, doc in (
            ("tensorlog_abs_max", "Largest absolute value of a watched module's input or output tensors"),
            ("tensorlog_rms", "Root mean square of a watched module's input or output tensors"),
            ("tensorlog_mean", "Mean of a watched module's input or output tensors"),
        )
    )
    nonfinite = Counter("tensorlog_nonfinite", "NaN and Inf values seen in a watched module's tensors", labels)
    steps = Counter("tensorlog_steps_watched", "Steps whose statistics were measured", ("rank",) if "rank" in labels else ())
    _METRICS[labels] = found = (*gauges, nonfinite, steps)
    return found


class Publisher:
    """Sets the metrics from each watched step; children are cached, so a step costs a few dict lookups."""

    def __init__(self, rank: int | None) -> None:
        self.rank = None if rank is None else str(rank)
        labels = ("module", "kind", "rank") if rank is not None else ("module", "kind")
        self._abs_max, self._rms, self._mean, self._nonfinite, steps = _metrics(labels)
        self._steps = steps.labels(rank=self.rank) if rank is not None else steps
        self._children: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}

    def _child(self, module: str, kind: str) -> tuple[Any, Any, Any, Any]:
        key = (module, kind)
        c = self._children.get(key)
        if c is None:
            lv = (module, kind) if self.rank is None else (module, kind, self.rank)
            c = self._children[key] = (
                self._abs_max.labels(*lv),
                self._rms.labels(*lv),
                self._mean.labels(*lv),
                self._nonfinite.labels(*lv),
            )
        return c

    def publish(self, summary: dict[tuple[str, str], ModuleStats]) -> None:
        """Set the gauges from one watched step's :func:`~tensorlog.capture.watch.summarize`."""
        for (module, kind), s in summary.items():
            abs_max, rms, mean, nonfinite = self._child(module, kind)
            abs_max.set(s.abs_max)
            rms.set(s.rms)
            mean.set(s.mean)
            if s.nonfinite:
                nonfinite.inc(s.nonfinite)
        self._steps.inc()
