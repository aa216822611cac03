"""The typed records of tensorlog's own files: ``run.json`` and each step's ``tensorlog_index.json``.

The writer builds these models and serialises them; every reader validates
what it reads against them before using a single field, so a file of the wrong
shape is one clear per-file error, never a traceback deep in the reader.
Unknown fields are ignored (a newer tensorlog may add some); known fields are
type-checked strictly where a lax reading would lie (``"complete": "false"``
is an error, not ``True``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator

__all__ = [
    "STAT_KEYS",
    "Stats",
    "Checksum",
    "ValueDesc",
    "PackedRef",
    "TensorEntry",
    "CallStructure",
    "CallEntry",
    "StepInfo",
    "RequestStart",
    "prompt_digest",
    "request_start",
    "PROMPT_IDS_MAX",
    "Dropped",
    "StepIndex",
    "Anomaly",
    "ModelDims",
    "ShardLayout",
    "CompiledInfo",
    "NodeInfo",
    "RankEntry",
    "RunPart",
    "RunParts",
    "RunManifest",
    "ModuleNode",
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "LAYOUT_VERSION",
    "Kind",
]

INDEX_FORMAT = "tensorlog-step-index"
INDEX_VERSION = 1
LAYOUT_VERSION = 2
"""1: tensorlog 0.1 (its own per-call json); 2: the reference's json plus a per-step index."""

STAT_KEYS = ("min", "max", "mean", "std", "abs_max", "l2_norm", "nan_count", "inf_count")

Kind = Literal["inputs", "outputs", "post_fwd_inputs"]


class _Record(BaseModel):
    # NaN and infinities are written as the JSON constants NaN / Infinity, which Python and pydantic read back.
    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="constants")


class Stats(_Record):
    """Statistics of one tensor, computed in float32 (float64 for float64 and integer tensors)."""

    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    abs_max: float | None = None
    l2_norm: float | None = None
    nan_count: StrictInt = 0
    inf_count: StrictInt = 0


class Checksum(_Record):
    algorithm: str
    digest: str


class ValueDesc(_Record):
    """A non-tensor argument or output, recorded by type and value, never pickled."""

    type: str
    value: Union[StrictBool, StrictInt, float, str, None] = None
    class_name: str | None = None
    """For a module passed as an argument: its class."""


class PackedRef(_Record):
    """Where a tensor lies in the step's packed file."""

    file: str
    key: str


class TensorEntry(_Record):
    """One logged value of a call. ``name`` pairs it across runs: the tensor file's name without extension."""

    name: str
    kind: Kind
    key: str | None = None
    """The flattened position (``0``, ``0_1``, ``hidden_states``); None for a single output."""
    path: list[str] = Field(default_factory=list)
    tensor: StrictBool = True
    shape: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    dtype: str | None = None
    device: str | None = None
    stride: list[StrictInt] | None = None
    numel: StrictInt | None = None
    stats: Stats | None = None
    values: Any = None
    """The values of a small tensor, as nested lists."""
    checksum: Checksum | None = None
    skipped: str | None = None
    """Why no data was kept: ``max_tensor_size``, ``device_names``, ``statistics``."""
    file: str | None = None
    """The tensor file, relative to the step directory."""
    packed: PackedRef | None = None
    parameter: StrictBool = False
    """A weight handed to an op as an argument: a difference here is born here, not inherited."""
    value: ValueDesc | None = None


class CallStructure(_Record):
    """How a call's inputs nest, so that ``replay`` can rebuild the call.

    Each node is a leaf (the ``key`` of a :class:`TensorEntry`), a list of nodes, or a dict of nodes.
    """

    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    tuples: list[str] = Field(default_factory=list)
    """Keys of the containers that were tuples (the others were lists)."""


class CallEntry(_Record):
    """One logged call of one module (or op) in one step."""

    module: str
    dirname: str
    class_name: str = ""
    call_index: StrictInt = 0
    seq_start: StrictInt
    seq_end: StrictInt | None = None
    """None: the call never returned (logging stopped, or the forward raised, during it)."""
    backward: StrictBool = False
    structure: CallStructure | None = None
    tensors: list[TensorEntry] = Field(default_factory=list)
    grafted: StrictBool = False
    """Its inputs were replaced by another run's (``reload_input_dir``)."""


PROMPT_IDS_MAX = 4096
"""Prompts up to this many tokens are recorded whole, so a compare can say where two prompts first differ."""


def prompt_digest(ids: list[int]) -> str:
    """What identifies a prompt across runs and engines: blake2b-128 of its token ids as little-endian int64."""
    import hashlib
    import struct

    return hashlib.blake2b(struct.pack(f"<{len(ids)}q", *ids), digest_size=16).hexdigest()


MAX_STEP_TOKENS = 1 << 24
"""More tokens in one step than any engine schedules: an index that claims more is refused."""


class RequestStart(_Record):
    """A request first scheduled in this step, and what identifies it in any other run: its prompt.

    Engine-local request ids mean nothing across runs (a request served alone in a fresh engine is "0"
    like a different one elsewhere), so compare pairs requests by prompt and sample index instead.
    """

    id: str
    prompt_len: StrictInt
    prompt_digest: str
    prompt: list[StrictInt] | None = None
    """The token ids, when at most :data:`PROMPT_IDS_MAX`."""
    sample: StrictInt = 0
    """Which of a request's ``n`` samples (vLLM's parallel sampling names them ``<i>_<parent id>``)."""

    @model_validator(mode="after")
    def _consistent(self) -> RequestStart:
        if not 0 <= self.prompt_len < 1 << 31 or not 0 <= self.sample < 1 << 20:
            raise ValueError("a request's prompt length and sample must be small non-negative integers")
        if not re.fullmatch(r"[0-9a-f]{32}", self.prompt_digest):
            raise ValueError("a prompt digest is 32 hex digits")
        if self.prompt is not None and (len(self.prompt) != self.prompt_len or prompt_digest(self.prompt) != self.prompt_digest):
            raise ValueError(f"request {self.id!r}: its prompt does not match its length or digest")
        return self


def request_start(rid: str, prompt: list[int], sample: int = 0) -> dict[str, Any]:
    """The json of a :class:`RequestStart`, as both integrations record it."""
    return {
        "id": rid,
        "prompt_len": len(prompt),
        "prompt_digest": prompt_digest(prompt),
        "prompt": prompt if len(prompt) <= PROMPT_IDS_MAX else None,
        "sample": sample,
    }


class StepInfo(_Record):
    """The request layout of a step: rows of the flattened ``[num_tokens, ...]`` activations per request."""

    req_ids: list[str] = Field(default_factory=list)
    num_tokens: list[StrictInt] = Field(default_factory=list)
    start_positions: list[StrictInt] | None = None
    total_tokens: StrictInt | None = None
    layout: Literal["flat", "batch_major"] = "flat"
    width: StrictInt | None = None
    """``batch_major`` only: the step's padded sequence width; a row's real tokens are its last ``num_tokens``
    columns (left padding), the columns before them padding."""
    new_requests: list[RequestStart] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> StepInfo:
        """A layout that could not describe a real batch would pair rows wrongly: refused, never half-believed."""
        n = len(self.req_ids)
        if len(self.num_tokens) != n or (self.start_positions is not None and len(self.start_positions) != n):
            raise ValueError("req_ids, num_tokens and start_positions differ in length")
        if len(set(self.req_ids)) != n:
            raise ValueError("a request is listed twice in one step")
        if any(not 0 <= k <= MAX_STEP_TOKENS for k in self.num_tokens) or sum(self.num_tokens) > MAX_STEP_TOKENS:
            raise ValueError(f"token counts must lie in 0..{MAX_STEP_TOKENS}")
        if any(not 0 <= p < 1 << 40 for p in self.start_positions or []):
            raise ValueError("start positions must be non-negative")
        if self.width is not None and not 0 <= self.width <= MAX_STEP_TOKENS:
            raise ValueError("width out of range")
        if any(r.id not in self.req_ids for r in self.new_requests):
            raise ValueError("a request first scheduled in a step must be one of the step's requests")
        return self


class Dropped(_Record):
    """What back-pressure (``on_backpressure: drop``) left out: a whole ``call``, or its ``outputs``."""

    step: StrictInt
    module: str
    bytes: StrictInt
    what: str = "call"


class StepIndex(_Record):
    """``step_<N>/tensorlog_index.json``: written once, when the step ends, after all its files."""

    format: Literal["tensorlog-step-index"] = "tensorlog-step-index"
    version: StrictInt = INDEX_VERSION
    step: StrictInt
    rank: StrictInt | None = None
    layout: Literal["reference", "packed", "statistics"] = "reference"
    complete: StrictBool = True
    incomplete_reason: str | None = None
    calls: list[CallEntry] = Field(default_factory=list)
    info: StepInfo | None = None
    dropped: list[Dropped] = Field(default_factory=list)


class Anomaly(_Record):
    step: StrictInt
    module: str
    born_here: StrictBool
    nonfinite_outputs: list[str] = Field(default_factory=list)
    nonfinite_inputs: list[str] = Field(default_factory=list)


class ModelDims(_Record):
    hidden_size: StrictInt | None = None
    num_attention_heads: StrictInt | None = None
    num_key_value_heads: StrictInt | None = None
    head_dim: StrictInt | None = None
    intermediate_size: StrictInt | None = None
    vocab_size: StrictInt | None = None
    model_type: str | None = None


class ShardLayout(_Record):
    """How a tensor-parallel module's output is laid out across ranks, as its layer class states it."""

    rule: Literal["concat", "concat_parts", "replicated", "partial_sum", "vocab"]
    dim: StrictInt = -1
    parts: list[StrictInt] | None = None
    """Per-rank sizes of the fused parts (q/k/v, gate/up) for ``concat_parts``."""
    replicas: list[StrictInt] | None = None
    """How many consecutive ranks hold the same slice of each part (KV heads fewer than ranks)."""
    layer: str = ""
    """The vLLM layer class that stated it."""
    vocab: StrictInt | None = None
    """The unpadded vocabulary size for ``vocab``."""
    inputs: Literal["replicated", "concat", "concat_halves"] | None = None
    """How its input lies across ranks: ``concat`` for a row-parallel layer's sharded input, ``concat_halves``
    for a gated activation's (each rank holds its slice of both halves, gate and up)."""


class CompiledInfo(_Record):
    mode: Literal["eager", "compiled"]
    backend: str | None = None
    passes: list[str] = Field(default_factory=list)
    cudagraphs: StrictBool = False
    cudagraph_mode: str | None = None
    """The engine's CUDA graph mode (vLLM's ``cudagraph_mode``), where it has one."""
    not_observable: dict[str, str] = Field(default_factory=dict)
    """Module -> why the compiled graph does not show its value under its own name."""
    taps: dict[str, Literal["graph", "callback"]] = Field(default_factory=dict)
    """Module -> how the compiled graph was tapped: ``graph`` (statistics and copies made by the graph itself)
    or ``callback`` (a call back into Python)."""
    steps_replayed: StrictInt = 0
    """Logged steps whose forward replayed a CUDA graph (the taps replayed with it)."""
    steps_eager: StrictInt = 0
    """Logged steps whose forward ran without a CUDA graph."""


class NodeInfo(_Record):
    """Where a rank ran and wrote its files: a run spread over several nodes is read back part by part."""

    hostname: str
    ray_node_id: str | None = None
    path: str


class RankEntry(_Record):
    """One rank of a run read as a whole (:attr:`RunManifest.ranks`): what a reader kept of that rank's own
    ``run.json``, or, for a foreign dump, the directory and parallel ranks it was found under."""

    complete: StrictBool | None = None
    incomplete_reason: str | None = None
    pid: StrictInt | None = None
    host: str | None = None
    steps_written: list[StrictInt] | None = None
    """Step numbers, one each (not ranges)."""
    node: NodeInfo | None = None
    removed_through: StrictInt | None = None
    dir: str | None = None
    tp_rank: StrictInt | None = None
    pp_rank: StrictInt | None = None


class RunPart(_Record):
    path: str
    """The part's directory; a relative path is relative to the parts file."""
    node: str | None = None
    """The Ray node id or hostname that holds it, when ``compare --ray`` should not look it up in ``run.json``."""


class RunParts(_Record):
    """A parts file (``*.json``): one run whose ranks were written to several directories (one per node)."""

    format: Literal["tensorlog-run-parts"] = "tensorlog-run-parts"
    parts: list[RunPart] = Field(min_length=1, max_length=65536)


class ModuleNode(_Record):
    """One module of ``modules.json``: the model's tree, as ``named_modules`` gives it."""

    class_: str = Field(default="", alias="class")
    children: list[str] = Field(default_factory=list)


class RunManifest(_Record):
    """``run.json``: written when the run starts, after each step, and when it ends."""

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")

    format: Literal["tensorlog-run"] = "tensorlog-run"
    layout_version: StrictInt = LAYOUT_VERSION
    tensorlog_version: str = ""
    torch_version: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    model_class: str | None = None
    host: str | None = None
    pid: StrictInt | None = None
    rank: StrictInt | None = None
    world_size: StrictInt | None = None
    node: NodeInfo | None = None
    start_time: str | None = None
    end_time: str | None = None
    steps_written: list[StrictInt | list[StrictInt]] = Field(default_factory=list)
    """Finished steps as ``[first, last]`` ranges (tensorlog 0.1 listed every step)."""
    step_in_progress: StrictInt | None = None
    bytes_written: StrictInt = 0
    removed_through: StrictInt | None = None
    """Retention (``retain_steps`` / ``retain_bytes``) removed the data of every step up to this one."""
    dropped: list[Dropped] = Field(default_factory=list)
    anomaly: Anomaly | None = None
    complete: StrictBool = False
    incomplete_reason: str | None = None
    framework: str | None = None
    model_dims: ModelDims | None = None
    tp_size: StrictInt | None = None
    pp_size: StrictInt | None = None
    tp_rank: StrictInt | None = None
    pp_rank: StrictInt | None = None
    shard_layouts: dict[str, ShardLayout] = Field(default_factory=dict)
    compiled: CompiledInfo | None = None
    grafted_from: str | None = None
    layout: str | None = None
    """``reference``, ``packed`` or ``statistics`` (which files each step has)."""
    ranks: dict[int, RankEntry] | None = Field(default=None, exclude=True)
    """A run read as a whole (its ranks' files merged): each rank's entry. Readers make it, and it is never
    serialised (capture never writes it); a ``run.json`` that has one (string keys, as JSON has) lists no rank."""

    @field_validator("ranks", mode="before")
    @classmethod
    def _rank_entries(cls, v: Any) -> dict[int, RankEntry] | None:
        """Only int ranks with a valid entry: anything else under ``ranks`` is left out, never an error of the run."""
        if not isinstance(v, dict):
            return None
        out: dict[int, RankEntry] = {}
        for r, e in v.items():
            if not isinstance(r, int) or isinstance(r, bool):
                continue
            if isinstance(e, RankEntry):
                out[r] = e
            elif isinstance(e, dict):
                try:
                    out[r] = RankEntry.model_validate(e)
                except ValidationError:
                    continue
        return out or None

    def steps_done(self, limit: int = 10_000_000) -> list[int]:
        """``steps_written`` as a list of step numbers."""
        out: list[int] = []
        for item in self.steps_written:
            if isinstance(item, int):
                out.append(item)
            elif len(item) == 2 and 0 <= item[0] <= item[1] and item[1] - item[0] < limit - len(out):
                out.extend(range(item[0], item[1] + 1))
        return out
