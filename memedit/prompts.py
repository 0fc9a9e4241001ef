"""Prompt files: `.txt` (one per line), `.jsonl` (`prompt` or `caption` field, optional `memorized`),
`.csv` (a `prompt` or `caption` column). Read strictly: a file that cannot be read as promised is a
one-line error naming the line."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from memedit.errors import MemeditError
from memedit.model.ref import require_file

MAX_PROMPT_CHARS = 10_000


@dataclass(frozen=True)
class PromptSet:
    path: Path
    sha256: str
    prompts: tuple[str, ...]
    labels: tuple[bool | None, ...]  # ground truth from a `memorized` field, where present

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_labels(self) -> bool:
        return all(x is not None for x in self.labels)


def _bad(path: Path, what: str) -> MemeditError:
    return MemeditError(
        f"prompt file {path}: {what}",
        "use .txt (one prompt per line), .jsonl with a 'prompt' or 'caption' field, "
        "or .csv with a 'prompt' column, in UTF-8",
    )


def _pick(path: Path, where: str, record: dict) -> tuple[str, bool | None]:
    text = record.get("prompt", record.get("caption"))
    if not isinstance(text, str):
        raise _bad(path, f"{where} has no string 'prompt' or 'caption'")
    label = record.get("memorized")
    if label is not None and not isinstance(label, bool):
        if isinstance(label, str) and label.lower() in ("true", "false", "1", "0"):
            label = label.lower() in ("true", "1")
        else:
            raise _bad(path, f"{where} has a non-boolean 'memorized' value")
    return text, label


def load_prompts(path: Path | str) -> PromptSet:
    path = require_file(Path(path), "prompt file")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise _bad(path, "is binary, not text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _bad(path, f"is not UTF-8 (byte {e.start})") from None
    suffix = path.suffix.lower()
    rows: list[tuple[str, bool | None]] = []
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise _bad(path, f"line {n} is not JSON") from None
            if not isinstance(rec, dict):
                raise _bad(path, f"line {n} is not a JSON object")
            rows.append(_pick(path, f"line {n}", rec))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"prompt", "caption"} & set(reader.fieldnames):
            raise _bad(path, "has no 'prompt' or 'caption' column")
        rows = [_pick(path, f"row {n}", rec) for n, rec in enumerate(reader, 2)]
    elif suffix == ".txt":
        rows = [(line, None) for line in text.splitlines() if line.strip()]
    else:
        raise _bad(path, f"unknown extension {suffix!r}")
    rows = [(p.strip(), lab) for p, lab in rows]
    if not rows:
        raise _bad(path, "holds no prompts")
    for n, (p, _) in enumerate(rows, 1):
        if not p:
            raise _bad(path, f"prompt {n} is empty")
        if len(p) > MAX_PROMPT_CHARS:
            raise _bad(path, f"prompt {n} is longer than {MAX_PROMPT_CHARS} characters")
    return PromptSet(path, hashlib.sha256(raw).hexdigest(), tuple(p for p, _ in rows), tuple(lab for _, lab in rows))


def prompt_seed(base_seed: int, prompt: str) -> int:
    """A per-prompt seed that depends on the text, not on its position in a file or batch."""
    digest = hashlib.sha256(f"{base_seed}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def holdout_file(
    given: Path | str | None,
    ref,
    missing: str = "no --holdout prompt file was given",
    fix: str = "pass --holdout FILE with non-memorized prompts",
) -> Path:
    """The hold-out prompt file: the one given, else the lab's bundled hold-out prompts when `ref` is
    the lab model; for other models a missing one is the error (`missing`, `fix`)."""
    if given is not None:
        return Path(given)
    if ref.source != "lab":
        raise MemeditError(missing, fix)
    from memedit.lab.check import lab_dir

    return lab_dir() / "prompts" / "holdout.jsonl"
