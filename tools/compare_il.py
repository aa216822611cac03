#!/usr/bin/env python3
"""Compare two intermediate-logging runs: the reference's ``tools/compare_il.py`` command line.

    python tools/compare_il.py --dir1 RUN1 --dir2 RUN2 [--output report.md] [--rtol 1e-5] [--atol 1e-8]
                               [--steps 0,1] [--modules ".*attention.*,.*mlp.*"] [--verbose]

Same as ``tensorlog compare``; exit code 0 when everything matches, 1 on a
mismatch, 2 on bad usage or unreadable data.
"""

import argparse
import sys

try:
    from tensorlog.cli import add_compare_arguments, run_command, cmd_compare
except ImportError:  # running from a checkout without installing
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))
    from tensorlog.cli import add_compare_arguments, run_command, cmd_compare


def main() -> int:
    parser = argparse.ArgumentParser(prog="compare_il.py", description=__doc__.splitlines()[0])
    add_compare_arguments(parser)
    return run_command(cmd_compare, parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
