"""Every error tensorlog raises, under one base class.

Messages name concepts (the config key, the run, the file), never CLI flags:
the command line adds the flag when it reports one.
"""

from __future__ import annotations

__all__ = [
    "TensorlogError",
    "ConfigError",
    "UsageError",
    "RunReadError",
    "ResourceLimitError",
    "AlignmentError",
    "AnomalyError",
    "GraftError",
    "DependencyError",
]


class TensorlogError(Exception):
    """Base class: ``except tensorlog.TensorlogError`` catches everything tensorlog raises on purpose."""


class ConfigError(TensorlogError, ValueError):
    """A config that cannot be used; the message names every offending key."""


class UsageError(TensorlogError, ValueError):
    """An API or command used the wrong way (an argument out of range, calls in the wrong order)."""


class DependencyError(TensorlogError, ImportError):
    """An optional package is missing; the message gives the ``pip install`` that brings it."""


class RunReadError(TensorlogError, ValueError):
    """A path is not a run, or one of its files cannot be read safely."""


class ResourceLimitError(TensorlogError, MemoryError):
    """This machine ran out of something (memory, memory maps, file descriptors) while reading a run: not the
    run's fault, so never reported as unreadable data."""


class AlignmentError(TensorlogError, ValueError):
    """Two runs, or two tensors, cannot be lined up (layouts, tokens or shards that do not fit)."""


class AnomalyError(TensorlogError, RuntimeError):
    """Raised with ``stop_on_anomaly`` at the first NaN/Inf; ``run.json`` says where it was born."""


class GraftError(ConfigError):
    """``reload_input_dir`` cannot supply a selected module's inputs (missing, or a different name, shape or dtype)."""
