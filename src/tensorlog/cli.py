"""The ``tensorlog`` command line: one small function per subcommand.

Each subcommand parses its flags, calls the library, and turns the result
into an exit code: 0 success, 1 a comparison found a mismatch, 2 bad usage or
unreadable data (with a one-line message on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console

__all__ = ["main"]

EXIT_OK, EXIT_MISMATCH, EXIT_ERROR = 0, 1, 2


def _stdout() -> Console:
    # Piped output keeps long module names whole instead of rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 220)


def _stderr() -> Console:
    return Console(stderr=True, soft_wrap=True)


# -- inspect ------------------------------------------------------------------------


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show the steps, modules and tensors of a run")
    p.add_argument("run", help="run directory (or an output dir holding exactly one run)")
    p.add_argument("--steps", help="comma-separated steps to show (default: all)")
    p.add_argument("--modules", help="comma-separated regexes of module names to show")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ._reader import load_run
    from ._render import render_run

    run = load_run(args.run)
    render_run(run, _stdout(), steps=_parse_steps(args.steps), modules=_parse_list(args.modules))
    return EXIT_OK


# -- demo ---------------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="capture a tiny built-in model and show the result (offline)")
    p.add_argument("--output-dir", default=None, help="where to write the demo runs (default: a fresh temp dir)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo_cli import run_demo

    return run_demo(args.output_dir, _stdout())


# -- plumbing -----------------------------------------------------------------------


def _parse_list(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_steps(text: str | None) -> list[int] | None:
    items = _parse_list(text)
    if items is None:
        return None
    try:
        return [int(t) for t in items]
    except ValueError:
        raise _UsageError(f"--steps takes comma-separated integers, got {text!r}") from None


class _UsageError(Exception):
    pass


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_inspect, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tensorlog",
        description="Capture intermediate tensors of PyTorch/vLLM models and find where two runs diverge.",
    )
    parser.add_argument("--version", action="version", version=f"tensorlog {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ._config import ConfigError
    from ._reader import RunReadError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        return int(args.func(args))
    except (ConfigError, RunReadError, _UsageError) as e:
        _stderr().print(f"tensorlog: error: {e}", style="red", markup=False, highlight=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
