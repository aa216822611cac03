"""Every file and directory name of the layouts tensorlog writes and reads.

The reference layout (vLLM's intermediate logging), as the reference logger names it::

    <output_dir>/<run_name>/step_<N>/module_calls.txt
                           /step_<N>/<module>[_<k>]/inputs.json            the positional inputs' structure
                                                   /inputs_<i>[_<j>..]_<dev>.pt
                                                   /outputs.json, outputs_<dev>.pt | outputs_<i>[_<j>..]_<dev>.pt
                                                   /post_fwd_inputs.json, post_fwd_inputs_<i>_<dev>.pt
                                                   /inputs_<i>.json        sidecar of a tensor over max_tensor_size

tensorlog's additions, in places the reference never reads::

    <run>/run.json                         the manifest (config, versions, progress, completeness)
    <run>/modules.json                     the model's module tree
    <run>/stack.json                       Python stacks of call sites (``stack: true``)
    <run>/step_<N>/tensorlog_index.json    every call of the step: names, order, statistics, values, files
    <run>/step_<N>/tensors.safetensors     all tensors of the step (``layout: "packed"``)

When several ranks share a run directory, each rank's files get a ``.rank<R>``
infix (``inputs.rank1.json``, ``tensorlog_index.rank1.json``, ``run.rank1.json``)
and tensor files a ``_rank<R>`` suffix to the device tag, so no two processes
ever write the same file.

The vLLM debug-tensor-dump proposal's layout (written by the vLLM plugin)::

    <folder>/TP<t>_PP<p>_Rank<r>_pid<pid>/Pass<NNNNN>.pt
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "STEP_PREFIX",
    "STEP_DIR_RE",
    "step_dir",
    "call_dir",
    "safe_name",
    "rank_infix",
    "is_step_file",
    "file_rank",
    "device_tag",
    "tensor_stem",
    "safe_stem",
    "tensor_file",
    "sidecar_file",
    "ref_meta_file",
    "calls_file",
    "index_file",
    "packed_file",
    "run_file",
    "modules_file",
    "stack_file",
    "temp_name",
    "is_temp_name",
    "MAX_NAME_BYTES",
    "REF_KINDS",
    "RUN_FILE_RE",
    "JOURNAL_FILE_RE",
    "journal_file",
    "journal_line",
    "journal_steps",
    "MODULES_FILE_RE",
    "CALLS_FILE_RE",
    "INDEX_FILE_RE",
    "REF_META_RE",
    "TENSOR_FILE_RE",
    "pass_rank_dir",
    "pass_file",
    "PASS_RANK_DIR_RE",
    "PASS_FILE_RE",
]

STEP_PREFIX = "step_"
STEP_DIR_RE = re.compile(rf"^{STEP_PREFIX}(\d{{1,18}})$")

REF_KINDS = ("inputs", "outputs", "post_fwd_inputs")
"""The three kinds of logged values; each is the prefix of its json and tensor files."""

MAX_NAME_BYTES = 200
"""Longest file or directory name written, in UTF-8 bytes (file systems allow 255; suffixes need room)."""

_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")


def safe_name(name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """One path component that cannot climb out of its parent and fits any file system.

    Names that are already safe come back unchanged (every real module name is);
    the real name is kept in the step index beside the files.
    """
    safe = _UNSAFE.sub("_", name)
    if safe in ("", ".", "..") or safe.startswith("."):
        safe = "_" + safe
    raw = safe.encode("utf-8", "surrogateescape")
    if len(raw) > max_bytes:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        head = raw[: max_bytes - 13].decode("utf-8", "ignore")  # never split a character
        safe = f"{head}~{digest}"
    return safe


def step_dir(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


def call_dir(module: str, call_index: int) -> str:
    """The k-th call (k >= 1) of a module within a step goes to ``<module>_<k>``, as in the reference."""
    base = module or "_root"
    return safe_name(base if call_index == 0 else f"{base}_{call_index}")


def rank_infix(rank: int | None) -> str:
    return "" if rank is None else f".rank{rank}"


_RANK_MARK = re.compile(r"(?:\.rank(\d{1,9})\.|_rank(\d{1,9})\.[A-Za-z]+$)")


def file_rank(name: str) -> int | None:
    """The rank a file of a shared run directory belongs to (its ``.rank<R>.`` infix or ``_rank<R>`` tag)."""
    m = _RANK_MARK.search(name)
    return None if m is None else int(m.group(1) or m.group(2))


def device_tag(device: str, rank: int | None = None) -> str:
    tag = device.replace(":", "_")
    return tag if rank is None else f"{tag}_rank{rank}"


def tensor_stem(kind: str, path: tuple[str, ...]) -> str:
    """``inputs_0``, ``inputs_0_1`` (nested), ``inputs_k`` (a dict key or keyword), ``outputs`` (a single output)."""
    return "_".join((kind, *path))


def safe_stem(stem: str) -> str:
    """A tensor stem that leaves room for the device tag, rank and extension within :data:`MAX_NAME_BYTES`."""
    return safe_name(stem, MAX_NAME_BYTES - 48)


def tensor_file(stem: str, device: str, rank: int | None = None, ext: str = "pt") -> str:
    """``inputs_0_cuda_0.pt``; the device tag (and rank) follow the stem as the reference writes them."""
    return safe_name(f"{stem}_{device_tag(device, rank)}.{ext}")


def sidecar_file(stem: str, rank: int | None = None) -> str:
    """The reference's stand-in for a tensor over ``max_tensor_size``: ``<stem>.json``."""
    return safe_name(f"{stem}{rank_infix(rank)}.json")


def ref_meta_file(kind: str, rank: int | None = None) -> str:
    """``inputs.json`` / ``outputs.json`` / ``post_fwd_inputs.json``: the structure of a call's values."""
    return f"{kind}{rank_infix(rank)}.json"


def calls_file(rank: int | None = None) -> str:
    return f"module_calls{rank_infix(rank)}.txt"


def index_file(rank: int | None = None) -> str:
    return f"tensorlog_index{rank_infix(rank)}.json"


def packed_file(rank: int | None = None) -> str:
    return f"tensors{rank_infix(rank)}.safetensors"


def run_file(rank: int | None = None) -> str:
    return f"run{rank_infix(rank)}.json"


def journal_file(rank: int | None = None) -> str:
    """The append-only list of whole steps, one ``{"step": N}`` line each, written as each step ends."""
    return f"steps{rank_infix(rank)}.jsonl"


_JOURNAL_LINE = re.compile(rb'^\{"step": (\d{1,12})\}$')


def journal_line(step: int) -> bytes:
    return b'{"step": %d}\n' % step


def journal_steps(data: bytes) -> set[int]:
    """The steps a journal lists; anything else (a torn last line, from a kill mid-write) is ignored."""
    return {int(m.group(1)) for line in data.split(b"\n") if (m := _JOURNAL_LINE.match(line))}


def modules_file(rank: int | None = None) -> str:
    return f"modules{rank_infix(rank)}.json"


def stack_file(rank: int | None = None) -> str:
    return f"stack{rank_infix(rank)}.json"


_TEMP_RE = re.compile(r"^\..+\.tmp(\d+)-\d+(?:@([0-9a-f]{8}))?$")


def host_tag(hostname: str) -> str:
    """Eight hex digits naming a host in temporary names: a pid means something only on its own host."""
    import hashlib

    return hashlib.blake2b(hostname.encode(), digest_size=4).hexdigest()


def temp_name(name: str, pid: int, thread: int, host: str = "") -> str:
    """A temporary name unique to one process and thread on one host, renamed into place when whole."""
    return f".{name}.tmp{pid}-{thread}" + (f"@{host}" if host else "")


def temp_owner(name: str) -> tuple[int, str | None] | None:
    """(pid, host tag) of a temporary name, or None when ``name`` is not one."""
    m = _TEMP_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def is_temp_name(name: str) -> bool:
    """A temporary file: never read; left only by a process that died before renaming it."""
    return bool(_TEMP_RE.match(name)) or bool(re.match(r"^\..+\.tmp\d+$", name))  # also the 0.1 naming


PACKED_FILE_RE = re.compile(r"^tensors(?:\.rank(\d{1,9}))?\.safetensors$")


def is_step_file(name: str) -> bool:
    """A name tensorlog's own files take in a step directory: a module's directory cannot have it."""
    return bool(INDEX_FILE_RE.match(name) or CALLS_FILE_RE.match(name) or PACKED_FILE_RE.match(name))


MODULES_FILE_RE = re.compile(r"^modules(?:\.rank(\d{1,9}))?\.json$")
RUN_FILE_RE = re.compile(r"^run(?:\.rank(\d{1,9}))?\.json$")
JOURNAL_FILE_RE = re.compile(r"^steps(?:\.rank(\d{1,9}))?\.jsonl$")
CALLS_FILE_RE = re.compile(r"^module_calls(?:\.rank(\d{1,9}))?\.txt$")
INDEX_FILE_RE = re.compile(r"^tensorlog_index(?:\.rank(\d{1,9}))?\.json$")
REF_META_RE = re.compile(r"^(post_fwd_inputs|inputs|outputs)(?:\.rank(\d{1,9}))?\.json$")
TENSOR_FILE_RE = re.compile(r"^(post_fwd_inputs|inputs|outputs)(?:_(.*))?\.(pt|safetensors)$")

PASS_RANK_DIR_RE = re.compile(r"^TP(\d{1,9})_PP(\d{1,9})_Rank(\d{1,9})_pid(\d{1,12})$")
PASS_FILE_RE = re.compile(r"^Pass(\d{1,12})\.pt$")


def pass_rank_dir(tp: int, pp: int, rank: int, pid: int) -> str:
    return f"TP{tp}_PP{pp}_Rank{rank}_pid{pid}"


def pass_file(index: int) -> str:
    return f"Pass{index:05d}.pt"
