"""Alignment: bringing two runs onto common module names, tensor layouts, ranks and tokens before comparing.

:mod:`.spec` (mapping specs and presets), :mod:`.shards` (tensor-parallel ranks),
:mod:`.tokens` (request and position), :mod:`.virtual` (the aligned runs).
"""

from .spec import MappingSpec, detect_preset, load_mapping
from .virtual import align_runs, same_schedule

__all__ = ["MappingSpec", "load_mapping", "detect_preset", "align_runs", "same_schedule"]
