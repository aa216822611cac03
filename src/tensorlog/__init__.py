"""tensorlog: capture intermediate tensors of PyTorch and vLLM models, and find where two runs diverge.

Example:
    >>> import tensorlog
    >>> with tensorlog.capture(model, {"module_call_match": ["layers\\\\.0\\\\."]}) as run:
    ...     model(input_ids)
    >>> tensorlog.load_run(run.path)
"""

from ._capture import AnomalyError, CaptureHandle, capture
from ._debugger import Debugger
from ._compare import Comparison, compare
from ._config import ConfigError, LogConfig, load_config
from ._reader import Run, RunReadError, load_run
from ._replay import ReplayResult, replay

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
