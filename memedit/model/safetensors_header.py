"""Read and validate a safetensors header without touching tensor data.

Layer discovery, diffs and plans need names, dtypes, shapes and byte ranges only; an SDXL UNet must
not cost 10 GB of RAM to inspect. Every way a file can lie about itself (a header length past the
end, a truncated data section, overlapping ranges) is a `CorruptFile` error naming the file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from memedit.errors import CorruptFile

# The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class HeaderEntry:
    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offset inside the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    header_len: int
    metadata: dict[str, str]
    entries: tuple[HeaderEntry, ...]

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def by_key(self) -> dict[str, HeaderEntry]:
        return {e.key: e for e in self.entries}


def _bad(path: Path, what: str) -> CorruptFile:
    return CorruptFile(
        f"{path} is not a valid safetensors file ({what})",
        "re-download or re-export it; memedit reads only intact safetensors files",
    )


def read_header(path: Path) -> SafetensorsHeader:
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise _bad(path, f"only {size} bytes long")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise _bad(path, f"header length {n} exceeds the file size or the 100 MB limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"header is not JSON: {e.__class__.__name__}") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_len = size - 8 - n
    entries = []
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"entry {key!r} is malformed")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise _bad(path, f"entry {key!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise _bad(path, f"entry {key!r} has an invalid shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _bad(path, f"entry {key!r} has invalid data offsets")
        e = HeaderEntry(key, dtype, tuple(shape), offsets[0], offsets[1])
        if e.end - e.begin != e.numel * DTYPE_BYTES[dtype]:
            raise _bad(path, f"entry {key!r} byte range does not match its shape and dtype")
        if e.end > data_len:
            raise _bad(path, f"truncated: entry {key!r} ends at byte {e.end} of a {data_len}-byte data section")
        entries.append(e)
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin < pos:
            raise _bad(path, f"entry {e.key!r} overlaps the previous tensor")
        pos = max(pos, e.end)
    return SafetensorsHeader(path, n, dict(meta), tuple(entries))


def bits_view(data: bytes, dtype: str, shape: tuple[int, ...]):
    """The raw elements of a tensor as unsigned integers of the element's width (a numpy array).

    Zeroing rows, columns or masked entries and comparing for change are bit operations, the same for
    every float format (bf16 and fp8 included), so the streaming verbs need neither torch nor a
    float conversion.
    """
    import numpy as np

    width = DTYPE_BYTES[dtype]
    kind = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    return np.frombuffer(data, dtype=kind).reshape(shape)


def nonzero(bits):
    """Which raw elements (see bits_view) hold a value other than zero, +0.0 and -0.0 both counting
    as zero: every float format keeps its sign in the top bit."""
    return (bits & ~bits.dtype.type(1 << (8 * bits.itemsize - 1))) != 0


def read_tensor_bytes(path: Path, key: str) -> tuple[HeaderEntry, bytes]:
    """One tensor's raw bytes, read by offset (no memory map, no torch)."""
    h = read_header(path)
    e = h.by_key()[key]
    with open(path, "rb") as f:
        f.seek(h.data_start + e.begin)
        data = f.read(e.end - e.begin)
    if len(data) != e.end - e.begin:
        raise _bad(path, f"tensor {key} is truncated")
    return e, data
