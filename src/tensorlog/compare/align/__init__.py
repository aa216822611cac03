"""Alignment: bringing two runs onto common module names, tensor layouts, ranks and tokens before comparing.

:mod:`.spec` (mapping specs and presets), :mod:`.shards` (tensor-parallel ranks),
:mod:`.tokens` (request and position), :mod:`.virtual` (the aligned runs).
"""

from .spec import PRESETS, MappingSpec, detect_preset, load_mapping
from .virtual import Alignment, align_runs, same_schedule

__all__ = ["MappingSpec", "PRESETS", "load_mapping", "detect_preset", "align_runs", "Alignment", "same_schedule"]
