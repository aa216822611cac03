"""The tensorlog CLI run in this process (a subprocess would pay a torch import for nothing).

Output goes through strict UTF-8 streams, as on a terminal that cannot print stray bytes.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass

from tensorlog import cli


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(*args: object, tool: bool = False) -> Result:
    """``tensorlog ARGS`` (or ``tools/compare_il.py ARGS`` with ``tool``), in process."""
    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.stdout, sys.stderr
    wo = sys.stdout = io.TextIOWrapper(out, encoding="utf-8", errors="strict")
    we = sys.stderr = io.TextIOWrapper(err, encoding="utf-8", errors="strict")
    try:
        argv = [str(a) for a in args]
        try:
            code = cli.compare_il_main(argv) if tool else cli.main(argv)
        except SystemExit as e:  # argparse's --help / usage errors in compare_il.py
            code = int(e.code or 0)
    finally:
        sys.stdout, sys.stderr = saved
        for w in (wo, we):
            w.flush()
            w.detach()
    return Result(code, out.getvalue().decode(), err.getvalue().decode())
