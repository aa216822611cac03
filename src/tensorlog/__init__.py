"""tensorlog: capture intermediate tensors of PyTorch and vLLM models, and find where two runs diverge.

Example:
    >>> import tensorlog
    >>> with tensorlog.capture(model, {"module_call_match": ["layers\\\\.0\\\\."]}) as run:
    ...     model(input_ids)
    >>> tensorlog.load_run(run.path)
"""

from .capture.handle import AnomalyError, CaptureHandle, capture
from .capture.debugger import Debugger
from .compare.engine import Comparison, compare
from .config import ConfigError, LogConfig, load_config
from .formats.tensorlog import Run, RunReadError, load_run
from .compare.replay import ReplayResult, replay

__version__ = "0.1.0"

__all__ = [
    "capture",
    "CaptureHandle",
    "Debugger",
    "AnomalyError",
    "LogConfig",
    "load_config",
    "ConfigError",
    "load_run",
    "Run",
    "RunReadError",
    "compare",
    "replay",
    "ReplayResult",
    "Comparison",
    "__version__",
]
