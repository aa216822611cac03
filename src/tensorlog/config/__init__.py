"""The capture configuration: the reference's keys, validated up front.

Every problem in a config is collected and reported in one :class:`ConfigError`,
so a user fixes a bad file in one go instead of one key per run.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from .patterns import compile_pattern, split_call_index, step_range

__all__ = [
    "LogConfig",
    "load_config",
    "build_config",
    "ConfigError",
    "compile_pattern",
    "ConfigLike",
]

DEFAULT_OUTPUT_DIR = "/tmp/tensorlog"
MAX_RANKS = 1 << 20


class LogConfig(BaseModel):
    """What to capture, from which steps and devices, and where to write it.

    The keys and defaults are those of vLLM's intermediate-logging config; a
    config that is given at all is enabled unless it says ``"enabled": false``.

    Example:
        >>> cfg = LogConfig(module_call_match=["layers\\\\.0\\\\.", "rotary_emb:0"],
        ...                 log_step_ids=[0, 1], output_dir="/tmp/il")
        >>> cfg.enabled
        True
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    enabled: bool = True
    output_dir: str = DEFAULT_OUTPUT_DIR
    module_call_match: list[str] | None = None
    log_step_ids: list[int | str] = Field(default_factory=lambda: list[int | str]([0]))
    max_tensor_size: int | None = Field(default=None, ge=0)
    device_names: list[str] = Field(default_factory=list)
    run_name: str = Field(default_factory=lambda: str(uuid.uuid4()))
    unique_run_name: bool = False
    """When ``run_name`` is taken, use ``<run_name>-1``, ``-2``, ... instead of refusing."""
    small_tensor_values: int = Field(default=16, ge=0)
    """Tensors with at most this many elements also get their values in the json."""
    mode: Literal["tensor", "statistics", "md5"] = "tensor"
    """``tensor`` writes .pt files; ``statistics`` only json; ``md5`` json plus a content checksum."""
    format: Literal["pt", "safetensors"] = "pt"
    layout: Literal["vllm", "packed", "reference"] = "reference"
    """``vllm``: vLLM's layout (a directory per call, a file per tensor), stored as its first name ``reference``
    so that earlier tensorlog versions read the run; ``packed``: one safetensors file per step and rank (much
    faster to write; read by tensorlog)."""
    async_write: bool = False
    """``false``: a step returns only once its files are on disk. ``true``: the writer catches up in the
    background (faster for throughput; flushed on ``remove()``)."""
    writer_threads: int | None = Field(default=None, ge=1, le=32)
    """Threads writing files; default one per four cores, at least one and at most four. On a small host
    more threads contend with the model for the cores and the GIL."""
    log_post_fwd_inputs: bool = False
    """Also write each call's inputs as they are after the forward (``post_fwd_inputs*``): shows in-place changes."""
    reload_input_dir: str | None = None
    """Run each logged module on the inputs this other run recorded for it (the reference's online graft)."""
    max_pending_bytes: int = Field(default=1 << 30, gt=0)
    """Snapshots waiting for the writer thread, in bytes, before hooks wait (or drop)."""
    on_backpressure: Literal["block", "drop"] = "block"
    max_total_bytes: int | None = Field(default=None, ge=0)
    """Stop logging cleanly (and mark the run incomplete) once this many bytes are written."""
    ranks: list[Annotated[int, Field(ge=0, lt=MAX_RANKS)]] = Field(default_factory=list)
    """Global ranks that log; ``[]`` means all."""
    level: Literal["module", "op", "mix"] = "module"
    """``op`` logs torch operations (named ``<enclosing module>.<op>_<k>``); ``mix`` modules and ops."""
    data_mode: list[Literal["all", "forward", "backward", "input", "output"]] = Field(default_factory=lambda: ["all"])  # type: ignore[arg-type]
    """Which tensors: ``input``/``output`` restrict directions; ``backward`` adds gradients (opt-in: full
    backward hooks interfere with in-place ops when a model runs with grad enabled)."""
    stack: bool = False
    """Record, once per unique call site, the Python stack of each logged call in ``stack.json``."""
    compiled: Literal["auto", "eager", "compiled"] = "auto"
    """How to capture a compiled model. ``auto``: with graph-safe taps when the model is compiled
    (``torch.compile``'s wrapper, ``model.compile()``, a vLLM engine that compiles), else with hooks;
    ``compiled``: taps always (``capture`` before ``torch.compile``); ``eager``: hooks always (vLLM is
    then run with ``enforce_eager``, a compiled PyTorch model breaks its graph at each hook)."""
    graph_taps: Literal["native", "callback"] = "native"
    """How a compiled graph is tapped. ``native``: the graph computes the statistics and copies itself, with
    no Python per call (CUDA graphs stay on); ``callback``: each call calls back into Python, as hooks would."""
    detect_anomaly: bool = False
    """Check every hooked tensor for NaN/Inf; the first module whose outputs go bad is recorded in run.json."""
    stop_on_anomaly: bool = False
    """With ``detect_anomaly``: raise :class:`tensorlog.AnomalyError` at the first hit."""
    parquet_window: int | None = Field(default=None, ge=1)
    """Also write the statistics as Parquet (``statistics``/``md5`` modes; needs pyarrow): one file per rank
    for each window of this many steps, in ``<run>/parquet/``, one row per tensor per call."""
    retain_steps: int | None = Field(default=None, ge=1)
    """Keep only the newest this many steps on disk (and the Parquet windows they overlap): for a server
    that logs all day. ``run.json``'s ``removed_through`` says which steps are gone."""
    retain_bytes: int | None = Field(default=None, ge=1)
    """Keep only the newest steps (and Parquet windows) that fit in this many bytes."""
    watch_every: int | None = Field(default=None, ge=1)
    """Watch a live model: every this many steps, measure the watched modules (``watch_match``) and publish
    their statistics as Prometheus metrics; writes nothing by itself. With ``watch_every``, steps are
    captured only where ``log_step_ids`` is given too."""
    watch_match: list[str] | None = None
    """Modules to watch (``module_call_match``'s patterns); default: the decoder layers, the final norm and
    the logits, which keeps the metrics' label count to a few per layer."""
    watch_keep: int = Field(default=16, ge=1, le=4096)
    """The flight recorder: the newest this many watched steps, kept in memory and written out as a
    statistics run when a NaN or Inf appears."""
    watch_capture_next: bool = False
    """Also capture the step after the first NaN/Inf whole, in ``mode``/``module_call_match``/``layout``."""

    @model_validator(mode="after")
    def _parquet_has_statistics(self) -> LogConfig:
        if self.parquet_window is not None and self.mode == "tensor":
            raise ValueError(
                "parquet_window writes statistics, which mode 'tensor' does not take; use mode 'statistics' or 'md5' "
                "(or export a tensor run's statistics with `tensorlog export RUN --parquet DIR`)"
            )
        return self

    @property
    def captures(self) -> bool:
        """Whether steps are captured: always, unless the config only watches (``watch_every`` without
        ``log_step_ids``)."""
        return self.enabled and (self.watch_every is None or "log_step_ids" in self.model_fields_set)

    @field_validator("layout", mode="before")
    @classmethod
    def _vllm_layout(cls, v: Any) -> Any:
        return "reference" if v == "vllm" else v

    @field_validator("data_mode", mode="before")
    @classmethod
    def _one_mode_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @property
    def writer_thread_count(self) -> int:
        return self.writer_threads or max(1, min(4, (os.cpu_count() or 1) // 4))

    @property
    def passes(self) -> frozenset[str]:
        """``forward`` and/or ``backward``."""
        given = {m for m in self.data_mode if m in ("forward", "backward")}
        return frozenset(given or {"forward"}) | (frozenset({"forward"}) if "all" in self.data_mode else frozenset())

    @property
    def directions(self) -> frozenset[str]:
        """``input`` and/or ``output``."""
        given = {m for m in self.data_mode if m in ("input", "output")}
        return frozenset(given) if given and "all" not in self.data_mode else frozenset({"input", "output"})

    @field_validator("module_call_match", "watch_match", mode="before")
    @classmethod
    def _one_pattern_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("module_call_match", "watch_match")
    @classmethod
    def _patterns_compile(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        bad = []
        for pattern in v:
            regex, _ = split_call_index(pattern)
            try:
                compile_pattern(regex)
            except ValueError as e:
                bad.append(str(e))
        if bad:
            raise ValueError("; ".join(bad))
        return v

    @field_validator("output_dir", "reload_input_dir")
    @classmethod
    def _a_usable_path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "\0" in v:
            raise ValueError("contains a NUL byte")
        if not v.strip():
            raise ValueError("is empty (give a directory, e.g. /tmp/tensorlog)")
        try:
            root = Path(v).expanduser().resolve() == Path("/")
        except (RuntimeError, OSError) as e:  # an unknown ~user, a symlink loop, a name too long
            raise ValueError(f"cannot be used: {getattr(e, 'strerror', None) or e}") from None
        if root:
            raise ValueError("is the root directory; give a directory of its own")
        return v

    @field_validator("log_step_ids")
    @classmethod
    def _steps_non_negative(cls, v: list[int | str]) -> list[int | str]:
        """Steps and ranges of steps (``"0-999999"``, kept as written so run.json stays small)."""
        if len(v) > MAX_STEP_IDS:
            raise ValueError(
                f'lists {len(v)} steps; at most {MAX_STEP_IDS} (give ranges such as "0-999999", or [] for every step)'
            )
        bad = [s for s in v if (isinstance(s, int) and not 0 <= s < MAX_INT) or (isinstance(s, str) and step_range(s) is None)]
        if bad:
            raise ValueError(f'step ids must be integers >= 0 or ranges "a-b" with a <= b, got {bad[:5]}')
        return v

    @field_validator("ranks", mode="before")
    @classmethod
    def _expand_rank_ranges(cls, v: Any) -> Any:
        """Accept msProbe-style ranges: ``[0, "2-5"]`` means ranks 0, 2, 3, 4, 5."""
        if not isinstance(v, list):
            return v
        out: list[Any] = []
        for item in v:
            if isinstance(item, str) and re.fullmatch(r"\d+-\d+", item.strip()):
                if len(item.strip()) > 19:
                    raise ValueError(f"rank range {item!r} is too large")
                lo, hi = (int(x) for x in item.split("-"))
                if hi < lo:
                    raise ValueError(f"empty rank range {item!r}")
                if hi - lo >= MAX_RANKS:
                    raise ValueError(f"rank range {item!r} spans more than {MAX_RANKS} ranks")
                out.extend(range(lo, hi + 1))
            else:
                out.append(item)
        return out

    @field_validator("device_names")
    @classmethod
    def _devices_parse(cls, v: list[str]) -> list[str]:
        import torch

        bad = []
        for name in v:
            try:
                torch.device(name)
            except (RuntimeError, ValueError):
                bad.append(name)
        if bad:
            raise ValueError(f"not a torch device name: {bad} (expected e.g. 'cuda:0', 'cpu')")
        return v

    @field_validator("run_name")
    @classmethod
    def _run_name_is_one_dir(cls, v: str) -> str:
        if not v or v in (".", "..") or "/" in v or "\\" in v or "\0" in v or len(v) > 200:
            raise ValueError(f"run_name must be a single directory name, got {v!r}")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser() / self.run_name

    def with_overrides(self, **overrides: Any) -> LogConfig:
        """A copy with some keys replaced, validated, keeping this config's ``run_name`` unless one is given."""
        return build_config({**self.model_dump(exclude_unset=True), "run_name": self.run_name, **overrides})


def _closest_key(key: str) -> str:
    match = difflib.get_close_matches(key, LogConfig.model_fields, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _format_errors(err: ValidationError, source: str) -> str:
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<config>"
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown key {key!r}{_closest_key(str(e['loc'][0]))}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = repr(e.get("input"))
            got = got if len(got) <= 200 else got[:200] + "..."
            problems.append(f"{key}: {msg} (got {got})" if e["loc"] else msg)
    return f"invalid tensorlog config{source}: " + "; ".join(problems)


MAX_STEP_IDS = 10_000
"""More step ids than this would make a run.json its own reader refuses: ranges say the same in a few bytes."""
MAX_INT = 1 << 62


def _huge_ints(value: Any, key: str, depth: int = 0) -> list[str]:
    """Keys holding integers past 2^62: no setting needs one, and the readers would refuse what they write."""
    if isinstance(value, bool) or depth > 8:
        return []
    if isinstance(value, int):
        return [key] if abs(value) >= MAX_INT else []
    if isinstance(value, (list, tuple)):
        return next((_huge_ints(v, key, depth + 1) for v in value if _huge_ints(v, key, depth + 1)), [])
    return []


def build_config(data: Mapping[str, Any], *, source: str = "", **defaults: Any) -> LogConfig:
    """Validate ``data`` (with ``defaults`` for keys it lacks) into a :class:`LogConfig`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"invalid tensorlog config{source}: expected a JSON object, got {type(data).__name__}")
    huge = [k for k, v in data.items() if _huge_ints(v, str(k))]
    if huge:
        raise ConfigError(f"invalid tensorlog config{source}: " + "; ".join(f"{k}: an integer past 2^62" for k in huge))
    try:
        return LogConfig(**{**defaults, **data})
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    except TypeError as e:  # non-string keys
        raise ConfigError(f"invalid tensorlog config{source}: {e}") from None
    except RecursionError:
        raise ConfigError(f"invalid tensorlog config{source}: nested too deeply") from None


ConfigLike = Union[LogConfig, Mapping[str, Any], str, "os.PathLike[str]"]


def load_config(config: ConfigLike, **defaults: Any) -> LogConfig:
    """Build a :class:`LogConfig` from whatever form a user has at hand.

    Args:
        config (LogConfig | dict | str | PathLike): a config, a dict of its keys,
            JSON text (starts with ``{``), or the path of a JSON file.
        **defaults: values for keys the config does not set (integrations use
            this, e.g. vLLM's ``output_dir="/tmp/vllm_intermediates"``).

    Returns:
        LogConfig: the validated config.

    Raises:
        ConfigError: one message naming every bad key, the bad pattern, or the
            unreadable file.

    Example:
        >>> load_config('{"module_call_match": "layers\\\\\\\\.0\\\\\\\\."}').module_call_match
        ['layers\\\\.0\\\\.']
    """
    if isinstance(config, LogConfig):
        return config
    if isinstance(config, Mapping):
        return build_config(config, **defaults)
    if isinstance(config, (str, os.PathLike)):
        text = os.fspath(config)
        if text.lstrip().startswith("{"):
            return build_config(_parse_json(text, " (inline JSON)"), source=" (inline JSON)", **defaults)
        try:
            path = Path(text).expanduser()
        except RuntimeError as e:
            raise ConfigError(f"cannot use {text[:200]!r} as a config file: {e}") from None
        source = f" in {path}"
        try:
            raw = _read_config_file(path)
        except FileNotFoundError:
            raise ConfigError(f"tensorlog config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read tensorlog config {path}: {e}") from None
        return build_config(_parse_json(raw, source), source=source, **defaults)
    raise ConfigError(f"cannot build a tensorlog config from {type(config).__name__}; pass a dict, JSON text or a path")


CONFIG_FILE_LIMIT = 1 << 20


def _read_config_file(path: Path) -> str:
    """A regular file of at most 1 MiB: a FIFO would block for ever, ``/dev/zero`` would never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        data = os.read(fd, CONFIG_FILE_LIMIT + 1)
    finally:
        os.close(fd)
    if len(data) > CONFIG_FILE_LIMIT:
        raise OSError(f"{path} is larger than {CONFIG_FILE_LIMIT} bytes")
    return data.decode("utf-8")


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _parse_json(text: str, source: str) -> Any:
    """JSON as a config: a key given twice, or an integer longer than any setting needs, is an error."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_bounded_int)
    except json.JSONDecodeError as e:
        raise ConfigError(f"invalid JSON{source}: {e.msg} at line {e.lineno} column {e.colno}") from None
    except _Duplicate as e:
        raise ConfigError(f"invalid JSON{source}: key {str(e)!r} is given twice") from None
    except ValueError as e:
        raise ConfigError(f"invalid JSON{source}: {e}") from None
    except RecursionError:
        raise ConfigError(f"invalid JSON{source}: nested too deeply") from None
