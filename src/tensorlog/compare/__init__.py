"""Compare: pairing, metrics, attribution, alignment and replay; results are typed models (:mod:`.results`)."""

from .engine import compare
from .results import Comparison, ModuleResult, TensorResult

__all__ = ["compare", "Comparison", "ModuleResult", "TensorResult"]
