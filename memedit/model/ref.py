"""Model references: one string -> a local, readable model (`ModelRef`).

Accepted: a diffusers pipeline folder (model_index.json), one component folder (config.json +
weights, e.g. just `unet/`), a single-file `.safetensors` checkpoint in the original key layout, a
Hub repo id (`org/name` or `org/name@revision`) resolved from the local Hugging Face cache only,
and `lab`, the bundled memorization lab (a local path of that name wins). Resolution never
downloads: these machines are offline, and a resolver that downloads makes a run depend on the
network. Pickle formats are refused, never opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memedit.errors import MemeditError, ModelNotFound, PickleRefused

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
LAB_NAME = "lab"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")

Kind = Literal["pipeline", "component", "single_file"]


@dataclass(frozen=True)
class ModelRef:
    """A resolved model reference. `spec` is what the user typed; `str(ref)` gives it back."""

    spec: str
    kind: Kind
    path: Path
    source: Literal["local", "lab", "hub-cache"]
    variant: str | None = None

    def __str__(self) -> str:
        return self.spec

    def describe(self) -> str:
        where = {"local": "local", "lab": "bundled lab model", "hub-cache": "Hugging Face cache"}[self.source]
        return f"{self.spec} -> {self.path} ({self.kind.replace('_', ' ')}, {where})"


def lab_model_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "lab" / "model"


def pickle_refused(path: Path) -> PickleRefused:
    return PickleRefused(
        f"{path} is a pickle-based file ({path.suffix}); memedit never unpickles weights",
        "convert it to safetensors in a trusted environment first (e.g. diffusers' "
        "scripts/convert_original_stable_diffusion_to_diffusers.py with --to_safetensors)",
    )


def _classify_dir(path: Path) -> Kind:
    if not any(path.iterdir()):
        raise ModelNotFound(f"{path} is an empty folder", "point to a diffusers folder or a .safetensors file")
    if (path / "model_index.json").is_file():
        return "pipeline"
    if (path / "config.json").is_file():
        return "component"
    raise ModelNotFound(
        f"{path} has neither model_index.json (a diffusers pipeline) nor config.json (one component)",
        "point to the pipeline folder, one component folder such as unet/, or a .safetensors file",
    )


def _classify_file(path: Path) -> Kind:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_refused(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelNotFound(
            f"{path} is not a .safetensors file",
            "give a diffusers folder or a single-file .safetensors checkpoint",
        )
    return "single_file"


def _from_path(spec: str, path: Path, source: Literal["local", "lab", "hub-cache"], variant: str | None) -> ModelRef:
    kind = _classify_dir(path) if path.is_dir() else _classify_file(path)
    return ModelRef(spec=spec, kind=kind, path=path.resolve(), source=source, variant=variant)


def _from_hub_cache(spec: str, variant: str | None) -> ModelRef:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    try:
        local = snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise ModelNotFound(
            f"{spec!r} is not a local path and not in the local Hugging Face cache",
            "download it first where a network is allowed (hf download "
            + repo_id
            + "), or pass a local folder or .safetensors file",
        ) from None
    return _from_path(spec, Path(local), "hub-cache", variant)


def resolve(spec: str | Path, variant: str | None = None) -> ModelRef:
    """Resolve a model reference string; raises a MemeditError with a hint on anything unusable."""
    text = str(spec)
    if not text.strip():
        raise ModelNotFound("the model reference is empty", "pass a folder, a .safetensors file, a Hub id or 'lab'")
    path = Path(text).expanduser()
    if path.exists():
        return _from_path(text, path, "local", variant)
    if text == LAB_NAME:
        lab = lab_model_dir()
        if not (lab / "model_index.json").is_file():
            raise ModelNotFound(
                "the bundled lab model is missing from this installation",
                "reinstall memedit, or train it with: memedit lab train --out DIR",
            )
        return _from_path(text, lab, "lab", variant)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return _from_hub_cache(text, variant)
    raise ModelNotFound(f"{text} does not exist", "check the path, or pass a Hub id such as org/name or 'lab'")


def require_file(path: Path, what: str) -> Path:
    """A path that must be an existing regular file (e.g. a prompt file or recipe)."""
    path = Path(path)
    if not path.exists():
        raise MemeditError(f"{what} {path} does not exist", "check the path")
    if path.is_dir():
        raise MemeditError(f"{what} {path} is a folder, a file is required", "pass the file itself")
    return path


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise MemeditError(f"{what} {path} does not exist", "check the path")
    if not path.is_dir():
        raise MemeditError(f"{what} {path} is a file, a folder is required", "pass the folder that contains it")
    return path
