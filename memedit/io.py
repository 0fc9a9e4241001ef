"""Streaming safetensors writing, hashing, and atomic folders.

`StreamingWriter` declares every tensor up front (so the header is final), then takes the bytes of
each tensor in order, in as many chunks as the caller likes: peak memory is one chunk, not the
model. Metadata keys are written sorted (safetensors itself writes them in random order), so the
same tensors give the same bytes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from memedit.errors import OutputExists, OutputNotWritable

if TYPE_CHECKING:
    import torch

# safetensors dtype names by torch dtype name; keyed by str(dtype) so that streaming verbs (apply,
# verify) need not import torch
ST_DTYPES = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}
CHUNK = 8 * 1024 * 1024


def torch_dtype(st: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (the inverse of ST_DTYPES)."""
    import torch

    name = {v: k for k, v in ST_DTYPES.items()}[st]
    return getattr(torch, name.removeprefix("torch."))


# disk full, file too large (RLIMIT_FSIZE), quota, read-only file system, permission denied
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class BackgroundHash:
    """sha256 fed on a worker thread, so that hashing overlaps reading and writing.

    hashlib releases the GIL on large buffers; with one worker per digest, apply hashes its input and
    its output at the same time as it streams bytes from one to the other. At most `depth` chunks wait.
    """

    def __init__(self, depth: int = 4) -> None:
        self._h = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: deque[Future] = deque()
        self._depth = depth

    def update(self, data: bytes) -> None:
        self._pending.append(self._pool.submit(self._h.update, data))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def hexdigest(self) -> str:
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()
        return self._h.hexdigest()


def sha256_file(path: Path) -> str:
    h = BackgroundHash()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    import torch

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


class StreamingWriter:
    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(sorted(metadata.items()))
        self.sizes: dict[str, int] = {}
        self.order = [k for k, _, _ in entries]
        pos = 0
        for key, dtype, shape in entries:
            n = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": ST_DTYPES[str(dtype)], "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.sizes[key] = n
            pos += n
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section
        self.f = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.pending = list(self.order)
        self.written = 0

    def write(self, key: str, chunk: torch.Tensor | bytes) -> None:
        """Append bytes of tensor `key` (must be the current tensor, in declaration order)."""
        if not self.pending or self.pending[0] != key:
            raise RuntimeError(f"expected tensor {self.pending[:1]}, got {key!r}")
        data = chunk if isinstance(chunk, bytes) else tensor_bytes(chunk)
        self.f.write(data)
        self.written += len(data)
        if self.written > self.sizes[key]:
            raise RuntimeError(f"too many bytes for {key!r}")
        if self.written == self.sizes[key]:
            self.pending.pop(0)
            self.written = 0

    def close(self) -> None:
        self.f.close()
        if self.pending:
            raise RuntimeError(f"tensors not written: {self.pending[:3]}")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Deterministic save: keys sorted, metadata sorted; written beside and renamed, so that a file the
    tensors were memory-mapped from can be replaced safely."""
    path = Path(path)
    keys = sorted(tensors)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        w = StreamingWriter(tmp, [(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in keys], metadata)
        for k in keys:
            w.write(k, tensors[k])
        w.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def write_errors(target: Path) -> Iterator[None]:
    """Disk full, file size limit, read-only or forbidden locations become one-line user errors."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise OutputNotWritable(
            f"could not write {target} ({e.strerror})",
            "free disk space or choose a writable output location; no output was kept",
        ) from e


@contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target`, on any error it vanishes."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise OutputExists(f"{target} already exists and is not empty", "choose another output or pass --overwrite")
    with write_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        try:
            yield tmp
        except OSError as e:
            if e.errno not in _WRITE_ERRNOS:
                raise
            raise OutputNotWritable(
                f"could not write {target} ({e.strerror})",
                "free disk space or choose a writable output location; nothing was written",
            ) from e
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temps(target: Path) -> None:
    """Temp folders of runs that were killed (their process is gone) are removed before a new run."""
    for p in target.parent.glob(f".{target.name}.tmp-*-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


def write_json(path: Path, obj: object) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
