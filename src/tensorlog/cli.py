"""The ``tensorlog`` command line: one small function per subcommand.

Each subcommand parses its flags, calls the library, and turns the result
into an exit code: 0 success, 1 a comparison found a mismatch, 2 bad usage or
unreadable data (with a one-line message on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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
    from .formats.tensorlog import load_run
    from .report.inspect import render_run

    run = load_run(args.run)
    render_run(run, _stdout(), steps=_parse_steps(args.steps), modules=_parse_list(args.modules))
    return EXIT_OK


# -- demo ---------------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="capture a tiny built-in model and show the result (offline)")
    p.add_argument("--output-dir", default=None, help="where to write the demo runs (default: a fresh temp dir)")
    p.add_argument("--engine", choices=["torch", "vllm"], default="torch",
                   help="torch: two captures of a built-in model, one layer nudged; vllm: HF vs vLLM on the same weights")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.commands import run_demo, run_vllm_demo

    return (run_vllm_demo if args.engine == "vllm" else run_demo)(args.output_dir, _stdout())


# -- compare ------------------------------------------------------------------------


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """The reference's ``compare_il.py`` flags, with its defaults, plus ``--format``."""
    p.add_argument("--dir1", required=True, help="first run (or an output dir holding exactly one run)")
    p.add_argument("--dir2", required=True, help="second run")
    p.add_argument("--output", help="write the report to this file (default: stdout)")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance (default: 1e-5)")
    p.add_argument("--atol", type=float, default=1e-8, help="absolute tolerance (default: 1e-8)")
    p.add_argument("--steps", help="comma-separated steps to compare (default: all)")
    p.add_argument("--modules", help="comma-separated regexes of module names to compare (default: all)")
    p.add_argument("--verbose", action="store_true", help="include per-tensor details")
    p.add_argument("--format", choices=["md", "json", "html"], help="report format (default: from --output's suffix, else md)")
    p.add_argument("--jobs", type=int, help="worker processes (default: 1 for small runs, up to 4 for large ones)")
    p.add_argument("--replay", help="a replay JSON from `tensorlog replay --output`: adds each module's own error")
    p.add_argument("--map", dest="mapping", help="align the runs first: a preset (hf-vllm, identity) or a mapping JSON/YAML file "
                   "(default: hf-vllm when one run is HF and the other vLLM; shard reassembly when world sizes differ)")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare two runs and name the module where they diverge")
    add_compare_arguments(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare.engine import compare
    from .report.compare import render

    fmt = args.format or _format_from_suffix(args.output)
    modules = _parse_list(args.modules)
    for pattern in modules or []:
        try:
            re.compile(pattern)
        except re.error as e:
            raise _UsageError(f"--modules: regex {pattern!r} does not compile: {e}") from None
    with _progress("comparing") as progress:
        result = compare(args.dir1, args.dir2, rtol=args.rtol, atol=args.atol, steps=_parse_steps(args.steps),
                         modules=modules, progress=progress, mapping=getattr(args, "mapping", None),
                         replay=_read_replay(getattr(args, "replay", None)), jobs=getattr(args, "jobs", None))
    text = render(result, fmt, verbose=args.verbose)
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as e:
            raise _UsageError(f"cannot write report to {args.output}: {e.strerror or e}") from None
        from .report.compare import headline

        _stderr().print(f"{headline(result)}\nreport written to {args.output}", markup=False, highlight=False)
    else:
        sys.stdout.write(text)
    return result.exit_code


def _read_replay(path: str | None) -> "Any":
    if not path:
        return None
    from pydantic import ValidationError

    from .compare.replay import ReplayResult

    try:
        return ReplayResult.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValidationError, ValueError) as e:
        raise _UsageError(f"--replay: cannot read {path}: {str(e).splitlines()[0]}") from None


def _format_from_suffix(output: str | None) -> str:
    suffix = Path(output).suffix.lower() if output else ""
    return {".json": "json", ".html": "html", ".htm": "html"}.get(suffix, "md")


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Callable[[Any], None]]:
    """A rich progress bar on stderr (only when stderr is a terminal): modules, and bytes read.

    stdout stays the report's alone.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = _stderr()
    with Progress(f"[bold]{label}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TextColumn("{task.fields[modules]}"), TimeRemainingColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=None, modules="")

        def update(p: Any) -> None:
            bar.update(task, completed=p.bytes_done, total=p.bytes_total or None,
                       modules=f"{p.modules_done}/{p.modules_total} modules")

        yield update


# -- capture (HF transformers) ---------------------------------------------------------


def _add_capture(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("capture", help="greedy-decode with an HF transformers model under capture")
    p.add_argument("--model", required=True, help="local checkpoint directory (or a hub id where the network allows)")
    p.add_argument("--input-ids", required=True, help="prompt token ids, e.g. 1,2,3; several equal-length prompts: 1,2,3;4,5,6")
    p.add_argument("--max-new-tokens", type=int, default=1, help="decode steps after the prefill (default: 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", help="LogConfig as a JSON file or inline JSON (default: every module, step 0)")
    p.add_argument("--output-dir", help="overrides the config's output_dir")
    p.add_argument("--run-name", help="overrides the config's run_name")
    p.set_defaults(func=_cmd_capture)


def _cmd_capture(args: argparse.Namespace) -> int:
    from .integrations.transformers import capture_generate

    try:
        ids = [[int(t) for t in row.split(",") if t.strip()] for row in args.input_ids.split(";")]
    except ValueError:
        raise _UsageError(f"--input-ids takes comma-separated integers, got {args.input_ids!r}") from None
    overrides = {k: v for k, v in (("output_dir", args.output_dir), ("run_name", args.run_name)) if v}
    path, seq = capture_generate(args.model, ids, args.config, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                                 device=args.device, **overrides)
    _stdout().print(f"run written to {path}\ngenerated: {seq[:, len(ids[0]):].tolist()}", markup=False, highlight=False)
    return EXIT_OK


# -- replay -----------------------------------------------------------------------------


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="re-run modules of model B on the inputs run A recorded: the error each adds by itself")
    p.add_argument("--model", required=True, help="model B: an HF checkpoint directory (as for `tensorlog capture`)")
    p.add_argument("--run", required=True, help="run A (tensor mode, with inputs and outputs)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--modules", help="comma-separated regexes of modules to replay (default: all recorded)")
    p.add_argument("--steps", help="comma-separated steps (default: all)")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-8)
    p.add_argument("--output", help="write the replay as JSON (for `tensorlog compare --replay`)")
    p.set_defaults(func=_cmd_replay)


def _cmd_replay(args: argparse.Namespace) -> int:
    from .compare.replay import replay
    from .integrations.transformers import load_causal_lm

    model = load_causal_lm(args.model, dtype=args.dtype)
    result = replay(model, args.run, modules=_parse_list(args.modules), steps=_parse_steps(args.steps), rtol=args.rtol, atol=args.atol)
    if args.output:
        try:
            Path(args.output).write_text(result.model_dump_json(indent=1), encoding="utf-8")
        except OSError as e:
            raise _UsageError(f"cannot write {args.output}: {e.strerror or e}") from None
    from .report.compare import render_replay

    _stdout().print(render_replay(result), markup=False, highlight=False)
    return EXIT_OK


# -- vllm -----------------------------------------------------------------------------


def _add_vllm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "vllm",
        help="run `vllm serve ...` or a vLLM script with --intermediate-log-config[-path]",
        description="Strips --intermediate-log-config JSON / --intermediate-log-config-path FILE, hands the "
        "config to every vLLM process, and runs vLLM's own CLI (e.g. `serve MODEL ...`) or `run SCRIPT.py ...` unchanged.",
    )
    p.add_argument("vllm_command", metavar="serve|run|...", help="a vLLM CLI command, or `run` for a Python script")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for vLLM or the script")
    p.set_defaults(func=_cmd_vllm)


def _cmd_vllm(args: argparse.Namespace) -> int:
    from .integrations.vllm.plugin import launch

    return launch(args.vllm_command, args.args)


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


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_capture, _add_inspect, _add_compare, _add_replay, _add_demo, _add_vllm]


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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    return run_command(args.func, args)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand, turning the library's errors into one line on stderr and exit code 2."""
    from .config import ConfigError
    from .formats.tensorlog import RunReadError

    try:
        return int(func(args))
    except (ConfigError, RunReadError, _UsageError) as e:
        _stderr().print(f"tensorlog: error: {e}", style="red", markup=False, highlight=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
