"""tensorlog: capture intermediate tensors of PyTorch and vLLM models, and find where two runs diverge.

The names below are the public API: the calls, the types they return, and the errors they raise. Every
other module is internal; a subpackage's ``__all__`` lists what the other layers may import from it
(``docs/architecture.md``).

Example:
    >>> import tensorlog
    >>> with tensorlog.capture(model, {"module_call_match": ["layers\\\\.0\\\\."]}) as run:
    ...     model(input_ids)
    >>> tensorlog.load_run(run.path)
"""

from .api import capture, replay
from .capture import CaptureHandle, Debugger
from .compare import Comparison, ModuleResult, TensorMetrics, TensorResult, compare
from .compare.replay import ReplayResult
from .config import LogConfig, load_config
from .errors import (
    AlignmentError,
    AnomalyError,
    ConfigError,
    DependencyError,
    GraftError,
    ResourceLimitError,
    RunReadError,
    TensorlogError,
    UsageError,
)
from .formats import ModuleCall, Run, Step, TensorRecord, load_run
from .version import __version__

__all__ = [
    "capture",
    "CaptureHandle",
    "Debugger",
    "LogConfig",
    "load_config",
    "load_run",
    "Run",
    "Step",
    "ModuleCall",
    "TensorRecord",
    "compare",
    "Comparison",
    "ModuleResult",
    "TensorResult",
    "TensorMetrics",
    "replay",
    "ReplayResult",
    "TensorlogError",
    "ConfigError",
    "UsageError",
    "RunReadError",
    "ResourceLimitError",
    "AlignmentError",
    "AnomalyError",
    "GraftError",
    "DependencyError",
    "__version__",
]
