"""The result of a comparison: a tree of frozen pydantic models that renderers read and never change.

Its JSON form is documented in ``docs/compare-json.md``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..formats.model import require_pandas
from .align.requests import RequestReport
from .metrics import STAT_COMPARED, TensorMetrics, columns

if TYPE_CHECKING:
    import pandas

__all__ = [
    "TensorResult",
    "ModuleResult",
    "Divergence",
    "CompareProgress",
    "Summary",
    "Comparison",
    "SCHEMA_VERSION",
    "TensorStatus",
    "ModuleVerdict",
    "EXIT_OK",
    "EXIT_MISMATCH",
    "EXIT_UNREADABLE",
    "PAIR_COLUMNS",
]

SCHEMA_VERSION = 3
EXIT_OK, EXIT_MISMATCH, EXIT_UNREADABLE = 0, 1, 2

_MODULE_COLUMNS = {"verdict": "string", "inputs_match": "boolean", "outputs_match": "boolean", "explained_by": "string"}
_METRIC_COLUMNS = {c.field: c.dtype for c in columns()}  # at import: the built-in metrics only
PAIR_COLUMNS: dict[str, str] = {
    "step": "int64",
    "rank": "Int64",
    "module": "string",
    "position": "int64",
    "completion": "int64",
    **_MODULE_COLUMNS,
    "module_note": "string",
    "kind": "string",
    "name": "string",
    "status": "string",
    "ok": "bool",
    "failed": "bool",
    "method": "string",
    "shape1": "object",
    "shape2": "object",
    "dtype1": "string",
    "dtype2": "string",
    "mapping": "string",
    "note": "string",
    "score": "float64",
    **_METRIC_COLUMNS,
    **{f"stat_rel_{k}": "float64" for k in STAT_COMPARED},
}
"""Column name -> pandas dtype of :meth:`Comparison.to_pandas`, in order. Names only ever get added."""

TensorStatus = Literal[
    "match", "mismatch", "shape_mismatch", "value_mismatch", "only_in_1", "only_in_2", "unreadable", "not_comparable"
]
ModuleVerdict = Literal["match", "born", "contains", "inherited", "only_in_1", "only_in_2", "unreadable", "not_comparable"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorResult(_Model):
    """One tensor pair (or a tensor found on one side only)."""

    type: Literal["tensor"] = "tensor"
    step: int
    module: str
    rank: int | None = None
    name: str
    kind: str
    status: TensorStatus
    method: Literal["tensor", "statistics", "checksum", "value", "none"] = "tensor"
    shape1: list[int] | None = None
    shape2: list[int] | None = None
    dtype1: str | None = None
    dtype2: str | None = None
    metrics: TensorMetrics | None = None
    stat_rel: dict[str, float] | None = None
    mapping: str | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "match"

    @property
    def failed(self) -> bool:
        return self.status in ("mismatch", "shape_mismatch", "value_mismatch")

    @property
    def score(self) -> float:
        """A single 'how bad' number for ranking and plotting (max relative error)."""
        if self.metrics is not None:
            return self.metrics.max_rel
        if self.stat_rel:
            return max(self.stat_rel.values())
        return 1.0 if self.failed else 0.0


class ModuleResult(_Model):
    """One module call, paired across the two runs, with its verdict."""

    type: Literal["module"] = "module"
    step: int
    module: str
    rank: int | None = None
    position: int
    completion: int
    verdict: ModuleVerdict
    inputs_match: bool | None
    outputs_match: bool | None
    explained_by: str | None = None
    worst_max_abs: float | None = None
    worst_max_rel: float | None = None
    worst_rel_diff: float | None = None
    min_cosine: float | None = None
    min_snr_db: float | None = None
    added_error: float | None = None
    """From a replay: the relative L2 error this module adds by itself on run 1's inputs."""
    added_share: float | None = None
    added_floor: float | None = None
    """From a replay with model A: the error the precision change alone adds (A's module cast to B's dtype)."""
    added_excess: float | None = None
    """What the module adds beyond its precision: its output against the floor's, on the same inputs."""
    note: str | None = None
    """Why a module is on one side only: ``not captured`` (the other run selected it but logged no call)
    or ``no counterpart`` (the other model has no such module, or the other run did not select it)."""
    tensors: list[TensorResult] = Field(default_factory=list)


class Divergence(_Model):
    step: int
    module: str
    rank: int | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    rel_diff: float | None = None
    tensor: str | None = None
    note: str | None = None
    """What else the worst tensor's pair says, e.g. that a replicated tensor's ranks disagree."""
    judged_by: str | None = None
    """The tolerance the worst tensor's pair failed (``rounding of float32 (...)``, ``rtol=..., atol=...``, ``exact``)."""


class CompareProgress(BaseModel):
    """What :func:`compare` reports to a ``progress`` callback after each module."""

    modules_done: int = 0
    modules_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


class Summary(_Model):
    pairs_compared: int
    matched: int
    matched_exact: int = 0
    """Of the matches, how many are bit-exact (the rest are within the tolerance: rounding, by default)."""
    mismatched: int
    only_in_1: int
    only_in_2: int
    unreadable: int
    not_comparable: int
    modules_compared: int
    modules_mismatched: int
    modules_not_comparable: int = 0
    """Modules both runs logged none of whose outputs could be lined up (a layout by batch, not by token): their
    verdict is unknown, so the comparison's is too (exit code 2)."""


class Comparison(_Model):
    """The result of :func:`compare`; ``bool()`` is True when everything compared matches."""

    type: Literal["comparison"] = "comparison"
    schema_version: int = SCHEMA_VERSION
    dir1: str
    dir2: str
    rtol: float | None = None
    atol: float | None = None
    """Set when the pairs were judged as ``allclose`` (the user gave a tolerance)."""
    tolerance: Literal["rounding", "allclose", "exact"] = "rounding"
    tolerance_text: str = ""
    requests: RequestReport | None = None
    """How the runs' requests were paired (by prompt, by id, or by step), and what only one run holds."""
    steps: list[int]
    summary: Summary
    first_divergence: list[Divergence]
    modules: list[ModuleResult]
    notes: list[str] = Field(default_factory=list)

    problems: list[str] = Field(default_factory=list)
    """Files of either run that could not be read (``run <i>: <why>``): the result is incomplete."""

    incomplete: list[str] = Field(default_factory=list)
    """Runs cut short, stopped, or still being written (``run <i> is incomplete: <why>``): no verdict over them is
    a pass (exit code 2), unless the compare was limited to the steps both finished (``whole_steps``)."""

    def __bool__(self) -> bool:
        return self.exit_code == EXIT_OK

    def to_pandas(self) -> pandas.DataFrame:
        """One row per tensor pair (or tensor on one side only), in the order of ``modules``: for filtering,
        plotting and joining with ``Run.to_pandas()`` on ``step``, ``rank``, ``module`` (the call's directory
        name, ``dirname`` there), ``kind`` and ``name``. Needs pandas, not pyarrow.

        Columns (:data:`PAIR_COLUMNS`, in this order; null where the JSON has null or the pair has no such value):

        - which pair: ``step``, ``rank``, ``module`` (directory name, call suffix included), ``position`` and
          ``completion`` (the call's index in its step's start / completion order), ``kind``, ``name`` (run 1's
          tensor name, the pairing key; run 2's tensor was paired to it by name, else by position), ``mapping``
          (the rules that made each side's tensor: renames, splits, rows gathered by request, ranks merged).
        - the call's verdict: ``verdict`` (``born`` marks the module where the runs start to differ),
          ``inputs_match``, ``outputs_match``, ``explained_by``, ``module_note``.
        - the pair's verdict: ``status``, ``ok`` (status is ``match``), ``failed`` (a mismatch of any kind),
          ``method``, ``shape1``, ``shape2``, ``dtype1``, ``dtype2``, ``note``, ``score`` (the pair's max
          relative error, for ranking).
        - element-wise metrics (``method == "tensor"``), as in ``TensorMetrics``: ``allclose``, ``numel``,
          ``exact``, ``max_abs``, ``mean_abs``, ``max_rel``, ``mean_rel``, ``cosine``, ``rel_diff``, ``snr_db``
          (``inf`` where the JSON's null means identical), ``frac_outside``, ``num_outside``,
          ``nonfinite_mismatch``, ``worst_index``, ``worst_values``, ``min_atol``, ``abs_p50``, ``abs_p99``,
          ``rel_l2``, ``judged_by``.
        - by statistics (``method == "statistics"``): ``stat_rel_<stat>``, the relative error of each
          statistic (``min``, ``max``, ``mean``, ``std``, ``abs_max``, ``l2_norm``).

        Raises:
            DependencyError: pandas is missing (``pip install 'tensorlog[pandas]'``).
        """
        pd = require_pandas()
        data: dict[str, list[Any]] = {name: [] for name in PAIR_COLUMNS}
        for m in self.modules:
            for t in m.tensors:
                for name, value in _pair_row(m, t).items():
                    data[name].append(value)
        return pd.DataFrame({name: pd.Series(values, dtype=PAIR_COLUMNS[name]) for name, values in data.items()})

    @property
    def unreadable(self) -> bool:
        """Some data could not be read: no verdict of "match" can be trusted for all of it."""
        return bool(self.summary.unreadable or self.problems)

    @property
    def exit_code(self) -> int:
        """0 everything compared matches; 1 a mismatch, or requests with different prompts; 2 unreadable data, a run
        that is incomplete (cut short, stopped or still being written), or nothing to compare."""
        if self.unreadable or self.incomplete or self.summary.modules_not_comparable:
            return EXIT_UNREADABLE
        if self.requests is not None and self.requests.different_prompts:
            return EXIT_MISMATCH  # the runs were given different inputs: a difference, whatever else matched
        if self.summary.pairs_compared == 0:
            return EXIT_UNREADABLE
        return EXIT_OK if self.summary.mismatched == 0 else EXIT_MISMATCH


def _pair_row(m: ModuleResult, t: TensorResult) -> dict[str, Any]:
    metrics = t.metrics.model_dump() if t.metrics is not None else dict.fromkeys(_METRIC_COLUMNS)
    if t.metrics is not None and metrics["snr_db"] is None:
        metrics["snr_db"] = math.inf  # null in the JSON: the two are identical
    stat_rel = t.stat_rel or {}
    return {
        "step": t.step,
        "rank": t.rank,
        "module": t.module,
        "position": m.position,
        "completion": m.completion,
        **{k: getattr(m, k) for k in _MODULE_COLUMNS},
        "module_note": m.note,
        "kind": t.kind,
        "name": t.name,
        "status": t.status,
        "ok": t.ok,
        "failed": t.failed,
        "method": t.method,
        "shape1": t.shape1,
        "shape2": t.shape2,
        "dtype1": t.dtype1,
        "dtype2": t.dtype2,
        "mapping": t.mapping,
        "note": t.note,
        "score": t.score,
        **{k: metrics[k] for k in _METRIC_COLUMNS},
        **{f"stat_rel_{k}": stat_rel.get(k) for k in STAT_COMPARED},
    }
