"""Capture: hooks on the selected modules, snapshots, and step boundaries, feeding the writer."""

from .debugger import Debugger
from .handle import CaptureHandle, start_capture
from .run import RunInfo

__all__ = ["CaptureHandle", "Debugger", "RunInfo", "start_capture"]
