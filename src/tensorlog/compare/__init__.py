"""Compare: pairing, metrics, attribution, alignment and replay; results are typed models (:mod:`.results`)."""

from .front import compare
from .metrics import TensorMetrics
from .results import Comparison, ModuleResult, TensorResult

__all__ = ["compare", "Comparison", "ModuleResult", "TensorResult", "TensorMetrics"]
