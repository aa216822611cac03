"""Tensor files: written from the tensor's own memory, read without trusting a byte of them.

Writing: a ``.pt`` file is the zip archive ``torch.save`` makes (the same
entries, 64-byte aligned records, CRC-32s), built here around the tensor's
bytes, so nothing is serialised into memory first and ``torch.load`` (with
``weights_only=True`` and ``mmap=True``) reads it like one of its own. The
pickle that describes the tensor is cached per dtype and shape.

Reading: only regular files that are not symbolic links; ``torch.load`` with
``weights_only=True`` (never code from disk), memory-mapped; a tensor whose
storage is smaller than its shape needs (zero or overlapping strides, which
would expand to gigabytes when compared) is refused before it is touched.
"""

from __future__ import annotations

import collections
import errno
import functools
import io
import json
import mmap
import os
import pickle
import re
import stat
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from ..errors import ResourceLimitError, RunReadError

__all__ = [
    "encode_pt",
    "encode_safetensors",
    "load_tensor_file",
    "open_regular",
    "read_limited",
    "ST_DTYPES",
    "ST_NAMES",
    "st_dtype_name",
]


# -- writing .pt ------------------------------------------------------------------------------


class _StorageRef:
    __slots__ = ("pid",)

    def __init__(self, pid: tuple[Any, ...]) -> None:
        self.pid = pid


class _Rebuild:
    """Pickles as ``torch._utils._rebuild_tensor_v2/v3(storage, 0, size, stride, False, OrderedDict()[, dtype])``."""

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, ...]:
        fn = torch._utils._rebuild_tensor_v3 if len(self.args) == 7 else torch._utils._rebuild_tensor_v2
        return fn, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, _StorageRef) else None


@functools.lru_cache(maxsize=4096)
def _tensor_pickle(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    from torch.storage import _dtype_to_storage_type_map

    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    numel = 1
    for d in shape:
        numel *= d
    typed = _dtype_to_storage_type_map().get(dtype)
    if typed is not None:
        ref = _StorageRef(("storage", getattr(torch, typed), "0", "cpu", numel))
        args: tuple[Any, ...] = (ref, 0, shape, tuple(reversed(stride)), False, collections.OrderedDict())
    else:  # dtypes without a typed storage class (float8, uint16, ...): as torch.save writes them
        ref = _StorageRef(("storage", torch.UntypedStorage, "0", "cpu", numel * dtype.itemsize))
        args = (ref, 0, shape, tuple(reversed(stride)), False, collections.OrderedDict(), dtype)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(_Rebuild(args))
    return buf.getvalue()


_ZIP_ALIGN = 64
_ARCHIVE = "archive"


def _zip(
    entries: list[tuple[str, memoryview | bytes]], lengths: dict[int, int] | None = None
) -> tuple[list[memoryview | bytes], list[tuple[int, int]]]:
    """A stored (uncompressed) zip with 64-byte aligned records, ZIP64 where sizes need it.

    ``lengths`` gives the size of entries whose data is not given (``b""``):
    their CRC is left 0, and the places to write it are returned as ``(chunk,
    offset)`` pairs, so a template can be reused for any data of that size.
    """
    out: list[memoryview | bytes] = []
    central: list[bytes] = []
    slots: list[tuple[int, int]] = []
    central_slots: list[int] = []
    off = 0
    for i, (name, data) in enumerate(entries):
        fname = f"{_ARCHIVE}/{name}".encode()
        later = lengths is not None and i in lengths
        n = lengths[i] if lengths is not None and later else len(data)
        big = n >= 0xFFFFFFFF or off >= 0xFFFFFFFF
        z64 = struct.pack("<HHQQ", 0x0001, 16, n, n) if big else b""
        base = off + 30 + len(fname) + len(z64) + 4
        pad = (-base) % _ZIP_ALIGN
        extra = z64 + struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        crc = 0 if later else zlib.crc32(data)
        if later:
            slots.append((len(out), 14))
            central_slots.append(sum(len(c) for c in central) + 16)
        size32 = 0xFFFFFFFF if big else n
        out.append(
            struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if big else 20, 0, 0, 0, 0x21, crc, size32, size32, len(fname), len(extra))
            + fname
            + extra
        )
        out.append(data)
        cz64 = b""
        if big or off >= 0xFFFFFFFF:
            cz64 = struct.pack("<HHQQQ", 0x0001, 24, n, n, off)
        central.append(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                45 if cz64 else 20,
                45 if cz64 else 20,
                0,
                0,
                0,
                0x21,
                crc,
                size32,
                size32,
                len(fname),
                len(cz64),
                0,
                0,
                0,
                0,
                0xFFFFFFFF if cz64 else off,
            )
            + fname
            + cz64
        )
        off += len(out[-2]) + n
    cd = b"".join(central)
    tail = b""
    if off >= 0xFFFFFFFF or len(cd) >= 0xFFFFFFFF:
        tail = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(entries), len(entries), len(cd), off) + struct.pack(
            "<IIQI", 0x07064B50, 0, off + len(cd), 1
        )
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), min(len(cd), 0xFFFFFFFF), min(off, 0xFFFFFFFF), 0
    )
    slots += [(len(out), c) for c in central_slots]
    out.append(cd + tail + end)
    return out, slots


_PT_FILES: list[tuple[str, bytes]] = [(".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little")]


_DATA_CHUNK = 2 * (1 + len(_PT_FILES)) + 1
"""Each entry is a header chunk and a data chunk; ``data/0`` follows ``data.pkl`` and ``_PT_FILES``."""


@functools.lru_cache(maxsize=4096)
def _pt_template(
    dtype: torch.dtype, shape: tuple[int, ...], nbytes: int
) -> tuple[list[memoryview | bytes], list[tuple[int, int]]]:
    """The chunks of a ``.pt`` file for this dtype and shape, with the data and its CRC left out."""
    entries: list[tuple[str, memoryview | bytes]] = [("data.pkl", _tensor_pickle(dtype, shape)), *_PT_FILES]
    entries += [("data/0", b""), ("version", b"3\n")]
    return _zip(entries, {len(entries) - 2: nbytes})


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def encode_pt(t: torch.Tensor) -> list[memoryview | bytes | bytearray]:
    """The chunks of a ``.pt`` file holding ``t`` (a contiguous CPU tensor); its data is not copied.

    The zip around the data is the same for every tensor of a dtype and shape:
    it is built once and only the data's CRC is written in.
    """
    if not t.is_contiguous() or t.device.type != "cpu":
        t = t.to("cpu").contiguous()
    data = _bytes_of(t)
    template, slots = _pt_template(t.dtype, tuple(t.shape), len(data))
    chunks: list[memoryview | bytes | bytearray] = list(template)
    crc = zlib.crc32(data)
    for i, off in slots:
        patched = bytearray(chunks[i])
        struct.pack_into("<I", patched, off, crc)
        chunks[i] = patched
    chunks[_DATA_CHUNK] = data
    return chunks


# -- safetensors -----------------------------------------------------------------------------

ST_DTYPES: dict[str, torch.dtype] = {
    name: dt
    for name, dt in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "U16": getattr(torch, "uint16", None),
        "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
        "BOOL": torch.bool,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "C64": torch.complex64,
    }.items()
    if dt is not None
}
ST_NAMES = {dt: name for name, dt in ST_DTYPES.items()}


def st_dtype_name(dtype: torch.dtype) -> str:
    try:
        return ST_NAMES[dtype]
    except KeyError:
        raise ValueError(f"safetensors cannot hold {dtype}") from None


def encode_safetensors(t: torch.Tensor, key: str = "tensor") -> list[memoryview | bytes]:
    """A single-tensor safetensors file, its data not copied."""
    if not t.is_contiguous() or t.device.type != "cpu":
        t = t.to("cpu").contiguous()
    n = t.numel() * t.element_size()
    header = json.dumps(
        {key: {"dtype": st_dtype_name(t.dtype), "shape": list(t.shape), "data_offsets": [0, n]}}, separators=(",", ":")
    ).encode()
    header += b" " * ((-len(header)) % 8)
    return [struct.pack("<Q", len(header)) + header, _bytes_of(t) if n else b""]


# -- reading ---------------------------------------------------------------------------------


def open_regular(path: Path) -> int:
    """An fd for ``path``, which must be a regular file and not a symbolic link (nor a FIFO that would block)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        _raise_if_exhausted(e, path)
        raise RunReadError(f"cannot read {path}: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise RunReadError(f"refusing {path}: a symbolic link (a run never contains one)")
    if not stat.S_ISREG(st.st_mode):
        raise RunReadError(f"refusing {path}: not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        _raise_if_exhausted(e, path)
        raise RunReadError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since lstat
        os.close(fd)
        raise RunReadError(f"refusing {path}: not a regular file")
    return fd


def read_limited(path: Path, limit: int) -> bytes:
    """The bytes of a small regular file, refusing anything over ``limit`` before reading it."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise RunReadError(f"refusing {path}: {size} bytes, over the {limit}-byte limit for this kind of file")
        chunks, got = [], 0
        while got <= limit:
            b = os.read(fd, min(1 << 20, limit + 1 - got))
            if not b:
                break
            chunks.append(b)
            got += len(b)
        if got > limit:
            raise RunReadError(f"refusing {path}: over the {limit}-byte limit for this kind of file")
        return b"".join(chunks)
    except OSError as e:
        _raise_if_exhausted(e, path)
        raise RunReadError(f"cannot read {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def load_error_text(e: BaseException) -> str:
    """torch's message, whitespace folded, keeping its safety advice (which follows the first line)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    keep = [lines[0][:300]]
    keep += [ln[:300] for ln in lines[1:] if "weights_only" in ln or "arbitrary code" in ln][:2]
    return " ".join(keep)


_EXHAUSTED = {errno.ENOMEM, errno.EMFILE, errno.ENFILE}
_EXHAUSTED_TEXT = ("Cannot allocate memory", "Too many open files", "out of memory")


def _raise_if_exhausted(e: BaseException, path: Path) -> None:
    """Memory, memory maps or file descriptors ran out: the machine's limit, not a fault of the file."""
    if (
        isinstance(e, MemoryError)
        or (isinstance(e, OSError) and e.errno in _EXHAUSTED)
        or any(t in str(e) for t in _EXHAUSTED_TEXT)
    ):
        raise ResourceLimitError(
            f"this machine ran out of memory, memory maps or file descriptors while reading {path} "
            f"({type(e).__name__}: {str(e)[:200]}); the file itself was not found at fault"
        ) from None


def load_tensor_file(path: Path) -> torch.Tensor:
    """Read one tensor from a ``.pt`` or single-tensor ``.safetensors`` file (memory-mapped, lazily paged in).

    Raises:
        RunReadError: not a regular file, not a tensor file, not a tensor, or a
            tensor that claims more elements than its storage holds.
    """
    fd = open_regular(path)
    os.close(fd)
    if path.suffix == ".safetensors":
        return _mmap_safetensors(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, corrupted, hostile, or not a tensor file at all
        _raise_if_exhausted(e, path)
        raise RunReadError(f"cannot read tensor file {path}: {type(e).__name__}: {load_error_text(e)}") from None
    if not isinstance(obj, torch.Tensor):
        raise RunReadError(f"{path}: holds a {type(obj).__name__}, not a tensor")
    check_dense(obj, path)
    _check_record(path, obj)
    return obj


_DATA_RECORD = re.compile(r"^[^/]+/data/[^/]+$")


def _check_record(path: Path, t: torch.Tensor) -> None:
    """The file's one data record holds exactly the tensor's storage: a memory map over a record that is shorter
    (or a storage that claims more) would read the zip's other bytes as data."""
    try:
        with zipfile.ZipFile(path) as z:
            records = [i for i in z.infolist() if _DATA_RECORD.match(i.filename)]
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise RunReadError(f"cannot read tensor file {path}: {e}") from None
    nbytes = t.untyped_storage().nbytes()
    if len(records) != 1 or records[0].file_size != nbytes or records[0].compress_type != zipfile.ZIP_STORED:
        sizes = ", ".join(str(r.file_size) for r in records[:3])
        raise RunReadError(f"{path}: its storage claims {nbytes} bytes but its data record holds {sizes or 'nothing'}; refused")


def check_dense(t: torch.Tensor, path: Any) -> None:
    """Refuse a tensor that is not a plain dense one, or whose storage is smaller than its elements."""
    if t.layout != torch.strided or t.is_quantized or t.is_nested or t.device.type != "cpu":
        raise RunReadError(f"{path}: not a dense CPU tensor ({t.layout}, {t.device})")
    need = t.numel() * t.element_size()
    have = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if need > have or (t.numel() > 1 and any(s == 0 and d > 1 for s, d in zip(t.stride(), t.shape))):
        raise RunReadError(
            f"{path}: claims {t.numel()} elements of {t.dtype} but its storage holds {max(have, 0)} bytes "
            "(zero or overlapping strides); refused"
        )


def _mmap_safetensors(path: Path) -> torch.Tensor:
    """The single tensor of a safetensors file, memory-mapped (no copy until it is used)."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) != 8:
            raise RunReadError(f"cannot read tensor file {path}: truncated header")
        n = int.from_bytes(head, "little")
        if n <= 1 or n > min(100_000_000, size - 8):
            raise RunReadError(f"cannot read tensor file {path}: bad header length {n}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise RunReadError(f"cannot read tensor file {path}: corrupt header") from None
        entries = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else {}
        if len(entries) != 1:
            raise RunReadError(f"{path}: expected one tensor, found {len(entries)}")
        (info,) = entries.values()
        return _st_view(path, f.fileno(), size, 8 + n, info)


def _st_view(path: Any, fileno: int, size: int, data_start: int, info: Any) -> torch.Tensor:
    try:
        dtype = ST_DTYPES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        start, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise RunReadError(f"cannot read tensor file {path}: corrupt header entry") from None
    if any(d < 0 for d in shape) or start < 0 or end < start:
        raise RunReadError(f"cannot read tensor file {path}: corrupt header entry")
    numel = 1
    for d in shape:
        numel *= d
    if numel * dtype.itemsize != end - start:
        raise RunReadError(f"cannot read tensor file {path}: {numel} elements of {dtype} do not fill bytes {start}..{end}")
    if data_start + end > size:
        raise RunReadError(f"cannot read tensor file {path}: truncated data")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    try:
        mm = mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)
    except OSError as e:
        _raise_if_exhausted(e, Path(str(path)))
        raise RunReadError(f"cannot map tensor file {path}: {e.strerror or e}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer warns that the buffer is read-only; it is never written
        t = torch.frombuffer(mm, dtype=dtype, count=numel, offset=data_start + start)
    return t.view(shape)


def read_safetensors_entry(path: Path, key: str, header: dict[str, Any], data_start: int) -> torch.Tensor:
    """One tensor of a multi-tensor safetensors file whose header was already read (the packed layout)."""
    info = header.get(key)
    if not isinstance(info, dict):
        raise RunReadError(f"{path}: no tensor {key!r}")
    fd = open_regular(path)
    try:
        return _st_view(path, fd, os.fstat(fd).st_size, data_start, info)
    finally:
        os.close(fd)


def read_safetensors_header(path: Path, limit: int) -> tuple[dict[str, Any], int]:
    """``(header, data start)`` of a safetensors file, the header capped at ``limit`` bytes."""
    fd = open_regular(path)
    try:
        head = os.pread(fd, 8, 0)
        if len(head) != 8:
            raise RunReadError(f"cannot read {path}: truncated header")
        n = int.from_bytes(head, "little")
        size = os.fstat(fd).st_size
        if n <= 1 or n > min(limit, size - 8):
            raise RunReadError(f"cannot read {path}: bad header length {n}")
        raw = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise RunReadError(f"cannot read {path}: corrupt header") from None
    if not isinstance(header, dict):
        raise RunReadError(f"cannot read {path}: corrupt header")
    return header, 8 + n
