"""The ``tensorlog`` command line: one small function per subcommand.

Each subcommand parses its flags, calls the library, and turns the result
into an exit code: 0 success, 1 a comparison found a mismatch, 2 bad usage or
unreadable data, with one line on stderr, never a traceback. Runs are named
the same way everywhere: positionally (``tensorlog compare RUN1 RUN2``);
``compare`` also takes the reference's ``--dir1`` / ``--dir2``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from .errors import TensorlogError, UsageError

__all__ = ["main", "compare_il_main"]

EXIT_OK, EXIT_MISMATCH, EXIT_ERROR = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``tensorlog: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        _stderr().print(f"tensorlog: error: {self.prog}: {message}", style="red", markup=False, highlight=False)
        raise SystemExit(EXIT_ERROR)


def _stdout() -> Console:
    # Piped output keeps long module names whole instead of rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 220)


def _stderr() -> Console:
    return Console(stderr=True, soft_wrap=True)


# -- argument types and shared options -------------------------------------------------------


def regex_list(text: str) -> list[str]:
    """Comma-separated regexes, each checked now (compiles, and cannot take exponential time)."""
    from .config import compile_pattern

    items = [t.strip() for t in text.split(",") if t.strip()]
    for p in items:
        try:
            compile_pattern(p)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return items


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None


def tolerance(text: str) -> float:
    """A finite, non-negative float: a NaN tolerance would make every comparison pass."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"a finite number >= 0, got {text!r}")
    return v


def _parents() -> dict[str, argparse.ArgumentParser]:
    """Options that several subcommands share, each defined once."""
    tol = _Parser(add_help=False)
    tol.add_argument(
        "--rtol", type=tolerance, help="relative tolerance, as torch.allclose (default: judge by the dtypes' rounding)"
    )
    tol.add_argument("--atol", type=tolerance, help="absolute tolerance, as torch.allclose (with --rtol: 1e-8)")
    sel = _Parser(add_help=False)
    sel.add_argument("--steps", type=int_list, help="comma-separated steps (default: all)")
    sel.add_argument("--modules", type=regex_list, help="comma-separated regexes of module names (default: all)")
    model = _Parser(add_help=False)
    model.add_argument("--model", required=True, help="an HF checkpoint directory (or a hub id where the network allows)")
    model.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return {"tol": tol, "select": sel, "model": model}


# -- inspect ------------------------------------------------------------------------


def _add_inspect(sub: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inspect", help="show the steps, modules and tensors of a run", parents=[parents["select"]])
    p.add_argument(
        "run", nargs="+", metavar="RUN", help="run directory (or an output dir holding exactly one run); several: one run's parts"
    )
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .formats import load_run
    from .report.inspect import render_run

    render_run(load_run(args.run if len(args.run) > 1 else args.run[0]), _stdout(), steps=args.steps, modules=args.modules)
    return EXIT_OK


# -- export -------------------------------------------------------------------------


def _add_export(sub: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="write a run's statistics as Parquet (one row per tensor per call)")
    p.add_argument("run", nargs="+", metavar="RUN", help="the run (several directories: the parts of one run)")
    p.add_argument("--parquet", required=True, metavar="DIR", help="directory for the Parquet files")
    p.add_argument("--window", type=int, default=1000, help="steps per file (default: 1000)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from .report.parquet import export_parquet

    if args.window < 1:
        raise UsageError(f"--window must be at least 1, got {args.window}")
    with _steps_progress("exporting") as progress:
        out = export_parquet(args.run if len(args.run) > 1 else args.run[0], args.parquet, window=args.window, progress=progress)
    err = _stderr()
    for p in out.problems[:20]:
        err.print(f"tensorlog: {p}", markup=False, highlight=False)
    if len(out.problems) > 20:
        err.print(f"tensorlog: ... and {len(out.problems) - 20} more problems", markup=False, highlight=False)
    err.print(f"{out.rows} rows in {len(out.files)} file(s) in {args.parquet}", markup=False, highlight=False)
    return EXIT_ERROR if out.problems else EXIT_OK


@contextlib.contextmanager
def _steps_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar of steps on stderr (only on a terminal)."""
    from rich.progress import Progress

    console = _stderr()
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


# -- demo ---------------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="capture a tiny built-in model and show the result (offline)")
    p.add_argument("--output-dir", default=None, help="where to write the demo runs (default: a fresh temp dir)")
    p.add_argument(
        "--engine",
        choices=["torch", "vllm"],
        default="torch",
        help="torch: two captures of a built-in model, one layer nudged; vllm: HF vs vLLM on the same weights",
    )
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.commands import run_demo, run_vllm_demo

    return (run_vllm_demo if args.engine == "vllm" else run_demo)(args.output_dir, _stdout())


# -- compare ------------------------------------------------------------------------


def _add_compare(sub: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "compare", help="compare two runs and name the module where they diverge", parents=[parents["tol"], parents["select"]]
    )
    p.add_argument("runs", nargs="*", metavar="RUN", help="the two runs (or give them as --dir1 and --dir2)")
    p.add_argument(
        "--dir1",
        action="append",
        help="first run (the reference's flag); repeat it for a run whose ranks are in several directories, "
        "or give a parts file (.json)",
    )
    p.add_argument("--dir2", action="append", help="second run; may be repeated too")
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="compare each pair on the Ray node that holds its files; only metrics come back "
        "(ADDRESS: a cluster's address; default: the cluster this machine belongs to; needs tensorlog[ray])",
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="judge bitwise: against a run served in other batches, names the first module whose output for a "
        "request depends on the batch",
    )
    p.add_argument(
        "--whole-steps",
        action="store_true",
        help="compare only the steps both runs finished; without it, a run cut short, stopped or still being "
        "written makes the verdict incomplete (exit 2)",
    )
    p.add_argument("--output", help="write the report to this file (default: stdout)")
    p.add_argument("--verbose", action="store_true", help="include per-tensor details")
    p.add_argument("--format", choices=["md", "json", "html"], help="report format (default: from --output's suffix, else md)")
    p.add_argument("--jobs", type=int, help="worker threads (default: 1 for small runs, up to 4 for large ones)")
    p.add_argument("--replay", help="a replay JSON from `tensorlog replay --output`: adds each module's own error")
    p.add_argument(
        "--map",
        dest="mapping",
        help="align the runs first: a preset (hf-vllm, identity) or a mapping JSON/YAML file "
        "(default: hf-vllm when one run is HF and the other vLLM; else identity, pairing rows by request and "
        "token and reassembling shards, whenever the runs' batching or world sizes differ)",
    )
    p.set_defaults(func=_cmd_compare)


def _two_runs(args: argparse.Namespace) -> tuple[str | list[str], str | list[str]]:
    runs = list(args.runs)
    if args.dir1 or args.dir2:
        if runs or not (args.dir1 and args.dir2):
            raise UsageError("give the two runs either as RUN1 RUN2 or as --dir1 RUN1 --dir2 RUN2")
        return args.dir1, args.dir2
    if len(runs) != 2:
        raise UsageError(f"compare takes two runs, got {len(runs)}")
    return runs[0], runs[1]


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare
    from .config import ConfigError
    from .report import headline, render

    dir1, dir2 = _two_runs(args)
    fmt = args.format or _format_from_suffix(args.output)
    try:
        with _progress("comparing") as progress:
            result = compare(
                dir1,
                dir2,
                rtol=args.rtol,
                atol=args.atol,
                exact=args.exact,
                whole_steps=args.whole_steps,
                steps=args.steps,
                modules=args.modules,
                progress=progress,
                mapping=args.mapping,
                replay=_read_replay(args.replay),
                jobs=args.jobs,
                ray=args.ray,
            )
    except ConfigError as e:
        if args.mapping:
            raise UsageError(f"--map: {e}") from None
        raise
    text = render(result, fmt, verbose=args.verbose)
    if args.output:
        _write(args.output, text)
        _stderr().print(f"{headline(result)}\nreport written to {args.output}", markup=False, highlight=False)
    else:
        sys.stdout.write(_printable(text))
    return result.exit_code


def _read_replay(path: str | None) -> Any:
    if not path:
        return None
    from pydantic import ValidationError

    from .compare.replay import ReplayResult
    from .errors import RunReadError
    from .formats.safeio import INDEX_JSON, read_model

    try:
        return read_model(Path(path), ReplayResult, INDEX_JSON)
    except (RunReadError, OSError, ValidationError, ValueError) as e:
        raise UsageError(f"--replay: cannot read {path}: {str(e).splitlines()[0]}") from None


def _format_from_suffix(output: str | None) -> str:
    suffix = Path(output).suffix.lower() if output else ""
    return {".json": "json", ".html": "html", ".htm": "html"}.get(suffix, "md")


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8", errors="backslashreplace")
    except OSError as e:
        raise UsageError(f"cannot write the report to {path}: {e.strerror or e}") from None


def _printable(text: str) -> str:
    """Bytes of a file name that were not UTF-8 print as escapes, whatever the terminal's encoding."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Callable[[Any], None]]:
    """A rich progress bar on stderr (only when stderr is a terminal): modules, and bytes read.

    stdout stays the report's alone.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = _stderr()
    with Progress(
        f"[bold]{label}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[modules]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=None, modules="")

        def update(p: Any) -> None:
            bar.update(
                task, completed=p.bytes_done, total=p.bytes_total or None, modules=f"{p.modules_done}/{p.modules_total} modules"
            )

        yield update


# -- tools/compare_il.py: the reference's script -------------------------------------------------


def compare_il_main(argv: Sequence[str] | None = None) -> int:
    """``tools/compare_il.py``: the reference script's flags, report and exit code (0, also on a mismatch).

    tensorlog's findings follow the reference report in one added section. Files
    that cannot be read safely make the exit code 2 (the reference prints an error
    and counts a mismatch).
    """
    parser = _Parser(prog="compare_il.py", description="Compare intermediate logging outputs from two different runs.")
    parser.add_argument("--dir1", required=True, help="First intermediate logging directory")
    parser.add_argument("--dir2", required=True, help="Second intermediate logging directory")
    parser.add_argument("--output", help="Output file for the report (default: stdout)")
    parser.add_argument("--rtol", type=tolerance, default=1e-5, help="Relative tolerance for tensor comparison (default: 1e-5)")
    parser.add_argument("--atol", type=tolerance, default=1e-8, help="Absolute tolerance for tensor comparison (default: 1e-8)")
    parser.add_argument("--steps", help="Comma-separated list of steps to compare (default: all)")
    parser.add_argument(
        "--modules", type=regex_list, help="Comma-separated list of module name patterns to compare (default: all)"
    )
    parser.add_argument("--verbose", action="store_true", help="Include detailed information about each tensor")
    return run_command(_cmd_compare_il, parser.parse_args(argv))


def _cmd_compare_il(args: argparse.Namespace) -> int:
    from .compare import compare
    from .compare.compare_il import reference_compare
    from .report.compare_il import render_reference

    steps = [s.strip() for s in args.steps.split(",")] if args.steps else None
    for d in (args.dir1, args.dir2):
        try:
            is_dir = Path(d).is_dir()
        except OSError as e:
            raise UsageError(f"cannot use {d[:200]!r}: {e.strerror or e}") from None
        if not is_dir:
            raise UsageError(f"not a directory: {d}")
    report = reference_compare(args.dir1, args.dir2, rtol=args.rtol, atol=args.atol, steps=steps, modules=args.modules)
    try:
        numeric = [int(s) for s in steps] if steps and all(s.isdigit() for s in steps) else None
        findings = compare(args.dir1, args.dir2, rtol=args.rtol, atol=args.atol, modules=args.modules, steps=numeric)
    except TensorlogError:
        findings = None  # not a run tensorlog reads: the reference report stands on its own
    text = render_reference(report, verbose=args.verbose, findings=findings)
    if args.output:
        _write(args.output, text)
    else:
        print(_printable(text))
    return EXIT_ERROR if report.unreadable else EXIT_OK


# -- capture (HF transformers) ---------------------------------------------------------


def _add_capture(sub: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser("capture", help="greedy-decode with an HF transformers model under capture", parents=[parents["model"]])
    p.add_argument(
        "--input-ids",
        required=True,
        type=_prompts,
        help="prompt token ids, e.g. 1,2,3; several equal-length prompts: 1,2,3;4,5,6",
    )
    p.add_argument("--max-new-tokens", type=int, default=1, help="decode steps after the prefill (default: 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", help="LogConfig as a JSON file or inline JSON (default: every module, step 0)")
    p.add_argument("--output-dir", help="overrides the config's output_dir")
    p.add_argument("--run-name", help="overrides the config's run_name")
    p.set_defaults(func=_cmd_capture)


def _prompts(text: str) -> list[list[int]]:
    try:
        return [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers (prompts separated by ';'), got {text!r}") from None


def _cmd_capture(args: argparse.Namespace) -> int:
    from .integrations.transformers import capture_generate

    overrides = {k: v for k, v in (("output_dir", args.output_dir), ("run_name", args.run_name)) if v}
    path, seq = capture_generate(
        args.model,
        args.input_ids,
        args.config,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        device=args.device,
        **overrides,
    )
    _stdout().print(
        f"run written to {path}\ngenerated: {seq[:, len(args.input_ids[0]) :].tolist()}", markup=False, highlight=False
    )
    return EXIT_OK


# -- replay -----------------------------------------------------------------------------


def _add_replay(sub: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "replay",
        help="re-run modules of model B on the inputs run A recorded: the error each adds by itself",
        parents=[parents["model"], parents["tol"], parents["select"]],
    )
    p.add_argument("run", nargs="?", help="run A (tensor mode, with inputs and outputs)")
    p.add_argument("--run", dest="run_flag", help=argparse.SUPPRESS)  # 0.1's spelling
    p.add_argument("--output", help="write the replay as JSON (for `tensorlog compare --replay`)")
    p.set_defaults(func=_cmd_replay)


def _cmd_replay(args: argparse.Namespace) -> int:
    from .api import replay
    from .integrations.transformers import load_causal_lm
    from .report.replay import render_replay

    run = args.run or args.run_flag
    if not run:
        raise UsageError("replay needs the run to replay on: tensorlog replay RUN --model MODEL")
    model = load_causal_lm(args.model, dtype=args.dtype)
    result = replay(
        model,
        run,
        modules=args.modules,
        steps=args.steps,
        rtol=1e-5 if args.rtol is None else args.rtol,
        atol=1e-8 if args.atol is None else args.atol,
    )
    if args.output:
        _write(args.output, result.model_dump_json(indent=1))
    _stdout().print(render_replay(result), markup=False, highlight=False)
    return EXIT_OK


# -- vllm -----------------------------------------------------------------------------


def _add_vllm(sub: argparse._SubParsersAction, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "vllm",
        help="run `vllm serve ...` or a vLLM script with --intermediate-log-config[-path]",
        description="Strips --intermediate-log-config JSON / --intermediate-log-config-path FILE, checks the config and "
        "its output directory, hands the config to every vLLM process, and runs vLLM's own CLI (e.g. `serve MODEL ...`) "
        "or `run SCRIPT.py ...` unchanged.",
    )
    p.add_argument("vllm_command", metavar="serve|run|...", help="a vLLM CLI command, or `run` for a Python script")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for vLLM or the script")
    p.set_defaults(func=_cmd_vllm)


def _cmd_vllm(args: argparse.Namespace) -> int:
    from .integrations.vllm.launcher import launch

    return launch(args.vllm_command, args.args)


# -- plumbing -----------------------------------------------------------------------

_COMMANDS = [_add_capture, _add_inspect, _add_compare, _add_export, _add_replay, _add_demo, _add_vllm]


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = _Parser(
        prog="tensorlog", description="Capture intermediate tensors of PyTorch/vLLM models and find where two runs diverge."
    )
    parser.add_argument("--version", action="version", version=f"tensorlog {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parents = _parents()
    for add in _COMMANDS:
        add(sub, parents)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already reported in one line
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    return run_command(args.func, args)


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand, turning the library's errors into one line on stderr and exit code 2."""
    from .report.text import clean

    try:
        return int(func(args))
    except TensorlogError as e:
        _stderr().print(f"tensorlog: error: {clean(e)}", style="red", markup=False, highlight=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
