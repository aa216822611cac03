#!/usr/bin/env python3
"""Compare two intermediate-logging runs: a drop-in for vLLM's ``tools/compare_il.py``.

    python tools/compare_il.py --dir1 RUN1 --dir2 RUN2 [--output report.md] [--rtol 1e-5] [--atol 1e-8]
                               [--steps 0,1] [--modules ".*attention.*,.*mlp.*"] [--verbose]

The reference's flags, report and exit code (0, also on a mismatch), followed by
tensorlog's findings (where the divergence is born). Exit code 2 when a file
cannot be read safely. ``tensorlog compare`` has tensorlog's own report and exit codes.
"""

import sys

try:
    from tensorlog.cli import compare_il_main
except ImportError:  # running from a checkout without installing
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))
    from tensorlog.cli import compare_il_main


if __name__ == "__main__":
    sys.exit(compare_il_main())
