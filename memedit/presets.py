"""Localization presets per architecture (`memedit/recipes/*.yaml`): target layers and method
defaults, so that `memedit localize STATS --preset sd1` starts from the settings the methods were
published with. A preset names the number of value layers of its architecture and is refused for
statistics of another one. Explicit command-line options override a preset's values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from memedit.errors import MemeditError

PRESET_DIR = Path(__file__).with_name("recipes")
SCHEMA = "memedit.preset/v1"
_TOP = {"preset", "description", "value_layers", "method", "targets", "nemo", "joint_refine", "subspace", "encoder"}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _bad(path: Path, what: str) -> MemeditError:
    return MemeditError(f"preset {path}: {what}", f"see the presets in {PRESET_DIR}")


def load_preset(name_or_path: str) -> tuple[dict, Path]:
    """(settings mapping, file) of a preset given by name (sd1, sd2, sdxl, lab) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise MemeditError(f"unknown preset {name_or_path!r}", f"choose one of {', '.join(preset_names())}")
    if not path.is_file():
        raise MemeditError(f"preset file {path} does not exist", "check the path")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise _bad(path, f"not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise _bad(path, "is not a mapping")
    if raw.get("preset") != SCHEMA:
        raise _bad(path, f"'preset' must be {SCHEMA}")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise _bad(path, f"unknown key(s) {', '.join(unknown)}")
    return raw, path


def apply_preset(settings, raw: dict, path: Path, explicit: set[str], value_layers: int | None = None):
    """LocalizeSettings with the preset's values, except the fields in `explicit` (given by the user)."""
    from memedit.localize import METHOD_CHOICES, TARGET_CHOICES
    from memedit.localize.encoder import EncoderSettings
    from memedit.localize.nemo import NemoSettings
    from memedit.localize.subspace import SubspaceSettings

    if value_layers is not None and raw.get("value_layers") not in (None, value_layers):
        raise MemeditError(
            f"preset {path.stem} is for models with {raw['value_layers']} value layers; these statistics "
            f"have {value_layers}",
            f"use the preset of this architecture ({', '.join(preset_names())}) or none",
        )
    changes: dict = {}
    if "method" in raw and "method" not in explicit:
        if raw["method"] not in METHOD_CHOICES:
            raise _bad(path, f"method must be one of {', '.join(METHOD_CHOICES)}")
        changes["method"] = raw["method"]
    if "targets" in raw and "targets" not in explicit:
        if raw["targets"] not in TARGET_CHOICES:
            raise _bad(path, f"targets must be one of {', '.join(TARGET_CHOICES)}")
        changes["targets"] = raw["targets"]
    if "joint_refine" in raw and "joint_refine" not in explicit:
        if not isinstance(raw["joint_refine"], bool):
            raise _bad(path, "joint_refine must be true or false")
        changes["joint_refine"] = raw["joint_refine"]
    for key, cls, current in (
        ("nemo", NemoSettings, settings.nemo),
        ("subspace", SubspaceSettings, settings.subspace),
        ("encoder", EncoderSettings, settings.encoder),
    ):
        part = raw.get(key) or {}
        if not isinstance(part, dict):
            raise _bad(path, f"{key} must be a mapping")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(part) - set(fields))
        if unknown:
            raise _bad(path, f"unknown {key} setting(s) {', '.join(unknown)}")
        keep = {k: v for k, v in part.items() if f"{key}.{k}" not in explicit}
        for k, v in keep.items():
            want = type(getattr(current, k))
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if want is tuple and isinstance(v, list) and all(type(x) is int for x in v):
                v = tuple(v)  # YAML has lists; settings keep tuples (seeds)
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise _bad(path, f"{key}.{k} must be {want.__name__}")
            keep[k] = v
        changes[key] = dataclasses.replace(current, **keep)
    return dataclasses.replace(settings, **changes)
